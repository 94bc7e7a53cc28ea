"""The tolerance policy: how close a candidate's tensor must be to the float64 reference.

For each tensor, with e the float64 reference, p the same computation evaluated plainly in float32 by reflora
(every input rounded to float32, every op in float32; on the case and on PLAIN_SAMPLES − 1 copies whose inputs
are re-rounded, the largest error counting) and a the candidate's result:

    scale    = max |e|                                  (1 if e is all zeros)
    measured = max |p − e| / scale                      the error a plain float32 evaluation makes
    error    = max |a − e| / scale                      the candidate's error
    bound    = FACTOR · max(measured · u_d / u_f32,  FLOOR · u_d)
    pass     ⇔ error ≤ bound  (and same shape, every value finite)

u_d is the unit roundoff of the candidate's dtype (float64 2⁻⁵³, float32 2⁻²⁴, bfloat16 2⁻⁸, float16 2⁻¹¹). For float32 the
bound is FACTOR times the measured float32 error of this very case; other dtypes scale the measurement by their
unit roundoff (rounding error is linear in u to first order). FLOOR keeps a case whose float32 evaluation
happens to be exact from getting a zero bound. FACTOR is justified by measurement in docs/conformance.md
(``python -m conformance.measure --candidate peft`` re-measures it); tests/test_conformance_tolerance.py proves
that a relative error of 1e-4 in any float32 output or gradient fails.

Reported per tensor: the max absolute error and its index, the max elementwise relative error
``|a − e| / |e|`` and its index, the normwise error above and its bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
FACTOR = {"float64": 32.0, "float32": 12.0, "bfloat16": 8.0, "float16": 8.0}  # measured: see docs/conformance.md
FLOOR = 8.0
PLAIN_SAMPLES = 3  # plain float32 evaluations per case: the case itself and two re-rounded copies
# A drawn float32 case in which some tensor's bound would reach this is ill-conditioned for float32 (its
# result moves by more than 4e-6 when its inputs are re-rounded); such draws are discarded, so that every
# float32 bound stays below 5e-5 and a relative error of 1e-4 always fails.
MAX_FLOAT32_BOUND = 5e-5


class IllConditioned(Exception):
    """A drawn float32 case whose plain float32 evaluations scatter too much to bound a candidate by 1e-4."""


def measured_error(expected: np.ndarray, plain_f32) -> float:
    """max over the plain evaluations of max|p − e| / max|e|."""
    expected = np.asarray(expected, dtype=np.float64)
    if expected.size == 0:
        return 0.0
    plains = plain_f32 if isinstance(plain_f32, list) else [plain_f32]
    scale = float(np.max(np.abs(expected))) or 1.0
    return max(float(np.max(np.abs(np.asarray(p, dtype=np.float64) - expected))) for p in plains) / scale


@dataclass
class Comparison:
    """One tensor (or one exact property, with ``problem`` set) compared with the reference."""

    name: str
    passed: bool
    error: float = 0.0  # max|a − e| / max|e|
    bound: float = 0.0
    max_abs: float = 0.0
    abs_index: tuple[int, ...] | None = None
    max_rel: float = 0.0  # max elementwise |a − e| / |e|
    rel_index: tuple[int, ...] | None = None
    problem: str | None = None  # a shape mismatch, a non-finite value, a missing tensor, a set mismatch...

    @property
    def ratio(self) -> float:
        """error / bound: below 1 passes."""
        return self.error / self.bound if self.bound > 0 else (0.0 if self.error == 0 else float("inf"))

    def to_json(self) -> dict:
        return {
            "name": self.name, "passed": self.passed, "error": self.error, "bound": self.bound,
            "max_abs": self.max_abs, "abs_index": list(self.abs_index) if self.abs_index is not None else None,
            "max_rel": self.max_rel, "rel_index": list(self.rel_index) if self.rel_index is not None else None,
            "problem": self.problem,
        }  # fmt: skip


def bound_for(measured_f32: float, dtype: str) -> float:
    u = UNIT_ROUNDOFF[dtype]
    return FACTOR[dtype] * max(measured_f32 * u / UNIT_ROUNDOFF["float32"], FLOOR * u)


def compare(name: str, actual, expected: np.ndarray, plain_f32, dtype: str) -> Comparison:
    """Compare a candidate tensor with the float64 reference under the policy above. ``plain_f32`` is one plain
    float32 evaluation or a list of them (the measured error is their largest)."""
    expected = np.asarray(expected, dtype=np.float64)
    if actual is None:
        return Comparison(name, False, problem="missing: the candidate returned no such tensor")
    try:
        actual = np.asarray(actual, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return Comparison(name, False, problem=f"not a float array ({exc})")
    if actual.shape != expected.shape:
        return Comparison(name, False, problem=f"shape {actual.shape}, expected {expected.shape}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    scale = scale if scale > 0 else 1.0
    bound = bound_for(measured_error(expected, plain_f32), dtype)
    if expected.size == 0:
        return Comparison(name, True, bound=bound)
    if not np.all(np.isfinite(actual)):
        bad = np.unravel_index(int(np.argmin(np.isfinite(actual))), actual.shape)
        return Comparison(name, False, error=float("inf"), bound=bound, abs_index=tuple(int(i) for i in bad),
                          problem=f"non-finite value {actual[bad]} at index {tuple(int(i) for i in bad)}")  # fmt: skip
    diff = np.abs(actual - expected)
    abs_at = np.unravel_index(int(np.argmax(diff)), diff.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(expected))
    rel_at = np.unravel_index(int(np.argmax(rel)), rel.shape)
    error = float(diff[abs_at]) / scale
    return Comparison(
        name, error <= bound, error=error, bound=bound, max_abs=float(diff[abs_at]),
        abs_index=tuple(int(i) for i in abs_at), max_rel=float(rel[rel_at]), rel_index=tuple(int(i) for i in rel_at),
    )  # fmt: skip


def exact(name: str, passed: bool, problem: str) -> Comparison:
    """A property that must hold exactly (a trainable set, a count, a config field)."""
    return Comparison(name, passed, problem=None if passed else problem)
