"""Build transformers ``GPT2LMHeadModel`` + PEFT from reflora tensors, and run it with torch autograd.

This is the only place that maps reflora's names onto PEFT's live modules; the ``peft`` driver, the
autograd cross-checks in tests/ and the golden replay all go through it, so the mapping is written once:

* base tensors: HF state-dict keys, loaded strictly (Conv1D weights stay (in, out));
* adapter tensors: PEFT file key ``base_model.model.<m>.lora_A.weight`` -> live parameter
  ``base_model.model.<m>.lora_A.default.weight``;
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
            live = _live_adapter_name(key)
            named[live].copy_(torch.from_numpy(np.array(value, dtype=np.float64)))
    peft_model.to(TORCH_DTYPES[dtype])
    peft_model.train()
    return peft_model


def _live_adapter_name(file_key: str) -> str:
    head, _, tail = file_key.rpartition(".")  # tail == "weight"
    return f"{head}.default.{tail}"


def live_base_name(hf_key: str, plan: Mapping) -> str:
    """The live parameter name of a base tensor inside the PEFT model (targeted modules gain ``base_layer``)."""
    module, _, leaf = hf_key.rpartition(".")
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
) -> dict[str, np.ndarray]:
    """Forward and autograd backward; returns ``logits``, ``loss`` (if labels) and ``grad/<key>`` for ``wrt``.

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
        if dropout_masks:
            inject_dropout_masks(model, dropout_masks, lora.lora_dropout, dtype)
    wrt = list(wrt or [])
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = {}
    for key in wrt:
        if key == "inputs_embeds":
            continue
        live = _live_adapter_name(key) if key.startswith(ADAPTER_PREFIX) else base_name(key)
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
