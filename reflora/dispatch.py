"""Which adapters act on a targeted module, and where their gradients go: the model's side of reflora.layer.

Every Conv1D of GPT-2 is an adapted layer (``adapted_linear_forward``) whose adapters are the taking-part
adapters (``AdapterSlot``) that target it, each with its tensors, its dropout keep-mask for the module and, in a
mixed batch, the rows of its samples. Backward hands each gradient back under its key: the adapter's PEFT file
key (qualified ``"<name>:..."`` with ``adapters=``), and the module's HF weight and bias keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from reflora.backend import Array, namespace
from reflora.layer import LayerAdapter, adapted_linear_backward, adapted_linear_forward
from reflora.ops.lora_linear import LoraBranchWeights
from reflora.validate import AdapterSlot


def row_masks(slots: Sequence[AdapterSlot], batch: int, seq_len: int) -> dict[str, Array]:
    """{adapter name: R (N, 1) of 0/1} for the adapters of a mixed batch: the rows of their samples."""
    masks = {}
    for slot in slots:
        if slot.rows is not None:
            xp = namespace(slot.rows)
            per_token = xp.broadcast_to(xp.reshape(slot.rows, (batch, 1)), (batch, seq_len))  # (B, T)
            masks[slot.name] = xp.reshape(per_token, (batch * seq_len, 1))
    return masks


def module_adapters(
    slots: Sequence[AdapterSlot], name: str, rows: Mapping[str, Array], n: int
) -> tuple[list[AdapterSlot], tuple[LayerAdapter, ...]]:
    """The adapters on module ``name``: their slots, and their tensors as ``LayerAdapter``s (masks as (N, in))."""
    owners, layer = [], []
    for slot in slots:
        module = slot.plan.get(name)
        if module is None:
            continue
        t = slot.tensors
        mask = slot.masks.get(name)  # (B, T, in) or None
        layer.append(
            LayerAdapter(
                branches=tuple(
                    LoraBranchWeights(t[b.a_key], t[b.b_key], module.scaling, b.out_start, b.out_stop)
                    for b in module.branches
                ),
                biases=tuple(None if b.bias_key is None else t[b.bias_key] for b in module.branches),
                magnitude=None if module.magnitude_key is None else t[module.magnitude_key],
                keep_mask=None if mask is None else namespace(mask).reshape(mask, (n, mask.shape[-1])),
                dropout_p=slot.lora.lora_dropout,
                rows=rows.get(slot.name),
            )
        )
        owners.append(slot)
    return owners, tuple(layer)


def module_forward(
    h: Array, params: Mapping[str, Array], name: str, slots: Sequence[AdapterSlot], rows: Mapping[str, Array]
) -> tuple[Array, tuple]:
    """h: (N, in) -> y (N, out) = h W + b + Σ_a R_a ⊙ δ_a(h) over the adapters on module ``name``, cache."""
    owners, layer = module_adapters(slots, name, rows, h.shape[0])
    y, op_cache = adapted_linear_forward(h, params[f"{name}.weight"], params[f"{name}.bias"], layer, "conv1d")
    return y, (owners, layer, op_cache)


def module_backward(
    dy: Array,
    cache: tuple,
    params: Mapping[str, Array],
    name: str,
    wanted: set[str],
    *,
    norm_gradient: str = "detached",
    want_dx: bool = True,
) -> tuple[Array | None, dict[str, Array]]:
    """dy: (N, out) -> dh (N, in) | None, and {key: gradient} for the keys of module ``name`` in ``wanted``."""
    owners, layer, op_cache = cache
    dx, dweight, dbias, adapter_grads = adapted_linear_backward(
        dy, op_cache, params[f"{name}.weight"], layer, "conv1d", norm_gradient=norm_gradient, want_dx=want_dx,
        want_dweight=f"{name}.weight" in wanted, want_dbias=f"{name}.bias" in wanted,
    )  # fmt: skip
    grads = {f"{name}.weight": dweight, f"{name}.bias": dbias}
    for slot, ad_grads in zip(owners, adapter_grads, strict=True):
        module = slot.plan[name]
        for branch, (dA, dB), d_bias in zip(module.branches, ad_grads.branches, ad_grads.biases, strict=True):
            grads[slot.key_prefix + branch.a_key] = dA
            grads[slot.key_prefix + branch.b_key] = dB
            if branch.bias_key is not None:
                grads[slot.key_prefix + branch.bias_key] = d_bias
        if module.magnitude_key is not None:
            grads[slot.key_prefix + module.magnitude_key] = ad_grads.magnitude
    return dx, {key: value for key, value in grads.items() if key in wanted and value is not None}
