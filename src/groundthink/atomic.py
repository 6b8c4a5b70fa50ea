"""Atomic file writes: write a temporary file in the target's folder, fsync, then rename.

A reader therefore sees either the old file or the complete new one, never a
truncated file, even if the writer crashes midway.

`tempfile.mkstemp` and `tempfile.mkdtemp` create private entries (modes 0600 and
0700). The helpers here widen them to what `open(path, "w")` and `mkdir` give,
0666 and 0777 minus the process umask, so run folders can be shared.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

FILE_MODE = 0o666
DIR_MODE = 0o777


def current_umask() -> int:
    """Return the process umask.

    Linux reports it in /proc/self/status; elsewhere it is read by setting it and
    restoring it, which briefly changes it for other threads.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_file_mode(path: Path) -> None:
    """Give the file at `path` the mode `open(path, "w")` gives a new file: 0666 minus the umask."""
    os.chmod(path, FILE_MODE & ~current_umask())


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """Create a new, uniquely named folder in `parent` with the mode `mkdir` would give it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, DIR_MODE & ~current_umask())
    return path


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary binary file beside `path`, fsync it and rename it to `path`.

    The file gets the mode `open(path, "w")` would give a new file: 0666 minus the umask.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
