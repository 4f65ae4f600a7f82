"""fstqcodec: Fisher-guided compression of federated fine-tuning updates.

A specified wire format for sparse, mixed-precision tensor updates (``spec/FORMAT.md``), an encoder
that allocates bits by Fisher-weighted rate-distortion optimisation under a byte budget, and a
decoder safe on untrusted bytes. ``import fstqcodec`` needs only numpy, msgpack and zstandard;
the adapters (``fstqcodec.torch``, ``fstqcodec.peft``, ``fstqcodec.flower``) import their frameworks.
"""

from .aggregate import Rejection, StreamingAggregator
from .codec import decode, encode, inspect, open  # noqa: A004 (fstqcodec.open, like safe_open)
from .config import FEDERATED_FISHER_POWER, EncodeConfig
from .errors import (
    BadFormatError,
    BudgetError,
    ChecksumError,
    DecodeError,
    EncodeError,
    FstqError,
    LimitExceededError,
    TrailingDataError,
    TruncatedError,
    UnsupportedFeatureError,
    UnknownSchemaError,
    UnsupportedVersionError,
)
from .feedback import ErrorFeedback
from .files import load_file, save_file
from .limits import DEFAULT_LIMITS, MINIMUM_LIMITS, Limits
from .message import Message
from .policy.budget import Budget
from .wire.container import VERSION_MAJOR, VERSION_MINOR
from .wire.header import Schema

__version__ = "0.1.0"
FORMAT_VERSION = (VERSION_MAJOR, VERSION_MINOR)

__all__ = [
    "encode",
    "decode",
    # "open" is public (fstqcodec.open) but left out here, so that `from fstqcodec import *`
    # does not shadow the builtin open.
    "inspect",
    "save_file",
    "load_file",
    "Message",
    "StreamingAggregator",
    "Rejection",
    "Budget",
    "EncodeConfig",
    "FEDERATED_FISHER_POWER",
    "ErrorFeedback",
    "Limits",
    "Schema",
    "DEFAULT_LIMITS",
    "MINIMUM_LIMITS",
    "FORMAT_VERSION",
    "FstqError",
    "EncodeError",
    "BudgetError",
    "DecodeError",
    "TruncatedError",
    "BadFormatError",
    "UnsupportedVersionError",
    "UnsupportedFeatureError",
    "ChecksumError",
    "TrailingDataError",
    "LimitExceededError",
    "UnknownSchemaError",
]
