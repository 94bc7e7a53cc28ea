"""GELU, tanh form (HF ``gelu_new``, GPT-2's activation).

Forward:  y = x·g,  g = ½·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)
Backward: dy/dx = g + ½·x·(1 − tanh²(u))·u′ = g·(1 + 2·x·(1 − g)·u′),  u′ = √(2/π)·(1 + 3·0.044715·x²)
(using 1 − tanh²(u) = (1 − tanh u)(1 + tanh u) = 4·g·(1 − g)).

The forward keeps the gate g (one (N, D) buffer): recomputing it would cost the backward as much again as the
rest of its work. Both passes run block by block over rows (``for_each_row_block``) so their chains of elementwise
operations stay in cache.
"""

from __future__ import annotations

import math

from reflora.backend import Array, for_each_row_block, namespace

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_forward(x: Array) -> tuple[Array, tuple]:
    """x: (N, D) (any shape; blocks run over the first axis) -> out: x's shape, cache (x, g)."""
    xp = namespace(x)
    out = xp.empty(x.shape, dtype=x.dtype)  # (N, D)
    gate = xp.empty(x.shape, dtype=x.dtype)  # (N, D)

    def gelu_rows(rows: slice) -> None:
        xb = x[rows, ...]  # (R, D)
        u = xb * xb
        u *= xb
        u *= _CUBIC
        u += xb
        u *= _SQRT_2_OVER_PI  # u = √(2/π)·(x + 0.044715·x³)
        g = xp.tanh(u)
        g += 1.0
        g *= 0.5  # g = ½·(1 + tanh u)
        gate[rows, ...] = g
        g *= xb
        out[rows, ...] = g

    for_each_row_block(gelu_rows, x)
    return out, (x, gate)


def gelu_backward(dout: Array, cache: tuple) -> Array:
    """dout: (N, D) -> dx: (N, D)."""
    xp = namespace(dout)
    x, gate = cache
    dx = xp.empty(dout.shape, dtype=dout.dtype)  # (N, D)

    def gelu_backward_rows(rows: slice) -> None:
        xb, g = x[rows, ...], gate[rows, ...]  # (R, D)
        slope = xb * xb
        slope *= 6.0 * _CUBIC * _SQRT_2_OVER_PI
        slope += 2.0 * _SQRT_2_OVER_PI
        slope *= xb  # 2·x·u′
        slope *= 1.0 - g
        slope += 1.0
        slope *= g  # dy/dx = g·(1 + 2·x·(1 − g)·u′)
        slope *= dout[rows, ...]
        dx[rows, ...] = slope

    for_each_row_block(gelu_backward_rows, x)
    return dx
