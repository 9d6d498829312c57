"""Output files that lose nothing: atomic writes, one writer per file, no temporary files left behind.

* :func:`atomic_write` writes a temporary file ``.<name>.<random>.tmp`` in the target's folder, fsyncs it and
  renames it over the target (``os.replace``), so a reader sees the old file or the new one, never a partial one.
  Any error or interrupt removes the temporary file; only a hard kill (SIGKILL, power loss) can leave one.
* :class:`OutputLock` is an exclusive ``fcntl.flock`` on a sidecar file ``.<name>.lock`` beside the target,
  recording the holder's pid and command. A second process asking for the same lock gets :class:`OutputError`
  at once (it does not wait: a benchmark run can hold its results file for hours), naming the file and the
  holder. The lock is re-entrant within a process, so a run that holds its results file for its whole duration
  can still write it through :func:`atomic_write`, which takes the lock for every write.
* While it holds the lock, a writer removes the temporary files that killed writers of the same target left
  (:func:`remove_stale_temporaries`): nobody else can be writing that target at that moment.
* Symbolic links are written through, never replaced: the lock, the temporary file and the rename all use the
  link's target (:func:`real_path`), so two runs on one file under two names exclude each other too.
* An output that exists and is not a regular file (a device such as ``/dev/null``, a pipe, a socket) is refused:
  renaming over it would replace it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, the atomic writes still hold
    fcntl = None  # type: ignore[assignment]


class OutputError(Exception):
    """An output that cannot be written (busy, read-only, a folder, holding data it would destroy): one line."""


def real_path(path: str | os.PathLike) -> str:
    """The file that writing ``path`` changes: absolute, symbolic links resolved (also a link whose target does
    not exist yet: writing creates the target)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of ``path``'s target (beside the file a link points to, not beside the link)."""
    path = real_path(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def _not_regular(path: str) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a folder (a device, pipe, socket)."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def _named(path: str, target: str) -> str:
    """``path``, and what it points to when it is a symbolic link."""
    return f"{path} (a link to {target})" if path != target and os.path.islink(path) else path


def _temporary_pattern(path: str) -> re.Pattern[str]:
    # mkstemp's random part has no dots, so ``.x.json.bak.<rnd>.tmp`` (a temporary of x.json.bak) never matches
    # x.json's pattern. ``x.json.tmp`` is the fixed name older tokred versions used.
    name = re.escape(os.path.basename(path))
    return re.compile(rf"^(\.{name}\.[A-Za-z0-9_]+\.tmp|{name}\.tmp)$")


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that interrupted writers of ``path`` left beside it; returns their paths.
    Call it only while holding ``path``'s :class:`OutputLock` (then no live writer owns them)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    pattern = _temporary_pattern(path)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        if pattern.match(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']}: {holder['command']}; since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


class OutputLock:
    """Exclusive lock on ``path`` for this process (see the module docstring). Use as a context manager or with
    :meth:`acquire` / :meth:`release`. ``purpose`` names the option that chose the path, for error messages."""

    _held: dict[str, list[Any]] = {}  # lock file -> [fd, depth], this process's held locks
    _guard = threading.Lock()

    def __init__(self, path: str | os.PathLike, purpose: str = "output") -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.target = real_path(self.path)  # a link is locked (and written) as the file it points to
        self.lock_file = lock_path(self.target)
        self.purpose = purpose
        self.stale_removed: list[str] = []
        self._acquired = False

    def acquire(self) -> OutputLock:
        with self._guard:
            held = self._held.get(self.lock_file)
            if held is not None:
                held[1] += 1
                self._acquired = True
                return self
            fd = self._lock()
            self._held[self.lock_file] = [fd, 1]
            self._acquired = True
        self.stale_removed = remove_stale_temporaries(self.target)
        return self

    def _lock(self) -> int | None:
        if fcntl is None:  # pragma: no cover
            return None
        folder = os.path.dirname(self.lock_file)
        where = f"{self.purpose} {_named(self.path, self.target)}"
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{where}: cannot create the folder {folder}: {err.strerror}") from None
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise OutputError(f"{where}: the folder {folder} is not writable ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                raise OutputError(
                    f"{where} is being written by another tokred process ({holder}); wait for it to finish or "
                    "choose another output"
                ) from None
            # A releasing holder unlinks the lock file before closing it: if we locked a file that is no longer
            # the one at lock_file, lock again (otherwise two processes could each hold "the" lock).
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "command": " ".join(sys.argv) or "python",
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return fd

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with self._guard:
            held = self._held.get(self.lock_file)
            if held is None:  # pragma: no cover
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del self._held[self.lock_file]
            fd = held[0]
            if fd is None:  # pragma: no cover
                return
            try:
                os.unlink(self.lock_file)  # while still holding it: see _lock
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes, purpose: str = "output") -> None:
    """Write ``data`` to ``path`` atomically, under ``path``'s lock (stale temporaries removed first). A
    symbolic link is written through: its target is replaced, the link stays."""
    path = os.path.abspath(os.fspath(path))
    target = real_path(path)
    if os.path.isdir(target):
        raise OutputError(f"{purpose} {_named(path, target)} is a folder, not a file")
    if _not_regular(target):
        raise OutputError(f"{purpose} {_named(path, target)} exists and is not a regular file (a device, pipe or "
                          "socket); give a file path")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    folder = os.path.dirname(target)
    with OutputLock(path, purpose):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
        except OSError as err:
            raise OutputError(f"{purpose} {path}: cannot write in {folder} ({err.strerror})") from None
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; outputs are ordinary files
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_file(path: str | os.PathLike, purpose: str = "output") -> str:
    """``path`` as an absolute path, after checking that it can become a file (not a folder, not a device, pipe
    or socket, not read-only); its folder (the link target's, for a symbolic link) is created. The lock
    (:class:`OutputLock`) checks that the folder is writable."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{purpose} {path} is a folder; give a file path")
    if _not_regular(path):
        raise OutputError(f"{purpose} {path} exists and is not a regular file (a device, pipe or socket); writing "
                          "would replace it: give a file path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputError(f"{purpose} {path} is read-only")
    folder = os.path.dirname(real_path(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{purpose} {path}: cannot create the folder {folder}: {err.strerror}") from None
    return path
