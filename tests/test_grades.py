import pytest

from mr_ray.grades import (
    UnknownGradeError,
    from_esci,
    from_homedepot_rating,
    from_wands,
)


@pytest.mark.parametrize(
    "label,grade",
    [("E", 2), ("S", 1), ("C", 1), ("I", 0), ("exact", 2), ("Substitute", 1), ("complement", 1), ("irrelevant", 0)],
)
def test_esci(label, grade):
    assert from_esci(label) == grade


@pytest.mark.parametrize("label,grade", [("Exact", 2), ("Partial", 1), ("Irrelevant", 0), ("exact", 2)])
def test_wands(label, grade):
    assert from_wands(label) == grade


@pytest.mark.parametrize(
    "rating,grade", [(1.0, 0), (1.33, 0), (1.5, 1), (1.67, 1), (2.0, 1), (2.33, 1), (2.5, 2), (2.67, 2), (3.0, 2)]
)
def test_homedepot_rounds_half_up_then_minus_one(rating, grade):
    assert from_homedepot_rating(rating) == grade


@pytest.mark.parametrize("bad", ["X", "Ex", "", "Es"])
def test_esci_unknown(bad):
    with pytest.raises(UnknownGradeError):
        from_esci(bad)


@pytest.mark.parametrize("bad", [0.5, 3.5, float("nan")])
def test_homedepot_out_of_range(bad):
    with pytest.raises(UnknownGradeError):
        from_homedepot_rating(bad)


def test_wands_unknown():
    with pytest.raises(UnknownGradeError):
        from_wands("Somewhat")


def test_homedepot_mapping_matches_release_grades(homedepot):
    import pandas as pd

    judgments = pd.read_parquet(homedepot / "judgments.parquet")
    mapped = judgments["rating_mean"].map(from_homedepot_rating).astype(int)
    assert (mapped == judgments["grade"].astype(int)).all()
