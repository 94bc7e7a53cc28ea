"""The suite has teeth: it fails each deliberately wrong candidate (tests/mutants/catalog.py) on the features
its bug touches, and still passes the features it does not touch.

Each mutant runs through the real plugin (pytester, in-process, a reduced ci profile: derandomized, 4
examples per feature, golden fixtures left out) and the test reads the JSON report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mutants import catalog

import conformance

pytest_plugins = ["pytester"]
CONFORMANCE_DIR = str(Path(conformance.__file__).parent)


def run_suite(pytester, candidate: str, *extra: str) -> tuple[dict, object]:
    report = pytester.path / "report.json"
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "-p", "no:cacheprovider", "-q", "--candidate", candidate, "--profile", "ci",
        "--max-examples", "4", "-k", "not golden and not test_advanced", "--report-json", str(report), *extra,
    )  # fmt: skip
    return json.loads(report.read_text()), result


def results_by_feature(report: dict) -> dict[str, str]:
    return {f["id"]: f["result"] for f in report["features"]}


@pytest.mark.parametrize("mutant", catalog.VALUE_MUTANTS, ids=lambda m: m.__name__)
def test_suite_fails_the_mutant_on_its_feature(pytester, monkeypatch, mutant):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report, result = run_suite(pytester, f"mutants.catalog:{mutant.__name__}", "--isolation", "none")
    results = results_by_feature(report)
    missed = sorted(f for f in mutant.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant.__name__} ({mutant.BUG}) was not caught by {missed}: {results}"
    wrongly = sorted(f for f in mutant.MUST_PASS if results.get(f) != "pass")
    assert not wrongly, f"{mutant.__name__}: features its bug does not touch did not pass: {wrongly}: {results}"
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    failing = [t for t in report["tests"] if t["outcome"] == "failed"]
    assert all("reflora conform --candidate mutants.catalog:" in t["message"] for t in failing)


def test_square_transpose_is_caught_by_values_not_by_a_shape_error(pytester, monkeypatch):
    """attn.c_proj is square: the transposed delta runs without error there and must be caught by value."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report, _ = run_suite(pytester, "mutants.catalog:Conv1dDeltaTransposedSquare", "--isolation", "none")
    test = next(t for t in report["tests"] if t["id"] == "model.forward_backward")
    assert test["outcome"] == "failed"
    assert "candidate raised" not in test["message"]
    assert "✗ logits" in test["message"]


def test_raise_crash_and_hang_fail_their_own_feature_and_the_run_goes_on(pytester, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    for mutant in catalog.ROBUSTNESS_MUTANTS:
        names = sorted(mutant.MUST_FAIL | mutant.MUST_PASS)
        report, result = run_suite(
            pytester, f"mutants.catalog:{mutant.__name__}", "--isolation", "subprocess", "--candidate-timeout", "5",
            "--max-examples", "2", "-k", " or ".join(f"[{n}]" for n in names),
        )  # fmt: skip
        results = results_by_feature(report)
        assert all(results[f] == "fail" for f in mutant.MUST_FAIL), (mutant.__name__, results)
        assert all(results[f] == "pass" for f in mutant.MUST_PASS), (mutant.__name__, results)
        message = next(t["message"] for t in report["tests"] if t["feature"] in mutant.MUST_FAIL)
        expected = {"RaisesOnMerge": "candidate raised", "CrashesOnSwitch": "candidate crashed",
                    "HangsOnRslora": "candidate hung"}[mutant.__name__]  # fmt: skip
        assert expected in message, message
        assert result.ret == pytest.ExitCode.TESTS_FAILED
