"""The judge's optional base (all-mpnet-base-v2, installed from its PyPI parts), labeling a judge vLLM does not
serve, and the fine-tuned judge reused by content hash instead of trained again."""

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mr_ray import installed_models
from mr_ray.config import ConfigError, JudgeFinetuneConfig
from mr_ray.installed_models import INSTALLED_MARK, PartedModel
from mr_ray.labeler import cross_encoder, finetune
from mr_ray.labeler.judge import CrossEncoderJudge
from mr_ray.retriever.encoder import pretrained_model_path

MPNET = installed_models.models_dir() / "all-mpnet-base-v2"


def test_base_model_by_name_resolves_to_the_installed_folder_or_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(installed_models, "models_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="install it with: bash scripts/install_model.sh all-mpnet-base-v2$"):
        cross_encoder.base_model_folder("all-mpnet-base-v2")
    folder = tmp_path / "all-mpnet-base-v2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not installed"):  # unpacked, but not finished (no mark)
        cross_encoder.base_model_folder("all-mpnet-base-v2")
    (folder / INSTALLED_MARK).write_text("x\n")
    assert cross_encoder.base_model_folder("all-mpnet-base-v2") == folder
    assert cross_encoder.base_model_folder(None) == Path(pretrained_model_path())  # MiniLM stays the default
    assert cross_encoder.base_model_folder(str(folder)) == folder  # a folder path works as before
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        cross_encoder.base_model_folder(str(tmp_path / "nothing"))


def _parted_model(tmp_path: Path, parts: int = 3) -> tuple[PartedModel, list[Path]]:
    """A zip of a tiny model folder (with a stray desktop.ini), cut into `parts` files."""
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("tiny/config.json", '{"architectures": ["BertModel"]}')
        out.writestr("tiny/1_Pooling/config.json", "{}")
        out.writestr("tiny/desktop.ini", "[.ShellClassInfo]")
        out.writestr("tiny/model.safetensors", bytes(range(256)) * 64)
    data = archive.read_bytes()
    cut = np.linspace(0, len(data), parts + 1).astype(int)
    paths = []
    for i in range(parts):
        path = tmp_path / f"tiny.zip.{i + 1:03d}"
        path.write_bytes(data[cut[i] : cut[i + 1]])
        paths.append(path)
    model = PartedModel(packages=tuple(f"tiny-part-{i}" for i in range(parts)), part_file="tiny.zip.{number}",
                        zip_sha256=hashlib.sha256(data).hexdigest(), folder_in_zip="tiny")
    return model, paths


def test_install_joins_the_parts_in_order_checks_them_and_unpacks_once(tmp_path, monkeypatch):
    model, parts = _parted_model(tmp_path)
    models = tmp_path / "models"
    monkeypatch.setattr(installed_models, "models_dir", lambda: models)
    monkeypatch.setitem(installed_models.INSTALLABLE, "tiny", model)
    monkeypatch.setattr(installed_models, "part_paths", lambda name, m: list(parts))
    lines = []
    folder = installed_models.install("tiny", log=lines.append)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        INSTALLED_MARK, "1_Pooling/config.json", "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    assert installed_models.installed_model_folder("tiny") == folder
    # Idempotent: installed, it reads no part at all.
    monkeypatch.setattr(installed_models, "part_paths", lambda name, m: pytest.fail("joined again"))
    assert installed_models.install("tiny", log=lines.append) == folder and "is installed" in lines[-1]

    # Parts in the wrong order: the joined sha256 differs, nothing is placed and no temporary folder stays.
    monkeypatch.setitem(installed_models.INSTALLABLE, "swapped", model)
    monkeypatch.setattr(installed_models, "part_paths", lambda name, m: [parts[1], parts[0], parts[2]])
    with pytest.raises(ConfigError, match="the joined parts of swapped have sha256"):
        installed_models.install("swapped", log=lines.append)
    assert sorted(p.name for p in models.iterdir()) == ["tiny"]
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        installed_models.install("nope")
    assert installed_models.main(["nope"]) == 2


def test_part_of_a_missing_package_is_a_one_line_error():
    with pytest.raises(ConfigError, match="package no-such-part-001 is not installed; run: bash scripts/install_model.sh x"):
        installed_models.part_paths("x", PartedModel(("no-such-part-001",), "f.{number}", "0" * 64, "x"))


def _engine_rows(model_path: Path, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    strings = pd.DataFrame({"query_id": [f"q{i}" for i in range(len(pairs))], "product_id": [f"p{i}" for i in range(len(pairs))],
                            "variant": 0, "query": [q for q, _ in pairs], "product": [p for _, p in pairs]})
    return strings, cross_encoder.engine_rows(strings, model_path)


PAIRS = [("red running shoes", "Stridex red mesh running shoes ; brand: stridex"), ("drill", "Torqmax 20v cordless drill"),
         ("yoga mat pink 6mm thick", "Chefwell nonstick frying pan 10 inch")]


def _classifier_folder(base: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    cross_encoder.load_classifier(base, seed=0).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.model_max_length = 32
    tokenizer.save_pretrained(out)
    return out


def test_transformers_labeling_rows_match_the_reference_forward_with_token_types(tmp_path):
    """The labeling path for judges vLLM does not serve, checked on MiniLM, whose pair has token types."""
    model = _classifier_folder(Path(pretrained_model_path()), tmp_path / "minilm-judge")
    assert cross_encoder.vllm_serves(model)
    strings, rows = _engine_rows(model, PAIRS)
    scored = cross_encoder.TransformersClassifier(str(model), threads=1)(rows)
    reference = cross_encoder.probabilities_transformers(model, strings)
    np.testing.assert_allclose(np.exp(scored[["lp0", "lp1", "lp2"]].to_numpy()), reference, atol=1e-5)
    assert scored["query_id"].tolist() == ["q0", "q1", "q2"] and set(scored["error"]) == {""}


@pytest.mark.skipif(not (MPNET / INSTALLED_MARK).is_file(), reason="all-mpnet-base-v2 not installed (bash scripts/install_model.sh all-mpnet-base-v2)")
def test_installed_mpnet_is_a_judge_base_labelled_without_vllm(tmp_path):
    base = cross_encoder.base_model_folder("all-mpnet-base-v2")
    model = _classifier_folder(base, tmp_path / "mpnet-judge")
    assert json.loads((model / "config.json").read_text())["architectures"] == ["MPNetForSequenceClassification"]
    assert not cross_encoder.vllm_serves(model)  # vLLM has no MPNet: labeling takes the transformers actors
    strings, rows = _engine_rows(model, PAIRS)  # MPNet's tokenizer gives no token types
    assert (rows["type_start"] == rows["input_ids"].map(len)).all()
    scored = cross_encoder.TransformersClassifier(str(model), threads=2)(rows)
    np.testing.assert_allclose(np.exp(scored[["lp0", "lp1", "lp2"]].to_numpy()), cross_encoder.probabilities_transformers(model, strings), atol=1e-5)


def _examples():
    products = pd.DataFrame({"product_id": ["P0", "P1", "P2", "P3"],
                             "title": ["Stridex red running shoes", "Chefwell frying pan", "Torqmax cordless drill", "Stridex blue running shoes"]})
    queries = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "text": ["red running shoes", "frying pan", "cordless drill"]})
    grade = {("q0", "P0"): 2, ("q0", "P3"): 1, ("q1", "P1"): 2, ("q2", "P2"): 2}
    labels = pd.DataFrame([(q, p, grade.get((q, p), 0)) for q in queries["query_id"] for p in products["product_id"]],
                          columns=["query_id", "product_id", "grade"])
    return CrossEncoderJudge().examples(labels, queries, products, JudgeFinetuneConfig(soft_targets=False))


def test_finetune_key_follows_what_determines_the_model():
    examples, base = _examples(), Path(pretrained_model_path())
    cfg = JudgeFinetuneConfig(train_layers=1, batch_size=4, epochs=1)
    key = finetune.finetune_key("cross_encoder", base, examples, cfg)
    same = [finetune.finetune_key("cross_encoder", base, examples, cfg.model_copy(update=change))
            for change in ({"checkpoint_every": 3}, {"grade_offsets": True}, {"max_holdout": 50}, {"holdout_fraction": 0.3})]
    assert all(other == key for other in same)
    changed = [
        finetune.finetune_key("cross_encoder", base, examples, cfg.model_copy(update={"learning_rate": 1e-4})),
        finetune.finetune_key("cross_encoder", base, examples.iloc[1:], cfg),
        finetune.finetune_key("cross_encoder", base, examples.assign(grade=examples["grade"].iloc[::-1].to_numpy()), cfg),
        finetune.finetune_key("causal_lm", base, examples, cfg),
    ]
    assert all(other != key for other in changed)


class CountingJudge(CrossEncoderJudge):
    """The cross-encoder judge, counting its fine-tunes."""

    def __init__(self):
        self.trained = 0

    def finetune(self, examples, base, cfg, storage, out):
        self.trained += 1
        return super().finetune(examples, base, cfg, storage, out)


def test_a_second_run_reuses_the_cached_judge_instead_of_training(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("MR_RAY_CACHE", str(tmp_path / "cache"))
    judge, examples, base = CountingJudge(), _examples(), Path(pretrained_model_path())
    cfg = JudgeFinetuneConfig(train_layers=1, batch_size=6, learning_rate=5e-4, max_seq_length=32, epochs=1, checkpoint_every=2)
    lines = []
    first = finetune.cached_finetune(judge, examples, base, cfg, tmp_path / "run1" / "storage", tmp_path / "run1" / "model", log=lines.append)
    assert judge.trained == 1 and first["steps"] == 2 and first["judge_cache"]["reused"] is False and not lines
    # another run folder, the same inputs (checkpoint_every does not change the model): copied, not trained
    second = finetune.cached_finetune(judge, examples, base, cfg.model_copy(update={"checkpoint_every": 5}),
                                      tmp_path / "run2" / "storage", tmp_path / "run2" / "model", log=lines.append)
    assert judge.trained == 1 and second["judge_cache"] == {**first["judge_cache"], "reused": True}
    assert not (tmp_path / "run2" / "storage").exists() and "reusing the judge trained in" in lines[0]
    assert second["steps"] == first["steps"] and second["final_loss"] == first["final_loss"]
    run1, run2 = tmp_path / "run1" / "model", tmp_path / "run2" / "model"
    assert (run1 / "model.safetensors").read_bytes() == (run2 / "model.safetensors").read_bytes()
    np.testing.assert_array_equal(cross_encoder.probabilities_transformers(run1, examples), cross_encoder.probabilities_transformers(run2, examples))
    # the run's copy is its own: folding offsets into it leaves the cached judge as it was
    cross_encoder.fold_grade_offsets(run2, np.array([1.0, 0.0, -1.0]))
    cached = Path(first["judge_cache"]["entry"]) / "model" / "model.safetensors"
    assert cached.read_bytes() == (run1 / "model.safetensors").read_bytes()
