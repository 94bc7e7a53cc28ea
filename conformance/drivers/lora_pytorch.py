"""Driver for ``lora-pytorch`` 0.2.0 (fkodom/lora-pytorch): layer level.

Mapping (lora_pytorch/lora.py, modules/linear.py):

* ``LoRA.from_module(nn.Linear, rank)`` wraps the layer: ``y = module(x) + lora_module(x)`` with
  ``lora_module(x) = dropout(x @ in_proj) @ out_proj``; ``in_proj`` (in, r) = Aᵀ and ``out_proj`` (r, out) = Bᵀ.
  Layout "linear" only: ``from_module`` knows nn.Linear / Conv / Embedding / MultiheadAttention, and returns
  any other module (transformers' ``Conv1D`` included) wrapped with *no* LoRA, without an error.
* scaling: none. ``LinearLoRAModule``'s ``alpha`` argument only feeds the ``kaiming_uniform_`` init of
  ``in_proj`` ("mathematically equivalent to scaling in_proj ahead of time", its comment says), and
  ``from_module`` does not even pass it. So only cases with scaling 1 (``lora_alpha == r``) are expressible.
* dropout: ``from_module`` gives no dropout, and ``LinearLoRAModule``'s acts on ``x @ in_proj`` (rank space),
  not on x: the reference's (B, T, in) keep-mask has no place to go.
* trainable: what ``LoRA.parameters()`` returns (only LoRA tensors; that is what an optimizer gets).
* merge: ``merge_lora`` returns a new merged ``nn.Linear``; there is no unmerge (``remove_lora`` drops LoRA).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import refuse_unsupported, to_numpy, to_torch, torch_layer_results
from conformance.protocol import Capabilities, LayerCase, ModelCase, NotSupported

name = "lora-pytorch"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear"}),
    model_level=False,
    lora_alpha=False,
    rslora=False,
    dropout_mask_injection=False,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16"}),
    merge=True,
    unmerge=False,
    notes={
        "model_level": "from_module leaves transformers' Conv1D (all of GPT-2's projections) without LoRA, silently",
        "layer_layouts": "LoRA.from_module adapts nn.Linear (weight (out, in)) only",
        "lora_alpha": "no scaling: from_module takes a rank only; only lora_alpha == r (scaling 1) is expressible",
        "rslora": "no scaling at all",
        "dropout_mask_injection": "from_module has no dropout, and LinearLoRAModule's dropout acts on x @ in_proj "
        "(rank space), not on the input x",
        "per_slice_qkv": "no fused q/k/v support for Linear layers",
        "bias_modes": "LoRA.parameters() yields LoRA tensors only",
        "unmerge": "merge_lora returns a merged copy; there is no unmerge (remove_lora drops LoRA)",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"candidate": f"lora-pytorch {version('lora-pytorch')}", "framework": f"torch {version('torch')}"}


def _build(case: LayerCase):
    import torch
    from lora_pytorch import LoRA

    out_f, in_f = case.weight.shape
    dtype = to_torch(case.x, case.dtype).dtype
    linear = torch.nn.Linear(in_f, out_f, bias=case.bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(to_torch(case.weight, case.dtype))
        if case.bias is not None:
            linear.bias.copy_(to_torch(case.bias, case.dtype))
    wrapped = LoRA.from_module(linear, rank=case.r)
    with torch.no_grad():
        wrapped.lora_module.in_proj.copy_(to_torch(case.lora_A[None].T, case.dtype))  # (in, r) = Aᵀ
        wrapped.lora_module.out_proj.copy_(to_torch(case.lora_B[None].T, case.dtype))  # (r, out) = Bᵀ
    return wrapped


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    wrapped = _build(case)
    wrapped.eval()
    x = to_torch(case.x, case.dtype, requires_grad=True)
    y = wrapped(x)
    in_proj, out_proj = wrapped.lora_module.in_proj, wrapped.lora_module.out_proj
    out = torch_layer_results(y, x, case.dy, {"lora_A": in_proj, "lora_B": out_proj})
    out["lora_A"], out["lora_B"] = out["lora_A"].T, out["lora_B"].T  # back to (r, in) and (out, r)
    handed_to_optimizer = {id(p) for p in wrapped.parameters()}
    names = {"lora_A": in_proj, "lora_B": out_proj, "weight": wrapped.module.weight}
    if wrapped.module.bias is not None:
        names["bias"] = wrapped.module.bias
    out["trainable"] = np.array(sorted(n for n, p in names.items() if id(p) in handed_to_optimizer), dtype=str)
    return out


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``merge_lora``'s merged copy: ``merged_weight`` (out, in) and ``merged_y``; no ``unmerged_weight``:
    there is no unmerge (capability unmerge=False)."""
    import torch

    refuse_unsupported(case, capabilities, name)
    merged = _build(case).merge_lora(inplace=False)
    with torch.no_grad():
        return {"merged_weight": to_numpy(merged.weight), "merged_y": to_numpy(merged(to_torch(case.x, case.dtype)))}


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
