"""Weighted combinations (reflora.weighted.add_weighted_adapter): cat, linear and svd, against their closed
forms and against PEFT 0.21 in float64. ΔW is compared in the (out, in) form, per module and branch."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reflora as rf
from reflora.lora_init import init_adapter
from reflora.weighted import add_weighted_adapter

TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=2, n_head=3, n_inner=10)


def sources(rslora: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = rf.init_gpt2_params(TINY, rng)
    configs = {
        "a": rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], use_rslora=rslora),
        "b": rf.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "attn.c_proj"], use_rslora=rslora),
        "c": rf.LoraConfig(
            r=3, lora_alpha=2, target_modules=["c_attn"], use_rslora=rslora, rank_pattern={"h.1.attn.c_attn": 1}
        ),
    }
    adapters = {name: (lora, init_adapter(params, TINY, lora, rng, init="test")[0]) for name, lora in configs.items()}
    return params, adapters


def deltas(lora: rf.LoraConfig, tensors: dict) -> dict[str, np.ndarray]:
    """{module: s·B A (out, in)} for full-width adapters."""
    out = {}
    for name, module in rf.plan_lora(TINY, lora).items():
        (branch,) = module.branches
        out[name] = module.scaling * tensors[branch.b_key] @ tensors[branch.a_key]
    return out


def weighted_sum(adapters, names, weights) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for name, w in zip(names, weights):
        for module, delta in deltas(*adapters[name]).items():
            total[module] = total.get(module, 0.0) + w * delta
    return total


@pytest.mark.parametrize("rslora", [False, True])
def test_cat_is_exactly_the_weighted_sum_and_scaling_is_one(rslora):
    _, adapters = sources(rslora)
    names, weights = ["a", "b", "c"], [0.7, -1.3, 2.0]
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, "cat")
    assert lora.r == 2 + 2 + 3 and lora.use_rslora == rslora
    assert all(m.scaling == 1.0 for m in rf.plan_lora(TINY, lora).values())
    got, want = deltas(lora, tensors), weighted_sum(adapters, names, weights)
    assert set(got) == set(want)
    for module in want:
        np.testing.assert_allclose(got[module], want[module], rtol=0, atol=1e-15, err_msg=module)


def test_linear_is_peft_formula_with_its_cross_terms():
    _, adapters = sources()
    names, weights = ["a", "b"], [0.7, -1.3]
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, "linear")
    assert lora.r == 2
    got, exact = deltas(lora, tensors), weighted_sum(adapters, names, weights)
    module = "transformer.h.0.attn.c_attn"  # targeted by both
    factors = []
    for name, w in zip(names, weights):
        src_lora, t = adapters[name]
        m = rf.plan_lora(TINY, src_lora)[module]
        ws = w * m.scaling
        factors.append(
            (math.copysign(math.sqrt(abs(ws)), ws), math.sqrt(abs(ws)), t[m.branches[0].a_key], t[m.branches[0].b_key])
        )
    expected = sum(fb * b for _, fb, _, b in factors) @ sum(fa * a for fa, _, a, _ in factors)
    cross = sum(
        fb_i * fa_j * b_i @ a_j
        for i, (_, fb_i, _, b_i) in enumerate(factors)
        for j, (fa_j, _, a_j, _) in enumerate(factors)
        if i != j
    )
    np.testing.assert_allclose(got[module], expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got[module], exact[module] + cross, rtol=0, atol=1e-14)
    assert np.max(np.abs(got[module] - exact[module])) > 1e-2  # the cross terms are not small
    np.testing.assert_allclose(
        got["transformer.h.0.mlp.c_fc"], exact["transformer.h.0.mlp.c_fc"], atol=1e-15
    )  # one source


def test_svd_is_the_best_rank_k_approximation():
    _, adapters = sources(seed=1)
    names, weights = ["a", "b", "c"], [1.0, 0.5, -0.25]
    exact = weighted_sum(adapters, names, weights)
    full, t_full = add_weighted_adapter(TINY, adapters, names, weights, "svd", svd_rank=7)
    for module, delta in deltas(full, t_full).items():  # rank ≤ 7 = Σ r_i: exact
        np.testing.assert_allclose(delta, exact[module], rtol=0, atol=1e-14)
    low, t_low = add_weighted_adapter(TINY, adapters, names, weights, "svd", svd_rank=2)
    assert low.r == 2
    for module, delta in deltas(low, t_low).items():
        sigma = np.linalg.svd(exact[module], compute_uv=False)
        assert np.linalg.norm(delta - exact[module]) == pytest.approx(np.sqrt(np.sum(sigma[2:] ** 2)), rel=1e-10)


def test_one_source_is_exact_whatever_the_type():
    _, adapters = sources()
    for kind in ("cat", "linear", "svd"):
        lora, tensors = add_weighted_adapter(TINY, adapters, ["b"], [-0.6], kind)
        assert lora.r == 2  # PEFT: one source is always combined linearly
        for module, delta in deltas(lora, tensors).items():
            np.testing.assert_allclose(delta, -0.6 * deltas(*adapters["b"])[module], atol=1e-15)


def test_cat_with_unit_weights_equals_the_adapters_active_together():
    params, adapters = sources(seed=2)
    ids = np.random.default_rng(3).integers(0, TINY.vocab_size, size=(2, 5))
    lora, tensors = add_weighted_adapter(TINY, adapters, ["a", "b", "c"], [1.0, 1.0, 1.0], "cat")
    together, _ = rf.gpt2_forward(params, TINY, ids, adapters=adapters)
    combined, _ = rf.gpt2_forward(params, TINY, ids, adapter=tensors, lora=lora)
    np.testing.assert_allclose(combined, together, rtol=0, atol=1e-13)


def test_lora_bias_combines_exactly():
    rng = np.random.default_rng(4)
    params = rf.init_gpt2_params(TINY, rng)
    biased = rf.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], lora_bias=True)
    plain = rf.LoraConfig(r=2, lora_alpha=2, target_modules=["c_fc"])
    adapters = {
        "x": (biased, init_adapter(params, TINY, biased, rng, init="test")[0]),
        "y": (plain, init_adapter(params, TINY, plain, rng, init="test")[0]),
    }
    for kind in ("cat", "linear", "svd"):
        lora, tensors = add_weighted_adapter(TINY, adapters, ["x", "y"], [0.5, 2.0], kind)
        assert lora.lora_bias
        key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.bias"
        np.testing.assert_allclose(tensors[key], 0.5 * 2.0 * adapters["x"][1][key], rtol=1e-15)


def test_targets_are_the_union_and_layers_to_transform_is_respected():
    rng = np.random.default_rng(5)
    params = rf.init_gpt2_params(TINY, rng)
    first = rf.LoraConfig(r=1, target_modules=["c_attn"], layers_to_transform=[0])
    second = rf.LoraConfig(r=1, target_modules=["c_fc"], layers_to_transform=[1])
    adapters = {n: (c, init_adapter(params, TINY, c, rng, init="test")[0]) for n, c in (("p", first), ("q", second))}
    lora, tensors = add_weighted_adapter(TINY, adapters, ["p", "q"], [1.0, 1.0], "cat")
    assert set(rf.plan_lora(TINY, lora)) == {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"}
    assert set(tensors) == set(rf.adapter_shapes(rf.plan_lora(TINY, lora)))


def test_refusals():
    params, adapters = sources()
    with pytest.raises(ValueError, match="keep_masks"):
        add_weighted_adapter(TINY, adapters, ["a", "b"], [1, 1], "dare_ties", density=0.5)
    with pytest.raises(ValueError, match="density > 0"):
        add_weighted_adapter(TINY, adapters, ["a", "b"], [1, 1], "dare_linear", density=0.0)
    with pytest.raises(ValueError, match="density"):
        add_weighted_adapter(TINY, adapters, ["a", "b"], [1, 1], "ties")
    with pytest.raises(ValueError, match="equal ranks"):
        add_weighted_adapter(TINY, adapters, ["a", "c"], [1, 1], "linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        add_weighted_adapter(TINY, adapters, ["a", "b"], [1], "cat")
    dora = rf.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True)
    adapters["d"] = (dora, init_adapter(params, TINY, dora, np.random.default_rng(0), init="test")[0])
    with pytest.raises(ValueError, match="DoRA"):
        add_weighted_adapter(TINY, adapters, ["a", "d"], [1, 1], "cat")
    tokens = rf.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[1, 3])
    adapters["t"] = (tokens, init_adapter(params, TINY, tokens, np.random.default_rng(0), init="test")[0])
    for names in (["a", "t"], ["t"]):  # PEFT's rows are not a low-rank delta (the first's indices would be kept)
        with pytest.raises(ValueError, match=r"\['t'\] use trainable_token_indices"):
            add_weighted_adapter(TINY, adapters, names, [1.0] * len(names), "cat")


@pytest.mark.parametrize("kind", ["dare_ties", "dare_linear_svd"])
def test_dare_mask_shapes_refuses_different_qkv_slices(kind):
    """The first source with more c_attn branches than the second: a clear ValueError, not an IndexError."""
    from reflora.weighted import dare_mask_shapes

    qkv = rf.LoraConfig(r=2, target_modules=["c_attn"], qkv_slices=["q", "k", "v"])
    plain = rf.LoraConfig(r=2, target_modules=["c_attn"])
    for pair in ((qkv, plain), (plain, qkv)):
        with pytest.raises(ValueError, match="different qkv_slices"):
            dare_mask_shapes(TINY, pair, kind)


# ----------------------------------------------------------------------------------------------
# against PEFT
# ----------------------------------------------------------------------------------------------


def peft_combination(adapters, names, weights, kind, svd_rank=None):
    import torch

    from conformance.drivers.peft_bridge import build_peft_adapters

    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    model = build_peft_adapters(TINY, params, {n: adapters[n] for n in names})
    model.add_weighted_adapter(names, weights, "new", combination_type=kind, svd_rank=svd_rank)
    out = {}
    for name, module in dict(model.named_modules()).items():
        if hasattr(module, "lora_A") and "new" in module.lora_A:
            with torch.no_grad():
                out[name.removeprefix("base_model.model.")] = (
                    module.get_delta_weight("new").T.numpy(),  # (out, in)
                    module.scaling["new"],
                )
    return out


# Weights whose PEFT coefficients are exact in float32: PEFT rounds the coefficients of linear (√|w·s|) and svd
# (w) to float32 (``torch.tensor(list of floats)``), see test_documented_peft_deviation_float32_coefficients.
EXACT_WEIGHTS = {"cat": [0.8, -0.6], "linear": [1.5, -0.1], "svd": [0.75, -0.5]}  # s_a = 3/2, s_b = 5/2


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["cat", "linear", "svd"])
def test_matches_peft_without_rslora(kind):
    pytest.importorskip("peft")
    _, adapters = sources(seed=6)
    names, weights = ["a", "b"], EXACT_WEIGHTS[kind]
    svd_rank = 3 if kind == "svd" else None
    theirs = peft_combination(adapters, names, weights, kind, svd_rank)
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, kind, svd_rank)
    ours = deltas(lora, tensors)
    assert set(theirs) == set(ours)
    for module, (delta, scaling) in theirs.items():
        assert scaling == 1.0
        np.testing.assert_allclose(ours[module], delta, rtol=0, atol=1e-14, err_msg=module)


@pytest.mark.torch
def test_documented_peft_deviation_float32_coefficients():
    """docs/advanced-semantics.md, PEFT deviation D6: PEFT builds the linear/svd coefficients with
    ``torch.tensor([...])``, i.e. in float32, so a float64 combination is off by up to ~6e-8 relative."""
    peft = pytest.importorskip("peft")
    if not peft.__version__.startswith("0.21."):
        pytest.skip(f"the deviation is documented for PEFT 0.21, found {peft.__version__}")
    _, adapters = sources(seed=6)
    theirs = peft_combination(adapters, ["a"], [0.8], "linear")  # √(0.8 · 1.5) is not a float32
    exact = weighted_sum(adapters, ["a"], [0.8])
    worst = max(np.max(np.abs(delta - exact[m])) / np.max(np.abs(exact[m])) for m, (delta, _) in theirs.items())
    assert 1e-9 < worst < 2e-7


@pytest.mark.torch
def test_documented_peft_deviation_rslora_scaling():
    """docs/advanced-semantics.md, PEFT deviation D2: under use_rslora PEFT's combined adapter has scaling
    r_new/√r_new = √r_new instead of 1, so its ΔW is √r_new times Σ w_i ΔW_i."""
    peft = pytest.importorskip("peft")
    if not peft.__version__.startswith("0.21."):
        pytest.skip(f"the deviation is documented for PEFT 0.21, found {peft.__version__}")
    _, adapters = sources(rslora=True, seed=7)
    theirs = peft_combination(adapters, ["a", "b"], [1.0, 1.0], "cat")
    exact = weighted_sum(adapters, ["a", "b"], [1.0, 1.0])
    for module, (delta, scaling) in theirs.items():
        assert scaling == pytest.approx(2.0)  # √(r_a + r_b) = √4
        np.testing.assert_allclose(delta, 2.0 * exact[module], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# ties / magnitude_prune (and their *_svd forms): PEFT's merge_utils on A_i, B_i (or on s_i B_i A_i)
# ----------------------------------------------------------------------------------------------


def test_magnitude_mask_keeps_the_largest_entries():
    from reflora.weighted import magnitude_mask

    t = np.array([[0.1, -3.0, 2.0], [-0.5, 0.0, 1.0]])
    np.testing.assert_array_equal(magnitude_mask(t, 0.5), [[0, 1, 1], [0, 0, 1]])  # k = ⌊0.5 · 6⌋ = 3
    np.testing.assert_array_equal(magnitude_mask(t, 0.0), np.zeros_like(t))
    np.testing.assert_array_equal(magnitude_mask(t, 1.0), np.ones_like(t))


def test_ties_closed_form_on_one_module():
    """A = Σ_i c_i P_i K_i / max(1, Σ K_i) with c_i = σ_i √|w_i s_i|, the sign elected from the unweighted P_i."""
    _, adapters = sources(seed=3)
    names, weights, density = ["a", "b"], [0.7, -1.3], 0.5
    from reflora.weighted import magnitude_mask

    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, "ties", density=density)
    module = "transformer.h.0.attn.c_attn"
    new = rf.plan_lora(TINY, lora)[module].branches[0]
    tasks, coeffs = [], []
    for name, w in zip(names, weights):
        m = rf.plan_lora(TINY, adapters[name][0])[module]
        a = adapters[name][1][m.branches[0].a_key]
        tasks.append(a * magnitude_mask(a, density))
        coeffs.append(math.copysign(math.sqrt(abs(w * m.scaling)), w * m.scaling))
    total = tasks[0] + tasks[1]
    sign = np.where(total >= 0, 1.0, -1.0)
    keep = [np.sign(t) == sign for t in tasks]
    want = (coeffs[0] * tasks[0] * keep[0] + coeffs[1] * tasks[1] * keep[1]) / np.maximum(keep[0] + 1.0 * keep[1], 1)
    np.testing.assert_allclose(tensors[new.a_key], want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd"])
def test_density_one_is_linear_or_svd(kind):
    """density ≥ 1 prunes nothing: magnitude_prune is then linear (and *_svd is svd); ties with one agreeing
    source per entry too, so only magnitude_prune is compared to linear exactly."""
    _, adapters = sources(seed=4)
    names, weights = ["a", "b"], [0.7, -1.3]
    base = "svd" if kind.endswith("svd") else "linear"
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, kind, 3 if base == "svd" else None, 1.0)
    ref_lora, ref = add_weighted_adapter(TINY, adapters, names, weights, base, 3 if base == "svd" else None)
    if kind.startswith("magnitude_prune"):
        got, want = deltas(lora, tensors), deltas(ref_lora, ref)
        for module in want:
            np.testing.assert_allclose(got[module], want[module], rtol=0, atol=1e-13, err_msg=module)


def peft_pruned(adapters, names, weights, kind, svd_rank, density, method):
    import torch

    from conformance.drivers.peft_bridge import build_peft_adapters

    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    model = build_peft_adapters(TINY, params, {n: adapters[n] for n in names})
    model.add_weighted_adapter(names, weights, "new", combination_type=kind, svd_rank=svd_rank, density=density,
                               majority_sign_method=method)  # fmt: skip
    out = {}
    for name, module in dict(model.named_modules()).items():
        if hasattr(module, "lora_A") and "new" in module.lora_A:
            with torch.no_grad():
                out[name.removeprefix("base_model.model.")] = module.get_delta_weight("new").T.numpy()
    return out


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("kind", ["ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_pruned_types_match_peft(kind, density, method):
    pytest.importorskip("peft")
    _, adapters = sources(seed=6)
    names = ["a", "b"]
    svd = kind.endswith("svd")
    weights, svd_rank = (EXACT_WEIGHTS["svd"], 3) if svd else (EXACT_WEIGHTS["linear"], None)
    theirs = peft_pruned(adapters, names, weights, kind, svd_rank, density, method)
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, kind, svd_rank, density, method)
    ours = deltas(lora, tensors)
    assert set(theirs) == set(ours)
    for module, delta in theirs.items():
        np.testing.assert_allclose(ours[module], delta, rtol=0, atol=1e-13, err_msg=module)


# ----------------------------------------------------------------------------------------------
# DARE (dare_linear, dare_ties and their *_svd forms): random pruning with injected keep-masks
# ----------------------------------------------------------------------------------------------

DARE_NAMES = {"dare_linear": ["a", "b"], "dare_ties": ["a", "b"], "dare_linear_svd": ["a", "b", "c"],
              "dare_ties_svd": ["a", "b", "c"]}  # fmt: skip


def dare_inputs(kind: str, density: float, seed: int = 6):
    from reflora.weighted import dare_mask_shapes, draw_dare_masks

    _, adapters = sources(seed=seed)
    names = DARE_NAMES[kind]
    shapes = dare_mask_shapes(TINY, [adapters[n][0] for n in names], kind)
    return adapters, names, draw_dare_masks(shapes, density, np.random.default_rng(seed + 1))


def test_dare_mask_shapes_follow_model_order_and_a_then_b():
    from reflora.weighted import dare_mask_shapes

    _, adapters = sources()
    shapes = dare_mask_shapes(TINY, [adapters["a"][0], adapters["b"][0]], "dare_ties")
    keys = list(shapes)
    assert keys[:2] == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
                        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]  # fmt: skip
    assert shapes[keys[0]] == [(2, 6), (2, 6)] and shapes[keys[1]] == [(18, 2), (18, 2)]  # a and b both
    assert shapes["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] == [(2, 6)]  # a alone
    svd = dare_mask_shapes(TINY, [adapters["a"][0], adapters["c"][0]], "dare_linear_svd")
    assert svd["transformer.h.1.attn.c_attn.delta"] == [(18, 6), (18, 6)]
    assert dare_mask_shapes(TINY, [adapters["a"][0]], "dare_ties") == {}  # one source: linear


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_closed_form_on_one_module(kind):
    """A = Σ c_i (A_i ⊙ M_i / density) (dare_linear), or ties' elected sign and disjoint mean on those."""
    adapters, names, masks = dare_inputs(kind, 0.5)
    weights = [0.7, -1.3]
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, kind, density=0.5, keep_masks=masks)
    module = "transformer.h.0.attn.c_attn"
    key = rf.plan_lora(TINY, lora)[module].branches[0].a_key
    tasks, coeffs = [], []
    for name, w, mask in zip(names, weights, masks[key]):
        m = rf.plan_lora(TINY, adapters[name][0])[module]
        tasks.append(adapters[name][1][key] * mask / 0.5)
        coeffs.append(math.copysign(math.sqrt(abs(w * m.scaling)), w * m.scaling))
    if kind == "dare_linear":
        want = coeffs[0] * tasks[0] + coeffs[1] * tasks[1]
    else:
        sign = np.where(tasks[0] + tasks[1] >= 0, 1.0, -1.0)
        keep = [np.sign(t) == sign for t in tasks]
        want = (coeffs[0] * tasks[0] * keep[0] + coeffs[1] * tasks[1] * keep[1]) / np.maximum(
            keep[0] + 1.0 * keep[1], 1
        )
    np.testing.assert_allclose(tensors[key], want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_density_one_and_all_kept_masks(kind):
    """density ≥ 1 needs no mask and is magnitude_prune/ties at density 1; masks of ones at density d scale
    every task tensor by 1/d (dare_linear: ΔW of the factor form by 1/d², of the svd form by 1/d)."""
    adapters, names, _ = dare_inputs(kind, 0.5)
    weights = [0.7, -1.3, 0.4][: len(names)]
    svd_rank = 3 if kind.endswith("svd") else None
    plain = kind.replace("dare_linear", "magnitude_prune").replace("dare_ties", "ties")
    got = deltas(*add_weighted_adapter(TINY, adapters, names, weights, kind, svd_rank, 1.0))
    want = deltas(*add_weighted_adapter(TINY, adapters, names, weights, plain, svd_rank, 1.0))
    for module in want:
        np.testing.assert_allclose(got[module], want[module], rtol=0, atol=1e-13, err_msg=module)
    if kind.startswith("dare_linear"):
        from reflora.weighted import dare_mask_shapes

        shapes = dare_mask_shapes(TINY, [adapters[n][0] for n in names], kind)
        ones = {k: [np.ones(s) for s in group] for k, group in shapes.items()}
        scaled = deltas(*add_weighted_adapter(TINY, adapters, names, weights, kind, svd_rank, 0.5, keep_masks=ones))
        factor = 2.0 if kind.endswith("svd") else 4.0
        for module in want:
            np.testing.assert_allclose(scaled[module], factor * want[module], rtol=0, atol=1e-12, err_msg=module)


def test_dare_refuses_wrong_masks():
    adapters, names, masks = dare_inputs("dare_ties", 0.5)
    key = next(iter(masks))
    with pytest.raises(ValueError, match="shape"):
        add_weighted_adapter(TINY, adapters, names, [1, 1], "dare_ties", density=0.5,
                             keep_masks={**masks, key: [m.T for m in masks[key]]})  # fmt: skip
    with pytest.raises(ValueError, match="masks for 2 sources"):
        add_weighted_adapter(TINY, adapters, names, [1, 1], "dare_ties", density=0.5,
                             keep_masks={**masks, key: masks[key][:1]})  # fmt: skip
    with pytest.raises(ValueError, match=r"0\.0 and 1\.0"):
        add_weighted_adapter(TINY, adapters, names, [1, 1], "dare_ties", density=0.5,
                             keep_masks={**masks, key: [0.5 * m for m in masks[key]]})  # fmt: skip


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_matches_peft_with_injected_masks(kind, density, method):
    """The peft driver injects the masks into torch.bernoulli in PEFT's call order (a shape check on every
    call, and the count at the end): PEFT's combination then equals the reference's at 1e-13 (float64)."""
    pytest.importorskip("peft")
    from conformance.drivers.peft import driver
    from conformance.protocol import AdaptersCase

    adapters, names, masks = dare_inputs(kind, density)
    svd = kind.endswith("svd")
    weights = [0.75, -0.5, 1.5] if svd else EXACT_WEIGHTS["linear"]  # float32-exact coefficients (D6)
    weights = weights[: len(names)]
    svd_rank = 3 if svd else None
    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    combination = {"names": names, "weights": weights, "combination_type": kind, "svd_rank": svd_rank,
                   "density": density, "majority_sign_method": method}  # fmt: skip
    case = AdaptersCase(config=TINY, params=params, adapters={n: adapters[n] for n in names},
                        input_ids=np.zeros((1, 3), dtype=np.int64), combination=combination,
                        keep_masks=masks if density < 1 else None)  # fmt: skip
    theirs = driver.weighted_adapter(case)["deltas"]
    lora, tensors = add_weighted_adapter(TINY, adapters, names, weights, kind, svd_rank, density, method,
                                         keep_masks=case.keep_masks)  # fmt: skip
    ours = deltas(lora, tensors)
    assert set(theirs) == set(ours)
    for module, delta in theirs.items():
        np.testing.assert_allclose(ours[module], delta, rtol=0, atol=1e-13, err_msg=module)


@pytest.mark.torch
def test_dare_injection_fails_loudly_on_a_wrong_order():
    """Masks handed to PEFT in the wrong order (B's before A's) stop at the first shape mismatch."""
    pytest.importorskip("peft")
    import torch

    from conformance.drivers import peft_bridge
    from conformance.drivers.peft import _injected_bernoulli

    adapters, names, masks = dare_inputs("dare_linear", 0.5)
    ordered = [torch.from_numpy(m) for key in reversed(list(masks)) for m in masks[key]]
    model = peft_bridge.build_peft_adapters(TINY, rf.init_gpt2_params(TINY, np.random.default_rng(0)),
                                            {n: adapters[n] for n in names})  # fmt: skip
    with pytest.raises(AssertionError, match="call order or layout"), _injected_bernoulli(ordered):
        model.add_weighted_adapter(names, [1.0, 1.0], "new", combination_type="dare_linear", density=0.5)
