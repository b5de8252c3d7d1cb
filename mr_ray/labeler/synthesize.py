"""Synthetic queries for long-tail products (those no query was ever judged against).

The judge model, in instruct mode, writes short search queries for a product
title (several samples per product, Ray Data + vLLM). We clean them, drop
duplicates, queries that already exist and ones sharing no word with the
title, then grade each (query, product) pair with the fine-tuned judge and
keep the confident ones: queries and judgments with `source=synthetic`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import JudgeEngineConfig, SynthesizeConfig
from mr_ray.labeler.engine import engine_processor

WRITER_SYSTEM = "You write short search queries that shoppers type into an online shop's search box."
WRITER_USER = "Write one search query (2 to 6 words) a shopper could type to find this product. Reply with the query only.\nProduct: {title}"
STOPWORDS = frozenset("a an and by for in of on the to with".split())


def products_without_queries(products: pd.DataFrame, judged_pairs: pd.DataFrame, limit: int | None, seed: int) -> tuple[pd.DataFrame, int]:
    """(a seeded sample of at most `limit` products that appear in no judged pair (None: all, seeded order),
    how many such products there are)."""
    orphans = products[~products["product_id"].isin(set(judged_pairs["product_id"]))]
    size = len(orphans) if limit is None else min(limit, len(orphans))
    return orphans.sample(n=size, random_state=seed).reset_index(drop=True), len(orphans)


def writer_prompts(products: pd.DataFrame, tokenizer, samples: int, seed: int) -> pd.DataFrame:
    """One chat prompt per (product, sample); each sample gets its own sampling seed."""
    rows = []
    for product in products.itertuples(index=False):
        messages = [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": WRITER_USER.format(title=product.title)}]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = f"{WRITER_SYSTEM}\n{messages[1]['content']}\nQuery:"
        for sample in range(samples):
            rows.append({"product_id": product.product_id, "sample": sample, "seed": seed * 1000 + sample, "prompt": prompt})
    return pd.DataFrame(rows)


def generate_queries(prompts: pd.DataFrame, model_path: str | Path, engine: JudgeEngineConfig, cfg: SynthesizeConfig) -> pd.DataFrame:
    """Ray Data + vLLM: generated text per prompt row (product_id, sample, text)."""
    import ray


    def preprocess(row: dict) -> dict:
        params = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": int(row["seed"])}
        return {"product_id": row["product_id"], "sample": row["sample"], "prompt": row["prompt"], "sampling_params": params}

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or ""
        return {"product_id": row["product_id"], "sample": int(row["sample"]), "text": "" if error else row["generated_text"], "error": error}

    processor = engine_processor(model_path, engine, preprocess, postprocess)
    return processor(ray.data.from_pandas(prompts)).to_pandas()


def clean_query(text: str, min_words: int, max_words: int) -> str | None:
    """First line, without quotes, labels and trailing punctuation, lower-cased; None if too short or long."""
    line = next((part for part in str(text).strip().splitlines() if part.strip()), "")
    line = re.sub(r"^(search query|query)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
    line = re.sub(r"[\"'`*]", "", line).strip(" .,:;!?-").lower()
    line = re.sub(r"\s+", " ", line)
    words = line.split()
    return line if min_words <= len(words) <= max_words else None


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", str(text).lower()) if w not in STOPWORDS}


def filter_queries(generated: pd.DataFrame, products: pd.DataFrame, existing: set[str], cfg: SynthesizeConfig) -> tuple[pd.DataFrame, dict]:
    """Clean, drop empty/off-topic/duplicate/already-existing queries; returns kept (product_id, text) and counts."""
    titles = dict(zip(products["product_id"], products["title"]))
    counts = {"generated": int(len(generated)), "failed": int((generated["error"] != "").sum())}
    cleaned = generated.assign(text=[clean_query(t, cfg.min_words, cfg.max_words) for t in generated["text"]])
    cleaned = cleaned[cleaned["error"] == ""]
    counts["bad_length"] = int(cleaned["text"].isna().sum())
    cleaned = cleaned.dropna(subset=["text"])
    on_topic = [bool(content_words(t) & content_words(titles[p])) for p, t in zip(cleaned["product_id"], cleaned["text"])]
    counts["off_topic"] = int(len(cleaned) - sum(on_topic))
    cleaned = cleaned[on_topic]
    known = {e.strip().lower() for e in existing}
    fresh = ~cleaned["text"].isin(known)
    counts["already_exists"] = int((~fresh).sum())
    cleaned = cleaned[fresh]
    before = len(cleaned)
    cleaned = cleaned.drop_duplicates("text")
    counts["duplicates"] = int(before - len(cleaned))
    counts["kept"] = int(len(cleaned))
    return cleaned[["product_id", "text"]].reset_index(drop=True), counts


def synthetic_query_id(text: str) -> str:
    return "SYN-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def as_tables(kept: pd.DataFrame, judgments: pd.DataFrame, min_confidence: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Queries (split train) and `source=synthetic` judgments for the pairs graded confidently."""
    confident = judgments[judgments["confidence"] >= min_confidence].assign(source="synthetic")
    queries = kept[kept["query_id"].isin(confident["query_id"])]
    queries = queries.assign(locale="en_US", split="train")[["query_id", "text", "locale", "split"]]
    columns = ["query_id", "product_id", "grade", "source", "confidence", "p0", "p1", "p2"]
    return queries.reset_index(drop=True), confident[columns].reset_index(drop=True)


def grade_distribution(judgments: pd.DataFrame) -> dict[int, int]:
    grades, counts = np.unique(judgments["grade"].to_numpy(), return_counts=True)
    return {int(g): int(n) for g, n in zip(grades, counts)}
