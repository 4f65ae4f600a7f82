"""Test configuration: hypothesis profiles and an offline environment.

``HYPOTHESIS_PROFILE`` picks the profile: ``default`` (fast, for every run and CI) or ``thorough``
(many more examples, for a run by hand or a nightly job), or ``ci`` (``default`` without the
example database, so CI runs are reproducible).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), database=None, derandomize=True)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
