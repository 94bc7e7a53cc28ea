"""Embedding lookup.

Forward:  ``out[b, t, :] = weight[ids[b, t], :]``
Backward: ``dweight[v, :] = Σ_{(b,t): ids[b,t] = v} dout[b, t, :]`` (a scatter-add; repeated ids accumulate).
(out[b, t, c] depends on weight[v, c] only where ids[b, t] = v, with derivative 1; the ids get no gradient.)
"""

from __future__ import annotations

from reflora.backend import Array, namespace, scatter_add_rows


def embedding_forward(ids: Array, weight: Array) -> tuple[Array, tuple]:
    """ids: (B, T) int; weight: (V, C) -> out: (B, T, C), cache (ids, V)."""
    xp = namespace(weight)
    flat = xp.take(weight, xp.reshape(ids, (-1,)), axis=0)  # (B·T, C)
    return xp.reshape(flat, (*ids.shape, weight.shape[1])), (ids, weight.shape[0])


def embedding_backward(dout: Array, cache: tuple) -> Array:
    """dout: (B, T, C) -> dweight: (V, C)."""
    xp = namespace(dout)
    ids, num_embeddings = cache
    c = dout.shape[-1]
    return scatter_add_rows(xp, num_embeddings, xp.reshape(ids, (-1,)), xp.reshape(dout, (-1, c)))
