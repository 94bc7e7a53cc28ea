"""Every op's hand-written backward against central finite differences, in float64.

The pattern is llm.c's ``layernorm.py`` check: draw a random upstream gradient ``dout``, define the scalar
``f(inputs) = Σ dout ⊙ op(inputs)``, and compare the op's backward with

    ∂f/∂x_i ≈ (f(x + h·e_i) − f(x − h·e_i)) / 2h          for every element i of every input.

With h = 1e-5 the central difference is exact up to O(h²) (truncation) plus O(ε·|f|/h) (rounding); measured,
the worst relative error over all checks here is 3.4e-10. The tolerance RTOL = 1e-8 sits 30x above that and
far below any real mistake: ``test_checker_rejects_small_mistakes`` shows that a gradient off by a factor of 1 + 1e-5,
or transposed, fails the same check.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import reflora.backend
from reflora.ops import (
    LoraBranchWeights,
    attention_backward,
    attention_forward,
    attention_visibility,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    lora_linear_backward,
    lora_linear_forward,
)

H = 1e-5
RTOL = 1e-8


@pytest.fixture(autouse=True, params=["one row block", "one row per block"])
def row_blocking(request, monkeypatch):
    """Run every check twice: as is (these small arrays fit in one block of ``reflora.backend.row_blocks``) and
    with blocks of a single row, so that the blocked loops of the elementwise ops are checked at their seams."""
    if request.param == "one row per block":
        monkeypatch.setattr(reflora.backend, "BLOCK_BYTES", 1, raising=False)


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = H) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to every element of ``x`` (perturbed in place)."""
    assert x.flags.c_contiguous and x.dtype == np.float64
    grad = np.zeros_like(x)
    flat = x.reshape(-1)  # a view: writing it perturbs x
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + h
        f_plus = f()
        flat[i] = original - h
        f_minus = f()
        flat[i] = original
        grad.flat[i] = (f_plus - f_minus) / (2 * h)
    return grad


def assert_gradient_matches(analytic, numeric: np.ndarray, name: str, rtol: float = RTOL) -> None:
    """max |analytic − numeric| ≤ rtol · max |numeric|, after checking the shape."""
    assert analytic is not None, f"{name}: backward returned None"
    analytic = np.asarray(analytic)
    assert analytic.shape == numeric.shape, f"{name}: shape {analytic.shape}, expected {numeric.shape}"
    scale = float(np.max(np.abs(numeric)))
    assert scale > 0, f"{name}: the finite-difference gradient is zero, so the check would prove nothing"
    error = float(np.max(np.abs(analytic - numeric))) / scale
    assert error <= rtol, f"{name}: relative error {error:.3e} > {rtol:.0e} (max |grad| {scale:.3e})"


def weighted_sum(dout: np.ndarray, out: np.ndarray) -> float:
    return float(np.sum(dout * out))


# ----------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------


def test_embedding_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    vocab, channels = 9, 5
    ids = np.array([[1, 4, 4, 0, 8], [4, 2, 1, 1, 6]])  # repeated ids must accumulate; 3, 5, 7 are unused
    weight = rng.standard_normal((vocab, channels))
    dout = rng.standard_normal((*ids.shape, channels))

    dweight = embedding_backward(dout, embedding_forward(ids, weight)[1])
    numeric = numerical_gradient(lambda: weighted_sum(dout, embedding_forward(ids, weight)[0]), weight)
    assert_gradient_matches(dweight, numeric, "embedding dweight")
    assert np.all(dweight[[3, 5, 7]] == 0.0)


# ----------------------------------------------------------------------------------------------
# layernorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_layernorm_backward_matches_finite_differences(eps):
    rng = np.random.default_rng(2)
    rows, channels = 4, 7
    x = 2.0 + 1.5 * rng.standard_normal((rows, channels))  # non-zero mean, so the mean term matters
    weight = 1.0 + 0.3 * rng.standard_normal(channels)
    bias = rng.standard_normal(channels)
    dout = rng.standard_normal((rows, channels))

    _, cache = layernorm_forward(x, weight, bias, eps)
    dx, dweight, dbias = layernorm_backward(dout, cache, weight)

    def f() -> float:
        return weighted_sum(dout, layernorm_forward(x, weight, bias, eps)[0])

    assert_gradient_matches(dx, numerical_gradient(f, x), "layernorm dx")
    assert_gradient_matches(dweight, numerical_gradient(f, weight), "layernorm dweight")
    assert_gradient_matches(dbias, numerical_gradient(f, bias), "layernorm dbias")


# ----------------------------------------------------------------------------------------------
# gelu
# ----------------------------------------------------------------------------------------------


def test_gelu_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = np.concatenate([np.linspace(-6.0, 6.0, 25), 2.0 * rng.standard_normal(15)]).reshape(5, 8)
    dout = rng.standard_normal(x.shape)
    _, cache = gelu_forward(x)
    dx = gelu_backward(dout, cache)
    assert_gradient_matches(dx, numerical_gradient(lambda: weighted_sum(dout, gelu_forward(x)[0]), x), "gelu dx")


def test_gelu_forward_is_the_tanh_form():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 2.5])
    expected = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu_forward(x)[0], expected, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------
# lora_linear
# ----------------------------------------------------------------------------------------------

C = 4  # "n_embd" of the fused qkv layer below: in = C, out = 3C


def lora_linear_case(kind: str, layout: str, dropout: bool, seed: int = 4):
    """A linear layer (in=C, out=3C) with the branches of ``kind``; weights in ``layout``."""
    rng = np.random.default_rng(seed)
    n, d_in, d_out = 6, C, 3 * C

    def branch(r: int, start: int, stop: int, scaling: float) -> LoraBranchWeights:
        return LoraBranchWeights(
            rng.standard_normal((r, d_in)), rng.standard_normal((stop - start, r)), scaling, start, stop
        )

    branches = {
        "none": (),
        "full": (branch(2, 0, d_out, 1.75),),
        "full_rank_beyond": (branch(d_in + 2, 0, d_out, 0.6),),  # r > in: still just a product
        "per_slice": (branch(1, 0, C, 2.0), branch(3, C, 2 * C, 0.5), branch(2, 2 * C, 3 * C, 1.25)),
        "slices_q_v": (branch(2, 0, C, 1.5), branch(3, 2 * C, 3 * C, 0.75)),
    }[kind]
    weight = rng.standard_normal((d_in, d_out) if layout == "conv1d" else (d_out, d_in))
    bias = rng.standard_normal(d_out)
    x = rng.standard_normal((n, d_in))
    p = 0.4 if dropout else 0.0
    keep = (rng.random((n, d_in)) >= p).astype(np.float64) if dropout else None
    if keep is not None:
        keep[0, :] = 0.0  # a fully dropped row and a fully kept one
        keep[1, :] = 1.0
    dout = rng.standard_normal((n, d_out))
    return x, weight, bias, branches, keep, p, dout


# dropout acts on the LoRA branch only, so "none" (no branch) runs in eval mode only
LORA_LINEAR_CASES = [("none", False)] + [
    (kind, dropout) for kind in ("full", "full_rank_beyond", "per_slice", "slices_q_v") for dropout in (False, True)
]


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
@pytest.mark.parametrize(("kind", "dropout"), LORA_LINEAR_CASES)
def test_lora_linear_backward_matches_finite_differences(layout, kind, dropout):
    x, weight, bias, branches, keep, p, dout = lora_linear_case(kind, layout, dropout)

    _, cache = lora_linear_forward(x, weight, bias, branches, keep, p, layout)
    dx, dweight, dbias, branch_grads = lora_linear_backward(
        dout, cache, weight, branches, keep, p, layout, want_dx=True, want_dweight=True, want_dbias=True
    )

    def f() -> float:
        return weighted_sum(dout, lora_linear_forward(x, weight, bias, branches, keep, p, layout)[0])

    assert_gradient_matches(dx, numerical_gradient(f, x), "dx")
    assert_gradient_matches(dweight, numerical_gradient(f, weight), "dweight")
    assert_gradient_matches(dbias, numerical_gradient(f, bias), "dbias")
    assert len(branch_grads) == len(branches)
    for i, (br, (dA, dB)) in enumerate(zip(branches, branch_grads, strict=True)):
        assert_gradient_matches(dA, numerical_gradient(f, br.A), f"branch {i} dA")
        assert_gradient_matches(dB, numerical_gradient(f, br.B), f"branch {i} dB")


def test_lora_linear_without_bias_and_only_requested_gradients():
    x, weight, _, branches, keep, p, dout = lora_linear_case("full", "conv1d", True)
    _, cache = lora_linear_forward(x, weight, None, branches, keep, p, "conv1d")
    dx, dweight, dbias, branch_grads = lora_linear_backward(
        dout, cache, weight, branches, keep, p, "conv1d", want_dx=False
    )
    assert dx is None and dweight is None and dbias is None
    (dA, dB), br = branch_grads[0], branches[0]

    def f() -> float:
        return weighted_sum(dout, lora_linear_forward(x, weight, None, branches, keep, p, "conv1d")[0])

    assert_gradient_matches(dA, numerical_gradient(f, br.A), "dA")
    assert_gradient_matches(dB, numerical_gradient(f, br.B), "dB")


def test_lora_linear_layouts_agree_and_forward_is_the_formula():
    """Linear layout with Wᵀ gives the Conv1D result; and y = xW + b + s·(x⊙M/(1−p))AᵀBᵀ on each slice."""
    x, weight, bias, branches, keep, p, _ = lora_linear_case("slices_q_v", "conv1d", True)
    y_conv, _ = lora_linear_forward(x, weight, bias, branches, keep, p, "conv1d")
    y_lin, _ = lora_linear_forward(x, np.ascontiguousarray(weight.T), bias, branches, keep, p, "linear")
    expected = x @ weight + bias
    for br in branches:
        expected[:, br.start : br.stop] += br.scaling * ((x * keep / (1 - p)) @ br.A.T @ br.B.T)
    np.testing.assert_allclose(y_conv, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(y_lin, expected, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def attention_case(seed: int = 5):
    rng = np.random.default_rng(seed)
    batch, seq_len, n_head, head_dim = 4, 5, 3, 2  # n_head not a power of two
    c = n_head * head_dim
    attention_mask = np.array(
        [
            [1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1],  # left padding: queries 0 and 1 see no key
            [1, 1, 1, 0, 0],  # right padding
            [1, 0, 1, 1, 0],  # a hole in the middle
        ]
    )
    qkv = rng.standard_normal((batch, seq_len, 3 * c))
    dout = rng.standard_normal((batch, seq_len, c))
    return qkv, attention_visibility(attention_mask, seq_len), n_head, dout


def test_attention_backward_matches_finite_differences():
    qkv, visible, n_head, dout = attention_case()
    out, cache = attention_forward(qkv, visible, n_head)
    dqkv = attention_backward(dout, cache)
    numeric = numerical_gradient(lambda: weighted_sum(dout, attention_forward(qkv, visible, n_head)[0]), qkv)
    assert_gradient_matches(dqkv, numeric, "attention dqkv")
    # queries that see no key output exactly 0 and receive no gradient
    assert np.all(out[1, :2] == 0.0)
    assert np.all(dqkv[1, :2, : qkv.shape[-1] // 3] == 0.0)


def test_attention_forward_is_causal_masked_softmax():
    """Against a per-row loop of the textbook formula (fully masked rows give 0)."""
    qkv, visible, n_head, _ = attention_case(seed=6)
    out, _ = attention_forward(qkv, visible, n_head)
    batch, seq_len, three_c = qkv.shape
    c = three_c // 3
    d = c // n_head
    expected = np.zeros((batch, seq_len, c))
    for b in range(batch):
        for h in range(n_head):
            q, k, v = (qkv[b, :, j * c + h * d : j * c + (h + 1) * d] for j in range(3))
            for i in range(seq_len):
                seen = [j for j in range(seq_len) if visible[b, 0, i, j]]
                if not seen:
                    continue
                scores = np.array([q[i] @ k[j] / np.sqrt(d) for j in seen])
                weights = np.exp(scores - scores.max())
                expected[b, i, h * d : (h + 1) * d] = (weights / weights.sum()) @ v[seen]
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# cross-entropy
# ----------------------------------------------------------------------------------------------


def test_cross_entropy_backward_matches_finite_differences():
    rng = np.random.default_rng(7)
    batch, seq_len, vocab = 3, 4, 6
    logits = 2.0 * rng.standard_normal((batch, seq_len, vocab))
    labels = rng.integers(0, vocab, (batch, seq_len))
    labels[0, 2] = -100  # ignored
    labels[2, 1:] = -100  # a row that counts nothing
    dloss = 0.7
    _, cache = cross_entropy_forward(logits, labels)
    dlogits = cross_entropy_backward(dloss, cache)
    numeric = numerical_gradient(lambda: dloss * float(cross_entropy_forward(logits, labels)[0]), logits)
    assert_gradient_matches(dlogits, numeric, "cross-entropy dlogits")
    assert np.all(dlogits[:, -1] == 0.0)  # the last position predicts nothing
    assert np.all(dlogits[0, 1] == 0.0) and np.all(dlogits[2] == 0.0)  # ignored targets


def test_cross_entropy_forward_is_the_shifted_mean():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((2, 3, 5))
    labels = np.array([[-100, 4, 0], [3, -100, 2]])
    loss, _ = cross_entropy_forward(logits, labels)
    terms = [
        np.log(np.sum(np.exp(logits[b, t]))) - logits[b, t, labels[b, t + 1]]
        for b in range(2)
        for t in range(2)
        if labels[b, t + 1] != -100
    ]
    assert len(terms) == 3
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# the checker itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mistake", ["factor 1+1e-5", "transpose", "missing dropout scaling"])
def test_checker_rejects_small_mistakes(mistake):
    """The tolerance is tight enough that a wrong factor or a transpose fails (so the checks above are strong)."""
    x, weight, bias, branches, keep, p, dout = lora_linear_case("full", "conv1d", True)
    weight = np.ascontiguousarray(weight[:, : weight.shape[0]])  # square, so a transpose keeps the shape
    bias = bias[: weight.shape[1]]
    branches = tuple(
        br._replace(B=np.ascontiguousarray(br.B[: weight.shape[1]]), stop=weight.shape[1]) for br in branches
    )
    dout = np.ascontiguousarray(dout[:, : weight.shape[1]])
    _, cache = lora_linear_forward(x, weight, bias, branches, keep, p, "conv1d")
    _, dweight, _, ((dA, _),) = lora_linear_backward(
        dout, cache, weight, branches, keep, p, "conv1d", want_dweight=True
    )

    def f() -> float:
        return weighted_sum(dout, lora_linear_forward(x, weight, bias, branches, keep, p, "conv1d")[0])

    if mistake == "factor 1+1e-5":
        wrong, numeric = dA * (1 + 1e-5), numerical_gradient(f, branches[0].A)
    elif mistake == "transpose":
        wrong, numeric = dweight.T, numerical_gradient(f, weight)
    else:
        wrong, numeric = dA * (1 - p), numerical_gradient(f, branches[0].A)
    with pytest.raises(AssertionError, match="relative error"):
        assert_gradient_matches(wrong, numeric, mistake)
