"""Issue 14's bad inputs: each is read correctly, or refused naming the file, the row the user counts
(data row, 1-based, after the header) and the field. Small files each test writes itself."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mr_ray.config import ConfigError, load_config
from mr_ray.data.importers import (
    check_references,
    import_canonical,
    import_esci,
    import_homedepot,
    read_canonical_table,
)
from mr_ray.schema import DataError


def write(path, data: str | bytes):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def refusal(call, *args) -> DataError:
    with pytest.raises(DataError) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return err.value


def write_jsonl(path, rows):
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


# --- the byte-order mark, ids as text, JSON-lines columns -------------------------------------------------


def test_bom_keeps_ids_as_text(tmp_path):
    path = write(tmp_path / "products.csv", b"\xef\xbb\xbfproduct_id,title\n0042,lamp\n007,a\n10,b\n010,c\n")
    table = read_canonical_table(path, "products")
    assert table.column_names[0] == "product_id"
    assert table.column("product_id").to_pylist() == ["0042", "007", "10", "010"]


def test_bom_in_jsonl(tmp_path):
    path = write(tmp_path / "queries.jsonl", b'\xef\xbb\xbf{"query_id": "q1", "text": "lamp"}\n')
    assert read_canonical_table(path, "queries").column("query_id").to_pylist() == ["q1"]


def test_jsonl_takes_every_rows_keys(tmp_path):
    path = write_jsonl(tmp_path / "products.jsonl", [{"product_id": "p1", "title": "a"}, {"product_id": "p2", "title": "b", "brand": "acme"}])
    assert read_canonical_table(path, "products").column("brand").to_pylist() == [None, "acme"]
    path = write_jsonl(tmp_path / "queries.jsonl", [{"query_id": "q1", "text": "a"}, {"query_id": "q2", "text": "b", "split": "test"}])
    assert read_canonical_table(path, "queries").column("split").to_pylist() == [None, "test"]


def test_jsonl_ids_of_mixed_types_are_text(tmp_path):
    path = write(tmp_path / "products.jsonl", '{"product_id": 1, "title": "a"}\n{"product_id": "x7", "title": "b"}\n{"product_id": 1e20, "title": "c"}\n')
    assert read_canonical_table(path, "products").column("product_id").to_pylist() == ["1", "x7", "1e20"]


def test_jsonl_object_title_names_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "products.jsonl", [{"product_id": "p1", "title": "a"}, {"product_id": "p2", "title": {"en": "b"}}])
    err = refusal(read_canonical_table, path, "products")
    assert (err.file, err.row, err.field) == (path, 2, "title") and "object" in str(err)


# --- folders, ESCI, Home Depot ------------------------------------------------------------------------


def test_folder_with_two_forms_of_a_table_is_refused(tmp_path):
    pq.write_table(pa.table({"product_id": ["p1"], "title": ["a"]}), tmp_path / "products.parquet")
    write(tmp_path / "products.csv", "product_id,title\np2,b\n")
    err = refusal(import_canonical, str(tmp_path))
    assert err.file == str(tmp_path) and "products.parquet" in str(err) and "products.csv" in str(err)


def test_esci_query_with_two_texts_is_refused(tmp_path):
    pq.write_table(
        pa.table(
            {
                "query_id": [7, 7, 9],
                "query": ["red shoe", "blue shoe", "lamp"],
                "product_id": ["B1", "B2", "B1"],
                "product_locale": ["us"] * 3,
                "esci_label": ["E", "E", "I"],
            }
        ),
        tmp_path / "shopping_queries_dataset_examples.parquet",
    )
    pq.write_table(
        pa.table({"product_id": ["B1", "B2"], "product_title": ["a", "b"], "product_locale": ["us", "us"]}),
        tmp_path / "shopping_queries_dataset_products.parquet",
    )
    err = refusal(import_esci, str(tmp_path))
    assert (err.row, err.field) == (2, "query") and err.file.endswith("examples.parquet")
    assert "'blue shoe'" in str(err) and "'red shoe' at row 1" in str(err)


def test_homedepot_judgments_without_product_id(tmp_path):
    pq.write_table(pa.table({"product_id": ["1"], "title": ["a"]}), tmp_path / "products.parquet")
    pq.write_table(pa.table({"query_id": ["1"], "text": ["a"]}), tmp_path / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["1"], "rating_mean": [3.0]}), tmp_path / "judgments.parquet")
    err = refusal(import_homedepot, str(tmp_path))
    assert (err.file, err.field) == (str(tmp_path / "judgments.parquet"), "product_id")


# --- values that used to escape as raw exceptions -------------------------------------------------------


def test_invalid_utf8_in_a_parquet_string_column(tmp_path):
    text = pa.array([b"ok", b"ok", b"caf\xe9"], pa.binary())
    titles = pa.Array.from_buffers(pa.string(), 3, text.buffers())  # Arrow does not check; some writers do not either
    path = str(tmp_path / "products.parquet")
    pq.write_table(pa.table({"product_id": ["p1", "p2", "p3"], "title": titles}), path)
    err = refusal(read_canonical_table, path, "products")
    assert (err.file, err.row, err.field) == (path, 3, "title") and "UTF-8" in str(err)


@pytest.mark.parametrize("bad, words", [(float("nan"), "NaN"), (1e20, "too large")])
def test_float_ids_nan_or_huge(tmp_path, bad, words):
    path = str(tmp_path / "products.parquet")
    pq.write_table(pa.table({"product_id": [1.0, 2.0, bad], "title": ["a", "b", "c"]}), path)
    err = refusal(read_canonical_table, path, "products")
    assert (err.file, err.row, err.field) == (path, 3, "product_id") and words in str(err)


def test_duplicated_csv_header(tmp_path):
    path = write(tmp_path / "products.csv", "product_id,title,title\np1,a,b\n")
    err = refusal(read_canonical_table, path, "products")
    assert (err.file, err.field) == (path, "title") and "twice" in str(err)


def test_long_csv_row_is_read(tmp_path):
    title = "x" * (3 << 20)  # over pyarrow's 1 MiB block: "straddling object" before
    path = write(tmp_path / "products.csv", f"product_id,title\np1,short\np2,{title}\n")
    assert read_canonical_table(path, "products").column("title").to_pylist()[1] == title


# --- where an error is -----------------------------------------------------------------------------------


def test_utf8_error_counts_records_not_lines(tmp_path):
    path = write(tmp_path / "products.csv", b'product_id,title\np1,"two\nlines"\np2,plain\np3,caf\xe9\n')
    err = refusal(read_canonical_table, path, "products")
    assert (err.file, err.row, err.field) == (path, 3, "title") and "0xe9" in str(err)


def test_utf8_error_in_the_header(tmp_path):
    path = write(tmp_path / "products.csv", b"product_id,titl\xe9\np1,a\n")
    err = refusal(read_canonical_table, path, "products")
    assert err.row is None and "header" in str(err) and "row 0" not in str(err)


def test_wrong_field_count_names_the_record(tmp_path):
    path = write(tmp_path / "products.csv", 'product_id,title\np1,"a\nb"\np2,b,extra\n')
    err = refusal(read_canonical_table, path, "products")
    assert (err.file, err.row) == (path, 2)


def test_duplicate_across_files_names_the_file_and_its_row(tmp_path):
    folder = tmp_path / "products"
    folder.mkdir()
    write(folder / "part-0.csv", "product_id,title\np1,a\np2,b\n")
    write(folder / "part-1.csv", "product_id,title\np3,c\np2,d\n")
    err = refusal(read_canonical_table, str(folder), "products")
    assert (err.file, err.row, err.field) == (str(folder / "part-1.csv"), 2, "product_id")
    assert f"first at file {folder / 'part-0.csv'}, row 2" in str(err)


def test_reference_error_names_the_table_file_and_row(tmp_path):
    write(tmp_path / "products.csv", "product_id,title\np1,a\n")
    write(tmp_path / "queries.csv", "query_id,text\nq1,a\n")
    judgments = tmp_path / "judgments"
    judgments.mkdir()
    write(judgments / "a.csv", "query_id,product_id,grade,source\nq1,p1,2,human\n")
    write(judgments / "b.csv", "query_id,product_id,grade,source\nq1,p1,1,llm\nq9,p1,1,human\n")
    err = refusal(check_references, import_canonical(str(tmp_path)), str(tmp_path))
    assert (err.file, err.row, err.field) == (str(judgments / "b.csv"), 2, "query_id")
    assert "not in the queries table" in str(err)


# --- lesser: misspelt columns, impossible values ---------------------------------------------------------


def test_misspelt_optional_column_is_refused(tmp_path):
    path = write(tmp_path / "products.csv", "product_id,title,colour\np1,a,red\n")
    err = refusal(read_canonical_table, path, "products")
    assert err.field == "colour" and "'color'" in str(err)


def test_unrelated_extra_column_is_named_in_a_warning(tmp_path, caplog):
    path = write(tmp_path / "products.csv", "product_id,title,price\np1,a,9.99\n")
    with caplog.at_level(logging.WARNING, logger="mr_ray.schema"):
        table = read_canonical_table(path, "products")
    assert "price" not in table.column_names
    assert "price" in caplog.text and path in caplog.text


def test_clicks_above_impressions(tmp_path):
    path = write(tmp_path / "engagement.csv", "query_id,product_id,impressions,clicks,add_to_cart,orders\nq1,p1,10,2,0,0\nq1,p2,3,5,0,0\n")
    err = refusal(read_canonical_table, path, "engagement")
    assert (err.row, err.field) == (2, "clicks")


def test_confidence_outside_zero_one(tmp_path):
    path = write(tmp_path / "judgments.csv", "query_id,product_id,grade,source,confidence\nq1,p1,2,llm,0.9\nq1,p2,1,llm,7.5\n")
    err = refusal(read_canonical_table, path, "judgments")
    assert (err.row, err.field) == (2, "confidence") and "7.5" in str(err)


def test_boolean_grades_are_refused(tmp_path):
    path = str(tmp_path / "judgments.parquet")
    pq.write_table(pa.table({"query_id": ["q1", "q1"], "product_id": ["p1", "p2"], "grade": [True, False], "source": ["human"] * 2}), path)
    err = refusal(read_canonical_table, path, "judgments")
    assert (err.file, err.field) == (path, "grade")
    path = write_jsonl(tmp_path / "judgments.jsonl", [{"query_id": "q1", "product_id": "p1", "grade": 2, "source": "human"}, {"query_id": "q1", "product_id": "p2", "grade": True, "source": "human"}])
    err = refusal(read_canonical_table, path, "judgments")
    assert (err.file, err.row, err.field) == (path, 2, "grade")



def test_judgment_sources_are_lower_cased_and_trimmed_or_refused(tmp_path):
    rows = [{"query_id": "q1", "product_id": f"p{i}", "grade": 2, "source": source} for i, source in enumerate(["Human", "human ", " LLM"])]
    table = read_canonical_table(write_jsonl(tmp_path / "judgments.jsonl", rows), "judgments")
    assert table.column("source").to_pylist() == ["human", "human", "llm"]  # every stage's `source == "human"` sees them
    path = write_jsonl(tmp_path / "typo.jsonl", rows + [{"query_id": "q1", "product_id": "p9", "grade": 1, "source": "humn"}])
    err = refusal(read_canonical_table, path, "judgments")
    assert (err.file, err.row, err.field) == (path, 4, "source")
    assert "unknown judgment source 'humn'; expected one of human, llm, audited, synthetic, mined, gold" in str(err)
    # the same pair graded by "Human" and "human" is one key, so a duplicate
    twice = write_jsonl(tmp_path / "twice.jsonl", [rows[0], {**rows[0], "source": "human"}])
    assert refusal(read_canonical_table, twice, "judgments").row == 2

# --- the config, before Ray starts -----------------------------------------------------------------------


def config_error(tmp_path, text: str | bytes) -> str:
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(path)
    return message


def test_duplicated_yaml_key(tmp_path):
    message = config_error(tmp_path, "stage1:\n  epochs: 3\nname: x\nstage1:\n  epochs: 1\n")
    assert "duplicate key 'stage1'" in message and "line 4" in message and "first at line 1" in message


def test_non_utf8_config(tmp_path):
    assert "line 2" in config_error(tmp_path, b"name: run\n# caf\xe9\n") and "UTF-8" in config_error(tmp_path, b"name: caf\xe9\n")


def test_data_source_mistakes(tmp_path):
    assert "needs data.path" in config_error(tmp_path, "data:\n  source: canonical\n")
    assert f"data.path {tmp_path}/nowhere does not exist" in config_error(tmp_path, f"data:\n  source: wands\n  path: {tmp_path}/nowhere\n")
    assert "data.files.products" in config_error(tmp_path, f"data:\n  source: generic\n  files:\n    products: {tmp_path}/p.csv\n")
    assert "stage1.judgment_sources.0" in config_error(tmp_path, "stage1:\n  judgment_sources: [humn]\n")
    # URIs are checked when read, by their own filesystem.
    assert load_config(write(tmp_path / "uri.yaml", "data:\n  source: canonical\n  path: s3://bucket/shop\n")).data.path == "s3://bucket/shop"


def test_an_empty_config_is_refused_not_read_as_the_defaults(tmp_path):
    assert "the config is empty" in config_error(tmp_path, "")
    assert "the config is empty" in config_error(tmp_path, "# only a comment\n")


def test_true_or_false_where_a_number_belongs_is_refused(tmp_path):
    assert config_error(tmp_path, "encoder:\n  batch_size: true\n").endswith("encoder.batch_size: expected a number or text, got true")
    assert "judge.finetune.epochs: expected a number or text, got false" in config_error(tmp_path, "judge:\n  finetune: {epochs: false}\n")
    assert "sweep.margins: expected a number or text, got true" in config_error(tmp_path, "sweep:\n  margins: [0.2, true]\n")
    # where a switch belongs, true and false are what it takes
    assert load_config(write(tmp_path / "ok.yaml", "evaluate: {hybrid: false}\nstage2: {keep_judged_grades: true}\n")).evaluate.hybrid is False


# --- issue 32: no silent change of input ------------------------------------------------------------------


def test_every_file_of_a_table_folder_is_read_or_the_import_refuses_naming_it(tmp_path):
    folder = tmp_path / "products"
    folder.mkdir()
    write(folder / "part-0.csv", "product_id,title\np1,drill\n")
    write(folder / "_SUCCESS", "")  # a writer's marker, not part of the table
    assert read_canonical_table(str(folder), "products").num_rows == 1
    write(folder / "part-1.csv.gz", "not read")
    err = refusal(read_canonical_table, str(folder), "products")
    assert err.file == str(folder / "part-1.csv.gz") and "cannot read (part-1.csv.gz)" in str(err)


def test_invalid_utf8_is_refused_whatever_the_parquet_encoding(tmp_path):
    bad = b"dr\xffill"
    for name, column in (
        ("dictionary", pa.array([b"saw", bad]).cast(pa.binary()).dictionary_encode()),
        ("binary", pa.array([b"saw", bad], pa.binary())),
    ):
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"product_id": ["p1", "p2"], "title": column}), path)
        err = refusal(read_canonical_table, path, "products")
        assert (err.file, err.row, err.field) == (path, 2, "title") and "not valid UTF-8 (byte 0xff)" in str(err), name


def test_a_parquet_title_of_structs_and_a_parquet_file_named_csv_are_one_line(tmp_path):
    path = str(tmp_path / "products.parquet")
    pq.write_table(pa.table({"product_id": ["p1"], "title": [{"en": "drill"}]}), path)
    err = refusal(read_canonical_table, path, "products")
    assert err.field == "title"
    disguised = tmp_path / "products.csv"
    disguised.write_bytes((tmp_path / "products.parquet").read_bytes())
    err = refusal(read_canonical_table, str(disguised), "products")
    assert "this is a Parquet file named .csv; rename it to .parquet" in str(err) and "\\x" not in str(err)


def test_a_json_object_with_a_key_twice_is_refused(tmp_path):
    path = write(tmp_path / "products.jsonl", '{"product_id": "p1", "title": "drill"}\n{"product_id": "p2", "title": "saw", "title": "hammer"}\n')
    err = refusal(read_canonical_table, path, "products")
    assert (err.row, err.field) == (2, "title") and "appears twice" in str(err)


def test_ids_are_trimmed_and_nfc_normalised_so_spellings_of_one_id_collide(tmp_path):
    path = write(tmp_path / "products.csv", "product_id,title\ncafe\u0301,drill\n p2 ,saw\n")
    assert read_canonical_table(path, "products").column("product_id").to_pylist() == ["caf\u00e9", "p2"]
    path = write(tmp_path / "twice.csv", "product_id,title\ncaf\u00e9,drill\ncafe\u0301 ,saw\n")
    err = refusal(read_canonical_table, path, "products")
    assert (err.row, err.field) == (2, "product_id") and "row 1" in str(err)


def test_canonical_queries_without_a_split_get_the_hash_split_and_a_warning(tmp_path, caplog):
    folder = tmp_path / "shop"
    folder.mkdir()
    write(folder / "products.csv", "product_id,title\np1,drill\n")
    write(folder / "queries.csv", "query_id,text\n" + "".join(f"q{i},drill {i}\n" for i in range(50)))
    write(folder / "judgments.csv", "query_id,product_id,grade,source\nq0,p1,2,human\n")
    with caplog.at_level(logging.WARNING):
        tables = import_canonical(str(folder))
    splits = tables["queries"].column("split").to_pylist()
    assert None not in splits and {"train", "dev", "test"} <= set(splits)
    assert "50 of 50 queries have no split" in caplog.text
