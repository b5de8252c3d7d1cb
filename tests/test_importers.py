"""Bad input is refused with file, row and field; good input lands canonical."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mr_ray.data.importers import (
    import_canonical,
    import_esci,
    import_generic,
    import_homedepot,
    import_wands,
    read_canonical_table,
)
from mr_ray.schema import DataError, conform


def write_csv(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_good_csv_is_canonical(tmp_path):
    path = write_csv(tmp_path / "judgments.csv", "query_id,product_id,grade,source\nq1,p1,2,human\nq1,p2,0,human\n")
    table = read_canonical_table(path, "judgments")
    assert table.schema.field("grade").type == pa.int8()
    assert table.column("grade").to_pylist() == [2, 0]
    assert table.column("confidence").null_count == 2


def test_missing_column_names_file_and_field(tmp_path):
    path = write_csv(tmp_path / "products.csv", "product_id,name\np1,shoe\n")
    with pytest.raises(DataError) as err:
        read_canonical_table(path, "products")
    assert err.value.field == "title" and err.value.file == path
    assert "title" in str(err.value) and path in str(err.value)


def test_unknown_grade_names_row(tmp_path):
    path = write_csv(tmp_path / "j.csv", "query_id,product_id,grade,source\nq1,p1,2,human\nq1,p2,5,human\n")
    with pytest.raises(DataError) as err:
        read_canonical_table(path, "judgments")
    assert (err.value.row, err.value.field) == (2, "grade")


def test_wrong_type_names_row(tmp_path):
    path = write_csv(tmp_path / "j.csv", "query_id,product_id,grade,source\nq1,p1,2,human\nq1,p2,1,human\nq1,p3,two,human\n")
    with pytest.raises(DataError) as err:
        read_canonical_table(path, "judgments")
    assert (err.value.row, err.value.field) == (3, "grade")
    assert "'two'" in str(err.value)


def test_duplicate_ids_name_second_row(tmp_path):
    path = write_csv(tmp_path / "p.csv", "product_id,title\np1,a\np2,b\np1,c\n")
    with pytest.raises(DataError) as err:
        read_canonical_table(path, "products")
    assert (err.value.row, err.value.field) == (3, "product_id")


def test_empty_file_and_header_only(tmp_path):
    for text in ("", "product_id,title\n"):
        path = write_csv(tmp_path / "p.csv", text)
        with pytest.raises(DataError) as err:
            read_canonical_table(path, "products")
        assert err.value.file == path


def test_wrong_encoding_names_row(tmp_path):
    path = write_csv(tmp_path / "p.csv", "product_id,title\np1,plain\np2,café crème\n", encoding="latin-1")
    with pytest.raises(DataError) as err:
        read_canonical_table(path, "products")
    assert err.value.row == 2 and "UTF-8" in str(err.value)


def test_blank_required_value(tmp_path):
    path = write_csv(tmp_path / "q.csv", "query_id,text\nq1,shoes\nq2,  \n")
    with pytest.raises(DataError) as err:
        read_canonical_table(path, "queries")
    assert (err.value.row, err.value.field) == (2, "text")


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query_id": "q1", "text": "a"}\n{"query_id": "q2", "text": \n')
    with pytest.raises(DataError) as err:
        read_canonical_table(str(path), "queries")
    assert err.value.row == 2


def test_float_ids_are_not_silently_changed():
    table = pa.table({"product_id": [1.0, 2.5], "title": ["a", "b"]})
    with pytest.raises(DataError) as err:
        conform(table, "products", "x.parquet")
    assert (err.value.row, err.value.field) == (2, "product_id")


def test_generic_mapping(tmp_path):
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(json.dumps({"sku": f"s{i}", "name": f"thing {i}"}) for i in range(3)))
    tables = import_generic({"products": str(path)}, {"products": {"product_id": "sku", "title": "name"}})
    assert tables["products"].column("product_id").to_pylist() == ["s0", "s1", "s2"]


def test_canonical_folder_round_trip(tmp_path):
    pq.write_table(pa.table({"product_id": ["p1", "p2"], "title": ["a", "b"]}), tmp_path / "products.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["a"], "split": ["test"]}), tmp_path / "queries.parquet")
    pq.write_table(
        pa.table({"query_id": ["q1"], "product_id": ["p1"], "grade": [2], "source": ["human"]}), tmp_path / "judgments.parquet"
    )
    tables = import_canonical(str(tmp_path))
    assert set(tables) == {"products", "queries", "judgments"}


def test_esci_layout(tmp_path):
    pq.write_table(
        pa.table(
            {
                "example_id": [0, 1, 2],
                "query": ["red shoe", "red shoe", "lamp"],
                "query_id": [7, 7, 9],
                "product_id": ["B1", "B2", "B1"],
                "product_locale": ["us", "us", "us"],
                "esci_label": ["E", "C", "I"],
                "split": ["train", "train", "test"],
            }
        ),
        tmp_path / "shopping_queries_dataset_examples.parquet",
    )
    pq.write_table(
        pa.table({"product_id": ["B1", "B2"], "product_title": ["Red shoe", "Shoe polish"], "product_locale": ["us", "us"]}),
        tmp_path / "shopping_queries_dataset_products.parquet",
    )
    tables = import_esci(str(tmp_path))
    assert tables["judgments"].column("grade").to_pylist() == [2, 1, 0]
    assert tables["judgments"].column("product_id").to_pylist() == ["us:B1", "us:B2", "us:B1"]
    assert dict(zip(tables["queries"].column("query_id").to_pylist(), tables["queries"].column("split").to_pylist()))["9"] == "test"


def test_wands_layout_and_unknown_label(tmp_path):
    (tmp_path / "product.csv").write_text("product_id\tproduct_name\tproduct_class\n1\tgray sofa\tSofas\n2\tlamp\tLamps\n")
    (tmp_path / "query.csv").write_text("query_id\tquery\tquery_class\n0\tsofa\tSofas\n")
    (tmp_path / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n0\t0\t1\tExact\n1\t0\t2\tIrrelevant\n")
    tables = import_wands(str(tmp_path))
    assert tables["judgments"].column("grade").to_pylist() == [2, 0]
    (tmp_path / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n0\t0\t1\tExact\n1\t0\t2\tMaybe\n")
    with pytest.raises(DataError) as err:
        import_wands(str(tmp_path))
    assert (err.value.row, err.value.field) == (2, "label")


def test_homedepot_import(homedepot):
    tables = import_homedepot(str(homedepot))
    assert tables["products"].num_rows == 54_667
    assert tables["judgments"].num_rows == 63_002
    splits = tables["queries"].column("split").to_pylist()
    assert (splits.count("train"), splits.count("dev"), splits.count("test")) == (7_978, 1_010, 1_014)


def test_cli_import_writes_nothing_on_bad_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"product_id": ["p1"], "title": ["a"]}), src / "products.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["a"]}), src / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "product_id": ["p9"], "grade": [2], "source": ["human"]}), src / "judgments.parquet")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mr_ray.cli", "data", "import", "--source", "canonical", "--path", str(src), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0
    assert "p9" in result.stderr and "product_id" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    pq.write_table(pa.table({"query_id": ["q1"], "product_id": ["p1"], "grade": [2], "source": ["human"]}), src / "judgments.parquet")
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out / "judgments").num_rows == 1
