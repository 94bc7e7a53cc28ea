"""Several named adapters on one model: the layer they meet in, and the names that address them.

A targeted module with weight W (Conv1D (in, out), or Linear (out, in): ``Wt`` below is the (out, in) form) and a
set of adapters a = 1..K computes

    y = x Wtᵀ + b + Σ_a R_a ⊙ δ_a(x)                                 (N, out)

* ``R_a`` (N, 1) of 0/1 selects the rows adapter a applies to: all ones when it is *active*, the rows of the
  samples named ``a`` in a *mixed batch* (``adapter_names``, one name per sample, ``"__base__"`` for none).
* LoRA, per branch (full width, or one q/k/v slice [start, stop) of the fused ``c_attn``):
      δ_a[:, start:stop] = s_a · ((x_a Aᵀ) Bᵀ + b_B)                (b_B only with ``lora_bias``)
* DoRA: δ_a = (c − 1) ⊙ (x_a Wtᵀ) + c ⊙ s_a (x_a Aᵀ) Bᵀ, c = m / ‖Wt + s_a B A‖ (reflora.ops.dora_linear).
* x_a = x ⊙ M_a / (1 − p_a) with adapter a's own dropout keep-mask (PEFT draws one per adapter), or x.

Every δ_a is measured from the base layer, so the deltas of several adapters simply add up and the order of
the adapters does not matter. PEFT agrees for LoRA; for DoRA next to other active adapters it does not (its
no-dropout path rescales the output of the adapters before it): docs/advanced-semantics.md, "Several adapters".

Names: in ``gpt2_forward(..., adapters={name: (lora, tensors)})`` mode a gradient key is qualified with its
adapter, ``"<name>:<PEFT file key>"`` (``qualified_key``), since two adapters share every file key.
"""

from __future__ import annotations

from typing import NamedTuple

from reflora.backend import Array, namespace
from reflora.ops.dora_linear import dora_delta_backward, dora_delta_forward
from reflora.ops.lora_linear import LoraBranchWeights

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
KEY_SEPARATOR = ":"


def qualified_key(adapter_name: str, file_key: str) -> str:
    """``"<adapter name>:<file key>"``: how a gradient key names a tensor of one of several adapters."""
    return f"{adapter_name}{KEY_SEPARATOR}{file_key}"


def split_key(key: str) -> tuple[str | None, str]:
    """``(adapter name, file key)`` of a qualified key; ``(None, key)`` for a plain one."""
    name, sep, rest = key.partition(KEY_SEPARATOR)
    return (name, rest) if sep else (None, key)


def check_adapter_name(name: object) -> str:
    """An adapter name is a non-empty string without ``":"`` and is not ``"__base__"``."""
    if not isinstance(name, str) or not name or KEY_SEPARATOR in name or name == BASE_ADAPTER:
        raise ValueError(
            f"adapter names must be non-empty strings without {KEY_SEPARATOR!r} and not {BASE_ADAPTER!r}, got {name!r}"
        )
    return name


class LayerAdapter(NamedTuple):
    """One adapter's tensors on one module, and the rows it applies to."""

    branches: tuple[LoraBranchWeights, ...]  # (A (r, in), B (stop − start, r), scaling, start, stop)
    biases: tuple[Array | None, ...]  # lora_bias: b_B (stop − start,) per branch, or None
    magnitude: Array | None  # DoRA: m (out,), with one full-width branch; None for LoRA
    keep_mask: Array | None  # (N, in) of 0/1, or None (no dropout)
    dropout_p: float
    rows: Array | None  # (N, 1) of 0/1, or None (every row)


class LayerAdapterGrads(NamedTuple):
    branches: list[tuple[Array, Array]]  # (dA, dB) per branch
    biases: list[Array | None]  # d b_B per branch
    magnitude: Array | None  # dm


def adapted_linear_forward(
    x: Array, weight: Array, bias: Array | None, adapters: tuple[LayerAdapter, ...], layout: str = "conv1d"
) -> tuple[Array, tuple]:
    """x: (N, in); weight: (in, out) for ``"conv1d"``, (out, in) for ``"linear"``; bias (out,) | None
    -> y (N, out) = x Wtᵀ + b + Σ_a R_a ⊙ δ_a, cache."""
    xp = namespace(x, weight)
    x_weight = xp.matmul(x, weight) if layout == "conv1d" else xp.matmul(x, xp.matrix_transpose(weight))  # (N, out)
    y = x_weight if bias is None else x_weight + bias
    caches = []
    for ad in adapters:
        if ad.magnitude is not None:
            (br,) = ad.branches
            delta, cache = dora_delta_forward(
                x, x_weight, weight, br.A, br.B, ad.magnitude, br.scaling, ad.keep_mask, ad.dropout_p, layout
            )
        else:
            delta, cache = _lora_delta_forward(xp, x, y.shape[1], ad)
        y = y + (delta if ad.rows is None else delta * ad.rows)
        caches.append(cache)
    return y, (x, tuple(caches))


def adapted_linear_backward(
    dy: Array,
    cache: tuple,
    weight: Array,
    adapters: tuple[LayerAdapter, ...],
    layout: str = "conv1d",
    norm_gradient: str = "detached",
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, list[LayerAdapterGrads]]:
    """dy: (N, out) -> dx (N, in) | None, dweight | None, dbias (out,) | None, grads per adapter.

    ``norm_gradient``: DoRA's ``"detached"`` (PEFT) or ``"full"`` gradient (reflora.ops.dora_linear)."""
    xp = namespace(dy, weight)
    x, caches = cache
    dx = None
    if want_dx:
        dx = xp.matmul(dy, xp.matrix_transpose(weight)) if layout == "conv1d" else xp.matmul(dy, weight)  # (N, in)
    dweight = None
    if want_dweight:
        dW = xp.matmul(xp.matrix_transpose(x), dy)  # (in, out)
        dweight = dW if layout == "conv1d" else xp.matrix_transpose(dW)
    dbias = xp.sum(dy, axis=0) if want_dbias else None
    grads = []
    for ad, ad_cache in zip(adapters, caches, strict=True):
        g = dy if ad.rows is None else dy * ad.rows  # (N, out)
        if ad.magnitude is not None:
            (br,) = ad.branches
            ddx, ddw, dA, dB, dm = dora_delta_backward(
                g, ad_cache, weight, br.A, br.B, br.scaling, ad.keep_mask, ad.dropout_p, layout, norm_gradient,
                want_dx, want_dweight,
            )  # fmt: skip
            grads.append(LayerAdapterGrads([(dA, dB)], [None], dm))
            if want_dweight:
                dweight = dweight + ddw
        else:
            ddx, branch_grads, bias_grads = _lora_delta_backward(xp, g, ad_cache, ad, want_dx)
            grads.append(LayerAdapterGrads(branch_grads, bias_grads, None))
        if want_dx:
            dx = dx + ddx
    return dx, dweight, dbias, grads


def _lora_delta_forward(xp, x: Array, out_features: int, ad: LayerAdapter) -> tuple[Array, tuple]:
    """δ (N, out): s · ((x_d Aᵀ) Bᵀ + b_B) in each branch's columns, zero elsewhere."""
    x_drop = x if ad.keep_mask is None else x * ad.keep_mask * (1.0 / (1.0 - ad.dropout_p))  # (N, in)
    delta = xp.zeros((x.shape[0], out_features), dtype=x.dtype)  # (N, out)
    us = []
    for br, b_bias in zip(ad.branches, ad.biases, strict=True):
        u = xp.matmul(x_drop, xp.matrix_transpose(br.A))  # (N, r)
        part = xp.matmul(u, xp.matrix_transpose(br.B))  # (N, stop − start)
        if b_bias is not None:
            part = part + b_bias
        delta[:, br.start : br.stop] += br.scaling * part
        us.append(u)
    return delta, (x_drop, tuple(us))


def _lora_delta_backward(xp, g: Array, cache: tuple, ad: LayerAdapter, want_dx: bool):
    x_drop, us = cache
    dx_drop = None
    branch_grads, bias_grads = [], []
    for br, b_bias, u in zip(ad.branches, ad.biases, us, strict=True):
        gb = g[:, br.start : br.stop]  # (N, stop − start)
        gB = xp.matmul(gb, br.B)  # (N, r)
        dB = br.scaling * xp.matmul(xp.matrix_transpose(gb), u)  # (stop − start, r)
        dA = br.scaling * xp.matmul(xp.matrix_transpose(gB), x_drop)  # (r, in)
        branch_grads.append((dA, dB))
        bias_grads.append(br.scaling * xp.sum(gb, axis=0) if b_bias is not None else None)
        if want_dx:
            contrib = br.scaling * xp.matmul(gB, br.A)  # (N, in)
            dx_drop = contrib if dx_drop is None else dx_drop + contrib
    if want_dx and ad.keep_mask is not None:
        dx_drop = dx_drop * ad.keep_mask * (1.0 / (1.0 - ad.dropout_p))
    return dx_drop, branch_grads, bias_grads
