"""``arrayquant._io``: atomic writes under faults and signals, output and input checks."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from arrayquant import _io
from arrayquant._io import atomic_path, check_input_file, check_output_path

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals, flock, modes")
as_root = hasattr(os, "geteuid") and os.geteuid() == 0

# A writer in a child process: loads _io.py by its file name (no package import, fast),
# writes some bytes into the temporary, says "ready" and sleeps inside the block.
WRITER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("aq_io", {_io.__file__!r})
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 65536)
    print("ready", flush=True)
    time.sleep(30)
"""


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def temporaries(folder):
    return [n for n in names(folder) if ".arrayquant-tmp." in n]


@pytest.fixture
def start_writer():
    """Start a WRITER for an output, wait until it is inside the block; reap it at the end."""
    started = []

    def start(out):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        started.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 20)
        line = p.stdout.readline() if ready else ""
        assert line.strip() == "ready", f"the writer did not start: {line!r}"
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=20)  # reaps it and closes the pipes


# ---------------------------------------------------------------- signals


@posix_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminate_removes_the_temporary_and_still_terminates(tmp_path, sig, start_writer):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    p = start_writer(out)
    assert len(temporaries(tmp_path)) == 1
    p.send_signal(sig)
    assert p.wait(timeout=20) == -sig
    assert names(tmp_path) == ["m.safetensors"] and out.read_bytes() == b"old"


@posix_only
def test_kill_leaves_a_temporary_the_next_write_removes(tmp_path, start_writer):
    out = tmp_path / "m.safetensors"
    p = start_writer(out)
    p.kill()
    assert p.wait(timeout=20) == -signal.SIGKILL
    (stale,) = temporaries(tmp_path)
    assert stale.startswith(".m.safetensors.arrayquant-tmp.") and stale.endswith(".safetensors")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
    assert names(tmp_path) == ["m.safetensors"] and out.read_bytes() == b"new"


@posix_only
def test_a_live_writers_temporary_is_left_alone(tmp_path, start_writer):
    out = tmp_path / "m.safetensors"
    p = start_writer(out)
    (live,) = temporaries(tmp_path)
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"mine")
    assert temporaries(tmp_path) == [live] and out.read_bytes() == b"mine"
    p.terminate()
    assert p.wait(timeout=20) == -signal.SIGTERM
    assert names(tmp_path) == ["m.safetensors"]


@posix_only
def test_stale_cleanup_spares_fresh_empty_and_unrelated_files(tmp_path):
    out = tmp_path / "m.safetensors"
    fresh = tmp_path / ".m.safetensors.arrayquant-tmp.abcd1234.safetensors"
    fresh.touch()  # maybe a writer between creating it and locking it
    other = tmp_path / ".n.safetensors.arrayquant-tmp.abcd1234.safetensors"
    other.write_bytes(b"another output's")
    mine = tmp_path / ".m.safetensors.arrayquant-tmp.old.txt"
    mine.write_bytes(b"not our name")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"1")
    assert fresh.exists() and other.exists() and mine.exists()
    old = time.time() - 3600
    os.utime(fresh, (old, old))
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"2")
    assert not fresh.exists() and other.exists() and mine.exists()


@posix_only
def test_handlers_are_installed_only_over_the_default_and_restored(tmp_path):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM")
    with atomic_path(tmp_path / "a") as tmp:
        assert signal.getsignal(signal.SIGTERM) is _io._raise_terminated
        tmp.write_bytes(b"a")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    seen = []

    def in_a_thread():  # only the main thread may install handlers
        with atomic_path(tmp_path / "t") as tmp:
            seen.append(signal.getsignal(signal.SIGTERM))
            tmp.write_bytes(b"t")

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join(timeout=20)
    assert seen == [signal.SIG_DFL]

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with atomic_path(tmp_path / "b") as tmp:
            assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "c"):
            raise RuntimeError
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert names(tmp_path) == ["a", "b", "t"]


# ---------------------------------------------------------------- modes and durability


@posix_only
def test_new_files_follow_the_umask():
    code = f"""
import importlib.util, os, sys, tempfile
spec = importlib.util.spec_from_file_location("aq_io", {_io.__file__!r})
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
folder = tempfile.mkdtemp()
for mask in (0o022, 0o077, 0o002):
    os.umask(mask)
    out = os.path.join(folder, f"{{mask:o}}.safetensors")
    with io.atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
    print(f"{{os.stat(out).st_mode & 0o777:o}}")
"""
    modes = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=20, check=True).stdout.split()
    assert modes == ["644", "600", "664"]


@posix_only
def test_replacing_keeps_the_mode(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o640)
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_bytes() == b"new"


@posix_only
def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "m.safetensors"
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"data")
    assert synced == [("file", out.stat().st_ino), ("folder", tmp_path.stat().st_ino)]


def test_errors_remove_the_temporary_and_keep_the_old_file(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(error)), atomic_path(out) as tmp:
            tmp.write_bytes(b"partial")
            raise error
    assert names(tmp_path) == ["m.safetensors"] and out.read_bytes() == b"old"


# ---------------------------------------------------------------- refused outputs


@posix_only
def test_symlink_output_is_refused(tmp_path):
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"real")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with pytest.raises(ValueError, match=r"link\.safetensors: is a symbolic link to .*real\."
                                         r"safetensors.*give the target's path"):
        with atomic_path(link):
            pytest.fail("the body must not run")
    assert link.is_symlink() and target.read_bytes() == b"real"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="symbolic link"):
        check_output_path(tmp_path / "dangling")


@posix_only
def test_read_only_output_is_refused_even_as_root(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep")
    out.chmod(0o444)
    with pytest.raises(PermissionError, match=r"m\.safetensors: is read-only \(mode 0444\)"):
        with atomic_path(out):
            pytest.fail("the body must not run")
    assert out.read_bytes() == b"keep" and names(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda d: "", ValueError, "the output path is empty"),
        (lambda d: d, IsADirectoryError, ": is a folder; the output must be a file path"),
        (lambda d: d / "no" / "m.safetensors", FileNotFoundError, "no: no such folder"),
    ],
)
def test_bad_outputs(tmp_path, make, error, fragment):
    path = make(tmp_path)
    with pytest.raises(error, match=fragment):
        check_output_path(path)
    with pytest.raises(error, match=fragment), atomic_path(path):
        pytest.fail("the body must not run")
    assert names(tmp_path) == []


def test_output_beside_a_file_and_special_outputs(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="f: is not a folder"):
        check_output_path(tmp_path / "f" / "m.safetensors")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(ValueError, match=r"fifo: is not a regular file \(a FIFO\)"):
            check_output_path(tmp_path / "fifo")


def test_folder_without_write_permission(tmp_path, monkeypatch):
    def denied(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_io.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=f"{tmp_path}: permission denied: cannot create"):
        with atomic_path(tmp_path / "m.safetensors"):
            pytest.fail("the body must not run")


def _unprivileged(check) -> None:
    """Run ``check(folder)`` in a folder of its own; as root, with the effective user and
    group switched to ``nobody`` meanwhile (root may read and write anything). The real
    user stays root, so the effective one can be switched back."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp()
    try:
        if not as_root:
            check(folder)
            return
        os.chmod(folder, 0o777)
        os.setegid(65534)
        os.seteuid(65534)
        try:
            check(folder)
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@posix_only
def test_folder_without_write_permission_for_real():
    def check(tmp):
        folder = os.path.join(tmp, "ro")
        os.mkdir(folder, 0o555)
        with pytest.raises(PermissionError, match="ro: permission denied: cannot create"):
            with atomic_path(os.path.join(folder, "m.safetensors")):
                raise AssertionError("the body must not run")

    _unprivileged(check)


# ---------------------------------------------------------------- inputs


@posix_only
def test_check_input_file(tmp_path, monkeypatch):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    assert check_input_file(str(f)) == f
    with pytest.raises(FileNotFoundError, match=r"nope\.npz: no such file$"):
        check_input_file(tmp_path / "nope.npz")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="no such file .a broken symbolic link to"):
        check_input_file(tmp_path / "broken")
    with pytest.raises(IsADirectoryError, match=r": is a folder, expected a checkpoint file "
                                                r"\(\.safetensors or \.npz\)"):
        check_input_file(tmp_path)
    with pytest.raises(ValueError, match="the input path is empty"):
        check_input_file("")
    monkeypatch.setattr(os, "access", lambda path, how: False)
    with pytest.raises(PermissionError, match=r"m\.safetensors: permission denied"):
        check_input_file(f)


@posix_only
def test_check_input_file_refuses_special_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it would block: only stat may look at it
    with pytest.raises(ValueError, match=r"fifo: is not a regular file \(a FIFO\); expected"):
        check_input_file(tmp_path / "fifo")
    if os.path.exists("/dev/null"):
        with pytest.raises(ValueError, match=r"/dev/null: is not a regular file "
                                             r"\(a character device\)"):
            check_input_file("/dev/null")


@posix_only
def test_check_input_file_unreadable_for_real():
    def check(tmp):
        f = os.path.join(tmp, "m.safetensors")
        with open(f, "wb") as fh:
            fh.write(b"x")
        os.chmod(f, 0)
        with pytest.raises(PermissionError, match="not readable"):
            check_input_file(f)

    _unprivileged(check)
