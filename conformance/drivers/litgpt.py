"""Driver for Lightning AI's litgpt 0.5.13 (``litgpt.lora``): layer level.

Mapping (litgpt/lora.py):

* full matrix: ``LoRALinear(in, out, r, lora_alpha, lora_dropout, bias=...)``: the frozen layer is
  ``self.linear`` (an ``nn.Linear``, weight (out, in)); ``lora_A`` (r, in), ``lora_B`` (out, r); scaling
  ``lora_alpha / r``. Layout "linear" only.
* per-slice q/k/v: ``LoRAQKVLinear(in, 3C, head_size=C, n_head=1, n_query_groups=1, enable_lora=(q, k, v))``:
  litgpt's fused q/k/v projection with one rank-r adapter per enabled slice, stacked like loralib's:
  ``lora_A`` (r·k, in) = [A_q; A_v], ``lora_B`` (k·C, r) = [B_q; B_v]. One head of size C is the plain
  (non-grouped) layout: q, k, v are the three contiguous C-column blocks, as in GPT-2's ``c_attn``.
* LoRA dropout: ``lora_dropout`` (``nn.Dropout`` when p > 0) on the LoRA branch's input; the driver puts a
  module computing ``x ⊙ M / (1 − p)`` with the reference's mask in its place.
* trainable: ``litgpt.lora.mark_only_lora_as_trainable(model, bias="none" | "lora_only")``, litgpt's own switch.
* merge: ``merge()`` folds B A into ``linear.weight`` (and the forward then skips the LoRA branch); there is
  no unmerge (capability unmerge=False).
* initialisation (``layer_init``, law ``kaiming_uniform``): ``LoRALinear.reset_parameters`` draws
  ``kaiming_uniform_(lora_A, a=√5)`` on the (r, in) tensor (A ~ U(±1/√in)) and ``zeros_(lora_B)``; the layer is
  built under ``torch.manual_seed(case.seed)`` in torch's default float32, then cast with ``.to(dtype)`` (as
  litgpt's ``lora_A = torch.empty(...)`` follows the default dtype).
* float16 / bfloat16: the same layers in that dtype.
* per-slice merge (``layer.merge_qkv_slices.*``, capability ``merge_qkv_slices``): ``LoRAQKVLinear.merge()``
  with the case's slices enabled (no unmerge).
* what litgpt has that the layer protocol does not draw: grouped-query q/k/v (``n_query_groups < n_head``), a
  4-bit base through bitsandbytes (``merge`` dequantizes it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import (
    keep_mask_dropout,
    lora_names,
    refuse_unsupported,
    refuse_unsupported_init,
    to_numpy,
    to_torch,
    torch_layer_results,
    trainable_names,
)
from conformance.protocol import Capabilities, LayerCase, LayerInitCase, ModelCase, NotSupported

name = "litgpt"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear"}),
    model_level=False,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none", "all", "lora_only"}),
    per_slice_qkv=True,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    merge=True,
    unmerge=False,
    merge_qkv_slices=True,  # LoRAQKVLinear.merge() (layer.merge_qkv_slices.*; no unmerge)
    layer_init_methods=frozenset({"kaiming_uniform"}),
    notes={
        "merge_qkv_slices": "mapped: LoRAQKVLinear.merge() folds each enabled slice's s·B A into its own output "
        "rows (no unmerge: layer.unmerge_qkv_slices.* is not supported)",
        "model_level": "litgpt's GPT is GPT-2-like, not GPT-2 (its own names, config and checkpoint conversion)",
        "layer_layouts": "LoRALinear wraps an nn.Linear: weight (out, in) only",
        "rslora": "litgpt scales by lora_alpha / r only",
        "unmerge": "LoRALinear.merge() / merge_lora_weights fold B A into the weight; litgpt/lora.py has no unmerge",
        "bias_modes": "mark_only_lora_as_trainable(bias=...); the driver asks for 'lora_only' when the bias trains",
        "per_slice_qkv": "LoRAQKVLinear (one head of size C: GPT-2's contiguous q, k, v blocks)",
        "layer_init_methods": "LoRALinear.reset_parameters: kaiming_uniform_(lora_A, a=sqrt(5)), zeros_(lora_B), "
        "the only init litgpt has (no init argument)",
        "layer_lora_bias": "lora_B is an nn.Parameter (out, r) with no bias (litgpt/lora.py)",
        "layer_dora": "litgpt 0.5.13 has no DoRA (litgpt/lora.py: LoRALinear, LoRAQKVLinear only)",
        "layer_dora_full_norm": "litgpt 0.5.13 has no DoRA",
        "layer_dora_merge": "litgpt 0.5.13 has no DoRA",
        "layer_multi_adapter": "one lora_A / lora_B per LoRALinear: no adapter names, no second adapter",
        "layer_mixed_batch": "one adapter per layer: no per-row adapter selection",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"candidate": f"litgpt {version('litgpt')}", "framework": f"torch {version('torch')}"}


def _build(case: LayerCase):
    import torch
    from litgpt.lora import LoRALinear, LoRAQKVLinear

    out_f, in_f = case.weight.shape
    common = dict(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.lora_dropout, bias=case.bias is not None)
    names = lora_names(case)
    if case.qkv_slices is None:
        layer = LoRALinear(in_f, out_f, **common)
    else:
        enable = tuple(s in case.lora_A for s in "qkv")
        layer = LoRAQKVLinear(in_f, out_f, head_size=out_f // 3, n_head=1, n_query_groups=1, enable_lora=enable,
                              **common)  # fmt: skip
    layer = layer.to(to_torch(case.x, case.dtype).dtype)
    with torch.no_grad():
        layer.linear.weight.copy_(to_torch(case.weight, case.dtype))
        if case.bias is not None:
            layer.linear.bias.copy_(to_torch(case.bias, case.dtype))
        layer.lora_A.copy_(to_torch(np.concatenate([case.lora_A[s] for s, _, _ in names]), case.dtype))
        layer.lora_B.copy_(to_torch(np.concatenate([case.lora_B[s] for s, _, _ in names]), case.dtype))
    return layer


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    import torch
    from litgpt.lora import mark_only_lora_as_trainable

    refuse_unsupported(case, capabilities, name)
    layer = _build(case)
    mark_only_lora_as_trainable(
        torch.nn.ModuleDict({"layer": layer}), bias="lora_only" if case.bias_trainable else "none"
    )
    if case.keep_mask is not None and case.lora_dropout > 0:
        layer.lora_dropout = keep_mask_dropout(case)
        layer.train()
    else:
        layer.eval()
    x = to_torch(case.x, case.dtype, requires_grad=True)
    y = layer(x)
    bias = layer.linear.bias
    leaves = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if bias is not None and bias.requires_grad:
        leaves["bias"] = bias
    out = torch_layer_results(y, x, case.dy, leaves)
    if case.qkv_slices is not None:  # split the stacked per-slice tensors
        dA, dB = out.pop("lora_A"), out.pop("lora_B")
        width = dB.shape[0] // len(lora_names(case))
        for i, (_, a_name, b_name) in enumerate(lora_names(case)):
            out[a_name], out[b_name] = dA[i * case.r : (i + 1) * case.r], dB[i * width : (i + 1) * width]
    flags = {"lora_A": layer.lora_A.requires_grad, "lora_B": layer.lora_B.requires_grad,
             "weight": layer.linear.weight.requires_grad, "bias": bias is not None and bias.requires_grad}  # fmt: skip
    out["trainable"] = trainable_names(case, flags)
    return out


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``LoRALinear.merge()`` (even case seeds) or litgpt's functional ``merge_lora_weights(model)`` (odd seeds),
    its two merge APIs: ``merged_weight`` (out, in) and ``merged_y`` (eval-mode forward of the merged layer); no
    ``unmerged_weight``: litgpt has no unmerge (capability unmerge=False)."""
    import torch
    from litgpt.lora import merge_lora_weights

    refuse_unsupported(case, capabilities, name)
    layer = _build(case)
    layer.eval()
    if case.seed % 2:
        merge_lora_weights(layer)  # every LoRALinear among model.modules(): here the layer itself
    else:
        layer.merge()
    with torch.no_grad():
        merged_y = layer(to_torch(case.x, case.dtype))
    return {"merged_weight": to_numpy(layer.linear.weight), "merged_y": to_numpy(merged_y)}


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """litgpt's own init on a ``LoRALinear`` holding ``case.weight`` (out, in) / ``case.bias``, built under
    ``torch.manual_seed(case.seed)``: ``lora_A`` (r, in), ``lora_B`` (out, r) as ``reset_parameters`` drew them
    (A ~ U(±1/√in), B = 0), ``y`` (B, T, out) in eval mode and ``weight`` (out, in)."""
    import torch
    from litgpt.lora import LoRALinear

    refuse_unsupported_init(case, capabilities, name)
    out_f, in_f = case.weight.shape
    torch.manual_seed(case.seed)
    layer = LoRALinear(in_f, out_f, r=case.r, lora_alpha=case.lora_alpha, bias=case.bias is not None)
    layer = layer.to(to_torch(case.x, case.dtype).dtype)
    with torch.no_grad():  # the base weights only: A and B stay as litgpt drew them
        layer.linear.weight.copy_(to_torch(case.weight, case.dtype))
        if case.bias is not None:
            layer.linear.bias.copy_(to_torch(case.bias, case.dtype))
    layer.eval()
    with torch.no_grad():
        y = layer(to_torch(case.x, case.dtype))
    return {"lora_A": to_numpy(layer.lora_A), "lora_B": to_numpy(layer.lora_B), "y": to_numpy(y),
            "weight": to_numpy(layer.linear.weight)}  # fmt: skip


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
