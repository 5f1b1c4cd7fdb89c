"""File-safety helpers: atomic writes (temporary file, fsync, rename), the umask, durable renames.

Plain Python (no torch, no Lightning): adapter files (`adapters.io`), checkpoints (`checkpointing`) and
output folders (`outputs`) are all written through them, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError


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


def host_tag() -> str:
    """This host's name as it appears in temporary and staging names (letters, digits and '-' only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


_TEMP_TAG = f"{host_tag()}-"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of earlier saves of `path` on this host whose process is gone (kill -9)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(_TEMP_TAG)}*.tmp"):
        pid = stale.name[len(f".{path.name}.{_TEMP_TAG}"):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as running)."""
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
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_TEMP_TAG}{os.getpid()}.",
                                             suffix=".tmp")
    except OSError as error:  # read-only file system, no permission, missing folder
        raise WriteError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)  # atomic on POSIX and Windows within one file system
        fsync_directory(path.parent)
    except (OSError, RuntimeError, SafetensorError) as error:
        # torch.save and safetensors report a full disk as RuntimeError ("basic_ios::clear") / SafetensorError.
        raise WriteError(f"cannot write {path}: {write_failure(path.parent, error)}; the previous file, if any, "
                         "is unchanged") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class WriteError(OSError):
    """A file could not be written (disk full, read-only, permission); the message names the path and the cause."""


def write_failure(folder: Path, error: BaseException) -> str:
    """A short cause for a failed write: the OS's reason, or "no space left" when the disk is (nearly) full."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:
            return "no space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else 'no detail'}"


def error_text(error: BaseException) -> str:
    """One line for a user: an OS error as "<path>: <reason>" (read-only, no space, not a folder) when it names a
    path, else the error's message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:  # raised by a writer that does not name its file
        return (f"{error.strerror or 'No space left on device'}: the disk holding the run folder is full; free space "
                "or choose another --trainer.default_root_dir (checkpoints written before are intact)")
    return str(error)
