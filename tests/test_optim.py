"""reflora.optim against torch.optim, step for step, in float64.

The hand-written AdamW, SGD and clipping follow torch's single-tensor code line by line; torch's CPU kernels fuse
some multiply-adds (``lerp``, ``add(alpha=)``) that NumPy cannot, so the two may differ in the last bit of an
update. Every comparison is per tensor, max|reflora − torch| ≤ 1e-15 · max|torch|: measured 1.1e-16 after 20
AdamW steps with gradients spanning 1e-8 to 10, so a wrong formula (eps inside the square root, weight decay after
the update, a missing bias correction) shows by orders of magnitude.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from reflora.optim import (
    AdamWConfig,
    OptimizerError,
    SGDConfig,
    clip_grad_norm,
    init_optimizer_state,
    optimizer_config_from_dict,
    optimizer_config_to_dict,
    optimizer_state_from_tensors,
    optimizer_state_tensors,
    optimizer_step,
)

RTOL = 1e-15
SHAPES = {"w": (5, 7), "b": (3,), "t": (4, 2, 3)}


def random_grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gradients whose scale varies from tensor to tensor and step to step (1e-8 ... 10)."""
    return {k: rng.standard_normal(s) * 10.0 ** rng.integers(-8, 2) for k, s in SHAPES.items()}


def assert_close(ours: dict, theirs: dict, what: str) -> None:
    for key, value in theirs.items():
        scale = max(float(np.max(np.abs(value))), 1e-300)
        error = float(np.max(np.abs(ours[key] - value)))
        assert error <= RTOL * scale, f"{what}[{key}]: max|reflora − torch| = {error:.3e} > {RTOL:.0e} · {scale:.3e}"


def run_against_torch(config, make_torch_optimizer, steps: int = 12, lr_schedule=None, seed: int = 0) -> None:
    """Apply the same gradients to reflora's and torch's optimizer for ``steps`` steps; compare every step."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    live = {k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    torch_opt = make_torch_optimizer(torch, list(live.values()))
    state = init_optimizer_state(config, params)
    for step in range(steps):
        grads = random_grads(rng)
        lr = None if lr_schedule is None else lr_schedule(step)
        if lr is not None:
            torch_opt.param_groups[0]["lr"] = lr
        for key, p in live.items():
            p.grad = torch.tensor(grads[key])
        torch_opt.step()
        params, state = optimizer_step(config, params, grads, state, lr)
        assert state["step"] == step + 1
        assert_close(params, {k: p.detach().numpy() for k, p in live.items()}, f"params after step {step + 1}")
        for buffer in [b for b in state if b != "step"]:
            theirs = {k: torch_opt.state[p][buffer].numpy() for k, p in live.items()}
            assert_close(state[buffer], theirs, f"{buffer} after step {step + 1}")


@pytest.mark.torch
def test_adamw_matches_torch_step_for_step():
    config = AdamWConfig(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    run_against_torch(
        config,
        lambda torch, p: torch.optim.AdamW(
            p, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        ),
        steps=20,
    )


@pytest.mark.torch
def test_adamw_with_a_changing_lr_matches_torch():
    """A schedule sets the lr per step (``param_group["lr"]`` in torch); weight decay uses that step's lr too."""
    config = AdamWConfig(lr=1e-2, weight_decay=0.3)
    run_against_torch(
        config, lambda torch, p: torch.optim.AdamW(p, lr=config.lr, weight_decay=config.weight_decay),
        lr_schedule=lambda step: 1e-2 * (0.5 + 0.5 * np.cos(step / 3)), seed=1,
    )  # fmt: skip


@pytest.mark.torch
def test_adamw_defaults_are_torchs():
    import torch

    defaults = {name: p.default for name, p in inspect.signature(torch.optim.AdamW.__init__).parameters.items()}
    ours = AdamWConfig()
    assert (ours.lr, ours.betas, ours.eps, ours.weight_decay) == (
        defaults["lr"], tuple(defaults["betas"]), defaults["eps"], defaults["weight_decay"],
    )  # fmt: skip


@pytest.mark.torch
@pytest.mark.parametrize(
    "config",
    [
        SGDConfig(lr=0.1),
        SGDConfig(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        SGDConfig(lr=0.05, momentum=0.8, weight_decay=0.02, nesterov=True),
    ],
    ids=["plain", "momentum-dampening-decay", "nesterov"],
)
def test_sgd_matches_torch_step_for_step(config):
    run_against_torch(
        config,
        lambda torch, p: torch.optim.SGD(p, lr=config.lr, momentum=config.momentum, dampening=config.dampening,
                                         weight_decay=config.weight_decay, nesterov=config.nesterov),
    )  # fmt: skip


@pytest.mark.torch
@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipping", "below-the-limit"])
def test_clip_grad_norm_matches_torch(max_norm):
    import torch

    grads = random_grads(np.random.default_rng(2))
    live = {k: torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for k, g in grads.items()}
    for key, p in live.items():
        p.grad = torch.tensor(grads[key])
    total_torch = torch.nn.utils.clip_grad_norm_(list(live.values()), max_norm).item()
    clipped, total = clip_grad_norm(grads, max_norm)
    assert abs(total - total_torch) <= RTOL * total_torch
    assert_close(clipped, {k: p.grad.numpy() for k, p in live.items()}, "clipped grads")
    if max_norm > total:
        assert all(np.array_equal(clipped[k], grads[k]) for k in grads)


def test_first_adamw_step_is_the_normalised_gradient():
    """At step 1, m̂ = g and √v̂ = |g|, so p₁ = p₀·(1 − lr·λ) − lr · g / (|g| + ε): a check that needs no torch."""
    config = AdamWConfig(lr=0.01, eps=1e-3, weight_decay=0.5)
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = random_grads(rng)
    new, _ = optimizer_step(config, params, grads, init_optimizer_state(config, params))
    for key in params:
        expected = params[key] * (1 - 0.01 * 0.5) - 0.01 * grads[key] / (np.abs(grads[key]) + 1e-3)
        np.testing.assert_allclose(new[key], expected, rtol=1e-14, atol=1e-17)


def test_inputs_are_not_modified():
    config = AdamWConfig(weight_decay=0.1)
    params = {"w": np.ones((2, 3))}
    grads = {"w": np.full((2, 3), 0.5)}
    state = init_optimizer_state(config, params)
    optimizer_step(config, params, grads, state)
    assert np.array_equal(params["w"], np.ones((2, 3))) and state["step"] == 0
    assert np.array_equal(state["exp_avg"]["w"], np.zeros((2, 3)))


@pytest.mark.parametrize(
    "config", [AdamWConfig(), SGDConfig(momentum=0.9), SGDConfig()], ids=["adamw", "sgd-momentum", "sgd"]
)
def test_state_round_trips_through_tensors(config):
    rng = np.random.default_rng(4)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    state = init_optimizer_state(config, params)
    for _ in range(2):
        params, state = optimizer_step(config, params, random_grads(rng), state)
    restored = optimizer_state_from_tensors(config, state["step"], optimizer_state_tensors(state), params)
    assert restored.keys() == state.keys()
    for buffer in state:
        if buffer != "step":
            assert all(np.array_equal(restored[buffer][k], state[buffer][k]) for k in params)
    assert optimizer_config_from_dict(optimizer_config_to_dict(config)) == config


def test_state_that_does_not_match_the_parameters_is_an_error():
    config = AdamWConfig()
    params = {"w": np.zeros((2, 2))}
    tensors = optimizer_state_tensors(init_optimizer_state(config, params))
    with pytest.raises(OptimizerError, match="missing"):
        optimizer_state_from_tensors(config, 1, {"exp_avg/w": tensors["exp_avg/w"]}, params)
    with pytest.raises(OptimizerError, match=r"exp_avg_sq/w is \(3,\)"):
        optimizer_state_from_tensors(config, 1, {**tensors, "exp_avg_sq/w": np.zeros(3)}, params)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: AdamWConfig(lr=-1.0), "adamw.lr"),
        (lambda: AdamWConfig(betas=(0.9, 1.0)), "adamw.betas"),
        (lambda: AdamWConfig(eps=float("nan")), "adamw.eps"),
        (lambda: SGDConfig(momentum=-0.1), "sgd.momentum"),
        (lambda: SGDConfig(nesterov=True), "sgd.nesterov"),
        (lambda: optimizer_config_from_dict({"name": "adam"}), "optimizer.name"),
        (lambda: clip_grad_norm({"w": np.ones(2)}, 0.0), "max_norm"),
        (lambda: optimizer_step(AdamWConfig(), {"w": np.ones(2)}, {"v": np.ones(2)}, {"step": 0}), "grads"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(OptimizerError, match=field):
        make()
