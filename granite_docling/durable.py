"""Folders that appear whole or not at all, and stay whole through a crash, a SIGKILL or a power cut.

A writer fills a temporary sibling folder, then :func:`publish` flushes every file and folder in it to the disk
(``fsync``), renames it into place and flushes the parent folder, so that the rename itself is on the disk: the
order PyTorch's distributed checkpoint and NeMo use. Without the flushes, a power cut after the rename can leave
a folder that looks complete and holds empty or truncated files. Checkpoints and the data index are written so.

:func:`describe_write_error` turns what a failed write raised into the words a user needs (the disk is full,
permission denied), whichever library raised it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the names created, renamed or removed in it) to the disk."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then every folder, deepest first."""
    folders = []
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        folders.append(Path(root))
    for path in reversed(folders):
        fsync_dir(path)


def publish(tmp: Path, final: Path) -> None:
    """Make the finished temporary folder ``tmp`` the folder ``final``, durably.

    An existing ``final`` is renamed aside first and removed only after the new one is in place, so that one
    complete copy is on the disk at every moment.
    """
    fsync_tree(tmp)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover of a killed process that had this pid
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_sizes(folder: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``folder``."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()
    }


def size_mismatches(folder: Path, expected: dict[str, int]) -> list[str]:
    """The files of ``expected`` that are missing from ``folder`` or have another size."""
    wrong = []
    for name, size in expected.items():
        path = folder / name
        if not path.is_file():
            wrong.append(f"{name} is missing")
        elif path.stat().st_size != size:
            wrong.append(f"{name} has {path.stat().st_size} bytes instead of {size}")
    return wrong


def describe_write_error(error: BaseException, folder: Path) -> str:
    """What went wrong writing into ``folder``, in a user's words: the OS error behind ``error`` if there is
    one (safetensors and torch report a full disk in their own words, or not at all), and the free space when
    it is low."""
    cause = _os_error_in(error)
    if cause is not None and cause.errno is not None:
        code = cause.errno
        reason = os.strerror(code)
    else:
        code = errno.ENOSPC if "No space left on device" in str(error) else None
        reason = os.strerror(code) if code else (str(error).strip().splitlines() or [type(error).__name__])[0]
    free = _free_bytes(folder)
    if free is not None and (code == errno.ENOSPC or free < 64 * 2**20):
        reason += f" ({free / 2**20:.0f} MiB free on the disk of {folder.parent})"
    return reason


def _os_error_in(error: BaseException | None) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None
