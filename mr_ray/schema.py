"""Arrow schemas of the four canonical tables, and the one validator for them.

Every importer ends in `conform(table, kind, source)`: it checks required
columns, types, nulls, value ranges and duplicate keys, and returns the table in
canonical column order. Errors name the file, the row (1-based data row) and
the field, so a user can open the file and fix it. A conformed table remembers
which file each row came from (`origin`), so checks across files and tables
still point at the file and row the user can open.

`conform` drops columns that are not part of a table. For a user's file,
`check_extra_columns` first warns about them, and refuses one whose name is a
near miss of a missing optional column (`colour` for `color`): dropping it
would silently lose the data it holds.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input: carries the file, row (1-based, data rows) and field it is about."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field = file, row, field
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"row {row}" if row is not None else "",
                f"field {field!r}" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    required: tuple[str, ...]
    key: tuple[str, ...]


PRODUCTS = TableSpec(
    "products",
    pa.schema(
        [
            ("product_id", pa.string()),
            ("title", pa.string()),
            ("description", pa.string()),
            ("brand", pa.string()),
            ("color", pa.string()),
            ("category", pa.string()),
            ("locale", pa.string()),
        ]
    ),
    required=("product_id", "title"),
    key=("product_id",),
)

QUERIES = TableSpec(
    "queries",
    pa.schema(
        [
            ("query_id", pa.string()),
            ("text", pa.string()),
            ("locale", pa.string()),
            ("split", pa.string()),
            ("phenomenon", pa.string()),  # optional tag (synonym, intent, misspelt ...): evaluation groups by it
        ]
    ),
    required=("query_id", "text"),
    key=("query_id",),
)

JUDGMENTS = TableSpec(
    "judgments",
    pa.schema(
        [
            ("query_id", pa.string()),
            ("product_id", pa.string()),
            ("grade", pa.int8()),
            ("source", pa.string()),
            ("confidence", pa.float32()),
        ]
    ),
    required=("query_id", "product_id", "grade", "source"),
    key=("query_id", "product_id", "source"),
)

ENGAGEMENT = TableSpec(
    "engagement",
    pa.schema(
        [
            ("query_id", pa.string()),
            ("product_id", pa.string()),
            ("impressions", pa.int64()),
            ("clicks", pa.int64()),
            ("add_to_cart", pa.int64()),
            ("orders", pa.int64()),
        ]
    ),
    required=("query_id", "product_id", "impressions", "clicks", "add_to_cart", "orders"),
    key=("query_id", "product_id"),
)

SPECS = {spec.name: spec for spec in (PRODUCTS, QUERIES, JUDGMENTS, ENGAGEMENT)}
SPLITS = ("train", "dev", "test")
ID_FIELDS = ("product_id", "query_id")  # trimmed and NFC-normalised on import
# Who graded a pair: people (human; gold on the sample), the judge's labels (llm), its audit re-judgments
# (audited), its synthetic queries' grades (synthetic), and mined pairs' grades (mined). Every stage selects
# by these exact words, so an import writes them lower-case and trimmed, or refuses the row.
JUDGMENT_SOURCES = ("human", "llm", "audited", "synthetic", "mined", "gold")
# Ids read from floats must be exact integers; above 2**53 a float no longer is one.
LARGEST_EXACT_FLOAT_ID = 2**53
ORIGIN_KEY = b"mr_ray.origin"


def with_origin(table: pa.Table, parts: list[tuple[str, int]]) -> pa.Table:
    """Record that the table's rows came from these (file, row count) parts, in order."""
    return table.replace_schema_metadata({ORIGIN_KEY: json.dumps(parts).encode()})


def without_origin(table: pa.Table) -> pa.Table:
    """The table as it is written: where its rows came from is for error messages only."""
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != ORIGIN_KEY}
    return table.replace_schema_metadata(metadata or None)


def locate(table: pa.Table, row: int, default: str) -> tuple[str, int]:
    """(file, 1-based row in that file) of the table's 1-based `row`."""
    metadata = table.schema.metadata or {}
    if ORIGIN_KEY not in metadata:
        return default, row
    for file, count in json.loads(metadata[ORIGIN_KEY]):
        if row <= count:
            return file, row
        row -= count
    return default, row


def first_duplicate(table: pa.Table, key: tuple[str, ...]) -> tuple[int, int] | None:
    """1-based (row, row of its first occurrence) of the first repeated key, or None."""
    keys = table.select(list(key)).to_pandas()
    duplicated = keys.duplicated(keep="first").to_numpy()
    if not duplicated.any():
        return None
    row = _first_bad_row(duplicated)
    same = (keys == keys.iloc[row - 1]).all(axis=1).to_numpy()
    return row, _first_bad_row(same)


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _cast_column(column: pa.ChunkedArray, target: pa.DataType, *, source: str, field: str) -> pa.ChunkedArray:
    if column.type == target:
        return column
    if pa.types.is_boolean(column.type) and not pa.types.is_string(target):
        # Arrow would cast true/false to 1/0: a grade or a count is never a yes/no.
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        row = _first_bad_row(valid) if valid.any() else None
        raise DataError(f"expected {target}, got true/false values", file=source, row=row, field=field)
    if pa.types.is_string(target):
        if pa.types.is_floating(column.type):
            # Ids read as floats ("12.0") would silently change identity.
            values = column.to_numpy(zero_copy_only=False)
            for bad, reason in (
                (np.isnan(values) & column.is_valid().to_numpy(zero_copy_only=False), "a NaN id; store ids as text"),
                (np.abs(np.nan_to_num(values)) > LARGEST_EXACT_FLOAT_ID, "too large for an exact id in a float column; store ids as text"),
                (np.nan_to_num(values) != np.floor(np.nan_to_num(values)), "not a whole number; store ids as text"),
            ):
                if bad.any():
                    row = _first_bad_row(bad)
                    raise DataError(f"expected text, got number {values[row - 1].item()!r}: {reason}", file=source, row=row, field=field)
            return pc.cast(pc.cast(column, pa.int64()), pa.string())
        if pa.types.is_nested(column.type):  # a struct, list or map where text belongs
            raise DataError(f"expected text, got values of type {column.type}", file=source, field=field)
        return pc.cast(column, pa.string())
    try:
        return pc.cast(column, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Find the first value that does not convert, to name its row.
    for row, value in enumerate(column.to_pylist(), start=1):
        if value is None:
            continue
        try:
            pc.cast(pa.array([value]), target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise DataError(f"cannot read {value!r} as {target}", file=source, row=row, field=field) from None
    raise DataError(f"column of type {column.type} cannot be read as {target}", file=source, field=field)


def conform(table: pa.Table, spec: TableSpec | str, source: str) -> pa.Table:
    """Validate `table` against `spec` and return it with the canonical schema.

    Extra columns are dropped; missing optional columns are filled with nulls.
    """
    spec = SPECS[spec] if isinstance(spec, str) else spec
    if table.num_rows == 0:
        raise DataError(f"no rows: an empty {spec.name} table", file=source)
    missing = [name for name in spec.required if name not in table.column_names]
    if missing:
        raise DataError(
            f"missing required column(s) {missing} for {spec.name}; found {table.column_names}",
            file=source,
            field=missing[0],
        )
    columns = []
    for field in spec.schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = _cast_column(table.column(field.name), field.type, source=source, field=field.name)
        if field.name in ID_FIELDS:
            # One spelling per id: " p1" and "p1", or "é" composed and decomposed, are one product (or a duplicate).
            column = pc.utf8_normalize(pc.utf8_trim_whitespace(column), form="NFC")
        if field.name in spec.required and column.null_count:
            row = _first_bad_row(column.is_null().to_numpy(zero_copy_only=False))
            raise DataError("empty value in a required field", file=source, row=row, field=field.name)
        if pa.types.is_string(field.type) and field.name in spec.required:
            blank = pc.equal(pc.utf8_trim_whitespace(column), "").to_numpy(zero_copy_only=False)
            if blank.any():
                raise DataError("blank value in a required field", file=source, row=_first_bad_row(blank), field=field.name)
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=spec.schema)
    if spec is JUDGMENTS:
        out = out.set_column(out.schema.get_field_index("source"), "source", judgment_sources(out.column("source"), source))
    _check_values(out, spec, source)
    _check_unique(out, spec, source)
    return with_origin(out, [(source, out.num_rows)])


def check_extra_columns(table: pa.Table, spec: TableSpec | str, source: str) -> None:
    """For a user's file: refuse a near miss of a missing optional column, warn about the other extras."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    known = set(spec.schema.names)
    extra = [name for name in table.column_names if name not in known]
    absent = [name for name in spec.schema.names if name not in table.column_names]
    for name in extra:
        near = difflib.get_close_matches(name.lower(), absent, n=1, cutoff=0.75)
        if near:
            raise DataError(
                f"column {name!r} is not a {spec.name} column; did you mean {near[0]!r}? (rename it, or map it with data.columns)",
                file=source,
                field=name,
            )
    if extra:
        log.warning("warning: %s: column(s) %s are not part of the %s table and are not imported", source, extra, spec.name)


def judgment_sources(column: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
    """The `source` column lower-cased and trimmed ("Human " -> "human"); a value outside JUDGMENT_SOURCES is refused."""
    normalised = pc.utf8_lower(pc.utf8_trim_whitespace(column))
    bad = pc.invert(pc.is_in(normalised, value_set=pa.array(JUDGMENT_SOURCES))).to_numpy(zero_copy_only=False)
    if bad.any():
        row = _first_bad_row(bad)
        raise DataError(f"unknown judgment source {column[row - 1].as_py()!r}; expected one of {', '.join(JUDGMENT_SOURCES)}", file=source, row=row, field="source")
    return normalised


def _check_values(table: pa.Table, spec: TableSpec, source: str) -> None:
    if spec is JUDGMENTS:
        grades = table.column("grade").to_numpy(zero_copy_only=False)
        bad = (grades < 0) | (grades > 2)
        if bad.any():
            row = _first_bad_row(bad)
            raise DataError(f"unknown grade {grades[row - 1]}; grades are 0, 1, 2", file=source, row=row, field="grade")
        confidence = table.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
        present = table.column("confidence").is_valid().to_numpy(zero_copy_only=False)
        # NaN is how pandas writes a missing confidence.
        bad = present & ~np.isnan(confidence) & ((confidence < 0) | (confidence > 1))
        if bad.any():
            row = _first_bad_row(bad)
            raise DataError(f"confidence {confidence[row - 1]} is outside [0, 1]", file=source, row=row, field="confidence")
    if spec is ENGAGEMENT:
        for name in ("impressions", "clicks", "add_to_cart", "orders"):
            values = table.column(name).to_numpy(zero_copy_only=False)
            if (values < 0).any():
                raise DataError("negative count", file=source, row=_first_bad_row(values < 0), field=name)
        clicks, impressions = (table.column(name).to_numpy(zero_copy_only=False) for name in ("clicks", "impressions"))
        if (clicks > impressions).any():
            row = _first_bad_row(clicks > impressions)
            raise DataError(f"{clicks[row - 1]} clicks on {impressions[row - 1]} impressions", file=source, row=row, field="clicks")
    if spec is QUERIES:
        split = table.column("split")
        if split.null_count < len(split):
            values = np.array(split.to_pylist(), dtype=object)
            bad = np.array([v is not None and v not in SPLITS for v in values])
            if bad.any():
                row = _first_bad_row(bad)
                raise DataError(f"unknown split {values[row - 1]!r}; expected one of {SPLITS}", file=source, row=row, field="split")


def _check_unique(table: pa.Table, spec: TableSpec, source: str) -> None:
    found = first_duplicate(table, spec.key)
    if found is not None:
        row, first = found
        raise duplicate_error(table, spec, row, (source, first), source)


def duplicate_error(table: pa.Table, spec: TableSpec, row: int, first: tuple[str, int], source: str) -> DataError:
    """The error for a repeated key at `row` of `table` (located through its origin), first seen at `first`."""
    value = ", ".join(f"{k}={table.column(k)[row - 1].as_py()!r}" for k in spec.key)
    file, file_row = locate(table, row, source)
    where = f"row {first[1]}" if first[0] == file else f"file {first[0]}, row {first[1]}"
    field = spec.key[0] if len(spec.key) == 1 else "+".join(spec.key)
    return DataError(f"duplicate key ({value}), first at {where}", file=file, row=file_row, field=field)
