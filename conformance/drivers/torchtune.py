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

* DoRA (``layer.dora.*``): ``DoRALinear`` with the case's magnitude loaded; its merge
  (``layer.dora_merge.linear``) is ``get_merged_lora_ckpt`` on the DoRA state dict (it holds ``magnitude``, so
  the function merges ``m ⊙ V/‖V‖_row``); no DoRA unmerge either.
* initialisation (``layer_init``, law ``kaiming_uniform``): ``LoRALinear`` / ``DoRALinear.initialize_parameters``
  draw ``kaiming_uniform_(lora_a.weight, a=√5)`` on the (r, in) weight (A ~ U(±1/√in)) and ``zeros_`` on
  ``lora_b.weight``, under ``torch.manual_seed(case.seed)``; the layer is built in torch's default float32 and
  cast with ``.to(dtype)`` (torchtune's recipes use ``torchtune.training.set_default_dtype``, which does not import
  next to the env's torchao 0.17: ``int4_weight_only`` is gone). DoRA init (``layer.dora_init.linear``):
  ``initialize_dora_magnitude()`` after the base weight is loaded, as its docstring requires (m = ‖W + s·B A‖ per
  row, = ‖W‖ at init).
* float16 / bfloat16: the same layers in that dtype.
* what torchtune has that the protocol does not draw or that is not LoRA's arithmetic: ``quantize_base=True``
  (the base weight in NF4, torchao), ``QATLoRALinear`` (fake-quantized activations and weights), the ``disabled``
  flag / ``disable_adapter`` (one adapter per layer; the layer-level disabled feature needs several).

``dora_forward_backward`` / ``dora_merge`` take an explicit magnitude (or torchtune's own init) for the harness in
tests/test_drivers_ecosystem.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import (
    keep_mask_dropout,
    refuse_unsupported,
    refuse_unsupported_init,
    to_numpy,
    to_torch,
    torch_layer_results,
    trainable_names,
)
from conformance.protocol import Capabilities, LayerCase, LayerInitCase, ModelCase, NotSupported

name = "torchtune"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear"}),
    model_level=False,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    merge=True,
    unmerge=False,
    layer_dora=True,  # DoRALinear (its norm is detached, dora.py forward)
    layer_dora_merge=True,  # get_merged_lora_ckpt on a state dict holding magnitude
    layer_init_methods=frozenset({"kaiming_uniform"}),
    notes={
        "model_level": "torchtune has no GPT-2 builder (its models are Llama-style, with separate q/k/v projections)",
        "layer_layouts": "LoRALinear stores weight as (out, in) only",
        "rslora": "LoRALinear scales by alpha / rank only",
        "per_slice_qkv": "torchtune's attention has separate q/k/v projections, each a LoRALinear",
        "bias_modes": "get_adapter_params returns lora_a / lora_b (and DoRA's magnitude): a base bias is never trained",
        "unmerge": "get_merged_lora_ckpt merges a state dict for export; there is no unmerge",
        "layer_dora_full_norm": "DoRALinear.forward detaches the weight norm (modules/peft/dora.py)",
        "layer_lora_bias": "LoRALinear's lora_b is nn.Linear(rank, out, bias=False): B has no bias",
        "layer_init_methods": "initialize_parameters: kaiming_uniform_(lora_a.weight, a=sqrt(5)), zeros_(lora_b."
        "weight), the only init LoRALinear / DoRALinear have (no init argument)",
        "layer_multi_adapter": "one lora_a / lora_b per LoRALinear: no adapter names, no second adapter",
        "layer_mixed_batch": "one adapter per layer: no per-row adapter selection",
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
    an ``nn.Linear`` holding the merged state dict (what torchtune's export produces); no unmerge. With
    ``case.magnitude`` (``layer.dora_merge.*``) the layer is a ``DoRALinear`` holding that magnitude, and the same
    function merges W' = m ⊙ V/‖V‖_row, V = W + s·B A."""
    refuse_unsupported(case, capabilities, name)
    if case.magnitude is not None:
        return _merged_state(case, _dora_layer(case, case.magnitude))
    return _merged_state(case, _build(case))


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """torchtune's own init on a layer holding ``case.weight`` (out, in) / ``case.bias``: ``LoRALinear`` (or
    ``DoRALinear`` with ``case.use_dora``, then ``initialize_dora_magnitude()``) built under
    ``torch.manual_seed(case.seed)``. Returns ``lora_A`` (r, in) = ``lora_a.weight``, ``lora_B`` (out, r) =
    ``lora_b.weight`` as drawn (A ~ U(±1/√in), B = 0), ``y`` (B, T, out) in eval mode, ``weight`` (out, in), and
    ``magnitude`` (out,) for DoRA."""
    import torch
    from torchtune.modules.peft import DoRALinear, LoRALinear

    refuse_unsupported_init(case, capabilities, name)
    out_f, in_f = case.weight.shape
    torch.manual_seed(case.seed)
    cls = DoRALinear if case.use_dora else LoRALinear
    layer = cls(in_f, out_f, rank=case.r, alpha=case.lora_alpha, use_bias=case.bias is not None)
    layer = layer.to(to_torch(case.x, case.dtype).dtype)
    with torch.no_grad():  # the base weights only: lora_a / lora_b stay as torchtune drew them
        layer.weight.copy_(to_torch(case.weight, case.dtype))
        if case.bias is not None:
            layer.bias.copy_(to_torch(case.bias, case.dtype))
    if case.use_dora:
        layer.initialize_dora_magnitude()  # "must be called after loading/initializing base model and LoRA params"
    layer.eval()
    with torch.no_grad():
        y = layer(to_torch(case.x, case.dtype))
    out = {"lora_A": to_numpy(layer.lora_a.weight), "lora_B": to_numpy(layer.lora_b.weight), "y": to_numpy(y),
           "weight": to_numpy(layer.weight)}  # fmt: skip
    if case.use_dora:
        out["magnitude"] = to_numpy(layer.magnitude)
    return out


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
