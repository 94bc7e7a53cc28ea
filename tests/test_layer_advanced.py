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


# ---------------------------------------------------------------------------------------------- the layer protocol
# of issue 15.1: DoRA merge / unmerge, the library's own inits (conformance/init_laws.py), DoRA at init, several
# adapters on one layer, bfloat16 / float16

NEW_15 = "test_layer and (dora_merge or dora_unmerge or init or adapters or float16 or bfloat16)"


def test_new_layer_features_are_registered():
    from conformance.init_laws import LAW_NAMES

    for layout in ("linear", "conv1d"):
        for variant in ("dora_merge", "dora_unmerge"):
            assert FEATURES[f"layer.{variant}.{layout}"].method == "layer_merge"
            assert "layer_dora_merge" in FEATURES[f"layer.{variant}.{layout}"].needs
        assert "unmerge" in FEATURES[f"layer.dora_unmerge.{layout}"].needs
        for name in LAW_NAMES:
            feature = FEATURES[f"layer.init.{name}.{layout}"]
            assert feature.method == "layer_init" and f"layer_init:{name}" in feature.needs
        assert FEATURES[f"layer.dora_init.{layout}"].needs == (f"layout:{layout}", "layer_dora", "layer_init:*")
        for kind in ("active", "disabled", "mixed_batch"):
            assert FEATURES[f"layer.adapters.{kind}.{layout}"].method == "layer_adapters"
        assert "layer_mixed_batch" in FEATURES[f"layer.adapters.mixed_batch.{layout}"].needs
        for dtype in ("bfloat16", "float16"):
            assert f"dtype:{dtype}" in FEATURES[f"layer.{dtype}.{layout}"].needs


def test_init_laws_are_well_formed():
    from conformance.init_laws import LAW_NAMES, LAWS, law

    assert len(set(LAW_NAMES)) == len(LAW_NAMES)
    assert LAW_NAMES[:4] == ("kaiming_uniform", "gaussian", "peft_false", "he_uniform")  # never reordered
    for entry in LAWS:
        assert entry.doc and entry.libraries
        for entries in (entry.a, entry.b):
            assert entries is None or entries.scale(3, 200, 170) > 0
        assert entry.output_is_base == (entry.a is None or entry.b is None)
    assert law("gaussian").a.scale(4, 200, 170) == 0.25
    with pytest.raises(ValueError, match="unknown init law 'nope'"):
        law("nope")


def test_layer_init_capability_kinds():
    from conformance.features import missing_capability
    from conformance.protocol import Capabilities

    none = Capabilities(layer_layouts=frozenset({"linear"}), notes={"layer_init_methods": "no inits"})
    some = Capabilities(layer_layouts=frozenset({"linear"}), layer_init_methods=frozenset({"gaussian"}))
    assert missing_capability(none, ("layer_init:*",)) == "layer_init:*: no inits"
    assert missing_capability(some, ("layer_init:*",)) is None
    assert missing_capability(some, ("layer_init:gaussian",)) is None
    assert missing_capability(some, ("layer_init:he_uniform",)).startswith("layer_init:he_uniform")


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_new_draws(data):
    """float16 only where forced; init layers large enough for the KS tests; several adapters with distinct
    scalings, two or more active; a mixed batch names some adapter."""
    from dataclasses import replace

    from conformance.cases import build_case
    from conformance.protocol import LayerAdaptersCase

    caps = replace(ReferenceDriver().capabilities, dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}))
    for layout in ("linear", "conv1d"):
        assert draw_layer_spec(data, FEATURES[f"layer.forward_backward.{layout}"], caps)["dtype"] != "float16"
        assert draw_layer_spec(data, FEATURES[f"layer.float16.{layout}"], caps)["dtype"] == "float16"
        assert draw_layer_spec(data, FEATURES[f"layer.bfloat16.{layout}"], caps)["dtype"] == "bfloat16"
        spec = draw_layer_spec(data, FEATURES[f"layer.dora_init.{layout}"], caps)
        assert spec["use_dora"] and spec["init"] == "gaussian"  # sorted(layer_init_methods)[0]
        assert spec["r"] >= 3 and spec["r"] * min(spec["in_features"], spec["out_features"]) >= 480
        merge = draw_layer_spec(data, FEATURES[f"layer.dora_merge.{layout}"], caps)
        assert merge["dora"] and build_case(merge).magnitude is not None
        active = draw_layer_spec(data, FEATURES[f"layer.adapters.active.{layout}"], caps)
        case = build_case(active)
        assert isinstance(case, LayerAdaptersCase) and len(case.active) >= 2
        scalings = [case.scaling(n) for n in case.adapters]
        assert len(set(scalings)) == len(scalings) and 1.0 not in scalings
        mixed = draw_layer_spec(data, FEATURES[f"layer.adapters.mixed_batch.{layout}"], caps)
        assert mixed["active"] is None and len(mixed["adapter_names"]) == mixed["batch"]
        assert set(mixed["adapter_names"]) - {"__base__"}


def test_reference_passes_the_new_layer_features(pytester):
    results = run_layer(pytester, "reference", NEW_15)
    want = {f"layer.{v}.{lay}" for v in ("dora_merge", "dora_unmerge", "init.kaiming_uniform", "init.gaussian",
                                          "init.peft_false", "dora_init", "adapters.active", "adapters.disabled",
                                          "adapters.mixed_batch") for lay in ("linear", "conv1d")}  # fmt: skip
    assert {k for k, v in results.items() if v == "pass"} >= want, results
    assert {v for k, v in results.items() if k not in want} <= {"not_supported"}, results


@pytest.mark.parametrize("mutant", layer.LAYER_15_MUTANTS, ids=lambda m: m.__name__)
def test_new_layer_mutants_are_caught(pytester, monkeypatch, mutant):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    results = run_layer(pytester, f"mutants.layer:{mutant.__name__}", NEW_15)
    missed = sorted(f for f in mutant.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant.__name__} ({mutant.BUG}) was not caught by {missed}: {results}"
    wrongly = sorted(f for f in mutant.MUST_PASS if results.get(f) != "pass")
    assert not wrongly, f"{mutant.__name__}: untouched features did not pass: {wrongly}: {results}"


def test_peft_passes_the_new_layer_features(pytester):
    pytest.importorskip("peft")
    results = run_layer(pytester, "peft", NEW_15)
    want = {f"layer.{v}.{lay}" for v in ("dora_merge", "dora_unmerge", "init.kaiming_uniform", "init.gaussian",
                                          "init.peft_false", "dora_init", "adapters.active", "adapters.disabled",
                                          "adapters.mixed_batch", "bfloat16", "float16")
            for lay in ("linear", "conv1d")}  # fmt: skip
    assert {k for k, v in results.items() if v == "pass"} >= want, results
    assert {v for k, v in results.items() if k not in want} <= {"not_supported"}, results


class InitFanOut(ReferenceDriver):
    """kaiming_uniform with the fan on the wrong axis: A ~ U(±1/√out), not U(±1/√in); B = 0 and y = base still
    hold, so only the KS test of A can show it, and only when in and out differ enough (the draw keeps them at
    least 2× apart: a scale off by √2 or more)."""

    BUG = "init law kaiming_uniform: fan_out instead of fan_in, A ~ U(±1/√out)"
    MUST_FAIL = frozenset({"layer.init.kaiming_uniform.linear", "layer.init.kaiming_uniform.conv1d"})
    MUST_PASS = frozenset({"layer.init.gaussian.linear", "layer.init.gaussian.conv1d"})

    @property
    def name(self) -> str:
        return "mutant-InitFanOut"

    def layer_init(self, case):
        out = super().layer_init(case)
        if case.init == "kaiming_uniform":
            in_f = case.x.shape[-1]
            out_f = case.weight.shape[0 if case.layout == "linear" else 1]
            out["lora_A"] = out["lora_A"] * (in_f / out_f) ** 0.5
        return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_init_draws_keep_in_and_out_apart(data):
    """layer.init.* draws in and out at least 2× apart, in either order, and large enough for the KS tests."""
    caps = ReferenceDriver().capabilities
    for fid in ("layer.init.kaiming_uniform.linear", "layer.init.gaussian.conv1d", "layer.dora_init.linear"):
        spec = draw_layer_spec(data, FEATURES[fid], caps)
        small, large = sorted((spec["in_features"], spec["out_features"]))
        assert large >= 2 * small and spec["r"] * small >= 480 and large <= 448, spec


def test_init_draws_take_both_orders():
    from types import SimpleNamespace

    from hypothesis import find

    caps = ReferenceDriver().capabilities
    feature = FEATURES["layer.init.kaiming_uniform.linear"]
    specs = st.composite(lambda draw: draw_layer_spec(SimpleNamespace(draw=lambda s, label=None: draw(s)), feature,
                                                      caps))()  # fmt: skip
    for wide_input in (True, False):
        find(specs, lambda s, w=wide_input: (s["in_features"] > s["out_features"]) == w)


def test_init_fan_on_the_wrong_axis_is_caught(pytester, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    results = run_layer(pytester, f"{__name__}:InitFanOut", "test_layer and init")
    missed = sorted(f for f in InitFanOut.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"InitFanOut ({InitFanOut.BUG}) was not caught by {missed}: {results}"
    wrongly = sorted(f for f in InitFanOut.MUST_PASS if results.get(f) != "pass")
    assert not wrongly, f"InitFanOut: untouched features did not pass: {wrongly}: {results}"
