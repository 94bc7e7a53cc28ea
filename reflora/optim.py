"""Optimizers written out by hand, with ``torch.optim``'s exact semantics: AdamW, SGD, clipping by global norm.

Every function is pure: it takes the parameters, their gradients and the optimizer state, and returns new ones.
Parameters, gradients and state are dicts ``{key: array}`` of one array namespace (NumPy, CuPy...), so the state
saves to safetensors (``optimizer_state_tensors``) plus a little JSON (the step count), never to a pickle.

AdamW (``torch.optim.AdamW``, ``amsgrad=False``; torch's single-tensor path ``_single_tensor_adam`` with
``decoupled_weight_decay=True``), for each tensor p with gradient g, at step t = 1, 2, ...:

    p  ← p · (1 − lr·λ)                          decoupled weight decay, before the Adam update
    m  ← m + (1 − β₁) · (g − m)                  torch's ``exp_avg.lerp_(g, 1 − β₁)``
    v  ← v · β₂ + (1 − β₂) · g · g               torch's ``exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂)``
    denom = √v / √(1 − β₂ᵗ) + ε                  ε is added *after* the bias correction of v
    p  ← p + (−lr / (1 − β₁ᵗ)) · m / denom       torch's ``p.addcdiv_(m, denom, value=−step_size)``

Each line is written in the order torch evaluates it, so the two agree to the last bit or so: torch's CPU kernels
fuse some multiply-adds (``lerp``, ``add(alpha=)``) and NumPy cannot, which leaves differences of an ulp or two.

SGD (``torch.optim.SGD``, ``_single_tensor_sgd``), with weight decay λ, momentum μ, dampening τ:

    g ← g + λ·p                                  (λ ≠ 0; coupled: part of the gradient)
    b ← g  at the first step,  b ← μ·b + (1 − τ)·g  after it          (μ ≠ 0)
    g ← g + μ·b  (nesterov)  or  g ← b                                 (μ ≠ 0)
    p ← p − lr·g

Clipping (``torch.nn.utils.clip_grad_norm_``, norm 2): ``total = ‖(‖g_1‖, ‖g_2‖, ...)‖``, every gradient is
multiplied by ``min(max_norm / (total + 1e-6), 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from reflora.backend import Array, namespace

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm


class OptimizerError(ValueError):
    """An optimizer hyper-parameter or its state is invalid; the message names the field."""


@dataclass(frozen=True)
class AdamWConfig:
    """``torch.optim.AdamW``'s hyper-parameters and defaults (``amsgrad=False``, ``maximize=False``)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    name = "adamw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_nonnegative("adamw.lr", self.lr)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise OptimizerError(f"adamw.betas must be two numbers in [0, 1), got {self.betas!r}")
        _check_nonnegative("adamw.eps", self.eps)
        _check_nonnegative("adamw.weight_decay", self.weight_decay)


@dataclass(frozen=True)
class SGDConfig:
    """``torch.optim.SGD``'s hyper-parameters and defaults (``maximize=False``)."""

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    name = "sgd"

    def __post_init__(self) -> None:
        for field in ("lr", "momentum", "dampening", "weight_decay"):
            _check_nonnegative(f"sgd.{field}", getattr(self, field))
        if not isinstance(self.nesterov, bool):
            raise OptimizerError(f"sgd.nesterov must be true or false, got {self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise OptimizerError("sgd.nesterov=true needs sgd.momentum > 0 and sgd.dampening = 0 (as in torch)")


OptimizerConfig = AdamWConfig | SGDConfig
OPTIMIZERS = {"adamw": AdamWConfig, "sgd": SGDConfig}


def optimizer_config_from_dict(data: Mapping[str, Any]) -> OptimizerConfig:
    """Inverse of ``optimizer_config_to_dict``: ``{"name": "adamw", "lr": ..., ...}``."""
    fields = dict(data)
    name = fields.pop("name", None)
    if name not in OPTIMIZERS:
        raise OptimizerError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {name!r}")
    try:
        return OPTIMIZERS[name](**fields)
    except TypeError as exc:
        raise OptimizerError(f"optimizer {name}: {exc}") from None


def optimizer_config_to_dict(config: OptimizerConfig) -> dict[str, Any]:
    out = {"name": config.name, **asdict(config)}
    if "betas" in out:
        out["betas"] = list(out["betas"])
    return out


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------


def init_optimizer_state(config: OptimizerConfig, params: Mapping[str, Array]) -> dict[str, Any]:
    """The state before the first step: ``{"step": 0, <buffer name>: {key: zeros like the parameter}}``.

    AdamW: ``exp_avg`` and ``exp_avg_sq``. SGD with momentum: ``momentum_buffer`` (filled by the first step,
    which copies the gradient into it, as torch does). Plain SGD keeps only the step count.
    """
    state: dict[str, Any] = {"step": 0}
    for buffer in state_buffers(config):
        state[buffer] = {key: _zeros_like(value) for key, value in params.items()}
    return state


def state_buffers(config: OptimizerConfig) -> tuple[str, ...]:
    """The per-parameter buffers an optimizer keeps, by torch's names."""
    if isinstance(config, AdamWConfig):
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if config.momentum != 0 else ()


def optimizer_state_tensors(state: Mapping[str, Any]) -> dict[str, Array]:
    """Flatten the buffers for a safetensors file: ``"<buffer>/<parameter key>"`` -> array."""
    return {
        f"{buffer}/{key}": value for buffer, group in state.items() if buffer != "step" for key, value in group.items()
    }


def optimizer_state_from_tensors(
    config: OptimizerConfig, step: int, tensors: Mapping[str, Array], params: Mapping[str, Array]
) -> dict[str, Any]:
    """Inverse of ``optimizer_state_tensors``; every buffer must hold exactly the keys and shapes of ``params``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise OptimizerError(f"optimizer state: step must be an integer >= 0, got {step!r}")
    state: dict[str, Any] = {"step": step}
    expected = {f"{b}/{k}" for b in state_buffers(config) for k in params}
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unknown:
        raise OptimizerError(f"optimizer state: tensors do not match the parameters: missing {missing[:3]}, "
                             f"unexpected {unknown[:3]}")  # fmt: skip
    for buffer in state_buffers(config):
        state[buffer] = {}
        for key, value in params.items():
            stored = tensors[f"{buffer}/{key}"]
            if tuple(stored.shape) != tuple(value.shape) or stored.dtype != value.dtype:
                raise OptimizerError(
                    f"optimizer state: {buffer}/{key} is {tuple(stored.shape)} {stored.dtype}, "
                    f"the parameter is {tuple(value.shape)} {value.dtype}"
                )
            state[buffer][key] = stored
    return state


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


def optimizer_step(
    config: OptimizerConfig,
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    state: Mapping[str, Any],
    lr: float | None = None,
) -> tuple[dict[str, Array], dict[str, Any]]:
    """One update of every parameter: ``(new params, new state)``; the inputs are not modified.

    ``lr`` overrides ``config.lr`` for this step (a schedule), as setting ``param_group["lr"]`` does in torch.
    """
    missing = [k for k in params if k not in grads]
    unknown = [k for k in grads if k not in params]
    if missing or unknown:
        raise OptimizerError(f"grads must have the parameters' keys: missing {missing[:3]}, unexpected {unknown[:3]}")
    lr = config.lr if lr is None else lr
    if isinstance(config, AdamWConfig):
        return adamw_step(config, params, grads, state, lr)
    return sgd_step(config, params, grads, state, lr)


def adamw_step(
    config: AdamWConfig, params: Mapping[str, Array], grads: Mapping[str, Array], state: Mapping[str, Any], lr: float
) -> tuple[dict[str, Array], dict[str, Any]]:
    """AdamW, torch's formula line by line (module docstring)."""
    beta1, beta2 = config.betas
    step = state["step"] + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    new_params, exp_avgs, exp_avg_sqs = {}, {}, {}
    for key, p in params.items():
        xp = namespace(p)
        g, m, v = grads[key], state["exp_avg"][key], state["exp_avg_sq"][key]
        if config.weight_decay != 0:
            p = p * (1 - lr * config.weight_decay)
        m = m + (1 - beta1) * (g - m)  # torch's lerp for a weight < 0.5
        v = v * beta2 + (1 - beta2) * g * g
        denom = xp.sqrt(v) / bias_correction2_sqrt + config.eps
        new_params[key] = p + (-step_size) * m / denom
        exp_avgs[key], exp_avg_sqs[key] = m, v
    return new_params, {"step": step, "exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}


def sgd_step(
    config: SGDConfig, params: Mapping[str, Array], grads: Mapping[str, Array], state: Mapping[str, Any], lr: float
) -> tuple[dict[str, Array], dict[str, Any]]:
    """SGD with optional coupled weight decay, momentum, dampening and Nesterov (module docstring)."""
    first = state["step"] == 0
    new_params, buffers = {}, {}
    for key, p in params.items():
        g = grads[key]
        if config.weight_decay != 0:
            g = g + config.weight_decay * p
        if config.momentum != 0:
            b = g if first else state["momentum_buffer"][key] * config.momentum + (1 - config.dampening) * g
            buffers[key] = b
            g = g + config.momentum * b if config.nesterov else b
        new_params[key] = p + (-lr) * g
    new_state: dict[str, Any] = {"step": state["step"] + 1}
    if config.momentum != 0:
        new_state["momentum_buffer"] = buffers
    return new_params, new_state


def clip_grad_norm(grads: Mapping[str, Array], max_norm: float) -> tuple[dict[str, Array], float]:
    """``torch.nn.utils.clip_grad_norm_(..., max_norm, norm_type=2)``: ``(clipped grads, total norm before)``.

    total = ‖(‖g_1‖₂, ‖g_2‖₂, ...)‖₂ over every gradient; each is multiplied by min(max_norm / (total + 1e-6), 1)
    (torch multiplies even when the factor is 1, which changes nothing).
    """
    if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
        raise OptimizerError(f"max_norm must be a positive number, got {max_norm!r}")
    if not grads:
        return {}, 0.0
    xp = namespace(*grads.values())
    norms = [xp.sqrt(xp.sum(g * g)) for g in grads.values()]  # per tensor, 0-d
    total = float(xp.sqrt(xp.sum(xp.stack(norms) ** 2)))
    coef = min(max_norm / (total + CLIP_EPS), 1.0)
    return {key: g * coef for key, g in grads.items()}, total


def _zeros_like(value: Array) -> Array:
    return namespace(value).zeros_like(value)


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OptimizerError(f"{name} must be a finite number >= 0, got {value!r}")
