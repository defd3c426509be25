"""Folders that appear whole or not at all, and stay whole through a crash, a SIGKILL or a power cut.

A writer fills a temporary sibling folder, then :func:`publish` flushes every file and folder in it to the disk
(``fsync``), renames it into place and flushes the parent folder, so that the rename itself is on the disk: the
order PyTorch's distributed checkpoint and NeMo use. Without the flushes, a power cut after the rename can leave
a folder that looks complete and holds empty or truncated files. Checkpoints and the data index are written so.

:func:`publish` also gives every file the mode the umask asks for (``0644`` under ``umask 022``): some writers
create their files with ``tempfile.mkstemp``, whose ``0600`` would keep a teammate on a shared disk from reading
them.

:func:`file_records` gives each file's size and content hash (xxHash's XXH3-128, several GB/s on one core; not
cryptographic: it finds damage, not forgery) for a manifest, and :func:`damaged_files` names the files that no
longer match it.

:func:`describe_write_error` turns what a failed write raised into the words a user needs (the disk is full,
permission denied), whichever library raised it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import xxhash

HASH = "xxh3_128"  # the name of the content hash in a manifest's file records
_CHUNK = 8 * 2**20  # bytes read per call while hashing


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
    follow_umask(tmp)
    fsync_tree(tmp)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover of a killed process that had this pid
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where it is listed (setting it to read it back is not
    thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open(..., "w")`` would have: ``0666`` less the umask."""
    mode = 0o666 & ~current_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root) / name, mode)


def file_sizes(folder: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``folder``."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()
    }


def size_mismatches(folder: Path, expected: dict[str, int]) -> list[str]:
    """The files of ``expected`` (``{relative path: bytes}``, as the data index lists them) that are missing from
    ``folder`` or have another size."""
    return damaged_files(folder, expected)


def file_hash(path: Path) -> str:
    """The XXH3-128 digest of a file's bytes, in hex."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while read := file.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"bytes": size, HASH: digest}}`` of every file under ``folder``."""
    return {
        name: {"bytes": (folder / name).stat().st_size, HASH: file_hash(folder / name)} for name in file_sizes(folder)
    }


def damaged_files(folder: Path, expected: dict[str, int | dict], names: set[str] | None = None) -> list[str]:
    """What is wrong with the files of ``expected`` (:func:`file_records`, or the sizes alone of an older
    manifest) in ``folder``: missing, of another size, or, same size, other bytes; only those in ``names`` when
    given. A file's hash is computed only when its size is right."""
    wrong = []
    for name, record in expected.items():
        if names is not None and name not in names:
            continue
        size = record["bytes"] if isinstance(record, dict) else record
        path = folder / name
        if not path.is_file():
            wrong.append(f"{name} is missing")
        elif path.stat().st_size != size:
            wrong.append(f"{name} has {path.stat().st_size} bytes instead of {size}")
        elif isinstance(record, dict) and HASH in record:
            try:
                same = file_hash(path) == record[HASH]
            except OSError as error:  # an I/O error of a failing disk
                wrong.append(f"{name} cannot be read ({os.strerror(error.errno) if error.errno else error})")
                continue
            if not same:
                wrong.append(f"{name} has other bytes than it was saved with (its {HASH} hash differs)")
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
