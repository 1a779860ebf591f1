"""Crash-safe replacement of a model folder, and recovery of the folders a killed export leaves.

An export writes into `.NAME.partial-PID` beside NAME and `replace` moves it into place: an old
NAME is renamed to `.NAME.old-PID`, the new folder renamed to NAME, then the old one removed. A
process killed at any point leaves NAME complete (old or new), or missing with a complete
`.NAME.old-PID` beside it; `recover` (run by `generate --model NAME`) and `sweep` (run by the next
export into the same parent) rename such an old folder back and remove the temp folders of
processes that are gone. It lives in the engine because the engine recovers a folder before
loading it and must not import the exporter.

Ours to touch is only a real directory whose name matches `.NAME.partial-PID` / `.NAME.old-PID`
exactly, whose process is not alive on this machine, and which holds MARKER, a manifest.json, or
nothing. A temp folder is marked before it is filled or emptied, so it stays recognisable at
every point of its life.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from .contract import MANIFEST_FILE

log = logging.getLogger(__name__)

MARKER = ".gpt2-onnx-temp"  # in a folder being written or removed: never a model, always disposable
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>[1-9][0-9]{0,9})")

# The named points of an export, in order; `fault_point` is called at each one.
STEPS = (
    "tmp-created", "weights-written", "checked", "manifest-written", "sealed",
    "old-moved-aside", "new-renamed-in", "half-removed",
)  # fmt: skip


def fault_point(step: str) -> None:
    """Called at each of STEPS. Does nothing; the crash tests replace it to kill the export there."""


def partial_folder(out: Path) -> Path:
    """Create and mark this process's temp folder for `out` (removing a stale one of a dead
    process that had our PID). Raises FileExistsError if that name holds something not ours."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if os.path.lexists(tmp):
        if not _is_ours(tmp):
            raise FileExistsError(f"{tmp} is in the way and is not a gpt2-onnx temp folder; move it away")
        discard(tmp)
    tmp.mkdir()
    try:  # an interrupt before the caller holds `tmp` must not leave it behind
        (tmp / MARKER).write_bytes(b"")
        fault_point("tmp-created")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def seal(tmp: Path) -> None:
    """Mark a filled temp folder complete (its manifest, written last, now identifies it) once
    its files are on disk: a power cut after the rename must not leave a model of empty files."""
    _fsync_tree(tmp)
    (tmp / MARKER).unlink()
    fault_point("sealed")


def replace(tmp: Path, out: Path) -> None:
    """Move the sealed folder `tmp` to `out`. Whatever interrupts this (an exception, a signal
    turned into one) leaves `out` old or new; a kill leaves what `recover` puts back."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if os.path.lexists(old):
        _restore_or_discard(old, out)  # left by a dead process that had our PID
    try:
        if os.path.lexists(out):
            out.rename(old)
            fault_point("old-moved-aside")
        tmp.rename(out)
        _fsync_dir(out.parent)
        fault_point("new-renamed-in")
    except BaseException:
        _restore_or_discard(old, out)
        raise
    if os.path.lexists(old):
        discard(old)


def discard(folder: Path) -> None:
    """Remove one of our temp folders. The marker goes in first and out last, so a removal that
    is killed halfway leaves a folder that is still recognisably ours."""
    (folder / MARKER).write_bytes(b"")
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    fault_point("half-removed")
    (folder / MARKER).unlink()
    folder.rmdir()


def recover(out: Path) -> None:
    """Put back `out` if a killed `export --force` left it only as `.NAME.old-PID`, and drop old
    folders of dead processes beside a complete `out`. Writes nothing when there is nothing to do."""
    _clean(out.parent, out.name)


def sweep(parent: Path) -> None:
    """Recover every output in `parent` and remove the temp folders of dead processes."""
    _clean(parent, None)


def _clean(parent: Path, only: str | None) -> None:
    """The work of `recover` (old folders of output `only`) and `sweep` (all, when `only` is None).
    A folder that cannot be handled is logged and left: the command goes on."""
    for path, match in _dead_temp_folders(parent):
        if only is not None and (match["kind"], match["name"]) != ("old", only):
            continue
        try:
            if match["kind"] == "old":
                _restore_or_discard(path, parent / match["name"])
            else:
                log.info("removing %s, left by an export that was killed", path)
                discard(path)
        except FileNotFoundError:
            continue  # another process recovered or removed it first
        except OSError as e:
            log.warning("could not clean up %s (%s); remove it by hand", path, e)


def _restore_or_discard(old: Path, out: Path) -> None:
    """The old folder back to `out` if `out` is missing; removed if `out` is a model folder."""
    if not os.path.lexists(old):
        return
    if not os.path.lexists(out) and not (old / MARKER).exists():
        old.rename(out)
        log.info("restored %s from %s (an export that was replacing it was interrupted)", out, old.name)
    elif (out / MANIFEST_FILE).is_file() or (old / MARKER).exists():
        discard(old)
    else:
        log.warning("left %s alone: %s exists and is not a model folder", old, out)


def _dead_temp_folders(parent: Path) -> list[tuple[Path, re.Match]]:
    """Our temp folders in `parent` whose process is gone, sorted by name."""
    try:
        entries = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []  # no folder we could have written into, so nothing of ours to recover
    found = []
    for path in entries:
        match = _TEMP_NAME.fullmatch(path.name)
        if match and not _alive(int(match["pid"])) and _is_ours(path):
            found.append((path, match))
    return found


def _is_ours(path: Path) -> bool:
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        return (path / MARKER).is_file() or (path / MANIFEST_FILE).is_file() or not any(path.iterdir())
    except PermissionError:
        return False  # a folder we cannot read is not one we wrote


def _alive(pid: int) -> bool:
    """Whether `pid` runs on this machine (a zombie counts as alive until it is waited for)."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it; on Windows nothing is swept
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return True  # no such PID can exist: not a name we made, leave it alone
    return True


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
