"""Replay every fuzz corpus input and every recorded crash through the fuzz targets.

The targets' ``test_one_input`` functions are plain Python (atheris is imported only when a
target runs as a fuzzer), so this runs under ordinary pytest on every CI run. A crash file that
reproduces an open bug is listed in ``OPEN_BUGS`` and expected to fail (strictly: when the bug is
fixed the test reports XPASS and the entry must be removed).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import warnings

import pytest

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = ("fuzz_decode", "fuzz_inspect", "fuzz_roundtrip")

#: crash file (target/name) -> the open bug it reproduces. Remove an entry once the bug is fixed.
OPEN_BUGS: dict = {}


def _load(target: str):
    sys.path.insert(0, str(FUZZ))
    try:
        spec = importlib.util.spec_from_file_location(f"_replay_{target}", FUZZ / f"{target}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FUZZ))
    return module


def _inputs(kind: str):
    for target in TARGETS:
        directory = FUZZ / kind / target
        for path in sorted(directory.iterdir()) if directory.is_dir() else ():
            if path.is_file() and not path.name.startswith("."):
                yield target, path


def test_every_target_has_a_corpus():
    for target in TARGETS:
        assert (FUZZ / f"{target}.py").is_file()
        files = list((FUZZ / "corpus" / target).iterdir())
        assert len(files) >= 10, f"fuzz/corpus/{target} has {len(files)} files; run fuzz/make_corpus.py"


@pytest.fixture(scope="module")
def targets():
    return {target: _load(target) for target in TARGETS}


def _open_bug_inputs() -> set:
    return {(FUZZ / "crashes" / key).read_bytes() for key in OPEN_BUGS if (FUZZ / "crashes" / key).is_file()}


@pytest.mark.parametrize("target", TARGETS)
def test_replay_corpus(targets, target):
    """Every seed and every unit the fuzzers kept: no exception escapes the target.

    A corpus input that reproduces an open bug is replayed (as an expected failure) by
    test_replay_crash from its copy under crashes/, and skipped here.
    """
    open_bugs = _open_bug_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for found_target, path in _inputs("corpus"):
            data = path.read_bytes()
            if found_target == target and data not in open_bugs:
                targets[target].test_one_input(data)


_CRASHES = list(_inputs("crashes"))


@pytest.mark.parametrize(
    "target, path",
    [
        pytest.param(t, p, marks=pytest.mark.xfail(strict=True, reason=OPEN_BUGS[f"{t}/{p.name}"]))
        if f"{t}/{p.name}" in OPEN_BUGS
        else (t, p)
        for t, p in _CRASHES
    ],
    ids=[f"{t}/{p.name}" for t, p in _CRASHES],
)
def test_replay_crash(targets, target, path):
    """Past crashes stay fixed (or, for open bugs, still fail as recorded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        targets[target].test_one_input(path.read_bytes())


def test_open_bugs_have_files():
    for key in OPEN_BUGS:
        assert (FUZZ / "crashes" / key).is_file(), f"OPEN_BUGS names a missing file: {key}"
