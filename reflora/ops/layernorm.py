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

from reflora.backend import Array, namespace


def layernorm_forward(x: Array, weight: Array, bias: Array, eps: float) -> tuple[Array, tuple]:
    """x: (N, C); weight, bias: (C,) -> out: (N, C), cache (xhat (N, C), rstd (N, 1))."""
    xp = namespace(x)
    mean = xp.mean(x, axis=-1, keepdims=True)  # (N, 1)
    centred = x - mean  # (N, C)
    var = xp.mean(centred * centred, axis=-1, keepdims=True)  # (N, 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (N, 1)
    xhat = centred * rstd  # (N, C)
    return xhat * weight + bias, (xhat, rstd)


def layernorm_backward(dout: Array, cache: tuple, weight: Array) -> tuple[Array, Array, Array]:
    """dout: (N, C) -> dx (N, C), dweight (C,), dbias (C,)."""
    xp = namespace(dout)
    xhat, rstd = cache
    dweight = xp.sum(dout * xhat, axis=0)  # (C,)
    dbias = xp.sum(dout, axis=0)  # (C,)
    g = dout * weight  # (N, C)
    g_mean = xp.mean(g, axis=-1, keepdims=True)  # (N, 1)
    gx_mean = xp.mean(g * xhat, axis=-1, keepdims=True)  # (N, 1)
    dx = (g - g_mean - xhat * gx_mean) * rstd  # (N, C)
    return dx, dweight, dbias
