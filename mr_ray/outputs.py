"""Safe placement of an output folder: nothing of the user's is ever deleted.

An output is written into a temporary sibling (`.tmp-<name>-<hex>`) and renamed
into place when complete. The rename replaces only an empty folder or a
previous output of the same kind, recognised by its manifest (`kind`, or
`stage` for a pipeline stage's folder), whose `files` list every file the tool
wrote there: a file that is not on that list (the user's) makes the
replacement refuse. Every other target is refused, with one line saying why,
before any work starts: the working folder or one of its parents, a symlink, a
file, a folder holding anything else, and the input or a folder holding it.
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


def output_manifest(folder: Path) -> dict:
    """A previous output's manifest, or {} if the folder holds no manifest of ours."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def manifest_damage(folder: Path) -> str | None:
    """Why `folder`'s manifest cannot be read (truncated, not JSON, not an object), or None: none there, or sound."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as err:
        return f"not JSON: {err.msg} at line {err.lineno}"
    except OSError as err:
        return f"unreadable: {err.strerror}"
    return None if isinstance(manifest, dict) else "not a JSON object"


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
        if any(s.is_dir() and s in target.parents for s in {source, Path(os.path.realpath(given))}):
            raise OutputRefused(f"output folder {out}: is inside the input {given} (the next read of it would take the output in); give a folder outside it")
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputRefused(f"output folder {out}: is a file, not a folder")
    if not any(target.iterdir()):
        return
    manifest = output_manifest(target)
    found = manifest.get("kind", manifest.get("stage"))
    if found != kind:
        what = f"a {found!r} output" if found else "other files"
        raise OutputRefused(f"output folder {out}: holds {what}, not a previous {kind!r} output; give a new or empty folder")
    written = manifest.get("files")
    foreign = sorted(set(file_listing(target)) - set(written)) if written is not None else []
    if foreign:
        raise OutputRefused(
            f"output folder {out}: holds {len(foreign)} file(s) mr-ray did not write there ({', '.join(foreign[:3])}); "
            "move them out, or give a new or empty folder"
        )


def file_listing(folder: Path) -> dict[str, list[int]]:
    """Every file under `folder` but its manifest: {relative path: [size, mtime in ns]}."""
    return {
        str(path.relative_to(folder)): [stat.st_size, stat.st_mtime_ns]
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder) != Path(MANIFEST)
        for stat in (path.stat(),)
    }


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Write `folder`'s manifest with the list of every file written there (`files`): what a later
    replacement may remove, and what a rerun checks the output against. Returns the manifest written."""
    manifest = {**manifest, "files": file_listing(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def listing_changes(folder: Path, manifest: dict) -> str | None:
    """How `folder` differs from the files its manifest lists (missing, resized or rewritten), or None;
    None too for a manifest from before files were listed."""
    written = manifest.get("files")
    if written is None:
        return None
    now = file_listing(folder)
    missing = [name for name in written if name not in now]
    changed = [name for name in written if name in now and now[name] != written[name]]
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if changed:
        return f"{len(changed)} file(s) changed since written, e.g. {changed[0]}"
    return None


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
