"""fstqcodec: Fisher-guided compression of federated fine-tuning updates.

A specified wire format for sparse, mixed-precision tensor updates (``spec/FORMAT.md``), an encoder
that allocates bits by Fisher-weighted rate-distortion optimisation under a byte budget, and a
decoder safe on untrusted bytes. ``import fstqcodec`` needs only numpy, msgpack and zstandard;
the adapters (``fstqcodec.torch``, ``fstqcodec.peft``, ``fstqcodec.flower``) import their frameworks.
"""

from .aggregate import Rejection, StreamingAggregator
from .codec import decode, encode, inspect
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
from .limits import DEFAULT_LIMITS, MINIMUM_LIMITS, Limits
from .policy.budget import Budget
from .wire.container import VERSION_MAJOR, VERSION_MINOR
from .wire.header import Schema

__version__ = "0.1.0"
FORMAT_VERSION = (VERSION_MAJOR, VERSION_MINOR)

__all__ = [
    "encode",
    "decode",
    "inspect",
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
