"""The embedding cache: a catalog is embedded once per encoder, catalog and text settings, and reused."""

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mr_ray.cache import cache_root
from mr_ray.config import EncoderConfig
from mr_ray.embeddings import catalog_vectors
from mr_ray.pipeline import _EMBEDDINGS
from mr_ray.retriever.encoder import (
    cpu_has_native_bf16,
    encode,
    encode_queries,
    load_encoder,
    pretrained_model_path,
    resolve_precision,
)


@pytest.fixture
def catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("MR_RAY_CACHE", str(tmp_path / "cache"))
    products = pd.DataFrame({"product_id": [f"P{i:03d}" for i in range(60)], "title": [f"{c} cordless drill {i}" for i, c in zip(range(60), ["red", "blue", "black"] * 20)]})
    folder = tmp_path / "prepare" / "products"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(products, preserve_index=False), folder / "part-00000.parquet")
    return folder, products


def embed(folder, products, config=EncoderConfig(precision="fp32"), model=None):
    record: list[dict] = []
    token = _EMBEDDINGS.set(record)
    try:
        vectors = catalog_vectors(folder, products, config, model, "test")
    finally:
        _EMBEDDINGS.reset(token)
    return vectors, record


def test_a_catalog_is_embedded_once_in_catalog_order_and_read_back(ray_local, catalog):
    folder, products = catalog
    first, record = embed(folder, products)
    assert record[0]["computed"] and list(first.ids) == list(products["product_id"])
    # row i is product i's own title vector, as the encoder gives it in-process
    model = load_encoder(None, "cpu", 48)
    np.testing.assert_allclose(first.vectors[[0, 31, 59]], encode(model, products["title"].iloc[[0, 31, 59]].tolist()), atol=1e-5)
    again, record = embed(folder, products)
    assert not record[0]["computed"] and np.array_equal(again.vectors, first.vectors)
    assert len(list((cache_root() / "embeddings").iterdir())) == 1


def test_the_key_is_content_not_names(ray_local, catalog, tmp_path):
    folder, products = catalog
    embed(folder, products)
    # the same model files under another path: the same entry
    copy = tmp_path / "copy-of-pretrained"
    shutil.copytree(pretrained_model_path(), copy)
    assert not embed(folder, products, model=str(copy))[1][0]["computed"]
    # other text settings, or another catalog: new entries
    assert embed(folder, products, EncoderConfig(precision="fp32", max_seq_length=16))[1][0]["computed"]
    changed = products.assign(title=products["title"].str.upper())
    pq.write_table(pa.Table.from_pandas(changed, preserve_index=False), folder / "part-00000.parquet")
    assert embed(folder, changed)[1][0]["computed"]
    assert len(list((cache_root() / "embeddings").iterdir())) == 3


def test_a_damaged_entry_is_embedded_again(ray_local, catalog):
    folder, products = catalog
    first, _ = embed(folder, products)
    entry = next((cache_root() / "embeddings").iterdir())
    (entry / "vectors.npy").write_bytes(b"truncated")
    again, record = embed(folder, products)
    assert record[0]["computed"] and np.allclose(again.vectors, first.vectors, atol=1e-6)
    assert not list((cache_root() / "embeddings").glob(".tmp-*"))


def test_precision_auto_takes_bf16_only_where_the_cpu_has_it():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    # bf16 autocast changes the vectors by bf16's precision only
    model = load_encoder(None, "cpu", 48)
    texts = ["cordless drill 20v", "red running shoes size 9", "black leather sofa"]
    assert (encode(model, texts, precision="bf16") * encode(model, texts)).sum(axis=1).min() > 0.99


def test_a_query_vector_does_not_depend_on_the_queries_it_is_batched_with():
    # Serving batches concurrent requests; bf16 autocast would move a query's vector with its neighbours.
    model = load_encoder(None, "cpu", 48)
    texts = ["black cordless drill", "led light bulb 60w", "stainless kitchen faucet with pull down sprayer", "rug", "garden hose 50 ft"]
    alone = np.vstack([encode_queries(model, [text]) for text in texts])
    np.testing.assert_allclose(encode_queries(model, texts), alone, atol=1e-6)
    np.testing.assert_array_equal(alone, np.vstack([encode(model, [text]) for text in texts]))  # fp32, whatever the catalog's precision
