"""The case spec: validation, defaults, and everything that follows from a filled spec without drawing a number.

A *case* is a JSON spec (``load_spec``): an HF ``GPT2Config`` (``"gpt2"``), a PEFT ``LoraConfig`` (``"lora"``),
reflora-only choices under their own keys (``"reflora_lora"``, ``"padding"``, ``"train_base"``...), and a seed.
From a filled spec follow reflora's configs (``spec_configs``, ``adapter_configs``), what is differentiated
(``gradient_keys``) and every tensor a fixture holds (``fixture_layout``), in a documented order.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reflora.adapters import BASE_ADAPTER, split_key
from reflora.checkpoint import read_json
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.lora_init import INIT_KINDS
from reflora.model import adapter_trainable_keys, trainable_keys
from reflora.scaling import runtime_multiplier
from reflora.targets import ADAPTER_PREFIX, TOKENS_MODULE, adapter_shapes, base_shapes, dropout_plan, plan_lora
from reflora.weighted import (
    COMBINATION_TYPES,
    DARE_TYPES,
    MAJORITY_SIGN_METHODS,
    PRUNED_TYPES,
    combined_config,
    combined_rank,
    dare_mask_shapes,
)

FORMAT = "reflora-golden/1"  # the format tag of every fixture's __metadata__ and of the manifest

PADDINGS = ("none", "left", "right", "random")
POSITION_IDS = ("default", "from_mask", "random")
DROPOUT_MODES = ("train", "eval")
OBJECTIVES = ("loss", "dlogits")
DTYPES = ("float64", "float32")

# Every top-level spec key with its default, in the order a filled spec lists them. "gpt2" and "lora" are
# required; "train_base" defaults to ``lora is None`` (a spec without LoRA trains the base).
_REQUIRED = object()
SPEC_DEFAULTS: dict[str, Any] = {
    "description": "",
    "gpt2": _REQUIRED,
    "lora": _REQUIRED,
    "reflora_lora": {},
    "batch_size": 2,
    "seq_len": 7,
    "seed": 0,
    "dtype": "float64",
    "padding": "none",
    "position_ids": "default",
    "ignore_padding_labels": True,
    "ignore_label_fraction": 0.0,
    "dropout": "train",
    "objective": "loss",
    "train_base": None,
    # additive keys (docs/golden-format.md, "Advanced cases"); each default reproduces the original cases exactly
    "adapter_init": "test",
    "adapters": {},
    "adapter_names": None,
    "merge": False,
    "weighted": None,
    "dora_full_gradient": False,
    "zero_norm_rows": [],  # DoRA rows of zero norm: [{"module", "row"}], that row of W and of B zeroed (draw_case)
    "scale_ops": [],  # runtime scaling of the one adapter: [["set_scale", "default", c] | ["scale_layer", c] | ...]
}
ADAPTER_INITS = ("test", "peft")
FULL_GRADIENT_PREFIX = "grad_dora_full/"  # dora_full_gradient: the exact gradient, DoRA's norm not detached
DEFAULT_ADAPTER = "default"  # PEFT's name of the first adapter: the spec's own ``lora``
ADAPTER_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]*"
WEIGHTED_DEFAULTS: dict[str, Any] = {"adapters": _REQUIRED, "weights": _REQUIRED, "combination_type": "svd",
                                     "svd_rank": None}  # fmt: skip


def reflora_only_lora_fields() -> tuple[str, ...]:
    """reflora ``LoraConfig`` fields that PEFT's ``LoraConfig`` does not have (today: ``qkv_slices``)."""
    default = LoraConfig()
    peft_fields = set(default.to_peft_dict())
    return tuple(k for k in default.to_dict() if k not in peft_fields)


def filled_fields(source: Mapping[str, Any], defaults: Mapping[str, Any], where: str, noun: str) -> dict[str, Any]:
    """A copy of ``source`` with every field of ``defaults`` (unknown fields refused, required ones demanded)."""
    unknown = [k for k in source if k not in defaults]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not {noun} (known: {', '.join(defaults)})")
    missing = [k for k, v in defaults.items() if v is _REQUIRED and k not in source]
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is required")
    return {k: copy.deepcopy(source.get(k, v)) for k, v in defaults.items()}


def load_spec(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Validate a case spec and fill in every default; returns a new dict (the *filled* spec).

    ``source``: the spec itself or the path of a JSON file holding it. The filled spec is a fixed point:
    ``load_spec(load_spec(s)) == load_spec(s)``. Any problem is a ``ConfigError`` naming the field.
    """
    if isinstance(source, (str, Path)):
        source = read_json(source, ConfigError, "spec file")
    if not isinstance(source, Mapping):
        raise ConfigError(f"a spec must be a JSON object, got {type(source).__name__}")
    spec = filled_fields(source, SPEC_DEFAULTS, "spec", "a golden spec field")

    if not isinstance(spec["description"], str):
        raise ConfigError(f"spec.description must be a string, got {spec['description']!r}")
    config = GPT2Config.from_dict(spec["gpt2"])
    spec["gpt2"] = config.to_dict()
    spec["lora"], spec["reflora_lora"] = _fill_lora(spec["lora"], spec["reflora_lora"], config)

    for key in ("batch_size", "seq_len"):
        _check_int(key, spec[key], low=1)
    _check_int("seed", spec["seed"], low=0)
    if spec["seq_len"] > config.n_positions:
        raise ConfigError(f"spec.seq_len={spec['seq_len']} exceeds spec.gpt2.n_positions={config.n_positions}")
    for key, allowed in (("dtype", DTYPES), ("padding", PADDINGS), ("position_ids", POSITION_IDS),
                         ("dropout", DROPOUT_MODES), ("objective", OBJECTIVES)):  # fmt: skip
        if spec[key] not in allowed:
            raise ConfigError(f"spec.{key} must be one of {list(allowed)}, got {spec[key]!r}")
    if spec["padding"] in ("left", "right") and spec["seq_len"] < 2:
        raise ConfigError(f"spec.padding={spec['padding']!r} needs spec.seq_len >= 2 (one pad and one real token)")
    if not isinstance(spec["ignore_padding_labels"], bool):
        raise ConfigError(f"spec.ignore_padding_labels must be true or false, got {spec['ignore_padding_labels']!r}")
    fraction = spec["ignore_label_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ConfigError(f"spec.ignore_label_fraction must be a number in [0, 1), got {fraction!r}")
    if spec["objective"] == "loss" and spec["seq_len"] < 2:
        raise ConfigError(
            "spec.seq_len=1 leaves no label after the causal shift, so the loss is undefined: "
            "use spec.objective='dlogits' (gradients of Σ dlogits ⊙ logits for a seeded dlogits)"
        )
    if spec["train_base"] is None:
        spec["train_base"] = spec["lora"] is None
    if not isinstance(spec["train_base"], bool):
        raise ConfigError(f"spec.train_base must be true or false, got {spec['train_base']!r}")
    if spec["lora"] is None and not spec["train_base"]:
        raise ConfigError("spec.train_base=false with spec.lora=null leaves nothing to differentiate")
    _fill_advanced(spec, config)
    _check_zero_norm_rows(spec, config)
    _check_scale_ops(spec)
    return spec


def _check_zero_norm_rows(spec: dict[str, Any], config: GPT2Config) -> None:
    """``spec.zero_norm_rows``: a list of ``{"module": <a DoRA module of spec.lora>, "row": o}``, 0 ≤ o < out;
    ``draw_case`` zeroes output row o of that module's W (a Conv1D column) and of its lora_B, so the row of
    V = Wt + s·B A has norm 0 (docs/advanced-semantics.md, DoRA, "A row of zero norm")."""
    rows = spec["zero_norm_rows"]
    if not isinstance(rows, list):
        raise ConfigError(f"spec.zero_norm_rows must be a list of {{'module', 'row'}} objects, got {rows!r}")
    if not rows:
        return
    lora = spec_configs(spec)[1]
    if lora is None or not lora.use_dora:
        raise ConfigError("spec.zero_norm_rows needs spec.lora with use_dora: true")
    plan = plan_lora(config, lora)
    for i, entry in enumerate(rows):
        if not isinstance(entry, Mapping) or set(entry) != {"module", "row"}:
            raise ConfigError(f"spec.zero_norm_rows[{i}] must be an object with 'module' and 'row', got {entry!r}")
        if entry["module"] not in plan:
            raise ConfigError(f"spec.zero_norm_rows[{i}].module {entry['module']!r} is not a module of spec.lora "
                              f"(one of {sorted(plan)})")  # fmt: skip
        out = plan[entry["module"]].out_features
        if isinstance(entry["row"], bool) or not isinstance(entry["row"], int) or not 0 <= entry["row"] < out:
            raise ConfigError(f"spec.zero_norm_rows[{i}].row must be an integer in [0, {out}), got {entry['row']!r}")


def _check_scale_ops(spec: dict[str, Any]) -> None:
    """``spec.scale_ops``: a list of PEFT runtime-scaling calls (``reflora.scaling``), each ``["set_scale",
    "default", c]`` (another adapter name is refused: PEFT would ignore it), ``["scale_layer", c]`` or ``["unscale_layer", c]`` / ``["unscale_layer", null]``, applied
    in order to every LoRA layer after the adapter is built; needs ``lora`` and one adapter (no ``adapters``,
    no ``adapter_names``)."""
    ops = spec["scale_ops"]
    if not isinstance(ops, list) or not all(isinstance(op, list) and op for op in ops):
        raise ConfigError(f"spec.scale_ops must be a list of [op, args...] lists, got {ops!r}")
    if not ops:
        return
    if spec["lora"] is None or spec["adapters"] or spec["adapter_names"] is not None:
        raise ConfigError("spec.scale_ops needs spec.lora and one adapter (no spec.adapters, no spec.adapter_names)")
    if spec["merge"] or spec["weighted"] is not None:
        raise ConfigError("spec.scale_ops applies to the forward only: not with spec.merge or spec.weighted")
    for op in ops:
        if op[0] == "set_scale" and len(op) == 3 and op[1] != DEFAULT_ADAPTER:
            raise ConfigError(f"spec.scale_ops: {op!r} names adapter {op[1]!r}; the spec's one adapter is "
                              f"{DEFAULT_ADAPTER!r} (PEFT ignores a set_scale for an adapter the layer does not hold)")  # fmt: skip
    try:
        runtime_multiplier(ops)
    except ConfigError as exc:
        raise ConfigError(f"spec.scale_ops: {exc}") from None


def scale_multiplier(spec: Mapping[str, Any]) -> float:
    """The runtime multiplier m of the spec's adapter after ``spec.scale_ops`` (1 without)."""
    return runtime_multiplier(spec.get("scale_ops") or [])


def _fill_advanced(spec: dict[str, Any], config: GPT2Config) -> None:
    """Check and fill ``adapter_init``, ``adapters``, ``adapter_names``, ``merge`` and ``weighted`` in place."""
    if spec["adapter_init"] not in ADAPTER_INITS:
        raise ConfigError(f"spec.adapter_init must be one of {list(ADAPTER_INITS)}, got {spec['adapter_init']!r}")
    lora = spec["lora"]
    if lora is not None:
        init = lora["init_lora_weights"]
        if spec["adapter_init"] == "test" and init is not True:
            raise ConfigError(
                f"spec.lora.init_lora_weights={init!r} needs spec.adapter_init='peft' (the 'test' derivation draws "
                "every adapter itself, B never zero; init_lora_weights then stays at its default, true)"
            )
        if spec["adapter_init"] == "peft" and init not in INIT_KINDS:
            raise ConfigError(f"spec.lora.init_lora_weights must be one of {list(INIT_KINDS)}, got {init!r}")
    elif spec["adapter_init"] != "test":
        raise ConfigError("spec.adapter_init='peft' needs spec.lora (there is no adapter to initialise)")

    extras = spec["adapters"]
    if not isinstance(extras, dict):
        raise ConfigError(f"spec.adapters must be a JSON object {{name: {{lora, reflora_lora}}}}, got {extras!r}")
    if extras and lora is None:
        raise ConfigError("spec.adapters needs spec.lora (the first adapter, named 'default')")
    if extras and spec["adapter_init"] != "test":
        raise ConfigError("spec.adapters (extra adapters) needs spec.adapter_init='test'")
    filled = {}
    for name in sorted(extras):
        if not re.fullmatch(ADAPTER_NAME_PATTERN, name) or name == DEFAULT_ADAPTER:
            raise ConfigError(
                f"spec.adapters.{name}: an adapter name matches {ADAPTER_NAME_PATTERN} and is not {DEFAULT_ADAPTER!r}"
            )
        entry = extras[name]
        if not isinstance(entry, dict) or "lora" not in entry or set(entry) - {"lora", "reflora_lora"}:
            raise ConfigError(f"spec.adapters.{name} must be an object with 'lora' (and optionally 'reflora_lora')")
        if entry["lora"] is None:
            raise ConfigError(f"spec.adapters.{name}.lora must be a PEFT LoraConfig object, not null")
        try:
            extra_lora, extra_only = _fill_lora(entry["lora"], entry.get("reflora_lora", {}), config)
        except ConfigError as exc:
            raise ConfigError(f"spec.adapters.{name}: {exc}") from None
        if extra_lora["init_lora_weights"] is not True:
            raise ConfigError(f"spec.adapters.{name}.lora.init_lora_weights: extra adapters use the 'test' init")
        filled[name] = {"lora": extra_lora, "reflora_lora": extra_only}
    spec["adapters"] = filled
    known = [DEFAULT_ADAPTER, *filled] if lora is not None else []

    names = spec["adapter_names"]
    if names is not None:
        allowed = [*known, BASE_ADAPTER]
        if lora is None or not isinstance(names, list) or len(names) != spec["batch_size"]:
            raise ConfigError(f"spec.adapter_names must be a list of batch_size={spec['batch_size']} names "
                              f"(each one of {allowed}), and needs spec.lora")  # fmt: skip
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ConfigError(f"spec.adapter_names: {bad[0]!r} is not one of {allowed}")
        if spec["dropout"] == "train" and any(e["lora_dropout"] > 0 for e in _peft_dicts(spec).values()):
            raise ConfigError("spec.adapter_names (a mixed batch) is defined without dropout masks: set "
                              "spec.dropout='eval' or lora_dropout 0")  # fmt: skip

    if not isinstance(spec["merge"], bool):
        raise ConfigError(f"spec.merge must be true or false, got {spec['merge']!r}")
    if spec["merge"] and (lora is None or names is not None):
        raise ConfigError("spec.merge=true needs spec.lora and no spec.adapter_names (every adapter is merged)")

    weighted = spec["weighted"]
    if weighted is not None:
        if lora is None or not isinstance(weighted, dict):
            raise ConfigError("spec.weighted must be an object {adapters, weights, combination_type, svd_rank} "
                              "and needs spec.lora")  # fmt: skip
        pruning = {k: weighted[k] for k in ("density", "majority_sign_method") if k in weighted}  # pruned types only
        weighted = filled_fields({k: v for k, v in weighted.items() if k not in pruning}, WEIGHTED_DEFAULTS,
                                 "spec.weighted", "a field")  # fmt: skip
        sources, weights = weighted["adapters"], weighted["weights"]
        if not isinstance(sources, list) or not sources or any(n not in known for n in sources):
            raise ConfigError(f"spec.weighted.adapters must be a non-empty list of names from {known}, got {sources!r}")
        if (not isinstance(weights, list) or len(weights) != len(sources)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                           for w in weights)):  # fmt: skip
            raise ConfigError(f"spec.weighted.weights must be one finite number per adapter, got {weights!r}")
        weighted["weights"] = [float(w) for w in weights]
        if weighted["combination_type"] not in COMBINATION_TYPES:
            raise ConfigError(f"spec.weighted.combination_type must be one of {list(COMBINATION_TYPES)}, "
                              f"got {weighted['combination_type']!r}")  # fmt: skip
        _check_pruning(weighted, pruning)
        rank = weighted["svd_rank"]
        if rank is not None:
            _check_int("weighted.svd_rank", rank, low=1)
        peft = _peft_dicts(spec)
        if any(peft[n]["use_dora"] for n in sources):
            raise ConfigError("spec.weighted.adapters: a DoRA adapter cannot be combined (docs/advanced-semantics.md)")
        tokens = [n for n in sources if peft[n].get("trainable_token_indices") is not None]
        if tokens:
            raise ConfigError(f"spec.weighted.adapters: {tokens} have lora.trainable_token_indices, whose new rows "
                              "cannot be combined (docs/advanced-semantics.md)")  # fmt: skip
        slices = {n: _reflora_dicts(spec)[n].get("qkv_slices") for n in sources}
        if len({repr(v) for v in slices.values()}) > 1:
            raise ConfigError(f"spec.weighted.adapters have different reflora_lora.qkv_slices {slices}; their "
                              "branches cannot be combined")  # fmt: skip
        spec["weighted"] = weighted
    saving = [n for n, e in _peft_dicts(spec).items() if e.get("modules_to_save") is not None]
    if saving and (spec["adapters"] or names is not None or spec["merge"] or spec["weighted"] is not None):
        where = "spec.lora" if DEFAULT_ADAPTER in saving else f"spec.adapters.{saving[0]}.lora"
        raise ConfigError(f"{where}.modules_to_save is supported with one adapter and the forward/backward only: "
                          "not with spec.adapters, spec.adapter_names, spec.merge or spec.weighted")  # fmt: skip

    if not isinstance(spec["dora_full_gradient"], bool):
        raise ConfigError(f"spec.dora_full_gradient must be true or false, got {spec['dora_full_gradient']!r}")
    if spec["dora_full_gradient"] and not any(e["use_dora"] for e in _peft_dicts(spec).values()):
        raise ConfigError("spec.dora_full_gradient=true needs a DoRA adapter (lora.use_dora=true)")


def _peft_dicts(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The PEFT part of every adapter of a spec, by name: ``default`` (``spec.lora``), then ``spec.adapters``."""
    if spec["lora"] is None:
        return {}
    return {DEFAULT_ADAPTER: spec["lora"], **{n: e["lora"] for n, e in spec["adapters"].items()}}


def _reflora_dicts(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The reflora-only part of every adapter of a spec, by name (as ``_peft_dicts``)."""
    if spec["lora"] is None:
        return {}
    return {DEFAULT_ADAPTER: spec["reflora_lora"], **{n: e["reflora_lora"] for n, e in spec["adapters"].items()}}


def _fill_lora(lora: Any, reflora_lora: Any, config: GPT2Config) -> tuple[dict | None, dict]:
    """The PEFT part and the reflora-only part of the LoRA config, both filled and checked together."""
    only = reflora_only_lora_fields()
    if not isinstance(reflora_lora, dict):
        raise ConfigError(f"spec.reflora_lora must be a JSON object, got {type(reflora_lora).__name__}")
    for key in reflora_lora:
        if key not in only:
            where = "a PEFT LoraConfig field: put it in spec.lora" if key in LoraConfig().to_dict() else "unknown"
            raise ConfigError(f"spec.reflora_lora.{key} is {where} (reflora-only LoRA fields: {', '.join(only)})")
    if lora is None:
        defaults = {k: LoraConfig().to_dict()[k] for k in only}
        changed = [k for k in reflora_lora if reflora_lora[k] != defaults[k]]
        if changed:
            raise ConfigError(f"spec.reflora_lora.{changed[0]} is set, but spec.lora is null (no LoRA)")
        return None, defaults
    if not isinstance(lora, dict):
        raise ConfigError(f"spec.lora must be a JSON object (PEFT LoraConfig fields) or null, got {lora!r}")
    for key in lora:
        if key in only:
            raise ConfigError(
                f"spec.lora.{key} is a reflora-only field that PEFT's LoraConfig rejects: put it in spec.reflora_lora"
            )
    parsed = LoraConfig.from_dict({**lora, **reflora_lora})
    plan_lora(config, parsed)  # the targets must resolve against this GPT-2
    full = parsed.to_dict()
    return parsed.to_peft_dict(), {k: full[k] for k in only}


def _check_int(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"spec.{key} must be an integer >= {low}, got {value!r}")


def spec_configs(spec: Mapping[str, Any]) -> tuple[GPT2Config, LoraConfig | None]:
    """reflora's configs for a filled spec: ``lora`` merges ``spec["lora"]`` with ``spec["reflora_lora"]``."""
    config = GPT2Config.from_dict(spec["gpt2"])
    if spec["lora"] is None:
        return config, None
    return config, LoraConfig.from_dict({**spec["lora"], **spec["reflora_lora"]})


def adapter_configs(spec: Mapping[str, Any]) -> dict[str, LoraConfig]:
    """Every adapter's reflora config, by name: ``"default"`` (the spec's ``lora``), then ``spec["adapters"]``
    in name order (the draw order). Empty without LoRA."""
    _, lora = spec_configs(spec)
    if lora is None:
        return {}
    extras = {n: LoraConfig.from_dict({**e["lora"], **e["reflora_lora"]}) for n, e in sorted(spec["adapters"].items())}
    return {DEFAULT_ADAPTER: lora, **extras}


def is_multi_adapter(spec: Mapping[str, Any]) -> bool:
    """Whether the case runs reflora's several-adapters mode (``adapters=``): extra adapters or a mixed batch.
    Gradient keys are then qualified, ``"<name>:<PEFT key>"``."""
    return bool(spec["adapters"]) or spec["adapter_names"] is not None


def participating_adapters(spec: Mapping[str, Any]) -> list[str]:
    """The adapters the forward uses: all of them, or those a mixed batch names (in ``adapter_configs`` order)."""
    names = list(adapter_configs(spec))
    if spec["adapter_names"] is None:
        return names
    return [n for n in names if n in spec["adapter_names"]]


def adapter_prefix(name: str) -> str:
    """Fixture prefix of an adapter's tensors: ``adapter/`` for ``default``, ``adapter/<name>/`` for the others."""
    return "adapter/" if name == DEFAULT_ADAPTER else f"adapter/{name}/"


def dropout_prefix(name: str) -> str:
    return "dropout/" if name == DEFAULT_ADAPTER else f"dropout/{name}/"


def _peft_init_rewrites_base(spec: Mapping[str, Any]) -> bool:
    return spec["adapter_init"] == "peft" and spec["lora"]["init_lora_weights"] in ("pissa", "olora")


def merged_keys(spec: Mapping[str, Any]) -> list[str]:
    """The base keys a merge changes, in base order: every targeted weight (wte's for trainable tokens), and the
    biases under ``lora_bias``."""
    config, _ = spec_configs(spec)
    changed: set[str] = set()
    for lora in adapter_configs(spec).values():
        for name in plan_lora(config, lora):
            changed.add("transformer.wte.weight" if name == TOKENS_MODULE else f"{name}.weight")
            if lora.lora_bias:
                changed.add(f"{name}.bias")
    return [k for k in base_shapes(config) if k in changed]


def weighted_config(spec: Mapping[str, Any]) -> LoraConfig | None:
    """The config of the ``weighted`` combination (reflora.weighted: scaling exactly 1), or None."""
    weighted = spec["weighted"]
    if weighted is None:
        return None
    config, _ = spec_configs(spec)
    loras = adapter_configs(spec)
    sources = [loras[n] for n in weighted["adapters"]]
    return combined_config(sources, config, combined_rank(weighted["combination_type"], sources, weighted["svd_rank"]))


DARE_MASK_PREFIX = "dare_mask/"  # DARE's keep-masks: dare_mask/<mask key>/<source index> (drawn inputs)


def dare_mask_layout(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Fixture name -> shape of every DARE keep-mask a spec's ``weighted`` needs (``dare_*`` with density < 1
    and two or more sources; ``reflora.weighted.dare_mask_shapes`` order), else {}."""
    weighted = spec["weighted"]
    if weighted is None or weighted["combination_type"] not in DARE_TYPES or weighted["density"] >= 1:
        return {}
    config, _ = spec_configs(spec)
    loras = adapter_configs(spec)
    shapes = dare_mask_shapes(config, [loras[n] for n in weighted["adapters"]], weighted["combination_type"])
    return {f"{DARE_MASK_PREFIX}{key}/{i}": shape for key, group in shapes.items() for i, shape in enumerate(group)}


def dropout_masks_drawn(spec: Mapping[str, Any], lora: LoraConfig | None) -> bool:
    """Whether the case draws LoRA dropout masks for an adapter of this config (``lora_dropout`` > 0, dropout "train")."""
    return lora is not None and lora.lora_dropout > 0 and spec["dropout"] == "train"


def gradient_keys(spec: Mapping[str, Any]) -> list[str]:
    """What the fixture differentiates, in file order: PEFT's trainable tensors (the adapter and the biases of
    the ``bias`` mode, or the whole base without LoRA), then, with ``train_base``, every other base tensor.
    With several adapters (``is_multi_adapter``) the adapter keys are qualified, ``"<name>:<PEFT key>"``, for
    every participating adapter."""
    config, lora = spec_configs(spec)
    if is_multi_adapter(spec):
        loras = adapter_configs(spec)
        keys = adapter_trainable_keys(config, {n: (c, {}) for n, c in loras.items()}, participating_adapters(spec))
    else:
        keys = trainable_keys(config, lora)
    if spec["train_base"]:
        keys += [k for k in base_shapes(config) if k not in keys]
    return keys


def fixture_layout(spec: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor a fixture of this (filled) spec holds: name -> (shape, dtype), in a documented order."""
    config, lora = spec_configs(spec)
    loras = adapter_configs(spec)
    plans = {n: plan_lora(config, c) for n, c in loras.items()}
    b, t, v, f = spec["batch_size"], spec["seq_len"], config.vocab_size, spec["dtype"]
    layout: dict[str, tuple[tuple[int, ...], str]] = {
        "input_ids": ((b, t), "int64"),
        "attention_mask": ((b, t), "int64"),
    }
    if spec["position_ids"] != "default":
        layout["position_ids"] = ((b, t), "int64")
    if spec["objective"] == "loss":
        layout["labels"] = ((b, t), "int64")
    else:
        layout["dlogits"] = ((b, t, v), f)
    layout.update({f"base/{k}": (shape, f) for k, shape in base_shapes(config).items()})
    if lora is not None and _peft_init_rewrites_base(spec):
        layout.update(
            {f"original/base/{n}.weight": (base_shapes(config)[f"{n}.weight"], f) for n in plans[DEFAULT_ADAPTER]}
        )
    for name, plan in plans.items():
        layout.update({f"{adapter_prefix(name)}{k}": (shape, f) for k, shape in adapter_shapes(plan).items()})
    for name, plan in plans.items():
        if dropout_masks_drawn(spec, loras[name]):
            masked = dropout_plan(plan)  # wte (Embedding LoRA) takes no mask
            layout.update({f"{dropout_prefix(name)}{m}": ((b, t, mod.in_features), f) for m, mod in masked.items()})
    layout["logits"] = ((b, t, v), f)
    if spec["objective"] == "loss":
        layout["loss"] = ((), f)
    shapes = {**base_shapes(config)}
    for name, plan in plans.items():
        shapes.update({f"{name}:{k}": shape for k, shape in adapter_shapes(plan).items()})
        if not is_multi_adapter(spec) and name == DEFAULT_ADAPTER:
            shapes.update(adapter_shapes(plan))
    for key in gradient_keys(spec):
        layout[grad_name(key)] = (shapes[key], f)
    if spec["dora_full_gradient"]:
        for key in gradient_keys(spec):
            layout[FULL_GRADIENT_PREFIX + grad_name(key).removeprefix("grad/")] = (shapes[key], f)
    if spec["merge"]:
        layout.update({f"merged/base/{k}": (base_shapes(config)[k], f) for k in merged_keys(spec)})
        layout["merged/logits"] = ((b, t, v), f)
    combined = weighted_config(spec)
    if combined is not None:
        layout.update({f"weighted/{k}": (s, f) for k, s in adapter_shapes(plan_lora(config, combined)).items()})
        layout["weighted/r"] = ((), "int64")
        layout["weighted/lora_alpha"] = ((), "float64")
        layout["weighted/logits"] = ((b, t, v), f)
        layout.update({name: (shape, f) for name, shape in dare_mask_layout(spec).items()})
    return layout


def grad_name(key: str) -> str:
    """The fixture name of a gradient: ``grad/adapter/<PEFT key>`` (the ``default`` adapter, qualified or not),
    ``grad/adapter/<name>/<PEFT key>`` (another adapter, key ``"<name>:<PEFT key>"``) or ``grad/base/<HF key>``."""
    name, file_key = split_key(key)
    if name is not None:
        return f"grad/{adapter_prefix(name)}{file_key}"
    return f"grad/adapter/{key}" if key.startswith(ADAPTER_PREFIX) else f"grad/base/{key}"


OUTPUT_PREFIXES = ("grad/", "merged/", "weighted/", FULL_GRADIENT_PREFIX)


def is_output(name: str, spec: Mapping[str, Any] | None = None) -> bool:
    """Outputs are computed (compared to a tolerance); everything else is drawn from the seed (bit-exact).
    Under a PiSSA/OLoRA ``adapter_init`` the adapter and the residual base weights are computed too (an SVD or a
    QR), so they are compared to the tolerance as well."""
    if name in ("logits", "loss") or name.startswith(OUTPUT_PREFIXES):
        return True
    if spec is not None and spec["lora"] is not None and _peft_init_rewrites_base(spec):
        return name.startswith("adapter/") or (name.startswith("base/") and name.endswith(".weight")
                                               and f"original/{name}" in fixture_layout(spec))  # fmt: skip
    return False


def stored_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The filled spec as a fixture's metadata and the manifest hold it: the additive keys (``adapter_init``,
    ``adapters``, ``adapter_names``, ``merge``, ``weighted``, ``dora_full_gradient``, ``zero_norm_rows``) are left out while at their defaults, so that a
    case that does not use them has exactly the bytes it had before they existed. ``load_spec`` fills them."""
    additive = list(SPEC_DEFAULTS)[list(SPEC_DEFAULTS).index("adapter_init") :]
    return {k: v for k, v in spec.items() if not (k in additive and v == SPEC_DEFAULTS[k])}


ORDERED_SPEC_KEYS = frozenset({"rank_pattern", "alpha_pattern"})  # dicts whose key order is meaning


def stored_spec_json(spec: Mapping[str, Any]) -> str:
    """``stored_spec(spec)`` as the one-line JSON of a fixture's ``__metadata__.spec``.

    Every object's keys are sorted (``json.dumps(..., sort_keys=True)``, as before), except the objects under a
    key in ``ORDERED_SPEC_KEYS`` (``rank_pattern``, ``alpha_pattern``): there the first matching key wins
    (PEFT's ``get_pattern_key``), so their keys keep the spec's order. A spec without pattern keys, or with
    them already in sorted order, has exactly the bytes ``sort_keys=True`` gave."""

    def ordered(value: Any, keep: bool = False) -> Any:
        if isinstance(value, Mapping):
            keys = list(value) if keep else sorted(value)
            return {k: ordered(value[k], k in ORDERED_SPEC_KEYS) for k in keys}
        if isinstance(value, list):
            return [ordered(v) for v in value]
        return value

    return json.dumps(ordered(stored_spec(spec)))


def _check_pruning(weighted: dict[str, Any], pruning: Mapping[str, Any]) -> None:
    """``spec.weighted.density`` (required, a number ≥ 0) and ``majority_sign_method`` (default ``"total"``)
    exist only for the pruning combination types (reflora.weighted.PRUNED_TYPES); fills them in ``weighted``."""
    kind = weighted["combination_type"]
    if kind not in PRUNED_TYPES:
        if pruning:
            raise ConfigError(f"spec.weighted.{next(iter(pruning))} applies only to {list(PRUNED_TYPES)}, not {kind!r}")
        return
    density = pruning.get("density")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density) or density < 0:
        raise ConfigError(f"spec.weighted.density: combination_type {kind!r} needs a number >= 0, got {density!r}")
    if kind in DARE_TYPES and density == 0:
        raise ConfigError(f"spec.weighted.density: combination_type {kind!r} needs density > 0 (DARE rescales by "
                          "1/density)")  # fmt: skip
    method = pruning.get("majority_sign_method", "total")
    if method not in MAJORITY_SIGN_METHODS:
        choices = list(MAJORITY_SIGN_METHODS)
        raise ConfigError(f"spec.weighted.majority_sign_method must be one of {choices}, got {method!r}")
    weighted["density"], weighted["majority_sign_method"] = float(density), method
