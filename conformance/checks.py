"""One check: a spec in, the candidate's results compared with the reference's, a ``CheckResult`` out.

``run_check(spec, call, candidate)`` is what every test example, every golden fixture and ``--replay`` runs.
``call(method, spec, folder=None)`` invokes the candidate (conformance.runner). Every output and gradient
tensor is compared (``conformance.tolerance``); the trainable set and every count must match exactly. A
candidate that raises, crashes or hangs gives a result with ``error`` set.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conformance import reference
from conformance.cases import build_layer_case, build_model_case, golden_model_case, spec_json
from conformance.features import FEATURES
from conformance.runner import CandidateError
from conformance.tolerance import (
    MAX_FLOAT32_BOUND,
    PLAIN_SAMPLES,
    Comparison,
    IllConditioned,
    bound_for,
    compare,
    exact,
    measured_error,
)
from reflora.checkpoint import CheckpointError, load_adapter, save_adapter
from reflora.targets import plan_lora, trainable_bias_keys

Call = Callable[..., Any]


@dataclass
class CheckResult:
    spec: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    error: CandidateError | None = None
    expected: dict[str, Any] = field(default_factory=dict)  # for --dump
    actual: Any = None

    @property
    def feature(self) -> str:
        return self.spec["feature"]

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.comparisons)

    @property
    def broke(self) -> bool:
        """The candidate crashed or hung (not worth shrinking: each try costs a worker restart or a timeout)."""
        return self.error is not None and self.error.kind in ("crashed", "hung")

    def worst(self) -> Comparison | None:
        """The numeric comparison closest to (or furthest past) its bound."""
        numeric = [c for c in self.comparisons if c.problem is None and c.bound > 0]
        return max(numeric, key=lambda c: c.ratio, default=None)

    def report(self, candidate: str) -> str:
        """A plain-text account: the failing tensors, the case, and the command that replays it alone."""
        lines = [f"{'passed' if self.passed else 'FAILED'}: {self.feature} (dtype {self.spec.get('dtype', '?')})"]
        if self.error is not None:
            lines.append(f"  the candidate {self.error.kind}: {self.error.message}")
            if self.error.detail:
                lines += ["    " + line for line in self.error.detail.strip().splitlines()[-12:]]
        failing = [c for c in self.comparisons if not c.passed]
        shown = failing or self.comparisons
        if shown:
            lines.append(f"  {'tensor':<60} {'error':>9} {'bound':>9} {'max abs':>9}  {'at':<14} {'max rel':>9}  at")
        for c in shown:
            mark = "  " if c.passed else "✗ "
            if c.problem is not None:
                lines.append(f"  {mark}{c.name}: {c.problem}")
            else:
                lines.append(
                    f"  {mark}{c.name:<58} {c.error:9.2e} {c.bound:9.2e} {c.max_abs:9.2e}  {_index(c.abs_index):<14} "
                    f"{c.max_rel:9.2e}  {_index(c.rel_index)}"
                )
        lines.append(f"  case: {spec_json(self.spec)}")
        lines.append("  reproduce this case alone:")
        lines.append(f"    {replay_command(candidate, self.spec)}")
        return "\n".join(lines)


def _index(index) -> str:
    return "" if index is None else str(tuple(index))


def replay_command(candidate: str, spec: dict[str, Any]) -> str:
    return f"reflora conform --candidate {candidate} --replay '{spec_json(spec)}' --dump case.safetensors"


def run_check(spec: dict[str, Any], call: Call) -> CheckResult:
    feature = FEATURES[spec["feature"]]
    result = CheckResult(spec)
    try:
        if feature.level == "layer":
            _check_layer(result, feature.method, call)
        elif feature.level == "advanced":  # merge, DoRA, inits, several adapters, weighted combinations
            from conformance.advanced import check_advanced

            check_advanced(result, call)
        elif feature.method == "save_adapter":
            _check_adapter_save(result, call)
        elif feature.method == "load_adapter_logits":
            _check_adapter_load(result, call)
        elif feature.method == "model_switch_adapters":
            _check_adapter_switch(result, call)
        else:
            _check_model(result, call)
    except CandidateError as exc:
        result.error = exc
    return result


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------


def plain_evaluations(function: Callable, case) -> list:
    """``function(case, "float32")`` on the case and on ``PLAIN_SAMPLES − 1`` re-rounded copies of it: the
    spread of plain float32 evaluations of this computation (see conformance.tolerance)."""
    cases = [case] + [reference.perturbed(case, seed) for seed in range(1, PLAIN_SAMPLES)]
    return [function(c, "float32") for c in cases]


def reject_ill_conditioned(expected: dict, plains: list, dtype: str, prefix: str = "") -> None:
    """Raise IllConditioned if a float32 bound would reach MAX_FLOAT32_BOUND (see conformance.tolerance)."""
    if dtype != "float32":
        return
    for key, value in expected.items():
        if isinstance(value, dict):
            reject_ill_conditioned(value, [p[key] for p in plains], dtype, f"{prefix}{key}/")
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            bound = bound_for(measured_error(value, [p[key] for p in plains]), dtype)
            if bound >= MAX_FLOAT32_BOUND:
                raise IllConditioned(f"{prefix}{key}: float32 bound {bound:.1e} >= {MAX_FLOAT32_BOUND:.0e}")


def _compare_tensors(
    result: CheckResult, actual: Any, expected: dict, plains: list, dtype: str, prefix: str = ""
) -> None:
    """Compare every array of ``expected`` (nested dicts allowed) with ``actual`` at the same path; ``plains``
    holds plain float32 evaluations with the structure of ``expected``."""
    if not isinstance(actual, dict):
        result.comparisons.append(
            exact(prefix or "result", False, f"expected a dict of results, got {type(actual).__name__}")
        )
        return
    for key, value in expected.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _compare_tensors(result, actual.get(key, {}), value, [p[key] for p in plains], dtype, f"{name}/")
        else:
            result.comparisons.append(compare(name, actual.get(key), value, [p[key] for p in plains], dtype))


def _compare_set(result: CheckResult, name: str, actual, expected) -> None:
    actual, expected = sorted(map(str, actual or [])), sorted(expected)
    extra = [k for k in actual if k not in expected]
    missing = [k for k in expected if k not in actual]
    problem = (
        f"extra {extra[:4]}{'...' if len(extra) > 4 else ''}, missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
    )
    result.comparisons.append(exact(name, not extra and not missing, problem))


# ----------------------------------------------------------------------------------------------
# layer level
# ----------------------------------------------------------------------------------------------


MERGE_RESULTS = ("merged_weight", "merged_y")


def _check_layer(result: CheckResult, method: str, call: Call) -> None:
    case = build_layer_case(result.spec)
    if method == "layer_merge":
        expected, plains = reference.layer_merge(case, "float64"), plain_evaluations(reference.layer_merge, case)
        # feature layer.merge.*: the merged weight and forward; layer.unmerge.*: the weight after unmerging
        keep = ("unmerged_weight",) if FEATURES[result.spec["feature"]].variant == "unmerge" else MERGE_RESULTS
        expected = {k: v for k, v in expected.items() if k in keep}
        plains = [{k: v for k, v in plain.items() if k in keep} for plain in plains]
    else:
        expected = reference.layer_forward_backward(case, "float64")
        plains = plain_evaluations(reference.layer_forward_backward, case)
    result.expected = expected
    trainable = expected.pop("trainable", None)
    for plain in plains:
        plain.pop("trainable", None)
    reject_ill_conditioned(expected, plains, case.dtype)
    actual = result.actual = call(method, result.spec)
    _compare_tensors(result, actual, expected, plains, case.dtype)
    if trainable is not None:
        _compare_set(result, "trainable", actual.get("trainable") if isinstance(actual, dict) else None, trainable)


# ----------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------


def model_expectation(spec: dict[str, Any]):
    """(case, expected float64, plain float32 evaluations) for a model-level forward/backward spec or a golden fixture.

    A float64 fixture's stored outputs are the expectation; a float32 fixture's stored outputs are a plain
    float32 evaluation, and the float64 expectation is recomputed from its inputs."""
    if spec["feature"] != "golden.replay":
        case = build_model_case(spec)
        return (
            case,
            reference.model_forward_backward(case, "float64"),
            plain_evaluations(reference.model_forward_backward, case),
        )
    case, golden = golden_model_case(spec)
    stored: dict[str, Any] = {"logits": golden.logits, "grads": {k: golden.grads[k] for k in golden.wrt}}
    if golden.loss is not None:
        stored["loss"] = golden.loss
    stored["trainable"] = {k: int(np.asarray(golden.grads[k]).size) for k in golden.wrt}
    if case.dtype == "float64":
        return case, stored, plain_evaluations(reference.model_forward_backward, case)
    return case, reference.model_forward_backward(case, "float64"), [reference.to_float64(stored)]


def _check_model(result: CheckResult, call: Call) -> None:
    case, expected, plains = model_expectation(result.spec)
    result.expected = expected
    if result.feature != "golden.replay":  # fixtures are fixed points: never discarded
        reject_ill_conditioned({k: v for k, v in expected.items() if k != "trainable"}, plains, case.dtype)
    actual = result.actual = call("model_forward_backward", result.spec)
    if not isinstance(actual, dict):
        result.comparisons.append(exact("result", False, f"expected a dict, got {type(actual).__name__}"))
        return
    trainable = expected["trainable"]
    numeric = {k: v for k, v in expected.items() if k != "trainable"}
    _compare_tensors(result, actual, numeric, plains, case.dtype)
    got_trainable = actual.get("trainable")
    got_trainable = got_trainable if isinstance(got_trainable, dict) else {}
    _compare_set(result, "trainable set", got_trainable, trainable)
    wrong_counts = [k for k in trainable if k in got_trainable and int(got_trainable[k]) != trainable[k]]
    result.comparisons.append(
        exact(
            "trainable counts",
            not wrong_counts,
            f"{wrong_counts[:3]} have {[got_trainable[k] for k in wrong_counts[:3]]} elements, expected "
            f"{[trainable[k] for k in wrong_counts[:3]]}",
        )
    )
    total, got_total = sum(trainable.values()), sum(int(v) for v in got_trainable.values())
    result.comparisons.append(exact("trainable total", total == got_total, f"{got_total} trainable, expected {total}"))
    extra_grads = sorted(set(actual.get("grads", {}) or {}) - set(trainable))
    result.comparisons.append(
        exact("gradient keys", not extra_grads, f"gradients for untrained keys {extra_grads[:4]}")
    )


def _check_adapter_save(result: CheckResult, call: Call) -> None:
    case = build_model_case(result.spec)
    with tempfile.TemporaryDirectory(prefix="reflora-conform-") as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        call("save_adapter", result.spec, str(folder))
        try:
            adapter, lora, biases = load_adapter(folder, case.config)
        except Exception as exc:  # a CheckpointError names the problem; anything else is reported as it is
            what = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            result.comparisons.append(
                exact("adapter files", False, f"reflora cannot read what the candidate wrote: {what}")
            )
            return
    result.actual = {"adapter": adapter, "biases": biases}
    want, got = plan_lora(case.config, case.lora), plan_lora(case.config, lora)
    _compare_set(result, "adapted modules", list(got), list(want))
    wrong = [
        n for n in want if n in got and (got[n].r != want[n].r or not math.isclose(got[n].scaling, want[n].scaling))
    ]
    result.comparisons.append(exact("rank and scaling", not wrong,
                                    f"{wrong[:3]}: r/scaling {[(got[n].r, got[n].scaling) for n in wrong[:3]]}, expected "
                                    f"{[(want[n].r, want[n].scaling) for n in wrong[:3]]}"))  # fmt: skip
    result.comparisons.append(
        exact("bias mode", lora.bias == case.lora.bias, f"bias={lora.bias!r}, expected {case.lora.bias!r}")
    )
    rounded = reference.NUMPY_DTYPES.get(case.dtype, np.float32)
    expected = {
        "adapter": dict(case.adapter),
        "biases": {k: case.params[k] for k in trainable_bias_keys(case.config, case.lora, want)},
    }
    plain = {
        group: {k: v.astype(rounded).astype(np.float64) for k, v in values.items()}
        for group, values in expected.items()
    }
    result.expected = expected
    _compare_tensors(result, result.actual, expected, [plain], case.dtype)


def _file_dtype(dtype: str):
    return np.float64 if dtype == "float64" else np.float32


def _check_adapter_load(result: CheckResult, call: Call) -> None:
    case = build_model_case(result.spec)
    expected = {"logits": reference.adapter_load_logits(case, "float64")}
    plains = [{"logits": logits} for logits in plain_evaluations(reference.adapter_load_logits, case)]
    result.expected = expected
    reject_ill_conditioned(expected, plains, case.dtype)
    file_dtype = _file_dtype(case.dtype)
    with tempfile.TemporaryDirectory(prefix="reflora-conform-") as tmp:
        folder = Path(tmp) / "adapter"
        adapter = {k: v.astype(file_dtype) for k, v in case.adapter.items()}
        biases = {k: v.astype(file_dtype) for k, v in (case.trained_biases or {}).items()}
        save_adapter(folder, adapter, case.lora, case.config, biases=biases or None)
        actual = call("load_adapter_logits", result.spec, str(folder))
    result.actual = {"logits": actual}
    _compare_tensors(result, result.actual, expected, plains, case.dtype)


def _check_adapter_switch(result: CheckResult, call: Call) -> None:
    case = build_model_case(result.spec)
    expected = reference.adapter_switch_logits(case, "float64")
    plains = plain_evaluations(reference.adapter_switch_logits, case)
    result.expected = expected
    reject_ill_conditioned(expected, plains, case.dtype)
    result.actual = call("model_switch_adapters", result.spec)
    _compare_tensors(result, result.actual, expected, plains, case.dtype)
