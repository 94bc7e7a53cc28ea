"""The tied-embedding features have teeth: each faulty candidate of tests/mutants/tied.py fails its feature and
passes model.forward_backward (which its bug does not touch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mutants import tied
from test_conformance_mutants import results_by_feature, run_suite

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("mutant", [tied.WteScalingMissing, tied.TokensHeadUntied], ids=lambda m: m.__name__)
def test_suite_fails_the_tied_mutant_on_its_feature(pytester, monkeypatch, mutant):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report, _ = run_suite(pytester, f"mutants.tied:{mutant.__name__}", "--isolation", "none", "-k",
                          "embedding or forward_backward")  # fmt: skip
    results = results_by_feature(report)
    missed = sorted(f for f in mutant.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant.__name__} was not caught by {missed}: {results}"
    assert results.get("model.forward_backward") == "pass", results
