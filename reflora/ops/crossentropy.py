"""Shifted causal cross-entropy over the vocabulary (HF ``ForCausalLMLoss``), fused with its softmax.

Forward: position t predicts token t+1. With z = logits[b, t, :], y = labels[b, t+1] and the counted set
K = {(b, t) : t < T−1, y ≠ −100}:

    loss = (1/|K|) Σ_{(b,t)∈K} ( logsumexp(z) − z_y )

Backward: dlogits[b, t, :] = (softmax(z) − onehot(y)) / |K| on counted positions, 0 elsewhere.

HF computes this loss after ``logits.float()``, i.e. in float32 even for a float64 model; reflora computes it
in the logits' own dtype. An all-ignored batch has no mean (HF returns NaN); reflora raises.
"""

from __future__ import annotations

from reflora.backend import Array, namespace

IGNORE_INDEX = -100


def cross_entropy_forward(logits: Array, labels: Array) -> tuple[Array, tuple]:
    """logits: (B, T, V); labels: (B, T) int, -100 = ignored -> loss: 0-d array, cache."""
    xp = namespace(logits)
    b, t, vocab = logits.shape
    z = xp.reshape(logits[:, :-1, :], (-1, vocab))  # (N, V), N = B·(T−1)
    y = xp.reshape(labels[:, 1:], (-1,))  # (N,)
    counted = y != IGNORE_INDEX  # (N,)
    n_counted = int(xp.sum(xp.astype(counted, xp.int64)))
    if n_counted == 0:
        raise ValueError("labels: every label after the causal shift is -100, so the mean loss is undefined")
    safe_y = xp.where(counted, y, xp.zeros_like(y))  # (N,)
    z_max = xp.max(z, axis=-1, keepdims=True)  # (N, 1)
    exp_z = xp.exp(z - z_max)  # (N, V)
    sum_exp = xp.sum(exp_z, axis=-1, keepdims=True)  # (N, 1)
    logsumexp = xp.log(sum_exp) + z_max  # (N, 1)
    z_y = xp.take_along_axis(z, safe_y[:, None], axis=-1)  # (N, 1)
    per_token = xp.where(counted, (logsumexp - z_y)[:, 0], xp.zeros_like(z_y[:, 0]))  # (N,)
    loss = xp.sum(per_token) / n_counted
    return loss, (exp_z, sum_exp, safe_y, counted, n_counted, (b, t, vocab))


def cross_entropy_backward(dloss: float, cache: tuple) -> Array:
    """dloss: scalar -> dlogits: (B, T, V). Reuses the forward's exp buffer in place."""
    exp_z, sum_exp, safe_y, counted, n_counted, (b, t, vocab) = cache
    xp = namespace(exp_z)
    dz = exp_z  # (N, V): becomes softmax(z) − onehot(y), scaled; the cache is consumed
    dz /= sum_exp
    # subtract 1 at (n, y_n); the standard has no scatter, so the one-hot comes from a comparison
    dz -= xp.astype(xp.arange(vocab)[None, :] == safe_y[:, None], dz.dtype)
    dz *= xp.astype(counted, dz.dtype)[:, None] * (dloss / n_counted)
    dlogits = xp.zeros((b, t, vocab), dtype=dz.dtype)
    dlogits[:, :-1, :] = xp.reshape(dz, (b, t - 1, vocab))
    return dlogits
