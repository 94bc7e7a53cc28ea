"""Driver for ``lora-pytorch`` 0.2.0 (fkodom/lora-pytorch): layer level.

Mapping (lora_pytorch/lora.py, modules/linear.py):

* ``LoRA.from_module(nn.Linear, rank)`` wraps the layer: ``y = module(x) + lora_module(x)`` with
  ``lora_module(x) = dropout(x @ in_proj) @ out_proj``; ``in_proj`` (in, r) = Aᵀ and ``out_proj`` (r, out) = Bᵀ.
  Its two uses, by seed: on the ``nn.Linear`` itself (even seeds), and on a model holding it (odd seeds,
  ``from_module(nn.Sequential(linear))``: every ``nn.Linear`` inside is wrapped, the root is a ``LoRA`` with no
  LoRA module of its own), the driver running the root.
  Layout "linear" only: ``from_module`` knows nn.Linear / Conv / Embedding / MultiheadAttention, and returns
  any other module (transformers' ``Conv1D`` included) wrapped with *no* LoRA, without an error.
* scaling: none. ``LinearLoRAModule``'s ``alpha`` argument only feeds the ``kaiming_uniform_`` init of
  ``in_proj`` ("mathematically equivalent to scaling in_proj ahead of time", its comment says), and
  ``from_module`` does not even pass it. So only cases with scaling 1 (``lora_alpha == r``) are expressible.
* dropout: ``from_module`` gives no dropout, and ``LinearLoRAModule``'s acts on ``x @ in_proj`` (rank space),
  not on x: the reference's (B, T, in) keep-mask has no place to go.
* trainable: what ``LoRA.parameters()`` returns (only LoRA tensors; that is what an optimizer gets).
* merge: ``merge_lora`` returns a new merged ``nn.Linear`` (``inplace=False``) or adds the delta to the wrapped
  layer's weight and returns it (``inplace=True``; seeds 2, 3 mod 4); there is no unmerge (``remove_lora`` drops
  LoRA).
* initialisation (``layer_init``, law ``kaiming_uniform_transposed``, conformance/init_laws.py):
  ``LinearLoRAModule`` draws ``kaiming_uniform_(in_proj, alpha / rank)`` on ``in_proj`` = Aᵀ, an (in, r) tensor,
  so torch's fan_in is r, not in, and the slope a = 1/r (``from_module`` passes no alpha: default 1.0): A ~
  U(±√(6r/(r² + 1))); ``zeros_(out_proj)``: B = 0. ``from_module`` is called under ``torch.manual_seed(case.seed)``
  on an ``nn.Linear`` of the case's dtype (it builds the LoRA module in the wrapped layer's dtype).
* float16 / bfloat16: the same wrapper in that dtype (dx then misses the base path too, as in every dtype).
* what lora-pytorch has that the layer protocol does not draw: ``Conv1d/2d/3d``, ``Embedding`` and
  ``MultiheadAttention`` LoRA modules, and ``enable_lora`` / ``disable_lora`` on its single adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import (
    refuse_unsupported,
    refuse_unsupported_init,
    to_numpy,
    to_torch,
    torch_layer_results,
)
from conformance.protocol import Capabilities, LayerCase, LayerInitCase, ModelCase, NotSupported

name = "lora-pytorch"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear"}),
    model_level=False,
    lora_alpha=False,
    rslora=False,
    dropout_mask_injection=False,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    merge=True,
    unmerge=False,
    layer_init_methods=frozenset({"kaiming_uniform_transposed"}),
    notes={
        "model_level": "from_module leaves transformers' Conv1D (all of GPT-2's projections) without LoRA, silently",
        "layer_layouts": "LoRA.from_module adapts nn.Linear (weight (out, in)) only",
        "lora_alpha": "no scaling: from_module takes a rank only; only lora_alpha == r (scaling 1) is expressible",
        "rslora": "no scaling at all: from_module takes a rank only, so no alpha/sqrt(r) either",
        "dropout_mask_injection": "from_module has no dropout, and LinearLoRAModule's dropout acts on x @ in_proj "
        "(rank space), not on the input x",
        "per_slice_qkv": "no fused q/k/v support for Linear layers (its MultiheadAttention LoRA returns the attention "
        "output, not the q/k/v projection)",
        "bias_modes": "LoRA.parameters() yields LoRA tensors only",
        "unmerge": "merge_lora returns a merged copy or merges in place; there is no unmerge (lora_pytorch/lora.py "
        "has merge_lora, remove_lora, enable_lora, disable_lora only; remove_lora drops LoRA)",
        "layer_init_methods": "LinearLoRAModule: kaiming_uniform_(in_proj, alpha / rank) on the (in, r) tensor, "
        "zeros_(out_proj), the only init (no init argument): law kaiming_uniform_transposed",
        "layer_lora_bias": "LinearLoRAModule has no bias ('# TODO: Add support for bias', modules/linear.py)",
        "layer_dora": "lora-pytorch 0.2.0 has no DoRA (modules/: linear, conv, embedding, attention only)",
        "layer_dora_full_norm": "lora-pytorch 0.2.0 has no DoRA",
        "layer_dora_merge": "lora-pytorch 0.2.0 has no DoRA",
        "layer_multi_adapter": "LoRA holds one lora_module: no adapter names, no second adapter",
        "layer_mixed_batch": "one adapter per layer: no per-row adapter selection",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"candidate": f"lora-pytorch {version('lora-pytorch')}", "framework": f"torch {version('torch')}"}


def _wrap(case: LayerCase | LayerInitCase):
    """``(model, wrapped)``: ``LoRA.from_module`` on an ``nn.Linear`` holding ``case.weight`` (out, in) /
    ``case.bias`` in the case's dtype (even seeds: ``model`` is ``wrapped``) or on an ``nn.Sequential`` holding it
    (odd seeds: ``model`` is the root ``LoRA``); ``wrapped`` is the ``LoRA`` around the linear. Its LoRA module is
    as ``from_module`` drew it."""
    import torch
    from lora_pytorch import LoRA

    out_f, in_f = case.weight.shape
    dtype = to_torch(case.x, case.dtype).dtype
    linear = torch.nn.Linear(in_f, out_f, bias=case.bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(to_torch(case.weight, case.dtype))
        if case.bias is not None:
            linear.bias.copy_(to_torch(case.bias, case.dtype))
    if case.seed % 2:
        model = LoRA.from_module(torch.nn.Sequential(linear), rank=case.r)
        return model, model.module[0]
    wrapped = LoRA.from_module(linear, rank=case.r)
    return wrapped, wrapped


def _build(case: LayerCase):
    """``_wrap`` with the case's A and B copied in."""
    import torch

    model, wrapped = _wrap(case)
    with torch.no_grad():
        wrapped.lora_module.in_proj.copy_(to_torch(case.lora_A[None].T, case.dtype))  # (in, r) = Aᵀ
        wrapped.lora_module.out_proj.copy_(to_torch(case.lora_B[None].T, case.dtype))  # (r, out) = Bᵀ
    return model, wrapped


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    model, wrapped = _build(case)
    model.eval()
    x = to_torch(case.x, case.dtype, requires_grad=True)
    y = model(x)
    in_proj, out_proj = wrapped.lora_module.in_proj, wrapped.lora_module.out_proj
    out = torch_layer_results(y, x, case.dy, {"lora_A": in_proj, "lora_B": out_proj})
    out["lora_A"], out["lora_B"] = out["lora_A"].T, out["lora_B"].T  # back to (r, in) and (out, r)
    handed_to_optimizer = {id(p) for p in model.parameters()}
    names = {"lora_A": in_proj, "lora_B": out_proj, "weight": wrapped.module.weight}
    if wrapped.module.bias is not None:
        names["bias"] = wrapped.module.bias
    out["trainable"] = np.array(sorted(n for n, p in names.items() if id(p) in handed_to_optimizer), dtype=str)
    return out


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``merge_lora``'s merged layer (a copy, or merged in place for seeds 2, 3 mod 4), on the layer or the model
    holding it (odd seeds: ``merge_lora`` then returns the ``nn.Sequential`` with a merged ``nn.Linear``):
    ``merged_weight`` (out, in) and ``merged_y``; no ``unmerged_weight``: there is no unmerge (capability
    unmerge=False)."""
    import torch

    refuse_unsupported(case, capabilities, name)
    model, _ = _build(case)
    merged = model.merge_lora(inplace=bool(case.seed // 2 % 2))
    linear = merged[0] if isinstance(merged, torch.nn.Sequential) else merged
    with torch.no_grad():
        return {"merged_weight": to_numpy(linear.weight), "merged_y": to_numpy(merged(to_torch(case.x, case.dtype)))}


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """lora-pytorch's own init: ``LoRA.from_module`` (``_wrap``: on the layer, or on a model holding it for odd
    seeds) under ``torch.manual_seed(case.seed)``. Returns ``lora_A`` = ``in_proj``ᵀ (r, in), ``lora_B`` =
    ``out_proj``ᵀ (out, r) as drawn (A ~ U(±√(6r/(r² + 1))), B = 0), ``y`` (B, T, out) in eval mode and
    ``weight`` (out, in)."""
    import torch

    refuse_unsupported_init(case, capabilities, name)
    torch.manual_seed(case.seed)  # before the nn.Linear: its own reset draws come first, as in a user's model
    model, wrapped = _wrap(case)
    model.eval()
    with torch.no_grad():
        y = model(to_torch(case.x, case.dtype))
    lora = wrapped.lora_module
    return {"lora_A": to_numpy(lora.in_proj).T, "lora_B": to_numpy(lora.out_proj).T, "y": to_numpy(y),
            "weight": to_numpy(wrapped.module.weight)}  # fmt: skip


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
