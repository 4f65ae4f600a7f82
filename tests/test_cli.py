"""The ``fstq`` command: .npz and .safetensors in both directions (bfloat16 kept), the encoder config
its options stand for, and every user error as one line on stderr with exit status 2.

Errors run the command in a subprocess, as a user does, so that "no traceback" is what the
terminal would show. A core-only install is simulated by making the extras' imports fail
(``sys.modules[name] = None``) in that subprocess.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fstqcodec
from fstqcodec.cli import build_parser, main
from fstqcodec.cli.commands import encode_config
from fstqcodec.cli.tensorfiles import NPZ_BFLOAT16

torch = pytest.importorskip("torch")
import fstqcodec.torch  # noqa: E402  (after the skip: it imports torch)
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRAS = ("torch", "transformers", "peft", "safetensors", "tqdm", "matplotlib", "yaml", "flwr")


def fstq(*args, cwd, block=(), stdin=None):
    """Run ``fstq args`` in a fresh interpreter with the modules in ``block`` made unimportable."""
    script = textwrap.dedent(f"""
        import sys
        for name in {tuple(block)!r}:
            sys.modules[name] = None
        from fstqcodec.cli import main
        sys.exit(main({list(map(str, args))!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, stdin=stdin)


def check_user_error(result, *fragments, command="encode"):
    """One line on stderr, ``fstq <command>: ...`` naming what is wrong; exit 2; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fstq {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def bf16_tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "base.layers.0.lora_A.weight": torch.randn(8, 96, generator=generator).to(torch.bfloat16),
        "base.layers.0.lora_B.weight": (torch.randn(96, 8, generator=generator) * 1e-3).to(torch.bfloat16),
        "head.bias": torch.randn(5, generator=generator, dtype=torch.float64),
        "half": torch.randn(4, 3, 2, generator=generator).to(torch.float16),
        "plain": torch.randn(70, generator=generator),
    }


def run_main(*args):
    assert main(list(map(str, args))) == 0


# --- files: both directions, dtypes kept ---------------------------------------------------------


def test_bfloat16_safetensors_round_trip_keeps_names_shapes_dtypes_and_bits(tmp_path):
    tensors = bf16_tensors()
    safetensors_torch.save_file(tensors, tmp_path / "adapter.safetensors")
    run_main("encode", tmp_path / "adapter.safetensors", "-o", tmp_path / "update.fstq")
    assert {t["name"]: t["dtype"] for t in fstqcodec.inspect((tmp_path / "update.fstq").read_bytes())["tensors"]} == {
        name: str(t.dtype).removeprefix("torch.") for name, t in tensors.items()}
    run_main("decode", tmp_path / "update.fstq", "-o", tmp_path / "back.safetensors")
    back = safetensors_torch.load_file(tmp_path / "back.safetensors")  # the library reads what we wrote
    assert list(back) == list(fstqcodec.decode((tmp_path / "update.fstq").read_bytes()))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)  # lossless: bit-exact, bfloat16 included


def test_lossy_encode_keeps_dtypes_in_both_file_formats(tmp_path):
    tensors = bf16_tensors(1)
    safetensors_torch.save_file(tensors, tmp_path / "a.safetensors")
    run_main("encode", tmp_path / "a.safetensors", "-o", tmp_path / "a.fstq", "--bits-per-param", 2)
    run_main("decode", tmp_path / "a.fstq", "-o", tmp_path / "a.npz")
    run_main("encode", tmp_path / "a.npz", "-o", tmp_path / "b.fstq")  # lossless from here on
    run_main("decode", tmp_path / "b.fstq", "-o", tmp_path / "b.safetensors")
    first = safetensors_torch.load_file(tmp_path / "a.safetensors")
    again = safetensors_torch.load_file(tmp_path / "b.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in again.items()} == {n: (t.dtype, t.shape) for n, t in first.items()}
    decoded = fstqcodec.torch.decode((tmp_path / "a.fstq").read_bytes())
    for name in tensors:
        assert torch.equal(again[name], decoded[name])


def test_npz_stores_bfloat16_as_its_raw_bits_in_the_documented_dtype(tmp_path):
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30, 0.0]).to(torch.bfloat16)
    safetensors_torch.save_file({"w": values}, tmp_path / "w.safetensors")
    run_main("encode", tmp_path / "w.safetensors", "-o", tmp_path / "w.fstq")
    run_main("decode", tmp_path / "w.fstq", "-o", tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as archive:
        stored = archive["w"]
    assert stored.dtype == NPZ_BFLOAT16 == np.dtype([("bfloat16", "<u2")])
    assert stored["bfloat16"].tolist() == values.view(torch.int16).numpy().view(np.uint16).tolist()
    as_float32 = (stored["bfloat16"].astype("<u4") << 16).view("<f4")  # the formula the help gives
    assert as_float32.tolist() == values.float().tolist()


def test_npz_round_trip_of_every_dtype(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"half": rng.standard_normal((3, 4)).astype(np.float16), "double": rng.standard_normal(9),
              "a/b.c": rng.standard_normal((2, 2, 2)).astype(np.float32), "scalar": np.float32(2.5).reshape(()),
              "big-endian": rng.standard_normal(5).astype(">f4")}
    np.savez(tmp_path / "in.npz", **arrays)
    run_main("encode", tmp_path / "in.npz", "-o", tmp_path / "in.fstq")
    run_main("decode", tmp_path / "in.fstq", "-o", tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz", allow_pickle=False) as archive:
        back = {name: archive[name] for name in archive.files}
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype.newbyteorder("<") and back[name].shape == array.shape
        assert np.array_equal(back[name], array)


def test_names_np_savez_cannot_take_are_written_and_read(tmp_path):
    message = fstqcodec.encode({"file": np.ones(3, np.float32), "allow_pickle": np.zeros(2, np.float64)})
    (tmp_path / "m.fstq").write_bytes(message)
    run_main("decode", tmp_path / "m.fstq", "-o", tmp_path / "m.npz")
    run_main("decode", tmp_path / "m.fstq", "-o", tmp_path / "m.safetensors")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        assert archive["file"].tolist() == [1, 1, 1] and archive["allow_pickle"].dtype == np.float64
    assert safetensors_numpy.load_file(tmp_path / "m.safetensors")["allow_pickle"].dtype == np.float64


def test_safetensors_metadata_is_accepted_and_the_written_header_is_aligned(tmp_path):
    tensors = {"x": np.arange(10, dtype=np.float32), "y": np.ones((2, 3), np.float64)}
    safetensors_numpy.save_file(tensors, tmp_path / "in.safetensors", metadata={"format": "np"})
    run_main("encode", tmp_path / "in.safetensors", "-o", tmp_path / "in.fstq")
    run_main("decode", tmp_path / "in.fstq", "-o", tmp_path / "out.safetensors")
    written = (tmp_path / "out.safetensors").read_bytes()
    assert int.from_bytes(written[:8], "little") % 8 == 0
    back = safetensors_numpy.load_file(tmp_path / "out.safetensors")
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


# --- the options are one EncodeConfig -------------------------------------------------------------


@pytest.mark.parametrize(("options", "expected"), [
    ([], fstqcodec.EncodeConfig()),
    (["--bits-per-param", "0.3", "--fisher", "f.npz", "--fisher-power", "0.5"],
     fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.3), fisher_power=0.5)),
    (["--max-bytes", "900", "--block-size", "32", "--rounding", "stochastic", "--seed", "7"],
     fstqcodec.EncodeConfig(budget=fstqcodec.Budget(max_bytes=900), block_size=32, rounding="stochastic", seed=7)),
    (["--ratio", "8", "--nonfinite", "zero"], fstqcodec.EncodeConfig(budget=fstqcodec.Budget(ratio=8.0), nonfinite="zero")),
    (["--bits", "4"], fstqcodec.EncodeConfig(bits=4)),
    (["--bits-per-param", "0.5", "--unbiased", "--seed", "3"],
     fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.5), unbiased=True, seed=3)),
    (["--codebook", "nf4"], fstqcodec.EncodeConfig(codebook="nf4")),
])
def test_the_options_are_one_encode_config(options, expected):
    args = build_parser().parse_args(["encode", "x.npz", "-o", "x.fstq", *options])
    assert encode_config(args) == expected


def test_encode_writes_the_bytes_of_encode_with_that_config(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((16, 64)).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}
    fisher = {name: np.abs(rng.standard_normal(t.shape)).astype(np.float32) for name, t in tensors.items()}
    np.savez(tmp_path / "t.npz", **tensors)
    np.savez(tmp_path / "f.npz", **fisher)
    run_main("encode", tmp_path / "t.npz", "-o", tmp_path / "t.fstq", "--fisher", tmp_path / "f.npz",
             "--bits-per-param", "1.5", "--fisher-power", "0.5", "--block-size", "32")
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=1.5), fisher_power=0.5, block_size=32)
    assert (tmp_path / "t.fstq").read_bytes() == fstqcodec.encode(tensors, fisher=fisher, config=config)
    assert (tmp_path / "t.fstq").read_bytes() != fstqcodec.encode(tensors, config=config)  # the Fisher was used


# --- writing: atomic, with the mode a plain open would give ---------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_output_files_get_the_umask_mode(tmp_path, umask):
    np.savez(tmp_path / "t.npz", w=np.ones(8, np.float32))
    previous = os.umask(umask)
    try:
        run_main("encode", tmp_path / "t.npz", "-o", tmp_path / "t.fstq")
        run_main("decode", tmp_path / "t.fstq", "-o", tmp_path / "d.safetensors")
    finally:
        os.umask(previous)
    for name in ("t.fstq", "d.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_a_failed_encode_leaves_the_old_file_and_nothing_else(tmp_path):
    np.savez(tmp_path / "t.npz", w=np.ones(4096, np.float32))
    (tmp_path / "t.fstq").write_bytes(b"old")
    assert main(["encode", str(tmp_path / "t.npz"), "-o", str(tmp_path / "t.fstq"), "--max-bytes", "3"]) == 2
    assert (tmp_path / "t.fstq").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.fstq", "t.npz"]
    run_main("encode", tmp_path / "t.npz", "-o", tmp_path / "t.fstq")
    assert fstqcodec.decode((tmp_path / "t.fstq").read_bytes())["w"].tolist() == [1.0] * 4096


def test_inspect_says_1_block_not_1_blocks(tmp_path, capsys):
    (tmp_path / "m.fstq").write_bytes(fstqcodec.encode({"tiny": np.ones(5, np.float32), "two": np.ones(100, np.float32)}))
    run_main("inspect", tmp_path / "m.fstq")
    out = capsys.readouterr().out
    assert "1 block of 64" in out and "2 blocks of 64" in out and "1 blocks" not in out


# --- user errors: one line, exit 2, no traceback --------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory with good, empty, truncated and otherwise broken inputs."""
    path = tmp_path_factory.mktemp("fstq")
    np.savez(path / "x.npz", w=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    np.savez(path / "empty.npz")
    np.savez(path / "ints.npz", w=np.arange(10))
    (path / "junk.npz").write_bytes(b"not a zip file at all")
    safetensors_torch.save_file(bf16_tensors(), path / "bf16.safetensors")
    whole = (path / "bf16.safetensors").read_bytes()
    (path / "cut-data.safetensors").write_bytes(whole[:-100])
    (path / "cut-header.safetensors").write_bytes(whole[:50])
    (path / "cut-length.safetensors").write_bytes(whole[:5])
    (path / "trailing.safetensors").write_bytes(whole + b"\0" * 8)
    safetensors_numpy.save_file({"w": np.arange(4, dtype=np.int32)}, path / "ints.safetensors")
    write_safetensors(path / "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12)
    write_safetensors(path / "shape.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8)
    (path / "deep.safetensors").write_bytes(len(b"[" * 5000 + b"]" * 5000).to_bytes(8, "little") + b"[" * 5000 + b"]" * 5000)
    (path / "x.fstq").write_bytes(fstqcodec.encode({"w": np.ones(256, np.float32)}, bits=4))
    (path / "cut.fstq").write_bytes((path / "x.fstq").read_bytes()[:-9])
    (path / "a-directory.npz").mkdir()
    return path


def write_safetensors(path, header, data_size):
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(data_size))


ENCODE_ERRORS = {
    "negative bits per param": (["x.npz", "-o", "o.fstq", "--bits-per-param", "-1"], ["--bits-per-param", "positive"]),
    "zero bits per param": (["x.npz", "-o", "o.fstq", "--bits-per-param", "0"], ["--bits-per-param", "positive"]),
    "zero block size": (["x.npz", "-o", "o.fstq", "--block-size", "0"], ["--block-size", "1 to 65536"]),
    "budget and bits": (["x.npz", "-o", "o.fstq", "--bits-per-param", "1", "--bits", "4"], ["--bits", "--bits-per-param"]),
    "ratio below 1": (["x.npz", "-o", "o.fstq", "--ratio", "0.5"], ["--ratio", ">= 1"]),
    "fisher without budget": (["x.npz", "-o", "o.fstq", "--fisher", "x.npz"], ["--fisher", "budget"]),
    "fisher power without fisher": (["x.npz", "-o", "o.fstq", "--bits-per-param", "1", "--fisher-power", "0.5"],
                                    ["--fisher-power", "--fisher"]),
    "stochastic lossless": (["x.npz", "-o", "o.fstq", "--rounding", "stochastic"], ["--rounding", "lossless"]),
    "unbiased without budget": (["x.npz", "-o", "o.fstq", "--unbiased", "--bits", "4"], ["--unbiased", "budget"]),
    "budget below the smallest message": (["x.npz", "-o", "o.fstq", "--max-bytes", "10"], ["--max-bytes 10", "smallest"]),
    "missing output option": (["x.npz"], ["-o/--output"]),
    "missing input": (["nothing.npz", "-o", "o.fstq"], ["nothing.npz", "No such file"]),
    "input is a directory": (["a-directory.npz", "-o", "o.fstq"], ["a-directory.npz", "directory"]),
    "unknown input suffix": (["x.fstq", "-o", "o.fstq"], ["x.fstq", ".npz or .safetensors"]),
    "output directory missing": (["x.npz", "-o", "/nonexistent/dir/x.fstq"], ["/nonexistent/dir/x.fstq", "does not exist"]),
    "empty npz": (["empty.npz", "-o", "o.fstq"], ["empty.npz", "no tensors"]),
    "integer tensor": (["ints.npz", "-o", "o.fstq"], ["ints.npz", "'w'", "int64"]),
    "not a zip": (["junk.npz", "-o", "o.fstq"], ["junk.npz", "not a readable .npz"]),
    "safetensors cut in the data": (["cut-data.safetensors", "-o", "o.fstq"], ["cut-data.safetensors", "truncated"]),
    "safetensors cut in the header": (["cut-header.safetensors", "-o", "o.fstq"], ["cut-header.safetensors", "truncated"]),
    "safetensors cut in the length": (["cut-length.safetensors", "-o", "o.fstq"], ["cut-length.safetensors", "truncated"]),
    "safetensors trailing bytes": (["trailing.safetensors", "-o", "o.fstq"], ["trailing.safetensors", "after the last"]),
    "safetensors integer tensor": (["ints.safetensors", "-o", "o.fstq"], ["ints.safetensors", "'w' is I32"]),
    "safetensors overlapping tensors": (["overlap.safetensors", "-o", "o.fstq"], ["overlap.safetensors", "'b'", "overlap"]),
    "safetensors shape against size": (["shape.safetensors", "-o", "o.fstq"], ["shape.safetensors", "'a'", "shape"]),
    "safetensors header nested deep": (["deep.safetensors", "-o", "o.fstq"], ["deep.safetensors", "not JSON"]),
}


@pytest.mark.parametrize("case", ENCODE_ERRORS)
def test_encode_user_errors_are_one_line_with_exit_status_2(files, case):
    args, fragments = ENCODE_ERRORS[case]
    line = check_user_error(fstq("encode", *args, cwd=files), *fragments)
    assert ".tmp" not in line  # never the temporary file
    assert not (files / "o.fstq").exists()


@pytest.mark.parametrize(("args", "fragments", "command"), [
    (["decode", "cut.fstq", "-o", "o.npz"], ["cut.fstq", "Error"], "decode"),
    (["decode", "x.fstq", "-o", "o.bin"], ["-o o.bin", ".npz or .safetensors"], "decode"),
    (["decode", "x.fstq", "-o", "/nonexistent/dir/o.npz"], ["/nonexistent/dir/o.npz"], "decode"),
    (["inspect", "cut.fstq"], ["cut.fstq", "Error"], "inspect"),
    (["inspect", "nothing.fstq"], ["nothing.fstq", "No such file"], "inspect"),
    (["demo", "--seed", "-3"], ["--seed"], "demo"),
])
def test_decode_inspect_and_demo_user_errors_are_one_line(files, args, fragments, command):
    check_user_error(fstq(*args, cwd=files), *fragments, command=command)


def test_bfloat16_without_torch_names_the_extra(files):
    check_user_error(fstq("encode", "bf16.safetensors", "-o", "o.fstq", cwd=files, block=EXTRAS),
                     "bf16.safetensors", "bfloat16", "pip install '.[torch]'")


def test_decoding_to_bfloat16_files_needs_only_numpy(files, tmp_path):
    (tmp_path / "m.fstq").write_bytes(fstqcodec.torch.encode(bf16_tensors()))
    for name in ("m.safetensors", "m.npz"):
        result = fstq("decode", "m.fstq", "-o", name, cwd=tmp_path, block=EXTRAS)
        assert result.returncode == 0 and not result.stderr, result.stderr
    back = safetensors_torch.load_file(tmp_path / "m.safetensors")
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in bf16_tensors().items())


@pytest.mark.parametrize("missing", ["torch", "tqdm"])
def test_simulate_on_a_core_only_install_names_the_extra(tmp_path, missing):
    block = EXTRAS if missing == "torch" else ("tqdm",)
    line = check_user_error(fstq("simulate", "--quick", "--out", tmp_path / "sim", cwd=tmp_path, block=block),
                            f"'{missing}'", "pip install '.[sim]'", command="simulate")
    assert "sim" in line and not (tmp_path / "sim").exists()


def test_a_closed_pipe_ends_quietly_with_status_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "fstqcodec.cli", "demo"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first write, as with `fstq demo | head -n 0`
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0
    assert stderr == b""


def test_no_command_is_one_line(tmp_path):
    result = fstq(cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_simulate_hands_its_options_to_the_sim(tmp_path):
    # With the extras present the dispatch reaches the sim, whose own check refuses the method.
    check_user_error(fstq("simulate", "--methods", "no-such-method", "--out", tmp_path / "sim", cwd=tmp_path),
                     "no-such-method", command="simulate")
