"""Atomic file writes, for every file the package writes in place (state files, progress, results).

A temporary file in the target's own folder (so the rename stays on one file system) is filled, fsynced and
renamed over the target, and the folder is fsynced: a crash at any point leaves either the old file or the new
one, never a torn one. A leaf module: anything may import it, it imports nothing of the package.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_temp_file(path: Path) -> str:
    """A new empty file next to `path`, created with the permissions an ordinary `open(path, "w")` would give
    (0666 less the umask; mkstemp's 0600 would make results unreadable to other users)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary file in the same folder, which is fsynced and
    renamed over `path`. A crash at any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    return atomic_write(path, write)
