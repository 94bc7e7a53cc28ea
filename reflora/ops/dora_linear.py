"""A linear layer with a DoRA adapter (weight-decomposed LoRA, Liu et al. 2024), PEFT 0.21's definition.

Written in the (out, in) form ``Wt`` of the weight (``Wt = Wᵀ`` for GPT-2's Conv1D, which stores (in, out);
``Wt = W`` for the Linear layout). With A: (r, in), B: (out, r), scaling s and magnitude m: (out,):

    V  = Wt + s · B A                        (out, in)   the adapted weight
    n  = ‖V‖ over the input dimension        (out,)      one norm per output unit
    c  = m / n                               (out,)      the DoRA factor
    y  = x Vᵀ ⊙ c + b                        with no dropout: DoRA's W' = m ⊙ V / ‖V‖

With LoRA dropout (keep-mask M, x_d = x ⊙ M / (1 − p)), PEFT (``DoraLinearLayer.forward`` with
``base_result=None``; PEFT PRs #1474, #2153) computes the adapter's term on the dropped input only:

    y  = x Wtᵀ + b  +  (c − 1) ⊙ (x_d Wtᵀ)  +  c ⊙ s · (x_d Aᵀ) Bᵀ

which is the formula above when M is all ones. ``dora_delta_forward`` returns the adapter term
``δ = (c − 1) ⊙ (x_d Wtᵀ) + c ⊙ s (x_d Aᵀ) Bᵀ`` alone (the several-adapter layer, reflora.layer, sums such
terms); ``dora_linear_forward`` is the whole layer ``x Wtᵀ + b + δ``. V is Wt plus LoRA's weight-space delta
(``lora_delta_weight``) and s (x_d Aᵀ) Bᵀ is LoRA's delta (``lora_delta_forward``), both from
reflora.ops.lora_linear; ``dora_weight`` is the one place that computes V and n (the merge and DoRA's
initialisation call it too).

Backward, with g = dy (N, out), z = x_d Vᵀ = x_d Wtᵀ + s (x_d Aᵀ) Bᵀ (N, out), u = x_d Aᵀ (N, r):

    dc   = Σ_rows g ⊙ z                       (out,)     how the loss moves with c
    dm   = dc / n                             (out,)
    dB   = s · (g ⊙ c)ᵀ u                     (out, r)
    dA   = s · ((g ⊙ c) B)ᵀ x_d               (r, in)
    dx_d = s · ((g ⊙ c) B) A + (g ⊙ (c − 1)) Wt
    dx   = g Wt + dx_d ⊙ M / (1 − p)          (M = 1, p = 0 without dropout)
    dWt  = gᵀ x + (g ⊙ (c − 1))ᵀ x_d

A row of zero norm (n_o = 0: V's row o is zero, e.g. a zero row of Wt with a zero row of B, as DoRA's init
meets it on a pruned weight) has no direction: V_o / ‖V_o‖ is defined as 0 (the convention of a safe
normalisation), so the row of DoRA's weight m ⊙ V / ‖V‖ is 0 whatever m_o, and

    c_o  = 0,   dm_o = 0                      (``dora_factor``; dc_o = Σ g_o z_o = 0 anyway, as z_o = x_d V_oᵀ = 0)

Its output is x Wt_oᵀ + b_o − x_d Wt_oᵀ (b_o without dropout), the same for every finite c_o, and A, B get no
gradient through row o. PEFT 0.21 divides by n unguarded and returns NaN there (PEFT #2049; the deviation
``model.dora.zero_norm_row``, docs/advanced-semantics.md).

``norm_gradient="detached"`` (PEFT and the DoRA paper §4.3: "we suggest treating ‖V + ΔV‖_c as a constant,
thereby detaching it from the gradient graph") stops there. ``norm_gradient="full"`` is the exact gradient of
the forward above: n depends on A, B and Wt through V, and ∂n/∂V = V / n adds

    dV   = −(dc ⊙ c / n²) ⊙ V                 (out, in), one factor per row
    dB  += s · dV Aᵀ,   dA += s · Bᵀ dV,   dWt += dV
"""

from __future__ import annotations

from reflora.backend import Array, namespace
from reflora.ops.linear import linear_backward, linear_forward, weight_t
from reflora.ops.lora_linear import (
    LoraBranchWeights,
    lora_delta_backward,
    lora_delta_forward,
    lora_delta_weight,
    lora_dropout,
)

NORM_GRADIENTS = ("detached", "full")


def dora_weight(weight: Array, A: Array, B: Array, scaling: float, layout: str = "conv1d") -> tuple[Array, Array]:
    """V = Wt + s·B A (out, in), the adapted weight, and n = ‖V‖ over the input dimension (out,)."""
    xp = namespace(weight, A, B)
    out_features = B.shape[0]
    branch = LoraBranchWeights(A, B, scaling, 0, out_features)
    delta_t = lora_delta_weight((branch,), out_features, "linear")  # (out, in): s·B A, in the Linear layout
    V = weight_t(weight, layout) + delta_t  # (out, in)
    return V, xp.sqrt(xp.sum(V * V, axis=1))


def dora_factor(magnitude: Array, norm: Array) -> Array:
    """c = m / n (out,), and c_o = 0 where n_o = 0 (a zero row of V has no direction; module docstring)."""
    xp = namespace(magnitude, norm)
    nonzero = norm > 0
    return xp.where(nonzero, magnitude / xp.where(nonzero, norm, 1.0), 0.0)  # (out,)


def dora_weight_norm(weight: Array, A: Array, B: Array, scaling: float, layout: str = "conv1d") -> Array:
    """n = ‖Wt + s·B A‖ over the input dimension, (out,): the norm DoRA divides by (and initialises m to)."""
    return dora_weight(weight, A, B, scaling, layout)[1]


def _unit_branch(A: Array, B: Array) -> LoraBranchWeights:
    """The full-width branch at scaling 1: DoRA applies s to the (N, out) product (s·(u Bᵀ), s·(g B) A)."""
    return LoraBranchWeights(A, B, 1.0, 0, B.shape[0])


def dora_delta_forward(
    x: Array,
    weight: Array,
    A: Array,
    B: Array,
    magnitude: Array,
    scaling: float,
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
    *,
    x_weight: Array | None = None,
) -> tuple[Array, tuple]:
    """The DoRA term δ (N, out) of the module docstring, and its cache.

    x: (N, in); weight: (in, out) for ``layout="conv1d"``, (out, in) for ``"linear"``; A: (r, in); B: (out, r);
    magnitude: (out,); keep_mask: (N, in) of 0/1 or None; x_weight: x Wtᵀ (N, out), the base output without
    bias, when the caller has already computed it.
    """
    V, norm = dora_weight(weight, A, B, scaling, layout)  # (out, in), (out,)
    factor = dora_factor(magnitude, norm)  # (out,) c
    x_drop = lora_dropout(x, keep_mask, dropout_p)  # (N, in)
    if keep_mask is None and x_weight is not None:
        xd_weight = x_weight  # (N, out)
    else:
        xd_weight, _ = linear_forward(x_drop, weight, None, layout)  # (N, out)
    lora_part, (_, u) = lora_delta_forward(x_drop, _unit_branch(A, B))  # (N, out), (N, r)
    lora_out = scaling * lora_part  # (N, out): s (x_d Aᵀ) Bᵀ
    delta = (factor - 1.0) * xd_weight + factor * lora_out  # (N, out)
    return delta, (x_drop, xd_weight, u, lora_out, V, norm, factor)


def dora_delta_backward(
    ddelta: Array,
    cache: tuple,
    weight: Array,
    A: Array,
    B: Array,
    scaling: float,
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
    *,
    norm_gradient: str = "detached",
    want_dx: bool = True,
    want_dweight: bool = False,
) -> tuple[Array | None, Array | None, Array, Array, Array]:
    """ddelta: (N, out) -> dx (N, in) | None, dweight (weight's layout) | None, dA (r, in), dB (out, r), dm (out,).

    dx and dweight are δ's share only: the layer adds the base's ``g Wt`` and ``gᵀ x``.
    """
    if norm_gradient not in NORM_GRADIENTS:
        raise ValueError(f"norm_gradient must be one of {NORM_GRADIENTS}, got {norm_gradient!r}")
    xp = namespace(ddelta, weight, A, B)
    x_drop, xd_weight, u, lora_out, V, norm, factor = cache
    dfactor = xp.sum(ddelta * (xd_weight + lora_out), axis=0)  # (out,) dc
    safe_norm = xp.where(norm > 0, norm, 1.0)  # (out,): n, with 1 on zero-norm rows (c = 0, dc = 0 there)
    dmagnitude = xp.where(norm > 0, dfactor / safe_norm, 0.0)  # (out,)
    g_c = ddelta * factor  # (N, out)
    g_c1 = ddelta * (factor - 1.0)  # (N, out)
    lora_dx, (dA, dB), _ = lora_delta_backward(g_c, (x_drop, u), _unit_branch(A, B), want_dx=want_dx)
    dB = scaling * dB  # (out, r): s (g ⊙ c)ᵀ u
    dA = scaling * dA  # (r, in): s ((g ⊙ c) B)ᵀ x_d
    dWt = xp.matmul(xp.matrix_transpose(g_c1), x_drop) if want_dweight else None  # (out, in)
    if norm_gradient == "full":
        dV = xp.reshape(-dfactor * factor / (safe_norm * safe_norm), (-1, 1)) * V  # (out, in)
        dB = dB + scaling * xp.matmul(dV, xp.matrix_transpose(A))
        dA = dA + scaling * xp.matmul(xp.matrix_transpose(B), dV)
        if want_dweight:
            dWt = dWt + dV
    dx = None
    if want_dx:
        base_dx, _, _ = linear_backward(g_c1, x_drop, weight, layout)  # (N, in): (g ⊙ (c − 1)) Wt
        dx = lora_dropout(scaling * lora_dx + base_dx, keep_mask, dropout_p)  # (N, in)
    dweight = None if dWt is None else weight_t(dWt, layout)
    return dx, dweight, dA, dB, dmagnitude


def dora_linear_forward(
    x: Array,
    weight: Array,
    bias: Array | None,
    A: Array,
    B: Array,
    magnitude: Array,
    scaling: float,
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
) -> tuple[Array, tuple]:
    """The whole layer y = x Wtᵀ + b + δ: x (N, in) -> y (N, out), cache."""
    x_weight, _ = linear_forward(x, weight, None, layout)  # (N, out)
    delta, delta_cache = dora_delta_forward(
        x, weight, A, B, magnitude, scaling, keep_mask, dropout_p, layout, x_weight=x_weight
    )
    y = x_weight + delta
    if bias is not None:
        y += bias
    return y, (x, delta_cache)


def dora_linear_backward(
    dy: Array,
    cache: tuple,
    weight: Array,
    A: Array,
    B: Array,
    scaling: float,
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
    *,
    norm_gradient: str = "detached",
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, Array, Array, Array]:
    """dy: (N, out) -> dx (N, in) | None, dweight | None, dbias (out,) | None, dA (r, in), dB (out, r), dm (out,)."""
    x, delta_cache = cache
    dx, dweight, dA, dB, dm = dora_delta_backward(
        dy, delta_cache, weight, A, B, scaling, keep_mask, dropout_p, layout,
        norm_gradient=norm_gradient, want_dx=want_dx, want_dweight=want_dweight,
    )  # fmt: skip
    base_dx, base_dweight, dbias = linear_backward(
        dy, x, weight, layout, want_dx=want_dx, want_dweight=want_dweight, want_dbias=want_dbias
    )
    if want_dx:
        dx = dx + base_dx
    if want_dweight:
        dweight = dweight + base_dweight
    return dx, dweight, dbias, dA, dB, dm
