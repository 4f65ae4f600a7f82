"""Decoder limits: every size a message declares is checked against these before allocating.

``None`` passed to a decoder means :data:`DEFAULT_LIMITS`, never "unlimited". The defaults and the
minimum every conforming decoder must accept are normative (``spec/FORMAT.md``, section "Limits").
"""

from __future__ import annotations

import dataclasses

from .errors import LimitExceededError

__all__ = ["Limits", "DEFAULT_LIMITS", "MINIMUM_LIMITS", "check_limit"]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds a decoder enforces on what a message declares.

    Parameters
    ----------
    max_message_size : int
        Largest whole message, in bytes.
    max_header_size : int
        Largest decoded header (the msgpack map), in bytes.
    max_tensors : int
        Most tensors in one message.
    max_ndim : int
        Most dimensions of one tensor.
    max_name_length : int
        Longest tensor name, in UTF-8 bytes.
    max_output_size : int
        Largest total size of the decoded arrays, in bytes (at their output dtypes). Section sizes
        follow exactly from the tensors and contexts, and are checked against those.
    max_blocks : int
        Most blocks in one message. The decoder keeps a few tens of bytes of bookkeeping per block
        (about 45 measured), so this bounds its memory when blocks are small.
    max_contexts : int
        Most contexts (per-block coding choices) in one message. The format caps this at 256.
    max_codebook_entries : int
        Most levels in all explicit codebooks together.
    max_rans_lanes : int
        Most interleaved rANS lanes in one context's stream.
    """

    max_message_size: int = 1 << 31
    max_header_size: int = 16 << 20
    max_tensors: int = 65_536
    max_ndim: int = 32
    max_name_length: int = 1024
    max_output_size: int = 1 << 31
    max_blocks: int = 1 << 24
    max_contexts: int = 256
    max_codebook_entries: int = 65_536
    max_rans_lanes: int = 65_536

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Limits.{field.name} must be an int, got {type(value).__name__}")
            if value < 1:
                # 0 never means "unlimited" here: that would silently disable a safety check.
                raise ValueError(f"Limits.{field.name} must be >= 1, got {value}")


DEFAULT_LIMITS = Limits()

#: The smallest limits a conforming decoder may use when asked for its defaults: a message within
#: these must decode everywhere.
MINIMUM_LIMITS = Limits(
    max_message_size=256 << 20,
    max_header_size=1 << 20,
    max_tensors=4096,
    max_ndim=8,
    max_name_length=256,
    max_output_size=256 << 20,
    max_blocks=1 << 22,
    max_contexts=256,
    max_codebook_entries=4096,
    max_rans_lanes=65_536,
)


def check_limit(limits: Limits, name: str, actual: int, what: str, *, limit: int | None = None) -> None:
    """Raise :class:`LimitExceededError` if ``actual`` exceeds the limit ``name`` of ``limits``.

    ``limit`` overrides the value (for a bound tighter than the field, such as the format's cap).
    """
    limit = getattr(limits, name) if limit is None else limit
    if actual > limit:
        raise LimitExceededError(f"{what}: {actual} exceeds limit {name}={limit}", limit_name=name, limit=limit, actual=actual)
