"""LoRA: the delta a branch adds to a linear layer, and the layer with its branches.

A branch has A (r, in), B (out_b, r), scaling s (α/r, or α/√r under rsLoRA: ``LoraConfig.scaling``), output
columns [start, stop) (out_b = stop − start) and, with ``lora_bias``, a bias b_B (out_b,). PEFT's LoRA is one
branch over all columns; per-slice q/k/v LoRA on the fused ``c_attn`` is one branch per slice. On the dropped
input x_d (N, in) it adds to the base output x Wtᵀ + b (reflora.ops.linear), in its columns,

    δ = s · ((x_d Aᵀ) Bᵀ + b_B)                  (N, out_b)        lora_delta_forward
    x_d = x ⊙ M / (1 − p)                        LoRA dropout: the caller's keep-mask M (N, in) of 0/1 with
                                                  inverted scaling, on the LoRA input only (x_d = x without)

Backward, with u = x_d Aᵀ (N, r) and g = dδ = dy[:, start:stop] (N, out_b): δ_{n,o} = s Σ_k u_{n,k} B_{o,k} + s b_o
and u_{n,k} = Σ_i x_d[n,i] A_{k,i}, so

    dB   = s · gᵀ u                    (out_b, r)
    dA   = s · (g B)ᵀ x_d              (r, in)
    db_B = s · Σ_rows g                (out_b,)
    dx_d = s · (g B) A                 (N, in);   dx gets dx_d ⊙ M / (1 − p) (dropout is its own transpose)

In weight space (merging, DoRA's V) the same delta is ΔWt[start:stop, :] = s · B A and Δb[start:stop] = s · b_B:
x_d ΔWtᵀ + Δb is δ when M is all ones (``lora_delta_weight``, ``lora_delta_bias``).

``lora_linear_forward`` is the layer with one adapter's branches, y = x Wtᵀ + b + Σ_branches δ: the fast path
of the model. s multiplies the thin (N, r) factors u and g B, never an (N, out) or (N, in) product, and the
deltas are added in place: a branch costs its four thin products and one pass over y (or dx). Several
adapters, ``lora_bias`` and DoRA meet in reflora.layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from reflora.backend import Array, namespace
from reflora.ops.linear import linear_backward, linear_forward, weight_t


class LoraBranchWeights(NamedTuple):
    """One branch's tensors and placement: ``y[:, start:stop] += scaling · x_d Aᵀ Bᵀ``."""

    A: Array  # (r, in)
    B: Array  # (stop - start, r)
    scaling: float
    start: int
    stop: int


def lora_dropout(x: Array, keep_mask: Array | None, dropout_p: float) -> Array:
    """x_d = x ⊙ M / (1 − p) (N, in); x itself without a mask. Linear and diagonal, so it is also its own
    backward: dx = dx_d ⊙ M / (1 − p)."""
    if keep_mask is None:
        return x
    x_drop = x * keep_mask  # (N, in)
    x_drop *= 1.0 / (1.0 - dropout_p)
    return x_drop


def lora_delta_forward(x_drop: Array, branch: LoraBranchWeights, bias: Array | None = None) -> tuple[Array, tuple]:
    """x_d: (N, in); bias: b_B (out_b,) or None -> δ = s · ((x_d Aᵀ) Bᵀ + b_B) (N, out_b), cache (x_d, u)."""
    xp = namespace(x_drop, branch.A, branch.B)
    u = xp.matmul(x_drop, xp.matrix_transpose(branch.A))  # (N, r)
    delta = xp.matmul(u * branch.scaling, xp.matrix_transpose(branch.B))  # (N, out_b); s scales the thin factor
    if bias is not None:
        delta += branch.scaling * bias
    return delta, (x_drop, u)


def lora_delta_backward(
    ddelta: Array, cache: tuple, branch: LoraBranchWeights, *, want_dx: bool = True, want_dbias: bool = False
) -> tuple[Array | None, tuple[Array, Array], Array | None]:
    """ddelta: g (N, out_b) -> dx_d (N, in) | None, (dA (r, in), dB (out_b, r)), db_B (out_b,) | None."""
    xp = namespace(ddelta, branch.A, branch.B)
    x_drop, u = cache
    gB = xp.matmul(ddelta, branch.B)  # (N, r)
    gB *= branch.scaling  # s·g B
    dB = xp.matmul(xp.matrix_transpose(ddelta), u)  # (out_b, r)
    dB *= branch.scaling
    dA = xp.matmul(xp.matrix_transpose(gB), x_drop)  # (r, in)
    dbias = branch.scaling * xp.sum(ddelta, axis=0) if want_dbias else None  # (out_b,)
    dx_drop = xp.matmul(gB, branch.A) if want_dx else None  # (N, in)
    return dx_drop, (dA, dB), dbias


def lora_delta_weight(branches: Sequence[LoraBranchWeights], out_features: int, layout: str = "conv1d") -> Array:
    """ΔW of a LoRA adapter: s·B A in each branch's output rows of ΔWt (out, in), zero elsewhere; returned in
    the weight's layout ((in, out) for ``"conv1d"``)."""
    xp = namespace(*(br.A for br in branches))
    in_features = branches[0].A.shape[1]
    delta = xp.zeros((out_features, in_features), dtype=branches[0].A.dtype)  # (out, in)
    for br in branches:
        delta[br.start : br.stop, :] += br.scaling * xp.matmul(br.B, br.A)
    return weight_t(delta, layout)


def lora_delta_bias(branches: Sequence[LoraBranchWeights], biases: Sequence[Array | None], out_features: int):
    """Δb of ``lora_bias``: s·b_B in each branch's output rows (out,); None when no branch has a bias."""
    if all(b is None for b in biases):
        return None
    xp = namespace(*(b for b in biases if b is not None))
    delta = xp.zeros((out_features,), dtype=next(b for b in biases if b is not None).dtype)
    for br, b in zip(branches, biases, strict=True):
        if b is not None:
            delta[br.start : br.stop] += br.scaling * b
    return delta


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
    keep_mask: (N, in) of 0/1 or None -> y (N, out) = x Wtᵀ + b + Σ_branches δ, cache."""
    y, _ = linear_forward(x, weight, bias, layout)  # (N, out)
    if not branches:
        return y, (x, None, ())
    x_drop = lora_dropout(x, keep_mask, dropout_p)  # (N, in)
    us = []
    for br in branches:
        delta, (_, u) = lora_delta_forward(x_drop, br)  # (N, stop − start), (N, r)
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
    *,
    want_dx: bool = True,
    want_dweight: bool = False,
    want_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, list[tuple[Array, Array]]]:
    """dy: (N, out) -> dx (N, in) | None, dweight (weight's shape) | None, dbias (out,) | None,
    [(dA (r, in), dB (out_b, r)) per branch]. dweight and dbias are the base's: under LoRA it is frozen."""
    x, x_drop, us = cache
    dx, dweight, dbias = linear_backward(
        dy, x, weight, layout, want_dx=want_dx, want_dweight=want_dweight, want_dbias=want_dbias
    )
    branch_grads = []
    dx_drop = None  # (N, in): Σ_branches s·(g B) A, the gradient reaching x_d
    for br, u in zip(branches, us, strict=True):
        g = dy if (br.start == 0 and br.stop == dy.shape[1]) else dy[:, br.start : br.stop]  # (N, out_b)
        contrib, (dA, dB), _ = lora_delta_backward(g, (x_drop, u), br, want_dx=want_dx)
        branch_grads.append((dA, dB))
        if contrib is None:
            continue
        if keep_mask is None:
            dx += contrib
        elif dx_drop is None:
            dx_drop = contrib
        else:
            dx_drop += contrib
    if dx_drop is not None:  # only with a dropout mask
        dx += lora_dropout(dx_drop, keep_mask, dropout_p)
    return dx, dweight, dbias, branch_grads
