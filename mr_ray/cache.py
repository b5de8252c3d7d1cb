"""The cache of content-addressed work shared across stages and runs (catalog embeddings, the `st-mnrl`
baseline): where it lives, and how an entry is placed so a killed run never leaves a half-written one."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def cache_root() -> Path:
    """$MR_RAY_CACHE, else ~/.cache/mr-ray."""
    return Path(os.environ.get("MR_RAY_CACHE") or Path.home() / ".cache" / "mr-ray").resolve()


@contextmanager
def cache_entry(folder: Path, is_complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary sibling of `folder` to fill; when the block ends without error it is renamed to
    `folder`. The key is the content, so a complete entry another process placed meanwhile is kept as it is;
    one that `is_complete` rejects (damaged) is replaced. The temporary folder goes in every case."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = folder.parent / f".tmp-{folder.name}-{tag}", folder.parent / f".old-{folder.name}-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if folder.is_dir() and not is_complete(folder):
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
