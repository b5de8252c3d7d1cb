"""The judge's per-grade logit offsets: the decision score, the fit, and folding them into a classifier."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import f1_score, recall_score

from mr_ray.config import ConfigError, load_config
from mr_ray.labeler.calibration import adjusted, decision_score, fit_grade_offsets
from mr_ray.labeler.cross_encoder import fold_grade_offsets
from mr_ray.stages.judge import calibration_split


def skewed_judge(n=3000, skew=(-1.0, 0.0, 1.0), seed=0):
    """Truth spread over the grades and a judge that sees it through noise, with `skew` added to its logits."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, size=n, p=[0.2, 0.4, 0.4])
    logits = rng.normal(scale=1.0, size=(n, 3)) + 1.5 * np.eye(3)[truth]
    return truth, softmax(logits + np.array(skew), axis=1)


def test_decision_score_is_macro_f1_above_the_recall_floor_and_negative_below_it():
    truth = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 2, 2, 0])
    f1 = f1_score(truth, predicted, average="macro")
    assert decision_score(truth, predicted, 0.5) == pytest.approx(f1)
    # grade 0's recall is 1/2: under a floor of 0.6 the score is that recall - 1, below any floored one
    assert decision_score(truth, predicted, 0.6) == pytest.approx(0.5 - 1.0)
    assert decision_score(truth, np.array([1] * 8), 0.0) == pytest.approx(f1_score(truth, [1] * 8, average="macro", zero_division=0))


def test_fit_undoes_a_skew_and_lifts_the_grade_the_judge_under_says():
    truth, probabilities = skewed_judge()
    before = recall_score(truth, probabilities.argmax(1), average=None)
    offsets = fit_grade_offsets(probabilities, truth, min_recall=0.5)
    after = recall_score(truth, adjusted(probabilities, offsets).argmax(1), average=None)
    assert offsets[1] == 0.0 and offsets[0] > 0.5 and offsets[2] < -0.5  # against the skew (-1, 0, +1)
    assert before[0] < 0.5 <= after.min()
    assert f1_score(truth, adjusted(probabilities, offsets).argmax(1), average="macro") > f1_score(truth, probabilities.argmax(1), average="macro")


def test_fit_keeps_zero_offsets_when_nothing_beats_them_and_maximises_the_lowest_recall_when_the_floor_is_out_of_reach():
    truth = np.array([0, 1, 2, 2])
    assert fit_grade_offsets(np.eye(3)[truth] * 0.9 + 0.1 / 3, truth, 0.5).tolist() == [0.0, 0.0, 0.0]  # perfect already: ties go to 0
    truth, probabilities = skewed_judge(skew=(0.0, 0.0, 0.0), seed=1)
    offsets = fit_grade_offsets(probabilities, truth, min_recall=0.99)  # no decision reaches it
    lowest = recall_score(truth, adjusted(probabilities, offsets).argmax(1), average=None).min()
    assert lowest >= recall_score(truth, probabilities.argmax(1), average=None).min()


def test_folded_offsets_shift_the_saved_classifiers_logits(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3)
    BertForSequenceClassification(config).eval().save_pretrained(tmp_path)
    ids = torch.tensor([[2, 7, 9, 3, 11, 4]])

    def logits():
        with torch.no_grad():
            return BertForSequenceClassification.from_pretrained(tmp_path).eval()(input_ids=ids).logits[0].numpy()

    before = logits()
    offsets = np.array([0.5, 0.0, -0.7])
    fold_grade_offsets(tmp_path, offsets)
    assert logits() == pytest.approx(before + offsets, abs=1e-5)
    assert softmax(logits()) == pytest.approx(adjusted(softmax(before)[None], offsets)[0], abs=1e-6)


def test_offsets_are_the_cross_encoders_default_and_refused_for_the_causal_lm():
    assert load_config().judge.finetune.grade_offsets is True
    assert load_config(overrides={"judge.kind": "causal_lm"}).judge.finetune.grade_offsets is False
    with pytest.raises(ConfigError, match="grade_offsets applies to the cross_encoder judge only"):
        load_config(overrides={"judge.kind": "causal_lm", "judge.finetune.grade_offsets": True})


def test_calibration_takes_half_the_held_out_queries_and_none_of_a_single_one():
    held = pd.DataFrame({"query_id": [f"q{i // 3}" for i in range(30)], "product_id": [f"p{i}" for i in range(30)], "grade": [i % 3 for i in range(30)]})
    report, calibration = calibration_split(held, seed=0)
    assert set(report["query_id"]).isdisjoint(calibration["query_id"]) and report["query_id"].nunique() == calibration["query_id"].nunique() == 5
    report, calibration = calibration_split(held[held["query_id"] == "q0"], seed=0)
    assert calibration is None and len(report) == 3
