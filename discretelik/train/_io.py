"""Atomic file writes (temp file in the destination directory, fsync, rename) and their debris."""

from __future__ import annotations

import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temporary file, then rename it to ``path``.

    A reader, or a run killed mid-write, sees either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the destination: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would (0666 less
        # the umask) so that other users and tools can read it as usual.
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # persist the rename itself; not possible (nor needed) on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files ``atomic_write(path, ...)`` leaves when killed mid-write.

    Call it at the start of a run, when no write to ``path`` is in progress: the files
    ``.<name>.*.tmp`` next to ``path`` are then debris of an earlier, interrupted process.

    Returns:
        The files removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
