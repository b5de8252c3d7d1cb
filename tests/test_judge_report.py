"""Judge metrics (against hand-computed numbers) and the judge section of the main report."""

import numpy as np
import pandas as pd
import pytest

from mr_ray.metrics import judge_metrics, label_error
from mr_ray.report.markdown import judge_section


def test_metrics_match_hand_computed_values():
    truth = np.array([0, 1, 1, 2, 2, 2])
    probabilities = np.array(
        [[0.8, 0.2, 0.0], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8], [0.0, 0.4, 0.6], [0.7, 0.2, 0.1], [0.0, 0.1, 0.9]]
    )  # predicted 0, 1, 2, 2, 0, 2
    rating = np.array([1.0, 2.0, 2.5, 3.0, np.nan, 2.67])
    m = judge_metrics(truth, probabilities, rating)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["within_one"] == pytest.approx(5 / 6)  # the 2 predicted as 0 is two grades off
    assert m["recall"] == pytest.approx({0: 1.0, 1: 0.5, 2: 2 / 3})
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 2]]
    # F1 per grade: 0: p 1/2 r 1 -> 2/3; 1: p 1 r 1/2 -> 2/3; 2: p 2/3 r 2/3 -> 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)
    expected = probabilities @ [0, 1, 2]  # 0.2, 1.2, 1.8, 1.6, 0.4, 1.9
    # AUC(2 over 1): grade-2 scores {1.6, 0.4, 1.9} vs grade-1 {1.2, 1.8}: wins 1.6>1.2, 1.9>1.2, 1.9>1.8 -> 3/6
    assert m["auc_2_over_1"] == pytest.approx(0.5)
    assert m["auc_1_over_0"] == pytest.approx(1.0)  # both grade-1 pairs above the grade-0 one
    has = ~np.isnan(rating)
    assert m["rmse_expected_rating"] == pytest.approx(np.sqrt(np.mean((1 + expected[has] - rating[has]) ** 2)))
    assert judge_metrics(np.array([2, 2]), np.eye(3)[[2, 2]])["auc_2_over_1"] is None  # one grade only: no AUC


def test_judge_section_reports_label_error_of_each_label_set_against_gold():
    gold = pd.DataFrame({"query_id": ["q"] * 4, "product_id": ["a", "b", "c", "d"], "grade": [2, 1, 0, 2]})
    human = gold.assign(grade=[2, 1, 1, 2])
    judge = gold.assign(grade=[2, 0, 0, 0])
    audited = gold.assign(grade=[2, 1, 0, 0])
    assert label_error(judge, gold) == (0.5, 4)
    held = judge_metrics(np.array([2, 1, 0]), np.eye(3)[[2, 1, 1]])
    held["gold"] = {**judge_metrics(np.array([2, 1, 1]), np.eye(3)[[2, 1, 1]]), "human_accuracy": 2 / 3}
    markdown, numbers = judge_section(held, human, judge, audited, gold)
    assert (numbers["human_label_error"], numbers["judge_label_error"], numbers["audited_label_error"]) == (0.25, 0.5, 0.25)
    assert "| judge | 4 | 0.5000 |" in markdown and "accuracy 0.6667" in markdown
    assert "against gold: accuracy 1.0000, within-one 1.0000 (the human labels of the same pairs: 0.6667)" in markdown
    assert "| partial | 0 | 1 | 0 |" in markdown  # the confusion matrix row of true grade 1
    fit = {"offsets": [0.0, 0.0, 0.6], "calibration_pairs": 621, "before_macro_f1": 0.7336, "after_macro_f1": 0.7453,
           "before_accuracy": 0.7279, "after_accuracy": 0.7375}
    markdown, numbers = judge_section(held, human, judge, audited, gold, fit)
    assert "per-grade logit offsets [0.0, 0.0, 0.6] (grades 0 / 1 / 2), fit on 621" in markdown and numbers["grade_offsets"] == fit
