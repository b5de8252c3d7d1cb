"""Additive spelling augmentation: typo copies of queries, next to the clean ones.

Four edit kinds, the common shapes of real typing errors: swap two neighbouring
letters, drop a letter, insert a letter (a neighbour on the keyboard, like a
double strike), substitute a keyboard neighbour. The copies keep the clean
query's judgments; the clean queries are never replaced.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
KEYBOARD_NEIGHBOURS: dict[str, str] = {}
for r, row in enumerate(_ROWS):
    for c, ch in enumerate(row):
        near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
        for other in (r - 1, r + 1):
            if 0 <= other < len(_ROWS):
                near += [_ROWS[other][i] for i in (c - 1, c, c + 1) if 0 <= i < len(_ROWS[other])]
        KEYBOARD_NEIGHBOURS[ch] = "".join(near)

EDITS = ("swap", "drop", "insert", "substitute")


def misspell(text: str, rng: np.random.Generator, n_edits: int = 1) -> str:
    """Apply `n_edits` random typing errors to letters of words longer than 3 characters."""
    chars = list(text)
    for _ in range(n_edits):
        letters = [i for i, ch in enumerate(chars) if ch.isalpha() and ch.lower() in KEYBOARD_NEIGHBOURS]
        # Only touch words of 4+ letters: typos in "tv" or "usb" change the meaning.
        letters = [i for i in letters if _word_length(chars, i) >= 4]
        if not letters:
            break
        i = int(rng.choice(letters))
        edit = EDITS[int(rng.integers(len(EDITS)))]
        near = KEYBOARD_NEIGHBOURS[chars[i].lower()]
        if edit == "swap" and i + 1 < len(chars) and chars[i + 1].isalpha():
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif edit == "drop":
            del chars[i]
        elif edit == "insert":
            chars.insert(i, near[int(rng.integers(len(near)))])
        else:
            chars[i] = near[int(rng.integers(len(near)))]
    return "".join(chars)


def _word_length(chars: list[str], i: int) -> int:
    start = i
    while start > 0 and chars[start - 1].isalpha():
        start -= 1
    end = i
    while end < len(chars) and chars[end].isalpha():
        end += 1
    return end - start


def augment_queries(
    queries: pd.DataFrame, judgments: pd.DataFrame, rate: float, seed: int = 0, copies: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (queries, judgments) with typo copies of a `rate` share of queries added.

    Copies get ids `<query_id>~typo<n>` and the same judgments as their clean query.
    Copies that came out identical to the clean text are dropped.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"augmentation rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    chosen = queries[rng.random(len(queries)) < rate]
    new_rows = []
    for n in range(copies):
        for row in chosen.itertuples(index=False):
            typo = misspell(row.text, rng, n_edits=1)
            if typo != row.text:
                new_rows.append({**row._asdict(), "query_id": f"{row.query_id}~typo{n}", "text": typo})
    if not new_rows:
        return queries, judgments
    typo_queries = pd.DataFrame(new_rows, columns=queries.columns)
    origin = typo_queries["query_id"].str.split("~typo").str[0]
    mapping = pd.DataFrame({"query_id": origin, "typo_id": typo_queries["query_id"]})
    typo_judgments = judgments.merge(mapping, on="query_id").drop(columns="query_id").rename(columns={"typo_id": "query_id"})
    typo_judgments = typo_judgments[judgments.columns]
    return (
        pd.concat([queries, typo_queries], ignore_index=True),
        pd.concat([judgments, typo_judgments], ignore_index=True),
    )
