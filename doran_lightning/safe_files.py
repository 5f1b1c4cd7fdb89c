"""File-safety helpers: atomic writes (temporary file, fsync, rename), the umask, durable renames.

Plain Python (no torch, no Lightning): adapter files (`adapters.io`), checkpoints (`checkpointing`) and
output folders (`outputs`) are all written through them, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_TEMP_TAG = f"{socket.gethostname()}-"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of earlier saves of `path` on this host whose process is gone (kill -9)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(_TEMP_TAG)}*.tmp"):
        pid = stale.name[len(f".{path.name}.{_TEMP_TAG}"):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(temporary_path)`, fsync, rename over `path`, fsync the folder: a crash never leaves a half-written file.

    The file gets the mode a plain `open()` would give (0666 minus the umask), and temporary files left by an
    earlier save of `path` that was killed are removed first (they name their host and process id).
    """
    _remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_TEMP_TAG}{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)  # atomic on POSIX and Windows within one file system
        fsync_directory(path.parent)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
