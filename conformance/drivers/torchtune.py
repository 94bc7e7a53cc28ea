"""Driver for torchtune 0.6.1 (``torchtune.modules.peft.LoRALinear``): layer level.

Mapping (torchtune/modules/peft/lora.py):

* ``LoRALinear(in_dim, out_dim, rank, alpha, dropout, use_bias)``: ``weight`` (out, in) like ``nn.Linear``,
  ``lora_a.weight`` (r, in) = A, ``lora_b.weight`` (out, r) = B, scaling ``alpha / rank``. Layout "linear" only:
  torchtune has no (in, out) weight layout.
* LoRA dropout: ``self.dropout`` (``nn.Dropout`` when p > 0) on the LoRA branch's input; the driver puts a
  module computing ``x ⊙ M / (1 − p)`` with the reference's mask in its place.
* trainable: ``set_trainable_params(model, get_adapter_params(model))`` as torchtune's LoRA recipes do. The
  adapter parameters are ``lora_a.weight`` and ``lora_b.weight`` only: torchtune never trains a base bias.
* merge: ``get_merged_lora_ckpt`` folds LoRA into a *state dict* for export (the driver loads the merged
  weight into a plain ``nn.Linear`` for the forward after merging); there is no unmerge (capability
  unmerge=False).

``dora_forward_backward`` drives ``DoRALinear`` the same way (there is no DoRA in the protocol or the reference;
the harness in tests/test_drivers_ecosystem.py checks it against the DoRA paper's closed form).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import (
    keep_mask_dropout,
    refuse_unsupported,
    to_numpy,
    to_torch,
    torch_layer_results,
    trainable_names,
)
from conformance.protocol import Capabilities, LayerCase, ModelCase, NotSupported

name = "torchtune"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear"}),
    model_level=False,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16"}),
    merge=True,
    unmerge=False,
    layer_dora=True,  # DoRALinear (its norm is detached, dora.py forward)
    notes={
        "model_level": "torchtune has no GPT-2 builder (its models are Llama-style, with separate q/k/v projections)",
        "layer_layouts": "LoRALinear stores weight as (out, in) only",
        "rslora": "LoRALinear scales by alpha / rank only",
        "per_slice_qkv": "torchtune's attention has separate q/k/v projections, each a LoRALinear",
        "bias_modes": "get_adapter_params returns lora_a / lora_b (and DoRA's magnitude): a base bias is never trained",
        "unmerge": "get_merged_lora_ckpt merges a state dict for export; there is no unmerge",
        "layer_dora_full_norm": "DoRALinear.forward detaches the weight norm (modules/peft/dora.py)",
        "layer_lora_bias": "LoRALinear's lora_b is nn.Linear(rank, out, bias=False): B has no bias",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "candidate": f"torchtune {version('torchtune')}",
        "framework": f"torch {version('torch')}",
        "torchao": version("torchao"),
    }


def _build(case: LayerCase, dora: bool = False):
    import torch
    from torchtune.modules.peft import DoRALinear, LoRALinear

    out_f, in_f = case.weight.shape
    cls = DoRALinear if dora else LoRALinear
    layer = cls(in_f, out_f, rank=case.r, alpha=case.lora_alpha, dropout=case.lora_dropout,
                use_bias=case.bias is not None)  # fmt: skip
    layer = layer.to(to_torch(case.x, case.dtype).dtype)
    with torch.no_grad():
        layer.weight.copy_(to_torch(case.weight, case.dtype))
        if case.bias is not None:
            layer.bias.copy_(to_torch(case.bias, case.dtype))
        layer.lora_a.weight.copy_(to_torch(case.lora_A[None], case.dtype))
        layer.lora_b.weight.copy_(to_torch(case.lora_B[None], case.dtype))
    return layer


def _run(case: LayerCase, layer, extra_leaves: dict) -> dict[str, np.ndarray]:
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    set_trainable_params(layer, get_adapter_params(layer))
    if case.keep_mask is not None and case.lora_dropout > 0:
        layer.dropout = keep_mask_dropout(case)
        layer.train()
    else:
        layer.eval()
    x = to_torch(case.x, case.dtype, requires_grad=True)
    y = layer(x)
    leaves = {"lora_A": layer.lora_a.weight, "lora_B": layer.lora_b.weight, **extra_leaves}
    if layer.bias is not None and layer.bias.requires_grad:
        leaves["bias"] = layer.bias
    out = torch_layer_results(y, x, case.dy, leaves)
    flags = {"lora_A": layer.lora_a.weight.requires_grad, "lora_B": layer.lora_b.weight.requires_grad,
             "weight": layer.weight.requires_grad, "bias": layer.bias is not None and layer.bias.requires_grad}  # fmt: skip
    flags.update({k: v.requires_grad for k, v in extra_leaves.items()})
    out["trainable"] = trainable_names(case, flags)
    return out


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    if case.magnitude is not None:  # layer.dora.*: the library's own DoRA layer, the case's magnitude loaded
        out = dora_forward_backward(case, case.magnitude)
        del out["magnitude_init"]
        return out
    return _run(case, _build(case), {})


def _dora_layer(case: LayerCase, magnitude: np.ndarray | None):
    """``DoRALinear`` for the case, its magnitude (out,) loaded as given or (None) torchtune's own
    ``initialize_dora_magnitude``: the norm of W + s·B A per output row."""
    import torch

    layer = _build(case, dora=True)
    with torch.no_grad():
        if magnitude is None:
            layer.initialize_dora_magnitude()
        else:
            layer.magnitude.copy_(to_torch(magnitude, case.dtype))
    return layer


def dora_forward_backward(case: LayerCase, magnitude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``DoRALinear`` on the case: ``magnitude`` (out,) is loaded as given, or (None) initialised by torchtune's
    own ``initialize_dora_magnitude`` (the norm of W + s·B A per output row). Returns the layer-level results
    plus ``magnitude`` (its gradient) and ``magnitude_init`` (the value used)."""
    import torch

    refuse_unsupported(case, capabilities, name)
    layer = _dora_layer(case, magnitude)
    used = layer.magnitude.detach().to(torch.float64, copy=True).numpy()
    out = _run(case, layer, {"magnitude": layer.magnitude})
    out["magnitude_init"] = used
    return out


def _merged_state(case: LayerCase, layer) -> dict[str, np.ndarray]:
    """``get_merged_lora_ckpt`` on ``layer``'s state dict (LoRA, or DoRA when it holds a magnitude): the merged
    ``weight`` and the forward of a plain ``nn.Linear`` holding the merged state dict (torchtune's export)."""
    import torch
    from torchtune.modules.peft import get_merged_lora_ckpt

    state = {f"layer.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    merged = get_merged_lora_ckpt(state, rank=case.r, alpha=case.lora_alpha)
    out_f, in_f = case.weight.shape
    plain = torch.nn.Linear(in_f, out_f, bias=case.bias is not None).to(merged["layer.weight"].dtype)
    plain.load_state_dict({k.removeprefix("layer."): v for k, v in merged.items()})
    with torch.no_grad():
        merged_y = plain(to_torch(case.x, case.dtype))
    return {"merged_weight": to_numpy(merged["layer.weight"]), "merged_y": to_numpy(merged_y)}


def dora_merge(case: LayerCase, magnitude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``DoRALinear``'s state dict through ``get_merged_lora_ckpt`` (W' = m ⊙ V/‖V‖): ``merged_weight``,
    ``merged_y``; no unmerge."""
    refuse_unsupported(case, capabilities, name)
    return _merged_state(case, _dora_layer(case, magnitude))


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``get_merged_lora_ckpt`` on the layer's state dict: ``merged_weight`` (out, in), and ``merged_y`` from
    an ``nn.Linear`` holding the merged state dict (what torchtune's export produces); no unmerge."""
    refuse_unsupported(case, capabilities, name)
    return _merged_state(case, _build(case))


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
