"""From a spec (``conformance.strategies``) to the arrays of a case, deterministically: the one case builder.

Every array is drawn in float64 from ``numpy.random.default_rng(spec["seed"])`` in the order written in each
function below, so a spec is a complete, portable reproduction: the suite, the worker process that runs the
candidate and ``reflora conform --replay`` all rebuild the same case from it. ``perturbed`` makes the
re-rounded copies of a case whose plain float32 evaluations set the tolerance (conformance.tolerance).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from conformance.features import FEATURES
from conformance.protocol import AdaptersCase, LayerAdaptersCase, LayerCase, LayerInitCase, ModelCase
from reflora.config import GPT2Config, LoraConfig
from reflora.init import draw_dropout_masks, init_gpt2_params, init_lora_adapter
from reflora.lora_init import init_adapter
from reflora.model import adapter_trainable_keys
from reflora.targets import plan_lora, trainable_bias_keys
from reflora.weighted import DARE_TYPES, dare_mask_shapes, draw_dare_masks

IGNORE_INDEX = -100
MODEL_B_SCALE = 0.1  # see _scaled


def build_case(spec: dict[str, Any]) -> LayerCase | LayerInitCase | LayerAdaptersCase | ModelCase | AdaptersCase:
    """The case of any spec, by its feature's level (and at layer level its method)."""
    level = FEATURES[spec["feature"]].level
    if level == "layer":
        method = FEATURES[spec["feature"]].method
        if method == "layer_init":
            return build_layer_init_case(spec)
        if method == "layer_adapters":
            return build_layer_adapters_case(spec)
        return build_layer_case(spec)
    if level == "golden":
        return golden_model_case(spec)[0]
    if level == "advanced":  # merge, DoRA, inits, several adapters, weighted combinations
        return build_advanced_case(spec)
    return build_model_case(spec)


def build_layer_case(spec: dict[str, Any]) -> LayerCase:
    """Draw order: weight, bias (if any), A and B per branch (slices in q, k, v order), x, keep-mask (train
    mode), dy. Weight ~ N(0, 1/in), bias ~ N(0, 0.1²), A ~ U(±1/√in), B ~ U(±1/√r) (never zero), x, dy ~ N(0, 1)."""
    rng = np.random.default_rng(spec["seed"])
    in_f, out_f, r = spec["in_features"], spec["out_features"], spec["r"]
    batch, seq_len = spec["batch"], spec["seq_len"]
    shape = (out_f, in_f) if spec["layout"] == "linear" else (in_f, out_f)
    weight = rng.standard_normal(shape) / np.sqrt(in_f)
    bias = 0.1 * rng.standard_normal(out_f) if spec["has_bias"] else None
    slices = spec["qkv_slices"]
    names: list[str | None] = [s for s in ("q", "k", "v") if s in slices] if slices else [None]
    width = out_f // 3 if slices else out_f
    lora_A, lora_B = {}, {}
    for name in names:
        lora_A[name] = rng.uniform(-1, 1, (r, in_f)) / np.sqrt(in_f)  # (r, in)
        lora_B[name] = rng.uniform(-1, 1, (width, r)) / np.sqrt(r)  # (width, r)
    x = rng.standard_normal((batch, seq_len, in_f))  # (B, T, in)
    keep_mask = None
    if spec["train_mode"]:
        keep_mask = (rng.random((batch, seq_len, in_f)) >= spec["lora_dropout"]).astype(np.float64)  # (B, T, in)
    dy = rng.standard_normal((batch, seq_len, out_f))  # (B, T, out)
    # issue 15.1, drawn after dy so that every other case is unchanged: b_B ~ U(±1) (out,), m ~ U(0.5, 2) (out,)
    lora_bias_B = rng.uniform(-1, 1, out_f) if spec.get("lora_bias") else None
    magnitude = rng.uniform(0.5, 2.0, out_f) if spec.get("dora") else None
    return LayerCase(
        layout=spec["layout"], x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, r=r,
        lora_alpha=float(spec["lora_alpha"]), use_rslora=spec["use_rslora"], lora_dropout=spec["lora_dropout"],
        keep_mask=keep_mask, bias_trainable=spec["bias"] != "none", dy=dy, dtype=spec["dtype"], seed=spec["seed"],
        lora_bias_B=lora_bias_B, magnitude=magnitude, dora_norm=spec.get("dora_norm", "detached"),
    )  # fmt: skip


def _layer_base(spec: dict[str, Any], rng: np.random.Generator):
    """weight ~ N(0, 1/in) in the spec's layout, then bias ~ N(0, 0.1²) (out,) if ``has_bias``."""
    in_f, out_f = spec["in_features"], spec["out_features"]
    shape = (out_f, in_f) if spec["layout"] == "linear" else (in_f, out_f)
    weight = rng.standard_normal(shape) / np.sqrt(in_f)
    bias = 0.1 * rng.standard_normal(out_f) if spec["has_bias"] else None
    return weight, bias


def build_layer_init_case(spec: dict[str, Any]) -> LayerInitCase:
    """``layer.init.<law>.*`` / ``layer.dora_init.*``. Draw order: weight, bias (if any), x ~ N(0, 1) (B, T, in).
    A and B are the candidate's own (its init, seeded with ``spec["seed"]``)."""
    rng = np.random.default_rng(spec["seed"])
    weight, bias = _layer_base(spec, rng)
    x = rng.standard_normal((spec["batch"], spec["seq_len"], spec["in_features"]))  # (B, T, in)
    return LayerInitCase(
        layout=spec["layout"], x=x, weight=weight, bias=bias, r=spec["r"], lora_alpha=float(spec["lora_alpha"]),
        use_rslora=spec["use_rslora"], init=spec["init"], use_dora=spec["use_dora"], dtype=spec["dtype"],
        seed=spec["seed"],
    )  # fmt: skip


def build_layer_adapters_case(spec: dict[str, Any]) -> LayerAdaptersCase:
    """``layer.adapters.*``. Draw order: weight, bias (if any), per adapter in spec order A ~ U(±1/√in) (r, in)
    and B ~ U(±1/√r) (out, r) (never zero), x ~ N(0, 1) (B, T, in), dy ~ N(0, 1) (B, T, out)."""
    rng = np.random.default_rng(spec["seed"])
    in_f, out_f = spec["in_features"], spec["out_features"]
    weight, bias = _layer_base(spec, rng)
    adapters: dict[str, dict[str, Any]] = {}
    for name, fields in spec["adapters"].items():
        r = fields["r"]
        lora_A = rng.uniform(-1, 1, (r, in_f)) / np.sqrt(in_f)  # (r, in)
        lora_B = rng.uniform(-1, 1, (out_f, r)) / np.sqrt(r)  # (out, r)
        adapters[name] = {"lora_A": lora_A, "lora_B": lora_B, "r": r, "lora_alpha": float(fields["lora_alpha"]),
                          "use_rslora": bool(fields["use_rslora"])}  # fmt: skip
    x = rng.standard_normal((spec["batch"], spec["seq_len"], in_f))  # (B, T, in)
    dy = rng.standard_normal((spec["batch"], spec["seq_len"], out_f))  # (B, T, out)
    return LayerAdaptersCase(
        layout=spec["layout"], x=x, weight=weight, bias=bias, dy=dy, adapters=adapters, active=spec.get("active"),
        adapter_names=spec.get("adapter_names"), dtype=spec["dtype"], seed=spec["seed"],
    )  # fmt: skip


def lora_config(fields: dict[str, Any]) -> LoraConfig:
    return LoraConfig(**fields)


def build_model_case(spec: dict[str, Any]) -> ModelCase:
    """Draw order: base (``init_gpt2_params``), adapter (``init_lora_adapter``, init "test", B × 0.1), input_ids,
    position_ids ("offset": a per-row start; "random"), labels (random tokens; −100 on padding, then
    ``ignored_labels`` of the remaining shifted positions, always leaving one), dropout masks (train mode),
    dlogits (objective "dlogits"), trained biases (adapter files with a bias mode), the second adapter."""
    rng = np.random.default_rng(spec["seed"])
    config = GPT2Config(**spec["gpt2"])
    lora = lora_config(spec["lora"])
    plan = plan_lora(config, lora)
    batch, seq_len, vocab = spec["batch"], spec["seq_len"], config.vocab_size
    params = init_gpt2_params(config, rng)
    adapter = _scaled(init_lora_adapter(plan, rng, init="test"))
    input_ids = rng.integers(0, vocab, (batch, seq_len), dtype=np.int64)  # (B, T)
    attention_mask = None
    if spec.get("attention_mask") == "ones":
        attention_mask = np.ones((batch, seq_len), dtype=np.int64)
    if "padding_side" in spec:
        attention_mask = np.ones((batch, seq_len), dtype=np.int64)  # (B, T)
        for row, n_pad in enumerate(spec["pad_lengths"]):
            if spec["padding_side"] == "left":
                attention_mask[row, :n_pad] = 0
            else:
                attention_mask[row, seq_len - n_pad :] = 0
    position_ids = None
    if spec.get("position_ids") == "offset":
        start = rng.integers(0, config.n_positions - seq_len + 1, (batch, 1))
        position_ids = (start + np.arange(seq_len)).astype(np.int64)  # (B, T)
    elif spec.get("position_ids") == "random":
        position_ids = rng.integers(0, config.n_positions, (batch, seq_len), dtype=np.int64)
    labels = dlogits = None
    if spec.get("objective") == "loss":
        labels = rng.integers(0, vocab, (batch, seq_len), dtype=np.int64)  # (B, T)
        if attention_mask is not None:
            labels[attention_mask == 0] = IGNORE_INDEX
        counted = np.argwhere(labels[:, 1:] != IGNORE_INDEX) + np.array([0, 1])  # positions surviving the shift
        n_ignore = min(spec["ignored_labels"], len(counted) - 1)
        for row, col in counted[rng.permutation(len(counted))[:n_ignore]]:
            labels[row, col] = IGNORE_INDEX
    masks = None
    if lora.lora_dropout > 0 and spec.get("dropout") == "train":
        masks = draw_dropout_masks(plan, lora.lora_dropout, batch, seq_len, rng)
    if spec.get("objective") == "dlogits":
        dlogits = rng.standard_normal((batch, seq_len, vocab))  # (B, T, V)
    trained_biases = None
    if spec["feature"] == "model.adapter_load" and lora.bias != "none":
        keys = trainable_bias_keys(config, lora, plan)
        trained_biases = {k: params[k] + 0.05 * rng.standard_normal(params[k].shape) for k in keys}
    second_lora = second_adapter = None
    if "second_lora" in spec:
        second_lora = lora_config(spec["second_lora"])
        second_adapter = _scaled(init_lora_adapter(plan_lora(config, second_lora), rng, init="test"))
    return ModelCase(
        config=config, lora=lora, params=params, adapter=adapter, input_ids=input_ids, labels=labels,
        attention_mask=attention_mask, position_ids=position_ids, dropout_masks=masks, dlogits=dlogits,
        dtype=spec["dtype"], seed=spec["seed"], trained_biases=trained_biases, second_lora=second_lora,
        second_adapter=second_adapter, scale_ops=tuple(tuple(op) for op in spec.get("scale_ops", ())),
    )  # fmt: skip


def _scaled(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B times ``MODEL_B_SCALE``: the LoRA delta then has the size of the base's output. Unscaled (B ~ U(±1/√r)
    against base weights ~ N(0, 0.02²)) it is ~100× larger, saturates the attention softmaxes, and their
    gradients vanish into rounding: a correct float64 candidate then differs by 100× the usual (measured)."""
    return {k: v * MODEL_B_SCALE if ".lora_B." in k else v for k, v in adapter.items()}


def build_advanced_case(spec: dict[str, Any]) -> AdaptersCase:
    """Draw order: base (``init_gpt2_params``), per adapter in spec order ``init_adapter(init="test")`` (B and
    b_B × 0.1), input_ids, labels, dropout masks per adapter (``dora_dropout``), the poisoned entry, DARE's
    keep-masks (``dare_keep_masks``)."""
    rng = np.random.default_rng(spec["seed"])
    config = GPT2Config(**spec["gpt2"])
    params = init_gpt2_params(config, rng)
    adapters = {}
    for name, fields in spec["adapters"].items():
        lora = LoraConfig(**fields)
        tensors, _ = init_adapter(params, config, lora, rng, init="test")
        tensors = _scaled(tensors)  # B and b_B × MODEL_B_SCALE
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
    if "zero_norm_row" in spec:  # model.dora.zero_norm_row: after every draw, so the draws stay those above
        params, adapters["d"] = zero_norm_row(params, config, adapters["d"], spec["zero_norm_row"])
    if "zero_weight_row" in spec:  # model.dora.init_zero_row: no draw
        params = zero_weight_row(params, config, LoraConfig(**spec["init"]), spec["zero_weight_row"])
    keep_masks = dare_keep_masks(config, adapters, spec.get("combination"), rng)  # last: the draws above stay
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
        dtype=spec["dtype"], seed=spec["seed"], keep_masks=keep_masks,
    )  # fmt: skip


def zero_weight_row(params, config, lora, where: dict[str, int]):
    """params with output row o = ``where["row"] % out`` of module ``where["module"] % count`` (of ``lora``'s
    modules in plan order) zeroed in W (a column of the Conv1D's (in, out) weight): with B = 0 at init, that
    row of Wt + s·B A has zero norm, so DoRA's magnitude there is 0 (docs/advanced-semantics.md, DoRA)."""
    plan = plan_lora(config, lora)
    name = list(plan)[where["module"] % len(plan)]
    weight = params[f"{name}.weight"].copy()
    weight[:, where["row"] % plan[name].out_features] = 0.0
    return {**params, f"{name}.weight": weight}


def dare_keep_masks(config, adapters, combination, rng) -> dict[str, list[np.ndarray]] | None:
    """The keep-masks of a DARE combination with density < 1 (``reflora.weighted.draw_dare_masks`` in
    ``dare_mask_shapes`` order: entries 1.0 with probability density), else None (no draw at all)."""
    if not combination or combination["combination_type"] not in DARE_TYPES or combination["density"] >= 1:
        return None
    sources = [adapters[name][0] for name in combination["names"]]
    shapes = dare_mask_shapes(config, sources, combination["combination_type"])
    return draw_dare_masks(shapes, combination["density"], rng) or None


def zero_norm_row(params, config, adapter, where: dict[str, int]):
    """(params, (lora, tensors)) with a DoRA row of zero norm: of the adapter's modules in plan order, module
    ``where["module"] % count`` gets output row o = ``where["row"] % out`` zeroed in W (a column of the Conv1D's
    (in, out) weight) and in B (out, r), so V_o = Wt_o + s·B_o A = 0 exactly (docs/advanced-semantics.md, DoRA)."""
    lora, tensors = adapter
    plan = plan_lora(config, lora)
    name = list(plan)[where["module"] % len(plan)]
    module = plan[name]
    (branch,) = module.branches
    row = where["row"] % module.out_features
    weight = params[f"{name}.weight"].copy()
    weight[:, row] = 0.0
    b = tensors[branch.b_key].copy()
    b[row, :] = 0.0
    return {**params, f"{name}.weight": weight}, (lora, {**tensors, branch.b_key: b})


def golden_model_case(spec: dict[str, Any]):
    """``(ModelCase, GoldenCase)`` of the fixture ``spec["fixture"]``; arrays upcast to float64, the
    candidate runs in the fixture's dtype."""
    from reflora.golden import read_fixture, unpack_fixture

    golden_spec, tensors = read_fixture(Path(spec["fixture"]))
    golden = unpack_fixture(golden_spec, tensors)

    def f64(array):
        return None if array is None else np.asarray(array, dtype=np.float64)

    case = ModelCase(
        config=golden.config, lora=golden.lora, params={k: f64(v) for k, v in golden.params.items()},
        adapter={k: f64(v) for k, v in (golden.adapter or {}).items()}, input_ids=golden.input_ids,
        labels=golden.labels, attention_mask=golden.attention_mask, position_ids=golden.position_ids,
        dropout_masks=None if golden.dropout_masks is None else {k: f64(v) for k, v in golden.dropout_masks.items()},
        dlogits=f64(golden.dlogits), dtype=golden_spec["dtype"], seed=golden_spec["seed"],
        scale_ops=tuple(tuple(op) for op in golden_spec.get("scale_ops") or ()),
    )  # fmt: skip
    return case, golden


def case_tensors(case: LayerCase | ModelCase | AdaptersCase) -> dict[str, np.ndarray]:
    """Every input array of a case under a flat name (golden fixture names at model level), for ``--dump``."""
    out: dict[str, np.ndarray] = {}
    if isinstance(case, AdaptersCase):
        return case.tensors()
    if isinstance(case, (LayerInitCase, LayerAdaptersCase)):
        out.update(x=case.x, weight=case.weight)
        if case.bias is not None:
            out["bias"] = case.bias
        if isinstance(case, LayerAdaptersCase):
            out["dy"] = case.dy
            for name, adapter in case.adapters.items():
                out[f"adapter/{name}/lora_A"], out[f"adapter/{name}/lora_B"] = adapter["lora_A"], adapter["lora_B"]
        return out
    if isinstance(case, LayerCase):
        out.update(x=case.x, weight=case.weight, dy=case.dy)
        if case.bias is not None:
            out["bias"] = case.bias
        for name in case.lora_A:
            suffix = "" if name is None else f".{name}"
            out[f"lora_A{suffix}"], out[f"lora_B{suffix}"] = case.lora_A[name], case.lora_B[name]
        if case.keep_mask is not None:
            out["keep_mask"] = case.keep_mask
        return out
    out.update({f"base/{k}": v for k, v in case.params.items()})
    out.update({f"adapter/{k}": v for k, v in case.adapter.items()})
    out["input_ids"] = case.input_ids
    for name in ("labels", "attention_mask", "position_ids", "dlogits"):
        if getattr(case, name) is not None:
            out[name] = getattr(case, name)
    out.update({f"dropout/{k}": v for k, v in (case.dropout_masks or {}).items()})
    out.update({f"trained_bias/{k}": v for k, v in (case.trained_biases or {}).items()})
    out.update({f"second_adapter/{k}": v for k, v in (case.second_adapter or {}).items()})
    return out


def spec_json(spec: dict[str, Any]) -> str:
    """The one-line JSON form of a spec (what a reproduction prints and ``--replay`` reads)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def perturbed(case, seed: int, size: float = 1.0):
    """The case with every float input multiplied by (1 + δ), δ ~ U(±size·2⁻²⁴) (``size`` = 1: one float32
    rounding), masks and integer inputs kept. A plain float32 evaluation of it samples another rounding of the
    same computation (conformance.tolerance)."""
    rng = np.random.default_rng(seed)

    def jiggle(value):
        if isinstance(value, dict):
            return {k: jiggle(v) for k, v in value.items()}
        if isinstance(value, tuple):  # an AdaptersCase's (LoraConfig, tensors)
            return (value[0], jiggle(value[1]))
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return value * (1.0 + size * 2.0**-24 * rng.uniform(-1.0, 1.0, value.shape))
        return value

    if isinstance(case, LayerCase):
        names: tuple[str, ...] = ("x", "weight", "bias", "lora_A", "lora_B", "dy", "lora_bias_B", "magnitude")
    elif isinstance(case, LayerInitCase):
        names = ("x", "weight", "bias")
    elif isinstance(case, LayerAdaptersCase):
        names = ("x", "weight", "bias", "dy", "adapters")
    elif isinstance(case, AdaptersCase):
        names = ("params", "adapters")
    else:
        names = ("params", "adapter", "dlogits", "trained_biases", "second_adapter")
    return dataclasses.replace(case, **{name: jiggle(getattr(case, name)) for name in names})
