"""The suite's machinery, end to end through pytest and the CLI, against the reference driver and mutants:
choosing a candidate, the header, known deviations, the JSON report, replays, and never passing by running
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import conformance
from conformance.drivers.reference import ReferenceDriver
from conformance.features import FEATURES, missing_capability
from reflora.tools.conform import main as conform_main

pytest_plugins = ["pytester"]
CONFORMANCE_DIR = str(Path(conformance.__file__).parent)
TESTS_DIR = str(Path(__file__).parent)
QUICK = ("-p", "no:cacheprovider", "--profile", "ci", "--max-examples", "2", "--isolation", "none")


@pytest.fixture
def mutants_importable(monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)


def test_without_a_candidate_the_suite_stops_with_a_clear_error(pytester, capsys):
    result = pytester.runpytest_inprocess(CONFORMANCE_DIR, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no candidate given" in result.stderr.str()
    assert conform_main([]) == 2
    assert "no candidate given" in capsys.readouterr().err


def test_an_unknown_candidate_is_a_usage_error_naming_the_shipped_drivers(pytester):
    result = pytester.runpytest_inprocess(CONFORMANCE_DIR, "--candidate", "no_such_library", *QUICK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "not a shipped driver" in result.stderr.str() and "reference" in result.stderr.str()


def test_the_reference_passes_everything_and_the_report_says_so(pytester):
    report_path = pytester.path / "report.json"
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "--candidate", "reference", *QUICK, "--report-json", str(report_path), "--junitxml", str(junit)
    )
    assert result.ret == pytest.ExitCode.OK
    header = result.stdout.str()
    assert "reflora conformance: candidate reference" in header and "profile=ci" in header
    assert "candidate reflora" in header and "framework numpy" in header and "tolerance: factor=" in header
    assert "conformance score: 100%" in header
    report = json.loads(report_path.read_text())
    assert report["format"] == "reflora-conformance/1"
    assert report["candidate"]["versions"]["candidate"].startswith("reflora ")
    assert {f["id"] for f in report["features"]} >= set(FEATURES)
    # the only features the reference does not declare: the layer-level half precisions (NumPy has no bfloat16;
    # reflora evaluates in float64 / float32) and the init laws of other libraries (conformance/init_laws.py)
    undeclared = {f.id for f in FEATURES.values() if missing_capability(ReferenceDriver.capabilities, f.needs)}
    assert all(fid.startswith(("layer.bfloat16.", "layer.float16.", "layer.init.")) for fid in undeclared), undeclared
    outcomes = {f["id"]: f["result"] for f in report["features"]}
    assert all(v in ("pass", "skipped") or (v == "not_supported" and k in undeclared) for k, v in outcomes.items()), (
        report["features"]
    )
    assert report["summary"]["unknown_failures"] == 0 and report["summary"]["checked"] > 0
    layer = next(f for f in report["features"] if f["id"] == "layer.forward_backward.conv1d")
    assert layer["examples"] == 2 and layer["worst"]["ratio"] < 1
    assert "testcase" in junit.read_text()


def test_a_known_deviation_is_reported_as_such_and_does_not_fail_the_run(pytester, mutants_importable):
    deviations = pytester.path / "deviations.json"
    deviations.write_text(json.dumps({"driver": "mutant", "deviations": [
        {"id": "layer.merge", "reason": "this build forgets the scaling when merging", "issue": "https://example.org/1"},
        # a dot boundary: "layer.merge" covers layer.merge.<layout> only, the others are named ("." = a prefix)
        {"id": "layer.merge_square", "reason": "the same on a square weight"},
        {"id": "layer.merge_qkv_slices.", "reason": "the same per slice"},
        {"id": "layer.rslora.linear", "reason": "claims rsLoRA is off, but it passes"},
        {"id": "model.no_such_feature", "reason": "a typo"},
    ]}))  # fmt: skip
    report_path = pytester.path / "report.json"
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "--candidate", "mutants.catalog:MergeWithoutScaling", *QUICK, "-k", "layer.merge or layer.rslora",
        "--deviations", str(deviations), "--report-json", str(report_path),
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    report = json.loads(report_path.read_text())
    results = {f["id"]: f["result"] for f in report["features"]}
    assert results["layer.merge.linear"] == results["layer.merge.conv1d"] == "known_deviation"
    assert results["layer.merge_square.linear"] == results["layer.merge_qkv_slices.conv1d"] == "known_deviation"
    assert results["layer.rslora.linear"] == "pass"
    assert report["deviations"]["unmatched"] == ["model.no_such_feature"]
    assert report["deviations"]["not_reproduced"] == ["layer.rslora.linear"]
    out = result.stdout.str()
    assert "known deviation 'model.no_such_feature' matches no test" in out
    assert "known deviation 'layer.rslora.linear' did not reproduce" in out


def test_a_failure_prints_a_replay_command_that_reproduces_it_alone(pytester, mutants_importable, tmp_path, capsys):
    report_path = pytester.path / "report.json"
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "--candidate", "mutants.catalog:ScalingMissing", *QUICK, "-k", "layer.forward_backward.linear",
        "--report-json", str(report_path),
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    message = json.loads(report_path.read_text())["tests"][0]["message"]
    assert "Draw 1 (dtype)" in message  # hypothesis prints every labelled draw
    spec = message.split("--replay '")[1].split("'")[0]
    dump = tmp_path / "case.safetensors"
    code = conform_main(["--candidate", "mutants.catalog:ScalingMissing", "--isolation", "none", "--replay", spec,
                         "--dump", str(dump)])  # fmt: skip
    assert code == 1
    assert "✗ y" in capsys.readouterr().out
    with safe_open(str(dump), "numpy") as handle:
        names = set(handle.keys())
        assert json.loads(handle.metadata()["spec"]) == json.loads(spec)
    assert {"input/x", "input/weight", "input/dy", "expected/y", "candidate/y"} <= names
    assert conform_main(["--candidate", "reference", "--isolation", "none", "--replay", spec]) == 0


def test_an_object_that_is_not_a_driver_is_a_usage_error(pytester):
    pytester.makepyfile(not_a_driver="name = 'x'\n")
    pytester.syspathinsert()
    result = pytester.runpytest_inprocess(CONFORMANCE_DIR, "--candidate", "not_a_driver:name", *QUICK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a driver" in result.stderr.str()


def test_a_module_driver_with_no_capability_checks_nothing_and_exits_5(pytester):
    package = pytester.mkpydir("nothing_pkg")
    (package / "driver.py").write_text(
        "from conformance.protocol import Capabilities\n"
        "name = 'nothing'\n"
        "capabilities = Capabilities(notes={'layer_layouts': 'no LoRA layers here'})\n"
        "def versions():\n    return {'candidate': 'nothing 0', 'framework': 'none'}\n"
    )
    pytester.syspathinsert()
    report_path = pytester.path / "report.json"
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "--candidate", "nothing_pkg.driver:", *QUICK, "-k", "layer", "--report-json", str(report_path)
    )
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout.str()
    report = json.loads(report_path.read_text())
    assert all(f["result"] == "not_supported" for f in report["features"])
    layer = next(f for f in report["features"] if f["id"] == "layer.forward_backward.linear")
    assert "no LoRA layers here" in layer["reason"]
    assert report["summary"]["score"] == 0.0


def test_deviation_ids_match_at_a_dot_boundary():
    from conformance.deviations import Deviation, covers, match

    assert covers("layer.merge", "layer.merge.linear") and covers("layer.merge", "layer.merge.conv1d")
    assert not covers("layer.merge", "layer.merge_square.linear")
    assert not covers("layer.merge", "layer.merge_qkv_slices.conv1d")
    assert covers("layer.merge.linear", "layer.merge.linear") and not covers("layer.merge.linear", "layer.merge")
    assert not covers("layer.init.kaiming_uniform", "layer.init.kaiming_uniform_transposed.linear")
    assert not covers("layer.init.he_uniform", "layer.init.he_uniform_b.conv1d")
    assert covers("layer.init.he_uniform", "layer.init.he_uniform.conv1d")
    assert not covers("model.dora.init", "model.dora.init_zero_row")
    # a feature's own id names that feature only; golden.replay covers its fixtures' tests
    assert covers("model.dora", "model.dora") and not covers("model.dora", "model.dora.init")
    assert covers("golden.replay", "golden.replay.target_c_attn") and covers("golden.replay.", "golden.replay.x")
    # an id ending in "." is an explicit prefix (not the feature itself); a group that is no feature covers below it
    assert covers("model.dora.", "model.dora.init_zero_row") and not covers("model.dora.", "model.dora")
    assert covers("model.merge", "model.merge.dora") and not covers("model.merge.dora", "model.merge.dora_zero_row")
    assert covers("file.load.c_attn", "file.load.c_attn") and not covers("file.load", "file.loader.x")
    deviations = [Deviation("layer.merge", "r1"), Deviation("layer.merge_square.", "r2")]
    assert match(deviations, "layer.merge.linear").reason == "r1"
    assert match(deviations, "layer.merge_square.conv1d").reason == "r2"
    assert match(deviations, "layer.merge_qkv_slices.linear") is None


def test_shipped_deviations_cover_only_what_they_name():
    """Every shipped entry covers some feature's tests, and none covers a feature its id merely starts with."""
    from conformance.deviations import SHIPPED_DEVIATIONS, covers, load_deviations

    ids = list(FEATURES)
    for file in sorted(SHIPPED_DEVIATIONS.glob("*.json")):
        for deviation in load_deviations(file):
            if deviation.id == "golden.replay":
                continue
            covered = [t for t in ids if covers(deviation.id, t)]
            assert covered, f"{file.name}: {deviation.id} covers no feature"
            group = deviation.id if deviation.id.endswith(".") else deviation.id + "."
            assert all(t == deviation.id or t.startswith(group) for t in covered), (file.name, covered)
