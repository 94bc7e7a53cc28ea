"""LayerNorm over the last axis (``torch.nn.LayerNorm``: biased variance, eps inside the square root).

Forward, per row x ∈ R^C:
    μ = mean(x),  σ² = mean((x − μ)²),  r = 1/√(σ² + ε),  x̂ = (x − μ)·r,  y = x̂ ⊙ γ + β
Backward, with g = dy ⊙ γ:
    dγ = Σ_rows dy ⊙ x̂,   dβ = Σ_rows dy
    dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
(differentiate x̂ = (x − μ)·r through μ and r; the two means are the projections that remove the
components of g along 1 and along x̂.)
"""

from __future__ import annotations

from reflora.backend import Array, for_each_row_block, namespace


def layernorm_forward(x: Array, weight: Array, bias: Array, eps: float) -> tuple[Array, tuple]:
    """x: (N, C); weight, bias: (C,) -> out: (N, C), cache (xhat (N, C), rstd (N, 1))."""
    xp = namespace(x)
    out = xp.empty(x.shape, dtype=x.dtype)  # (N, C)
    xhat = xp.empty(x.shape, dtype=x.dtype)  # (N, C)
    rstd = xp.empty((x.shape[0], 1), dtype=x.dtype)  # (N, 1)

    def normalise_rows(rows: slice) -> None:
        centred = x[rows, :] - xp.mean(x[rows, :], axis=-1, keepdims=True)  # (R, C)
        var = xp.vecdot(centred, centred)[:, None] / x.shape[-1]  # (R, 1): mean of squares, no (R, C) square
        r = 1.0 / xp.sqrt(var + eps)
        centred *= r  # x̂
        xhat[rows, :], rstd[rows, :] = centred, r
        centred *= weight
        centred += bias
        out[rows, :] = centred

    for_each_row_block(normalise_rows, x)
    return out, (xhat, rstd)


def layernorm_backward(
    dout: Array, cache: tuple, weight: Array, *, want_dparams: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """dout: (N, C) -> dx (N, C), dweight (C,), dbias (C,); the last two are None unless ``want_dparams``
    (under LoRA the norms are frozen)."""
    xp = namespace(dout)
    xhat, rstd = cache
    dweight = xp.sum(dout * xhat, axis=0) if want_dparams else None  # (C,)
    dbias = xp.sum(dout, axis=0) if want_dparams else None  # (C,)
    dx = xp.empty(dout.shape, dtype=dout.dtype)  # (N, C)

    def backward_rows(rows: slice) -> None:
        g = dout[rows, :] * weight  # (R, C)
        g_mean = xp.mean(g, axis=-1, keepdims=True)  # (R, 1)
        gx_mean = xp.vecdot(g, xhat[rows, :])[:, None] / dout.shape[-1]  # (R, 1): mean(g ⊙ x̂)
        g -= g_mean
        g -= xhat[rows, :] * gx_mean
        g *= rstd[rows, :]
        dx[rows, :] = g

    for_each_row_block(backward_rows, dout)
    return dx, dweight, dbias
