"""Safe placement of an output folder: nothing of the user's is ever deleted.

An output is written into a temporary sibling (`.tmp-<name>-<hex>`) and renamed
into place when complete. The rename replaces only an empty folder or a
previous output of the same kind, recognised by its manifest (`kind`, or
`stage` for a pipeline stage's folder). Every other target is refused, with
one line saying why, before any work starts: the working folder or one of its
parents, a symlink, a file, a folder holding anything else, and the input or a
folder holding it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


class OutputRefused(ValueError):
    """An output path that writing there would destroy something; the message says what."""


def output_kind(folder: Path) -> str | None:
    """The kind a previous output's manifest declares, or None if the folder holds no manifest of ours."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict):
        return None
    return manifest.get("kind", manifest.get("stage"))


def check_target(out: Path, kind: str, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output path whose replacement would lose anything but a previous `kind` output."""
    target = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise OutputRefused(f"output folder {out}: refusing to replace the working folder{'' if target == cwd else ' or a folder holding it'}")
    if target.is_symlink():
        raise OutputRefused(f"output folder {out}: is a symlink; give the real folder")
    for given in inputs:
        if "://" in str(given):
            continue
        source = Path(os.path.abspath(given))
        # realpath too: a symlinked input inside the target must not be replaced either.
        if any(target == s or target in s.parents for s in {source, Path(os.path.realpath(given))}):
            raise OutputRefused(f"output folder {out}: is the input {given} or a folder holding it")
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputRefused(f"output folder {out}: is a file, not a folder")
    if not any(target.iterdir()):
        return
    found = output_kind(target)
    if found != kind:
        what = f"a {found!r} output" if found else "other files"
        raise OutputRefused(f"output folder {out}: holds {what}, not a previous {kind!r} output; give a new or empty folder")


def temp_sibling(out: Path, name: str | None = None) -> Path:
    return out.parent / f"{TEMP_PREFIX}{name or out.name}-{uuid.uuid4().hex[:8]}"


def replace_with(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, moving a previous output aside first and deleting it last."""
    old = out.parent / f"{OLD_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def placed_output(out: Path, kind: str, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder to fill (manifest included); on success it becomes `out`.

    The target is checked before the work and again before the rename (something may
    have appeared there meanwhile). On any error the temporary folder is removed and
    `out` is untouched.
    """
    inputs = list(inputs)
    check_target(out, kind, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        check_target(out, kind, inputs)
        replace_with(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
