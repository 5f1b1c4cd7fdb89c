"""Output folders written all at once: `export --out` and `report --out`.

The folder is built under a temporary sibling name (`.<name>.<host>-<pid>.<random>.partial`) and
renamed into place when complete, so a crash leaves either the old folder or the new one, never a
mix (a stale `peft/` from an earlier export cannot survive next to a new `merged/`). A folder that
exists and is not empty is refused unless `overwrite` is set; it is then replaced as a whole.

Two more guarantees:
- an output never touches an input: `--out` equal to, inside or containing a folder or file the
  command reads (runs, a checkpoint, its run folder, and every path named in the parsed config:
  data files and roots, predict files, tokenizer and backbone folders — `config_inputs`) is refused
  before anything is written or deleted, with or without `overwrite`; outputs that only add files
  (fit's run folders, a sweep's folder, predictions) may contain inputs but never be one, nor lie inside
  a folder whose every entry is read as data (an ImageFolder split, a predict folder);
- the staging folder of a process that was killed (SIGKILL, node loss) is removed on the next write
  into the same parent folder, once its process is gone; one whose owner cannot be told (another
  host, an older name without the pid) is reported instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from doran_lightning.safe_files import current_umask, fsync_directory, host_tag, process_alive


class OutputExistsError(FileExistsError):
    """`--out` names a non-empty folder (or a file) and `--overwrite` was not given."""


class OutputOverlapError(ValueError):
    """`--out` is, contains or lies inside one of the command's inputs."""


# `.<name>.<host>-<pid>.<random>.partial` (or `.old`, the previous output while it is replaced).
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>partial|old)$")
_LEGACY_STAGING = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.partial$")


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.{host_tag()}-{os.getpid()}."


def check_output_folder(out: Path, overwrite: bool, flag: str = "--out", inputs: Iterable[Path | str] = ()) -> None:
    """Refuse an `out` overlapping an input, a file, or a non-empty folder unless `overwrite`; the message names the fix."""
    refuse_overlap(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{flag}={out} is a file, not a folder; choose a folder path")
    blocking = next((parent for parent in Path(out).absolute().parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise OutputExistsError(f"{flag}={out} cannot be made: {blocking} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{flag}={out} is not empty; pass --overwrite to replace it as a whole, "
                                "or choose another folder")


def refuse_overlap(out: Path, inputs: Iterable[Path | str], flag: str = "--out", adds_only: bool = False,
                   listed: Iterable[Path | str] = ()) -> None:
    """Raise `OutputOverlapError` when `out` is, contains or lies inside any of `inputs` (symlinks resolved).

    `adds_only`: the output only adds new files (a run folder, predictions): it may contain inputs or sit in a
    dataset's folder, but not be an input, nor lie inside one of the `listed` folders, whose every entry is read
    as data (an ImageFolder split, whose sub-folders are classes; a predict folder).
    """
    target = Path(out).expanduser().resolve()
    listed = [Path(folder).expanduser().resolve() for folder in listed]
    for given in [*inputs, *listed]:
        source = Path(given).expanduser().resolve()
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            if adds_only:
                continue
            relation = "contains"
        elif target.is_relative_to(source):
            if adds_only and source not in listed:
                continue
            relation = "lies inside"
        else:
            continue
        raise OutputOverlapError(f"{flag}={out} {relation} the input {given}; writing there could "
                                 f"{'mix new files into' if adds_only else 'delete'} what is being read — choose a "
                                 "folder outside it")


# Config keys whose values are written, not read (run folders, logger folders, `--out`).
OUTPUT_KEYS = frozenset({"default_root_dir", "out", "save_dir", "dirpath", "log_dir", "root_dir", "logger"})
# Config keys whose string values name files or folders even without a path separator ("data.root: vtab").
_PATH_KEY = re.compile(r"(file|files|root|dir|path|tokenizer|config)$")


def config_inputs(config: Any, key: str = "") -> list[Path]:
    """Every existing file or folder a parsed config names (resolved): data files and roots, predict files,
    tokenizer and backbone folders, checkpoints, config files — what an output must never touch.

    A string counts when its key is path-like (``train_file``, ``root``, ``checkpoint_path``, ``tokenizer``, …)
    or it holds a path separator, and it exists; the values under `OUTPUT_KEYS` are outputs and skipped.
    """
    if key in OUTPUT_KEYS:
        return []
    if isinstance(config, Mapping):
        return [path for name, value in config.items() for path in config_inputs(value, str(name))]
    if isinstance(config, (list, tuple)):
        return [path for value in config for path in config_inputs(value, key)]
    if isinstance(config, os.PathLike) or type(config).__name__ == "Path":  # jsonargparse's Path has no __fspath__
        config = str(config)
    if not isinstance(config, str) or not config or "\n" in config or len(config) > 4096:
        return []
    if not (_PATH_KEY.search(key) or os.sep in config or config.startswith(("~", "."))):
        return []
    with contextlib.suppress(OSError, ValueError):
        path = Path(config).expanduser()
        if path.exists():
            return [path.resolve()]
    return []


def clean_stale_staging(parent: Path) -> list[str]:
    """Remove `.partial` folders in `parent` left by dead processes of this host; describe the rest.

    Returns one note per folder removed or left in place (an `.old` folder may be the only copy of a
    previous output when its process died mid-replace, so it is reported, never removed).
    """
    notes: list[str] = []
    if not parent.is_dir():
        return notes
    host = host_tag()
    for entry in sorted(parent.iterdir()):
        if not entry.is_dir() or not entry.name.startswith("."):
            continue
        match = _STAGING.match(entry.name)
        if match is not None:
            if match["host"] != host or process_alive(int(match["pid"])):
                continue  # a write in progress (here or on another host sharing the folder)
            if match["kind"] == "partial":
                shutil.rmtree(entry, ignore_errors=True)
                notes.append(f"removed {entry}, the unfinished output of a process that no longer runs "
                             f"(pid {match['pid']})")
            else:
                notes.append(f"{entry} holds the previous {match['name']} of a process that died while replacing "
                             "it; move what you need out of it and delete it")
        elif _LEGACY_STAGING.match(entry.name):
            notes.append(f"{entry} looks like an unfinished output of an interrupted run; delete it if no "
                         "export/report is running")
    return notes


def _note_to_stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool, flag: str = "--out", inputs: Iterable[Path | str] = (),
                  note: Callable[[str], None] = _note_to_stderr) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; when the block succeeds it becomes `out`.

    On an exception the temporary folder is removed and `out` is left as it was. Stale staging
    folders in the parent are cleaned (or reported through `note`) first.
    """
    # Lexically normalised: with `held/../held` the staging folder's path would run through the folder that is
    # moved aside while it is replaced (issue 31: the rename then failed and left the old folder in `.old`).
    out = Path(os.path.abspath(out))
    inputs = list(inputs)
    check_output_folder(out, overwrite, flag, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    for message in clean_stale_staging(out.parent):
        note(message)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=_staging_prefix(out), suffix=".partial"))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp creates 0700
        yield staging
        check_output_folder(out, overwrite, flag, inputs)  # another process may have written it meanwhile
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_staging_prefix(out), suffix=".old"))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    fsync_directory(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
