"""Shifted causal cross-entropy over the vocabulary (HF ``ForCausalLMLoss``), fused with its softmax.

Forward: position t predicts token t+1. With z = logits[b, t, :], y = labels[b, t+1] and the counted set
K = {(b, t) : t < T−1, y ≠ −100}:

    loss = (1/|K|) Σ_{(b,t)∈K} ( logsumexp(z) − z_y )

Backward: dlogits[b, t, :] = dloss · (softmax(z) − onehot(y)) / |K| on counted positions, 0 elsewhere.

Fused (llm.c's ``fused_classifier``): the forward already writes (softmax(z) − onehot(y)) / |K| into one
(B, T, V) buffer while each block of rows is in cache (``for_each_row_block``), so the (B, T, V) logits are
read once and no (B, T, V) temporary is made; the backward only scales that buffer by dloss. A forward-only
caller pays for the buffer.

HF computes this loss after ``logits.float()``, i.e. in float32 even for a float64 model; reflora computes it
in the logits' own dtype. An all-ignored batch has no mean (HF returns NaN); reflora raises.
"""

from __future__ import annotations

from reflora.backend import Array, add_at_columns, for_each_row_block, namespace

IGNORE_INDEX = -100


def cross_entropy_forward(logits: Array, labels: Array) -> tuple[Array, tuple]:
    """logits: (B, T, V); labels: (B, T) int, -100 = ignored -> loss: 0-d array, cache."""
    xp = namespace(logits)
    b, t, vocab = logits.shape
    n = b * t
    # Row n = (b, t) predicts labels[b, t+1]; the last position of each row predicts nothing (ignored).
    ignored_tail = xp.full((b, 1), IGNORE_INDEX, dtype=labels.dtype)
    targets = xp.reshape(xp.concat([labels[:, 1:], ignored_tail], axis=1), (n,))  # (N,)
    counted = targets != IGNORE_INDEX  # (N,)
    n_counted = int(xp.sum(xp.astype(counted, xp.int64)))
    if n_counted == 0:
        raise ValueError("labels: every label after the causal shift is -100, so the mean loss is undefined")
    safe_targets = xp.where(counted, targets, xp.zeros_like(targets))  # (N,), any valid index where ignored
    row_weight = xp.astype(counted, logits.dtype) / n_counted  # (N,): ∂loss/∂(token loss), 0 where ignored

    z = xp.reshape(logits, (n, vocab))  # (N, V)
    grad = xp.empty((n, vocab), dtype=logits.dtype)  # (N, V): becomes ∂loss/∂z
    logsumexp = xp.empty((n,), dtype=logits.dtype)  # (N,)

    def softmax_rows(rows: slice) -> None:
        z_max = xp.max(z[rows, :], axis=-1, keepdims=True)  # (R, 1)
        exp_z = xp.exp(z[rows, :] - z_max)  # (R, V)
        sum_exp = xp.sum(exp_z, axis=-1, keepdims=True)  # (R, 1)
        logsumexp[rows] = (xp.log(sum_exp) + z_max)[:, 0]
        exp_z *= row_weight[rows, None] / sum_exp  # softmax(z) / |K| on counted rows, 0 elsewhere
        grad[rows, :] = exp_z

    for_each_row_block(softmax_rows, z)
    grad = add_at_columns(xp, grad, safe_targets, -row_weight)  # − onehot(y) / |K|
    z_y = xp.take_along_axis(z, safe_targets[:, None], axis=-1)[:, 0]  # (N,)
    per_token = xp.where(counted, logsumexp - z_y, xp.zeros_like(z_y))  # (N,)
    loss = xp.sum(per_token) / n_counted
    return loss, (grad, (b, t, vocab))


def cross_entropy_backward(dloss: float, cache: tuple) -> Array:
    """dloss: scalar -> dlogits: (B, T, V). Scales the forward's buffer in place: the cache is consumed."""
    grad, shape = cache
    xp = namespace(grad)
    if dloss != 1.0:
        grad *= dloss
    return xp.reshape(grad, shape)
