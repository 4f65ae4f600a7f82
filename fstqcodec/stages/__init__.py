"""Coding stages: bit packing, interleaved rANS, scale encoding, codebooks and quantizers.

Each stage is a pair of pure functions (forward on encode, inverse on decode) over numpy arrays.
The inverse functions run on untrusted data and raise :class:`fstqcodec.BadFormatError` on
anything inconsistent.
"""
