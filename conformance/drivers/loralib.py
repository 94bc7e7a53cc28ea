"""Driver for Microsoft's ``loralib`` 0.1.2 (the LoRA paper's own code): layer level.

Mapping (loralib/layers.py):

* full matrix: ``loralib.Linear(in, out, r, lora_alpha, lora_dropout, fan_in_fan_out)``; ``lora_A`` (r, in),
  ``lora_B`` (out, r), scaling ``lora_alpha / r``. Layout "conv1d" is ``fan_in_fan_out=True``: loralib then
  stores ``weight`` as (in, out), exactly the case's Conv1D weight.
* per-slice q/k/v: ``loralib.MergedLinear(in, 3C, r, lora_alpha, enable_lora=[q, k, v])``: one rank-r adapter
  per enabled slice, stacked: ``lora_A`` is (r·k, in) = [A_q; A_v] and ``lora_B`` is (k·C, r) = [B_q; B_v]
  for k enabled slices (the grouped conv1d pairs rows block by block). The driver stacks and splits them.
* LoRA dropout: loralib's ``lora_dropout`` is an ``nn.Dropout`` on the LoRA branch's input; the driver puts a
  module computing ``x ⊙ M / (1 − p)`` with the reference's mask in its place.
* trainable: ``loralib.mark_only_lora_as_trainable(model, bias="none" | "lora_only")``, loralib's own switch.
* eval mode and merging: loralib's default ``merge_weights=True`` merges ``B A`` into ``weight`` on ``.eval()``
  (and unmerges on ``.train()``); a merged layer's forward no longer involves A and B, so their gradients are
  zero. Forward/backward cases therefore build the layer with ``merge_weights=False`` (eval mode then only
  switches dropout off); ``layer_merge`` uses the default ``merge_weights=True`` and ``.eval()`` / ``.train()``,
  which is loralib's merge API.
* initialisation (``layer_init``, law ``kaiming_uniform``): ``Linear.reset_parameters`` (and ``MergedLinear``'s,
  the same code) draws ``kaiming_uniform_(lora_A, a=√5)`` on the (r, in) tensor, i.e. A ~ U(±1/√in), and
  ``zeros_(lora_B)``. The layer is built under ``torch.manual_seed(case.seed)`` in the case's dtype (loralib
  passes ``dtype`` on to ``nn.Linear``; ``lora_A`` is ``weight.new_zeros``); even seeds build ``Linear``, odd
  seeds ``MergedLinear(enable_lora=[True])`` (one full-width group: loralib's fused class on a plain layer).
* float16 / bfloat16: the same layers in that dtype (torch runs both on the CPU).
* per-slice merge (``layer.merge_qkv_slices.*`` / ``layer.unmerge_qkv_slices.*``, capability
  ``merge_qkv_slices``): ``MergedLinear``'s ``.eval()`` / ``.train()`` with the case's slices enabled.
* what loralib has that the layer protocol cannot draw: ``Embedding`` (A zeros, B normal: another init, on an
  embedding table) and ``Conv1d/2d/3d`` (``ConvLoRA``).
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
    torch_dtype,
    torch_layer_results,
    trainable_names,
)
from conformance.protocol import Capabilities, LayerCase, LayerInitCase, ModelCase, NotSupported

name = "loralib"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear", "conv1d"}),
    model_level=False,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none", "all", "lora_only"}),
    per_slice_qkv=True,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    merge=True,
    merge_qkv_slices=True,  # MergedLinear(enable_lora=[q, k, v]): .eval() merges each slice, .train() unmerges
    layer_init_methods=frozenset({"kaiming_uniform"}),
    notes={
        "model_level": "loralib ships layers only; Microsoft's GPT-2 example swaps c_attn for MergedLinear by hand",
        "merge_qkv_slices": "mapped: MergedLinear(enable_lora=[...]) with merge_weights=True: .eval() puts each "
        "slice's s·B A in its own output rows (zero_pad), .train() removes it",
        "rslora": "loralib scales by lora_alpha / r only",
        "layer_layouts": "conv1d is loralib's fan_in_fan_out=True",
        "merge": "merge_weights=True: .eval() merges, .train() unmerges",
        "bias_modes": "mark_only_lora_as_trainable(bias=...); at layer level 'all' and 'lora_only' coincide",
        "layer_init_methods": "Linear / MergedLinear.reset_parameters: kaiming_uniform_(lora_A, a=sqrt(5)), "
        "zeros_(lora_B), the only init loralib has (no init argument)",
        "layer_lora_bias": "lora_B is an nn.Parameter (out, r) with no bias (loralib/layers.py)",
        "layer_dora": "loralib 0.1.2 has no DoRA (layers.py: Embedding, Linear, MergedLinear, ConvLoRA only)",
        "layer_dora_full_norm": "loralib 0.1.2 has no DoRA",
        "layer_dora_merge": "loralib 0.1.2 has no DoRA",
        "layer_multi_adapter": "one lora_A / lora_B per layer: no adapter names, no second adapter",
        "layer_mixed_batch": "one adapter per layer: no per-row adapter selection",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"candidate": f"loralib {version('loralib')}", "framework": f"torch {version('torch')}"}


def _build(case: LayerCase, merge_weights: bool):
    """The loralib layer holding the case's tensors, in the case's dtype."""
    import loralib
    import torch

    weight_shape = case.weight.shape
    in_f, out_f = (weight_shape[1], weight_shape[0]) if case.layout == "linear" else weight_shape
    common = dict(
        r=case.r,
        lora_alpha=case.lora_alpha,
        lora_dropout=case.lora_dropout,
        fan_in_fan_out=case.layout == "conv1d",
        merge_weights=merge_weights,
        bias=case.bias is not None,
    )
    names = lora_names(case)
    if case.qkv_slices is None:
        layer = loralib.Linear(in_f, out_f, **common)
    else:
        layer = loralib.MergedLinear(in_f, out_f, enable_lora=[s in case.lora_A for s in "qkv"], **common)
    layer = layer.to(to_torch(case.x, case.dtype).dtype)
    with torch.no_grad():
        layer.weight.copy_(to_torch(case.weight, case.dtype))  # (out, in), or (in, out) under fan_in_fan_out
        if case.bias is not None:
            layer.bias.copy_(to_torch(case.bias, case.dtype))
        # stacked in q, k, v order: MergedLinear's grouped conv1d pairs A block i with B block i
        layer.lora_A.copy_(to_torch(np.concatenate([case.lora_A[s] for s, _, _ in names]), case.dtype))
        layer.lora_B.copy_(to_torch(np.concatenate([case.lora_B[s] for s, _, _ in names]), case.dtype))
    return layer


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    import loralib
    import torch

    refuse_unsupported(case, capabilities, name)
    layer = _build(case, merge_weights=False)
    holder = torch.nn.ModuleDict({"layer": layer})  # mark_only_lora_as_trainable walks a model
    loralib.mark_only_lora_as_trainable(holder, bias="lora_only" if case.bias_trainable else "none")
    if case.keep_mask is not None and case.lora_dropout > 0:
        layer.lora_dropout = keep_mask_dropout(case)
        layer.train()
    else:
        layer.eval()  # merge_weights=False: eval only switches dropout off
    x = to_torch(case.x, case.dtype, requires_grad=True)
    y = layer(x)
    leaves = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if case.bias is not None and layer.bias.requires_grad:
        leaves["bias"] = layer.bias
    out = _split_stacked(case, torch_layer_results(y, x, case.dy, leaves))
    flags = {"lora_A": layer.lora_A.requires_grad, "lora_B": layer.lora_B.requires_grad,
             "weight": layer.weight.requires_grad, "bias": layer.bias is not None and layer.bias.requires_grad}  # fmt: skip
    out["trainable"] = trainable_names(case, flags)
    return out


def _split_stacked(case: LayerCase, out: dict) -> dict:
    """MergedLinear's stacked A (r·k, in) and B (k·C, r) gradients back into per-slice results."""
    if case.qkv_slices is None:
        return out
    dA, dB = out.pop("lora_A"), out.pop("lora_B")
    width = dB.shape[0] // len(lora_names(case))
    for i, (_, a_name, b_name) in enumerate(lora_names(case)):
        out[a_name] = dA[i * case.r : (i + 1) * case.r]
        out[b_name] = dB[i * width : (i + 1) * width]
    return out


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    import torch

    refuse_unsupported(case, capabilities, name)
    layer = _build(case, merge_weights=True)
    layer.train()  # unmerged, the state it was built in
    layer.eval()  # loralib merges B A into weight here
    with torch.no_grad():
        merged_weight = to_numpy(layer.weight)
        merged_y = to_numpy(layer(to_torch(case.x, case.dtype)))
    layer.train()  # and unmerges here
    return {"merged_weight": merged_weight, "merged_y": merged_y, "unmerged_weight": to_numpy(layer.weight)}


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """loralib's own init on a layer holding ``case.weight`` / ``case.bias``: ``lora_A`` (r, in) and ``lora_B``
    (out, r) as ``reset_parameters`` drew them (A ~ U(±1/√in): ``kaiming_uniform_(a=√5)``; B = 0), ``y`` (B, T, out),
    the eval forward at init, and ``weight`` in the case's layout. Even seeds: ``Linear``; odd seeds:
    ``MergedLinear(enable_lora=[True])`` (one group covering every output)."""
    import loralib
    import torch

    refuse_unsupported_init(case, capabilities, name)
    in_f, out_f = (case.weight.shape[1], case.weight.shape[0]) if case.layout == "linear" else case.weight.shape
    common = dict(r=case.r, lora_alpha=case.lora_alpha, fan_in_fan_out=case.layout == "conv1d", merge_weights=False,
                  bias=case.bias is not None, dtype=torch_dtype(case.dtype))  # fmt: skip
    torch.manual_seed(case.seed)
    if case.seed % 2:
        layer = loralib.MergedLinear(in_f, out_f, enable_lora=[True], **common)
    else:
        layer = loralib.Linear(in_f, out_f, **common)
    with torch.no_grad():  # the base weights only: A and B stay as loralib drew them
        layer.weight.copy_(to_torch(case.weight, case.dtype))  # (out, in), or (in, out) under fan_in_fan_out
        if case.bias is not None:
            layer.bias.copy_(to_torch(case.bias, case.dtype))
    layer.eval()  # merge_weights=False: eval only switches dropout off
    with torch.no_grad():
        y = layer(to_torch(case.x, case.dtype))
    return {"lora_A": to_numpy(layer.lora_A), "lora_B": to_numpy(layer.lora_B), "y": to_numpy(y),
            "weight": to_numpy(layer.weight)}  # fmt: skip


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
