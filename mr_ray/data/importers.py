"""Importers: foreign layouts in, validated canonical Arrow tables out.

Every reader ends in `mr_ray.schema.conform`, so bad input fails here, with
the file, row and field, before anything is written. Paths may be local or
any URI pyarrow's filesystems understand (s3://, gs://, hdfs://).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mr_ray.grades import UnknownGradeError, from_esci, from_homedepot_rating, from_wands
from mr_ray.schema import JUDGMENTS, PRODUCTS, QUERIES, SPECS, DataError, conform

TABLE_EXTENSIONS = (".parquet", ".csv", ".tsv", ".jsonl", ".json")


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(path)


def _read_bytes(fs: pafs.FileSystem, path: str, source: str) -> bytes:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise DataError("file not found", file=source) from None


def _check_utf8(data: bytes, source: str, header_lines: int) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); re-save the file as UTF-8",
            file=source,
            row=line - header_lines,
        ) from None


def read_file(path: str, delimiter: str | None = None) -> pa.Table:
    """Read one Parquet, CSV/TSV or JSON-lines file; every CSV column is read as text."""
    fs, inner = _filesystem(path)
    suffix = PurePosixPath(inner).suffix.lower()
    if suffix == ".parquet":
        try:
            return pq.read_table(inner, filesystem=fs)
        except FileNotFoundError:
            raise DataError("file not found", file=path) from None
        except pa.ArrowInvalid as err:
            raise DataError(f"not a readable Parquet file: {err}", file=path) from None
    data = _read_bytes(fs, inner, path)
    if not data.strip():
        raise DataError("the file is empty", file=path)
    if suffix in (".csv", ".tsv"):
        _check_utf8(data, path, header_lines=1)
        delimiter = delimiter or ("\t" if suffix == ".tsv" else ",")
        header = next(csv.reader(io.StringIO(data.decode("utf-8").split("\n", 1)[0]), delimiter=delimiter))
        try:
            return pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header}),
            )
        except pa.ArrowInvalid as err:
            raise DataError(f"cannot parse as CSV: {err}", file=path) from None
    if suffix in (".jsonl", ".json"):
        _check_utf8(data, path, header_lines=0)
        rows = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON: {err.msg}", file=path, row=number) from None
            if not isinstance(row, dict):
                raise DataError("each line must be a JSON object", file=path, row=number)
            rows.append(row)
        return pa.Table.from_pylist(rows)
    raise DataError(f"unsupported file type {suffix!r}; use one of {TABLE_EXTENSIONS}", file=path)


def list_table_files(path: str) -> list[str]:
    """A file, or every table file in a folder (sorted), as paths or URIs."""
    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError("no such file or folder", file=path)
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(inner, recursive=True)
    prefix = path[: len(path) - len(inner)] if "://" in path else ""
    files = sorted(
        prefix + f.path
        for f in fs.get_file_info(selector)
        if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in TABLE_EXTENSIONS
    )
    if not files:
        raise DataError("the folder holds no table files", file=path)
    return files


def read_canonical_table(path: str, kind: str, columns: dict[str, str] | None = None) -> pa.Table:
    """Read a file or folder of one table, rename columns (canonical -> source name), validate."""
    tables = []
    for file in list_table_files(path):
        table = read_file(file)
        if columns:
            rename = {source: canonical for canonical, source in columns.items()}
            table = table.rename_columns([rename.get(name, name) for name in table.column_names])
        tables.append(conform(table, kind, file))
    if len(tables) == 1:
        return tables[0]
    return conform(pa.concat_tables(tables), kind, path)


def _find_table(folder: str, name: str) -> str | None:
    fs, inner = _filesystem(folder)
    for candidate in (name, *(name + ext for ext in TABLE_EXTENSIONS)):
        if fs.get_file_info(f"{inner.rstrip('/')}/{candidate}").type != pafs.FileType.NotFound:
            return f"{folder.rstrip('/')}/{candidate}"
    return None


def hash_split(ids: pa.ChunkedArray | list, dev: float = 0.1, test: float = 0.1) -> list[str]:
    """A stable train/dev/test split from a hash of each id (same id, same split, everywhere)."""
    out = []
    for value in ids.to_pylist() if hasattr(ids, "to_pylist") else ids:
        bucket = int(hashlib.md5(str(value).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out.append("test" if bucket < test else "dev" if bucket < test + dev else "train")
    return out


def _with_split(queries: pa.Table) -> pa.Table:
    split = queries.column("split")
    if split.null_count == 0:
        return queries
    filled = [s if s is not None else h for s, h in zip(split.to_pylist(), hash_split(queries.column("query_id")))]
    return queries.set_column(queries.schema.get_field_index("split"), "split", pa.array(filled, pa.string()))


def _map_grades(table: pa.Table, column: str, mapper, source: str) -> pa.Array:
    grades = []
    for row, value in enumerate(table.column(column).to_pylist(), start=1):
        try:
            grades.append(int(mapper(value)))
        except (UnknownGradeError, TypeError, ValueError) as err:
            raise DataError(str(err), file=source, row=row, field=column) from None
    return pa.array(grades, pa.int8())


def import_canonical(folder: str) -> dict[str, pa.Table]:
    """Our own layout: products, queries, judgments, optional engagement (files or folders)."""
    tables = {}
    for kind in ("products", "queries", "judgments", "engagement"):
        found = _find_table(folder, kind)
        if found is None:
            if kind == "engagement":
                continue
            raise DataError(f"no {kind} table (expected {kind}.parquet, .csv, .jsonl or a {kind}/ folder)", file=folder)
        tables[kind] = read_canonical_table(found, kind)
    return tables


def import_generic(files: dict[str, str], columns: dict[str, dict[str, str]]) -> dict[str, pa.Table]:
    """Any CSV/TSV/JSONL/Parquet files, with a per-table mapping canonical name -> source column."""
    unknown = set(files) - set(SPECS)
    if unknown:
        raise DataError(f"unknown table name(s) {sorted(unknown)}; expected {sorted(SPECS)}")
    return {kind: read_canonical_table(path, kind, columns.get(kind)) for kind, path in files.items()}


def import_homedepot(folder: str) -> dict[str, pa.Table]:
    """The Home Depot layout of ../shared/data/homedepot: grades from the mean rating."""
    paths = {kind: f"{folder.rstrip('/')}/{kind}.parquet" for kind in ("products", "queries", "judgments")}
    raw = read_file(paths["judgments"])
    if "rating_mean" not in raw.column_names:
        raise DataError("missing column 'rating_mean'", file=paths["judgments"], field="rating_mean")
    grades = _map_grades(raw, "rating_mean", from_homedepot_rating, paths["judgments"])
    judgments = pa.table(
        {
            "query_id": raw.column("query_id"),
            "product_id": raw.column("product_id"),
            "grade": grades,
            "source": pa.array(["human"] * raw.num_rows),
        }
    )
    return {
        "products": conform(read_file(paths["products"]), PRODUCTS, paths["products"]),
        "queries": _with_split(conform(read_file(paths["queries"]), QUERIES, paths["queries"])),
        "judgments": conform(judgments, JUDGMENTS, paths["judgments"]),
    }


def import_esci(folder: str) -> dict[str, pa.Table]:
    """The Amazon ESCI release: examples + products Parquet; product ids keyed by locale."""
    examples_path = f"{folder.rstrip('/')}/shopping_queries_dataset_examples.parquet"
    products_path = f"{folder.rstrip('/')}/shopping_queries_dataset_products.parquet"
    examples = read_file(examples_path)
    products = read_file(products_path)
    for table, path, needed in (
        (examples, examples_path, ("query_id", "query", "product_id", "product_locale", "esci_label")),
        (products, products_path, ("product_id", "product_title", "product_locale")),
    ):
        for name in needed:
            if name not in table.column_names:
                raise DataError(f"missing column {name!r}", file=path, field=name)

    def keyed(table: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(table.column("product_locale"), pc.cast(table.column("product_id"), pa.string()), ":")

    product_table = pa.table(
        {
            "product_id": keyed(products),
            "title": products.column("product_title"),
            "description": products.column("product_description") if "product_description" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "brand": products.column("product_brand") if "product_brand" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "color": products.column("product_color") if "product_color" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "locale": products.column("product_locale"),
        }
    )
    query_ids = pc.cast(examples.column("query_id"), pa.string())
    queries = pa.table({"query_id": query_ids, "text": examples.column("query"), "locale": examples.column("product_locale")})
    if "split" in examples.column_names:
        # ESCI ships train/test; a hash of the query id carves dev out of train.
        release = examples.column("split").to_pylist()
        hashed = hash_split(query_ids, dev=0.1, test=0.0)
        queries = queries.append_column("split", pa.array([r if r == "test" else h for r, h in zip(release, hashed)]))
    queries = pa.Table.from_pandas(queries.to_pandas().drop_duplicates("query_id"), preserve_index=False)
    judgments = pa.table(
        {
            "query_id": query_ids,
            "product_id": keyed(examples),
            "grade": _map_grades(examples, "esci_label", from_esci, examples_path),
            "source": pa.array(["human"] * examples.num_rows),
        }
    )
    return {
        "products": conform(product_table, PRODUCTS, products_path),
        "queries": _with_split(conform(queries, QUERIES, examples_path)),
        "judgments": conform(judgments, JUDGMENTS, examples_path),
    }


def import_wands(folder: str) -> dict[str, pa.Table]:
    """The Wayfair WANDS release: tab-separated product.csv, query.csv, label.csv."""
    base = folder.rstrip("/")
    products = read_file(f"{base}/product.csv", delimiter="\t")
    queries = read_file(f"{base}/query.csv", delimiter="\t")
    labels = read_file(f"{base}/label.csv", delimiter="\t")
    for table, name, needed in (
        (products, "product.csv", ("product_id", "product_name")),
        (queries, "query.csv", ("query_id", "query")),
        (labels, "label.csv", ("query_id", "product_id", "label")),
    ):
        for column in needed:
            if column not in table.column_names:
                raise DataError(f"missing column {column!r}", file=f"{base}/{name}", field=column)
    product_table = pa.table(
        {
            "product_id": products.column("product_id"),
            "title": products.column("product_name"),
            "description": products.column("product_description") if "product_description" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "category": products.column("product_class") if "product_class" in products.column_names else pa.nulls(products.num_rows, pa.string()),
        }
    )
    query_table = pa.table({"query_id": queries.column("query_id"), "text": queries.column("query")})
    judgments = pa.table(
        {
            "query_id": labels.column("query_id"),
            "product_id": labels.column("product_id"),
            "grade": _map_grades(labels, "label", from_wands, f"{base}/label.csv"),
            "source": pa.array(["human"] * labels.num_rows),
        }
    )
    return {
        "products": conform(product_table, PRODUCTS, f"{base}/product.csv"),
        "queries": _with_split(conform(query_table, QUERIES, f"{base}/query.csv")),
        "judgments": conform(judgments, JUDGMENTS, f"{base}/label.csv"),
    }


def check_references(tables: dict[str, pa.Table], source: str) -> None:
    """Every judged or engaged pair must point at a known query and product."""
    product_ids = tables["products"].column("product_id")
    query_ids = tables["queries"].column("query_id")
    for kind in ("judgments", "engagement", "gold"):
        if kind not in tables:
            continue
        table = tables[kind]
        for field, known in (("query_id", query_ids), ("product_id", product_ids)):
            unknown = pc.invert(pc.is_in(table.column(field), value_set=known)).to_numpy(zero_copy_only=False)
            if unknown.any():
                row = int(np.flatnonzero(unknown)[0]) + 1
                value = table.column(field)[row - 1].as_py()
                raise DataError(f"{field} {value!r} is not in the {field.split('_')[0]}s table", file=f"{source} ({kind})", row=row, field=field)


IMPORTERS = {
    "canonical": import_canonical,
    "homedepot": import_homedepot,
    "esci": import_esci,
    "wands": import_wands,
}

