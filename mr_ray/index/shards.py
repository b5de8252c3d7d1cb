"""Reading a built index: its manifest, one FAISS shard, and the top-k merge across shards.

An index folder holds `index.json` (factory, dimension, encoder, shard list),
`thresholds.json` and one folder per shard with `index.faiss` and
`products.parquet` (product_id, title in FAISS row order: row i of the FAISS
index is row i of the table).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

INDEX_MANIFEST = "index.json"
SHARD_INDEX_FILE = "index.faiss"
SHARD_PRODUCTS_FILE = "products.parquet"


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
    """One shard: a FAISS index and its product-id map, searched with inner product."""

    def __init__(self, folder: str | Path, search_params: str = ""):
        import faiss

        folder = Path(folder)
        self.name = folder.name
        self.index = faiss.read_index(str(folder / SHARD_INDEX_FILE))
        if search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, search_params)
        table = pq.read_table(folder / SHARD_PRODUCTS_FILE, columns=["product_id", "title"])
        self.product_ids = np.array(table.column("product_id").to_pylist() + [None], dtype=object)
        self.titles = np.array(table.column("title").to_pylist() + [None], dtype=object)
        if len(self.product_ids) - 1 != self.index.ntotal:
            raise ValueError(f"{folder}: {self.index.ntotal} vectors but {len(self.product_ids) - 1} products")

    def search(self, vectors: np.ndarray, k: int) -> Hits:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        scores, rows = self.index.search(vectors, k)
        missing = rows < 0
        scores[missing] = -np.inf
        rows[missing] = len(self.product_ids) - 1  # the None sentinel
        return Hits(scores, self.product_ids[rows], self.titles[rows])


def open_shards(index_dir: str | Path) -> list[ShardIndex]:
    manifest = read_index_manifest(index_dir)
    return [ShardIndex(Path(index_dir) / shard["path"], manifest["search_params"]) for shard in manifest["shards"]]


def search_shards(shards: list[ShardIndex], vectors: np.ndarray, k: int) -> Hits:
    """The global top-k over shards held in this process: each shard's top-k, merged."""
    return merge_hits([shard.search(vectors, k) for shard in shards], k)
