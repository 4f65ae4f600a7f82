"""Build hook for the optional C accelerator; all metadata lives in pyproject.toml.

The extension is optional: where it cannot be compiled, the package installs anyway and uses the
numpy implementation of the same stage (identical bytes, slower).
"""

import sys

from setuptools import Extension, setup

# The encoder's C loops must round exactly as numpy does: no fused multiply-add contraction.
# (-fno-math-errno only lets sqrt vectorise: it never sets errno here, its results are the same.)
_FLAGS = [] if sys.platform == "win32" else ["-ffp-contract=off", "-fno-math-errno"]

setup(ext_modules=[Extension("fstqcodec._speedups", ["fstqcodec/_speedups.c"], extra_compile_args=_FLAGS, optional=True)])
