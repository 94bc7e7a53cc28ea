"""What ``gpt2_forward`` and ``gpt2_backward`` accept: every input checked before any arithmetic.

A wrong shape, dtype, key or value is an ``InputError`` whose message names the tensor and what was expected.
``adapter_slots`` also decides which adapters take part in a forward pass (``AdapterSlot``): the one of
``adapter=``/``lora=``, or those of ``adapters=`` selected by ``active`` or ``adapter_names``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from reflora.adapters import BASE_ADAPTER, check_adapter_name, qualified_key, split_key
from reflora.backend import Array, namespace
from reflora.config import GPT2Config, LoraConfig
from reflora.ops.dora_linear import NORM_GRADIENTS
from reflora.targets import LoraModule, adapter_shapes, base_shapes, dropout_plan, plan_lora

INPUTS_EMBEDS = "inputs_embeds"  # the gradient key of HF's inputs_embeds (wte[ids])


class InputError(ValueError):
    """An input tensor has the wrong shape, dtype, keys or values; the message names it."""


class AdapterSlot(NamedTuple):
    """One adapter taking part in a forward pass."""

    name: str
    lora: LoraConfig
    tensors: Mapping[str, Array]
    plan: dict[str, LoraModule]
    masks: dict[str, Array]  # module name -> (B, T, in) keep-mask
    rows: Array | None  # (B,) of 0/1: the samples it applies to; None = every sample
    key_prefix: str  # "" for the single-adapter arguments, "<name>:" for adapters=


def key_mismatch(found: Iterable[str], expected: Iterable[str], show: int = 3) -> str | None:
    """``"missing [...], unexpected [...]"`` (the first ``show`` of each, in order) when the two sets of keys
    differ; None when they agree."""
    found, expected = list(found), list(expected)
    found_set, expected_set = set(found), set(expected)
    missing = [k for k in expected if k not in found_set]
    unknown = [k for k in found if k not in expected_set]
    return f"missing {missing[:show]}, unexpected {unknown[:show]}" if missing or unknown else None


def check_norm_gradient(mode: str) -> str:
    """DoRA's ``dora_norm_gradient``: one of ``NORM_GRADIENTS``."""
    if mode not in NORM_GRADIENTS:
        raise InputError(f"dora_norm_gradient must be one of {NORM_GRADIENTS}, got {mode!r}")
    return mode


def check_params(params: Mapping[str, Array], config: GPT2Config):
    """The params' dtype, after checking that they are exactly ``base_shapes(config)``, float32 or float64."""
    expected = base_shapes(config)
    mismatch = key_mismatch(params, expected, show=5)
    if mismatch:
        raise InputError(f"params do not match the config: {mismatch}")
    xp = namespace(*params.values())
    dtype = params["transformer.wte.weight"].dtype
    if dtype not in (xp.float32, xp.float64):
        raise InputError(f"params must be float32 or float64; transformer.wte.weight is {dtype}")
    for key, shape in expected.items():
        value = params[key]
        if tuple(value.shape) != shape:
            raise InputError(f"params[{key!r}] has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype != dtype:
            raise InputError(f"params[{key!r}] has dtype {value.dtype}, but transformer.wte.weight is {dtype}")
    return dtype


def check_adapter(adapter, lora: LoraConfig | None, config: GPT2Config, dtype, where: str = "adapter") -> dict:
    """The plan of ``lora``, after checking that ``adapter`` holds exactly its tensors, with their shapes and
    ``dtype`` (``InputError`` naming ``where`` otherwise); ``{}`` when both are None."""
    if lora is None and adapter is None:
        return {}
    if lora is None or adapter is None:
        raise InputError("adapter and lora must be given together")
    if not isinstance(lora, LoraConfig):
        raise InputError(f"the LoRA config of {where} must be a reflora LoraConfig, got {type(lora).__name__}")
    plan = plan_lora(config, lora)
    expected = adapter_shapes(plan)
    mismatch = key_mismatch(adapter, expected)
    if mismatch:
        raise InputError(f"{where} tensors do not match the LoRA config: {mismatch}")
    for key, shape in expected.items():
        if tuple(adapter[key].shape) != shape:
            raise InputError(f"{where}[{key!r}] has shape {tuple(adapter[key].shape)}, expected {shape}")
        if adapter[key].dtype != dtype:
            raise InputError(f"{where}[{key!r}] has dtype {adapter[key].dtype}, but the params are {dtype}")
    return plan


def adapter_slots(
    xp, config, dtype, batch, seq_len, adapter, lora, dropout_masks, adapters, active, adapter_names
) -> list[AdapterSlot]:
    """The adapters that take part, validated: from ``adapter``/``lora``, or from ``adapters`` with ``active`` or
    ``adapter_names``."""
    if adapters is None:
        if active is not None or adapter_names is not None:
            raise InputError("active and adapter_names select among adapters={name: (lora, tensors)}; none were given")
        plan = check_adapter(adapter, lora, config, dtype)
        if lora is None:
            if dropout_masks is not None:
                raise InputError("dropout_masks were given without a LoRA config")
            return []
        masks = check_dropout_masks(dropout_masks, lora, plan, batch, seq_len, dtype)
        return [AdapterSlot("default", lora, adapter, plan, masks, None, "")]
    if adapter is not None or lora is not None:
        raise InputError("give either adapter= and lora= (one adapter) or adapters= (several), not both")
    if not isinstance(adapters, Mapping):
        raise InputError(f"adapters must map adapter names to (LoraConfig, tensors), got {type(adapters).__name__}")
    for name in adapters:
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if active is not None and adapter_names is not None:
        raise InputError(
            "give at most one of active (the same adapters for every sample) and adapter_names (per sample)"
        )
    rows: dict[str, Array | None] = {}
    if adapter_names is not None:
        names = list(adapter_names)
        if len(names) != batch:
            raise InputError(f"adapter_names has {len(names)} entries, but the batch has {batch} samples")
        bad = sorted({str(a) for a in names if a != BASE_ADAPTER and a not in adapters})
        if bad:
            raise InputError(
                f"adapter_names names unknown adapters {bad}; known: {list(adapters)} and {BASE_ADAPTER!r}"
            )
        for name in dict.fromkeys(a for a in names if a != BASE_ADAPTER):
            rows[name] = xp.asarray([1.0 if a == name else 0.0 for a in names], dtype=dtype)  # (B,)
    else:
        names = list(adapters) if active is None else list(active)
        if isinstance(active, str):
            raise InputError(f"active must be a list of adapter names, not the string {active!r}")
        unknown = [a for a in names if a not in adapters]
        if unknown or len(set(names)) != len(names):
            raise InputError(f"active must list distinct adapters of {list(adapters)}, got {names}")
        rows = dict.fromkeys(names)
    masks_by_adapter = {} if dropout_masks is None else dict(dropout_masks)
    stray = [k for k in masks_by_adapter if k not in rows]
    if stray:
        raise InputError(
            f"with adapters=, dropout_masks maps adapter names to {{module: mask}}; {stray[:3]} take no part in this pass"
        )
    slots = []
    for name, row_select in rows.items():
        entry = adapters[name]
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise InputError(f"adapters[{name!r}] must be a (LoraConfig, tensors) pair")
        ad_lora, tensors = entry
        plan = check_adapter(tensors, ad_lora, config, dtype, where=f"adapters[{name!r}]")
        masks = check_dropout_masks(masks_by_adapter.get(name), ad_lora, plan, batch, seq_len, dtype)
        slots.append(AdapterSlot(name, ad_lora, tensors, plan, masks, row_select, qualified_key(name, "")))
    return slots


def check_inputs(xp, config, input_ids, inputs_embeds, attention_mask, position_ids, dtype) -> tuple[int, int]:
    """``(batch, seq_len)``, after checking the token inputs, the attention mask and the positions."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise InputError(f"input_ids must have shape (batch, seq_len) with both > 0, got {tuple(input_ids.shape)}")
        if not xp.isdtype(input_ids.dtype, "integral"):
            raise InputError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        lo, hi = int(xp.min(input_ids)), int(xp.max(input_ids))
        if lo < 0 or hi >= config.vocab_size:
            raise InputError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in [{lo}, {hi}]")
        batch, seq_len = input_ids.shape
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[2] != config.n_embd or 0 in inputs_embeds.shape:
            raise InputError(
                f"inputs_embeds must have shape (batch, seq_len, n_embd={config.n_embd}), got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.dtype != dtype:
            raise InputError(f"inputs_embeds has dtype {inputs_embeds.dtype}, but the params are {dtype}")
        batch, seq_len = inputs_embeds.shape[:2]
    if seq_len > config.n_positions:
        raise InputError(f"sequence length {seq_len} exceeds n_positions={config.n_positions}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, seq_len):
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq_len)}")
        if not bool(xp.all((attention_mask == 0) | (attention_mask == 1))):
            raise InputError("attention_mask must hold only 0 and 1")
    if position_ids is not None:
        if position_ids.ndim != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
            raise InputError(
                f"position_ids has shape {tuple(position_ids.shape)}, expected {(batch, seq_len)} or {(1, seq_len)}"
            )
        if not xp.isdtype(position_ids.dtype, "integral"):
            raise InputError(f"position_ids must be integers, got dtype {position_ids.dtype}")
        lo, hi = int(xp.min(position_ids)), int(xp.max(position_ids))
        if lo < 0 or hi >= config.n_positions:
            raise InputError(
                f"position_ids must lie in [0, n_positions={config.n_positions}), got values in [{lo}, {hi}]"
            )
    return batch, seq_len


def check_dropout_masks(masks, lora, plan, batch, seq_len, dtype) -> dict:
    """{module name: (B, T, in) keep-mask}: one per targeted module of ``plan``, or ``{}`` (eval mode)."""
    if masks is None:
        return {}
    if lora is None:
        raise InputError("dropout_masks were given without a LoRA config")
    if lora.lora_dropout == 0.0:
        if masks:
            raise InputError("dropout_masks were given, but lora.lora_dropout is 0 (no dropout)")
        return {}
    plan = dropout_plan(plan)  # no mask for wte: PEFT's Embedding LoRA has no dropout
    mismatch = key_mismatch(masks, plan)
    if mismatch:
        raise InputError(f"dropout_masks need one mask per targeted module: {mismatch}")
    for name, module in plan.items():
        shape = (batch, seq_len, module.in_features)
        if tuple(masks[name].shape) != shape:
            raise InputError(f"dropout_masks[{name!r}] has shape {tuple(masks[name].shape)}, expected {shape}")
        if masks[name].dtype != dtype:
            raise InputError(f"dropout_masks[{name!r}] has dtype {masks[name].dtype}, but the params are {dtype}")
    return dict(masks)


def check_wrt(wrt: Iterable[str], params, slots: Sequence[AdapterSlot]) -> set[str]:
    """The set of keys to differentiate: base keys, ``"inputs_embeds"`` and the taking-part adapters' keys."""
    if isinstance(wrt, str):
        raise InputError(f"wrt must be a collection of keys, not the string {wrt!r}")
    wanted = set(wrt)
    known = set(params) | {INPUTS_EMBEDS}
    for slot in slots:
        known |= {slot.key_prefix + key for key in adapter_shapes(slot.plan)}
    unknown = sorted(wanted - known)
    if unknown:
        hint = ""
        if any(split_key(k)[0] is not None for k in unknown):
            hint = " (a qualified key must name an adapter that takes part in this forward pass)"
        raise InputError(f"cannot differentiate with respect to unknown keys {unknown[:5]}{hint}")
    return wanted
