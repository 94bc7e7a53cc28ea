"""The tolerance policy (conformance/tolerance.py): what it reports, and that it is tight enough.

The proof: for every float32 case the ci profile draws, every output and gradient tensor's bound is below 1e-4,
and a candidate whose result is the reference's own float32 evaluation with one tensor off by a relative 1e-4
fails on exactly that tensor (end to end, through ``run_check``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from conformance.checks import run_check
from conformance.drivers.reference import ReferenceDriver
from conformance.features import FEATURES, missing_capability
from conformance.profiles import PROFILES
from conformance.strategies import draw_layer_spec, draw_model_spec
from conformance.tolerance import FACTOR, FLOOR, UNIT_ROUNDOFF, IllConditioned, compare
from conformance.transport import InProcessRunner

RELATIVE_ERROR = 1e-4
# every feature whose results are outputs or gradients (adapter_save compares files, not computations)
FLOAT32_ONLY = dataclasses.replace(ReferenceDriver.capabilities, dtypes=frozenset({"float32"}))
# (the layer features that force another dtype, layer.bfloat16.* / layer.float16.*, and the init laws the
# reference lacks are not float32 computations of the reference: left out)
PROOF_FEATURES = [f for f in FEATURES.values() if f.level in ("layer", "model") and f.method != "save_adapter"
                  and missing_capability(FLOAT32_ONLY, f.needs) is None]  # fmt: skip


def test_compare_reports_the_largest_errors_and_where():
    expected = np.array([[1.0, -2.0, 4.0], [0.5, 0.25, -8.0]])
    actual = expected.copy()
    actual[1, 2] += 1e-3  # the largest absolute error
    actual[1, 1] += 1e-4  # the largest relative one
    c = compare("t", actual, expected, expected.astype(np.float32), "float32")
    assert c.abs_index == (1, 2) and c.max_abs == pytest.approx(1e-3)
    assert c.rel_index == (1, 1) and c.max_rel == pytest.approx(4e-4)
    assert c.error == pytest.approx(1e-3 / 8.0)
    assert not c.passed


def test_bound_is_the_measured_float32_error_times_the_factor():
    expected = np.linspace(-1.0, 1.0, 50)
    plain = expected + 1e-6  # a plain float32 evaluation off by 1e-6 (relative to max |e| = 1)
    c = compare("t", expected, expected, plain, "float32")
    assert c.bound == pytest.approx(FACTOR["float32"] * 1e-6)
    c64 = compare("t", expected, expected, plain, "float64")  # scaled by the unit roundoff ratio
    assert c64.bound == pytest.approx(FACTOR["float64"] * 1e-6 * UNIT_ROUNDOFF["float64"] / UNIT_ROUNDOFF["float32"])
    exact = compare("t", expected, expected, expected, "float32")  # an exact plain evaluation: the floor
    assert exact.bound == pytest.approx(FACTOR["float32"] * FLOOR * UNIT_ROUNDOFF["float32"])


@pytest.mark.parametrize(
    ("actual", "problem"),
    [(None, "missing"), (np.zeros((2, 2)), "shape"), (np.array([1.0, np.nan, 3.0]), "non-finite")],
)
def test_compare_names_missing_misshapen_and_non_finite_results(actual, problem):
    c = compare("t", actual, np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), "float64")
    assert not c.passed and problem in c.problem


def _perturbed(result, path: list[str], factor: float):
    if not path or not isinstance(result, dict):  # load_adapter_logits returns the logits array itself
        return result * factor
    return {**result, path[0]: _perturbed(result[path[0]], path[1:], factor)}


@pytest.mark.parametrize("feature", PROOF_FEATURES, ids=[f.id for f in PROOF_FEATURES])
def test_a_relative_error_of_1e_4_in_any_float32_tensor_fails(feature):
    runner = InProcessRunner("reference")
    draw = draw_layer_spec if feature.level == "layer" else draw_model_spec
    seen = []

    @PROFILES["ci"].settings(feature.level, 5 if feature.level == "layer" else 3)
    @given(st.data())
    def check(data):
        spec = draw(data, feature, FLOAT32_ONLY)
        try:
            honest = run_check(spec, runner.call)
        except IllConditioned:
            reject()  # the suite discards these draws too
        assert honest.passed, honest.report("reference")
        tensors = [c for c in honest.comparisons if c.problem is None]
        loose = [c.name for c in tensors if c.bound >= RELATIVE_ERROR]
        assert not loose, f"bounds >= {RELATIVE_ERROR} for {loose}: {spec}"
        weakest = max(tensors, key=lambda c: c.bound)  # the tensor with the loosest bound, end to end
        path = weakest.name.split("/")

        def off_by_1e_4(method, spec_, folder=None):
            return _perturbed(runner.call(method, spec_, folder), path, 1.0 + RELATIVE_ERROR)

        caught = run_check(spec, off_by_1e_4)
        assert [c.name for c in caught.comparisons if not c.passed] == [weakest.name], caught.report("reference")
        seen.append(len(tensors))

    check.__name__ = f"check_{feature.id.replace('.', '_')}"
    check()
    assert seen, "no case was checked"
