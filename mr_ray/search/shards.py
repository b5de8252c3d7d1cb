"""Reading a built index: its manifest, one shard (FAISS + BM25), and the top-k merge across shards.

An index folder holds `index.json` (factory, dimension, encoder, shard list),
`thresholds.json` and one folder per shard with `index.faiss` and
`products.parquet` (product_id, title in FAISS row order: row i of the FAISS
index is row i of the table) and `bm25/`, the shard's lexical index over the
same titles in the same row order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mr_ray.search.fusion import Candidates
from mr_ray.search.retrieval import LexicalIndex

INDEX_MANIFEST = "index.json"
SHARD_INDEX_FILE = "index.faiss"
SHARD_PRODUCTS_FILE = "products.parquet"
SHARD_LEXICAL_DIR = "bm25"


def read_index_manifest(index_dir: str | Path) -> dict:
    path = Path(index_dir) / INDEX_MANIFEST
    try:
        return json.loads(path.read_text())
    except OSError:
        raise FileNotFoundError(f"{path}: no index here; build one with the `index` stage") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def index_encoder_path(index_dir: str | Path, manifest: dict) -> str | None:
    """The encoder the index was built with (None = the packaged pretrained one).

    A path inside the run folder is stored relative to the index folder, so a
    run folder can be moved or synced as a whole.
    """
    stored = manifest["encoder"]["path"]
    if stored is None or os.path.isabs(stored):
        return stored
    return str((Path(index_dir) / stored).resolve())


@dataclass
class Hits:
    """Top-k per query: scores (nq, k) float32, -inf where fewer than k products exist."""

    scores: np.ndarray
    product_ids: np.ndarray  # (nq, k) object, None where missing
    titles: np.ndarray  # (nq, k) object, None where missing

    def rows(self, query: int = 0) -> list[dict]:
        found = np.isfinite(self.scores[query])
        return [
            {"product_id": pid, "title": title, "score": float(score)}
            for pid, title, score in zip(
                self.product_ids[query][found], self.titles[query][found], self.scores[query][found]
            )
        ]


def merge_hits(parts: list[Hits], k: int) -> Hits:
    """The global top-k from per-shard top-k lists (exact: every global top-k item is in its shard's top-k)."""
    scores = np.concatenate([p.scores for p in parts], axis=1)
    ids = np.concatenate([p.product_ids for p in parts], axis=1)
    titles = np.concatenate([p.titles for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return Hits(
        np.take_along_axis(scores, order, axis=1),
        np.take_along_axis(ids, order, axis=1),
        np.take_along_axis(titles, order, axis=1),
    )


class ShardIndex:
    """One shard: a FAISS index and its product-id map, searched with inner product, and (if built) its BM25 index."""

    def __init__(self, name: str, index, product_ids: list, titles: list, lexical: LexicalIndex | None = None):
        self.name = name
        self.index = index
        self.product_ids = np.array(list(product_ids) + [None], dtype=object)
        self.titles = np.array(list(titles) + [None], dtype=object)
        self.lexical = lexical
        if len(self.product_ids) - 1 != index.ntotal:
            raise ValueError(f"{name}: {index.ntotal} vectors but {len(self.product_ids) - 1} products")
        if lexical is not None and lexical.n_docs != index.ntotal:
            raise ValueError(f"{name}: {index.ntotal} vectors but {lexical.n_docs} lexical documents")
        if lexical is not None:
            make_reconstructable(index)

    @classmethod
    def open(cls, folder: str | Path, search_params: str = "") -> "ShardIndex":
        """A shard folder written by the `index` stage (its lexical index too, when the folder has one)."""
        import faiss

        folder = Path(folder)
        index = faiss.read_index(str(folder / SHARD_INDEX_FILE))
        if search_params:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        table = pq.read_table(folder / SHARD_PRODUCTS_FILE, columns=["product_id", "title"])
        lexical = LexicalIndex.load(folder / SHARD_LEXICAL_DIR) if (folder / SHARD_LEXICAL_DIR).is_dir() else None
        return cls(folder.name, index, table.column("product_id").to_pylist(), table.column("title").to_pylist(), lexical)

    def search(self, vectors: np.ndarray, k: int) -> Hits:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        scores, rows = self.index.search(vectors, k)
        missing = rows < 0
        scores[missing] = -np.inf
        rows[missing] = len(self.product_ids) - 1  # the None sentinel
        return Hits(scores, self.product_ids[rows], self.titles[rows])

    def search_both(self, vectors: np.ndarray, texts: list[str], k: int) -> list[Candidates]:
        """Both halves of each query in one call: the dense and the lexical top-k, every candidate with both scores.

        A product only the lexical side found gets its cosine from its stored
        vector; one only the dense side found gets its BM25 score (0 when it
        shares no term with the query).
        """
        if self.lexical is None:
            raise ValueError(f"{self.name}: this index has no lexical shards; rebuild it with the `index` stage")
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        dense_scores, dense_rows = self.index.search(vectors, k)
        _, lexical_rows, lexical_all = self.lexical.search(texts, k)
        out = []
        for q, vector in enumerate(vectors):
            found_dense, found_lexical = dense_rows[q][dense_rows[q] >= 0], lexical_rows[q][lexical_rows[q] >= 0]
            rows = np.concatenate([found_dense, np.setdiff1d(found_lexical, found_dense)]).astype(np.int64)
            dense = np.empty(len(rows), dtype=np.float32)
            dense[: len(found_dense)] = dense_scores[q][dense_rows[q] >= 0]
            if len(rows) > len(found_dense):
                dense[len(found_dense):] = self.index.reconstruct_batch(rows[len(found_dense):]) @ vector
            out.append(Candidates(
                self.product_ids[rows], self.titles[rows], dense, lexical_all[q][rows],
                np.isin(rows, found_dense), np.isin(rows, found_lexical),
            ))
        return out


def make_reconstructable(index) -> None:
    """Let an IVF index give back stored vectors by id (Flat and HNSW already can)."""
    import faiss

    try:
        faiss.extract_index_ivf(index).make_direct_map()
    except RuntimeError:
        pass  # not an IVF index


def open_shards(index_dir: str | Path) -> list[ShardIndex]:
    manifest = read_index_manifest(index_dir)
    return [ShardIndex.open(Path(index_dir) / shard["path"], manifest["search_params"]) for shard in manifest["shards"]]


def search_shards(shards: list[ShardIndex], vectors: np.ndarray, k: int) -> Hits:
    """The global top-k over shards held in this process: each shard's top-k, merged."""
    return merge_hits([shard.search(vectors, k) for shard in shards], k)


def merge_candidates(parts: list[list[Candidates]]) -> list[Candidates]:
    """Per query, the candidates of every shard that answered (shards hold disjoint products)."""
    return [Candidates.concat(list(per_query)) for per_query in zip(*parts)]


def search_shards_both(shards: list[ShardIndex], vectors: np.ndarray, texts: list[str], k: int, chunk: int = 256) -> list[Candidates]:
    """Dense and lexical candidates of every query over shards held in this process
    (`chunk` queries at a time: BM25 scores every product of a shard for each query)."""
    out: list[Candidates] = []
    for start in range(0, len(texts), chunk):
        part = slice(start, start + chunk)
        out += merge_candidates([shard.search_both(vectors[part], texts[part], k) for shard in shards])
    return out
