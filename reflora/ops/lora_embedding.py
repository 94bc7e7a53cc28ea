"""LoRA on an embedding (PEFT 0.21 ``lora.Embedding``), the delta only.

PEFT stores ``A = lora_embedding_A`` (r, V) and ``B = lora_embedding_B`` (C, r) (no ``.weight`` suffix) and
computes, for token ids (B, T) with scaling s (``alpha / r``, or ``alpha / √r`` under rsLoRA):

    out[b, t, :] = W[ids[b, t], :] + δ[b, t, :],   δ[b, t, :] = s · Aᵀ[ids[b, t], :] Bᵀ      (B, T, C)

that is ``F.embedding(ids, Aᵀ) @ Bᵀ · s``: the delta of the weight is ΔW = s (B A)ᵀ (V, C). There is no
dropout on this branch: PEFT builds ``lora_dropout[name]`` but ``Embedding.forward`` never calls it.

Backward, with u = Aᵀ[ids] (N, r) (N = B·T, rows flattened) and g = dδ (N, C):

    dB = s · gᵀ u                                       (C, r)   (δ = s u Bᵀ is linear in B)
    dAᵀ[v, :] = s · Σ_{n: ids[n] = v} (g B)[n, :]         (V, r)   (a scatter-add, as in reflora.ops.embedding)

so ``dA = (scatter_add(g B · s))ᵀ`` (r, V). The ids get no gradient.
"""

from __future__ import annotations

from reflora.backend import Array, namespace
from reflora.ops.embedding import embedding_backward, embedding_forward


def lora_embedding_forward(ids: Array, A: Array, B: Array, scaling: float) -> tuple[Array, tuple]:
    """ids: (B, T) int; A: (r, V); B: (C, r) -> δ (B, T, C) = s · Aᵀ[ids] Bᵀ, cache (u (B, T, r), emb cache)."""
    xp = namespace(A)
    u, emb_cache = embedding_forward(ids, xp.matrix_transpose(A))  # (B, T, r)
    return scaling * xp.matmul(u, xp.matrix_transpose(B)), (u, emb_cache)


def lora_embedding_backward(ddelta: Array, cache: tuple, A: Array, B: Array, scaling: float) -> tuple[Array, Array]:
    """ddelta: (B, T, C) -> (dA (r, V), dB (C, r)) for δ = s · Aᵀ[ids] Bᵀ (A is unused: δ is linear in it)."""
    xp = namespace(ddelta)
    u, emb_cache = cache
    c, r = B.shape
    g = xp.reshape(ddelta, (-1, c))  # (N, C)
    dB = scaling * xp.matmul(xp.matrix_transpose(g), xp.reshape(u, (-1, r)))  # (C, r)
    du = scaling * xp.reshape(xp.matmul(g, B), (*ddelta.shape[:-1], r))  # (B, T, r)
    dA = xp.matrix_transpose(embedding_backward(du, emb_cache))  # (r, V)
    return dA, dB
