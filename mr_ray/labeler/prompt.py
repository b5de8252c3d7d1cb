"""The relevance guideline as a prompt, and the grade read from next-token probabilities.

Every prompt is one chat: a system turn holding the written guideline (the
same text for every pair, so vLLM's prefix cache computes it once), a user
turn with the query and the product fields, and the open assistant turn. The
judge's answer is the next token: "0", "1" or "2". We never parse free text:
the probabilities of those three tokens, renormalised over the three, give
the grade (argmax), a probability per grade and a confidence (the max).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

GUIDELINE = """You grade how well a product matches a shopper's search query. Answer with one digit.
2 = exact: the product is what the query asks for, and every attribute the query states (brand, colour, material, size) matches.
1 = partial: a substitute (same kind of product with a different stated attribute, or a close alternative) or a complement (an accessory or companion used with it).
0 = irrelevant: neither of the above.
Examples: "red running shoes" -> red running shoes: 2; blue running shoes: 1; sneakers: 1; shoe insoles: 1; coffee maker: 0.
"cordless drill 20v" -> 20v cordless drill: 2; 18v cordless drill: 1; drill bits: 1; yoga mat: 0."""

# The answer tokens, in grade order.
GRADE_TOKENS = ("0", "1", "2")

# Product fields the fine-tuned judge sees, in this order, when present.
PRODUCT_FIELDS = ("title", "brand", "color", "category")
DESCRIPTION_CHARS = 160


class PromptError(ValueError):
    """A pair that cannot be rendered (missing or blank query text or product title)."""


def field_text(field: str, value) -> str | None:
    """A product field as the judge reads it: stripped, a long description cut at a word; None when blank."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if field == "description" and len(text) > DESCRIPTION_CHARS:
        text = text[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


def render_pair(query: str, product: dict) -> str:
    """The user turn for one (query, product) pair, product fields in `product`'s order.

    Raises PromptError on a blank query or title; other blank fields are left out.
    """
    if not isinstance(query, str) or not query.strip():
        raise PromptError("query text is missing or blank")
    title = product.get("title")
    if not isinstance(title, str) or not title.strip():
        raise PromptError("product title is missing or blank")
    lines = [f"Query: {query.strip()}"]
    for field, value in product.items():
        text = field_text(field, value)
        if text is not None:
            lines.append(f"Product {field}: {text}")
    lines.append("Grade:")
    return "\n".join(lines)


USER_SLOT = "\x00user turn\x00"


def chat_frame(tokenizer, guideline: str = GUIDELINE) -> tuple[str, str]:
    """The text around the user turn: (guideline system turn + user-turn opening, user-turn close + assistant opening).

    Rendered once through the model's chat template, so prompts are plain string
    concatenation afterwards (picklable, no tokenizer in the Ray workers).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": guideline}, {"role": "user", "content": USER_SLOT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model without a chat template: plain text, still guideline-first
        text = f"{guideline}\n\n{USER_SLOT} "
    before, found, after = text.partition(USER_SLOT)
    if not found:
        raise ValueError("the chat template dropped the user turn")
    return before, after


def render_prompt(frame: tuple[str, str], user_turn: str) -> str:
    return frame[0] + user_turn + frame[1]


def grade_token_ids(tokenizer, tokens: Sequence[str] = GRADE_TOKENS) -> list[int]:
    """Token id of each grade's answer token, in grade order; each must be exactly one token."""
    ids = []
    for grade, token in enumerate(tokens):
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"grade {grade} answer {token!r} is {len(encoded)} tokens for this tokenizer; it must be one")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"grade answer tokens {tokens} map to repeated ids {ids}")
    return ids


def normalise_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the three grade log-probabilities -> (probabilities summing to 1, mass on the grade tokens).

    p_g = exp(l_g) / sum_h exp(l_h), computed stably; the mass sum_h exp(l_h)
    says how much of the model's next-token probability fell on a grade at all.
    A row of all -inf has no grade: a ValueError, never a silent uniform.
    """
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.ndim != 2 or logprobs.shape[1] != len(GRADE_TOKENS):
        raise ValueError(f"expected logprobs of shape (n, {len(GRADE_TOKENS)}), got {logprobs.shape}")
    if np.isnan(logprobs).any():
        raise ValueError("logprobs contain NaN")
    top = logprobs.max(axis=1, keepdims=True)
    if np.isneginf(top).any():
        raise ValueError(f"row {int(np.flatnonzero(np.isneginf(top[:, 0]))[0])}: every grade token has probability 0")
    shifted = np.exp(logprobs - top)
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    mass = np.exp(top[:, 0]) * shifted.sum(axis=1)
    return probabilities, mass


def grades_from_probabilities(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grade (argmax) and confidence (its probability) per row."""
    grades = probabilities.argmax(axis=1).astype(np.int8)
    return grades, probabilities.max(axis=1).astype(np.float32)


def within_one_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(predicted, int) - np.asarray(truth, int)) <= 1))


# Prompt variants: which product fields the judge sees. Variant 0 is the
# prompt the judge was fine-tuned on; the audit's re-judge averages several.
FIELD_VARIANTS: tuple[tuple[str, ...], ...] = (
    PRODUCT_FIELDS,
    ("title",),
    ("title", "category", "brand", "color"),
    ("title", "description"),
)
ALL_FIELDS = ("title", "brand", "color", "category", "description")


def pair_texts(pairs: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """Pairs joined with the query text and the product fields (left join: unknown ids stay, as nulls)."""
    fields = [c for c in ALL_FIELDS if c in products.columns]
    out = pairs[["query_id", "product_id"]].astype(str)
    out = out.merge(queries[["query_id", "text"]].rename(columns={"text": "query"}), on="query_id", how="left")
    return out.merge(products[["product_id", *fields]], on="product_id", how="left")


def render_prompts(pairs: pd.DataFrame, frame: tuple[str, str], variants: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompt rows (query_id, product_id, variant, prompt) and the malformed pairs (with the reason)."""
    rows, bad = [], []
    fields = [c for c in ALL_FIELDS if c in pairs.columns]
    for record in pairs.to_dict("records"):
        product = {f: record[f] for f in fields}
        for variant in range(variants):
            shown = {f: product.get(f) for f in FIELD_VARIANTS[variant % len(FIELD_VARIANTS)]}
            try:
                user = render_pair(record["query"], shown)
            except PromptError as err:
                bad.append({"query_id": record["query_id"], "product_id": record["product_id"], "reason": str(err)})
                break
            rows.append(
                {"query_id": record["query_id"], "product_id": record["product_id"], "variant": variant, "prompt": render_prompt(frame, user)}
            )
    prompts = pd.DataFrame(rows, columns=["query_id", "product_id", "variant", "prompt"])
    return prompts, pd.DataFrame(bad, columns=["query_id", "product_id", "reason"]).drop_duplicates()
