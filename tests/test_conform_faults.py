"""`reflora conform` against bad input and faulty drivers, as a user meets them (issue 14, the runner's part).

Each faulty driver is a small module written in tmp_path (a subclass of the reference driver with one fault);
each run goes through the command line in a subprocess: exit status, one line naming the problem, no
traceback, and the JSON report where one is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conformance.deviations import stack_hints
from conformance.plugin import default_golden_dir
from conformance.report import examples_text, ratio_text, render_text, score_line
from reflora.golden import GoldenError, read_manifest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"
ONE = ["--max-examples", "1", "--profile", "ci"]


def conform(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CI": "true"}
    return subprocess.run([sys.executable, "-m", "reflora.tools", "conform", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def driver_module(tmp_path: Path, name: str, body: str, versions: str = '{"candidate": "faulty 0.0"}') -> str:
    """A module ``name`` in tmp_path with ``driver``: the reference driver with ``body`` added to its class."""
    source = f'''
import os
import time

from conformance.drivers.reference import ReferenceDriver


class Faulty(ReferenceDriver):
    name = "{name}"

    def versions(self):
        return {versions}
{textwrap.indent(textwrap.dedent(body), "    ")}

driver = Faulty()
'''
    (tmp_path / f"{name}.py").write_text(source)
    return f"{name}:driver"


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- class 3


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_timeout_that_cannot_be_met_is_refused(tmp_path, value):
    result = conform(tmp_path, "--candidate", "reference", "--timeout", value)
    assert result.returncode == 2
    assert_one_line_error(result, "--timeout", "> 0")


@pytest.mark.parametrize(("flag", "value", "word"), [("--report-json", "", "empty path"),
                                                    ("--report-json", ".", "is a folder"),
                                                    ("--junitxml", "", "empty path")])  # fmt: skip
def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, flag, value, word):
    result = conform(tmp_path, "--candidate", "reference", flag, value)
    assert result.returncode == 2
    assert_one_line_error(result, flag, word)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_max_examples_zero_is_refused(tmp_path):
    result = conform(tmp_path, "--candidate", "reference", "--max-examples", "0")
    assert result.returncode == 2
    assert_one_line_error(result, "--max-examples", "at least 1")


def test_pytest_plugin_refuses_a_zero_timeout_too(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance", "-p", "no:cacheprovider",
                             "--candidate", "reference", "--candidate-timeout", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--candidate-timeout" in result.stderr and "Traceback" not in result.stderr


def corrupted_corpus(tmp_path: Path, name: str = "bias_all") -> Path:
    golden = tmp_path / "golden"
    shutil.copytree(GOLDEN, golden, ignore=shutil.ignore_patterns("trajectories"))
    fixture = golden / "fixtures" / f"{name}.safetensors"
    data = bytearray(fixture.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the last tensor: the candidate would otherwise be blamed
    fixture.write_bytes(bytes(data))
    return golden


def test_corrupted_fixture_is_reported_as_such_not_blamed_on_the_candidate(tmp_path):
    golden = corrupted_corpus(tmp_path)
    report = tmp_path / "report.json"
    result = conform(tmp_path, "--candidate", "reference", "--golden-dir", str(golden), "-k", "bias_all",
                     "--report-json", str(report))  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:]
    assert "fixture corrupted" in result.stdout and "Traceback" not in result.stdout + result.stderr
    data = json.loads(report.read_text())
    (test,) = [t for t in data["tests"] if t["id"] == "golden.replay.bias_all"]
    assert test["outcome"] == "skipped" and test["reason"].startswith("fixture corrupted: ")
    assert data["summary"]["fixtures_corrupted"] == ["golden.replay.bias_all"]
    assert data["summary"]["unknown_failures"] == 0
    assert all(f["result"] != "fail" for f in data["features"])


# ---------------------------------------------------------------------------------------------- class 4


@pytest.mark.parametrize("isolation", ["subprocess", "none"])
def test_versions_that_hang_are_under_the_timeout(tmp_path, isolation):
    candidate = driver_module(tmp_path, "hangs_in_versions", "", versions="time.sleep(600)")
    start = time.monotonic()
    result = conform(tmp_path, "--candidate", candidate, "--timeout", "2", "--isolation", isolation, *ONE,
                     "-k", "layer.merge.linear", timeout=120)  # fmt: skip
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    assert "versions()" in result.stderr and "hung" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_in_process_hang_is_interrupted_and_the_run_goes_on(tmp_path):
    body = """
    def layer_merge(self, case):
        try:
            time.sleep(600)
        except Exception:  # the alarm is a BaseException: a driver's own except Exception does not hide it
            pass
    """
    candidate = driver_module(tmp_path, "hangs_in_merge", body)
    report = tmp_path / "report.json"
    result = conform(tmp_path, "--candidate", candidate, "--timeout", "2", "--isolation", "none", *ONE,
                     "-k", "layer.merge.linear or layer.forward_backward.linear", "--report-json", str(report),
                     timeout=120)  # fmt: skip
    assert result.returncode == 1
    data = json.loads(report.read_text())
    assert data["complete"] is True and data["running"] is None
    outcomes = {t["id"]: t["outcome"] for t in data["tests"]}
    assert outcomes == {"layer.forward_backward.linear": "passed", "layer.merge.linear": "failed"}
    (merge,) = [t for t in data["tests"] if t["id"] == "layer.merge.linear"]
    assert "hung" in merge["message"] and "no answer within 2 s" in merge["message"]


def test_in_process_os_exit_leaves_the_partial_report(tmp_path):
    candidate = driver_module(tmp_path, "exits_in_merge", "def layer_merge(self, case):\n    os._exit(3)\n")
    report = tmp_path / "report.json"
    result = conform(tmp_path, "--candidate", candidate, "--isolation", "none", *ONE,
                     "-k", "layer.merge.linear or layer.forward_backward.linear", "--report-json", str(report))  # fmt: skip
    assert result.returncode == 3  # the driver's own exit status: the process is gone
    data = json.loads(report.read_text())
    assert data["complete"] is False and data["running"] == "layer.merge.linear"
    outcomes = {t["id"]: t["outcome"] for t in data["tests"]}
    assert outcomes == {"layer.forward_backward.linear": "passed", "layer.merge.linear": "not run"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary report left behind


def test_subprocess_isolation_survives_os_exit(tmp_path):
    candidate = driver_module(tmp_path, "exits_in_merge2", "def layer_merge(self, case):\n    os._exit(3)\n")
    report = tmp_path / "report.json"
    result = conform(tmp_path, "--candidate", candidate, *ONE, "-k", "layer.merge.linear",
                     "--report-json", str(report))  # fmt: skip
    assert result.returncode == 1
    data = json.loads(report.read_text())
    assert data["complete"] is True and data["tests"][0]["outcome"] == "failed"
    assert "crashed" in data["tests"][0]["message"]


# ---------------------------------------------------------------------------------------------- class 5


def test_unknown_candidate_is_a_usage_error(tmp_path):
    result = conform(tmp_path, "--candidate", "no_such_driver")
    assert result.returncode == 2
    assert_one_line_error(result, "no_such_driver", "not a shipped driver")


def test_replay_with_an_incomplete_spec_names_the_missing_key(tmp_path):
    result = conform(tmp_path, "--candidate", "reference", "--replay", '{"feature": "layer.merge.linear"}')
    assert result.returncode == 2
    assert_one_line_error(result, "--replay", "'seed'")
    result = conform(tmp_path, "--candidate", "reference", "--replay", '{"feature": "golden.replay"}')
    assert result.returncode == 2
    assert_one_line_error(result, "--replay", "'fixture'")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- class 6


def manifest_copy(tmp_path: Path, change) -> Path:
    golden = tmp_path / "golden"
    golden.mkdir(parents=True)
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    change(manifest)
    (golden / "manifest.json").write_text(json.dumps(manifest))
    return golden


def test_manifest_unknown_fields_are_refused(tmp_path):
    golden = manifest_copy(tmp_path / "a", lambda m: m.update(extra=1))
    with pytest.raises(GoldenError, match=r"unknown fields \['extra'\]"):
        read_manifest(golden)
    golden = manifest_copy(tmp_path / "b", lambda m: m["cases"]["bias_all"].update(sha265="0" * 64))
    with pytest.raises(GoldenError, match=r"'bias_all' has unknown fields \['sha265'\]"):
        read_manifest(golden)
    result = conform(tmp_path, "--candidate", "reference", "--golden-dir", str(golden))
    assert result.returncode == 2
    assert_one_line_error(result, "--golden-dir", "sha265")


@pytest.mark.parametrize("file", ["../../etc/passwd", "/etc/passwd", "fixtures/../../outside.safetensors"])
def test_manifest_file_leaving_the_corpus_folder_is_refused(tmp_path, file):
    golden = manifest_copy(tmp_path, lambda m: m["cases"]["bias_all"].update(file=file))
    with pytest.raises(GoldenError, match=r"'bias_all'.*leaves the corpus folder"):
        read_manifest(golden)
    result = conform(tmp_path, "--candidate", "reference", "--golden-dir", str(golden))
    assert result.returncode == 2
    assert_one_line_error(result, "bias_all", "leaves the corpus folder")


# ---------------------------------------------------------------------------------------------- the console


def test_console_progress_replay_line_and_same_stack_hint(tmp_path):
    body = """
    def model_forward_backward(self, case):
        result = super().model_forward_backward(case)
        result["logits"] = result["logits"] + 1.0  # wrong everywhere
        return result
    """
    versions = '{"candidate": "mylora 0.1", "framework": "torch 2.0", "transformers": "5.0"}'
    candidate = driver_module(tmp_path, "wrong_logits", body, versions=versions)
    result = conform(
        tmp_path, "--candidate", candidate, *ONE, "-k", "model.position_ids.without_mask or layer.merge.linear"
    )
    assert result.returncode == 1
    out = result.stdout
    assert "[  1/2] " in out and "[  2/2] " in out  # a line per feature as it finishes
    assert "layer.merge.linear" in out.split("[  1/2] ")[1].splitlines()[0] or "[  2/2] layer.merge.linear" in out
    # the replay line runs from the same folder with the same import path
    assert f"cd {tmp_path} && PYTHONPATH={tmp_path} reflora conform --candidate {candidate} --replay" in out
    assert "hint: model.position_ids.without_mask fails like the known deviation" in out
    assert "shares transformers" in out
    # the table: core rows first; headline over what the candidate declares
    assert "conformance score: 50% of what wrong_logits declares" in out and "Coverage: 50% of all 2" in out


def test_ratio_and_examples_text():
    assert ratio_text(0.0612) == "0.06" and ratio_text(42.4) == "42"
    assert ratio_text(74941754944661.05) == "7.5e+13"
    assert examples_text({"examples": 5, "after_failure": 0}) == "5"
    assert examples_text({"examples": 5, "after_failure": 4}) == "1 (+4 reruns)"


def minimal_report(features):
    counts = {r: sum(f["result"] == r for f in features) for r in ("pass", "fail", "known_deviation", "not_supported",
                                                                    "skipped")}  # fmt: skip
    supported = counts["pass"] + counts["fail"] + counts["known_deviation"]
    summary = {**{f"features_{k}": v for k, v in counts.items()}, "features": len(features),
               "score": counts["pass"] / len(features), "supported_score": counts["pass"] / supported,
               "examples": 3, "runtime_s": 1.0, "fixtures_corrupted": []}  # fmt: skip
    return {"candidate": {"name": "lib"}, "reflora": {"version": "0"}, "features": features, "summary": summary,
            "tests": [], "deviations": {"unmatched": [], "not_reproduced": []}}  # fmt: skip


def test_table_puts_core_features_before_advanced_not_supported_rows():
    row = {"worst": None, "reason": None, "examples": 0, "after_failure": 0}
    features = [{**row, "id": "model.merge.lora", "level": "advanced", "result": "not_supported", "reason": "no"},
                {**row, "id": "layer.merge.linear", "level": "layer", "result": "pass", "examples": 3}]  # fmt: skip
    text = render_text(minimal_report(features))
    assert text.index("layer.merge.linear") < text.index("model.merge.lora")
    line = score_line(minimal_report(features))
    assert line.startswith("conformance score: 100% of what lib declares") and "Coverage: 50% of all 2" in line


def test_stack_hint_names_the_shared_library():
    hints = stack_hints(["model.position_ids.without_mask"], "x:y", {"candidate": "peft 0.21", "framework": "torch"},
                        None)  # fmt: skip
    assert hints["model.position_ids.without_mask"]["driver"] == "peft"
    assert stack_hints(["model.position_ids.without_mask"], "x:y", {"candidate": "other 1"}, None) == {}


# ---------------------------------------------------------------------------------------------- friction


def test_golden_dir_is_discoverable(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setenv("REFLORA_GOLDEN_DIR", str(tmp_path))
    assert default_golden_dir() == str(tmp_path)
    monkeypatch.delenv("REFLORA_GOLDEN_DIR")
    assert default_golden_dir() == str(GOLDEN)


def test_pytest_pyargs_outside_the_checkout(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance", "-p", "no:cacheprovider",
                             "--candidate", "reference", "--max-examples", "1", "-k", "layer.merge.linear"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert "conformance score: 100%" in result.stdout
