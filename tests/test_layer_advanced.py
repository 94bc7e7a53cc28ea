"""Layer-level advanced features (issue 15.1): square weights in layer merge and unmerge, DoRA (detached and
full norm) and lora_bias on one layer.

``layer.merge_square.<layout>`` / ``layer.unmerge_square.<layout>`` draw in_features == out_features: a delta
transposed only on square Conv1D weights runs without a shape error and must be caught by value
(tests/mutants/layer.py). The existing layer.merge/unmerge draws are unchanged (never square).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mutants import layer

import conformance
from conformance.drivers.reference import ReferenceDriver
from conformance.features import FEATURES
from conformance.strategies import draw_layer_spec

pytest_plugins = ["pytester"]
CONFORMANCE_DIR = str(Path(conformance.__file__).parent)
SQUARE = ("layer.merge_square.linear", "layer.merge_square.conv1d", "layer.unmerge_square.linear",
          "layer.unmerge_square.conv1d")  # fmt: skip


def run_layer(pytester, candidate: str, select: str = "test_layer and merge") -> dict[str, str]:
    report = pytester.path / "report.json"
    pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "-p", "no:cacheprovider", "-q", "--candidate", candidate, "--profile", "ci",
        "--max-examples", "4", "--isolation", "none", "-k", select, "--report-json", str(report),
    )  # fmt: skip
    return {f["id"]: f["result"] for f in json.loads(report.read_text())["features"]}


def test_square_features_are_registered_with_layer_merge():
    for fid in SQUARE:
        feature = FEATURES[fid]
        assert feature.level == "layer" and feature.method == "layer_merge"
        assert "merge" in feature.needs


@pytest.mark.parametrize("fid", SQUARE)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_square_draws_are_square_and_r_differs(fid, data):
    spec = draw_layer_spec(data, FEATURES[fid], ReferenceDriver().capabilities)
    assert spec["in_features"] == spec["out_features"] != spec["r"]


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_existing_merge_draws_stay_non_square(data):
    for fid in ("layer.merge.conv1d", "layer.unmerge.linear"):
        spec = draw_layer_spec(data, FEATURES[fid], ReferenceDriver().capabilities)
        assert spec["in_features"] != spec["out_features"]


def test_reference_passes_every_layer_merge_feature(pytester):
    results = run_layer(pytester, "reference")
    assert set(SQUARE) <= set(results)
    assert all(v == "pass" for v in results.values()), results


@pytest.mark.parametrize("mutant", layer.LAYER_MUTANTS, ids=lambda m: m.__name__)
def test_transposed_delta_on_square_conv1d_is_caught(pytester, monkeypatch, mutant):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    results = run_layer(pytester, f"mutants.layer:{mutant.__name__}")
    missed = sorted(f for f in mutant.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant.__name__} ({mutant.BUG}) was not caught by {missed}: {results}"
    wrongly = sorted(f for f in mutant.MUST_PASS if results.get(f) != "pass")
    assert not wrongly, f"{mutant.__name__}: untouched features did not pass: {wrongly}: {results}"


ADAPTED = "test_layer and (dora or lora_bias)"


def test_reference_passes_dora_and_lora_bias(pytester):
    results = run_layer(pytester, "reference", ADAPTED)
    want = {f"layer.{v}.{lay}" for v in ("dora", "dora_full_norm", "lora_bias") for lay in ("linear", "conv1d")}
    assert want <= set(results)
    assert all(v == "pass" for v in results.values()), results


@pytest.mark.parametrize("mutant", layer.ADAPTED_MUTANTS, ids=lambda m: m.__name__)
def test_dora_and_lora_bias_mutants_are_caught(pytester, monkeypatch, mutant):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    results = run_layer(pytester, f"mutants.layer:{mutant.__name__}", ADAPTED)
    missed = sorted(f for f in mutant.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant.__name__} ({mutant.BUG}) was not caught by {missed}: {results}"
    wrongly = sorted(f for f in mutant.MUST_PASS if results.get(f) != "pass")
    assert not wrongly, f"{mutant.__name__}: untouched features did not pass: {wrongly}: {results}"


def test_old_layer_specs_build_the_same_case():
    """The new optional LayerCase fields stay None for every pre-existing layer feature's spec."""
    from conformance.cases import build_layer_case

    spec = {"feature": "layer.merge.conv1d", "layout": "conv1d", "dtype": "float64", "qkv_slices": None,
            "in_features": 3, "out_features": 5, "r": 2, "lora_alpha": 7, "use_rslora": False, "lora_dropout": 0.0,
            "train_mode": False, "bias": "none", "has_bias": True, "batch": 2, "seq_len": 3, "seed": 11}  # fmt: skip
    case = build_layer_case(spec)
    assert case.lora_bias_B is None and case.magnitude is None and case.dora_norm == "detached"
