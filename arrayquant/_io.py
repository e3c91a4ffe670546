"""Safe file writes and input checks.

:func:`atomic_path` writes through a temporary file beside the target and renames
it over the target on success. What a write guarantees (see ``docs/checkpoints.md``):

- the target is either the old file or the complete new one, never a partial file;
  the temporary is flushed to disk (``fsync``) before the rename and the folder
  after it, so a completed write survives a power loss;
- the new file gets ``0o666 & ~umask`` when it is new, the old file's permission
  bits when it replaces one;
- the temporary (``.NAME.arrayquant-tmp.RANDOM.SUFFIX``) is removed on an error,
  on ``KeyboardInterrupt``, and on SIGTERM / SIGHUP (then the signal is delivered
  again, so the process still ends "terminated by SIGTERM"); a temporary left by
  a killed writer (SIGKILL, power loss) is removed by the next write to the same
  target, which knows the writer is dead because the ``flock`` it held is free;
- outputs that cannot be replaced safely are refused before anything is written:
  an empty path, a folder, a symbolic link, a read-only file, a FIFO or device,
  a missing folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, no stale-temporary cleanup
    fcntl = None

__all__ = ["atomic_path", "check_input_file", "check_output_path"]

_TMP_TAG = ".arrayquant-tmp."
# An empty temporary younger than this may belong to a writer that has not taken its lock.
_FRESH_S = 60.0
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_INPUTS = "a checkpoint file (.safetensors or .npz)"


class _Terminated(BaseException):
    """Raised by atomic_path's temporary signal handler; the atomic_path that installed it
    removes its temporary and re-delivers the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _can(path, mode: int) -> bool:
    """``os.access`` with the effective ids (what open() uses) where the platform allows."""
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return kind
    return "special file"


def check_input_file(path) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` if it is a readable regular file.

    Only ``stat`` is used before deciding, so a FIFO is never opened (which would block).

    Raises:
        ValueError: an empty path, or a FIFO, socket or device (not a regular file).
        FileNotFoundError: no such file (also a broken symbolic link).
        IsADirectoryError: a folder.
        PermissionError: the file (or a folder on the way) cannot be read.
    """
    if os.fspath(path) in ("", b""):
        raise ValueError(f"the input path is empty; expected {_INPUTS}")
    path = Path(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise FileNotFoundError(f"{path}: no such file (a broken symbolic link to "
                                    f"{os.readlink(path)})") from None
        raise FileNotFoundError(f"{path}: no such file") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied (cannot look up the file)") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a folder, expected {_INPUTS}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: is not a regular file (a {_file_kind(st.st_mode)}); "
                         f"expected {_INPUTS}")
    if not _can(path, os.R_OK):
        raise PermissionError(f"{path}: permission denied (the file is not readable)")
    return path


def _check_output(path) -> tuple[Path, int | None]:
    """``(path, permission bits of the existing output or None)``, or raise (see below)."""
    if os.fspath(path) in ("", b""):
        raise ValueError("the output path is empty; give a file name such as "
                         "model-int8.safetensors")
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise NotADirectoryError(f"{path.parent}: is not a folder; the output {path} must be "
                                 "in an existing folder") from None
    if st is None:
        if not path.parent.is_dir():
            if path.parent.exists():
                raise NotADirectoryError(f"{path.parent}: is not a folder; the output {path} "
                                         "must be in an existing folder")
            raise FileNotFoundError(f"{path.parent}: no such folder; create it first or write "
                                    f"the output {path.name} to an existing folder")
        return path, None
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path}: is a symbolic link to {os.readlink(path)}; arrayquant would "
                         "replace the link, not write its target: give the target's path as "
                         "the output, or remove the link first")
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a folder; the output must be a file path, e.g. "
                                f"{path / 'model.safetensors'}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: is not a regular file (a {_file_kind(st.st_mode)}); "
                         "arrayquant only replaces regular files: choose another output path")
    if not st.st_mode & 0o222 or not _can(path, os.W_OK):
        raise PermissionError(f"{path}: is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
                              "make it writable (chmod u+w) or choose another output path")
    return path, stat.S_IMODE(st.st_mode) & 0o777


def check_output_path(path) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` if :func:`atomic_path` can write it.

    A new file in an existing folder, or an existing writable regular file.

    Raises:
        ValueError: an empty path, a symbolic link, or an existing FIFO, socket or device.
        IsADirectoryError: an existing folder.
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: the "folder" is a file.
        PermissionError: an existing file without write permission.
    """
    return _check_output(path)[0]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # racy with other threads creating files; only off Linux
    os.umask(mask)
    return mask


def _remove_stale(folder: Path, pattern: re.Pattern) -> None:
    """Remove temporaries named by ``pattern`` whose writer is dead (their flock is free)."""
    if fcntl is None:
        return
    try:
        entries = [e for e in os.scandir(folder)
                   if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while the writer lives
            st = os.fstat(fd)
            # An empty, fresh one may be a writer's between creating it and locking it.
            if st.st_size or time.time() - st.st_mtime > _FRESH_S:
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def _install_handlers() -> dict[int, object]:
    """Make SIGTERM/SIGHUP raise _Terminated, where they would kill the process silently."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    installed = {}
    for sig in _SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:  # never replace a user's handler
            installed[sig] = signal.signal(sig, _raise_terminated)
    return installed


def _restore_handlers(installed: dict[int, object]) -> None:
    for sig, previous in installed.items():
        signal.signal(sig, previous)
    installed.clear()


def _settle(tmp: Path, mode: int) -> None:
    """Give the temporary its final permission bits and flush it to disk.

    The mode is best effort: file systems without Unix permissions (vfat, exFAT,
    some network and FUSE mounts) refuse ``fchmod``, and a write must not fail there.
    """
    fd = os.open(tmp, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        if hasattr(os, "fchmod"):
            try:
                os.fchmod(fd, mode)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where folders can be opened.

    Best effort: it runs after the rename, when the new file is already in place, so
    a failure here must not be reported as a failed write.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system without it (EINVAL), or an I/O error after the fact
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    The body writes the temporary by its path (it exists, empty). On success its
    permission bits are set (the existing file's, or ``0o666 & ~umask``), it is
    fsynced, renamed over ``path``, and the folder is fsynced. On any error, on
    ``KeyboardInterrupt`` and on SIGTERM/SIGHUP (when they have their default
    action, in the main thread) the temporary is removed and ``path`` is left
    untouched; a signal is then delivered again with its default action. A
    temporary left by a killed writer is removed by the next write to ``path``.

    Raises:
        ValueError, IsADirectoryError, FileNotFoundError, NotADirectoryError,
        PermissionError: ``path`` cannot be written safely (see
        :func:`check_output_path`), or its folder does not let us create files.
    """
    path, mode = _check_output(path)
    folder, suffix = path.parent, suffix or path.suffix
    prefix = f".{path.name}{_TMP_TAG}"
    _remove_stale(folder, re.compile(re.escape(prefix) + r"[A-Za-z0-9_]+" + re.escape(suffix)))
    if mode is None:
        mode = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except PermissionError:
        raise PermissionError(f"{folder}: permission denied: cannot create files in this "
                              "folder; write the output to a folder you can write to") from None
    tmp = Path(tmp)
    if fcntl is None:
        os.close(fd)  # Windows cannot rename an open file
        fd = None
    else:
        # Blocking: another writer's stale-file check may hold the lock for a moment (it
        # leaves an empty, fresh temporary alone). No locks on this file system: no cleanup.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
    installed: dict[int, object] = {}
    try:
        installed.update(_install_handlers())
        yield tmp
        _settle(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        for sig in installed:  # a second signal must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, _Terminated) and installed:
            _restore_handlers(installed)
            os.kill(os.getpid(), e.signum)  # the default action: the process ends here
        raise
    finally:
        _restore_handlers(installed)
        if fd is not None:
            os.close(fd)  # releases the lock
