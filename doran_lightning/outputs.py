"""Output folders written all at once: `export --out` and `report --out`.

The folder is built under a temporary sibling name (`.<name>.<random>.partial`) and renamed into place
when complete, so a crash leaves either the old folder or the new one, never a mix (a stale `peft/`
from an earlier export cannot survive next to a new `merged/`). A folder that exists and is not
empty is refused unless `overwrite` is set; it is then replaced as a whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from doran_lightning.safe_files import current_umask, fsync_directory


class OutputExistsError(FileExistsError):
    """`--out` names a non-empty folder (or a file) and `--overwrite` was not given."""


def check_output_folder(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a file, or a non-empty folder unless `overwrite`; the message names the fix."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{flag}={out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{flag}={out} is not empty; pass --overwrite to replace it as a whole, "
                                "or choose another folder")


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; when the block succeeds it becomes `out`.

    On an exception the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    check_output_folder(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp creates 0700
        yield staging
        check_output_folder(out, overwrite, flag)  # another process may have written it meanwhile
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    fsync_directory(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
