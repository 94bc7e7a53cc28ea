"""Embedding lookup.

Forward:  ``out[b, t, :] = weight[ids[b, t], :]``
Backward: ``dweight[v, :] = Σ_{(b,t): ids[b,t] = v} dout[b, t, :]`` (a scatter-add; repeated ids accumulate).
"""

from __future__ import annotations

from reflora.backend import Array, namespace, scatter_add_rows


def embedding_forward(ids: Array, weight: Array) -> Array:
    """ids: (B, T) int; weight: (V, C) -> out: (B, T, C)."""
    xp = namespace(weight)
    flat = xp.take(weight, xp.reshape(ids, (-1,)), axis=0)  # (B·T, C)
    return xp.reshape(flat, (*ids.shape, weight.shape[1]))


def embedding_backward(dout: Array, ids: Array, num_embeddings: int) -> Array:
    """dout: (B, T, C); ids: (B, T) -> dweight: (V, C)."""
    xp = namespace(dout)
    c = dout.shape[-1]
    return scatter_add_rows(xp, num_embeddings, xp.reshape(ids, (-1,)), xp.reshape(dout, (-1, c)))
