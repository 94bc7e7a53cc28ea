"""GELU, tanh form (HF ``gelu_new``, GPT-2's activation).

Forward:  y = ½·x·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)
Backward: dy/dx = ½·(1 + tanh(u)) + ½·x·(1 − tanh²(u))·√(2/π)·(1 + 3·0.044715·x²)
"""

from __future__ import annotations

import math

from reflora.backend import Array, namespace

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_forward(x: Array) -> tuple[Array, Array]:
    """x: (N, D) -> out: (N, D), cache x."""
    xp = namespace(x)
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x * x * x))  # (N, D)
    return 0.5 * x * (1.0 + t), x


def gelu_backward(dout: Array, cache: Array) -> Array:
    """dout: (N, D) -> dx: (N, D). Recomputes tanh(u) instead of caching it (cheap, saves an (N, D) buffer)."""
    xp = namespace(dout)
    x = cache
    x2 = x * x  # (N, D)
    t = xp.tanh(_SQRT_2_OVER_PI * x * (1.0 + _CUBIC * x2))  # (N, D)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * x2)  # (N, D)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
