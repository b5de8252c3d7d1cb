"""The `prepare` stage: any source in, canonical Parquet folders out.

Output folder layout (each a Parquet folder readable by `ray.data.read_parquet`
and `pyarrow.parquet.read_table`): products/, queries/, judgments/, and when
the source has them engagement/, gold/ (rule grades of the sample catalog,
the evaluation truth) and pool/ (the sample's pairs to label).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mr_ray.config import DataConfig
from mr_ray.data.importers import IMPORTERS, import_generic
from mr_ray.data.sample import generate_sample
from mr_ray.schema import conform, without_origin

TABLES = ("products", "queries", "judgments", "engagement", "gold", "pool")


def load_source(config: DataConfig) -> dict[str, pa.Table]:
    """Validated canonical tables of the configured source."""
    if config.source == "sample":
        frames = generate_sample(config.sample)
        tables = {
            kind: conform(pa.Table.from_pandas(frames[kind], preserve_index=False), spec, f"sample:{kind}")
            for kind, spec in (("products", "products"), ("queries", "queries"), ("judgments", "judgments"), ("engagement", "engagement"), ("gold", "judgments"))
        }
        tables["pool"] = pa.Table.from_pandas(frames["pool"], preserve_index=False)
        return tables
    # DataConfig has checked that the source has its path (or files).
    if config.source == "generic":
        return import_generic(config.files, config.columns)
    return IMPORTERS[config.source](config.path)


def write_tables(tables: dict[str, pa.Table], out: Path) -> dict[str, int]:
    """One Parquet folder per table; returns row counts."""
    counts = {}
    for kind in TABLES:
        if kind not in tables:
            continue
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(without_origin(tables[kind]), folder / "part-00000.parquet")
        counts[kind] = tables[kind].num_rows
    return counts


def read_table(stage_dir: Path, kind: str) -> pa.Table | None:
    """A canonical table from a prepare output folder, or None if the source had none."""
    folder = Path(stage_dir) / kind
    return pq.read_table(folder) if folder.exists() else None
