"""Fine-tune pieces: class balance, held-out queries, the grade-token loss, the shared-prefix forward pass."""

import numpy as np
import pandas as pd
import pytest
import torch

from mr_ray.labeler.finetune import (
    GradeTokenLoss,
    PrefixScorer,
    balanced_subsample,
    class_weights,
    freeze_lower_layers,
    split_holdout,
)
from mr_ray.labeler.model import base_model_folder, is_model_folder
from mr_ray.labeler.prompt import (
    chat_frame,
    grade_token_ids,
    render_pair,
    render_prompt,
)


def labels(counts):
    grades = np.repeat([0, 1, 2], counts)
    return pd.DataFrame({"query_id": [f"q{i % 17}" for i in range(len(grades))], "product_id": [f"p{i}" for i in range(len(grades))], "grade": grades})


def test_class_weights_are_inverse_frequency_with_mean_one():
    weights = class_weights(np.array([0] * 10 + [1] * 30 + [2] * 60))
    np.testing.assert_allclose(weights * [10, 30, 60], [100 / 3] * 3)
    np.testing.assert_allclose(weights.mean(), (100 / 30 + 100 / 90 + 100 / 180) / 3)
    assert class_weights(np.array([1, 1, 2]))[0] == 0.0  # an absent class gets no weight


def test_balanced_subsample_equalises_grades_and_takes_short_classes_whole():
    picked = balanced_subsample(labels([10, 300, 290]), 90, seed=0)
    assert picked["grade"].value_counts().to_dict() == {0: 10, 1: 40, 2: 40}
    assert not picked.duplicated("product_id").any()
    assert len(balanced_subsample(labels([5, 5, 5]), 100, seed=0)) == 15
    assert balanced_subsample(labels([10, 300, 290]), 90, seed=0).equals(picked)  # seeded


def test_holdout_keeps_whole_queries_apart():
    train, held = split_holdout(labels([50, 50, 50]), 0.25, seed=1)
    assert set(train["query_id"]).isdisjoint(held["query_id"])
    assert held["query_id"].nunique() == 4 and len(train) + len(held) == 150


def test_grade_token_loss_is_the_weighted_cross_entropy_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 1.0, 3.0]])
    y = torch.tensor([0, 2, 1])
    w = torch.tensor([0.5, 1.0, 2.0])
    log_p = torch.log_softmax(logits, dim=1)[torch.arange(3), y]
    expected = -(w[y] * log_p).sum() / w[y].sum()
    assert torch.isclose(GradeTokenLoss(w)(logits, y), expected)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_model_folder(None, tmp_path_factory.getbasetemp() / "judge-cache")
    assert is_model_folder(folder) and not (folder / "config.json").read_text().count("quantization_config")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def test_shared_prefix_forward_matches_full_prompts_and_trains_only_top_blocks(judge):
    model, tokenizer = judge
    model.eval()
    frame = chat_frame(tokenizer)
    turns = [render_pair("red running shoes", {"title": "Stridex red mesh running shoes, size 9"}), render_pair("drill", {"title": "Zenfit yoga mat"})]
    with torch.no_grad():
        shared = PrefixScorer(model, tokenizer, frame).grade_logits(turns)
        batch = tokenizer([render_prompt(frame, t) for t in turns], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        full = model(**batch).logits[:, -1, grade_token_ids(tokenizer)]
    torch.testing.assert_close(shared, full, atol=1e-3, rtol=1e-3)

    trainable = freeze_lower_layers(model, 2)
    per_block = sum(p.numel() for p in model.model.layers[-1].parameters())
    assert trainable == 2 * per_block + model.model.norm.weight.numel()
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad and model.model.layers[-1].mlp.up_proj.weight.requires_grad
