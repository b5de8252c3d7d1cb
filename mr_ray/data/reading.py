"""The one reading layer: CSV/TSV, JSON lines and Parquet files into Arrow tables.

Every importer reads through `read_file`, so every source gets the same rules:
a UTF-8 byte-order mark is dropped, ids stay text (every CSV and JSON-lines
value is read as text; `mr_ray.schema.conform` casts the typed columns), a
JSON-lines table has the union of its rows' keys, a folder holding one table
in two forms is refused, and rows of any length are read. Every error names
the file, the row as the user counts it (data row, 1-based, after the header)
and the field. Paths may be local or any URI pyarrow's filesystems understand
(s3://, gs://, hdfs://).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mr_ray.schema import DataError

TABLE_EXTENSIONS = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
# pyarrow's default block; a row longer than a block is read again with one block for the whole file.
CSV_BLOCK_SIZE = 1 << 20


def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(path)


def _read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None


def _not_utf8(value: bytes, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {value[err.start]:#04x}); re-save the file as UTF-8"


def _as_text(column: pa.ChunkedArray, *, file: str, name: str) -> pa.ChunkedArray:
    """Binary values as UTF-8 text; the first invalid one is reported by row and field."""
    try:
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        for row, value in enumerate(column.to_pylist(), start=1):
            if value is None:
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(_not_utf8(value, err), file=file, row=row, field=name) from None
        raise


PARQUET_MAGIC = b"PAR1"


def _not_parquet(data: bytes, path: str) -> None:
    """Refuse a Parquet file under a text file's name (its bytes would read as binary noise)."""
    if data[:4] == PARQUET_MAGIC and data[-4:] == PARQUET_MAGIC:
        raise DataError(f"this is a Parquet file named {PurePosixPath(path).suffix}; rename it to .parquet", file=path)


def read_csv(path: str, delimiter: str | None = None) -> pa.Table:
    """A CSV/TSV file with a header row; every column as text."""
    data = _read_bytes(path)
    if not data.strip():
        raise DataError("the file is empty", file=path)
    _not_parquet(data, path)
    delimiter = delimiter or ("\t" if PurePosixPath(path).suffix.lower() == ".tsv" else ",")
    header_line = data.split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf")
    try:
        header_line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"the header is {_not_utf8(header_line, err)}", file=path) from None
    parse = pacsv.ParseOptions(delimiter=delimiter)
    names = _csv_names(data, parse, path)
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"column {name!r} appears twice in the header", file=path, field=name)
        seen.add(name)
    # Binary first, text second: a UTF-8 error is then found in the record (and column) that holds it.
    convert = pacsv.ConvertOptions(column_types={name: pa.binary() for name in names})
    table = _parse_csv(data, parse, convert, path)
    return pa.table({name: _as_text(table.column(name), file=path, name=name) for name in names})


def _csv_names(data: bytes, parse: pacsv.ParseOptions, path: str) -> list[str]:
    # Only the header matters here: a bad record is skipped, and reported by the full read.
    header_only = pacsv.ParseOptions(delimiter=parse.delimiter, invalid_row_handler=lambda row: "skip")

    def names(block_size: int) -> list[str]:
        with pacsv.open_csv(pa.BufferReader(data), read_options=pacsv.ReadOptions(block_size=block_size), parse_options=header_only) as reader:
            return reader.schema.names

    try:
        return _with_long_rows(data, names)
    except pa.ArrowInvalid as err:
        raise DataError(f"cannot parse the header as CSV: {err}", file=path) from None


def _with_long_rows(data: bytes, read):
    """`read(block_size)`, again with one block for the whole file if a row is longer than a block."""
    try:
        return read(CSV_BLOCK_SIZE)
    except pa.ArrowInvalid as err:
        if "straddling" not in str(err) or len(data) < CSV_BLOCK_SIZE:
            raise
    return read(_whole_file_block(data))


def _whole_file_block(data: bytes) -> int:
    return min(len(data) + 1, (1 << 31) - 1)


def _parse_csv(data: bytes, parse: pacsv.ParseOptions, convert: pacsv.ConvertOptions, path: str) -> pa.Table:
    def read(block_size: int) -> pa.Table:
        options = pacsv.ReadOptions(block_size=block_size)
        return pacsv.read_csv(pa.BufferReader(data), read_options=options, parse_options=parse, convert_options=convert)

    try:
        return _with_long_rows(data, read)
    except pa.ArrowInvalid as err:
        bad = _bad_record(data, parse, convert)
        if bad is None:
            raise DataError(f"cannot parse as CSV: {err}", file=path) from None
        # pyarrow counts records with the header as record 1.
        message = f"expected {bad.expected_columns} fields, got {bad.actual_columns} (a stray delimiter or quote?)"
        raise DataError(message, file=path, row=bad.number - 1) from None


def _bad_record(data: bytes, parse: pacsv.ParseOptions, convert: pacsv.ConvertOptions):
    """Re-read on one thread, where pyarrow's invalid-row handler knows the record number."""
    found = []

    def handler(row) -> str:
        found.append(row)
        return "error"

    options = pacsv.ParseOptions(delimiter=parse.delimiter, invalid_row_handler=handler)
    try:
        pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(block_size=_whole_file_block(data), use_threads=False),
            parse_options=options,
            convert_options=convert,
        )
    except pa.ArrowInvalid:
        pass
    return found[0] if found and found[0].number is not None else None


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique (json.loads would keep the last of a repeated key silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def read_jsonl(path: str) -> pa.Table:
    """JSON lines, one object per line; the columns are every key any row has, every value as text."""
    data = _read_bytes(path).removeprefix(b"\xef\xbb\xbf")
    if not data.strip():
        raise DataError("the file is empty", file=path)
    _not_parquet(data, path)
    rows: list[dict] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        row_number = len(rows) + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(_not_utf8(line, err), file=path, row=row_number) from None
        try:
            # Numbers keep the text they were written with: an id 0042 or 1e20 is never re-spelt.
            row = json.loads(text, parse_int=str, parse_float=str, parse_constant=str, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON: {err.msg}", file=path, row=row_number) from None
        except DuplicateKey as err:
            raise DataError("the key appears twice in the object; keep one", file=path, row=row_number, field=err.key) from None
        if not isinstance(row, dict):
            raise DataError("each line must be a JSON object", file=path, row=row_number)
        rows.append(row)
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for name in names:
        values = []
        for row_number, row in enumerate(rows, start=1):
            value = row.get(name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (dict, list)):
                kind = "an object" if isinstance(value, dict) else "a list"
                raise DataError(f"expected text or a number, got {kind}", file=path, row=row_number, field=name)
            values.append(value)
        columns[name] = pa.array(values, pa.string())
    return pa.table(columns)


def read_parquet(path: str) -> pa.Table:
    fs, inner = filesystem(path)
    try:
        table = pq.read_table(inner, filesystem=fs)
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file: {err}", file=path) from None
    # Parquet does not check that its text is UTF-8; find a bad value before any compute trips on it,
    # whatever the encoding (plain, dictionary) or the declared type (string, binary).
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            table = table.set_column(index, name, _as_text(column, file=path, name=name))
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column.validate(full=True)
            except pa.ArrowInvalid:
                _as_text(column.cast(pa.binary()), file=path, name=name)
    return table


def read_file(path: str, delimiter: str | None = None) -> pa.Table:
    """Read one Parquet, CSV/TSV or JSON-lines file (see the module docstring for the rules)."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, delimiter)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise DataError(f"unsupported file type {suffix!r}; use one of {TABLE_EXTENSIONS}", file=path)


def list_table_files(path: str) -> list[str]:
    """A file, or every table file in a folder (sorted), as paths or URIs."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError("no such file or folder", file=path)
    if info.type == pafs.FileType.File:
        return [path]
    prefix = path[: len(path) - len(inner)] if is_uri(path) else ""
    found = sorted(prefix + f.path for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if f.type == pafs.FileType.File)
    # Hidden files (".x", "_SUCCESS", Spark's ".crc") are not part of a table; any other file is read or refused.
    files = [f for f in found if not PurePosixPath(f).name.startswith((".", "_"))]
    unreadable = [f for f in files if PurePosixPath(f).suffix.lower() not in TABLE_EXTENSIONS]
    if unreadable:
        raise DataError(
            f"the table folder holds a file it cannot read ({PurePosixPath(unreadable[0]).name}); a table's files are {', '.join(TABLE_EXTENSIONS)}: "
            "decompress or move it out", file=unreadable[0])
    if not files:
        raise DataError("the folder holds no table files", file=path)
    return files


def find_table(folder: str, name: str) -> str | None:
    """`name` as a folder or a file with a table extension inside `folder`; two of them is ambiguous."""
    fs, inner = filesystem(folder)
    found = [
        candidate
        for candidate in (name, *(name + ext for ext in TABLE_EXTENSIONS))
        if fs.get_file_info(f"{inner.rstrip('/')}/{candidate}").type != pafs.FileType.NotFound
    ]
    if len(found) > 1:
        raise DataError(f"the {name} table is there {len(found)} times ({', '.join(found)}); keep one", file=folder)
    return f"{folder.rstrip('/')}/{found[0]}" if found else None


def require_columns(table: pa.Table, names: tuple[str, ...], file: str) -> None:
    """Refuse a source table that lacks a column its importer needs."""
    for name in names:
        if name not in table.column_names:
            raise DataError(f"missing column {name!r}; found {table.column_names}", file=file, field=name)
