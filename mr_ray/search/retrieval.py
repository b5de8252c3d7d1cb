"""Retrieval, once for every stage: embed, build a dense (FAISS) or lexical (BM25) index, search, score pairs.

`evaluate`, `mine`, `sweep`, `index`, `serve` and the benches all call these,
so a dense run, a lexical run and a judged pair's score mean the same thing
everywhere. The hybrid of the two (one call answering both halves of a query,
then fusion) lives in mr_ray.search.shards and mr_ray.search.fusion on top of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import LexicalConfig
from mr_ray.retriever.encoder import encode, encode_queries

RunDict = dict[str, dict[str, float]]


def build_faiss_index(
    vectors: np.ndarray, factory: str, search_params: str = "", train_size: int = 100_000, seed: int = 0, setting: str = "index.factory"
):
    """An inner-product FAISS index from `faiss.index_factory`, trained (if it needs it) and filled.

    `setting` names the config key the factory string came from, for the error message.
    """
    import faiss

    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"{setting} {factory!r} is not a valid faiss index_factory string for dimension {vectors.shape[1]}: {err}") from None
    if not index.is_trained:
        train = vectors
        if len(vectors) > train_size:
            train = vectors[np.random.default_rng(seed).choice(len(vectors), train_size, replace=False)]
        try:
            index.train(train)
        except RuntimeError as err:
            raise ValueError(
                f"{setting} {factory!r} cannot be trained on {len(train)} vectors (a shard this small needs fewer "
                f"IVF lists or PQ centroids, or fewer shards): {str(err).splitlines()[-1] if str(err) else err}"
            ) from None
    index.add(vectors)
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as err:
            raise ValueError(f"index.search_params {search_params!r} do not apply to {factory!r}: {err}") from None
    return index


def run_from_rows(product_ids: np.ndarray, query_ids, rows: np.ndarray, scores: np.ndarray) -> RunDict:
    """Per-query top-k rows and scores (row -1 = no hit) as a run {query_id: {product_id: score}}."""
    return {
        str(qid): {str(product_ids[r]): float(s) for r, s in zip(row_r, row_s) if r >= 0}
        for qid, row_r, row_s in zip(query_ids, rows, scores)
    }


class LexicalIndex:
    """BM25 (bm25s) over product titles: lower-cased words of 2+ characters, English stopwords, and
    the configured Snowball stemmer (LexicalConfig), the same for titles and queries.

    Saved as a bm25s folder plus the analyzer (ANALYZER_FILE), so a loaded index
    reads queries as it read titles. A query's tokens that the index has never
    seen are dropped, and a query with none left scores 0 everywhere.
    """

    ANALYZER_FILE = "analyzer.json"

    def __init__(self, retriever, stemmer: str | None):
        import Stemmer

        self.retriever = retriever
        self.stemmer = stemmer
        self._stem = Stemmer.Stemmer(stemmer) if stemmer else None

    def __reduce__(self):
        # PyStemmer's stemmer is a C object that does not pickle; Ray ships the index to Tune
        # trials and Data workers, so it travels as (retriever, stemmer name) and is rebuilt.
        return (type(self), (self.retriever, self.stemmer))

    @property
    def n_docs(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def tokens(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stem, return_ids=False, show_progress=False)

    @classmethod
    def build(cls, titles: list[str], config: LexicalConfig) -> "LexicalIndex":
        import bm25s

        index = cls(bm25s.BM25(k1=config.k1, b=config.b), config.stemmer)
        index.retriever.index(index.tokens(titles), show_progress=False)
        return index

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), show_progress=False)
        (Path(folder) / self.ANALYZER_FILE).write_text(json.dumps({"stemmer": self.stemmer}))

    @classmethod
    def load(cls, folder: Path) -> "LexicalIndex":
        """A saved index; one saved before the analyzer was stored had no stemmer."""
        import bm25s

        analyzer = Path(folder) / cls.ANALYZER_FILE
        stemmer = json.loads(analyzer.read_text())["stemmer"] if analyzer.is_file() else None
        return cls(bm25s.BM25.load(str(folder), show_progress=False), stemmer)

    def scores(self, texts: list[str]) -> np.ndarray:
        """BM25 score of every document for every text: (n_texts, n_docs) float32."""
        out = np.zeros((len(texts), self.n_docs), dtype=np.float32)
        for i, tokens in enumerate(self.tokens(texts)):
            known = [t for t in tokens if t in self.retriever.vocab_dict]
            if known:
                out[i] = self.retriever.get_scores(known)
        return out

    def pair_scores(self, texts: list[str], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BM25 of (text, document row) pairs (0 where the row is -1: a product of another index),
        and each pair's text's best BM25 score in this index."""
        unique = list(dict.fromkeys(texts))
        text_row = pd.Series(texts).map({t: i for i, t in enumerate(unique)}).to_numpy()
        scores = self.scores(unique)
        rows = np.asarray(rows)
        return np.where(rows >= 0, scores[text_row, np.maximum(rows, 0)], 0.0), scores.max(axis=1, initial=0.0)[text_row]

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k rows per text with a positive score: (scores (n, k) with -inf padding, rows (n, k) with -1, all scores)."""
        every = self.scores(texts)
        k_here = min(k, self.n_docs)
        rows = np.argsort(-every, axis=1, kind="stable")[:, :k_here]
        scores = np.take_along_axis(every, rows, axis=1)
        missing = scores <= 0
        scores[missing], rows[missing] = -np.inf, -1
        if k_here < k:
            scores = np.pad(scores, ((0, 0), (0, k - k_here)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, k - k_here)), constant_values=-1)
        return scores, rows, every


def lexical_search(index: LexicalIndex, product_ids: np.ndarray, queries: pd.DataFrame, k: int) -> RunDict:
    """BM25 top-k of an index built over the titles of `product_ids` (row i = product_ids[i]) as a run
    {query_id: {product_id: score}} (only products sharing a term)."""
    scores, rows, _ = index.search(queries["text"].tolist(), k)
    return run_from_rows(product_ids, queries["query_id"], rows, scores)


def pair_scores(model, pairs: pd.DataFrame, batch_size: int, product_vectors: dict[str, np.ndarray] | None = None, precision: str = "fp32") -> np.ndarray:
    """Cosine of each (query `text`, product) pair; product vectors from `product_vectors` or encoded from `title` (in `precision`)."""
    if product_vectors is not None:
        missing = sorted(set(pairs["product_id"]) - product_vectors.keys())
        if missing:
            raise ValueError(f"judged product(s) not in the catalog, e.g. product_id {missing[0]!r} ({len(missing)} in all)")
    else:
        titles = pairs[["product_id", "title"]].drop_duplicates("product_id")
        product_vectors = dict(zip(titles["product_id"], encode(model, titles["title"].tolist(), batch_size, precision)))
    query_texts = pairs["text"].drop_duplicates().tolist()
    query_vectors = dict(zip(query_texts, encode_queries(model, query_texts, batch_size)))
    q = np.stack([query_vectors[t] for t in pairs["text"]])
    p = np.stack([product_vectors[i] for i in pairs["product_id"]])
    return np.einsum("ij,ij->i", q, p)
