"""The cross-encoder judge: its targets and loss, a real Ray Train fine-tune that resumes, and vLLM classify
through `ray.data.llm` agreeing with transformers on the same pairs."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from mr_ray.config import (
    ConfigError,
    JudgeEngineConfig,
    JudgeFinetuneConfig,
    load_config,
)
from mr_ray.labeler import cross_encoder
from mr_ray.labeler.judge import (
    CausalLMJudge,
    CrossEncoderJudge,
    judge_of_kind,
    judge_of_model,
)
from mr_ray.labeler.label import label_pairs
from mr_ray.labeler.prompt import pair_texts
from mr_ray.schema import conform

ENGINE = JudgeEngineConfig(batch_size=8, max_num_seqs=8, max_model_len=128, kv_cache_gib=1)


def test_soft_targets_split_the_mean_rating_between_neighbouring_grades():
    targets = cross_encoder.soft_targets(np.array([2, 1, 0, 2]), np.array([2.33, 2.0, 1.0, np.nan]))
    np.testing.assert_allclose(targets, [[0, 0.67, 0.33], [0, 1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-9)
    np.testing.assert_allclose(targets @ [1, 2, 3], [2.33, 2.0, 1.0, 3.0])  # expected rating = the mean rating
    np.testing.assert_allclose(cross_encoder.soft_targets(np.array([0, 2]), None), [[1, 0, 0], [0, 0, 1]])


def test_weighted_soft_cross_entropy_is_the_weighted_formula_and_cross_entropy_on_one_hot():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 1.0, 3.0]])
    weights = torch.tensor([0.5, 1.0, 2.0])
    loss = cross_encoder.WeightedSoftCrossEntropy(weights)
    hard = torch.tensor([0, 2, 1])
    torch.testing.assert_close(loss(logits, torch.eye(3)[hard]), torch.nn.functional.cross_entropy(logits, hard, weight=weights))
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0]])
    y = soft.argmax(dim=1)  # ties go to the lower grade
    expected = -(weights[y] * (soft * torch.log_softmax(logits, dim=1)).sum(dim=1)).sum() / weights[y].sum()
    torch.testing.assert_close(loss(logits, soft), expected)


def test_product_text_and_malformed_pairs():
    assert cross_encoder.product_text({"title": " Red shoes ", "brand": "stridex", "color": "", "category": None}) == "Red shoes ; brand: stridex"
    texts = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "product_id": ["p0", "p1", "p2"], "query": ["shoes", " ", "mat"], "title": ["Red shoes", "Lamp", None]})
    strings, bad = cross_encoder.pair_strings(texts)
    assert strings["query_id"].tolist() == ["q0"]
    assert bad.set_index("query_id")["reason"].to_dict() == {"q1": "query text is missing or blank", "q2": "product title is missing or blank"}


def test_config_kind_defaults_and_explicit_values_win():
    assert load_config().judge.kind == "cross_encoder"
    cross = load_config(overrides={"judge.finetune.epochs": 1}).judge.finetune
    assert (cross.max_examples, cross.train_layers, cross.learning_rate, cross.epochs) == (None, None, 5e-5, 1)
    causal = load_config(overrides={"judge.kind": "causal_lm"}).judge.finetune
    assert (causal.max_examples, causal.train_layers, causal.learning_rate) == (None, 4, 3e-4)
    assert isinstance(judge_of_kind("causal_lm"), CausalLMJudge)
    assert load_config(overrides={"judge.finetune.precision": "bf16"}).judge.finetune.precision == "bf16"
    with pytest.raises(ConfigError, match="precision bf16 applies to the cross_encoder judge only"):
        load_config(overrides={"judge.kind": "causal_lm", "judge.finetune.precision": "bf16"})


def catalog():
    products = pd.DataFrame(
        {
            "product_id": [f"P{i}" for i in range(6)],
            "title": ["Stridex red mesh running shoes", "Chefwell nonstick frying pan 10 inch", "Torqmax 20v cordless drill",
                      "Zenfit pink yoga mat 6mm", "Stridex blue running shoes", "Torqmax drill bit set"],
            "brand": ["stridex", "chefwell", "torqmax", "zenfit", "stridex", "torqmax"],
            "color": ["red", "black", None, "pink", "blue", None],
        }
    )
    queries = pd.DataFrame({"query_id": ["q0", "q1", "q2", "q3"], "text": ["red running shoes", "frying pan", "cordless drill 20v", "yoga mat"]})
    exact = {"q0": "P0", "q1": "P1", "q2": "P2", "q3": "P3"}
    partial = {("q0", "P4"), ("q2", "P5")}
    rows = [(q, p, 2 if exact[q] == p else 1 if (q, p) in partial else 0) for q in exact for p in products["product_id"]]
    labels = pd.DataFrame(rows, columns=["query_id", "product_id", "grade"])
    return products, queries, labels


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """A real Ray Train fine-tune (top layer, 24 pairs), run as two calls on one storage folder: 1 epoch, then 2."""
    work = tmp_path_factory.mktemp("cross-encoder")
    products, queries, labels = catalog()
    judge = CrossEncoderJudge()
    examples = judge.examples(labels, queries, products, JudgeFinetuneConfig(soft_targets=False))
    base = judge.base_model(None, work)
    cfg = dict(train_layers=1, batch_size=8, learning_rate=5e-4, max_seq_length=32, checkpoint_every=2, max_examples=None)
    first = judge.finetune(examples, base, JudgeFinetuneConfig(epochs=1, **cfg), work / "storage", work / "first")
    second = judge.finetune(examples, base, JudgeFinetuneConfig(epochs=2, **cfg), work / "storage", work / "model")
    return {"work": work, "model": work / "model", "first": first, "second": second, "examples": examples,
            "catalog": (products, queries, labels)}


def test_finetune_resumes_from_its_checkpoint_and_saves_a_loadable_classifier(trained):
    # 24 pairs, batches of 8: 3 steps an epoch. The second call starts from the first call's
    # last checkpoint (step 3) and runs only epoch 2, so its step counter ends at 6.
    assert trained["first"]["steps"] == 3 and trained["second"]["steps"] == 6
    config = json.loads((trained["model"] / "config.json").read_text())
    assert config["id2label"] == {"0": "irrelevant", "1": "partial", "2": "exact"}
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert isinstance(judge_of_model(trained["model"]), CrossEncoderJudge)
    causal = trained["work"] / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert isinstance(judge_of_model(causal), CausalLMJudge)
    # the saved tokenizer carries the training length, so labeling truncates the same way
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(trained["model"])).model_max_length == 32


def test_bf16_finetune_learns_and_saves_fp32_weights(ray_local, tmp_path):
    """precision bf16 autocasts the forward only: the loss falls from log(3) and the saved classifier is fp32."""
    from safetensors import safe_open

    products, queries, labels = catalog()
    judge = CrossEncoderJudge()
    examples = judge.examples(labels, queries, products, JudgeFinetuneConfig(soft_targets=False))
    cfg = JudgeFinetuneConfig(train_layers=1, batch_size=8, learning_rate=5e-4, max_seq_length=32, checkpoint_every=3, epochs=4, precision="bf16")
    metrics = judge.finetune(examples, judge.base_model(None, tmp_path), cfg, tmp_path / "storage", tmp_path / "model")
    assert metrics["steps"] == 12 and metrics["final_loss"] < 0.9 * np.log(3)
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.float32"}


def test_vllm_classify_in_ray_data_matches_transformers_and_writes_the_judgment_schema(trained, tmp_path):
    products, queries, labels = trained["catalog"]
    pairs = pd.concat([labels[["query_id", "product_id"]], pd.DataFrame({"query_id": ["q0"], "product_id": ["P_missing"]})], ignore_index=True)
    judged, bad = label_pairs(pairs, queries, products, trained["model"], ENGINE, tmp_path / "shards", shard_rows=8, log=lambda *_: None)
    assert len(judged) == len(labels) and bad[["query_id", "product_id"]].values.tolist() == [["q0", "P_missing"]]
    conform(pa.Table.from_pandas(judged, preserve_index=False), "judgments", "cross-encoder labels")
    probabilities = judged[["p0", "p1", "p2"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (judged["grade"].to_numpy() == probabilities.argmax(axis=1)).all() and set(judged["source"]) == {"llm"}

    strings, _ = cross_encoder.pair_strings(pair_texts(judged, queries, products))
    reference = cross_encoder.probabilities_transformers(trained["model"], strings)
    np.testing.assert_allclose(probabilities, reference, atol=1e-3)
    # the text pair's token types matter: scoring the same text with every token typed 0 gives other numbers
    assert not np.allclose(reference, _untyped_probabilities(trained["model"], strings), atol=1e-3)


def _untyped_probabilities(model_path, strings):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_path)).eval()
    inputs = cross_encoder.encode(tokenizer, strings["query"], strings["product"])
    inputs["token_type_ids"] = torch.zeros_like(inputs["token_type_ids"])
    with torch.no_grad():
        return torch.softmax(model(**inputs).logits, dim=1).numpy()
