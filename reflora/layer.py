"""The adapted layer: a targeted module with every adapter that acts on it.

A module with weight W (Conv1D (in, out), or Linear (out, in): ``Wt`` below is the (out, in) form,
reflora.ops.linear) and adapters a = 1..K computes

    y = x Wtᵀ + b + Σ_a R_a ⊙ δ_a(x)                                 (N, out)

* ``R_a`` (N, 1) of 0/1 selects the rows adapter a applies to: all ones when it is *active*, the rows of the
  samples named ``a`` in a *mixed batch* (``adapter_names``, one name per sample, ``"__base__"`` for none).
* LoRA, per branch (full width, or one q/k/v slice [start, stop) of the fused ``c_attn``), on x_a:
      δ_a[:, start:stop] = s_a · ((x_a Aᵀ) Bᵀ + b_B)                (reflora.ops.lora_linear; b_B with ``lora_bias``)
* DoRA: δ_a = (c − 1) ⊙ (x_a Wtᵀ) + c ⊙ s_a (x_a Aᵀ) Bᵀ, c = m / ‖Wt + s_a B A‖ (reflora.ops.dora_linear).
* x_a = x ⊙ M_a / (1 − p_a) with adapter a's own dropout keep-mask (PEFT draws one per adapter), or x.

Backward: R_a is constant, so adapter a sees g_a = R_a ⊙ dy, and dx, dW, db are the base's plus every δ_a's
share (each δ_a's backward is in its op's docstring).

Every δ_a is measured from the base layer, so the deltas of several adapters simply add up and the order of
the adapters does not matter. PEFT agrees for LoRA; for DoRA next to other active adapters it does not (its
no-dropout path rescales the output of the adapters before it): docs/advanced-semantics.md, "Several adapters".

Two paths compute this. Plain LoRA on every row (no ``lora_bias``, no DoRA, no mixed batch, and at most one
dropout mask) is ``lora_linear_forward``: every branch added in place to y, with s on the thin (N, r) factor,
the model's fast path. Anything else builds each δ_a in an (N, out) buffer and scales the (N, out_b) product
by s instead (LoRA at scaling 1, then times s): the same number in real arithmetic, a different rounding,
which the golden fixtures made through this path (merge_lora, mixed_batch, multi_adapter_active) record.
"""

from __future__ import annotations

from typing import NamedTuple

from reflora.backend import Array, namespace
from reflora.ops.dora_linear import dora_delta_backward, dora_delta_forward
from reflora.ops.linear import linear_backward, linear_forward
from reflora.ops.lora_linear import (
    LoraBranchWeights,
    lora_delta_backward,
    lora_delta_forward,
    lora_dropout,
    lora_linear_backward,
    lora_linear_forward,
)


class LayerAdapter(NamedTuple):
    """One adapter's tensors on one module, and the rows it applies to."""

    branches: tuple[LoraBranchWeights, ...]  # (A (r, in), B (stop − start, r), scaling, start, stop)
    biases: tuple[Array | None, ...]  # lora_bias: b_B (stop − start,) per branch, or None
    magnitude: Array | None  # DoRA: m (out,), with one full-width branch; None for LoRA
    keep_mask: Array | None  # (N, in) of 0/1, or None (no dropout)
    dropout_p: float
    rows: Array | None  # (N, 1) of 0/1, or None (every row)


class LayerAdapterGrads(NamedTuple):
    """One adapter's gradients on one module."""

    branches: list[tuple[Array, Array]]  # (dA, dB) per branch
    biases: list[Array | None]  # d b_B per branch
    magnitude: Array | None  # dm


def is_plain_lora(adapters: tuple[LayerAdapter, ...]) -> bool:
    """Whether the fast path computes the layer: LoRA on every row, no ``lora_bias``, at most one mask."""
    plain = all(ad.magnitude is None and ad.rows is None and all(b is None for b in ad.biases) for ad in adapters)
    return plain and (len(adapters) <= 1 or all(ad.keep_mask is None for ad in adapters))


def adapted_linear_forward(
    x: Array, weight: Array, bias: Array | None, adapters: tuple[LayerAdapter, ...], layout: str = "conv1d"
) -> tuple[Array, tuple]:
    """x: (N, in); weight: (in, out) for ``"conv1d"``, (out, in) for ``"linear"``; bias (out,) | None
    -> y (N, out) = x Wtᵀ + b + Σ_a R_a ⊙ δ_a, cache."""
    if is_plain_lora(adapters):
        branches = tuple(br for ad in adapters for br in ad.branches)
        mask, p = (adapters[0].keep_mask, adapters[0].dropout_p) if adapters else (None, 0.0)
        y, op_cache = lora_linear_forward(x, weight, bias, branches, mask, p, layout)
        return y, ("fused", branches, mask, p, op_cache)
    x_weight, _ = linear_forward(x, weight, None, layout)  # (N, out)
    y = x_weight if bias is None else x_weight + bias
    caches = []
    for ad in adapters:
        if ad.magnitude is not None:
            (br,) = ad.branches
            delta, cache = dora_delta_forward(
                x, weight, br.A, br.B, ad.magnitude, br.scaling, ad.keep_mask, ad.dropout_p, layout, x_weight=x_weight
            )
        else:
            delta, cache = _lora_adapter_forward(x, y.shape[1], ad)
        y = y + (delta if ad.rows is None else delta * ad.rows)
        caches.append(cache)
    return y, ("adapted", x, tuple(caches))


def adapted_linear_backward(
    dy: Array,
    cache: tuple,
    weight: Array,
    adapters: tuple[LayerAdapter, ...],
    layout: str = "conv1d",
    *,
    norm_gradient: str = "detached",
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, list[LayerAdapterGrads]]:
    """dy: (N, out) -> dx (N, in) | None, dweight | None, dbias (out,) | None, grads per adapter.

    ``norm_gradient``: DoRA's ``"detached"`` (PEFT) or ``"full"`` gradient (reflora.ops.dora_linear)."""
    want = {"want_dx": want_dx, "want_dweight": want_dweight, "want_dbias": want_dbias}
    if cache[0] == "fused":
        _, branches, mask, p, op_cache = cache
        dx, dweight, dbias, branch_grads = lora_linear_backward(dy, op_cache, weight, branches, mask, p, layout, **want)
        grads, start = [], 0
        for ad in adapters:
            k = len(ad.branches)
            grads.append(LayerAdapterGrads(branch_grads[start : start + k], [None] * k, None))
            start += k
        return dx, dweight, dbias, grads
    _, x, caches = cache
    dx, dweight, dbias = linear_backward(dy, x, weight, layout, **want)
    grads = []
    for ad, ad_cache in zip(adapters, caches, strict=True):
        g = dy if ad.rows is None else dy * ad.rows  # (N, out)
        if ad.magnitude is not None:
            (br,) = ad.branches
            ddx, ddw, dA, dB, dm = dora_delta_backward(
                g, ad_cache, weight, br.A, br.B, br.scaling, ad.keep_mask, ad.dropout_p, layout,
                norm_gradient=norm_gradient, want_dx=want_dx, want_dweight=want_dweight,
            )  # fmt: skip
            grads.append(LayerAdapterGrads([(dA, dB)], [None], dm))
            if want_dweight:
                dweight = dweight + ddw
        else:
            ddx, branch_grads, bias_grads = _lora_adapter_backward(g, ad_cache, ad, want_dx)
            grads.append(LayerAdapterGrads(branch_grads, bias_grads, None))
        if want_dx:
            dx = dx + ddx
    return dx, dweight, dbias, grads


def _lora_adapter_forward(x: Array, out_features: int, ad: LayerAdapter) -> tuple[Array, tuple]:
    """δ_a (N, out): each branch's s · ((x_a Aᵀ) Bᵀ + b_B) in its columns, zero elsewhere."""
    xp = namespace(x)
    x_drop = lora_dropout(x, ad.keep_mask, ad.dropout_p)  # (N, in)
    delta = xp.zeros((x.shape[0], out_features), dtype=x.dtype)  # (N, out)
    us = []
    for br, b_bias in zip(ad.branches, ad.biases, strict=True):
        part, (_, u) = lora_delta_forward(x_drop, br._replace(scaling=1.0), b_bias)  # (N, out_b): (x_a Aᵀ) Bᵀ + b_B
        delta[:, br.start : br.stop] += br.scaling * part
        us.append(u)
    return delta, (x_drop, tuple(us))


def _lora_adapter_backward(g: Array, cache: tuple, ad: LayerAdapter, want_dx: bool):
    """(dx (N, in) | None, [(dA, dB)], [d b_B | None]) of δ_a for g = R_a ⊙ dy (N, out)."""
    x_drop, us = cache
    dx_drop = None
    branch_grads, bias_grads = [], []
    for br, b_bias, u in zip(ad.branches, ad.biases, us, strict=True):
        contrib, (dA, dB), db = lora_delta_backward(
            g[:, br.start : br.stop], (x_drop, u), br._replace(scaling=1.0), want_dx=want_dx,
            want_dbias=b_bias is not None,
        )  # fmt: skip
        branch_grads.append((br.scaling * dA, br.scaling * dB))
        bias_grads.append(None if db is None else br.scaling * db)
        if want_dx:
            contrib = br.scaling * contrib  # (N, in)
            dx_drop = contrib if dx_drop is None else dx_drop + contrib
    if want_dx:
        dx_drop = lora_dropout(dx_drop, ad.keep_mask, ad.dropout_p)
    return dx_drop, branch_grads, bias_grads
