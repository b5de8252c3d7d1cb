"""The one grade scale used everywhere: 0 = irrelevant, 1 = partial, 2 = exact.

Importers map foreign labels to it once, here, so no other module ever sees
ESCI letters, WANDS words or Home Depot's 1-3 ratings.
"""

from __future__ import annotations

import math
from enum import IntEnum


class Grade(IntEnum):
    IRRELEVANT = 0
    PARTIAL = 1  # a substitute or a complement
    EXACT = 2


GRADE_NAMES = {Grade.IRRELEVANT: "irrelevant", Grade.PARTIAL: "partial", Grade.EXACT: "exact"}

# ESCI (Amazon Shopping Queries): Exact, Substitute, Complement, Irrelevant.
ESCI_TO_GRADE = {"E": Grade.EXACT, "S": Grade.PARTIAL, "C": Grade.PARTIAL, "I": Grade.IRRELEVANT}

# WANDS (Wayfair): Exact, Partial, Irrelevant.
WANDS_TO_GRADE = {"Exact": Grade.EXACT, "Partial": Grade.PARTIAL, "Irrelevant": Grade.IRRELEVANT}


class UnknownGradeError(ValueError):
    """A foreign label that has no place on the 0/1/2 scale."""


def from_esci(label: str) -> Grade:
    """Map an ESCI label (E/S/C/I, or the full word) to a grade."""
    key = str(label).strip()[:1].upper()
    if key not in ESCI_TO_GRADE or str(label).strip().upper() not in {
        key,
        {"E": "EXACT", "S": "SUBSTITUTE", "C": "COMPLEMENT", "I": "IRRELEVANT"}[key],
    }:
        raise UnknownGradeError(f"unknown ESCI label {label!r}; expected one of E, S, C, I")
    return ESCI_TO_GRADE[key]


def from_wands(label: str) -> Grade:
    """Map a WANDS label (Exact/Partial/Irrelevant, any case) to a grade."""
    key = str(label).strip().capitalize()
    if key not in WANDS_TO_GRADE:
        raise UnknownGradeError(f"unknown WANDS label {label!r}; expected Exact, Partial or Irrelevant")
    return WANDS_TO_GRADE[key]


def from_homedepot_rating(rating_mean: float) -> Grade:
    """Map Home Depot's mean rater score (1..3) to a grade: round half up, minus one.

    Half-up rounding (2.5 -> 3) matches the release's own `grade` column; Python's
    round() would send 2.5 to 2.
    """
    value = float(rating_mean)
    if math.isnan(value) or not 1.0 <= value <= 3.0:
        raise UnknownGradeError(f"Home Depot rating {rating_mean!r} outside 1..3")
    return Grade(int(math.floor(value + 0.5)) - 1)

