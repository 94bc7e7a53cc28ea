"""Shared test settings: the hypothesis profiles.

Profiles (select with ``HYPOTHESIS_PROFILE=<name>``; CI=true selects ``ci``, anything else defaults to ``dev``):

* ``ci``: derandomized, few examples, no deadline: the same cases on every run, fast on a 2-core machine.
* ``dev``: random examples, a few more of them.
* ``thorough``: many examples, for a long local run (1000 cross-check cases take about 8 minutes on 2 cores).

Tests that need torch, transformers and peft are marked ``torch`` and skip themselves (``pytest.importorskip``)
when those are not installed; the CuPy tests are marked ``gpu`` and skip without CuPy or a GPU.
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a test extra: without it only the property-based tests are skipped
    settings = None

if settings is not None:
    common = {"deadline": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("ci", derandomize=True, max_examples=30, **common)
    settings.register_profile("dev", max_examples=60, **common)
    settings.register_profile("thorough", max_examples=1000, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))
