"""Files the library reads and writes: user text files with one-line errors, and crash-safe cache directories.

A cache entry (a converted model) is built in a temporary directory beside its final place, flushed to disk and
renamed into place, then marked complete; a reader only trusts a directory with its completion marker, so a run
killed at any moment leaves either nothing or a temp directory that the next run removes. A lock file serialises
concurrent builders of the same entry: one does the work, the others wait and then find it done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from propd.errors import PropdError

COMPLETE = ".propd-complete"  # written last into a finished cache directory: its files and their sizes
STALE_AFTER_S = 60.0  # an unlocked temp directory older than this is a killed run's leftover


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents, or a one-line PropdError saying why it cannot be read."""
    if path.is_dir():
        raise PropdError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise PropdError(f"{what} {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PropdError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})"
                         ) from None
    except OSError as exc:
        raise PropdError(f"cannot read {what} {path}: {exc.strerror}") from None


def mark_complete(directory: Path) -> None:
    """Record every file of ``directory`` with its size, after flushing them to disk."""
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != COMPLETE:
            _fsync(f)
            files[str(f.relative_to(directory))] = f.stat().st_size
    marker = directory / COMPLETE
    marker.write_text(json.dumps({"files": files}, indent=1) + "\n")
    _fsync(marker)
    _fsync(directory)


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` was finished by :func:`mark_complete` and still holds every file at its size."""
    try:
        files = json.loads((directory / COMPLETE).read_text())["files"]
        return all((directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some systems
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file); say once on stderr when another process holds it."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"propd: waiting for another process that is preparing {what}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_atomically(target: Path, build, what: str) -> Path:
    """Make the cache directory ``target`` with ``build(tmp_dir)`` unless it is already complete, crash-safely.

    Under ``target``'s lock: leftovers of killed runs are removed, ``build`` fills a temp directory beside
    ``target``, which is marked complete and renamed into place (replacing an incomplete ``target``).
    """
    target = Path(target)
    if is_complete(target):
        return target
    with locked(target.parent / f".{target.name}.lock", what):
        if is_complete(target):  # another process finished it while we waited
            return target
        remove_stale(target.parent, target.name)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            mark_complete(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            _fsync(target.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_stale(parent: Path, name: str) -> None:
    """Remove temp directories a killed build of ``name`` left in ``parent`` (called under that name's lock, so no
    live builder of ``name`` owns them)."""
    for d in parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in parent.glob(f".{name}-*"):  # temp directories of older propd versions
        if d.is_dir() and time.time() - d.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(d, ignore_errors=True)
