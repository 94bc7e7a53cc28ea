"""One check: a spec in, the candidate's results compared with the reference's, a ``CheckResult`` out.

``run_check(spec, call)`` is what every test example, every golden fixture and ``--replay`` runs.
``call(method, spec, folder=None)`` invokes the candidate (conformance.runner). The case comes from
``conformance.cases``, the expectation from ``conformance.expectations``, the comparisons from
``conformance.compare``: every output and gradient tensor is compared (``conformance.tolerance``); the
trainable set and every count must match exactly. A candidate that raises, crashes or hangs gives a result
with ``error`` set. The advanced level's checks (docs/advanced-semantics.md) are exact where the property is
(a refused merge, a key set, B = 0) and statistical for random inits (KS tests).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conformance import expectations
from conformance.cases import (
    build_advanced_case,
    build_layer_adapters_case,
    build_layer_case,
    build_layer_init_case,
    build_model_case,
    golden_model_case,
    perturbed,
    spec_json,
)
from conformance.compare import compare_ks, compare_set, compare_tensors, normal_cdf, uniform_cdf
from conformance.expectations import ADVANCED_EXPECTATIONS, cast_tree
from conformance.features import FEATURES, UNMERGE_VARIANTS
from conformance.init_laws import Entries, law
from conformance.protocol import AdaptersCase, CandidateError, Capabilities, LayerInitCase
from conformance.tolerance import (
    MAX_FLOAT32_BOUND,
    PLAIN_SAMPLES,
    Comparison,
    IllConditioned,
    bound_for,
    exact,
    measured_error,
)
from reflora.checkpoint import CheckpointError, load_adapter, load_gpt2, save_adapter
from reflora.model import gpt2_forward
from reflora.targets import adapter_shapes, plan_lora, trainable_bias_keys

Call = Callable[..., Any]
# advanced level: the plain float32 evaluations per driver method (the case and re-rounded copies of it)
PLAINS = {"model_adapters": 3, "model_merge": 3, "init_adapter": 8, "weighted_adapter": 3}


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

    def report(self, candidate: str, prefix: str = "") -> str:
        """A plain-text account: the failing tensors, the case, and the command that replays it alone
        (``prefix``: the folder and PYTHONPATH it needs, ``conformance.suite.replay_prefix``)."""
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
        lines.append(f"    {prefix}{replay_command(candidate, self.spec)}")
        return "\n".join(lines)


def _index(index) -> str:
    return "" if index is None else str(tuple(index))


def replay_command(candidate: str, spec: dict[str, Any]) -> str:
    return f"reflora conform --candidate {candidate} --replay '{spec_json(spec)}' --dump case.safetensors"


def run_check(spec: dict[str, Any], call: Call, capabilities: Capabilities | None = None) -> CheckResult:
    """``capabilities``: the driver's declared ones, where a check depends on them (a merge-only driver,
    ``unmerge=False``, is not asked for ``model_merge``'s "unmerged"); None: the protocol's defaults."""
    feature = FEATURES[spec["feature"]]
    result = CheckResult(spec)
    try:
        if feature.level == "layer":
            _check_layer(result, feature.method, call)
        elif feature.level == "advanced":  # merge, DoRA, inits, several adapters, weighted combinations
            check_advanced(result, call, capabilities)
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
# plain evaluations (the tolerance's evidence)
# ----------------------------------------------------------------------------------------------


def plain_evaluations(function: Callable, case) -> list:
    """``function(case, "float32")`` on the case and on ``PLAIN_SAMPLES − 1`` re-rounded copies of it: the
    spread of plain float32 evaluations of this computation (see conformance.tolerance)."""
    cases = [case] + [perturbed(case, seed) for seed in range(1, PLAIN_SAMPLES)]
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


# ----------------------------------------------------------------------------------------------
# layer level
# ----------------------------------------------------------------------------------------------


MERGE_RESULTS = ("merged_weight", "merged_y")


def _check_layer(result: CheckResult, method: str, call: Call) -> None:
    if method == "layer_init":
        return _check_layer_init(result, call)
    if method == "layer_adapters":
        return _check_layer_adapters(result, call)
    case = build_layer_case(result.spec)
    if method == "layer_merge":
        expected, plains = expectations.layer_merge(case, "float64"), plain_evaluations(expectations.layer_merge, case)
        # feature layer.merge.*: the merged weight and forward; layer.unmerge.*: the weight after unmerging
        keep = ("unmerged_weight",) if FEATURES[result.spec["feature"]].variant in UNMERGE_VARIANTS else MERGE_RESULTS
        expected = {k: v for k, v in expected.items() if k in keep}
        plains = [{k: v for k, v in plain.items() if k in keep} for plain in plains]
    elif case.lora_bias_B is not None or case.magnitude is not None:  # layer.lora_bias.* / layer.dora.*
        expected = expectations.layer_adapted_forward_backward(case, "float64")
        plains = plain_evaluations(expectations.layer_adapted_forward_backward, case)
    else:
        expected = expectations.layer_forward_backward(case, "float64")
        plains = plain_evaluations(expectations.layer_forward_backward, case)
    result.expected = expected
    trainable = expected.pop("trainable", None)
    for plain in plains:
        plain.pop("trainable", None)
    reject_ill_conditioned(expected, plains, case.dtype)
    actual = result.actual = call(method, result.spec)
    compare_tensors(result, actual, expected, plains, case.dtype)
    if trainable is not None:
        compare_set(result, "trainable", actual.get("trainable") if isinstance(actual, dict) else None, trainable)


def _check_layer_adapters(result: CheckResult, call: Call) -> None:
    """``layer.adapters.*``: y, dx and every acting adapter's dA, dB against
    ``expectations.layer_adapters_forward_backward`` (several adapters, each with its own scaling)."""
    case = build_layer_adapters_case(result.spec)
    expected = result.expected = expectations.layer_adapters_forward_backward(case, "float64")
    plains = plain_evaluations(expectations.layer_adapters_forward_backward, case)
    reject_ill_conditioned(expected, plains, case.dtype)
    actual = result.actual = call("layer_adapters", result.spec)
    compare_tensors(result, actual, expected, plains, case.dtype)


def _ks_entries(result: CheckResult, name: str, values: np.ndarray, entries: Entries | None, shape) -> None:
    """A (r, in) or B (out, r) of a layer init against its law: exactly zero (``entries`` None), else a KS
    test of values / c against U(−1, 1) or N(0, 1) (conformance.init_laws.Entries)."""
    if entries is None:
        nonzero = int(np.count_nonzero(values))
        result.comparisons.append(exact(f"{name} = 0", nonzero == 0, f"{nonzero} non-zero entries in {name}"))
        return
    c = entries.scale(*shape)
    cdf, unit = (uniform_cdf, "U(−1, 1)") if entries.family == "uniform" else (normal_cdf, "N(0, 1)")
    compare_ks(result, f"{name}/c [{name} ~ {entries.text}]", [values / c], cdf, unit)


def _check_layer_init(result: CheckResult, call: Call) -> None:
    """``layer.init.<law>.*`` / ``layer.dora_init.*`` (conformance.init_laws): the shapes of A and B, each by its
    law (KS test, or exactly zero), y at init (the base's x Wᵀ + b where the law says so, else x Wᵀ + b + s·BAx
    with the candidate's own A and B), the base weight unchanged, and with DoRA the magnitude = ‖W + s·BA‖_row
    (the row norms of W where B A = 0). The tolerances come from plain float32 evaluations as everywhere."""
    case = build_layer_init_case(result.spec)
    the_law = law(case.init)
    actual = result.actual = call("layer_init", result.spec)
    if not isinstance(actual, dict):
        result.comparisons.append(exact("result", False, f"expected a dict, got {type(actual).__name__}"))
        return
    in_f, out_f, r = case.x.shape[-1], case.weight.shape[0 if case.layout == "linear" else 1], case.r
    factors = {}
    for name, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
        value = actual.get(name)
        value = None if value is None else np.asarray(value, dtype=np.float64)
        ok = value is not None and value.shape == shape
        got = "missing" if value is None else f"shape {value.shape}"
        result.comparisons.append(exact(f"{name} shape", ok, f"{name}: {got}, expected {shape}"))
        factors[name] = value if ok else None
    if factors["lora_A"] is None or factors["lora_B"] is None:
        return
    A, B = factors["lora_A"], factors["lora_B"]
    _ks_entries(result, "lora_A", A, the_law.a, (r, in_f, out_f))
    _ks_entries(result, "lora_B", B, the_law.b, (r, in_f, out_f))

    def evaluate(c: LayerInitCase, dtype: str) -> dict[str, Any]:
        out = expectations.layer_init_expectation(c, A, B, dtype)
        if the_law.output_is_base:  # the base's output, whatever the candidate's A and B
            out["y"] = expectations.layer_base_output(c, dtype)
        return out

    expected = result.expected = evaluate(case, "float64")
    plains = [evaluate(c, "float32") for c in [case] + [perturbed(case, seed) for seed in range(1, PLAIN_SAMPLES)]]
    compare_tensors(result, actual, expected, plains, case.dtype)


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
            expectations.model_forward_backward(case, "float64"),
            plain_evaluations(expectations.model_forward_backward, case),
        )
    case, golden = golden_model_case(spec)
    stored: dict[str, Any] = {"logits": golden.logits, "grads": {k: golden.grads[k] for k in golden.wrt}}
    if golden.loss is not None:
        stored["loss"] = golden.loss
    stored["trainable"] = {k: int(np.asarray(golden.grads[k]).size) for k in golden.wrt}
    if case.dtype == "float64":
        return case, stored, plain_evaluations(expectations.model_forward_backward, case)
    return case, expectations.model_forward_backward(case, "float64"), [expectations.to_float64(stored)]


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
    compare_tensors(result, actual, numeric, plains, case.dtype)
    got_trainable = actual.get("trainable")
    got_trainable = got_trainable if isinstance(got_trainable, dict) else {}
    compare_set(result, "trainable set", got_trainable, trainable)
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
    compare_set(result, "adapted modules", list(got), list(want))
    wrong = [
        n for n in want if n in got and (got[n].r != want[n].r or not math.isclose(got[n].scaling, want[n].scaling))
    ]
    result.comparisons.append(exact("rank and scaling", not wrong,
                                    f"{wrong[:3]}: r/scaling {[(got[n].r, got[n].scaling) for n in wrong[:3]]}, expected "
                                    f"{[(want[n].r, want[n].scaling) for n in wrong[:3]]}"))  # fmt: skip
    result.comparisons.append(
        exact("bias mode", lora.bias == case.lora.bias, f"bias={lora.bias!r}, expected {case.lora.bias!r}")
    )
    rounded = expectations.NUMPY_DTYPES.get(case.dtype, np.float32)
    expected = {
        "adapter": dict(case.adapter),
        "biases": {k: case.params[k] for k in trainable_bias_keys(case.config, case.lora, want)},
    }
    plain = {
        group: {k: v.astype(rounded).astype(np.float64) for k, v in values.items()}
        for group, values in expected.items()
    }
    result.expected = expected
    compare_tensors(result, result.actual, expected, [plain], case.dtype)


def _file_dtype(dtype: str):
    return np.float64 if dtype == "float64" else np.float32


def _check_adapter_load(result: CheckResult, call: Call) -> None:
    case = build_model_case(result.spec)
    expected = {"logits": expectations.adapter_load_logits(case, "float64")}
    plains = [{"logits": logits} for logits in plain_evaluations(expectations.adapter_load_logits, case)]
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
    compare_tensors(result, result.actual, expected, plains, case.dtype)


def _check_adapter_switch(result: CheckResult, call: Call) -> None:
    case = build_model_case(result.spec)
    expected = expectations.adapter_switch_logits(case, "float64")
    plains = plain_evaluations(expectations.adapter_switch_logits, case)
    result.expected = expected
    reject_ill_conditioned(expected, plains, case.dtype)
    result.actual = call("model_switch_adapters", result.spec)
    compare_tensors(result, result.actual, expected, plains, case.dtype)


# ----------------------------------------------------------------------------------------------
# advanced level: merge, DoRA, inits, several adapters, weighted combinations
# ----------------------------------------------------------------------------------------------


def check_advanced(result: CheckResult, call: Call, capabilities: Capabilities | None = None) -> None:
    """Fill ``result`` for an advanced feature's spec (docs/advanced-semantics.md). A merge-only driver
    (``capabilities.unmerge`` False) may leave out ``model_merge``'s "unmerged": the unmerge is then not compared."""
    feature = FEATURES[result.spec["feature"]]
    case = build_advanced_case(result.spec)
    if feature.method == "merge_and_unload":
        return _check_unload(result, case, call)
    if case.safe:
        expected = result.expected = expectations.safe_merge_expectation(case)
        actual = result.actual = call("model_merge", result.spec)
        refused = isinstance(actual, dict) and bool(actual.get("refused"))
        result.comparisons.append(exact("safe merge refused", refused == expected["refused"],
                                        f"refused={refused}, expected {expected['refused']} (a non-finite adapter)"))  # fmt: skip
        if feature.variant != "merge_safe_untouched":
            return
        after = actual.get("after", {}) if isinstance(actual, dict) else {}
        plain = [{"after": cast_tree(cast_tree(expected["after"], "float32"), "float64")}]
        compare_tensors(result, {"after": after}, {"after": expected["after"]}, plain, case.dtype)
        return
    function = ADVANCED_EXPECTATIONS[feature.method]
    expected = function(case, "float64")
    # PiSSA/OLoRA: an SVD or QR has a backward error of ~dimension·u (Householder; Higham, Accuracy and Stability,
    # 19.3), not u: the re-rounded copies get a relative perturbation of that size (4·n_embd, c_fc's width)
    size = 4 * case.config.n_embd if feature.variant in ("init_pissa", "init_olora", "init_pissa_niter") else 1
    # the same for the SVD of a truncated weighted combination (new variants only: the older ones keep their bound)
    svd_variants = ("weighted_patterns", "weighted_ties_svd", "weighted_magnitude_prune_svd",
                    "weighted_dare_linear_svd", "weighted_dare_ties_svd")  # fmt: skip
    if feature.variant in svd_variants and case.combination["combination_type"].endswith("svd"):
        size = 4 * case.config.n_embd
    copies = [case] + [perturbed(case, i, size) for i in range(1, PLAINS[feature.method])]
    plains = [cast_tree(function(c, "float32"), "float64") for c in copies]
    if feature.method == "model_merge" and capabilities is not None and not capabilities.unmerge:
        # merge-only (fuse without unfuse): logits before, merged logits and merged weights are still compared
        expected.pop("unmerged", None)
        for plain in plains:
            plain.pop("unmerged", None)
    result.expected = expected
    actual = result.actual = call(feature.method, result.spec)
    if not isinstance(actual, dict):
        result.comparisons.append(exact("result", False, f"expected a dict, got {type(actual).__name__}"))
        return
    if feature.method == "init_adapter":
        _check_init(result, case, actual, expected, plains)
        return
    compare_tensors(result, actual, expected, plains, case.dtype)
    if feature.method == "model_adapters" and case.wrt:
        compare_set(result, "gradient keys", list((actual.get("grads") or {}).keys()), case.wrt)


def _check_unload(result: CheckResult, case: AdaptersCase, call: Call) -> None:
    expected = result.expected = {"params": expectations.unloaded_params(case, "float64")}
    expected["logits"] = gpt2_forward(expected["params"], case.config, case.input_ids)[0]
    plains = []
    for c in [case, perturbed(case, 1), perturbed(case, 2)]:
        params32 = expectations.unloaded_params(c, "float32")
        plains.append(cast_tree({"params": params32, "logits": gpt2_forward(params32, c.config, c.input_ids)[0]},
                            "float64"))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="reflora-conform-") as tmp:
        folder = Path(tmp) / "merged"
        folder.mkdir()
        call("merge_and_unload", result.spec, str(folder))
        try:
            params, _ = load_gpt2(folder, case.config)
        except Exception as exc:
            result.comparisons.append(
                exact("checkpoint", False, f"reflora cannot read it: {type(exc).__name__}: {exc}")
            )
            return
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    compare_set(result, "checkpoint keys", list(params), list(expected["params"]))
    if set(params) != set(expected["params"]):
        return
    actual = result.actual = {"params": params, "logits": gpt2_forward(params, case.config, case.input_ids)[0]}
    compare_tensors(result, actual, expected, plains, case.dtype)


def _check_init(result: CheckResult, case: AdaptersCase, actual: dict, expected: dict, plains: list) -> None:
    """Key set and shapes; random inits by KS (A, B) or B = 0; deterministic ones by sign-free quantities."""
    lora = case.init_lora
    plan = plan_lora(case.config, lora)
    shapes = adapter_shapes(plan)
    adapter = {k: np.asarray(v, dtype=np.float64) for k, v in (actual.get("adapter") or {}).items()}
    compare_set(result, "adapter file keys", list(adapter), list(shapes))
    wrong = [k for k in shapes if k in adapter and adapter[k].shape != tuple(shapes[k])]
    result.comparisons.append(exact("adapter shapes", not wrong, f"{wrong[:3]} have the wrong shape"))
    if set(adapter) != set(shapes) or wrong:
        return
    init = lora.init_lora_weights
    if init in (True, False, "gaussian"):
        a_samples, b_samples = [], []
        for module in plan.values():
            (branch,) = module.branches
            a, b = adapter[branch.a_key], adapter[branch.b_key]
            a_samples.append(a * module.r if init == "gaussian" else a * math.sqrt(module.in_features))
            b_samples.append(b * math.sqrt(module.r))
        if init == "gaussian":
            compare_ks(result, "lora_A·r", a_samples, normal_cdf, "N(0, 1)")
        else:
            compare_ks(result, "lora_A·√in", a_samples, uniform_cdf, "U(−1, 1)")
        if init is False:
            compare_ks(result, "lora_B·√r", b_samples, uniform_cdf, "U(−1, 1)")
        else:
            nonzero = sum(int(np.count_nonzero(b)) for b in b_samples)
            result.comparisons.append(exact("lora_B = 0", nonzero == 0, f"{nonzero} non-zero entries in lora_B"))
    if init == "orthogonal":
        _check_orthogonal(result, plan, adapter)
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        _check_pissa_niter(result, case, plan, adapter, actual.get("params") or {})
    numeric = {k: v for k, v in expected.items() if k not in ("scaled_delta", "magnitude")}
    actual_numeric = {"logits": actual.get("logits"), "params": actual.get("params") or {}}
    if init is False:  # the adapter acts from the start: the output is not the base's
        numeric.pop("logits")
    compare_tensors(result, actual_numeric, numeric, [{k: p[k] for k in numeric} for p in plains], case.dtype)
    derived: dict[str, Any] = {}
    if "scaled_delta" in expected:
        derived["scaled_delta"] = expectations.scaled_deltas(plan, adapter)
    if "magnitude" in expected:
        derived["magnitude"] = {m: adapter[mod.magnitude_key] for m, mod in plan.items()}
    wanted = {k: expected[k] for k in derived}
    compare_tensors(result, derived, wanted, [{k: p[k] for k in derived} for p in plains], case.dtype)


ORTHOGONAL_Z = 3.89  # two-sided normal quantile at α = 1e-4, the KS tests' level
ORTHOGONAL_RTOL = 1e-5  # float32 rounding of Q_e Q_oᵀ = 0 and of rank r/2, with margin (r ≤ 4)


def _check_orthogonal(result: CheckResult, plan: dict, adapter: dict[str, np.ndarray]) -> None:
    """PEFT's ``orthogonal_init`` (reflora.lora_init): per module B A = 0 (max |B A| ≤ 1e-5 ‖B‖₂‖A‖₂) and
    rank A = rank B = r/2 (σ_{r/2+1} ≤ 1e-5 σ_1); pooled over modules 100 Σ‖A‖_F² ~ χ²(Σ in·r/2) and
    100 Σ‖B‖_F² ~ χ²(Σ out·r/2), tested by their normal approximation at α = 1e-4."""
    worst_ba, worst_rank, stats = 0.0, 0.0, {"A": [0.0, 0], "B": [0.0, 0]}
    for module in plan.values():
        (branch,) = module.branches
        a, b = adapter[branch.a_key], adapter[branch.b_key]
        sa, sb = np.linalg.svd(a, compute_uv=False), np.linalg.svd(b, compute_uv=False)
        half = module.r // 2
        worst_ba = max(worst_ba, float(np.max(np.abs(b @ a))) / max(float(sa[0] * sb[0]), 1e-300))
        worst_rank = max(worst_rank, float(sa[half] / sa[0]), float(sb[half] / sb[0]))
        stats["A"][0] += 100.0 * float(np.sum(a * a))
        stats["A"][1] += module.in_features * half
        stats["B"][0] += 100.0 * float(np.sum(b * b))
        stats["B"][1] += module.out_features * half
    result.comparisons.append(exact("B A = 0", worst_ba <= ORTHOGONAL_RTOL, f"max |B A| = {worst_ba:.2e}·‖B‖‖A‖"))
    result.comparisons.append(exact("rank A = rank B = r/2", worst_rank <= ORTHOGONAL_RTOL,
                                    f"σ_(r/2+1)/σ_1 = {worst_rank:.2e}"))  # fmt: skip
    for name, (x, n) in stats.items():
        z = (x - n) / math.sqrt(2 * n)
        result.comparisons.append(exact(f"100‖{name}‖² ~ χ²({n})", abs(z) <= ORTHOGONAL_Z, f"z = {z:.2f}"))


PISSA_NITER_RTOL = 1e-5  # float32 (PEFT runs PiSSA in float32): a few u·(‖W‖ + ‖s·BA‖), with margin


def _check_pissa_niter(result: CheckResult, case: AdaptersCase, plan: dict, adapter: dict, params: dict) -> None:
    """Randomised PiSSA (reflora.lora_init.randomized_svd): per module, with Wt the original (out, in) weight,
    D = s·B A and R the returned residual (Wt form): R + D = Wt (≤ 1e-5 max|Wt|); D has rank r (σ_{r+1} ≤ 1e-5
    σ_1); R is orthogonal to D's column space (out ≥ in: Dᵀ R = 0) or row space (out < in: R Dᵀ = 0), within
    1e-5 ‖Wt‖₂² (s·BA is a projection of Wt); ‖R‖_F ≥ (1 − 1e-5) √(Σ_{j>r} σ_j²) (Eckart–Young). How close D is
    to the top-r part is random and not bounded (torch.svd_lowrank without oversampling)."""
    deltas = expectations.scaled_deltas(plan, adapter)
    worst = {"sum": 0.0, "rank": 0.0, "projection": 0.0, "eckart_young": 0.0}
    for name, module in plan.items():
        key = f"{name}.weight"
        if key not in params:
            result.comparisons.append(exact("residual base", False, f"no {key} returned"))
            return
        Wt = np.asarray(case.params[key], dtype=np.float64).T  # (out, in)
        R, D = np.asarray(params[key], dtype=np.float64).T, np.asarray(deltas[name], dtype=np.float64)
        if R.shape != Wt.shape or D.shape != Wt.shape:
            result.comparisons.append(exact("residual base", False, f"{key}: shape {R.shape}, expected {Wt.shape}"))
            return
        s_w, s_d = np.linalg.svd(Wt, compute_uv=False), np.linalg.svd(D, compute_uv=False)
        cross = D.T @ R if Wt.shape[0] >= Wt.shape[1] else R @ D.T
        worst["sum"] = max(worst["sum"], float(np.max(np.abs(R + D - Wt)) / np.max(np.abs(Wt))))
        worst["rank"] = max(worst["rank"], float(s_d[module.r] / s_d[0]) if len(s_d) > module.r else 0.0)
        worst["projection"] = max(worst["projection"], float(np.max(np.abs(cross)) / s_w[0] ** 2))
        tail = math.sqrt(float(np.sum(s_w[module.r :] ** 2)))
        worst["eckart_young"] = max(worst["eckart_young"], 1.0 - float(np.linalg.norm(R)) / tail if tail else 0.0)
    for label, value in worst.items():
        result.comparisons.append(exact(f"pissa_niter {label}", value <= PISSA_NITER_RTOL, f"worst {value:.2e}"))
