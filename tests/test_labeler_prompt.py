"""The guideline prompt, the grade-token mapping and the probability normalisation."""

import math

import numpy as np
import pytest

from mr_ray.labeler.prompt import (
    GRADE_TOKENS,
    GUIDELINE,
    PromptError,
    chat_frame,
    grade_token_ids,
    grades_from_probabilities,
    normalise_logprobs,
    render_pair,
    render_prompt,
    within_one_accuracy,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mr_ray.labeler.model import packaged_gguf

    gguf = packaged_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_grade_tokens_are_single_distinct_tokens_that_decode_back(tokenizer):
    ids = grade_token_ids(tokenizer)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [tokenizer.decode([i]) for i in ids] == list(GRADE_TOKENS)


def test_multi_token_answer_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="grade 1 answer 'irrelevant'"):
        grade_token_ids(tokenizer, ("0", "irrelevant", "2"))
    with pytest.raises(ValueError, match="repeated ids"):
        grade_token_ids(tokenizer, ("0", "0", "2"))


def test_prompt_is_guideline_prefix_then_pair_then_open_answer(tokenizer):
    frame = chat_frame(tokenizer)
    prompt = render_prompt(frame, render_pair("red running shoes", {"title": "Stridex running shoes, red", "brand": "stridex", "color": " "}))
    assert prompt.startswith(frame[0]) and GUIDELINE in frame[0]
    assert prompt.index(GUIDELINE) < prompt.index("Query: red running shoes") < prompt.index("Product title: Stridex")
    assert "Product brand: stridex" in prompt and "Product color" not in prompt  # blank fields are left out
    assert prompt.endswith("<|im_start|>assistant\n")
    # Two pairs share the whole guideline prefix token for token (what prefix caching needs).
    other = render_prompt(frame, render_pair("drill", {"title": "Torqmax drill"}))
    a, b = tokenizer(prompt).input_ids, tokenizer(other).input_ids
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= len(tokenizer(frame[0]).input_ids) - 1


@pytest.mark.parametrize("query,product", [("  ", {"title": "x"}), ("q", {"title": ""}), ("q", {}), (None, {"title": "x"})])
def test_blank_query_or_title_is_a_prompt_error(query, product):
    with pytest.raises(PromptError):
        render_pair(query, product)


def test_normalisation_renormalises_over_the_three_grades_and_reports_mass():
    logprobs = np.log([[0.2, 0.3, 0.1], [0.5, 0.0 + 1e-300, 0.25]])
    probabilities, mass = normalise_logprobs(logprobs)
    np.testing.assert_allclose(probabilities[0], [1 / 3, 1 / 2, 1 / 6], rtol=1e-9)
    np.testing.assert_allclose(probabilities[1], [2 / 3, 0.0, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(mass, [0.6, 0.75], rtol=1e-9)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_normalisation_is_stable_for_very_negative_logprobs_and_handles_minus_inf():
    probabilities, mass = normalise_logprobs(np.array([[-1000.0, -1001.0, -math.inf]]))
    np.testing.assert_allclose(probabilities[0], [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1)), 0.0])
    assert mass[0] == 0.0  # underflows, but the grade probabilities are still exact


@pytest.mark.parametrize("bad", [np.array([[-math.inf] * 3]), np.array([[0.0, np.nan, 0.0]]), np.zeros((2, 2))])
def test_normalisation_rejects_rows_without_a_grade(bad):
    with pytest.raises(ValueError):
        normalise_logprobs(bad)


def test_grade_is_argmax_and_confidence_its_probability():
    grades, confidence = grades_from_probabilities(np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.45, 0.35]]))
    assert grades.tolist() == [2, 0, 1]
    np.testing.assert_allclose(confidence, [0.7, 0.5, 0.45], rtol=1e-6)
    assert within_one_accuracy(np.array([0, 2, 1]), np.array([2, 2, 0])) == pytest.approx(2 / 3)
