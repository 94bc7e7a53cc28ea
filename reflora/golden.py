"""``reflora golden``: golden fixtures, a versioned corpus of inputs, weights, outputs and gradients.

A *case* is a JSON spec (``load_spec``): an HF ``GPT2Config`` (``"gpt2"``), a PEFT ``LoraConfig`` (``"lora"``),
reflora-only choices under their own keys (``"reflora_lora"``, ``"padding"``, ``"train_base"``...), and a seed.
Everything else follows from the seed (``draw_case``), in a fixed, documented order. A *fixture* is one
safetensors file per case (format ``reflora-golden/1``) holding the inputs, every base and adapter tensor, the
LoRA dropout masks, the logits, the loss and the gradient of the loss with respect to every trainable tensor.

    spec ──load_spec──> filled spec ──draw_case──> inputs ──compute_outputs──> logits, loss, grads
                                                        └─────────── generate_case ───────────┘
    fixture file ──read_fixture──> (spec, tensors) ──unpack_fixture──> GoldenCase (what a replay needs)

Additive spec keys (format 1 still; defaults reproduce the original cases byte for byte): ``adapter_init``
(PiSSA/OLoRA), ``adapters`` (extra named adapters), ``adapter_names`` (a mixed batch), ``merge`` (merged
weights), ``weighted`` (add_weighted_adapter); DoRA and ``lora_bias`` are PEFT fields inside ``lora``.

The committed corpus lives in ``golden/``: ``cases/<name>.json`` (specs, the source), ``fixtures/<name>.safetensors``
and ``manifest.json`` (every case's filled spec, the sha256 of its file, provenance). ``reflora golden generate``
rewrites it; ``reflora golden verify`` regenerates every case in memory and compares. docs/golden-format.md is
the complete description of the format; a consumer in another language needs nothing else.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflora._version import __version__
from reflora.checkpoint import CheckpointError, atomic_write_bytes, safetensors_bytes
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.init import draw_dropout_masks, init_gpt2_params
from reflora.lora_init import init_adapter
from reflora.model import gpt2_backward, gpt2_forward, gpt2_loss_and_grads, trainable_keys
from reflora.ops.crossentropy import IGNORE_INDEX
from reflora.targets import ADAPTER_PREFIX, adapter_shapes, base_shapes, plan_lora

FORMAT = "reflora-golden/1"
# Regenerated outputs (logits, loss, grad/...) must satisfy max|new − stored| ≤ rtol · max|stored| per tensor.
# float64: the reference's ops may be re-associated (fused, reordered) between versions, which moves results by
# a few ulps of the largest magnitude (one such round: 6.5e-15 relative on the corpus; reflora vs torch autograd:
# < 2e-14); a real change of the math moves them by 1e-8 or far more. 1e-12 is 50x above the first, 1e4x below.
# float32 (variants named *_float32, for checking float32 plumbing; precision is the float64 cases' job): one
# round of op re-association moved results by up to 1e-6 relative (epsilon 1.2e-7); 1e-4 leaves ~100x.
RTOL = {"float64": 1e-12, "float32": 1e-4}
# A gradient is measured against max(max|stored|, ZERO_GRADIENT_FLOOR · the case's largest |gradient|).
ZERO_GRADIENT_FLOOR = 1e-6
CORPUS_LIMIT_BYTES = 20 * 1024 * 1024
MANIFEST = "manifest.json"
CASES_DIR = "cases"
FIXTURES_DIR = "fixtures"
GENERATE_COMMAND = "reflora golden generate"

PADDINGS = ("none", "left", "right", "random")
POSITION_IDS = ("default", "from_mask", "random")
DROPOUT_MODES = ("train", "eval")
OBJECTIVES = ("loss", "dlogits")
DTYPES = ("float64", "float32")
RANDOM_PADDING_P = 0.5  # padding="random": each position (but the last of a row) is padding with this probability

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
}
ADAPTER_INITS = ("test", "peft")
FULL_GRADIENT_PREFIX = "grad_dora_full/"  # dora_full_gradient: the exact gradient, DoRA's norm not detached
DEFAULT_ADAPTER = "default"  # PEFT's name of the first adapter: the spec's own ``lora``
ADAPTER_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]*"
WEIGHTED_DEFAULTS: dict[str, Any] = {"adapters": _REQUIRED, "weights": _REQUIRED, "combination_type": "svd",
                                     "svd_rank": None}  # fmt: skip


class GoldenError(CheckpointError):
    """A fixture file or the corpus is missing, malformed, or disagrees with its spec or manifest."""


# ----------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------


def reflora_only_lora_fields() -> tuple[str, ...]:
    """reflora ``LoraConfig`` fields that PEFT's ``LoraConfig`` does not have (today: ``qkv_slices``)."""
    default = LoraConfig()
    peft_fields = set(default.to_peft_dict())
    return tuple(k for k in default.to_dict() if k not in peft_fields)


def load_spec(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Validate a case spec and fill in every default; returns a new dict (the *filled* spec).

    ``source``: the spec itself or the path of a JSON file holding it. The filled spec is a fixed point:
    ``load_spec(load_spec(s)) == load_spec(s)``. Any problem is a ``ConfigError`` naming the field.
    """
    if isinstance(source, (str, Path)):
        try:
            source = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such spec file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(source, Mapping):
        raise ConfigError(f"a spec must be a JSON object, got {type(source).__name__}")
    unknown = [k for k in source if k not in SPEC_DEFAULTS]
    if unknown:
        raise ConfigError(f"spec.{unknown[0]} is not a golden spec field (known: {', '.join(SPEC_DEFAULTS)})")
    missing = [k for k, v in SPEC_DEFAULTS.items() if v is _REQUIRED and k not in source]
    if missing:
        raise ConfigError(f"spec.{missing[0]} is required")
    spec = {k: copy.deepcopy(source.get(k, v)) for k, v in SPEC_DEFAULTS.items()}

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
    return spec


def _fill_advanced(spec: dict[str, Any], config: GPT2Config) -> None:
    """Check and fill ``adapter_init``, ``adapters``, ``adapter_names``, ``merge`` and ``weighted`` in place."""
    import re

    from reflora.adapters import BASE_ADAPTER
    from reflora.lora_init import INIT_KINDS

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
        unknown = [k for k in weighted if k not in WEIGHTED_DEFAULTS]
        if unknown:
            raise ConfigError(f"spec.weighted.{unknown[0]} is not a field (known: {', '.join(WEIGHTED_DEFAULTS)})")
        missing = [k for k, v in WEIGHTED_DEFAULTS.items() if v is _REQUIRED and k not in weighted]
        if missing:
            raise ConfigError(f"spec.weighted.{missing[0]} is required")
        weighted = {k: copy.deepcopy(weighted.get(k, v)) for k, v in WEIGHTED_DEFAULTS.items()}
        from reflora.weighted import COMBINATION_TYPES

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
        rank = weighted["svd_rank"]
        if rank is not None:
            _check_int("weighted.svd_rank", rank, low=1)
        peft = _peft_dicts(spec)
        if any(peft[n]["use_dora"] for n in sources):
            raise ConfigError("spec.weighted.adapters: a DoRA adapter cannot be combined (docs/advanced-semantics.md)")
        spec["weighted"] = weighted

    if not isinstance(spec["dora_full_gradient"], bool):
        raise ConfigError(f"spec.dora_full_gradient must be true or false, got {spec['dora_full_gradient']!r}")
    if spec["dora_full_gradient"] and not any(e["use_dora"] for e in _peft_dicts(spec).values()):
        raise ConfigError("spec.dora_full_gradient=true needs a DoRA adapter (lora.use_dora=true)")


def _peft_dicts(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The PEFT part of every adapter of a spec, by name: ``default`` (``spec.lora``), then ``spec.adapters``."""
    if spec["lora"] is None:
        return {}
    return {DEFAULT_ADAPTER: spec["lora"], **{n: e["lora"] for n, e in spec["adapters"].items()}}


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


def _merged_keys(spec: Mapping[str, Any]) -> list[str]:
    """The base keys a merge changes, in base order: every targeted weight, and the biases under ``lora_bias``."""
    config, _ = spec_configs(spec)
    changed: set[str] = set()
    for lora in adapter_configs(spec).values():
        for name in plan_lora(config, lora):
            changed.add(f"{name}.weight")
            if lora.lora_bias:
                changed.add(f"{name}.bias")
    return [k for k in base_shapes(config) if k in changed]


def weighted_config(spec: Mapping[str, Any]) -> LoraConfig | None:
    """The config of the ``weighted`` combination (reflora.weighted: scaling exactly 1), or None."""
    from reflora.weighted import _max_rank, combined_config

    weighted = spec["weighted"]
    if weighted is None:
        return None
    config, _ = spec_configs(spec)
    loras = adapter_configs(spec)
    sources = [loras[n] for n in weighted["adapters"]]
    ranks = [_max_rank(s) for s in sources]
    kind = "linear" if len(sources) == 1 else weighted["combination_type"]
    rank = {"linear": ranks[0], "cat": sum(ranks), "svd": weighted["svd_rank"] or max(ranks)}[kind]
    return combined_config(sources, config, rank)


def _dropout_masks_drawn(spec: Mapping[str, Any], lora: LoraConfig | None) -> bool:
    return lora is not None and lora.lora_dropout > 0 and spec["dropout"] == "train"


def gradient_keys(spec: Mapping[str, Any]) -> list[str]:
    """What the fixture differentiates, in file order: PEFT's trainable tensors (the adapter and the biases of
    the ``bias`` mode, or the whole base without LoRA), then, with ``train_base``, every other base tensor.
    With several adapters (``is_multi_adapter``) the adapter keys are qualified, ``"<name>:<PEFT key>"``, for
    every participating adapter."""
    config, lora = spec_configs(spec)
    if is_multi_adapter(spec):
        from reflora.model import adapter_trainable_keys

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
        if _dropout_masks_drawn(spec, loras[name]):
            layout.update({f"{dropout_prefix(name)}{m}": ((b, t, mod.in_features), f) for m, mod in plan.items()})
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
        layout.update({f"merged/base/{k}": (base_shapes(config)[k], f) for k in _merged_keys(spec)})
        layout["merged/logits"] = ((b, t, v), f)
    combined = weighted_config(spec)
    if combined is not None:
        layout.update({f"weighted/{k}": (s, f) for k, s in adapter_shapes(plan_lora(config, combined)).items()})
        layout["weighted/r"] = ((), "int64")
        layout["weighted/lora_alpha"] = ((), "float64")
        layout["weighted/logits"] = ((b, t, v), f)
    return layout


def grad_name(key: str) -> str:
    """The fixture name of a gradient: ``grad/adapter/<PEFT key>`` (the ``default`` adapter, qualified or not),
    ``grad/adapter/<name>/<PEFT key>`` (another adapter, key ``"<name>:<PEFT key>"``) or ``grad/base/<HF key>``."""
    from reflora.adapters import split_key

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


# ----------------------------------------------------------------------------------------------
# drawing a case and computing its outputs
# ----------------------------------------------------------------------------------------------


def draw_case(spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every input tensor of a filled spec, drawn from ``Generator(PCG64(seed))`` in this order:

    1. base: ``init_gpt2_params`` (every base tensor, ``base_shapes`` order)
    2. adapter (if lora): ``init_adapter(params, config, lora, rng, init="test")``: per module in model order,
       per branch A, B (never zero), b_B (``lora_bias``), then DoRA's m = ‖Wᵀ + s·B A‖ ⊙ U(0.5, 1.5); under
       ``adapter_init="peft"`` ``lora.init_lora_weights`` instead (PiSSA/OLoRA: base/ becomes the residual,
       original/base/ keeps the weights before). Then each extra adapter (``adapters``), sorted by name
    3. input_ids: ``rng.integers(0, vocab_size, (B, T))``
    4. attention_mask: ones, then padding "left"/"right": ``n_pad = rng.integers(1, T, B)`` pads per row, at
       its start/end; "random": ``rng.random((B, T)) < 0.5`` is padding, the last position of a row never is
    5. position_ids: "from_mask": HF generate's ``cumsum(mask) − 1`` with 1 at padding (no draw);
       "random": ``rng.integers(0, n_positions, (B, T))``
    6. labels (objective "loss"): input_ids, −100 where the mask is 0 (``ignore_padding_labels``), then −100
       where ``rng.random((B, T)) < ignore_label_fraction`` (drawn only when the fraction is > 0)
    7. dropout masks (lora_dropout > 0 and dropout "train"): ``draw_dropout_masks(plan, p, B, T, rng)``, the
       first adapter's, then each extra adapter's (its own p), sorted by name
    8. dlogits (objective "dlogits"): ``rng.standard_normal((B, T, V))``

    Values are drawn in float64 and cast to ``spec["dtype"]``.
    """
    config, lora = spec_configs(spec)
    dtype = np.dtype(spec["dtype"])
    b, t = spec["batch_size"], spec["seq_len"]
    rng = np.random.Generator(np.random.PCG64(spec["seed"]))
    tensors: dict[str, np.ndarray] = {}
    params = init_gpt2_params(config, rng, np.float64)
    tensors.update({f"base/{k}": v.astype(dtype) for k, v in params.items()})
    loras = adapter_configs(spec)
    if lora is not None:
        init = "test" if spec["adapter_init"] == "test" else lora.init_lora_weights
        adapter, used = init_adapter(params, config, lora, rng, init=init)
        for key in fixture_layout(spec):
            if key.startswith("original/base/"):
                tensors[key] = tensors[key.removeprefix("original/")]
                tensors[key.removeprefix("original/")] = used[key.removeprefix("original/base/")].astype(dtype)
        tensors.update({f"adapter/{k}": v.astype(dtype) for k, v in adapter.items()})
        for name, extra in loras.items():
            if name != DEFAULT_ADAPTER:
                extra_tensors, _ = init_adapter(params, config, extra, rng, init="test")
                tensors.update({f"{adapter_prefix(name)}{k}": v.astype(dtype) for k, v in extra_tensors.items()})
    input_ids = rng.integers(0, config.vocab_size, size=(b, t), dtype=np.int64)  # (B, T)
    mask = np.ones((b, t), dtype=np.int64)  # (B, T)
    if spec["padding"] in ("left", "right"):
        n_pad = rng.integers(1, t, size=b)  # (B,) in [1, T−1]: every row has a pad and a real token
        for row, k in enumerate(n_pad):
            if spec["padding"] == "left":
                mask[row, :k] = 0
            else:
                mask[row, t - k :] = 0
    elif spec["padding"] == "random":
        mask[rng.random((b, t)) < RANDOM_PADDING_P] = 0
        mask[:, -1] = 1
    tensors["input_ids"], tensors["attention_mask"] = input_ids, mask
    if spec["position_ids"] == "from_mask":
        positions = np.cumsum(mask, axis=1) - 1  # (B, T)
        positions[mask == 0] = 1
        tensors["position_ids"] = positions.astype(np.int64)
    elif spec["position_ids"] == "random":
        tensors["position_ids"] = rng.integers(0, config.n_positions, size=(b, t), dtype=np.int64)
    if spec["objective"] == "loss":
        labels = input_ids.copy()  # (B, T)
        if spec["ignore_padding_labels"]:
            labels[mask == 0] = IGNORE_INDEX
        if spec["ignore_label_fraction"] > 0:
            labels[rng.random((b, t)) < spec["ignore_label_fraction"]] = IGNORE_INDEX
        if not np.any(labels[:, 1:] != IGNORE_INDEX):
            raise ConfigError(
                f"with seed={spec['seed']}, every label after the causal shift is ignored (padding / "
                "ignore_padding_labels / ignore_label_fraction): the loss is undefined; change spec.seed"
            )
        tensors["labels"] = labels
    for name, adapter_lora in loras.items():
        if _dropout_masks_drawn(spec, adapter_lora):
            plan = plan_lora(config, adapter_lora)
            masks = draw_dropout_masks(plan, adapter_lora.lora_dropout, b, t, rng, np.float64)
            tensors.update({f"{dropout_prefix(name)}{m}": v.astype(dtype) for m, v in masks.items()})
    if spec["objective"] == "dlogits":
        tensors["dlogits"] = rng.standard_normal((b, t, config.vocab_size)).astype(dtype)
    return tensors


@dataclass(frozen=True)
class GoldenCase:
    """A fixture unpacked into what a replay needs, under reflora's names (see ``unpack_fixture``).

    ``grads`` maps reflora keys (PEFT adapter keys, HF base keys) to the stored gradients; ``loss``, ``labels``
    are None for objective "dlogits", ``dlogits`` is None for objective "loss".
    """

    spec: dict[str, Any]
    config: GPT2Config
    lora: LoraConfig | None
    params: dict[str, np.ndarray]  # HF key -> base tensor
    adapter: dict[str, np.ndarray] | None  # PEFT key -> LoRA tensor
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64 of 0/1
    position_ids: np.ndarray | None  # (B, T) int64, or None: arange(T)
    labels: np.ndarray | None  # (B, T) int64, -100 ignored
    dlogits: np.ndarray | None  # (B, T, V)
    dropout_masks: dict[str, np.ndarray] | None  # module name -> (B, T, in) keep-mask, or None: no dropout
    wrt: list[str]  # gradient keys, in file order
    logits: np.ndarray | None = None  # (B, T, V)
    loss: np.ndarray | None = None  # 0-d
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    # several adapters (spec "adapters", "adapter_names"): the others, by name, and their dropout masks
    extra_adapters: dict[str, tuple[LoraConfig, dict[str, np.ndarray]]] = field(default_factory=dict)
    extra_dropout_masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    adapter_names: list[str] | None = None  # one per sample, "__base__" for none; None: every adapter active
    original_params: dict[str, np.ndarray] = field(default_factory=dict)  # PiSSA/OLoRA: weights before the init
    derived: dict[str, np.ndarray] = field(default_factory=dict)  # the stored merged/... and weighted/... tensors

    @property
    def multi(self) -> bool:
        """reflora's several-adapters mode (gradient keys ``"<name>:<PEFT key>"``)."""
        return bool(self.extra_adapters) or self.adapter_names is not None

    def all_adapters(self) -> dict[str, tuple[LoraConfig, dict[str, np.ndarray]]]:
        """``{"default": (lora, adapter), <name>: (lora, tensors), ...}`` (``gpt2_forward(adapters=...)``)."""
        if self.lora is None:
            return {}
        return {DEFAULT_ADAPTER: (self.lora, self.adapter), **self.extra_adapters}

    def forward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``reflora.gpt2_forward`` (and ``peft_bridge.run_peft``) for this case; with
        several adapters (``multi``), those of the ``adapters=`` mode (``peft_bridge.run_peft_adapters``)."""
        if self.multi:
            masks = {DEFAULT_ADAPTER: self.dropout_masks} if self.dropout_masks else {}
            masks.update(self.extra_dropout_masks)
            return {
                "attention_mask": self.attention_mask,
                "position_ids": self.position_ids,
                "adapters": self.all_adapters(),
                "adapter_names": self.adapter_names,
                "dropout_masks": masks or None,
            }
        return {
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "adapter": self.adapter,
            "lora": self.lora,
            "dropout_masks": self.dropout_masks,
        }


def unpack_fixture(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> GoldenCase:
    """Split a fixture's flat tensor dict (``read_fixture``) into a ``GoldenCase``. Outputs are optional, so
    this also unpacks the inputs alone (``draw_case``)."""
    config, lora = spec_configs(spec)

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    loras = adapter_configs(spec)
    extras = [n for n in loras if n != DEFAULT_ADAPTER]

    def own(prefix: str) -> dict[str, np.ndarray]:  # the default adapter's: no "<name>/" after the prefix
        return {k: v for k, v in group(prefix).items() if not any(k.startswith(f"{n}/") for n in extras)}

    wrt = gradient_keys(spec)
    grads = {key: tensors[grad_name(key)] for key in wrt if grad_name(key) in tensors}
    return GoldenCase(
        spec=dict(spec), config=config, lora=lora, params=group("base/"),
        adapter=own("adapter/") if lora is not None else None,
        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
        position_ids=tensors.get("position_ids"), labels=tensors.get("labels"), dlogits=tensors.get("dlogits"),
        dropout_masks=own("dropout/") or None, wrt=wrt,
        logits=tensors.get("logits"), loss=tensors.get("loss"), grads=grads,
        extra_adapters={n: (loras[n], group(f"{adapter_prefix(n)}")) for n in extras},
        extra_dropout_masks={n: group(dropout_prefix(n)) for n in extras if group(dropout_prefix(n))},
        adapter_names=spec["adapter_names"], original_params=group("original/base/"),
        derived={k: v for k, v in tensors.items() if k.startswith(("merged/", "weighted/", FULL_GRADIENT_PREFIX))},
    )  # fmt: skip


def compute_outputs(case: GoldenCase) -> dict[str, np.ndarray]:
    """logits, loss (objective "loss") and ``grad/<group>/<key>`` for every gradient key, by the reference."""
    if case.labels is not None:
        loss, logits, grads = gpt2_loss_and_grads(
            case.params, case.config, case.input_ids, case.labels, wrt=case.wrt, **case.forward_kwargs()
        )
        out = {"logits": logits, "loss": np.asarray(loss)}
    else:
        logits, cache = gpt2_forward(case.params, case.config, case.input_ids, **case.forward_kwargs())
        grads = gpt2_backward(case.dlogits, cache, case.wrt)
        out = {"logits": logits}
    out.update({grad_name(key): grads[key] for key in case.wrt})
    if case.spec["dora_full_gradient"]:
        kwargs = {**case.forward_kwargs(), "dora_norm_gradient": "full"}
        if case.labels is not None:
            full = gpt2_loss_and_grads(case.params, case.config, case.input_ids, case.labels, wrt=case.wrt, **kwargs)[2]
        else:
            full = gpt2_backward(case.dlogits, gpt2_forward(case.params, case.config, case.input_ids, **kwargs)[1],
                                 case.wrt)  # fmt: skip
        out.update({FULL_GRADIENT_PREFIX + grad_name(key).removeprefix("grad/"): full[key] for key in case.wrt})
    plain = {"attention_mask": case.attention_mask, "position_ids": case.position_ids}
    if case.spec["merge"]:
        from reflora.merge import merge_and_unload

        merged = merge_and_unload(case.params, case.config, adapters=case.all_adapters())
        out.update({f"merged/base/{k}": merged[k] for k in _merged_keys(case.spec)})
        out["merged/logits"] = gpt2_forward(merged, case.config, case.input_ids, **plain)[0]
    weighted = case.spec["weighted"]
    if weighted is not None:
        from reflora.weighted import add_weighted_adapter

        combined, tensors = add_weighted_adapter(
            case.config, case.all_adapters(), weighted["adapters"], weighted["weights"],
            weighted["combination_type"], weighted["svd_rank"],
        )  # fmt: skip
        out.update({f"weighted/{k}": v for k, v in tensors.items()})
        out["weighted/r"] = np.asarray(combined.r, dtype=np.int64)
        out["weighted/lora_alpha"] = np.asarray(combined.lora_alpha, dtype=np.float64)
        out["weighted/logits"] = gpt2_forward(
            case.params, case.config, case.input_ids, adapter=tensors, lora=combined, **plain
        )[0]
    return out


def stored_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The filled spec as a fixture's metadata and the manifest hold it: the additive keys (``adapter_init``,
    ``adapters``, ``adapter_names``, ``merge``, ``weighted``, ``dora_full_gradient``) are left out while at their defaults, so that a
    case that does not use them has exactly the bytes it had before they existed. ``load_spec`` fills them."""
    additive = list(SPEC_DEFAULTS)[list(SPEC_DEFAULTS).index("adapter_init") :]
    return {k: v for k, v in spec.items() if not (k in additive and v == SPEC_DEFAULTS[k])}


def generate_case(spec: Mapping[str, Any] | str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of one fixture: the spec's inputs and the reference's outputs, plus the
    ``__metadata__`` (format, filled spec, versions). Nothing is written."""
    spec = load_spec(spec)
    tensors = draw_case(spec)
    tensors.update(compute_outputs(unpack_fixture(spec, tensors)))
    layout = fixture_layout(spec)
    tensors = {name: np.asarray(tensors[name], dtype=dtype, order="C") for name, (_, dtype) in layout.items()}
    metadata = {
        "format": FORMAT,
        "spec": json.dumps(stored_spec(spec), sort_keys=True),
        "reflora_version": __version__,
        "numpy_version": np.__version__,
    }
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# fixture files
# ----------------------------------------------------------------------------------------------


def serialize_fixture(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The canonical bytes of a fixture (``reflora.checkpoint.safetensors_bytes``): the same tensors and
    metadata always give the same bytes, so a regenerated corpus has the same sha256s."""
    return safetensors_bytes(tensors, metadata)


def write_case(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """Write a fixture atomically (temporary file + rename); returns the sha256 of the bytes written."""
    data = serialize_fixture(tensors, metadata)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_fixture(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(filled spec, tensors)`` of a fixture file, validated: the format tag, the spec, exactly the tensors
    the spec implies with their shapes and dtypes, integer tensors in range, 0/1 masks, finite floats.

    Any problem is a ``GoldenError`` naming the file and the field or tensor.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"{path}: no such fixture file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GoldenError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise GoldenError(f"{path}: __metadata__.format is {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        spec = load_spec(json.loads(metadata.get("spec", "null")))
    except (json.JSONDecodeError, ConfigError) as exc:
        raise GoldenError(f"{path}: __metadata__.spec is not a valid spec ({exc})") from None
    layout = fixture_layout(spec)
    missing = [k for k in layout if k not in tensors]
    unexpected = [k for k in tensors if k not in layout]
    if missing or unexpected:
        raise GoldenError(f"{path}: tensors disagree with the spec: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, (shape, dtype) in layout.items():
        value = tensors[name]
        if tuple(value.shape) != shape or value.dtype != np.dtype(dtype):
            raise GoldenError(
                f"{path}: tensor {name} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
            )
    _check_values(path, spec, tensors)
    return spec, {name: tensors[name] for name in layout}


def _check_values(path: Path, spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    vocab, n_positions = spec["gpt2"]["vocab_size"], spec["gpt2"]["n_positions"]

    def fail(name: str, what: str) -> None:
        raise GoldenError(f"{path}: tensor {name} {what}")

    ids = tensors["input_ids"]
    if ids.min() < 0 or ids.max() >= vocab:
        fail("input_ids", f"has values outside [0, vocab_size={vocab})")
    if "labels" in tensors:
        labels = tensors["labels"]
        if np.any((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))):
            fail("labels", f"has values outside [0, vocab_size={vocab}) other than -100")
    if "position_ids" in tensors and (
        tensors["position_ids"].min() < 0 or tensors["position_ids"].max() >= n_positions
    ):
        fail("position_ids", f"has values outside [0, n_positions={n_positions})")
    for name, value in tensors.items():
        if (name == "attention_mask" or name.startswith("dropout/")) and not np.all((value == 0) | (value == 1)):
            fail(name, "must hold only 0 and 1")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            fail(name, "has non-finite values")


def load_fixture(path: str | Path) -> GoldenCase:
    """``unpack_fixture(*read_fixture(path))``: a validated fixture, ready to replay."""
    return unpack_fixture(*read_fixture(path))


# ----------------------------------------------------------------------------------------------
# comparing and verifying
# ----------------------------------------------------------------------------------------------


def relative_error(new: np.ndarray, stored: np.ndarray, floor: float = 0.0) -> float:
    """``max|new − stored| / max(max|stored|, floor)``: 0 when they are equal, inf when the scale is 0 and they
    differ. ``floor`` is ``gradient_floor`` for gradients, 0 otherwise."""
    diff = float(np.max(np.abs(new - stored), initial=0.0))
    scale = max(float(np.max(np.abs(stored), initial=0.0)), floor)
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def gradient_floor(grads: Iterable[np.ndarray]) -> float:
    """``ZERO_GRADIENT_FLOOR`` times the largest |entry| of a case's gradients: the smallest scale a gradient is
    measured against, so that one that is exactly 0 in exact arithmetic (the q/k slices at T = 1, where softmax
    sees a single key; LayerNorm weights when n_embd = 1) is compared to rounding noise at the case's scale."""
    return ZERO_GRADIENT_FLOOR * max((float(np.max(np.abs(g), initial=0.0)) for g in grads), default=0.0)


@dataclass
class CaseReport:
    """The result of verifying one fixture: ``problems`` is empty when it conforms."""

    name: str
    path: Path
    dtype: str = "float64"
    problems: list[str] = field(default_factory=list)  # each names the tensor or field
    worst_error: float = 0.0  # the largest relative_error over output tensors
    worst_tensor: str = ""
    n_tensors: int = 0
    size_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def compare_tensors(
    stored: Mapping[str, np.ndarray],
    fresh: Mapping[str, np.ndarray],
    rtol: float,
    report: CaseReport,
    spec: Mapping[str, Any] | None = None,
) -> None:
    """Inputs must be bit-identical; outputs must satisfy ``relative_error ≤ rtol``. Adds to ``report``."""
    for name in [k for k in stored if k not in fresh] + [k for k in fresh if k not in stored]:
        report.problems.append(f"tensor {name}: present in only one of the stored file and the regeneration")
    floor = gradient_floor(v.astype(np.float64) for k, v in stored.items() if k.startswith("grad/"))
    for name in (k for k in fresh if k in stored):
        new, old = fresh[name], stored[name]
        if new.shape != old.shape or new.dtype != old.dtype:
            report.problems.append(
                f"tensor {name}: regenerated as {new.dtype}{list(new.shape)}, stored {old.dtype}{list(old.shape)}"
            )
            continue
        if not is_output(name, spec):
            if not np.array_equal(new, old):
                report.problems.append(f"tensor {name}: input drifted (inputs must be bit-identical; numpy's "
                                       "random streams or the derivation order changed)")  # fmt: skip
            continue
        error = relative_error(
            new.astype(np.float64), old.astype(np.float64), floor if name.startswith("grad/") else 0.0
        )
        if error > report.worst_error or not report.worst_tensor:
            report.worst_error, report.worst_tensor = error, name
        if not error <= rtol:
            report.problems.append(f"tensor {name}: relative error {error:.3e} > rtol {rtol:.0e}")


def verify_fixture(
    path: str | Path, *, name: str | None = None, spec: Mapping[str, Any] | None = None, sha256: str | None = None
) -> CaseReport:
    """Read a fixture, check its sha256 and spec against the expected ones (when given), regenerate the case
    in memory from the spec and compare every tensor. Never raises for a bad file: the report says why."""
    path = Path(path)
    report = CaseReport(name=name or path.name.removesuffix(".safetensors"), path=path)
    start = time.perf_counter()
    try:
        if path.is_file():
            report.size_bytes = path.stat().st_size
        if sha256 is not None and path.is_file() and sha256_file(path) != sha256:
            report.problems.append("file: sha256 differs from the manifest (the file changed after generation)")
        file_spec, stored = read_fixture(path)
        report.dtype, report.n_tensors = file_spec["dtype"], len(stored)
        if spec is not None and load_spec(spec) != file_spec:
            report.problems.append("spec: the file's __metadata__.spec differs from the manifest's spec")
        fresh, _ = generate_case(file_spec)
        compare_tensors(stored, fresh, RTOL[file_spec["dtype"]], report, file_spec)
    except ValueError as exc:  # GoldenError, ConfigError, the model's InputError
        report.problems.append(f"file: {exc}")
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class CorpusReport:
    """The result of verifying the corpus: per-case reports plus corpus-level problems."""

    golden_dir: Path
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    expected_cases: int = 0
    total_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.cases) and len(self.cases) == self.expected_cases > 0


def default_golden_dir() -> Path:
    """``golden/`` next to the ``reflora`` package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "golden"


def read_manifest(golden_dir: str | Path) -> dict[str, Any]:
    path = Path(golden_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldenError(f"{path}: no manifest (run `{GENERATE_COMMAND}`)") from None
    except json.JSONDecodeError as exc:
        raise GoldenError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GoldenError(f"{path}: format is not {FORMAT!r}")
    cases = manifest.get("cases")
    if not isinstance(cases, dict) or not cases:
        raise GoldenError(f"{path}: 'cases' must be a non-empty object")
    if manifest.get("case_count") != len(cases):
        raise GoldenError(f"{path}: case_count is {manifest.get('case_count')!r}, but {len(cases)} cases are listed")
    for name, entry in cases.items():
        if not isinstance(entry, dict):
            raise GoldenError(f"{path}: case {name!r} must be a JSON object")
        for key in ("file", "sha256", "bytes", "spec", "provenance"):
            if key not in entry:
                raise GoldenError(f"{path}: case {name!r} lacks {key!r}")
    return manifest


def corpus_fixtures(golden_dir: str | Path | None = None) -> dict[str, Path]:
    """Case name -> fixture path for every case in the manifest (for replays such as the conformance suite).
    Each file must exist and match its manifest sha256."""
    golden_dir = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    manifest = read_manifest(golden_dir)
    paths = {}
    for name, entry in manifest["cases"].items():
        path = golden_dir / entry["file"]
        if not path.is_file():
            raise GoldenError(f"{path}: case {name!r} of the manifest is missing")
        if sha256_file(path) != entry["sha256"]:
            raise GoldenError(f"{path}: case {name!r}: sha256 differs from the manifest")
        paths[name] = path
    return paths


def read_case_specs(golden_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Filled spec of every ``cases/<name>.json``, by name; a bad spec is a ``ConfigError`` naming its file."""
    folder = Path(golden_dir) / CASES_DIR
    files = sorted(folder.glob("*.json"))
    if not files:
        raise GoldenError(f"{folder}: no case specs (*.json)")
    specs = {}
    for file in files:
        try:
            spec = load_spec(file)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        name = file.stem
        if (spec["dtype"] == "float32") != name.endswith("_float32"):
            raise ConfigError(f"{file}: a case name ends in '_float32' exactly when its spec.dtype is 'float32'")
        specs[name] = spec
    return specs


def verify_corpus(
    golden_dir: str | Path | None = None, progress: Callable[[CaseReport], None] | None = None
) -> CorpusReport:
    """Check the corpus against its manifest and regenerate every case in memory.

    Corpus level: the manifest is readable and lists ``case_count > 0`` cases; ``cases/*.json`` holds exactly
    those cases with the same (filled) specs; ``fixtures/`` holds exactly their files; the total size is what
    the manifest says and under 20 MB. Case level: ``verify_fixture``. ``progress`` is called after each case.
    """
    golden_dir = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    report = CorpusReport(golden_dir=golden_dir)
    start = time.perf_counter()
    try:
        manifest = read_manifest(golden_dir)
    except GoldenError as exc:
        report.problems.append(str(exc))
        return report
    entries = manifest["cases"]
    report.expected_cases = manifest["case_count"]
    try:
        specs = read_case_specs(golden_dir)
        for name in sorted(set(specs) ^ set(entries)):
            where = "cases/ but not the manifest" if name in specs else "the manifest but not cases/"
            report.problems.append(f"case {name}: in {where} (run `{GENERATE_COMMAND}`)")
        for name in sorted(set(specs) & set(entries)):
            if load_spec(entries[name]["spec"]) != specs[name]:
                report.problems.append(
                    f"case {name}: cases/{name}.json differs from the manifest (run `{GENERATE_COMMAND}`)"
                )
    except (GoldenError, ConfigError) as exc:
        report.problems.append(str(exc))
    listed = {(golden_dir / e["file"]).resolve() for e in entries.values()}
    for orphan in sorted((golden_dir / FIXTURES_DIR).glob("*.safetensors")):
        if orphan.resolve() not in listed:
            report.problems.append(f"{orphan}: a fixture that the manifest does not list")
    for name, entry in entries.items():
        path = golden_dir / entry["file"]
        if not path.is_file():
            case = CaseReport(name=name, path=path, problems=[f"file: {path} is missing (listed in the manifest)"])
        else:
            case = verify_fixture(path, name=name, spec=entry["spec"], sha256=entry["sha256"])
            if case.size_bytes != entry["bytes"]:
                case.problems.append(f"file: {case.size_bytes} bytes, the manifest says {entry['bytes']}")
        report.cases.append(case)
        report.total_bytes += case.size_bytes
        if progress is not None:
            progress(case)
    if report.total_bytes != manifest.get("total_bytes"):
        report.problems.append(f"corpus: {report.total_bytes} bytes, the manifest says {manifest.get('total_bytes')}")
    if report.total_bytes > CORPUS_LIMIT_BYTES:
        report.problems.append(f"corpus: {report.total_bytes} bytes exceeds the {CORPUS_LIMIT_BYTES} byte limit")
    report.seconds = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------------------------
# generating the corpus
# ----------------------------------------------------------------------------------------------


def generate_corpus(
    golden_dir: str | Path | None = None, progress: Callable[[str], None] | None = None, force: bool = False
) -> dict[str, Any]:
    """Rewrite ``fixtures/`` and ``manifest.json`` from ``cases/*.json``; returns the manifest.

    A fixture that already verifies against its spec (``verify_fixture``: same spec, inputs bit-exact, outputs
    within ``RTOL``) is kept byte for byte, so re-associated reference ops or a new case never change the
    sha256 of the others; ``force`` rewrites every fixture from a fresh regeneration.

    Every spec is validated and every case generated in memory before anything is written, so a bad spec
    writes nothing. Each file is then written atomically, stale fixtures are removed, and the manifest is
    written last. ``progress`` is called with each case name once it is generated.
    """
    golden_dir = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    specs = read_case_specs(golden_dir)
    serialized = {}
    for name, spec in specs.items():
        existing = golden_dir / FIXTURES_DIR / f"{name}.safetensors"
        if not force and existing.is_file() and verify_fixture(existing, name=name, spec=spec).ok:
            serialized[name] = existing.read_bytes()  # still right: keep its bytes (and sha256) unchanged
        else:
            tensors, metadata = generate_case(spec)
            serialized[name] = serialize_fixture(tensors, metadata)
        if progress is not None:
            progress(name)
    total = sum(len(data) for data in serialized.values())
    if total > CORPUS_LIMIT_BYTES:
        raise GoldenError(f"the corpus would be {total} bytes, over the {CORPUS_LIMIT_BYTES} byte limit: shrink cases")
    provenance = {"generator": f"reflora {__version__}", "numpy": np.__version__, "command": GENERATE_COMMAND}
    cases = {}
    for name, data in serialized.items():
        relative = f"{FIXTURES_DIR}/{name}.safetensors"
        atomic_write_bytes(golden_dir / relative, data)
        cases[name] = {"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "spec": stored_spec(specs[name]), "provenance": provenance}  # fmt: skip
    for stale in (golden_dir / FIXTURES_DIR).glob("*.safetensors"):
        if stale.name.removesuffix(".safetensors") not in cases:
            stale.unlink()
    manifest = {"format": FORMAT, "case_count": len(cases), "total_bytes": total, "rtol": RTOL, "cases": cases}
    atomic_write_bytes(golden_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "golden",
        help="generate and verify the golden fixtures (inputs, weights, outputs, gradients)",
        description="Golden fixtures: one safetensors file per case, format reflora-golden/1 "
        "(docs/golden-format.md). The committed corpus is golden/ in the repository.",
    )
    sub = p.add_subparsers(dest="golden_command", metavar="ACTION", required=True)
    gen = sub.add_parser(
        "generate",
        help="rewrite the committed corpus, or write one custom case (--spec/--out)",
        description="Without --spec: regenerate golden/fixtures/ and golden/manifest.json from golden/cases/*.json. "
        "With --spec CASE.json --out FILE: write one fixture for any spec (any size, e.g. GPT-2 small).",
    )
    gen.add_argument("--dir", type=Path, default=None, help="the corpus folder (default: golden/ of this checkout)")
    gen.add_argument("--spec", type=Path, help="a case spec (JSON) to generate instead of the corpus")
    gen.add_argument("--out", type=Path, help="where to write the --spec case's fixture (.safetensors)")
    gen.add_argument("--force", action="store_true",
                     help="rewrite every fixture, even those that still verify (default: keep their bytes)")  # fmt: skip
    gen.set_defaults(func=_run_generate)
    ver = sub.add_parser(
        "verify",
        help="regenerate every committed case in memory and compare with the stored files",
        description="Regenerate every case of the manifest and compare with the stored fixture: inputs bit-exact, "
        "outputs to max|new − stored| ≤ rtol · max|stored| (rtol 1e-12 in float64, 1e-4 in float32); hashes, specs "
        "and the case count must match the manifest. With FIXTURE paths: verify those files against their own spec.",
    )
    ver.add_argument("fixtures", nargs="*", type=Path, metavar="FIXTURE", help="fixture files to verify instead")
    ver.add_argument("--dir", type=Path, default=None, help="the corpus folder (default: golden/ of this checkout)")
    ver.set_defaults(func=_run_verify)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"reflora golden: error: {message}")


def _run_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if (args.spec is None) != (args.out is None):
        raise _fail("--spec and --out go together (one custom case); give neither to rewrite the corpus")
    start = time.perf_counter()
    if args.spec is not None:
        try:
            spec = load_spec(args.spec)
            with console.status(f"generating {args.spec} (forward, backward)"):
                tensors, metadata = generate_case(spec)
            with console.status(f"writing {args.out}"):
                digest = write_case(args.out, tensors, metadata)
        except ValueError as exc:  # ConfigError, CheckpointError, the model's InputError
            raise _fail(str(exc)) from None
        size = args.out.stat().st_size
        loss = f", loss {float(tensors['loss']):.6f}" if "loss" in tensors else ""
        console.print(f"wrote {args.out}: {len(tensors)} tensors, {size:,} bytes{loss}, sha256 {digest[:16]}…, "
                      f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        return 0
    golden_dir = args.dir or default_golden_dir()
    try:
        n_cases = len(read_case_specs(golden_dir))
        progress, task = _progress(console, "generating", n_cases)
        with progress:
            manifest = generate_corpus(golden_dir, progress=lambda name: progress.advance(task), force=args.force)
    except ValueError as exc:  # ConfigError, CheckpointError, the model's InputError
        raise _fail(str(exc)) from None
    console.print(f"wrote {manifest['case_count']} cases, {manifest['total_bytes']:,} bytes, to {golden_dir} "
                  f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def _progress(console, verb: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(f"{verb} cases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)  # fmt: skip
    return progress, progress.add_task(verb, total=total)


def _run_verify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tolerance = ", ".join(f"{d} rtol {r:.0e}" for d, r in RTOL.items())
    console.print(
        f"tolerance: inputs bit-exact; outputs max|new − stored| ≤ rtol · max|stored| per tensor ({tolerance})"
    )
    if args.fixtures:
        cases = [verify_fixture(path) for path in args.fixtures]
        problems: list[str] = []
        ok = all(c.ok for c in cases)
    else:
        golden_dir = args.dir or default_golden_dir()
        try:
            total = read_manifest(golden_dir)["case_count"]
        except GoldenError as exc:
            raise _fail(str(exc)) from None
        progress, task = _progress(console, "verifying", total)
        with progress:
            report = verify_corpus(golden_dir, progress=lambda case: progress.advance(task))
        cases, problems, ok = report.cases, report.problems, report.ok
    table = Table(title="golden fixtures (worst: the largest output error, max|new − stored| / max|stored|)")
    table.add_column("case", no_wrap=True, min_width=12)
    table.add_column("dtype", no_wrap=True, min_width=7)
    table.add_column("tensors", justify="right", no_wrap=True, min_width=7)
    table.add_column("status", no_wrap=True, min_width=6)
    table.add_column("worst", justify="right", no_wrap=True, min_width=7)
    table.add_column("in (base_model.model. omitted)", overflow="ellipsis", no_wrap=True, max_width=44)
    for case in cases:
        status = "[green]ok[/]" if case.ok else f"[red]FAIL ({len(case.problems)})[/]"
        where = case.worst_tensor.replace(ADAPTER_PREFIX, "")
        table.add_row(case.name, case.dtype, str(case.n_tensors), status, f"{case.worst_error:.1e}", where)
    console.print(table)
    for case in cases:
        for problem in case.problems:
            console.print(f"[red]case {case.name}[/]: {problem}", highlight=False)
    for problem in problems:
        console.print(f"[red]corpus[/]: {problem}", highlight=False)
    if not args.fixtures:
        console.print(f"{len(cases)} of {report.expected_cases} cases, {report.total_bytes:,} bytes, "
                      f"{report.seconds:.1f} s")  # fmt: skip
    for dtype in DTYPES:
        worst = max((c for c in cases if c.dtype == dtype), key=lambda c: c.worst_error, default=None)
        if worst is not None:
            console.print(f"worst {dtype} output error: {worst.worst_error:.2e} (rtol {RTOL[dtype]:.0e}) in "
                          f"{worst.name}: {worst.worst_tensor}", highlight=False)  # fmt: skip
    if not args.fixtures and args.dir is None:  # the committed corpus: its trajectories too (reflora.trajectory)
        from reflora.trajectory import verify_trajectory_corpus

        trajectories = verify_trajectory_corpus()
        for name, problems_of_case in trajectories.items():
            for problem in problems_of_case:
                console.print(f"[red]trajectory {name}[/]: {problem}", highlight=False)
        bad = sum(1 for p in trajectories.values() if p)
        console.print(f"trajectories: {len(trajectories) - bad} of {len(trajectories)} ok (golden/trajectories)")
        ok = ok and bad == 0
    console.print("[green]verify: ok[/]" if ok else "[red]verify: FAILED[/]")
    return 0 if ok else 1
