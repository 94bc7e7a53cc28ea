"""Causal multi-head self-attention with a key-padding mask (HF GPT-2, SDPA semantics).

Forward, per batch row b and head h, with q, k, v: (T, d) slices of the fused ``c_attn`` output:

    S = q kᵀ / √d                                      (T, T)
    V[i, j] = (j ≤ i) ∧ attention_mask[b, j]           which keys query i may see
    P[i, :] = softmax(S[i, :] over the visible j)       masked entries are exactly 0
    O = P v                                            (T, d), heads concatenated back to (T, C)

A query that sees no key at all (a left-padding position: every earlier key is padding) gets P[i, :] = 0,
so O[i] = 0. This is what HF's default SDPA attention returns with torch ≥ 2.5; HF's "eager" attention
instead adds a large finite negative number and so averages every key uniformly. Those rows are padding,
and the loss never sees them when their labels are -100.

Backward (softmax Jacobian applied row-wise):

    dP = dO vᵀ,   dv = Pᵀ dO
    dS = P ⊙ (dP − rowsum(dP ⊙ P))
    dq = dS k / √d,   dk = dSᵀ q / √d

Both passes run block by block over the batch rows (``for_each_row_block``): a block's per-head products, its
softmax and its output stay in cache, and the blocks run side by side with one BLAS thread each (48 products
of 128×64×128 at GPT-2 small shapes are too small to split over threads: 14.5 → 9.3 ms per layer that way).
"""

from __future__ import annotations

import math

from reflora.backend import Array, for_each_row_block, namespace


def attention_visibility(attention_mask: Array, seq_len: int) -> Array:
    """attention_mask: (B, T) of 0/1 -> visible: (B, 1, T, T) bool, causal ∧ key-not-padding."""
    xp = namespace(attention_mask)
    positions = xp.arange(seq_len)
    causal = positions[None, :] <= positions[:, None]  # (T, T): key j ≤ query i
    keys = attention_mask != 0  # (B, T)
    return causal[None, None, :, :] & keys[:, None, None, :]


def _split_heads(xp, x: Array, n_head: int) -> Array:
    b, t, c = x.shape
    return xp.permute_dims(xp.reshape(x, (b, t, n_head, c // n_head)), (0, 2, 1, 3))  # (B, H, T, d)


def _merge_heads(xp, x: Array) -> Array:
    b, h, t, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, t, h * d))  # (B, T, C)


def attention_forward(qkv: Array, visible: Array, n_head: int) -> tuple[Array, tuple]:
    """qkv: (B, T, 3C); visible: (B, 1, T, T) bool -> out: (B, T, C), cache (q/√d, k, v, P)."""
    xp = namespace(qkv)
    b, t, c3 = qkv.shape
    c = c3 // 3
    q = _split_heads(xp, qkv[..., :c], n_head) * (1.0 / math.sqrt(c // n_head))  # (B, H, T, d): q/√d
    k = _split_heads(xp, qkv[..., c : 2 * c], n_head)  # (B, H, T, d), a view of qkv
    v = _split_heads(xp, qkv[..., 2 * c :], n_head)  # (B, H, T, d), a view of qkv
    probs = xp.empty((b, n_head, t, t), dtype=qkv.dtype)  # (B, H, T, T): P
    out = xp.empty((b, t, c), dtype=qkv.dtype)  # (B, T, C)

    def attend_rows(rows: slice) -> None:  # rows of the batch axis: S, P and O of those sequences
        scores = xp.matmul(q[rows, ...], xp.matrix_transpose(k[rows, ...]))  # (R, H, T, T): S
        scores = xp.where(visible[rows, ...], scores, -xp.inf)  # −∞ where hidden
        row_max = xp.max(scores, axis=-1, keepdims=True)  # (R, H, T, 1); −∞ on rows that see nothing
        scores -= xp.where(xp.isfinite(row_max), row_max, 0.0)
        p = xp.exp(scores)  # exactly 0 where hidden
        denom = xp.sum(p, axis=-1, keepdims=True)  # (R, H, T, 1)
        p *= 1.0 / xp.where(denom > 0, denom, 1.0)
        probs[rows, ...] = p
        out[rows, ...] = _merge_heads(xp, xp.matmul(p, v[rows, ...]))  # (R, T, C)

    for_each_row_block(attend_rows, probs)
    return out, (q, k, v, probs)


def attention_backward(dout: Array, cache: tuple) -> Array:
    """dout: (B, T, C) -> dqkv: (B, T, 3C)."""
    xp = namespace(dout)
    q_scaled, k, v, probs = cache
    b, n_head, t, d = q_scaled.shape
    c = n_head * d
    do = _split_heads(xp, dout, n_head)  # (B, H, T, d)
    dqkv = xp.empty((b, t, 3 * c), dtype=dout.dtype)  # (B, T, 3C): [dq | dk | dv]

    def backward_rows(rows: slice) -> None:  # rows of the batch axis
        p = probs[rows, ...]  # (R, H, T, T)
        do_rows = do[rows, ...]  # (R, H, T, d)
        dv = xp.matmul(xp.matrix_transpose(p), do_rows)  # (R, H, T, d)
        ds = xp.matmul(do_rows, xp.matrix_transpose(v[rows, ...]))  # (R, H, T, T): dP, turned into dS in place
        ds -= xp.vecdot(ds, p)[..., None]  # dP − rowsum(dP ⊙ P)
        ds *= p
        dq = xp.matmul(ds, k[rows, ...])  # (R, H, T, d)
        dq *= 1.0 / math.sqrt(d)
        dk = xp.matmul(xp.matrix_transpose(ds), q_scaled[rows, ...])  # (R, H, T, d): dSᵀ q / √d
        dqkv[rows, :, :c] = _merge_heads(xp, dq)
        dqkv[rows, :, c : 2 * c] = _merge_heads(xp, dk)
        dqkv[rows, :, 2 * c :] = _merge_heads(xp, dv)

    for_each_row_block(backward_rows, probs)
    return dqkv
