"""LoRA's initialisations (reflora.lora_init) on both layouts, and against PEFT.

Random inits are checked statistically with a one-sample Kolmogorov–Smirnov test (implemented below: scipy is
not a dependency) against the law the docstring states, at significance α = 1e-3 per check with a fixed seed:
a correct init fails a given check with probability 1e-3 over seeds, and with the fixed seed the outcome is
deterministic. Each law is also checked to *reject* a nearby wrong law (power), so the test can fail.

Deterministic inits (PiSSA, OLoRA) are checked exactly through sign-free quantities: s·B A, the residual base
weight and "the output is unchanged at init". PEFT refuses float64 for both, so the PEFT comparison runs PEFT in
float32 against reflora in float64 on the same (float32-representable) weights, at float32 tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reflora as rf
from reflora.lora_init import init_adapter, init_lora_module, residual_base

ALPHA = 1e-3
TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=2, n_head=3, n_inner=10)


# ----------------------------------------------------------------------------------------------
# the Kolmogorov–Smirnov test
# ----------------------------------------------------------------------------------------------


def ks_statistic(samples: np.ndarray, cdf) -> float:
    """D = sup_x |F_n(x) − F(x)| of the samples' empirical CDF F_n against ``cdf``."""
    x = np.sort(np.ravel(samples))
    n = x.size
    f = cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def ks_p_value(d: float, n: int) -> float:
    """P(D ≥ d) under the null, from Kolmogorov's limit law with Stephens' small-n correction:
    λ = (√n + 0.12 + 0.11/√n)·d, Q(λ) = 2 Σ_{k≥1} (−1)^{k−1} exp(−2k²λ²) (Numerical Recipes ``probks``)."""
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def uniform_cdf(bound: float):
    return lambda x: np.clip((x + bound) / (2 * bound), 0.0, 1.0)


def normal_cdf(std: float):
    erf = np.vectorize(math.erf)
    return lambda x: 0.5 * (1.0 + erf(x / (std * math.sqrt(2.0))))


def ks_p(samples: np.ndarray, cdf) -> float:
    return ks_p_value(ks_statistic(samples, cdf), np.size(samples))


def test_ks_p_value_has_the_tabulated_critical_values():
    big = 10**8  # Stephens' correction vanishes: P(√n·D ≥ λ) → Q(λ)
    for lam, p in [(1.3581, 0.05), (1.6276, 0.01), (1.9495, 0.001)]:
        assert ks_p_value(lam / math.sqrt(big), big) == pytest.approx(p, rel=1e-3)


def test_ks_has_its_false_alarm_rate_and_power():
    rng = np.random.default_rng(0)
    trials, n, level = 400, 200, 0.05
    alarms = sum(ks_p(rng.uniform(-1, 1, n), uniform_cdf(1.0)) < level for _ in range(trials))
    assert 8 <= alarms <= 36  # Binomial(400, 0.05): mean 20, this range holds with probability > 0.999
    assert ks_p(rng.normal(0, 0.5, 2000), uniform_cdf(1.0)) < 1e-6
    assert ks_p(rng.uniform(-1.1, 1.1, 2000), uniform_cdf(1.0)) < 1e-3  # 10 % too wide is seen at n = 2000


# ----------------------------------------------------------------------------------------------
# random inits
# ----------------------------------------------------------------------------------------------

IN, OUT, R = 96, 80, 8


def draw(init, layout: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(IN, OUT) if layout == "conv1d" else (OUT, IN))
    return init_lora_module(init, weight, R, 2.0, np.random.default_rng(seed + 100), layout), weight


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_random_inits_follow_the_stated_laws(init, layout):
    (A, B, weight), original = draw(init, layout)
    assert A.shape == (R, IN) and B.shape == (OUT, R)
    assert weight is original  # random inits leave the base alone
    if init == "gaussian":
        assert ks_p(A, normal_cdf(1.0 / R)) > ALPHA
        assert ks_p(A, normal_cdf(1.0 / math.sqrt(R))) < 1e-6  # not the 1/√r some expect
    else:
        assert ks_p(A, uniform_cdf(1.0 / math.sqrt(IN))) > ALPHA
        assert ks_p(A, uniform_cdf(1.3 / math.sqrt(IN))) < ALPHA  # a 30 % wider law is rejected
    if init is False:
        assert ks_p(B, uniform_cdf(1.0 / math.sqrt(R))) > ALPHA
        assert ks_p(B, uniform_cdf(1.0 / math.sqrt(OUT))) < 1e-6
    else:
        np.testing.assert_array_equal(B, 0.0)


def test_random_draws_do_not_depend_on_the_layout():
    (a1, b1, _), _ = draw(False, "conv1d", seed=3)
    (a2, b2, _), _ = draw(False, "linear", seed=3)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)


@pytest.mark.torch
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_peft_draws_from_the_same_laws(init):
    """The laws stated in reflora.lora_init are PEFT's: its own draws pass the same tests."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(IN, OUT)

    torch.manual_seed(0)
    model = get_peft_model(
        Tiny(), LoraConfig(r=R, target_modules=["lin"], init_lora_weights=init, lora_bias=init is False)
    )
    layer = model.base_model.model.lin
    A, B = layer.lora_A.default.weight.detach().double().numpy(), layer.lora_B.default.weight.detach().double().numpy()
    if init == "gaussian":
        assert ks_p(A, normal_cdf(1.0 / R)) > ALPHA
    else:
        assert ks_p(A, uniform_cdf(1.0 / math.sqrt(IN))) > ALPHA
    if init is False:
        assert ks_p(B, uniform_cdf(1.0 / math.sqrt(R))) > ALPHA
        bias = layer.lora_B.default.bias.detach().double().numpy()
        assert ks_p(bias, uniform_cdf(1.0 / math.sqrt(R))) > ALPHA  # nn.Linear's bias law: U(±1/√fan_in)
    else:
        np.testing.assert_array_equal(B, 0.0)


# ----------------------------------------------------------------------------------------------
# PiSSA and OLoRA
# ----------------------------------------------------------------------------------------------


def principal(init: str, Wt: np.ndarray, r: int, s: float) -> np.ndarray:
    """s·B A, sign-free, from the definition: U_r S_r Vh_r (PiSSA) or s·Q_r R_r (OLoRA)."""
    if init == "pissa":
        U, S, Vh = np.linalg.svd(Wt, full_matrices=False)
        return (U[:, :r] * S[:r]) @ Vh[:r]
    Q, Rm = np.linalg.qr(Wt)
    return s * Q[:, :r] @ Rm[:r]


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_deterministic_inits_are_exact(init, layout, shape):
    rng = np.random.default_rng(4)
    d_in, d_out = shape
    r, s = 3, 0.7
    weight = rng.normal(size=(d_in, d_out) if layout == "conv1d" else (d_out, d_in))
    A, B, residual = init_lora_module(init, weight, r, s, layout=layout)
    Wt = weight.T if layout == "conv1d" else weight
    res_t = residual.T if layout == "conv1d" else residual
    assert A.shape == (r, d_in) and B.shape == (d_out, r) and residual.shape == weight.shape
    np.testing.assert_allclose(s * B @ A, principal(init, Wt, r, s), rtol=0, atol=1e-13)
    np.testing.assert_allclose(res_t, Wt - principal(init, Wt, r, s), rtol=0, atol=1e-13)
    x = rng.normal(size=(4, d_in))
    np.testing.assert_allclose(x @ res_t.T + s * (x @ A.T) @ B.T, x @ Wt.T, rtol=0, atol=1e-13)  # unchanged
    if init == "pissa":  # B A is the top-r part, split evenly: Aᵀ A-side and B-side carry the same singular values
        np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0), rtol=1e-12)
    else:
        np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-13)  # B = Q_r: orthonormal columns
        assert np.allclose(np.tril(A[:, :r], -1), 0.0)  # A = R_r: upper trapezoidal


def test_deterministic_inits_need_a_small_enough_rank():
    with pytest.raises(ValueError, match="r <= min"):
        init_lora_module("pissa", np.ones((3, 5)), 4, 1.0)
    with pytest.raises(ValueError, match="rng"):
        init_lora_module(True, np.ones((3, 5)), 2, 1.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_model_output_is_unchanged_at_init(init):
    rng = np.random.default_rng(5)
    params = rf.init_gpt2_params(TINY, rng)
    ids = rng.integers(0, TINY.vocab_size, size=(2, 5))
    base, _ = rf.gpt2_forward(params, TINY, ids)
    for lora in [
        rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=init),
        rf.LoraConfig(r=2, target_modules=["c_attn"], qkv_slices=["k", "v"], init_lora_weights=init),
        rf.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"], init_lora_weights=init, use_dora=True),
    ]:
        adapter, residual = init_adapter(params, TINY, lora)
        for key in params:
            changed = not np.array_equal(residual[key], params[key])
            assert changed == (key.endswith(".weight") and key.removesuffix(".weight") in rf.plan_lora(TINY, lora))
        for key, value in residual_base(params, TINY, lora).items():
            np.testing.assert_array_equal(value, residual[key])
        logits, _ = rf.gpt2_forward(residual, TINY, ids, adapter=adapter, lora=lora)
        np.testing.assert_allclose(logits, base, rtol=0, atol=1e-13)
        if lora.use_dora:  # m = ‖residual + s·B A‖ = ‖W‖ per output unit
            for name, module in rf.plan_lora(TINY, lora).items():
                norm = np.linalg.norm(params[f"{name}.weight"], axis=0)
                np.testing.assert_allclose(adapter[module.magnitude_key], norm, rtol=1e-13)


def test_lora_bias_inits():
    rng = np.random.default_rng(6)
    params = rf.init_gpt2_params(TINY, rng)
    lora = rf.LoraConfig(r=4, target_modules=["c_fc"], lora_bias=True)
    zeros, _ = init_adapter(params, TINY, lora, rng)
    drawn, _ = init_adapter(params, TINY, lora, rng, init=False)
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_B.bias"
    np.testing.assert_array_equal(zeros[key], 0.0)
    samples = np.concatenate([drawn[k] for k in drawn if k.endswith("lora_B.bias")])
    assert ks_p(samples, uniform_cdf(0.5)) > ALPHA


# ----------------------------------------------------------------------------------------------
# against PEFT (float32: PEFT refuses float64 for PiSSA and OLoRA)
# ----------------------------------------------------------------------------------------------


def _peft_layers(model, plan):
    modules = dict(model.named_modules())
    return {name: modules[f"base_model.model.{name}"] for name in plan}


@pytest.mark.torch
def test_pissa_matches_peft_on_gpt2():
    pytest.importorskip("peft")
    import warnings

    from peft import LoraConfig, get_peft_model

    from conformance.drivers.peft_bridge import build_hf_model

    rng = np.random.default_rng(7)
    params = {k: v.astype(np.float32) for k, v in rf.init_gpt2_params(TINY, rng).items()}
    lora = rf.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build_hf_model(TINY, params, "float32"), LoraConfig(**lora.to_peft_dict()))
    adapter, residual = init_adapter({k: v.astype(np.float64) for k, v in params.items()}, TINY, lora)
    plan = rf.plan_lora(TINY, lora)
    for name, layer in _peft_layers(model, plan).items():
        module = plan[name]
        (branch,) = module.branches
        theirs_ba = (
            module.scaling * (layer.lora_B.default.weight @ layer.lora_A.default.weight).detach().double().numpy()
        )
        ours_ba = module.scaling * adapter[branch.b_key] @ adapter[branch.a_key]
        np.testing.assert_allclose(theirs_ba, ours_ba, rtol=0, atol=2e-6, err_msg=name)
        theirs_res = layer.base_layer.weight.detach().double().numpy()
        np.testing.assert_allclose(theirs_res, residual[f"{name}.weight"], rtol=0, atol=2e-6, err_msg=name)


@pytest.mark.torch
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_linear_layout_matches_peft_on_nn_linear(init):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(7, 5)

    torch.manual_seed(1)
    model = Tiny()
    weight = model.lin.weight.detach().double().numpy().copy()  # (out, in), float32 values
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["lin"], init_lora_weights=init))
    layer = peft_model.base_model.model.lin
    A, B, residual = init_lora_module(init, weight, 2, 1.5, layout="linear")
    theirs = 1.5 * (layer.lora_B.default.weight @ layer.lora_A.default.weight).detach().double().numpy()
    np.testing.assert_allclose(theirs, 1.5 * B @ A, rtol=0, atol=2e-6)
    np.testing.assert_allclose(layer.base_layer.weight.detach().double().numpy(), residual, rtol=0, atol=2e-6)


@pytest.mark.torch
def test_documented_peft_deviation_olora_on_conv1d():
    """docs/advanced-semantics.md, PEFT deviation D1: PEFT's OLoRA factors the stored (in, out) Conv1D weight, so on
    GPT-2 the output changes at init (square c_proj) or the forward fails (c_attn). reflora's output is unchanged."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    if not peft.__version__.startswith("0.21."):
        pytest.skip(f"the deviation is documented for PEFT 0.21, found {peft.__version__}")
    import warnings

    from peft import LoraConfig, get_peft_model

    from conformance.drivers.peft_bridge import build_hf_model

    rng = np.random.default_rng(8)
    params = {k: v.astype(np.float32) for k, v in rf.init_gpt2_params(TINY, rng).items()}
    ids = rng.integers(0, TINY.vocab_size, size=(1, 4))
    base = build_hf_model(TINY, params, "float32").eval()
    with torch.no_grad():
        want = base(torch.from_numpy(ids)).logits.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        square = get_peft_model(
            build_hf_model(TINY, params, "float32"),
            LoraConfig(r=2, target_modules=["attn.c_proj"], init_lora_weights="olora"),
        ).eval()
        with torch.no_grad():
            got = square(torch.from_numpy(ids)).logits.numpy()
        assert np.max(np.abs(got - want)) > 1e-4  # PEFT: the output changed at init
        wide = get_peft_model(
            build_hf_model(TINY, params, "float32"),
            LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="olora"),
        ).eval()
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            wide(torch.from_numpy(ids))
    lora = rf.LoraConfig(r=2, target_modules=["attn.c_proj", "c_attn"], init_lora_weights="olora")
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    adapter, residual = init_adapter(p64, TINY, lora)
    ours, _ = rf.gpt2_forward(residual, TINY, ids, adapter=adapter, lora=lora)
    np.testing.assert_allclose(ours, rf.gpt2_forward(p64, TINY, ids)[0], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# orthogonal (PEFT's orthogonal_init)
# ----------------------------------------------------------------------------------------------


def test_orthogonal_init_structure():
    """B A = 0, rank A = rank B = r/2, 100‖A‖_F² = ‖G_A‖_F² (chi-square with in·r/2 degrees), odd r refused."""
    from reflora.lora_init import draw_lora_factors

    rng = np.random.default_rng(5)
    total_a, dof_a = 0.0, 0
    for _ in range(200):
        A, B = draw_lora_factors("orthogonal", 4, 9, 13, rng)
        assert A.shape == (4, 9) and B.shape == (13, 4)
        assert np.max(np.abs(B @ A)) <= 1e-14 * np.linalg.norm(A, 2) * np.linalg.norm(B, 2)
        sa, sb = np.linalg.svd(A, compute_uv=False), np.linalg.svd(B, compute_uv=False)
        assert sa[2] <= 1e-14 * sa[0] and sb[2] <= 1e-14 * sb[0] and sa[1] > 0 and sb[1] > 0
        total_a, dof_a = total_a + 100 * np.sum(A * A), dof_a + 9 * 2
    assert abs(total_a - dof_a) / math.sqrt(2 * dof_a) < 3.29
    with pytest.raises(ValueError, match="even"):
        draw_lora_factors("orthogonal", 3, 9, 13, rng)
    with pytest.raises(rf.ConfigError, match="even"):
        rf.LoraConfig(r=2, init_lora_weights="orthogonal", rank_pattern={"c_fc": 3})


def test_orthogonal_output_is_unchanged_at_init():
    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    lora = rf.LoraConfig(r=4, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="orthogonal")
    adapter, new_params = init_adapter(params, TINY, lora, np.random.default_rng(1))
    ids = np.array([[1, 2, 3, 4]])
    base = rf.gpt2_forward(params, TINY, ids)[0]
    np.testing.assert_allclose(rf.gpt2_forward(new_params, TINY, ids, adapter=adapter, lora=lora)[0], base,
                               rtol=0, atol=1e-13)  # fmt: skip


class _Replay:
    """A stand-in for numpy's Generator that hands back recorded N(0, 1) draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)

    def standard_normal(self, shape):
        draw = self.draws.pop(0)
        assert draw.shape == tuple(shape)
        return draw


@pytest.mark.torch
def test_orthogonal_matches_peft_given_its_draws(monkeypatch):
    """PEFT's own torch.randn draws (X, G_A, G_B, recorded) replayed through reflora's formula give PEFT's A and B
    to float32 rounding: the formula in reflora.lora_init is PEFT's."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from reflora.lora_init import draw_lora_factors

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(IN, OUT)

    recorded, randn = [], torch.randn

    def recording(*args, **kwargs):
        out = randn(*args, **kwargs)
        recorded.append(out.detach().double().numpy().copy())
        return out

    torch.manual_seed(0)
    monkeypatch.setattr(torch, "randn", recording)
    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["lin"], init_lora_weights="orthogonal"))
    monkeypatch.setattr(torch, "randn", randn)
    layer = model.base_model.model.lin
    A, B = layer.lora_A.default.weight.detach().double().numpy(), layer.lora_B.default.weight.detach().double().numpy()
    assert [d.shape for d in recorded] == [(4, 4), (IN, 2), (2, OUT)]
    ours_A, ours_B = draw_lora_factors("orthogonal", 4, IN, OUT, _Replay(recorded))
    np.testing.assert_allclose(ours_A, A, rtol=0, atol=1e-6 * np.max(np.abs(A)))
    np.testing.assert_allclose(ours_B, B, rtol=0, atol=1e-6 * np.max(np.abs(B)))


# ----------------------------------------------------------------------------------------------
# pissa_niter_K (randomised PiSSA: PEFT's torch.svd_lowrank)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
@pytest.mark.parametrize("niter", [0, 2])
def test_pissa_niter_is_a_projection_and_keeps_the_output(shape, niter):
    """residual + s·B A = Wt exactly, rank r, the residual orthogonal to the adapter's range (tall) or row space
    (wide); many power iterations converge to exact PiSSA on a matrix with a spectral gap."""
    W = np.random.default_rng(3).standard_normal(shape)
    A, B, residual = init_lora_module(f"pissa_niter_{niter}", W, 2, 1.5, np.random.default_rng(niter), "linear")
    sba = 1.5 * B @ A
    np.testing.assert_allclose(residual + sba, W, rtol=0, atol=1e-14)
    assert np.linalg.matrix_rank(sba) == 2
    cross = sba.T @ residual if shape[0] >= shape[1] else residual @ sba.T
    assert np.max(np.abs(cross)) <= 1e-13
    # Eckart–Young: never better than exact PiSSA
    exact = init_lora_module("pissa", W, 2, 1.5, None, "linear").weight
    assert np.linalg.norm(residual) >= np.linalg.norm(exact) * (1 - 1e-12)


def test_pissa_niter_converges_to_pissa():
    U, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((9, 6)))
    V, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 6)))
    W = U @ np.diag([5.0, 4.0, 1.0, 0.5, 0.2, 0.1]) @ V.T  # gap σ_3/σ_2 = 1/4
    exact = init_lora_module("pissa", W, 2, 2.0, None, "linear").weight
    for niter, tol in ((5, 1e-4), (20, 1e-12)):  # subspace error ~ (σ_3/σ_2)^(2·niter+1) = 4^-11, 4^-41
        got = init_lora_module(f"pissa_niter_{niter}", W, 2, 2.0, np.random.default_rng(7), "linear").weight
        assert np.max(np.abs(got - exact)) <= tol


def test_pissa_niter_refusals():
    with pytest.raises(ValueError, match="rng"):
        init_lora_module("pissa_niter_1", np.ones((4, 3)), 2, 1.0, None, "linear")
    with pytest.raises(ValueError, match="random"):
        residual_base({}, TINY, rf.LoraConfig(r=2, init_lora_weights="pissa_niter_2"))
    with pytest.raises(rf.ConfigError, match="init_lora_weights"):
        rf.LoraConfig(r=2, init_lora_weights="pissa_niter_x")


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(IN, OUT), (OUT, IN)])
def test_pissa_niter_matches_peft_given_its_draws(monkeypatch, shape):
    """PEFT's svd_lowrank draw (torch.randn, recorded) replayed through reflora.lora_init.randomized_svd gives
    PEFT's s·B A and residual to float32 rounding (PEFT runs PiSSA in float32)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    in_f, out_f = shape

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(in_f, out_f)

    torch.manual_seed(0)
    tiny = Tiny()
    W = tiny.lin.weight.detach().double().numpy().copy()  # (out, in)
    recorded, randn = [], torch.randn

    def recording(*args, **kwargs):
        out = randn(*args, **kwargs)
        recorded.append(out.detach().double().numpy().copy())
        return out

    monkeypatch.setattr(torch, "randn", recording)
    model = get_peft_model(
        tiny, LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], init_lora_weights="pissa_niter_2")
    )
    monkeypatch.setattr(torch, "randn", randn)
    layer = model.base_model.model.lin
    A, B = layer.lora_A.default.weight.detach().double().numpy(), layer.lora_B.default.weight.detach().double().numpy()
    residual = layer.base_layer.weight.detach().double().numpy()
    assert [d.shape for d in recorded] == [(min(in_f, out_f), 4)]

    class Replay:
        def standard_normal(self, size):
            assert tuple(size) == recorded[0].shape
            return recorded[0]

    ours = init_lora_module("pissa_niter_2", W, 4, 1.5, Replay(), "linear")
    scale = np.max(np.abs(W))
    np.testing.assert_allclose(1.5 * ours.B @ ours.A, 1.5 * B @ A, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(ours.weight, residual, rtol=0, atol=1e-5 * scale)
