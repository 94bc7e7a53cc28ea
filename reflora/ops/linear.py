"""The base linear layer, and the one place that knows the two weight layouts.

GPT-2's Conv1D stores its weight as W (in, out) and computes ``y = x W + b`` (``layout="conv1d"``); a
``torch.nn.Linear`` stores Wt = Wᵀ (out, in) and computes ``y = x Wtᵀ + b`` (``layout="linear"``). The math of
every layer here is written once, in the (out, in) form Wt; ``weight_t`` turns a stored weight into Wt, and
back (the switch is a transpose, its own inverse).

Forward:   y = x Wtᵀ + b                               x (N, in) -> y (N, out)
Backward:  dx = dy Wt,   dWt = dyᵀ x  (dW = xᵀ dy),   db = Σ_rows dy
(y_{n,o} = Σ_i x_{n,i} Wt_{o,i} + b_o is linear in each of x, Wt and b.)
"""

from __future__ import annotations

from reflora.backend import Array, namespace

LAYOUTS = ("conv1d", "linear")


def weight_t(weight: Array, layout: str) -> Array:
    """The (out, in) form Wt of a stored weight, and the stored form of a Wt: a transpose for ``"conv1d"``."""
    xp = namespace(weight)
    return xp.matrix_transpose(weight) if layout == "conv1d" else weight


def linear_forward(x: Array, weight: Array, bias: Array | None, layout: str = "conv1d") -> tuple[Array, Array]:
    """x: (N, in); weight: (in, out) for ``"conv1d"``, (out, in) for ``"linear"``; bias: (out,) or None
    -> y (N, out) = x Wtᵀ + b, cache x."""
    xp = namespace(x, weight)
    y = xp.matmul(x, weight) if layout == "conv1d" else xp.matmul(x, xp.matrix_transpose(weight))  # (N, out)
    if bias is not None:
        y += bias
    return y, x


def linear_backward(
    dy: Array,
    cache: Array,
    weight: Array,
    layout: str = "conv1d",
    *,
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None]:
    """dy: (N, out) -> dx (N, in), dweight (the weight's layout), dbias (out,); None where not wanted."""
    xp = namespace(dy, weight)
    x = cache
    dx = None
    if want_dx:
        dx = xp.matmul(dy, xp.matrix_transpose(weight)) if layout == "conv1d" else xp.matmul(dy, weight)  # (N, in)
    dweight = None
    if want_dweight:
        dW = xp.matmul(xp.matrix_transpose(x), dy)  # (in, out)
        dweight = dW if layout == "conv1d" else xp.matrix_transpose(dW)
    dbias = xp.sum(dy, axis=0) if want_dbias else None  # (out,)
    return dx, dweight, dbias
