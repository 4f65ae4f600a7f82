"""Build hook for the optional C accelerator; all metadata lives in pyproject.toml.

The extension is optional: where it cannot be compiled, the package installs anyway and uses the
numpy implementation of the same stage (identical bytes, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fstqcodec._speedups", ["fstqcodec/_speedups.c"], optional=True)])
