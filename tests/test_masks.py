"""Seeded masks (FORMAT.md 5.9): regenerated from the spec alone, round trips, and bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fstqcodec
from fstqcodec import Mask
from tests.common import check_decode_error, reframe, split

# ---------------------------------------------------------------------------------------------
# The generator as FORMAT.md 5.9 states it, in pure Python integers (no numpy, no fstqcodec).

_M64 = (1 << 64) - 1


def spec_splitmix64(seed: int, n: int) -> int:
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def spec_threshold(keep: float) -> int:
    numerator, denominator = keep.as_integer_ratio()
    return (numerator * 2**64) // denominator


def spec_visible(shape, seed: int, keep: float, granularity: str) -> list:
    """Flat C-order list of booleans: element kept by this mask."""
    threshold = spec_threshold(keep)
    size = math.prod(shape)
    out = []
    for flat in range(size):
        if granularity == "element":
            unit = flat
        elif granularity == "row":
            unit = flat // shape[1]
        else:
            unit = flat % shape[1]
        out.append(spec_splitmix64(seed, unit) < threshold)
    return out


CASES = [
    ((7, 9), 0, 0.5, "element"),
    ((7, 9), 12345, 0.9, "row"),
    ((7, 9), 2**64 - 1, 0.3, "column"),
    ((200,), 42, 0.1, "element"),
    ((3, 4, 5), 7, 0.75, "element"),
    ((16, 8), 99, 1.0, "element"),
    ((16, 8), 5, 2.0**-60, "element"),
    ((40, 6), 2**63, 0.7, "row"),
]


@pytest.mark.parametrize("shape,seed,keep,granularity", CASES)
def test_library_masks_match_the_spec_generator(shape, seed, keep, granularity):
    expected = np.array(spec_visible(shape, seed, keep, granularity)).reshape(shape)
    assert np.array_equal(Mask(seed, keep, granularity).visible(shape), expected)


def test_splitmix64_known_outputs():
    # SplitMix64 with state 0: the published first outputs of the reference C code.
    assert spec_splitmix64(0, 0) == 0xE220A8397B1DCDAF
    assert spec_splitmix64(0, 1) == 0x6E789E6AA1B965F4
    from fstqcodec.wire.masks import splitmix64

    assert splitmix64(0, 0, 2).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_keep_rate_is_close_to_keep():
    visible = Mask(3, 0.3).visible((1000, 100))
    assert abs(visible.mean() - 0.3) < 0.005


def _tensors():
    rng = np.random.default_rng(0)
    return {"A": rng.standard_normal((16, 48)).astype(np.float32), "b": rng.standard_normal(100).astype(np.float32)}


def test_round_trip_hidden_zero_visible_exact():
    tensors = _tensors()
    masks = {"A": [Mask(1, 0.7), Mask(2, 0.9, "row"), Mask(3, 0.8, "column")], "b": Mask(4, 0.5)}
    message = fstqcodec.encode(tensors, masks=masks)
    decoded = fstqcodec.decode(message)
    for name, listed in masks.items():
        listed = listed if isinstance(listed, list) else [listed]
        visible = np.logical_and.reduce([m.visible(tensors[name].shape) for m in listed])
        assert np.all(decoded[name][~visible] == 0)
        assert np.array_equal(decoded[name][visible], tensors[name][visible])
    facts = fstqcodec.inspect(message)
    assert facts["version"] == "1.1" and len(facts["masks"]) == 4
    header, _ = split(message)
    assert header["critical"] == ["masks"]
    # Hidden elements cost nothing: the masked message is smaller by about the hidden share.
    assert len(message) < 0.7 * len(fstqcodec.encode(tensors))


def test_messages_without_masks_stay_version_1_0():
    assert fstqcodec.inspect(fstqcodec.encode(_tensors()))["version"] == "1.0"


def test_budget_spent_on_visible_elements():
    tensors = _tensors()
    masks = {"A": Mask(9, 0.5), "b": Mask(8, 0.5)}
    limit = 300
    masked = fstqcodec.decode(fstqcodec.encode(tensors, masks=masks, budget=limit))
    plain = fstqcodec.decode(fstqcodec.encode(tensors, budget=limit))
    visible = masks["A"].visible((16, 48))
    # The same bytes on half the elements: the visible ones are reconstructed more accurately.
    assert np.mean((masked["A"][visible] - tensors["A"][visible]) ** 2) < np.mean((plain["A"][visible] - tensors["A"][visible]) ** 2)


def test_masks_with_schema():
    tensors = _tensors()
    schema = fstqcodec.Schema.of(tensors)
    message = fstqcodec.encode(tensors, masks={"A": Mask(1, 0.5)}, schema=schema)
    decoded = fstqcodec.decode(message, schemas=schema)
    visible = Mask(1, 0.5).visible((16, 48))
    assert np.array_equal(decoded["A"][visible], tensors["A"][visible])
    assert split(message)[0]["critical"] == ["schema", "masks"]


@pytest.mark.parametrize(
    "masks,error",
    [
        ({"nope": Mask(1, 0.5)}, fstqcodec.EncodeError),
        ({"b": Mask(1, 0.5, "row")}, fstqcodec.EncodeError),
        ({"A": "mask"}, TypeError),
    ],
)
def test_encoder_refuses_bad_masks(masks, error):
    with pytest.raises(error):
        fstqcodec.encode(_tensors(), masks=masks)


@pytest.mark.parametrize("args", [(-1, 0.5), (2**64, 0.5), (1, 0.0), (1, 1.5), (1, float("nan")), (1, 0.5, "diagonal"), (1, 0.5, "element", 2)])
def test_mask_parameters_checked(args):
    with pytest.raises(ValueError):
        Mask(*args)


def _masked_message():
    return fstqcodec.encode(_tensors(), masks={"A": Mask(1, 0.5)}, compress_header=False)


def _with_masks(entries) -> bytes:
    header, body = split(_masked_message())
    header["masks"] = entries
    return reframe(header, body, minor=1)


@pytest.mark.parametrize(
    "entries,error",
    [
        ([[0, 1, 1, 0.0, "element"]], fstqcodec.BadMaskError),
        ([[0, 1, 1, 1.0000001, "element"]], fstqcodec.BadMaskError),
        ([[0, 1, 1, -0.5, "element"]], fstqcodec.BadMaskError),
        ([[0, 1, 1, float("nan"), "element"]], fstqcodec.BadMaskError),
        ([[0, 2, 1, 0.5, "element"]], fstqcodec.BadMaskError),
        ([[0, 0, 1, 0.5, "element"]], fstqcodec.BadMaskError),
        ([[1, 1, 1, 0.5, "row"]], fstqcodec.BadMaskError),
        ([[0, 1, 1, 0.5, "diagonal"]], fstqcodec.BadMaskError),
        ([[2, 1, 1, 0.5, "element"]], fstqcodec.BadMaskError),
        ([[0, 1, -1, 0.5, "element"]], fstqcodec.BadMaskError),
        ([[0, 1, 1, 0.5, "element"]] * 5, fstqcodec.BadMaskError),
        ([[0, 1, 1, 1, "element"]], fstqcodec.BadFormatError),
        ([[0, 1, 1, 0.5]], fstqcodec.BadFormatError),
        ({"0": 1}, fstqcodec.BadFormatError),
    ],
)
def test_decoder_refuses_bad_masks(entries, error):
    caught = check_decode_error(_with_masks(entries), error)
    assert type(caught) is error


def test_changed_mask_changes_the_block_count():
    """The blocks cut the visible elements: a header whose mask keeps more of the tensor declares
    more blocks than the body's block table holds."""
    check_decode_error(_with_masks([[0, 1, 1, 0.9, "element"]]), fstqcodec.BadFormatError)


def test_vector_masks_regenerate_from_the_spec():
    """The manifest's expected masks (spec/vectors) from the generator above, and from fstqcodec."""
    import json
    from pathlib import Path

    manifest = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "manifest.json").read_text())
    entries = [mask for vector in manifest["valid"] for mask in vector.get("masks", [])]
    assert len(entries) >= 8
    for entry in entries:
        bits = spec_visible(tuple(entry["shape"]), entry["seed"], entry["keep"], entry["granularity"])
        packed = sum(1 << i for i, kept in enumerate(bits) if kept).to_bytes((len(bits) + 7) // 8, "little")
        assert packed.hex() == entry["mask_hex"] and sum(bits) == entry["kept"]
        library = Mask(entry["seed"], entry["keep"], entry["granularity"], entry["generator"]).visible(tuple(entry["shape"]))
        assert library.reshape(-1).tolist() == bits
