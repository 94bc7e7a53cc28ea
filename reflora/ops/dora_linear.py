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
``δ = (c − 1) ⊙ (x_d Wtᵀ) + c ⊙ s (x_d Aᵀ) Bᵀ`` alone (the multi-adapter layer sums such terms);
``dora_linear_forward`` is the whole layer ``x Wtᵀ + b + δ``.

Backward, with g = dy (N, out), z = x_d Vᵀ = x_d Wtᵀ + s (x_d Aᵀ) Bᵀ (N, out), u = x_d Aᵀ (N, r):

    dc   = Σ_rows g ⊙ z                       (out,)     how the loss moves with c
    dm   = dc / n                             (out,)
    dB   = s · (g ⊙ c)ᵀ u                     (out, r)
    dA   = s · ((g ⊙ c) B)ᵀ x_d               (r, in)
    dx_d = s · ((g ⊙ c) B) A + (g ⊙ (c − 1)) Wt
    dx   = g Wt + dx_d ⊙ M / (1 − p)          (M = 1, p = 0 without dropout)
    dWt  = gᵀ x + (g ⊙ (c − 1))ᵀ x_d

``norm_gradient="detached"`` (PEFT and the DoRA paper §4.3: "we suggest treating ‖V + ΔV‖_c as a constant,
thereby detaching it from the gradient graph") stops there. ``norm_gradient="full"`` is the exact gradient of
the forward above: n depends on A, B and Wt through V, and ∂n/∂V = V / n adds

    dV   = −(dc ⊙ c / n²) ⊙ V                 (out, in), one factor per row
    dB  += s · dV Aᵀ,   dA += s · Bᵀ dV,   dWt += dV
"""

from __future__ import annotations

from reflora.backend import Array, namespace

NORM_GRADIENTS = ("detached", "full")


def _weight_t(xp, weight: Array, layout: str) -> Array:
    """The (out, in) form of the weight."""
    return xp.matrix_transpose(weight) if layout == "conv1d" else weight


def dora_weight_norm(weight: Array, A: Array, B: Array, scaling: float, layout: str = "conv1d") -> Array:
    """n = ‖Wt + s·B A‖ over the input dimension, (out,): the norm DoRA divides by (and initialises m to)."""
    xp = namespace(weight, A, B)
    V = _weight_t(xp, weight, layout) + scaling * xp.matmul(B, A)  # (out, in)
    return xp.sqrt(xp.sum(V * V, axis=1))


def dora_delta_forward(
    x: Array,
    x_weight: Array,
    weight: Array,
    A: Array,
    B: Array,
    magnitude: Array,
    scaling: float,
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
) -> tuple[Array, tuple]:
    """The DoRA term δ (N, out) of the module docstring, and its cache.

    x: (N, in); x_weight: x Wtᵀ (N, out), the base output without bias, which the layer has already computed;
    weight: (in, out) for ``layout="conv1d"``, (out, in) for ``"linear"``; A: (r, in); B: (out, r);
    magnitude: (out,); keep_mask: (N, in) of 0/1 or None.
    """
    xp = namespace(x, weight, A, B, magnitude)
    Wt = _weight_t(xp, weight, layout)  # (out, in)
    V = Wt + scaling * xp.matmul(B, A)  # (out, in)
    norm = xp.sqrt(xp.sum(V * V, axis=1))  # (out,)
    factor = magnitude / norm  # (out,) c
    if keep_mask is None:
        x_drop, xd_weight = x, x_weight  # (N, in), (N, out)
    else:
        x_drop = x * keep_mask * (1.0 / (1.0 - dropout_p))  # (N, in)
        xd_weight = xp.matmul(x_drop, xp.matrix_transpose(Wt))  # (N, out)
    u = xp.matmul(x_drop, xp.matrix_transpose(A))  # (N, r)
    lora_out = scaling * xp.matmul(u, xp.matrix_transpose(B))  # (N, out)
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
    norm_gradient: str = "detached",
    want_dx: bool = True,
    want_dweight: bool = False,
) -> tuple[Array | None, Array | None, Array, Array, Array]:
    """ddelta: (N, out) -> (dx (N, in) | None, dweight (weight's layout) | None, dA (r, in), dB (out, r), dm (out,)).

    dx and dweight are δ's share only: the layer adds the base's ``g Wt`` and ``gᵀ x``.
    """
    if norm_gradient not in NORM_GRADIENTS:
        raise ValueError(f"norm_gradient must be one of {NORM_GRADIENTS}, got {norm_gradient!r}")
    xp = namespace(ddelta, weight, A, B)
    x_drop, xd_weight, u, lora_out, V, norm, factor = cache
    Wt = _weight_t(xp, weight, layout)  # (out, in)
    dfactor = xp.sum(ddelta * (xd_weight + lora_out), axis=0)  # (out,) dc
    dmagnitude = dfactor / norm  # (out,)
    g_c = ddelta * factor  # (N, out)
    g_c1 = ddelta * (factor - 1.0)  # (N, out)
    gB = xp.matmul(g_c, B)  # (N, r)
    dB = scaling * xp.matmul(xp.matrix_transpose(g_c), u)  # (out, r)
    dA = scaling * xp.matmul(xp.matrix_transpose(gB), x_drop)  # (r, in)
    dWt = xp.matmul(xp.matrix_transpose(g_c1), x_drop) if want_dweight else None  # (out, in)
    if norm_gradient == "full":
        dV = xp.reshape(-dfactor * factor / (norm * norm), (-1, 1)) * V  # (out, in)
        dB = dB + scaling * xp.matmul(dV, xp.matrix_transpose(A))
        dA = dA + scaling * xp.matmul(xp.matrix_transpose(B), dV)
        if want_dweight:
            dWt = dWt + dV
    dx = None
    if want_dx:
        dx = scaling * xp.matmul(gB, A) + xp.matmul(g_c1, Wt)  # (N, in) gradient of x_drop
        if keep_mask is not None:
            dx = dx * keep_mask * (1.0 / (1.0 - dropout_p))
    dweight = None
    if dWt is not None:
        dweight = xp.matrix_transpose(dWt) if layout == "conv1d" else dWt
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
    xp = namespace(x, weight)
    x_weight = xp.matmul(x, weight) if layout == "conv1d" else xp.matmul(x, xp.matrix_transpose(weight))  # (N, out)
    delta, delta_cache = dora_delta_forward(x, x_weight, weight, A, B, magnitude, scaling, keep_mask, dropout_p, layout)
    y = x_weight + delta
    if bias is not None:
        y = y + bias
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
    norm_gradient: str = "detached",
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, tuple[Array, Array, Array]]:
    """dy: (N, out) -> dx (N, in) | None, dweight | None, dbias (out,) | None, (dA, dB, dm)."""
    xp = namespace(dy, weight)
    x, delta_cache = cache
    dx, dweight, dA, dB, dm = dora_delta_backward(
        dy, delta_cache, weight, A, B, scaling, keep_mask, dropout_p, layout, norm_gradient, want_dx, want_dweight
    )
    if want_dx:
        dx = dx + (xp.matmul(dy, xp.matrix_transpose(weight)) if layout == "conv1d" else xp.matmul(dy, weight))
    if want_dweight:
        dW = xp.matmul(xp.matrix_transpose(x), dy)  # (in, out)
        dweight = dweight + (dW if layout == "conv1d" else xp.matrix_transpose(dW))
    dbias = xp.sum(dy, axis=0) if want_dbias else None
    return dx, dweight, dbias, (dA, dB, dm)
