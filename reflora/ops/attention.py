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
"""

from __future__ import annotations

import math

from reflora.backend import Array, namespace


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
    """qkv: (B, T, 3C); visible: (B, 1, T, T) bool -> out: (B, T, C), cache (q, k, v, P)."""
    xp = namespace(qkv)
    c = qkv.shape[-1] // 3
    q = _split_heads(xp, qkv[..., :c], n_head)  # (B, H, T, d)
    k = _split_heads(xp, qkv[..., c : 2 * c], n_head)  # (B, H, T, d)
    v = _split_heads(xp, qkv[..., 2 * c :], n_head)  # (B, H, T, d)
    scale = 1.0 / math.sqrt(c // n_head)
    scores = xp.matmul(q, xp.matrix_transpose(k)) * scale  # (B, H, T, T)
    scores = xp.where(visible, scores, xp.asarray(-xp.inf, dtype=scores.dtype))
    row_max = xp.max(scores, axis=-1, keepdims=True)  # (B, H, T, 1); -inf on rows that see nothing
    row_max = xp.where(xp.isfinite(row_max), row_max, xp.zeros_like(row_max))
    probs = xp.exp(scores - row_max)  # (B, H, T, T); exactly 0 where not visible
    denom = xp.sum(probs, axis=-1, keepdims=True)  # (B, H, T, 1)
    probs /= xp.where(denom > 0, denom, xp.ones_like(denom))
    out = _merge_heads(xp, xp.matmul(probs, v))  # (B, T, C)
    return out, (q, k, v, probs)


def attention_backward(dout: Array, cache: tuple) -> Array:
    """dout: (B, T, C) -> dqkv: (B, T, 3C)."""
    xp = namespace(dout)
    q, k, v, probs = cache
    n_head = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    do = _split_heads(xp, dout, n_head)  # (B, H, T, d)
    dprobs = xp.matmul(do, xp.matrix_transpose(v))  # (B, H, T, T)
    dv = xp.matmul(xp.matrix_transpose(probs), do)  # (B, H, T, d)
    dscores = probs * (dprobs - xp.sum(dprobs * probs, axis=-1, keepdims=True))  # (B, H, T, T)
    dscores *= scale
    dq = xp.matmul(dscores, k)  # (B, H, T, d)
    dk = xp.matmul(xp.matrix_transpose(dscores), q)  # (B, H, T, d)
    return xp.concat([_merge_heads(xp, dq), _merge_heads(xp, dk), _merge_heads(xp, dv)], axis=-1)
