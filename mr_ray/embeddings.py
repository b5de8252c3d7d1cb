"""Catalog embeddings, computed once per (encoder, catalog, text settings) and shared by every stage.

`mine` embeds the catalog with the Stage 1 encoder and `evaluate` reads those vectors for its Stage 1
rows; `evaluate` embeds Stage 2's and `index` reads them; the pretrained encoder's and the cached
`st-mnrl` baseline's are reused by every run on the same catalog. The key is content, never a name
or a path: the encoder folder's hash, the prepared products table's hash and the text settings
(field, `max_seq_length`, precision), so a retrained model or a changed catalog never meets stale
vectors.

An entry is a folder `<cache>/embeddings/<key>/`: `ids.parquet` (product ids in catalog order),
`vectors.npy` (float32, read memory-mapped) and `key.json` (what the key was made of). It is written
under a temporary name and renamed into place, so a killed run leaves no half-written entry. The cache
folder is `mr_ray.cache.cache_root()`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mr_ray.cache import cache_entry, cache_root
from mr_ray.config import EncoderConfig, section_hash
from mr_ray.pipeline import note_embedding, tree_hash
from mr_ray.retriever.encoder import (
    embed_dataset,
    in_blocks,
    pretrained_model_path,
    resolve_precision,
)

TEXT_FIELD = "title"


@dataclass(frozen=True)
class CatalogVectors:
    """Every catalog product's embedding, in the prepared catalog's row order."""

    ids: np.ndarray  # str, row i = products row i
    vectors: np.ndarray  # (n, dim) float32, L2-normalised

    def by_id(self) -> dict[str, np.ndarray]:
        return dict(zip(self.ids, self.vectors))


def embedding_key(model_path: str | None, products_dir: Path, encoder: EncoderConfig) -> dict:
    """What the catalog's vectors depend on: the encoder's files, the catalog's files, and how texts are encoded."""
    return {
        "encoder": tree_hash(Path(model_path or pretrained_model_path())),
        "catalog": tree_hash(Path(products_dir)),
        "field": TEXT_FIELD,
        "max_seq_length": encoder.max_seq_length,
        "precision": resolve_precision(encoder.precision, encoder.device),
        "normalised": True,
    }


def catalog_vectors(products_dir: Path, products: pd.DataFrame, encoder: EncoderConfig, model_path: str | None, name: str = "") -> CatalogVectors:
    """The catalog's embeddings by `model_path` (None = pretrained): from the cache when an entry has this
    key, else embedded through Ray Data encoder actors and cached. `products` is the table read from
    `products_dir` (its row order is the vectors' order); `name` labels the record in the stage's manifest."""
    key = embedding_key(model_path, products_dir, encoder)
    folder = cache_root() / "embeddings" / section_hash(key)
    started = time.perf_counter()
    vectors = read_entry(folder, products)
    computed = vectors is None
    if computed:
        ids, embedded = embed_dataset(in_blocks(products[["product_id", TEXT_FIELD]]), "product_id", TEXT_FIELD, encoder, model_path)
        catalog_ids = products["product_id"].astype(str).to_numpy()
        embedded = embedded[pd.Series(np.arange(len(ids)), index=ids)[catalog_ids].to_numpy()]  # into catalog order
        write_entry(folder, key, catalog_ids, embedded)
        vectors = CatalogVectors(catalog_ids, embedded)
    note_embedding({"encoder": name or str(model_path or "pretrained"), "computed": computed, "key": folder.name,
                    "products": len(products), "seconds": round(time.perf_counter() - started, 1)})
    return vectors


def read_entry(folder: Path, products: pd.DataFrame) -> CatalogVectors | None:
    """A cache entry's vectors if it holds exactly this catalog's products in its order, else None."""
    try:
        ids = pq.read_table(folder / "ids.parquet").column("product_id").to_numpy(zero_copy_only=False).astype(str)
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    if len(ids) != len(products) or len(vectors) != len(ids) or not np.array_equal(ids, products["product_id"].astype(str).to_numpy()):
        return None
    return CatalogVectors(ids, vectors)


def write_entry(folder: Path, key: dict, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Place an entry (`cache.cache_entry`): a readable one another process just wrote is kept, a damaged one replaced."""
    with cache_entry(folder, lambda placed: read_entry(placed, pd.DataFrame({"product_id": ids})) is not None) as tmp:
        pq.write_table(pa.table({"product_id": ids}), tmp / "ids.parquet")
        np.save(tmp / "vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
        (tmp / "key.json").write_text(json.dumps(key, indent=2))
