"""Arrow schemas of the four canonical tables, and the one validator for them.

Every importer ends in `conform(table, kind, source)`: it checks required
columns, types, nulls, grades and duplicate keys, and returns the table in
canonical column order. Errors name the file, the row (1-based data row) and
the field, so a user can open the file and fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
    pa.schema([("query_id", pa.string()), ("text", pa.string()), ("locale", pa.string()), ("split", pa.string())]),
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


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _cast_column(column: pa.ChunkedArray, target: pa.DataType, *, source: str, field: str) -> pa.ChunkedArray:
    if column.type == target:
        return column
    if pa.types.is_string(target):
        if pa.types.is_floating(column.type):
            # Ids read as floats ("12.0") would silently change identity.
            values = column.to_numpy(zero_copy_only=False)
            frac = ~np.isnan(values) & (values != np.floor(np.nan_to_num(values)))
            if frac.any():
                row = _first_bad_row(frac)
                raise DataError(f"expected text, got number {values[row - 1]!r}", file=source, row=row, field=field)
            return pc.cast(pc.cast(column, pa.int64()), pa.string())
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
        if field.name in spec.required and column.null_count:
            row = _first_bad_row(column.is_null().to_numpy(zero_copy_only=False))
            raise DataError("empty value in a required field", file=source, row=row, field=field.name)
        if pa.types.is_string(field.type) and field.name in spec.required:
            blank = pc.equal(pc.utf8_trim_whitespace(column), "").to_numpy(zero_copy_only=False)
            if blank.any():
                raise DataError("blank value in a required field", file=source, row=_first_bad_row(blank), field=field.name)
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=spec.schema)
    _check_values(out, spec, source)
    _check_unique(out, spec, source)
    return out


def _check_values(table: pa.Table, spec: TableSpec, source: str) -> None:
    if spec is JUDGMENTS:
        grades = table.column("grade").to_numpy(zero_copy_only=False)
        bad = (grades < 0) | (grades > 2)
        if bad.any():
            row = _first_bad_row(bad)
            raise DataError(f"unknown grade {grades[row - 1]}; grades are 0, 1, 2", file=source, row=row, field="grade")
    if spec is ENGAGEMENT:
        for name in ("impressions", "clicks", "add_to_cart", "orders"):
            values = table.column(name).to_numpy(zero_copy_only=False)
            if (values < 0).any():
                raise DataError("negative count", file=source, row=_first_bad_row(values < 0), field=name)
    if spec is QUERIES:
        split = table.column("split")
        if split.null_count < len(split):
            values = np.array(split.to_pylist(), dtype=object)
            bad = np.array([v is not None and v not in SPLITS for v in values])
            if bad.any():
                row = _first_bad_row(bad)
                raise DataError(f"unknown split {values[row - 1]!r}; expected one of {SPLITS}", file=source, row=row, field="split")


def _check_unique(table: pa.Table, spec: TableSpec, source: str) -> None:
    keys = table.select(list(spec.key)).to_pandas()
    duplicated = keys.duplicated(keep="first").to_numpy()
    if duplicated.any():
        row = _first_bad_row(duplicated)
        value = ", ".join(f"{k}={keys.iloc[row - 1][k]!r}" for k in spec.key)
        raise DataError(f"duplicate key ({value})", file=source, row=row, field=spec.key[-1] if len(spec.key) == 1 else "+".join(spec.key))
