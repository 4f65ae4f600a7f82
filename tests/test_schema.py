"""Tensors named by a schema digest instead of a list in the header."""

import numpy as np
import pytest

import fstqcodec


def _update():
    rng = np.random.default_rng(0)
    return {
        f"base_model.model.layer.{i}.attention.self.query.lora_{ab}.weight": rng.standard_normal(shape).astype(np.float32) * 1e-3
        for i in range(12)
        for ab, shape in (("A", (8, 96)), ("B", (96, 8)))
    }


def test_schema_round_trip_and_smaller_header():
    update = _update()
    schema = fstqcodec.Schema.of(update)
    plain = fstqcodec.encode(update)
    named = fstqcodec.encode(update, schema=schema)
    # The names are most of a plain header; a schema replaces them with 16 bytes.
    assert fstqcodec.inspect(named, schemas=schema)["header_size"] < 0.6 * fstqcodec.inspect(plain)["header_size"]
    decoded = fstqcodec.decode(named, schemas=[schema])
    assert list(decoded) == list(update)
    for name in update:
        assert decoded[name].tobytes() == update[name].tobytes()


def test_unknown_schema_is_a_decode_error():
    update = _update()
    message = fstqcodec.encode(update, schema=fstqcodec.Schema.of(update))
    with pytest.raises(fstqcodec.UnknownSchemaError):
        fstqcodec.decode(message)
    other = fstqcodec.Schema.of({"x": np.zeros(3, np.float32)})
    with pytest.raises(fstqcodec.UnknownSchemaError):
        fstqcodec.decode(message, schemas=other)


def test_tensors_must_match_the_schema():
    update = _update()
    schema = fstqcodec.Schema.of(update)
    changed = dict(update)
    changed[next(iter(changed))] = np.zeros((8, 95), np.float32)
    with pytest.raises(fstqcodec.EncodeError, match="schema"):
        fstqcodec.encode(changed, schema=schema)
    with pytest.raises(fstqcodec.EncodeError):
        fstqcodec.encode(update, schema=schema, block_size=32)


def test_schema_digest_depends_on_every_field():
    base = fstqcodec.Schema([("a", "float32", (2, 3), 64)])
    for variant in ([("b", "float32", (2, 3), 64)], [("a", "float16", (2, 3), 64)], [("a", "float32", (3, 2), 64)], [("a", "float32", (2, 3), 32)]):
        assert fstqcodec.Schema(variant) != base
    assert fstqcodec.Schema([("a", "float32", [2, 3], 64)]) == base
