"""Build transformers ``GPT2LMHeadModel`` + PEFT from reflora tensors, and run it with torch autograd.

This is the only place that maps reflora's names onto PEFT's live modules; the ``peft`` driver, the
autograd cross-checks in tests/ and the golden replay all go through it, so the mapping is written once:

* base tensors: HF state-dict keys, loaded strictly (Conv1D weights stay (in, out));
* adapter tensors: PEFT file key ``base_model.model.<m>.lora_A.weight`` -> live parameter
  ``base_model.model.<m>.lora_A.default.weight``; a modules_to_save copy ``base_model.model.<m>.weight`` ->
  ``base_model.model.<m>.modules_to_save.default.weight`` (its frozen original: ``...<m>.original_module.weight``);
* LoRA dropout: PEFT's ``lora_dropout['default']`` (an ``nn.Dropout``) is replaced by a module that
  multiplies by reflora's keep-mask and 1/(1 − p), which is exactly what ``nn.Dropout`` computes for the
  mask it drew. HF's own dropouts are configured to 0 and the model is put in train mode.
* the loss is HF's formula (shift, ignore -100, mean) computed by torch in the logits' dtype: HF's own
  ``ForCausalLMLoss`` calls ``logits.float()``, which would round a float64 model's loss to float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from reflora.config import GPT2Config, LoraConfig
from reflora.targets import ADAPTER_PREFIX, plan_lora, trainable_bias_keys

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


class MaskDropout(torch.nn.Module):
    """``x * mask / (1 − p)``: ``nn.Dropout`` with a given keep-mask (B, T, in)."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype) / (1.0 - self.p)


def hf_config(config: GPT2Config):
    from transformers import GPT2Config as HFGPT2Config

    return HFGPT2Config(**config.to_dict(), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=None, eos_token_id=None)  # fmt: skip


def build_hf_model(config: GPT2Config, params: Mapping[str, np.ndarray], dtype: str = "float64"):
    """A ``GPT2LMHeadModel`` holding exactly ``params`` (strict load), in ``dtype``, SDPA attention."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(config))
    model.config._attn_implementation = "sdpa"
    model.to(TORCH_DTYPES[dtype])  # before loading: float64 values must not pass through float32 params
    state = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in params.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True)
    return model


def build_peft_model(
    config: GPT2Config,
    params: Mapping[str, np.ndarray],
    lora: LoraConfig,
    adapter: Mapping[str, np.ndarray],
    dtype: str = "float64",
):
    """``get_peft_model`` on the HF model, with reflora's adapter tensors copied in."""
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if lora.qkv_slices is not None:
        raise ValueError("PEFT has no per-slice q/k/v LoRA (lora.qkv_slices)")
    model = build_hf_model(config, params, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it forces fan_in_fan_out=True on Conv1D
        peft_model = get_peft_model(model, PeftLoraConfig(**lora.to_peft_dict()), autocast_adapter_dtype=False)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.items():
            live = live_adapter_name(key)
            named[live].copy_(torch.from_numpy(np.array(value, dtype=np.float64)))
    peft_model.to(TORCH_DTYPES[dtype])
    peft_model.train()
    return peft_model


def apply_scale_ops(peft_model, ops) -> None:
    """Runtime scaling: each op of ``ops`` (``("set_scale", adapter, c)``, ``("scale_layer", c)``,
    ``("unscale_layer", c_or_None)``), in order, on every ``LoraLayer`` of the model (PEFT's own methods)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for kind, *args in ops:
        for layer in layers:
            getattr(layer, kind)(*args)


def live_adapter_name(file_key: str) -> str:
    """The live parameter name of an adapter file key: ``...lora_A.weight`` -> ``...lora_A.default.weight``;
    Embedding LoRA's ``...wte.lora_embedding_A`` (a bare ``nn.Parameter``) -> ``...wte.lora_embedding_A.default``."""
    if file_key.endswith((".lora_embedding_A", ".lora_embedding_B", ".trainable_tokens_delta")):
        return f"{file_key}.default"
    head, _, tail = file_key.rpartition(".")  # tail == "weight"
    if is_saved_key(file_key):  # modules_to_save: the wrapper's copy
        return f"{head}.modules_to_save.default.{tail}"
    return f"{head}.default.{tail}"


def is_saved_key(file_key: str) -> bool:
    """A modules_to_save copy's file key (``base_model.model.<module>.weight`` / ``.bias``: no ``lora_`` part)."""
    return (
        file_key.startswith(ADAPTER_PREFIX)
        and ".lora_" not in file_key
        and not file_key.endswith(".trainable_tokens_delta")
    )


def live_base_name(hf_key: str, plan: Mapping) -> str:
    """The live parameter name of a base tensor inside the PEFT model (targeted modules gain ``base_layer``)."""
    module, _, leaf = hf_key.rpartition(".")
    if f"{module}.token_adapter" in plan:  # trainable tokens: TrainableTokensWrapper(token_adapter(base_layer))
        return f"{ADAPTER_PREFIX}{module}.token_adapter.base_layer.{leaf}"
    if f"{module}.modules_to_save" in plan:  # modules_to_save: ModulesToSaveWrapper(original_module, copy)
        return f"{ADAPTER_PREFIX}{module}.original_module.{leaf}"
    if module in plan:
        return f"{ADAPTER_PREFIX}{module}.base_layer.{leaf}"
    return f"{ADAPTER_PREFIX}{hf_key}"


def inject_dropout_masks(peft_model, masks: Mapping[str, np.ndarray], p: float, dtype: str) -> None:
    """Replace each targeted module's ``lora_dropout['default']`` by ``MaskDropout`` with reflora's mask."""
    modules = dict(peft_model.named_modules())
    for name, mask in masks.items():
        module = modules[ADAPTER_PREFIX + name]
        module.lora_dropout["default"] = MaskDropout(torch.from_numpy(np.array(mask)).to(TORCH_DTYPES[dtype]), p)


def hf_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's shifted causal cross-entropy (ignore -100, mean over counted tokens), in the logits' dtype."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def run_peft(
    config: GPT2Config,
    params: Mapping[str, np.ndarray],
    lora: LoraConfig | None,
    adapter: Mapping[str, np.ndarray] | None,
    input_ids: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    dlogits: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    dropout_masks: Mapping[str, np.ndarray] | None = None,
    wrt: list[str] | None = None,
    dtype: str = "float64",
    scale_ops=(),
) -> dict[str, np.ndarray]:
    """Forward and autograd backward; returns ``logits``, ``loss`` (if labels) and ``grad/<key>`` for ``wrt``.
    ``scale_ops``: PEFT's runtime scaling calls, applied after the adapter is built (``apply_scale_ops``).

    ``wrt`` holds reflora keys (adapter keys, HF base keys, ``inputs_embeds``). Backward runs from the loss,
    or from ``Σ dlogits ⊙ logits`` when ``dlogits`` is given.
    """
    if lora is None:
        model, plan = build_hf_model(config, params, dtype), {}
        model.train()
        named = dict(model.named_parameters())
        base_name = lambda key: key  # noqa: E731
    else:
        model = build_peft_model(config, params, lora, adapter, dtype)
        plan = plan_lora(config, lora)
        named = dict(model.named_parameters())
        base_name = lambda key: live_base_name(key, plan)  # noqa: E731
        if scale_ops:
            apply_scale_ops(model, scale_ops)
        if dropout_masks:
            inject_dropout_masks(model, dropout_masks, lora.lora_dropout, dtype)
    wrt = list(wrt or [])
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = {}
    for key in wrt:
        if key == "inputs_embeds":
            continue
        live = live_adapter_name(key) if key.startswith(ADAPTER_PREFIX) else base_name(key)
        named[live].requires_grad_(True)
        leaves[key] = named[live]
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    kwargs = {}
    if "inputs_embeds" in wrt:
        embeds = named[base_name("transformer.wte.weight")][ids]  # in the graph, so wte's gradient stays whole
        if not embeds.requires_grad:
            embeds = embeds.detach().requires_grad_(True)
        leaves["inputs_embeds"] = embeds
        kwargs["inputs_embeds"] = embeds
    else:
        kwargs["input_ids"] = ids
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, dtype=np.int64))
    logits = model(**kwargs).logits
    out: dict[str, np.ndarray] = {"logits": logits.detach().to(torch.float64).numpy()}
    if labels is not None:
        loss = hf_causal_lm_loss(logits, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        out["loss"] = np.asarray(loss.detach().to(torch.float64).item())
    if wrt:
        if dlogits is not None:
            objective = (logits * torch.from_numpy(np.asarray(dlogits)).to(logits.dtype)).sum()
        else:
            objective = loss
        grads = torch.autograd.grad(objective, [leaves[k] for k in wrt], allow_unused=True)
        for key, grad in zip(wrt, grads, strict=True):
            value = torch.zeros_like(leaves[key]) if grad is None else grad
            out[f"grad/{key}"] = value.detach().to(torch.float64).numpy()
    return out


def default_wrt(config: GPT2Config, lora: LoraConfig) -> list[str]:
    plan = plan_lora(config, lora)
    from reflora.targets import adapter_shapes

    return list(adapter_shapes(plan)) + trainable_bias_keys(config, lora, plan)


# ----------------------------------------------------------------------------------------------
# Several named adapters, DoRA, lora_bias (appended for docs/advanced-semantics.md; the functions above are unchanged)
# ----------------------------------------------------------------------------------------------


def live_adapter_param(file_key: str, adapter_name: str) -> str:
    """PEFT's live parameter name for an adapter file key of adapter ``adapter_name``.

    ``...lora_A.weight`` -> ``...lora_A.<name>.weight``; ``...lora_B.bias`` -> ``...lora_B.<name>.bias``;
    ``...lora_magnitude_vector`` (saved without ``.weight``) -> ``...lora_magnitude_vector.<name>.weight``.
    """
    if file_key.endswith(".lora_magnitude_vector"):
        return f"{file_key}.{adapter_name}.weight"
    if file_key.endswith((".lora_embedding_A", ".lora_embedding_B", ".trainable_tokens_delta")):  # bare Parameters
        return f"{file_key}.{adapter_name}"
    head, _, tail = file_key.rpartition(".")
    return f"{head}.{adapter_name}.{tail}"


def _peft_config_for_copy(lora: LoraConfig):
    """PEFT ``LoraConfig`` for ``lora`` whose own init does not touch the base: reflora's tensors are copied in
    afterwards, and PiSSA/OLoRA would otherwise rewrite the base weights (they do so on every load)."""
    from peft import LoraConfig as PeftLoraConfig

    if lora.qkv_slices is not None:
        raise ValueError("PEFT has no per-slice q/k/v LoRA (lora.qkv_slices)")
    fields = lora.to_peft_dict()
    if not isinstance(fields["init_lora_weights"], bool):
        fields["init_lora_weights"] = True
    return PeftLoraConfig(**fields)


def build_peft_adapters(
    config: GPT2Config,
    params: Mapping[str, np.ndarray],
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, np.ndarray]]],
    dtype: str = "float64",
):
    """``get_peft_model`` with the first adapter and ``add_adapter`` for the others, under their names, with
    reflora's tensors (A, B, ``lora_B`` biases, DoRA magnitudes) copied in."""
    import warnings

    from peft import get_peft_model

    items = list(adapters.items())
    if not items:
        raise ValueError("build_peft_adapters needs at least one adapter")
    model = build_hf_model(config, params, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D fan_in_fan_out, several adapters with PiSSA/OLoRA
        first_name, (first_lora, _) = items[0]
        peft_model = get_peft_model(
            model, _peft_config_for_copy(first_lora), adapter_name=first_name, autocast_adapter_dtype=False
        )
        for name, (lora, _) in items[1:]:
            peft_model.add_adapter(name, _peft_config_for_copy(lora), autocast_adapter_dtype=False)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, (_, tensors) in items:
            for key, value in tensors.items():
                named[live_adapter_param(key, name)].copy_(torch.from_numpy(np.array(value, dtype=np.float64)))
    peft_model.to(TORCH_DTYPES[dtype])
    peft_model.train()
    return peft_model


def run_peft_adapters(
    config: GPT2Config,
    params: Mapping[str, np.ndarray],
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, np.ndarray]]],
    input_ids: np.ndarray,
    *,
    active: list[str] | None = None,
    adapter_names: list[str] | None = None,
    labels: np.ndarray | None = None,
    dlogits: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    dropout_masks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    wrt: list[str] | None = None,
    dtype: str = "float64",
) -> dict[str, np.ndarray]:
    """``run_peft`` for reflora's ``adapters=`` mode: ``logits``, ``loss`` (if labels), ``grad/<key>``.

    ``active``: ``base_model.set_adapter(active)`` (in that order; default all); ``[]`` runs under
    ``disable_adapter()``. ``adapter_names``: PEFT's mixed batch (no dropout masks then). ``dropout_masks``:
    {adapter: {module: mask}}. ``wrt``: reflora's qualified adapter keys (``"<name>:<file key>"``) or HF base keys.
    """
    import contextlib

    from reflora.adapters import split_key

    model = build_peft_adapters(config, params, adapters, dtype)
    names = list(adapters)
    if active is not None and adapter_names is not None:
        raise ValueError("give at most one of active and adapter_names")
    if adapter_names is None:
        active = names if active is None else list(active)
        if active:
            model.base_model.set_adapter(active)
    else:
        if dropout_masks:
            raise ValueError("PEFT's mixed batch applies dropout to a sub-batch: dropout masks are not supported here")
        model.eval()  # PEFT refuses adapter_names in training mode; autograd still runs
    modules = dict(model.named_modules())
    for adapter_name, masks in (dropout_masks or {}).items():
        lora = adapters[adapter_name][0]
        for module, mask in masks.items():
            layer = modules[ADAPTER_PREFIX + module]
            layer.lora_dropout[adapter_name] = MaskDropout(
                torch.from_numpy(np.array(mask)).to(TORCH_DTYPES[dtype]), lora.lora_dropout
            )
    plans = {}
    for lora, _ in adapters.values():
        plans.update(plan_lora(config, lora))
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    wrt = list(wrt or [])
    leaves = {}
    for key in wrt:
        adapter_name, file_key = split_key(key)
        live = live_adapter_param(file_key, adapter_name) if adapter_name is not None else live_base_name(key, plans)
        named[live].requires_grad_(True)
        leaves[key] = named[live]
    kwargs = {"input_ids": torch.from_numpy(np.asarray(input_ids, dtype=np.int64))}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    disabled = adapter_names is None and not active
    with model.disable_adapter() if disabled else contextlib.nullcontext():
        logits = model(**kwargs).logits
    out: dict[str, np.ndarray] = {"logits": logits.detach().to(torch.float64).numpy()}
    loss = None
    if labels is not None:
        loss = hf_causal_lm_loss(logits, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        out["loss"] = np.asarray(loss.detach().to(torch.float64).item())
    if wrt:
        objective = loss if dlogits is None else (logits * torch.from_numpy(np.asarray(dlogits)).to(logits.dtype)).sum()
        grads = torch.autograd.grad(objective, [leaves[k] for k in wrt], allow_unused=True)
        for key, grad in zip(wrt, grads, strict=True):
            value = torch.zeros_like(leaves[key]) if grad is None else grad
            out[f"grad/{key}"] = value.detach().to(torch.float64).numpy()
    return out


def reflora_key(live_name: str) -> str:
    """The reflora key of a live PEFT parameter name (the inverse of the two mappings above).

    ``base_model.model.<m>.lora_A.default.weight`` -> ``base_model.model.<m>.lora_A.weight`` (adapter key);
    ``base_model.model.<m>.base_layer.bias`` and ``base_model.model.<m>.bias`` -> ``<m>.bias`` (HF base key).
    """
    if ".lora_embedding_" in live_name or ".trainable_tokens_delta." in live_name:  # ``<key>.default`` -> ``<key>``
        return live_name.removesuffix(".default")
    if ".modules_to_save.default." in live_name:  # a modules_to_save copy: its file key
        return live_name.replace(".modules_to_save.default.", ".")
    if ".lora_" in live_name:
        return live_name.replace(".default.", ".")
    return live_name.removeprefix(ADAPTER_PREFIX).replace(".base_layer.", ".")


def trainable_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """reflora key -> live parameter, for every parameter PEFT marked trainable (``requires_grad``)."""
    return {reflora_key(name): p for name, p in peft_model.named_parameters() if p.requires_grad}
