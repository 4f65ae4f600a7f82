"""The encoder: from named tensors and a policy's choices to a message (not normative).

Pipeline: :class:`Input` flattens the tensors into one padded (blocks x block_size) matrix;
a *plan* says per block what to send (dropped, quantized with a scale and codes, raw); the
assembler groups quantized blocks into contexts (shared code tables), picks each context's coder,
and frames the sections. :func:`encode_to_budget` runs the Fisher-weighted allocation and
corrects its target from the real message size until the message fills the budget.
"""

from .assembly import assemble
from .budget import encode_to_budget
from .plans import Plan, fixed_plan, lossless_plan
from .source import Input

__all__ = ["Input", "Plan", "lossless_plan", "fixed_plan", "encode_to_budget", "assemble"]
