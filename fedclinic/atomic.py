"""Atomic file writes: a file is replaced whole or not at all, whenever the writer is killed.

    with atomic_file(path, "w") as f:     # ledgers, checkpoints, kept replies, results.json
        json.dump(value, f)

The new content goes to a temporary file beside `path` (same directory, so the
same file system), is flushed and fsynced, then moved over `path` with
os.replace, which is atomic on POSIX. An interrupted write leaves the old file
(or none) and no temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file object to write `path` through (mode "wb" or "w"); `path` changes only when the block ends."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        # mkstemp's file is private (0600): give it the old file's permissions, or a new file's
        os.chmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
