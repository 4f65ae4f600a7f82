"""fstqcodec.open (a message with what it declares) and save_file / load_file (atomic writes).

Torch-free: bfloat16 messages come from the committed spec vectors.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import fstqcodec
from fstqcodec import files

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
#: The valid vectors that decode without a schema (schemas are covered below).
VALID = [
    entry
    for entry in json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))["valid"]
    if not Path(entry["file"]).name.startswith("schema_")
]


def _update(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal((64, 64)).astype(np.float32),
        "b": rng.standard_normal(100).astype(np.float16),
        "c": rng.standard_normal((3, 5)),
    }


def _leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------
# open


@pytest.mark.parametrize("entry", VALID, ids=[e["file"] for e in VALID])
def test_open_returns_the_declared_dtypes_and_shapes_of_every_valid_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    opened = fstqcodec.open(data)
    assert list(opened) == [t["name"] for t in entry["tensors"]]
    assert opened.dtypes == {t["name"]: t["dtype"] for t in entry["tensors"]}
    assert opened.shapes == {t["name"]: tuple(t["shape"]) for t in entry["tensors"]}
    decoded = fstqcodec.decode(data)
    for name, array in decoded.items():
        assert opened[name].dtype == array.dtype and opened[name].tobytes() == array.tobytes()
    assert opened.size == len(data) and opened.version == (data[8], data[9])  # after the 8-byte magic


def test_open_declares_bfloat16_although_numpy_holds_it_in_float32():
    opened = fstqcodec.open((VECTORS / "valid/conversions.fstq").read_bytes())
    assert opened.dtypes == {"b": "bfloat16", "f": "float16", "g": "float32"}
    bf16 = opened["b"]
    assert bf16.dtype == np.float32
    # Every value is a bfloat16 value: its low 16 bits are zero.
    assert not np.any(bf16.view(np.uint32) & 0xFFFF)
    assert "b: bfloat16[3, 5]" in repr(opened)


def test_open_returns_meta_and_behaves_as_a_read_only_mapping():
    x = _update()
    meta = {"round": 7, "client": "c-3", "loss": 0.25, "ok": True, "raw": b"\x00\x01", "none": None}
    message = fstqcodec.encode(x, meta=meta, budget=fstqcodec.Budget(bits_per_param=2))
    opened = fstqcodec.open(message)
    assert opened.meta == meta
    assert len(opened) == 3 and list(opened.keys()) == list(x) and "a" in opened
    assert opened.dtypes == {"a": "float32", "b": "float16", "c": "float64"}
    assert {name: opened[name].dtype for name in opened} == {name: x[name].dtype for name in x}
    assert opened.tensors.keys() == fstqcodec.decode(message).keys()
    with pytest.raises(TypeError):
        opened["a"] = np.zeros(1)  # a Mapping, not a dict
    assert fstqcodec.open(fstqcodec.encode(x)).meta == {}
    assert fstqcodec.open((VECTORS / "valid/meta.fstq").read_bytes()).meta  # the vector carries meta


def test_open_resolves_schemas_and_reports_decode_errors():
    x = _update()
    schema = fstqcodec.Schema.of(x)
    message = fstqcodec.encode(x, schema=schema)
    assert fstqcodec.open(message, schemas=[schema]).dtypes == {"a": "float32", "b": "float16", "c": "float64"}
    with pytest.raises(fstqcodec.UnknownSchemaError):
        fstqcodec.open(message)
    with pytest.raises(TypeError):
        fstqcodec.open(message, schemas=["not a schema"])
    with pytest.raises(TypeError):
        fstqcodec.open("text")
    with pytest.raises(fstqcodec.TruncatedError):
        fstqcodec.open(message[:-1])
    with pytest.raises(fstqcodec.TrailingDataError):
        fstqcodec.open(message + b"\x00")


# ------------------------------------------------------------------------------------------
# save_file / load_file


def test_save_and_load_file_round_trip_with_config_and_meta(tmp_path):
    x = _update(1)
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=1), fisher_power=0.5)
    path = tmp_path / "update.fstq"
    size = fstqcodec.save_file(x, path, config=config, meta={"round": 3})
    data = path.read_bytes()
    assert size == len(data)
    assert data == fstqcodec.encode(x, config=config, meta={"round": 3})
    loaded = fstqcodec.load_file(str(path))
    assert loaded.meta == {"round": 3} and loaded.dtypes == {"a": "float32", "b": "float16", "c": "float64"}
    assert all(loaded[n].tobytes() == a.tobytes() for n, a in fstqcodec.decode(data).items())
    assert _leftovers(tmp_path) == []
    lossless = fstqcodec.save_file(x, path)  # replaces the file
    assert path.stat().st_size == lossless
    assert all(np.array_equal(fstqcodec.load_file(path)[n], x[n]) for n in x)


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_file_gives_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = tmp_path / "update.fstq"
        fstqcodec.save_file(_update(), path)
        fresh = tmp_path / "plain.bin"
        fresh.write_bytes(b"")  # what any new file of the user gets
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(fresh.stat().st_mode)


class _HalfWritingStream:
    """A file object whose write stores half the bytes, then fails as a full disk does."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stream.close()

    def write(self, data):
        self.stream.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_intact(tmp_path, monkeypatch, failing):
    path = tmp_path / "update.fstq"
    path.write_bytes(b"the previous message")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: _HalfWritingStream(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(files.os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        fstqcodec.save_file(_update(), path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update.fstq"]
    assert path.read_bytes() == b"the previous message"


def test_save_file_writes_nothing_when_encoding_fails(tmp_path):
    bad = {"x": np.array([1.0, np.nan], np.float32)}
    with pytest.raises(fstqcodec.EncodeError):
        fstqcodec.save_file(bad, tmp_path / "x.fstq")
    with pytest.raises(TypeError):
        fstqcodec.save_file(_update(), tmp_path / "x.fstq", config=fstqcodec.EncodeConfig(), bits=4)
    assert list(tmp_path.iterdir()) == []


def test_save_file_into_a_missing_directory_names_the_file_asked_for(tmp_path):
    target = tmp_path / "missing" / "x.fstq"
    with pytest.raises(FileNotFoundError) as caught:
        fstqcodec.save_file(_update(), target)
    assert caught.value.filename == str(target)
    assert ".tmp" not in str(caught.value)


def test_load_file_applies_limits_without_reading_past_them(tmp_path, monkeypatch):
    path = tmp_path / "x.fstq"
    fstqcodec.save_file(_update(), path)
    size = path.stat().st_size
    with pytest.raises(fstqcodec.LimitExceededError):
        fstqcodec.load_file(path, limits=fstqcodec.Limits(max_message_size=size - 1))
    with pytest.raises(TypeError):
        fstqcodec.load_file(path, limits={"max_message_size": 1})
    path.write_bytes(path.read_bytes() + b"\x00" * 4096)  # trailing bytes after a valid message
    read_sizes = []

    class RecordingStream:
        def __init__(self, *args):
            self.stream = open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.stream.close()

        def read(self, size=-1):
            read_sizes.append(size)
            return self.stream.read(size)

    monkeypatch.setattr(files, "open", RecordingStream, raising=False)
    with pytest.raises(fstqcodec.TrailingDataError):
        fstqcodec.load_file(path, limits=fstqcodec.Limits(max_message_size=size + 10))
    assert read_sizes == [size + 11]
