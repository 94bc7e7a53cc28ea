"""Helpers shared by the drivers of the other LoRA libraries (loralib, torchtune, litgpt, mlx-lm, flax, keras...).

Only translation lives here: names, slice placement, the capability guard. No LoRA arithmetic: every driver
runs its library and returns what the library computed.

* ``slice_columns``: where a q/k/v slice sits in a fused projection's output (q, k, v in order, each out/3).
* ``refuse_unsupported``: a driver calls it first, so that a case needing a feature the library lacks raises
  ``NotSupported`` (with the capability's note) instead of running something else.
* ``lora_names``: the result names of a case's A/B tensors (``lora_A`` or ``lora_A.q`` ...).
"""

from __future__ import annotations

import math

import numpy as np

from conformance.protocol import Capabilities, LayerCase, ModelCase, NotSupported

QKV_ORDER = ("q", "k", "v")


def scaling_of(case: LayerCase) -> float:
    """The scaling the reference applies (``LayerCase.scaling``: ``reflora.config.LoraConfig.scaling``, alpha/r or
    alpha/sqrt(r) under rsLoRA). A driver passes it to a library that takes an absolute multiplier (mlx-lm's
    ``scale``), or checks it is 1 for one that has none."""
    return case.scaling


def slice_columns(out_features: int, slice_name: str) -> tuple[int, int]:
    """Output columns ``[start, stop)`` of slice q, k or v in a fused (.., 3·C) projection."""
    width = out_features // 3
    start = QKV_ORDER.index(slice_name) * width
    return start, start + width


def lora_names(case: LayerCase) -> list[tuple[str | None, str, str]]:
    """``[(slice, "lora_A…", "lora_B…")]`` in q, k, v order (slice None: the full matrix)."""
    if case.qkv_slices is None:
        return [(None, "lora_A", "lora_B")]
    return [(s, f"lora_A.{s}", f"lora_B.{s}") for s in QKV_ORDER if s in case.lora_A]


def _refuser(caps: Capabilities, driver: str):
    """``refuse(capability, what)``: raise ``NotSupported`` naming the driver, what the case needs and the
    capability's note (the library's reason)."""

    def refuse(capability: str, what: str) -> None:
        note = caps.notes.get(capability, "")
        raise NotSupported(f"{driver}: {what}" + (f" ({note})" if note else ""))

    return refuse


def _refuse_layer_basics(case, scaling: float, caps: Capabilities, refuse) -> None:
    """The checks every layer case shares: layout, dtype, rsLoRA, and a scaling ≠ 1 without ``lora_alpha``."""
    if case.layout not in caps.layer_layouts:
        refuse("layer_layouts", f"layout {case.layout!r} is not supported")
    if case.dtype not in caps.dtypes:
        refuse("dtypes", f"dtype {case.dtype!r} is not supported")
    if case.use_rslora and not caps.rslora:
        refuse("rslora", "rsLoRA scaling is not supported")
    if not caps.lora_alpha and not math.isclose(scaling, 1.0, rel_tol=0, abs_tol=1e-15):
        refuse("lora_alpha", f"only scaling 1 (lora_alpha == r) is expressible, the case needs {scaling}")


def refuse_unsupported(case: LayerCase, caps: Capabilities, driver: str) -> None:
    """Raise ``NotSupported`` if the case needs a capability the driver has not declared."""
    refuse = _refuser(caps, driver)
    _refuse_layer_basics(case, scaling_of(case), caps, refuse)
    if case.qkv_slices is not None and not caps.per_slice_qkv:
        refuse("per_slice_qkv", "per-slice q/k/v LoRA is not supported")
    if case.keep_mask is not None and case.lora_dropout > 0 and not caps.dropout_mask_injection:
        refuse("dropout_mask_injection", "LoRA dropout with the reference's keep-mask is not supported")
    if case.bias_trainable and not ({"all", "lora_only"} & caps.bias_modes):
        refuse("bias_modes", "a trainable bias is not supported")
    if case.lora_bias_B is not None and not caps.layer_lora_bias:
        refuse("layer_lora_bias", "a bias on lora_B is not supported")
    if case.magnitude is not None and not caps.layer_dora:
        refuse("layer_dora", "DoRA is not supported")
    if case.magnitude is not None and case.dora_norm != "detached" and not caps.layer_dora_full_norm:
        refuse("layer_dora_full_norm", "DoRA with the full-norm gradient is not supported")


def refuse_unsupported_init(case, caps: Capabilities, driver: str) -> None:
    """``refuse_unsupported`` for a ``LayerInitCase`` (``layer_init``): the layout, dtype, rsLoRA and scaling
    checks, the init law (``Capabilities.layer_init_methods``) and DoRA (``layer_dora``)."""
    refuse = _refuser(caps, driver)
    _refuse_layer_basics(case, case.scaling, caps, refuse)
    if case.init not in caps.layer_init_methods:
        refuse("layer_init_methods", f"init law {case.init!r} is not supported")
    if case.use_dora and not caps.layer_dora:
        refuse("layer_dora", "DoRA is not supported")


def is_all_linear(target_modules) -> bool:
    """PEFT's shorthand ``target_modules="all-linear"`` (any case): every Conv1D / Linear but the output layer."""
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"


def refuse_unsupported_model(case: ModelCase, caps: Capabilities, driver: str) -> None:
    """The model-level counterpart of ``refuse_unsupported`` (only what every model driver checks the same way)."""
    lora = case.lora
    refuse = _refuser(caps, driver)
    if not caps.model_level:
        refuse("model_level", "no model level")
    if case.dtype not in caps.dtypes:
        refuse("dtypes", f"dtype {case.dtype!r} is not supported")
    if lora.use_rslora and not caps.rslora:
        refuse("rslora", "rsLoRA scaling is not supported")
    if (lora.rank_pattern or lora.alpha_pattern) and not caps.rank_alpha_pattern:
        refuse("rank_alpha_pattern", "rank_pattern / alpha_pattern are not supported")
    if is_all_linear(lora.target_modules):
        if not getattr(caps, "target_modules_all_linear", False):
            refuse("target_modules_all_linear", "target_modules='all-linear' is not supported")
    elif isinstance(lora.target_modules, str) and not caps.target_modules_regex:
        refuse("target_modules_regex", "a regex target_modules is not supported")
    if lora.layers_to_transform is not None and not caps.layers_to_transform:
        refuse("layers_to_transform", "layers_to_transform is not supported")
    if lora.bias not in caps.bias_modes:
        refuse("bias_modes", f"bias={lora.bias!r} is not supported")
    if case.position_ids is not None and not caps.position_ids:
        refuse("position_ids", "explicit position_ids are not supported")
    if case.attention_mask is not None and not np.all(case.attention_mask == 1) and not caps.padding:
        refuse("padding", "an attention_mask with padding is not supported")
    if case.dropout_masks and lora.lora_dropout > 0 and not caps.dropout_mask_injection:
        refuse("dropout_mask_injection", "LoRA dropout with the reference's keep-masks is not supported")


# ---------------------------------------------------------------------------------------------
# torch-based libraries (loralib, torchtune, litgpt, lora-pytorch): torch is imported lazily
# ---------------------------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    names = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return names[name]


def to_torch(array: np.ndarray, dtype: str, requires_grad: bool = False):
    """A float64 NumPy array as a torch tensor of ``dtype`` (rounded once, from float64)."""
    import torch

    tensor = torch.from_numpy(np.array(array, dtype=np.float64)).to(torch_dtype(dtype))
    return tensor.requires_grad_(requires_grad)


def to_numpy(tensor) -> np.ndarray:
    """A float64 NumPy copy (a copy: libraries merge and unmerge weights in place)."""
    import torch

    return tensor.detach().to(dtype=torch.float64, copy=True).cpu().numpy()


def keep_mask_dropout(case: LayerCase):
    """``nn.Dropout(p)`` for the reference's keep-mask: ``x ⊙ M / (1 − p)``, which is what ``nn.Dropout``
    computes for the mask it draws. Put in place of the library's own dropout module."""
    from conformance.drivers.peft_bridge import MaskDropout

    return MaskDropout(to_torch(case.keep_mask, case.dtype), case.lora_dropout)


def torch_layer_results(y, x, dy: np.ndarray, leaves: dict[str, object]) -> dict[str, np.ndarray]:
    """``y``, and the torch-autograd gradients of ``Σ dy ⊙ y`` to ``x`` (as ``dx``) and to every tensor in
    ``leaves`` (result name -> parameter). A leaf the graph does not reach gets a zero gradient."""
    import torch

    names = list(leaves)
    inputs = [x, *(leaves[n] for n in names)]
    objective = (y * torch.from_numpy(np.asarray(dy)).to(y.dtype)).sum()
    grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    out = {"y": to_numpy(y)}
    for result_name, tensor, grad in zip(["dx", *names], inputs, grads):
        out[result_name] = to_numpy(torch.zeros_like(tensor) if grad is None else grad)
    return out


def trainable_names(case: LayerCase, flags: dict[str, bool]) -> np.ndarray:
    """The ``trainable`` result: the names (in reference terms) whose flag the library set. ``lora_A`` /
    ``lora_B`` stand for every slice of a per-slice case."""
    names = []
    for item, on in flags.items():
        if not on:
            continue
        if item in ("lora_A", "lora_B") and case.qkv_slices is not None:
            names += [f"{item}.{s}" for s in case.lora_A]
        else:
            names.append(item)
    return np.array(sorted(names), dtype=str)
