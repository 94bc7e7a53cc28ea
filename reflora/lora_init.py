"""LoRA's initialisations, PEFT 0.21's ``init_lora_weights`` (``LoraLayer.reset_lora_parameters``, ``pissa_init``,
``olora_init``), for one module in either layout or for a whole adapter.

A is (r, in), B is (out, r); ``Wt`` is the weight's (out, in) form (``Wt = Wᵀ`` for a Conv1D, which stores
(in, out); ``Wt = W`` for a Linear); s is the scaling.

* ``True``: A ~ U(−1/√in, 1/√in) (``kaiming_uniform_(a=√5)``: gain √(2/(1+5)) times √(3/in)), B = 0.
* ``"gaussian"``: A ~ N(0, (1/r)²) (standard deviation 1/r, not 1/√r), B = 0.
* ``False``: ``nn.Linear``'s own init: A ~ U(±1/√in), B ~ U(±1/√r); with ``lora_bias`` b_B ~ U(±1/√r).
  Not a no-op: the adapter changes the output from the start.
* ``"pissa"``: Wt = U diag(S) Vh (thin SVD). A = diag(√(S_r/s)) Vh_r, B = U_r diag(√(S_r/s)), so s·B A is the
  best rank-r part U_r S_r Vh_r; the base becomes the residual Wt − s·B A. The output is unchanged.
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
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from reflora.backend import Array, namespace, to_namespace
from reflora.config import GPT2Config, LoraConfig
from reflora.ops.dora_linear import dora_weight_norm
from reflora.targets import plan_lora

INIT_KINDS = (True, False, "gaussian", "pissa", "olora")
TEST_INIT = "test"  # reflora's fixture init: every tensor random and non-trivial (B ≠ 0, m ≠ ‖V‖, b_B ≠ 0)


class LoraInit(NamedTuple):
    A: Array  # (r, in)
    B: Array  # (out, r)
    weight: Array  # the base weight in its layout: the residual after PiSSA/OLoRA, else the input unchanged


def _check_init(init) -> None:
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
    if init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, in_features))
    else:
        A = _uniform(rng, 1.0 / math.sqrt(in_features), (r, in_features))
    if init in (False, TEST_INIT):
        B = _uniform(rng, 1.0 / math.sqrt(r), (out_features, r))
    else:
        B = np.zeros((out_features, r))
    return A, B


def draw_lora_bias(init: bool | str, r: int, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """``lora_bias``'s b_B (n_out,): ``nn.Linear(r, out)``'s U(±1/√r) under ``False`` and ``"test"``, else 0."""
    if init in (False, TEST_INIT):
        return _uniform(rng, 1.0 / math.sqrt(r), (n_out,))
    return np.zeros((n_out,))


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
    b_B ~ U(±1/√r) and m = ‖V‖ ⊙ U(0.5, 1.5), so that no term is trivially zero or one. Draw order: modules in
    model order; per branch A, B, then b_B; then the module's DoRA factor. Returns ``(adapter, params')`` where
    ``params'`` is a new dict holding the PiSSA/OLoRA residuals (the other entries are the input's arrays).
    """
    init = lora.init_lora_weights if init is None else init
    _check_init(init)
    plan = plan_lora(config, lora)
    new_params = dict(params)
    adapter: dict[str, Array] = {}
    for name, module in plan.items():
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


def residual_base(params: Mapping[str, Array], config: GPT2Config, lora: LoraConfig) -> dict[str, Array]:
    """The base a PiSSA/OLoRA adapter file is used with: PEFT re-runs the init on the original base every time it
    loads such an adapter (``update_layer``), so the base becomes the residual; other inits leave it unchanged."""
    if lora.init_lora_weights not in ("pissa", "olora"):
        return dict(params)
    return init_adapter(params, config, lora)[1]
