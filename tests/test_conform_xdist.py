"""``reflora conform -n 2`` (pytest-xdist) reports what a serial run reports: the same per-test and per-feature
outcomes and example counts, known deviations and failures included, in one JSON report and one table.

Each run is a real ``reflora conform`` process (xdist starts worker processes; pytester's in-process runs cannot
host it). The candidates are the reference (every feature passes) and a mutant (tests/mutants/catalog.py) with a
deviations file that declares one of its two failing features a known deviation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

TESTS = Path(__file__).resolve().parent
SELECTION = "layer and not golden and not test_advanced"  # the layer features: seconds, not minutes


def conform(tmp_path: Path, tag: str, candidate: str, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``reflora conform`` (ci profile, 3 examples per feature, the layer features) and read its JSON."""
    report = tmp_path / f"{tag}.json"
    env = dict(os.environ, CI="true", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "reflora.tools.conform", "--candidate", candidate, "--profile", "ci",
           "--max-examples", "3", "-k", SELECTION, "--report-json", str(report), *extra]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert report.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(report.read_text()), done


def outcomes(report: dict) -> tuple[dict, dict]:
    tests = {t["id"]: (t["outcome"], t["examples"]) for t in report["tests"]}
    features = {f["id"]: (f["result"], f["examples"]) for f in report["features"]}
    return tests, features


def test_reference_parallel_equals_serial(tmp_path):
    serial, serial_run = conform(tmp_path, "serial", "reference")
    parallel, parallel_run = conform(tmp_path, "parallel", "reference", "-n", "2")
    assert serial_run.returncode == parallel_run.returncode == 0, parallel_run.stdout[-3000:]
    assert outcomes(parallel) == outcomes(serial)
    assert [t["id"] for t in parallel["tests"]] == [t["id"] for t in serial["tests"]]  # collection order kept
    timeless = [{k: v for k, v in r["summary"].items() if k != "runtime_s"} for r in (serial, parallel)]
    assert parallel["complete"] is True and timeless[0] == timeless[1]
    assert parallel["candidate"] == serial["candidate"]
    assert "2 workers" in parallel_run.stdout
    assert "[  1/" in parallel_run.stdout and "conformance score" in parallel_run.stdout


def test_failures_and_known_deviations_merge(tmp_path):
    deviations = tmp_path / "deviations.json"
    deviations.write_text(json.dumps({"driver": "mutant", "deviations": [
        {"id": "layer.merge.conv1d", "reason": "declared for this test", "issue": None}]}))  # fmt: skip
    candidate = "mutants.catalog:MergeWithoutScaling"
    extra = ("--deviations", str(deviations))
    serial, serial_run = conform(tmp_path, "serial", candidate, *extra)
    parallel, parallel_run = conform(tmp_path, "parallel", candidate, *extra, "-n", "2")
    assert serial_run.returncode == parallel_run.returncode == 1  # layer.merge.linear: an unknown failure
    assert outcomes(parallel) == outcomes(serial)
    results = {f["id"]: f["result"] for f in parallel["features"]}
    assert results["layer.merge.linear"] == "fail" and results["layer.merge.conv1d"] == "known_deviation"
    failed = next(t for t in parallel["tests"] if t["id"] == "layer.merge.linear")
    assert "reflora conform --candidate mutants.catalog:MergeWithoutScaling" in failed["message"]


def test_n_without_xdist_is_a_usage_error(monkeypatch, capsys):
    import importlib.util

    from reflora.tools import conform

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xdist" else real(name, *a))
    assert conform.main(["--candidate", "reference", "-n", "2"]) == 2
    assert "pytest-xdist" in capsys.readouterr().err
