"""Issue 5 in the suite: merge at model level, DoRA, initialisations, several adapters, weighted combinations.

The semantics are docs/advanced-semantics.md; this module holds, for the features of level ``"advanced"``
(conformance/features.py), their case (``AdaptersCase``), the driver methods a candidate may add for them, how
a spec is drawn and rebuilt, and the checks. Each check computes the expectation with reflora in float64 and
compares with conformance.tolerance's policy (plain float32 evaluations of re-rounded copies set the bound),
except where the property is exact (a refused merge, a key set, B = 0) or statistical (KS tests of random inits).

Optional driver methods (each needs the capability in brackets; a driver without it is "not supported"):

* ``model_adapters(case) -> {"logits", "loss", "grads": {qualified key: array}}`` [multi_adapter; dora;
  mixed_batch]: build GPT-2 with every adapter of ``case.adapters`` (created in dict order, named by its key,
  tensors copied in), then run with ``case.active`` (applied to every row in that order; ``[]``: adapters
  disabled) or ``case.adapter_names`` (one name per row, ``"__base__"`` for none), the keep-masks
  ``case.dropout_masks`` ({adapter: {module: mask}}; ``None``: eval mode), HF's loss on ``case.labels``, and
  the gradients of ``case.wrt`` (``"<adapter>:<PEFT file key>"``, reflora.qualified_key).
* ``model_merge(case) -> {...}`` [model_merge]: with every adapter active, ``"logits"`` (unmerged, eval),
  then merge them all into the base: ``"merged_logits"`` and ``"merged"`` (HF key -> weight or bias of every
  targeted module, in HF's Conv1D layout); then unmerge: ``"unmerged"`` (same keys). With ``case.safe`` the
  merge is a safe merge of an adapter holding a NaN or an infinity: return ``{"refused": bool, "after": {HF
  key -> weight or bias of every targeted module after the attempt}}``.
* ``merge_and_unload(case, folder)`` [merge_and_unload]: merge every adapter and write the plain model
  (``save_pretrained``: HF's GPT-2 format) into ``folder``.
* ``init_adapter(case) -> {"adapter": {file key: array}, "params": {HF key: weight}, "logits"}``
  [init_methods]: add ``case.init_lora`` (with its ``init_lora_weights``; the library's RNG seeded with
  ``case.seed``) to GPT-2 with ``case.params``; return the adapter as the library saves it (PEFT file keys,
  e.g. ``lora_magnitude_vector``), the targeted modules' base weights after the init (PiSSA/OLoRA change them)
  and eval logits at init.
* ``weighted_adapter(case) -> {"deltas": {module: (out, in)}, "bias_deltas": {module: (out,)}, "logits"}``
  [weighted_combinations]: add the adapters, combine ``case.combination`` (``names``, ``weights``,
  ``combination_type``, ``svd_rank``) into a new adapter, and return its effective ΔW per module (scaling
  included, (out, in) form), its effective bias delta ``s·b_B`` when it has one, and eval logits with the new
  adapter alone active.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from conformance.tolerance import exact
from reflora.adapters import BASE_ADAPTER
from reflora.checkpoint import load_gpt2
from reflora.config import GPT2Config, LoraConfig
from reflora.init import draw_dropout_masks, init_gpt2_params
from reflora.lora_init import init_adapter
from reflora.merge import MergeError, merge_adapters, unmerge_adapters
from reflora.model import adapter_trainable_keys, gpt2_forward, gpt2_loss_and_grads
from reflora.targets import adapter_shapes, plan_lora
from reflora.weighted import add_weighted_adapter

NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32}
MODULES = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
B_SCALE = 0.1  # as conformance.cases.MODEL_B_SCALE: keeps the deltas the size of the base's outputs
# per KS check. ~30 KS checks in a ci run: a correct library fails one with probability ~0.3%; the ci draws
# (seeds included) are derandomized, so a ci run's outcome is fixed. With r >= 2 and n >= 448 values, a wrong
# law (std 1/√r for 1/r, U(±1/in) for U(±1/√in)) gives p < 1e-20.
KS_ALPHA = 1e-4
COMBINED = "combined"
PLAINS = {
    "model_adapters": 3,
    "model_merge": 3,
    "init_adapter": 8,
    "weighted_adapter": 3,
}  # the name of a weighted combination's new adapter


@dataclass
class AdaptersCase:
    """GPT-2 with several named adapters, in reference terms (HF / PEFT names, float64 NumPy)."""

    config: GPT2Config
    params: dict[str, np.ndarray]
    adapters: dict[str, tuple[LoraConfig, dict[str, np.ndarray]]]  # name -> (config, PEFT file key -> array)
    input_ids: np.ndarray  # (B, T)
    labels: np.ndarray | None = None  # (B, T)
    active: list[str] | None = None  # every row, in this order; [] = disabled
    adapter_names: list[str] | None = None  # one per row
    dropout_masks: dict[str, dict[str, np.ndarray]] | None = None  # adapter -> module -> (B, T, in)
    wrt: list[str] = dataclasses.field(default_factory=list)  # qualified keys
    safe: bool = False
    init_lora: LoraConfig | None = None
    combination: dict[str, Any] | None = None
    dtype: str = "float64"
    seed: int = 0

    def tensors(self) -> dict[str, np.ndarray]:
        """Every input array under a flat name, for ``--dump`` (conformance.cases.case_tensors)."""
        out = {f"base/{k}": v for k, v in self.params.items()}
        for name, (_, tensors) in self.adapters.items():
            out.update({f"adapter/{name}/{k}": v for k, v in tensors.items()})
        out["input_ids"] = self.input_ids
        if self.labels is not None:
            out["labels"] = self.labels
        for name, masks in (self.dropout_masks or {}).items():
            out.update({f"dropout/{name}/{k}": v for k, v in masks.items()})
        return out


# ----------------------------------------------------------------------------------------------
# drawing a spec (hypothesis) and rebuilding its case (deterministic from the spec)
# ----------------------------------------------------------------------------------------------


def _lora(data, label: str, *, r=None, alpha=None, dyadic=False, **fields) -> dict[str, Any]:
    """A LoRA config dict; ``dyadic``: r and lora_alpha powers of two, so that s = α/r is exact in float32."""
    ranks, alphas = ((1, 2, 4), (1.0, 2.0, 4.0, 8.0)) if dyadic else ((1, 2, 3, 4), (1.0, 2.0, 3.0, 8.0))
    r = r if r is not None else data.draw(st.sampled_from(ranks), label=f"{label}.r")
    alpha = alpha if alpha is not None else data.draw(st.sampled_from(alphas), label=f"{label}.lora_alpha")
    targets = fields.pop("target_modules", None) or data.draw(
        st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True), label=f"{label}.target_modules"
    )
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets), **fields}


def draw_spec(data, feature) -> dict[str, Any]:
    """Every draw labelled, so that hypothesis prints them with a failure; the spec replays the case."""
    v = feature.variant
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    n_layer = 2 if v.startswith("init") or v == "dora_init" else data.draw(st.integers(1, 2), label="n_layer")
    spec: dict[str, Any] = {
        "feature": feature.id, "seed": seed, "dtype": "float32" if v in ("init_pissa", "init_olora") else "float64",
        "gpt2": {"vocab_size": 23, "n_positions": 16, "n_embd": 16 if n_layer == 2 else 8, "n_layer": n_layer,
                 "n_head": 2},
        "batch": data.draw(st.integers(2, 3), label="batch"), "seq_len": data.draw(st.integers(2, 5), label="seq_len"),
        "adapters": {}, "labels": True,
    }  # fmt: skip
    adapters = spec["adapters"]
    if v in ("merge_lora", "active"):
        for i in range(data.draw(st.integers(1, 3) if v == "active" else st.integers(1, 2), label="n_adapters")):
            adapters[f"a{i}"] = _lora(data, f"a{i}")
        names = list(adapters)
        spec["active"] = data.draw(st.permutations(names), label="active order") if v == "active" else names
    elif v in ("merge_lora_bias", "multi_lora_bias"):
        for i in range(2):
            adapters[f"a{i}"] = _lora(data, f"a{i}", lora_bias=True)
        spec["active"] = list(adapters)
    elif v in ("merge_dora", "dora", "dora_dropout"):
        extra = {"lora_dropout": 0.25} if v == "dora_dropout" else {}
        adapters["d"] = _lora(data, "d", use_dora=True, **extra)
        spec["active"] = ["d"]
        spec["dropout"] = v == "dora_dropout"
    elif v in ("merge_safe", "merge_safe_untouched"):  # untouched: the bad value in the last module merged
        adapters["a0"] = _lora(data, "a0", target_modules=list(MODULES) if v == "merge_safe_untouched" else None)
        spec["active"] = ["a0"]
        spec["poison"] = data.draw(st.sampled_from(["nan", "inf", "-inf"]), label="poison")
        spec["labels"] = False
    elif v == "unload":
        for i in range(data.draw(st.integers(1, 2), label="n_adapters")):
            adapters[f"a{i}"] = _lora(data, f"a{i}")
        spec["active"] = list(adapters)
        spec["labels"] = False
    elif v == "disabled":
        for i in range(2):
            adapters[f"a{i}"] = _lora(data, f"a{i}")
        spec["active"] = []
    elif v == "mixed_batch":
        for i in range(2):
            adapters[f"a{i}"] = _lora(data, f"a{i}")
        choices = [*adapters, BASE_ADAPTER]
        spec["batch"] = 4
        spec["adapter_names"] = data.draw(st.lists(st.sampled_from(choices), min_size=4, max_size=4), label="rows")
    elif v == "dora_order":  # the order of docs/advanced-semantics.md D5: the plain adapter first
        adapters["plain"] = _lora(data, "plain", target_modules=["c_attn"])
        adapters["dora"] = _lora(data, "dora", target_modules=["c_attn"], use_dora=True)
        spec["active"] = ["plain", "dora"]
    elif v.startswith("init") or v == "dora_init":
        init = {"init_true": True, "dora_init": True, "init_gaussian": "gaussian", "init_false": False,
                "init_pissa": "pissa", "init_olora": "olora"}[v]  # fmt: skip
        r = data.draw(st.sampled_from((2, 3, 4)), label="init.r")  # r = 1 would hide std 1/√r vs 1/r
        spec["init"] = _lora(data, "init", r=r, target_modules=list(MODULES), init_lora_weights=init,
                             use_dora=v == "dora_init")  # fmt: skip
        spec["labels"] = False
    elif v.startswith("weighted"):
        spec["labels"] = False
        kind = {"weighted_linear": "linear", "weighted_svd": "svd", "weighted_coefficients": "linear"}.get(v, "cat")
        dyadic = v in ("weighted_linear", "weighted_svd")
        extra = {"use_rslora": True} if v == "weighted_rslora" else {}
        extra.update({"lora_bias": True} if v == "weighted_lora_bias" else {})
        n = data.draw(st.integers(2, 3), label="n_sources")  # one source is always combined linearly (PEFT)
        r = data.draw(st.sampled_from((1, 2, 4)), label="shared r") if kind == "linear" else None
        alpha = 3.0 if v == "weighted_coefficients" else None
        for i in range(n):
            adapters[f"s{i}"] = _lora(data, f"s{i}", r=2 if alpha else r, alpha=alpha, dyadic=dyadic, **extra)
        weights = []
        for i, lora in enumerate(adapters.values()):
            if dyadic:  # w·s = ±c², so √|w·s| (linear) and w (svd) are exact in float32: D6 cannot show
                c = data.draw(st.sampled_from((0.5, 1.0, 1.5, 2.0)), label=f"w{i} root")
                sign = data.draw(st.sampled_from((1.0, -1.0)), label=f"w{i} sign")
                weights.append(sign * c * c * lora["r"] / lora["lora_alpha"])
            else:
                weights.append(data.draw(st.sampled_from((0.3, 0.8, -0.7, 1.0, 1.3)), label=f"w{i}"))
        svd_rank = data.draw(st.sampled_from((None, 1, 2)), label="svd_rank") if kind == "svd" else None
        spec["combination"] = {"names": list(adapters), "weights": weights, "combination_type": kind,
                               "svd_rank": svd_rank}  # fmt: skip
    else:
        raise ValueError(f"unknown advanced variant {v!r}")
    return spec


def build_advanced_case(spec: dict[str, Any]) -> AdaptersCase:
    """Draw order: base (``init_gpt2_params``), per adapter in spec order ``init_adapter(init="test")`` (B and
    b_B × 0.1), input_ids, labels, dropout masks per adapter (``dora_dropout``), the poisoned entry."""
    rng = np.random.default_rng(spec["seed"])
    config = GPT2Config(**spec["gpt2"])
    params = init_gpt2_params(config, rng)
    adapters = {}
    for name, fields in spec["adapters"].items():
        lora = LoraConfig(**fields)
        tensors, _ = init_adapter(params, config, lora, rng, init="test")
        tensors = {k: v * B_SCALE if ".lora_B." in k else v for k, v in tensors.items()}
        adapters[name] = (lora, tensors)
    batch, seq_len = spec["batch"], spec["seq_len"]
    input_ids = rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int64)  # (B, T)
    labels = rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int64) if spec["labels"] else None
    masks = None
    if spec.get("dropout"):
        masks = {name: draw_dropout_masks(plan_lora(config, lora), lora.lora_dropout, batch, seq_len, rng)
                 for name, (lora, _) in adapters.items()}  # fmt: skip
    if "poison" in spec:
        lora, tensors = adapters["a0"]
        keys = [k for k in tensors if ".lora_B." in k]  # model order
        key = keys[-1] if spec["feature"].endswith("untouched") else keys[int(rng.integers(len(keys)))]
        poisoned = tensors[key].copy()
        poisoned.flat[int(rng.integers(poisoned.size))] = float(spec["poison"])
        adapters["a0"] = (lora, {**tensors, key: poisoned})
    names = spec.get("active")
    if spec.get("adapter_names"):
        participating = [name for name in adapters if name in spec["adapter_names"]]
    else:
        participating = names or []
    wrt = adapter_trainable_keys(config, adapters, participating) if labels is not None else []
    return AdaptersCase(
        config=config, params=params, adapters=adapters, input_ids=input_ids, labels=labels, active=names,
        adapter_names=spec.get("adapter_names"), dropout_masks=masks, wrt=wrt, safe="poison" in spec,
        init_lora=LoraConfig(**spec["init"]) if "init" in spec else None, combination=spec.get("combination"),
        dtype=spec["dtype"], seed=spec["seed"],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the reference's answers, in a chosen dtype
# ----------------------------------------------------------------------------------------------


def _cast(tree, dtype: str):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, tuple):  # (LoraConfig, tensors)
        return (tree[0], _cast(tree[1], dtype))
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return tree.astype(NUMPY_DTYPES[dtype])
    return tree


def targeted_keys(case: AdaptersCase) -> list[str]:
    """HF keys of the weights (and biases) of every module some adapter targets."""
    modules = sorted({m for lora, _ in case.adapters.values() for m in plan_lora(case.config, lora)})
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


def adapters_forward_backward(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    params, adapters = _cast(case.params, dtype), _cast(case.adapters, dtype)
    masks = _cast(case.dropout_masks, dtype) if case.dropout_masks else None
    kwargs = dict(adapters=adapters, active=case.active, adapter_names=case.adapter_names, dropout_masks=masks)
    if case.labels is None:
        return {"logits": gpt2_forward(params, case.config, case.input_ids, **kwargs)[0]}
    loss, logits, grads = gpt2_loss_and_grads(params, case.config, case.input_ids, case.labels, wrt=case.wrt, **kwargs)
    return {"logits": logits, "loss": np.asarray(loss), "grads": grads}


def merge_expectation(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    params, adapters = _cast(case.params, dtype), _cast(case.adapters, dtype)
    keys = targeted_keys(case)
    logits = gpt2_forward(params, case.config, case.input_ids, adapters=adapters)[0]
    merged, record = merge_adapters(params, case.config, adapters)
    merged_logits = gpt2_forward(merged, case.config, case.input_ids)[0]
    # float64: W itself is the exact answer; float32: a plain round trip, which sets the bound
    unmerged = params if dtype == "float64" else unmerge_adapters(merged, case.config, adapters, record)
    return {"logits": logits, "merged_logits": merged_logits, "merged": {k: merged[k] for k in keys},
            "unmerged": {k: unmerged[k] for k in keys}}  # fmt: skip


def safe_merge_expectation(case: AdaptersCase) -> dict[str, Any]:
    try:
        merge_adapters(case.params, case.config, case.adapters, safe=True)
        refused = False
    except MergeError:
        refused = True
    return {"refused": refused, "after": {k: case.params[k] for k in targeted_keys(case)}}


def unloaded_params(case: AdaptersCase, dtype: str) -> dict[str, np.ndarray]:
    merged, _ = merge_adapters(_cast(case.params, dtype), case.config, _cast(case.adapters, dtype))
    return {k: merged[k] for k in case.params}


def init_expectation(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    """What a deterministic init gives: ``scaled_delta`` s·BA per module (sign-free), ``params`` (the residual
    base of the targeted weights), ``logits`` (the base model's: the output is unchanged at init), and the DoRA
    magnitude when there is one."""
    params = _cast(case.params, dtype)
    lora = case.init_lora
    rng = np.random.default_rng(0)  # the random inits' A does not enter the checked quantities
    adapter, new_params = init_adapter(params, case.config, lora, rng)
    plan = plan_lora(case.config, lora)
    # the output at init: the base's in real arithmetic (s·BA = 0, or the residual plus s·BA); evaluated through
    # the adapter, so that the float32 plains see the rounding of the split
    logits = gpt2_forward(new_params, case.config, case.input_ids, adapter=adapter, lora=lora)[0]
    out: dict[str, Any] = {"logits": logits}
    if lora.init_lora_weights in ("pissa", "olora"):
        out["scaled_delta"] = {m: mod.scaling * adapter[mod.branches[0].b_key] @ adapter[mod.branches[0].a_key]
                               for m, mod in plan.items()}  # fmt: skip
        out["params"] = {f"{m}.weight": new_params[f"{m}.weight"] for m in plan}
    if lora.use_dora:
        out["magnitude"] = {m: adapter[mod.magnitude_key] for m, mod in plan.items()}
    return out


def module_deltas(config: GPT2Config, lora: LoraConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Effective ΔWt = s·B A (out, in) and s·b_B per module of a (full-width) LoRA adapter."""
    deltas, bias_deltas = {}, {}
    for name, module in plan_lora(config, lora).items():
        (branch,) = module.branches
        deltas[name] = module.scaling * tensors[branch.b_key] @ tensors[branch.a_key]
        if branch.bias_key is not None:
            bias_deltas[name] = module.scaling * tensors[branch.bias_key]
    return {"deltas": deltas, "bias_deltas": bias_deltas}


def weighted_expectation(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    params, adapters = _cast(case.params, dtype), _cast(case.adapters, dtype)
    c = case.combination
    lora, tensors = add_weighted_adapter(case.config, adapters, c["names"], c["weights"], c["combination_type"],
                                         c["svd_rank"])  # fmt: skip
    out = module_deltas(case.config, lora, tensors)
    if not out["bias_deltas"]:
        del out["bias_deltas"]
    out["logits"] = gpt2_forward(params, case.config, case.input_ids, adapter=tensors, lora=lora)[0]
    return out


def perturbed(case: AdaptersCase, seed: int, size: float = 1.0) -> AdaptersCase:
    """Every float input × (1 + δ), δ ~ U(±size·2⁻²⁴): another float32 rounding of the same case (tolerance)."""
    rng = np.random.default_rng(seed)

    def jiggle(value):
        if isinstance(value, dict):
            return {k: jiggle(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return (value[0], jiggle(value[1]))
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return value * (1.0 + size * 2.0**-24 * rng.uniform(-1.0, 1.0, value.shape))
        return value

    return dataclasses.replace(case, params=jiggle(case.params), adapters=jiggle(case.adapters))


EXPECTATIONS = {"model_adapters": adapters_forward_backward, "model_merge": merge_expectation,
                "init_adapter": init_expectation, "weighted_adapter": weighted_expectation}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def check_advanced(result, call) -> None:
    """Fill ``result`` (conformance.checks.CheckResult) for an advanced feature's spec."""
    from conformance.checks import _compare_set, _compare_tensors
    from conformance.features import FEATURES

    feature = FEATURES[result.spec["feature"]]
    case = build_advanced_case(result.spec)
    if feature.method == "merge_and_unload":
        return _check_unload(result, case, call)
    if case.safe:
        expected = result.expected = safe_merge_expectation(case)
        actual = result.actual = call("model_merge", result.spec)
        refused = isinstance(actual, dict) and bool(actual.get("refused"))
        result.comparisons.append(exact("safe merge refused", refused == expected["refused"],
                                        f"refused={refused}, expected {expected['refused']} (a non-finite adapter)"))  # fmt: skip
        if feature.variant != "merge_safe_untouched":
            return
        after = actual.get("after", {}) if isinstance(actual, dict) else {}
        plain = [{"after": _cast(_cast(expected["after"], "float32"), "float64")}]
        _compare_tensors(result, {"after": after}, {"after": expected["after"]}, plain, case.dtype)
        return
    function = EXPECTATIONS[feature.method]
    expected = function(case, "float64")
    # PiSSA/OLoRA: an SVD or QR has a backward error of ~dimension·u (Householder; Higham, Accuracy and Stability,
    # 19.3), not u: the re-rounded copies get a relative perturbation of that size (4·n_embd, c_fc's width)
    size = 4 * case.config.n_embd if feature.variant in ("init_pissa", "init_olora") else 1
    copies = [case] + [perturbed(case, i, size) for i in range(1, PLAINS[feature.method])]
    plains = [_cast(function(c, "float32"), "float64") for c in copies]
    result.expected = expected
    actual = result.actual = call(feature.method, result.spec)
    if not isinstance(actual, dict):
        result.comparisons.append(exact("result", False, f"expected a dict, got {type(actual).__name__}"))
        return
    if feature.method == "init_adapter":
        _check_init(result, case, actual, expected, plains)
        return
    _compare_tensors(result, actual, expected, plains, case.dtype)
    if feature.method == "model_adapters" and case.wrt:
        _compare_set(result, "gradient keys", list((actual.get("grads") or {}).keys()), case.wrt)


def _check_unload(result, case: AdaptersCase, call) -> None:
    expected = result.expected = {"params": unloaded_params(case, "float64")}
    expected["logits"] = gpt2_forward(expected["params"], case.config, case.input_ids)[0]
    plains = []
    for c in [case, perturbed(case, 1), perturbed(case, 2)]:
        params32 = unloaded_params(c, "float32")
        plains.append(_cast({"params": params32, "logits": gpt2_forward(params32, c.config, c.input_ids)[0]},
                            "float64"))  # fmt: skip
    from conformance.checks import _compare_set, _compare_tensors

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
    _compare_set(result, "checkpoint keys", list(params), list(expected["params"]))
    if set(params) != set(expected["params"]):
        return
    actual = result.actual = {"params": params, "logits": gpt2_forward(params, case.config, case.input_ids)[0]}
    _compare_tensors(result, actual, expected, plains, case.dtype)


def ks_pvalue(samples: np.ndarray, cdf) -> tuple[float, float]:
    """One-sample Kolmogorov–Smirnov test: ``(D, p)`` with Kolmogorov's asymptotic p-value and Stephens'
    small-sample correction λ = (√n + 0.12 + 0.11/√n)·D (accurate to a few % for n ≥ 35)."""
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    n = x.size
    f = cdf(x)
    d = float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    k = np.arange(1, 101)
    p = float(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam**2)))
    return d, min(max(p, 0.0), 1.0)


def uniform_cdf(x):  # U(−1, 1)
    return np.clip((x + 1) / 2, 0.0, 1.0)


def normal_cdf(x):  # N(0, 1)
    return 0.5 * (1 + np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2)).astype(np.float64))


def _ks(result, name: str, samples: list[np.ndarray], cdf, law: str) -> None:
    pooled = np.concatenate([s.ravel() for s in samples]) if samples else np.zeros(0)
    if pooled.size < 35:
        result.comparisons.append(exact(f"KS {name}", False, f"only {pooled.size} values"))
        return
    d, p = ks_pvalue(pooled, cdf)
    result.comparisons.append(exact(f"KS {name} ~ {law} (n={pooled.size}, D={d:.3f}, p={p:.1e})", p >= KS_ALPHA,
                                    f"rejected at α={KS_ALPHA}: D={d:.4f}, p={p:.2e}, n={pooled.size}"))  # fmt: skip


def _check_init(result, case: AdaptersCase, actual: dict, expected: dict, plains: list) -> None:
    """Key set and shapes; random inits by KS (A, B) or B = 0; deterministic ones by sign-free quantities."""
    from conformance.checks import _compare_set, _compare_tensors

    lora = case.init_lora
    plan = plan_lora(case.config, lora)
    shapes = adapter_shapes(plan)
    adapter = {k: np.asarray(v, dtype=np.float64) for k, v in (actual.get("adapter") or {}).items()}
    _compare_set(result, "adapter file keys", list(adapter), list(shapes))
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
            _ks(result, "lora_A·r", a_samples, normal_cdf, "N(0, 1)")
        else:
            _ks(result, "lora_A·√in", a_samples, uniform_cdf, "U(−1, 1)")
        if init is False:
            _ks(result, "lora_B·√r", b_samples, uniform_cdf, "U(−1, 1)")
        else:
            nonzero = sum(int(np.count_nonzero(b)) for b in b_samples)
            result.comparisons.append(exact("lora_B = 0", nonzero == 0, f"{nonzero} non-zero entries in lora_B"))
    numeric = {k: v for k, v in expected.items() if k not in ("scaled_delta", "magnitude")}
    actual_numeric = {"logits": actual.get("logits"), "params": actual.get("params") or {}}
    if init is False:  # the adapter acts from the start: the output is not the base's
        numeric.pop("logits")
    _compare_tensors(result, actual_numeric, numeric, [{k: p[k] for k in numeric} for p in plains], case.dtype)
    derived: dict[str, Any] = {}
    if "scaled_delta" in expected:
        derived["scaled_delta"] = {m: mod.scaling * adapter[mod.branches[0].b_key] @ adapter[mod.branches[0].a_key]
                                   for m, mod in plan.items()}  # fmt: skip
    if "magnitude" in expected:
        derived["magnitude"] = {m: adapter[mod.magnitude_key] for m, mod in plan.items()}
    wanted = {k: expected[k] for k in derived}
    _compare_tensors(result, derived, wanted, [{k: p[k] for k in derived} for p in plains], case.dtype)


# ----------------------------------------------------------------------------------------------
# running a feature (what Suite.run_feature does for the other levels, with this module's draw)
# ----------------------------------------------------------------------------------------------


def run_feature(suite, feature, record) -> None:
    from conformance.profiles import PROFILES

    suite.require(feature.needs)

    def property_test(data):
        suite.check(draw_spec(data, feature), record)

    property_test.__name__ = property_test.__qualname__ = f"check_{feature.id.replace('.', '_')}"
    property_test.__module__ = f"conformance.features.{zlib.crc32(feature.id.encode())}"
    settings = PROFILES[suite.profile].settings("model", suite.max_examples)
    settings(given(st.data())(property_test))()
