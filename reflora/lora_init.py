"""LoRA's initialisations, PEFT 0.21's ``init_lora_weights`` (``LoraLayer.reset_lora_parameters``, ``pissa_init``,
``olora_init``), for one module in either layout or for a whole adapter.

A is (r, in), B is (out, r); ``Wt`` is the weight's (out, in) form (``Wt = Wᵀ`` for a Conv1D, which stores
(in, out); ``Wt = W`` for a Linear); s is the scaling.

* ``True``: A ~ U(−1/√in, 1/√in) (``kaiming_uniform_(a=√5)``: gain √(2/(1+5)) times √(3/in)), B = 0.
* ``"gaussian"``: A ~ N(0, (1/r)²) (standard deviation 1/r, not 1/√r), B = 0.
* ``False``: ``nn.Linear``'s own init: A ~ U(±1/√in), B ~ U(±1/√r); with ``lora_bias`` b_B ~ U(±1/√r).
  Not a no-op: the adapter changes the output from the start.
* ``"orthogonal"`` (PEFT's ``orthogonal_init``, even r): Q from the QR of X ~ N(0, 1) (r, r); its odd rows
  Q_o = Q[0::2] and even rows Q_e = Q[1::2] (r/2, r) are orthonormal and Q_e Q_oᵀ = 0.
  A = (G_A Q_o)ᵀ / 10 with G_A ~ N(0, 1) (in, r/2); B = G_Bᵀ Q_e / 10 with G_B ~ N(0, 1) (r/2, out). So
  B A = G_Bᵀ Q_e Q_oᵀ G_A ᵀ / 100 = 0 (output = base; in floating point ~u·‖B‖‖A‖), rank A = rank B = r/2,
  the columns of A span a subspace orthogonal to the rows of B, and 100‖A‖_F² = ‖G_A‖_F² ~ χ²(in·r/2),
  100‖B‖_F² ~ χ²(out·r/2) (Q_o, Q_e have orthonormal rows). PEFT draws in float32 with the torch generator.
* ``"pissa"``: Wt = U diag(S) Vh (thin SVD). A = diag(√(S_r/s)) Vh_r, B = U_r diag(√(S_r/s)), so s·B A is the
  best rank-r part U_r S_r Vh_r; the base becomes the residual Wt − s·B A. The output is unchanged.
* ``"pissa_niter_K"``: as ``"pissa"`` with U_r S_r Vh_r replaced by ``randomized_svd(Wt, r, K)`` (PEFT's
  ``torch.svd_lowrank``, random): s·B A = P Wt with P the projector on an r-dimensional range found by K power
  iterations (for out < in: Wt P on a row space), so the residual Wt − s·B A is orthogonal to it and the output
  is unchanged at init; the approximation error is random (no oversampling: no expectation bound applies).
* ``"olora"``: Wt = Q R (thin QR). A = R_r (first r rows), B = Q_r (first r columns); base Wt − s·B A.

PiSSA and OLoRA need r ≤ min(in, out). Signs of singular vectors and of QR factors are not unique, so
their A and B are defined up to signs; B A, s·B A and the residual are not, and those are what tests compare.
PEFT runs both in float32 and refuses float64 weights; reflora computes in the weight's own dtype.

PEFT differs on GPT-2: its ``olora_init`` factors the stored (in, out) Conv1D weight without transposing it,
so the output changes at init (square layers) or the forward fails (non-square ``c_attn``, ``mlp.*``).
reflora factors Wt, as for a Linear: docs/advanced-semantics.md, "Initialisations".

Lora biases (``lora_bias``) start at 0 except under ``False``. DoRA's magnitude starts at ‖Wt' + s·B A‖ per
output row, with Wt' the base the adapter is used with (after PiSSA/OLoRA that is the residual, so m = ‖Wt‖).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from reflora.backend import Array, namespace, to_namespace
from reflora.config import GPT2Config, LoraConfig
from reflora.ops.dora_linear import dora_weight_norm
from reflora.targets import EMBEDDING_MODULE, HEAD_KEY, plan_lora

INIT_KINDS = (True, False, "gaussian", "pissa", "olora", "orthogonal")
TEST_INIT = "test"  # reflora's fixture init: every tensor random and non-trivial (B ≠ 0, m ≠ ‖V‖, b_B ≠ 0)


class LoraInit(NamedTuple):
    A: Array  # (r, in)
    B: Array  # (out, r)
    weight: Array  # the base weight in its layout: the residual after PiSSA/OLoRA, else the input unchanged


def pissa_niter(init) -> int | None:
    """K of ``"pissa_niter_K"`` (randomised PiSSA), else None."""
    match = re.fullmatch(r"pissa_niter_([0-9]+)", init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def randomized_svd(M: Array, q: int, niter: int, rng: np.random.Generator) -> tuple[Array, Array, Array]:
    """``torch.svd_lowrank(M, q, niter)`` (Halko, Martinsson, Tropp 2011, Alg. 5.1, no oversampling) with NumPy
    draws: U (m, q), S (q,), V (n, q) with M ≈ U diag(S) Vᵀ. For a wide M (m < n) it factors Mᵀ and swaps.
    On the tall form T (p, k): G ~ N(0, 1) (k, q) (float64, cast), Q = qr(T G); K times Q = qr(Tᵀ Q), Q = qr(T Q);
    then U_b S Vh = svd(Qᵀ T), U = Q U_b. So U diag(S) Vᵀ = Q Qᵀ T exactly: the projection of T on range(Q)."""
    xp = namespace(M)
    wide = M.shape[0] < M.shape[1]
    T = xp.matrix_transpose(M) if wide else M
    Q = xp.linalg.qr(xp.matmul(T, _cast(xp, rng.standard_normal((T.shape[1], q)), M.dtype)))[0]
    for _ in range(niter):
        Q = xp.linalg.qr(xp.matmul(xp.matrix_transpose(T), Q))[0]
        Q = xp.linalg.qr(xp.matmul(T, Q))[0]
    Ub, S, Vh = xp.linalg.svd(xp.matmul(xp.matrix_transpose(Q), T), full_matrices=False)
    U, V = xp.matmul(Q, Ub), xp.matrix_transpose(Vh)
    return (V, S, U) if wide else (U, S, V)


def _check_init(init) -> None:
    if pissa_niter(init) is not None:
        return
    if not (isinstance(init, bool) or (isinstance(init, str) and init in (*INIT_KINDS, TEST_INIT))):
        raise ValueError(f"init must be one of {INIT_KINDS} or {TEST_INIT!r}, got {init!r}")


def _uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape)


def init_lora_module(
    init: bool | str,
    weight: Array,
    r: int,
    scaling: float,
    rng: np.random.Generator | None = None,
    layout: str = "conv1d",
) -> LoraInit:
    """A (r, in), B (out, r) and the base weight for one module: weight is (in, out) for ``layout="conv1d"``,
    (out, in) for ``"linear"``. ``rng`` (NumPy) is needed by the random inits; draws are float64, then cast."""
    _check_init(init)
    if layout not in ("conv1d", "linear"):
        raise ValueError(f"layout must be 'conv1d' or 'linear', got {layout!r}")
    xp = namespace(weight)
    Wt = xp.matrix_transpose(weight) if layout == "conv1d" else weight  # (out, in)
    out_f, in_f = Wt.shape
    niter = pissa_niter(init)
    if niter is not None:  # randomised PiSSA: PEFT's pissa_init with svd_lowrank
        if not 1 <= r <= min(in_f, out_f):
            raise ValueError(f"init {init!r} needs 1 <= r <= min(in, out) = {min(in_f, out_f)}, got r={r}")
        if rng is None:
            raise ValueError(f"init {init!r} is random: pass rng (a numpy.random.Generator)")
        U, S, V = randomized_svd(Wt, r, niter, rng)  # (out, r), (r,), (in, r)
        root = xp.sqrt(S / scaling)
        A = xp.reshape(root, (r, 1)) * xp.matrix_transpose(V)  # (r, in)
        B = U * xp.reshape(root, (1, r))  # (out, r)
        residual = Wt - scaling * xp.matmul(B, A)
        return LoraInit(A, B, xp.matrix_transpose(residual) if layout == "conv1d" else residual)
    if init in ("pissa", "olora"):
        if not 1 <= r <= min(in_f, out_f):
            raise ValueError(f"init {init!r} needs 1 <= r <= min(in, out) = {min(in_f, out_f)}, got r={r}")
        if init == "pissa":
            U, S, Vh = xp.linalg.svd(Wt, full_matrices=False)  # (out, k), (k,), (k, in)
            root = xp.sqrt(S[:r] / scaling)  # (r,)
            A = xp.reshape(root, (r, 1)) * Vh[:r, :]  # (r, in)
            B = U[:, :r] * xp.reshape(root, (1, r))  # (out, r)
        else:
            Q, R = xp.linalg.qr(Wt)  # (out, k), (k, in)
            A, B = R[:r, :], Q[:, :r]
        residual = Wt - scaling * xp.matmul(B, A)  # (out, in)
        return LoraInit(A, B, xp.matrix_transpose(residual) if layout == "conv1d" else residual)
    if rng is None:
        raise ValueError(f"init {init!r} is random: pass rng (a numpy.random.Generator)")
    A, B = draw_lora_factors(init, r, in_f, out_f, rng)
    return LoraInit(_cast(xp, A, weight.dtype), _cast(xp, B, weight.dtype), weight)


def draw_lora_factors(
    init: bool | str, r: int, in_features: int, out_features: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The random inits' A (r, in) and B (out, r), float64 NumPy, drawn in that order (A first)."""
    if init == "orthogonal":
        if r % 2:
            raise ValueError(f"init 'orthogonal' needs an even r, got r={r}")
        Q, _ = np.linalg.qr(rng.standard_normal((r, r)))
        A = (rng.standard_normal((in_features, r // 2)) @ Q[0::2, :]).T / 10.0  # (r, in)
        B = rng.standard_normal((r // 2, out_features)).T @ Q[1::2, :] / 10.0  # (out, r)
        return A, B
    if init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, in_features))
    else:
        A = _uniform(rng, 1.0 / math.sqrt(in_features), (r, in_features))
    if init in (False, TEST_INIT):
        B = _uniform(rng, 1.0 / math.sqrt(r), (out_features, r))
    else:
        B = np.zeros((out_features, r))
    return A, B


def draw_embedding_factors(init: bool, r: int, vocab: int, c: int, rng: np.random.Generator):
    """PEFT 0.21 ``lora.Embedding``: ``True`` is A = 0 (r, V), B ~ N(0, 1) (C, r) (``reset_lora_parameters``);
    ``False`` keeps its construction draw, A ~ N(0, 1) and B ~ N(0, 1)."""
    if init is True:
        return np.zeros((r, vocab)), rng.standard_normal((c, r))
    return rng.standard_normal((r, vocab)), rng.standard_normal((c, r))


def draw_lora_bias(init: bool | str, r: int, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """``lora_bias``'s b_B (n_out,): ``nn.Linear(r, out)``'s U(±1/√r) under ``False`` and ``"test"``, else 0."""
    if init in (False, TEST_INIT):
        return _uniform(rng, 1.0 / math.sqrt(r), (n_out,))
    return np.zeros((n_out,))


def draw_base_like(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One float64 tensor drawn as reflora's seeded base draws the HF tensor ``key`` (``init_gpt2_params``):
    a LayerNorm weight (``*.ln_*.weight``) 1 + N(0, 0.1²), every other weight or bias N(0, 0.02²)."""
    if ".ln_" in key and key.endswith(".weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.02 * rng.standard_normal(shape)


def _cast(xp, array: np.ndarray, dtype) -> Array:
    """A float64 NumPy draw, in namespace ``xp`` and ``dtype``."""
    return xp.astype(to_namespace(xp, array), dtype)


def init_adapter(
    params: Mapping[str, Array],
    config: GPT2Config,
    lora: LoraConfig,
    rng: np.random.Generator | None = None,
    init: bool | str | None = None,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Every tensor of ``lora``'s adapter, and the base params to use it with.

    ``init`` defaults to ``lora.init_lora_weights``; ``"test"`` (fixtures) draws A, B as under ``False`` plus
    b_B ~ U(±1/√r) and m = ‖V‖ ⊙ U(0.5, 1.5), so that no term is trivially zero or one. A modules_to_save copy
    starts as its module (PEFT's deepcopy; ``lm_head``'s as the tied W), or under ``"test"`` is drawn afresh
    (``draw_base_like``). Draw order (``plan_lora``'s): the trainable-token rows, then the LoRA modules in model
    order (per branch A, B, then b_B; then the module's DoRA factor), then the modules_to_save copies in model
    order, each copy's tensors in ``base_shapes`` order (a tied ``lm_head`` shares wte's copy and draws nothing).
    Returns ``(adapter, params')`` where
    ``params'`` is a new dict holding the PiSSA/OLoRA residuals (the other entries are the input's arrays).
    """
    init = lora.init_lora_weights if init is None else init
    _check_init(init)
    plan = plan_lora(config, lora)
    new_params = dict(params)
    adapter: dict[str, Array] = {}
    for name, module in plan.items():
        if _embedding_init(module, init, new_params, adapter, rng):
            continue
        if module.saved is not None:  # modules_to_save: PEFT deep-copies the module (lm_head: the tied wte)
            for key, hf_key, shape in module.saved:
                if key in adapter:  # a tied head shares wte's copy: nothing to draw
                    continue
                source = new_params[EMBEDDING_MODULE + ".weight" if hf_key == HEAD_KEY else hf_key]
                xp = namespace(source)
                if init == TEST_INIT:  # fixtures: the copy differs from the base (drawn as init_gpt2_params does)
                    adapter[key] = _cast(xp, draw_base_like(hf_key, shape, rng), source.dtype)
                else:
                    adapter[key] = xp.asarray(source, copy=True)
            continue
        key = f"{name}.weight"
        weight = new_params[key]
        xp = namespace(weight)
        for branch in module.branches:
            rows = slice(branch.out_start, branch.out_stop)  # the branch's output units: columns of a Conv1D
            part = weight[:, rows]  # (in, out_b)
            a, b, residual = init_lora_module(init, part, module.r, module.scaling, rng, "conv1d")
            adapter[branch.a_key], adapter[branch.b_key] = a, b
            if residual is not part:
                weight = xp.concat([weight[:, : branch.out_start], residual, weight[:, branch.out_stop :]], axis=1)
            if branch.bias_key is not None:
                bias = draw_lora_bias(init, module.r, branch.out_stop - branch.out_start, rng)
                adapter[branch.bias_key] = _cast(xp, bias, weight.dtype)
        new_params[key] = weight
        if module.magnitude_key is not None:
            (branch,) = module.branches
            norm = dora_weight_norm(weight, adapter[branch.a_key], adapter[branch.b_key], module.scaling, "conv1d")
            if init == TEST_INIT:
                norm = norm * _cast(xp, rng.uniform(0.5, 1.5, size=(module.out_features,)), weight.dtype)
            adapter[module.magnitude_key] = norm
    return adapter, new_params


def _embedding_init(module, init, params: Mapping[str, Array], adapter: dict, rng) -> bool:
    """``wte``'s adapters in ``init_adapter`` (True when ``module`` is one): Embedding LoRA as
    ``draw_embedding_factors`` (``"test"``: as ``False`` on a Conv1D); trainable tokens start at the
    base rows W[token_indices] (PEFT's TrainableTokens ``init_weights=True``, whatever ``init_lora_weights``),
    or ~ N(0, 1) under ``"test"``."""
    if module.kind not in ("wte", "tokens"):
        return False
    weight = params["transformer.wte.weight"]
    xp = namespace(weight)
    if module.kind == "tokens":
        if init == TEST_INIT:
            rows = _cast(xp, rng.standard_normal((len(module.token_indices), module.out_features)), weight.dtype)
        else:
            rows = xp.take(weight, xp.asarray(module.token_indices), axis=0)
        adapter[module.tokens_key] = rows
        return True
    if init not in (True, False, TEST_INIT):
        raise ValueError(f"init {init!r} is not defined for LoRA on wte (use true, false or 'test')")
    (branch,) = module.branches
    if init == TEST_INIT:
        a, b = draw_lora_factors(False, module.r, module.in_features, module.out_features, rng)
    else:
        a, b = draw_embedding_factors(init, module.r, module.in_features, module.out_features, rng)
    adapter[branch.a_key], adapter[branch.b_key] = _cast(xp, a, weight.dtype), _cast(xp, b, weight.dtype)
    return True


def residual_base(params: Mapping[str, Array], config: GPT2Config, lora: LoraConfig) -> dict[str, Array]:
    """The base a PiSSA/OLoRA adapter file is used with: PEFT re-runs the init on the original base every time it
    loads such an adapter (``update_layer``), so the base becomes the residual; other inits leave it unchanged."""
    if pissa_niter(lora.init_lora_weights) is not None:
        raise ValueError(
            f"init_lora_weights={lora.init_lora_weights!r} is random: PEFT re-runs its randomised SVD on every load, "
            "so the residual depends on torch's generator; keep the residual base of the original init instead"
        )
    if lora.init_lora_weights not in ("pissa", "olora"):
        return dict(params)
    return init_adapter(params, config, lora)[1]
