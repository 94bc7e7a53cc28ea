"""DoRA (``use_dora``): the op against its closed form and finite differences, the model against PEFT autograd.

Gradients are checked in float64 with the fourth-order central stencil (h = 1e-4, error O(h⁴) + O(ε/h)):

* ``norm_gradient="full"`` is the true gradient of the forward: plain finite differences of the forward.
* ``norm_gradient="detached"`` (PEFT, DoRA paper §4.3) is the gradient with n = ‖Wt + s·B A‖ held at its
  current value: finite differences of the forward with n frozen (``frozen_norm_layer`` below, written from
  the formula, independently of reflora.ops.dora_linear).

The model is cross-checked against transformers + PEFT (``use_dora=True``) with torch autograd in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

import reflora as rf
from reflora.lora_init import init_adapter
from reflora.ops.dora_linear import dora_linear_backward, dora_linear_forward

H = 1e-4
RTOL = 1e-8
PEFT_RTOL = 1e-10
TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=2, n_head=3, n_inner=10)


def fd4(f, x: np.ndarray, direction: np.ndarray) -> float:
    """d/dt f(x + t·direction) at t = 0, fourth-order central stencil."""
    g = lambda t: f(x + t * direction)  # noqa: E731
    return (8 * (g(H) - g(-H)) - (g(2 * H) - g(-2 * H))) / (12 * H)


def elementwise_fd(f, x: np.ndarray) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[index] = 1.0
        grad[index] = fd4(f, x, e)
    return grad


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def layer_case(layout: str, dropout: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d_in, d_out, r, s = 5, 4, 3, 2, 1.7
    t = {
        "x": rng.normal(size=(n, d_in)),
        "weight": rng.normal(size=(d_in, d_out) if layout == "conv1d" else (d_out, d_in)),
        "bias": rng.normal(size=(d_out,)),
        "A": rng.normal(size=(r, d_in)),
        "B": rng.normal(size=(d_out, r)),
        "magnitude": rng.uniform(0.5, 2.0, size=(d_out,)),
    }
    mask = (rng.random((n, d_in)) >= 0.4).astype(np.float64) if dropout else None
    return t, s, mask, 0.4 if dropout else 0.0, rng.normal(size=(n, d_out))


def frozen_norm_layer(t: dict, s: float, mask, p: float, layout: str, norm: np.ndarray | None) -> np.ndarray:
    """PEFT's DoRA layer written from its formula; ``norm`` fixed (detached) or None (recomputed)."""
    Wt = t["weight"].T if layout == "conv1d" else t["weight"]
    V = Wt + s * t["B"] @ t["A"]
    n = np.linalg.norm(V, axis=1) if norm is None else norm
    c = t["magnitude"] / n
    x, xd = t["x"], t["x"] if mask is None else t["x"] * mask / (1 - p)
    return x @ Wt.T + t["bias"] + (c - 1) * (xd @ Wt.T) + c * s * (xd @ t["A"].T @ t["B"].T)


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
def test_forward_is_magnitude_times_direction_without_dropout(layout):
    t, s, _, _, _ = layer_case(layout, dropout=False)
    y, _ = dora_linear_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, layout=layout)
    Wt = t["weight"].T if layout == "conv1d" else t["weight"]
    V = Wt + s * t["B"] @ t["A"]
    W_dora = t["magnitude"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)  # m ⊙ V / ‖V‖, DoRA's W'
    np.testing.assert_allclose(y, t["x"] @ W_dora.T + t["bias"], rtol=1e-13, atol=1e-13)


def test_layouts_agree():
    t, s, mask, p, _ = layer_case("conv1d", dropout=True)
    y1, _ = dora_linear_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, mask, p, "conv1d")
    y2, _ = dora_linear_forward(t["x"], t["weight"].T, t["bias"], t["A"], t["B"], t["magnitude"], s, mask, p, "linear")
    np.testing.assert_allclose(y1, y2, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
def test_dropout_form_is_peft_formula_and_reduces_to_dora_with_a_full_mask(layout):
    t, s, mask, p, _ = layer_case(layout, dropout=True)
    y, _ = dora_linear_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, mask, p, layout)
    np.testing.assert_allclose(y, frozen_norm_layer(t, s, mask, p, layout, None), rtol=1e-13, atol=1e-13)
    ones = np.ones_like(mask)
    y_ones, _ = dora_linear_forward(
        t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, ones, 0.0, layout
    )
    y_none, _ = dora_linear_forward(
        t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, None, 0.0, layout
    )
    np.testing.assert_allclose(y_ones, y_none, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("mode", ["full", "detached"])
def test_layer_gradients_match_finite_differences(layout, dropout, mode):
    t, s, mask, p, dy = layer_case(layout, dropout, seed=1)
    _, cache = dora_linear_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, mask, p, layout)
    dx, dW, db, dA, dB, dm = dora_linear_backward(
        dy, cache, t["weight"], t["A"], t["B"], s, mask, p, layout,
        norm_gradient=mode, want_dx=True, want_dweight=True, want_dbias=True,
    )  # fmt: skip
    analytic = {"x": dx, "weight": dW, "bias": db, "A": dA, "B": dB, "magnitude": dm}
    frozen = None
    if mode == "detached":
        Wt = t["weight"].T if layout == "conv1d" else t["weight"]
        frozen = np.linalg.norm(Wt + s * t["B"] @ t["A"], axis=1)
    for key, grad in analytic.items():

        def objective(value, key=key):
            return float(np.sum(dy * frozen_norm_layer({**t, key: value}, s, mask, p, layout, frozen)))

        numeric = elementwise_fd(objective, t[key])
        assert rel_err(grad, numeric) < RTOL, f"{mode} d{key}: {rel_err(grad, numeric):.2e}"


def test_detached_and_full_gradients_differ_exactly_by_the_norm_term():
    t, s, mask, p, dy = layer_case("conv1d", dropout=True, seed=2)
    _, cache = dora_linear_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["magnitude"], s, mask, p)
    full = dora_linear_backward(dy, cache, t["weight"], t["A"], t["B"], s, mask, p, norm_gradient="full")[3:]
    det = dora_linear_backward(dy, cache, t["weight"], t["A"], t["B"], s, mask, p, norm_gradient="detached")[3:]
    np.testing.assert_array_equal(full[2], det[2])  # dm does not involve the norm's gradient
    assert rel_err(full[0], det[0]) > 1e-3 and rel_err(full[1], det[1]) > 1e-3


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


def big_params(config: rf.GPT2Config, rng: np.random.Generator) -> dict:
    """Weights with std 0.3 (not GPT-2's 0.02) so that every layer is clearly non-linear."""
    return {
        key: 1.0 + 0.1 * rng.normal(size=shape)
        if ".ln_" in key and key.endswith(".weight")
        else 0.3 * rng.normal(size=shape)
        for key, shape in rf.base_shapes(config).items()
    }


def model_case(lora: rf.LoraConfig, seed: int = 0, batch: int = 2, seq_len: int = 5):
    rng = np.random.default_rng(seed)
    params = big_params(TINY, rng)
    adapter, _ = init_adapter(params, TINY, lora, rng, init="test")
    ids = rng.integers(0, TINY.vocab_size, size=(batch, seq_len))
    labels = rng.integers(0, TINY.vocab_size, size=(batch, seq_len))
    masks = None
    if lora.lora_dropout:
        masks = rf.draw_dropout_masks(rf.plan_lora(TINY, lora), lora.lora_dropout, batch, seq_len, rng)
    return params, adapter, ids, labels, masks


DORA_CONFIGS = [
    rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True),
    rf.LoraConfig(r=3, lora_alpha=2, target_modules=["c_attn", "mlp.c_proj"], use_dora=True, lora_dropout=0.3),
    rf.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], use_dora=True, use_rslora=True, rank_pattern={"c_fc": 1}),
]


@pytest.mark.parametrize("lora", DORA_CONFIGS, ids=["plain", "dropout", "rslora-rank-pattern"])
def test_model_full_gradient_matches_directional_finite_differences(lora):
    params, adapter, ids, labels, masks = model_case(lora, seed=3)
    kwargs = {"lora": lora, "dropout_masks": masks, "dora_norm_gradient": "full"}
    wrt = [*adapter, "transformer.h.0.attn.c_attn.weight", "transformer.h.1.ln_2.bias"]
    _, _, grads = rf.gpt2_loss_and_grads(params, TINY, ids, labels, wrt=wrt, adapter=adapter, **kwargs)
    rng = np.random.default_rng(4)
    for key in wrt:
        source = adapter if key in adapter else params
        direction = rng.normal(size=source[key].shape)

        def loss(value, key=key, source=source):
            new = {**source, key: value}
            a, p = (new, params) if source is adapter else (adapter, new)
            logits, _ = rf.gpt2_forward(p, TINY, ids, adapter=a, **kwargs)
            return float(rf.ops.cross_entropy_forward(logits, labels)[0])

        numeric = fd4(loss, source[key], direction)
        analytic = float(np.sum(grads[key] * direction))
        assert abs(analytic - numeric) <= RTOL * max(abs(numeric), 1e-3), f"{key}: {analytic} vs {numeric}"


def test_dora_at_init_is_exactly_the_base_model():
    lora = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"], use_dora=True)
    rng = np.random.default_rng(5)
    params = big_params(TINY, rng)
    adapter, same = init_adapter(params, TINY, lora, rng)  # PEFT's default: B = 0, so m = ‖W‖ and c = 1
    for name, module in rf.plan_lora(TINY, lora).items():
        norm = np.linalg.norm(params[f"{name}.weight"], axis=0)  # over the input dimension: rows of the (in, out) W
        np.testing.assert_allclose(adapter[module.magnitude_key], norm, rtol=1e-15)
    ids = rng.integers(0, TINY.vocab_size, size=(2, 4))
    np.testing.assert_array_equal(
        rf.gpt2_forward(same, TINY, ids, adapter=adapter, lora=lora)[0], rf.gpt2_forward(params, TINY, ids)[0]
    )


def test_config_rules():
    with pytest.raises(rf.ConfigError, match="lora_bias"):
        rf.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(rf.ConfigError, match="qkv_slices"):
        rf.LoraConfig(use_dora=True, qkv_slices=["q"])
    assert rf.LoraConfig.from_dict({"use_dora": True}).use_dora
    assert not rf.LoraConfig.from_dict({"use_dora": None, "lora_bias": None}).use_dora
    with pytest.raises(rf.InputError, match="dora_norm_gradient"):
        rf.gpt2_forward(big_params(TINY, np.random.default_rng(0)), TINY, np.zeros((1, 2), int), dora_norm_gradient="x")


def test_adapter_file_round_trip(tmp_path):
    lora = DORA_CONFIGS[0]
    _, adapter, _, _, _ = model_case(lora)
    rf.save_adapter(tmp_path, adapter, lora, TINY)
    loaded, lora2, _ = rf.load_adapter(tmp_path, TINY)
    assert lora2.use_dora and lora2.r == lora.r and lora2.target_modules == lora.target_modules
    assert sorted(k for k in loaded if k.endswith("lora_magnitude_vector")) == sorted(
        f"base_model.model.{n}.lora_magnitude_vector" for n in rf.plan_lora(TINY, lora)
    )  # PEFT 0.21's file key: no ".weight"
    for key in adapter:
        np.testing.assert_array_equal(loaded[key], adapter[key])


# ----------------------------------------------------------------------------------------------
# against PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("lora", DORA_CONFIGS, ids=["plain", "dropout", "rslora-rank-pattern"])
def test_model_matches_peft_autograd_float64(lora):
    pytest.importorskip("peft")
    from conformance.drivers.peft_bridge import run_peft_adapters

    params, adapter, ids, labels, masks = model_case(lora, seed=6)
    base_keys = ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_1.weight", "transformer.wpe.weight"]
    if not lora.lora_dropout:  # with dropout PEFT drops the base weight's DoRA gradient: see the deviation test
        base_keys.append("transformer.h.0.attn.c_attn.weight")
    wrt = [*adapter, *base_keys]
    loss, logits, grads = rf.gpt2_loss_and_grads(
        params, TINY, ids, labels, wrt=wrt, adapter=adapter, lora=lora, dropout_masks=masks
    )
    ref = run_peft_adapters(
        TINY, params, {"default": (lora, adapter)}, ids, labels=labels,
        dropout_masks=None if masks is None else {"default": masks},
        wrt=[rf.qualified_key("default", k) if k in adapter else k for k in wrt],
    )  # fmt: skip
    assert rel_err(logits, ref["logits"]) < PEFT_RTOL
    assert abs(float(loss) - float(ref["loss"])) < PEFT_RTOL * abs(float(ref["loss"]))
    for key in wrt:
        other = ref["grad/" + (rf.qualified_key("default", key) if key in adapter else key)]
        assert rel_err(grads[key], other) < PEFT_RTOL, f"{key}: {rel_err(grads[key], other):.2e}"


@pytest.mark.torch
def test_peft_loads_reflora_dora_adapter_file(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import warnings

    from peft import PeftModel

    from conformance.drivers.peft_bridge import build_hf_model

    lora = DORA_CONFIGS[0]
    params, adapter, ids, _, _ = model_case(lora, seed=7)
    rf.save_adapter(tmp_path, adapter, lora, TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(build_hf_model(TINY, params), tmp_path).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    ours, _ = rf.gpt2_forward(params, TINY, ids, adapter=adapter, lora=lora)
    assert rel_err(ours, theirs) < PEFT_RTOL


@pytest.mark.torch
def test_documented_peft_deviation_dora_dropout_drops_base_weight_gradient():
    """docs/advanced-semantics.md, PEFT deviation D3: with DoRA, LoRA dropout active and a Conv1D (fan_in_fan_out)
    layer, PEFT's base-weight gradient lacks the DoRA term (c − 1)ᵀ-part; reflora's is the formula's."""
    peft = pytest.importorskip("peft")
    if not peft.__version__.startswith("0.21."):
        pytest.skip(f"the deviation is documented for PEFT 0.21, found {peft.__version__}")
    from conformance.drivers.peft_bridge import run_peft_adapters

    lora = DORA_CONFIGS[1]
    params, adapter, ids, labels, masks = model_case(lora, seed=8)
    key = "transformer.h.0.attn.c_attn.weight"
    _, _, grads = rf.gpt2_loss_and_grads(
        params, TINY, ids, labels, wrt=[key], adapter=adapter, lora=lora, dropout_masks=masks
    )
    ref = run_peft_adapters(
        TINY, params, {"default": (lora, adapter)}, ids, labels=labels, dropout_masks={"default": masks}, wrt=[key]
    )
    assert rel_err(grads[key], ref[f"grad/{key}"]) > 1e-3  # PEFT still differs (if this fails, PEFT was fixed)
