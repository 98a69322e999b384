"""fedlora's user cache: files built once per machine (the dequantised SmolLM2, generated arithmetic), shared by
parallel processes.

The cache lives in ``$FEDLORA_CACHE`` when set, else ``$XDG_CACHE_HOME/fedlora``, else ``~/.cache/fedlora``.
:func:`build_once` builds an entry under a file lock into a temporary sibling and renames it into place, so a
process either finds a complete entry or builds it while every other process waits; a crash mid-build leaves no
partial entry behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    """The cache root (created on first use)."""
    root = os.environ.get("FEDLORA_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "fedlora") if xdg else str(Path.home() / ".cache" / "fedlora")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` (a file or directory in the cache), built by ``build(tmp)`` if it does not exist yet.

    ``build`` writes the entry at the path it is given; it is renamed to ``target`` only once ``build`` returned.
    Parallel callers wait on ``target.lock`` and find the finished entry.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():  # built by another process while this one waited
            return target
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        _remove(tmp)
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
