"""A linear layer with LoRA branches: the heart of the reference.

Forward (Conv1D layout, W: (in, out), as GPT-2 stores it; the Linear layout stores Wᵀ):

    x_d = x ⊙ M / (1 − p)                        LoRA dropout: caller's keep-mask M, inverted scaling,
                                                  on the LoRA branch only (x_d = x when there is no mask)
    y   = x W + b + Σ_branches  s · (x_d Aᵀ) Bᵀ    placed in the branch's output columns [start, stop)

with A: (r, in), B: (stop − start, r), s the scaling (α/r, or α/√r under rsLoRA). PEFT's full-matrix LoRA
is one branch over all columns; per-slice q/k/v LoRA on the fused ``c_attn`` is one branch per slice.

Backward, with u = x_d Aᵀ (N, r) and g = dy[:, start:stop]:

    dB = s · gᵀ u                      (out_b, r)
    dA = s · (g B)ᵀ x_d                (r, in)
    dx = dy Wᵀ + Σ_branches s · ((g B) A) ⊙ M / (1 − p)
    dW = xᵀ dy,  db = Σ_rows dy        (only when asked: the base is frozen under LoRA)

s multiplies the thin (N, r) factors u and g B, never an (N, out) or (N, in) product, and the deltas are added
in place: a branch costs its four thin products and one pass over y (or dx).
"""

from __future__ import annotations

from typing import NamedTuple

from reflora.backend import Array, namespace


class LoraBranchWeights(NamedTuple):
    """One branch's tensors and placement: ``y[:, start:stop] += scaling · x_d Aᵀ Bᵀ``."""

    A: Array  # (r, in)
    B: Array  # (stop - start, r)
    scaling: float
    start: int
    stop: int


def _base_matmul(xp, x: Array, weight: Array, layout: str) -> Array:
    return xp.matmul(x, weight) if layout == "conv1d" else xp.matmul(x, xp.matrix_transpose(weight))


def lora_linear_forward(
    x: Array,
    weight: Array,
    bias: Array | None,
    branches: tuple[LoraBranchWeights, ...] = (),
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
) -> tuple[Array, tuple]:
    """x: (N, in); weight: (in, out) for ``layout="conv1d"``, (out, in) for ``"linear"``; bias: (out,) or None;
    keep_mask: (N, in) of 0/1 or None -> y: (N, out), cache."""
    xp = namespace(x)
    y = _base_matmul(xp, x, weight, layout)  # (N, out)
    if bias is not None:
        y += bias
    if not branches:
        return y, (x, None, ())
    x_drop = x
    if keep_mask is not None:
        x_drop = x * keep_mask  # (N, in)
        x_drop *= 1.0 / (1.0 - dropout_p)
    us = []
    for br in branches:
        u = xp.matmul(x_drop, xp.matrix_transpose(br.A))  # (N, r)
        delta = xp.matmul(u * br.scaling, xp.matrix_transpose(br.B))  # (N, stop - start); s scales the thin factor
        if br.start == 0 and br.stop == y.shape[1]:
            y += delta
        else:
            y[:, br.start : br.stop] += delta
        us.append(u)
    return y, (x, x_drop, tuple(us))


def lora_linear_backward(
    dy: Array,
    cache: tuple,
    weight: Array,
    branches: tuple[LoraBranchWeights, ...] = (),
    keep_mask: Array | None = None,
    dropout_p: float = 0.0,
    layout: str = "conv1d",
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, list[tuple[Array, Array]]]:
    """dy: (N, out) -> dx (N, in) | None, dweight (weight's shape) | None, dbias (out,) | None,
    [(dA (r, in), dB (out_b, r)) per branch]."""
    xp = namespace(dy)
    x, x_drop, us = cache
    dx = None
    if want_dx:
        dx = xp.matmul(dy, xp.matrix_transpose(weight)) if layout == "conv1d" else xp.matmul(dy, weight)  # (N, in)
    dweight = None
    if want_dweight:
        dW = xp.matmul(xp.matrix_transpose(x), dy)  # (in, out)
        dweight = dW if layout == "conv1d" else xp.matrix_transpose(dW)
    dbias = xp.sum(dy, axis=0) if want_dbias else None  # (out,)
    branch_grads = []
    dx_drop = None  # (N, in): Σ_branches s·(g B) A, the gradient reaching x_d
    for br, u in zip(branches, us, strict=True):
        g = dy if (br.start == 0 and br.stop == dy.shape[1]) else dy[:, br.start : br.stop]  # (N, out_b)
        gB = xp.matmul(g, br.B)  # (N, r)
        gB *= br.scaling  # s·g B
        dB = xp.matmul(xp.matrix_transpose(g), u)  # (out_b, r)
        dB *= br.scaling
        dA = xp.matmul(xp.matrix_transpose(gB), x_drop)  # (r, in)
        branch_grads.append((dA, dB))
        if want_dx:
            contrib = xp.matmul(gB, br.A)  # (N, in)
            if keep_mask is None:
                dx += contrib
            elif dx_drop is None:
                dx_drop = contrib
            else:
                dx_drop += contrib
    if dx_drop is not None:  # only with a dropout mask: x_d = x ⊙ M / (1 − p)
        dx_drop *= keep_mask
        dx_drop *= 1.0 / (1.0 - dropout_p)
        dx += dx_drop
    return dx, dweight, dbias, branch_grads
