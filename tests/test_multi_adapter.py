"""Several named adapters (reflora.adapters; ``gpt2_forward(..., adapters=, active=, adapter_names=)``).

* the layer: y − (x W + b) is exactly Σ_a R_a ⊙ δ_a, each δ_a what that adapter computes alone;
* its backward, and the model's, against finite differences (LoRA with lora_bias, q/k/v slices and its own
  dropout, DoRA with its own dropout, mixed rows);
* the model: one active adapter is the single-adapter API; none is exactly the base; the order of active
  adapters does not matter; in a mixed batch each row is what its adapter gives that sample alone;
* against PEFT 0.21 in float64 (several active adapters with their own dropout, mixed batches, disabled);
* the worked example of docs/advanced-semantics.md runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import reflora as rf
from reflora.layer import LayerAdapter, adapted_linear_backward, adapted_linear_forward
from reflora.lora_init import init_adapter
from reflora.ops import LoraBranchWeights, lora_linear_forward
from reflora.ops.dora_linear import dora_linear_forward

H = 1e-4
RTOL = 1e-8
PEFT_RTOL = 1e-10
TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=2, n_head=3, n_inner=10)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "advanced-semantics.md"


def fd4(f, x: np.ndarray, direction: np.ndarray) -> float:
    g = lambda t: f(x + t * direction)  # noqa: E731
    return (8 * (g(H) - g(-H)) - (g(2 * H) - g(-2 * H))) / (12 * H)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------


def layer_setup(layout: str, seed: int = 0):
    """Three adapters on one (in=5, out=6) layer: LoRA on two slices with lora_bias and dropout on rows {0, 2};
    DoRA with dropout on every row; plain LoRA on rows {1, 3}."""
    rng = np.random.default_rng(seed)
    n, d_in, d_out = 4, 5, 6
    x = rng.normal(size=(n, d_in))
    weight = rng.normal(size=(d_in, d_out) if layout == "conv1d" else (d_out, d_in))
    bias = rng.normal(size=(d_out,))
    mask = lambda: (rng.random((n, d_in)) >= 0.3).astype(float)  # noqa: E731
    rows = lambda *r: np.array([[1.0] if i in r else [0.0] for i in range(n)])  # noqa: E731
    adapters = (
        LayerAdapter(
            (LoraBranchWeights(rng.normal(size=(2, d_in)), rng.normal(size=(2, 2)), 0.7, 0, 2),
             LoraBranchWeights(rng.normal(size=(2, d_in)), rng.normal(size=(3, 2)), 0.7, 3, 6)),
            (rng.normal(size=(2,)), rng.normal(size=(3,))), None, mask(), 0.3, rows(0, 2),
        ),
        LayerAdapter(
            (LoraBranchWeights(rng.normal(size=(3, d_in)), rng.normal(size=(d_out, 3)), 1.3, 0, d_out),),
            (None,), rng.uniform(1, 3, size=(d_out,)), mask(), 0.3, None,
        ),
        LayerAdapter(
            (LoraBranchWeights(rng.normal(size=(1, d_in)), rng.normal(size=(d_out, 1)), 2.0, 0, d_out),),
            (None,), None, None, 0.0, rows(1, 3),
        ),
    )  # fmt: skip
    return x, weight, bias, adapters, rng.normal(size=(n, d_out))


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
def test_layer_output_is_the_base_plus_each_adapters_own_delta(layout):
    x, weight, bias, adapters, _ = layer_setup(layout)
    y, _ = adapted_linear_forward(x, weight, bias, adapters, layout)
    base, _ = lora_linear_forward(x, weight, bias, (), layout=layout)
    total = base.copy()
    lora, dora, plain = adapters
    xd = x * lora.keep_mask / 0.7
    lora_delta = np.zeros_like(base)
    for br, b in zip(lora.branches, lora.biases):
        lora_delta[:, br.start : br.stop] = br.scaling * (xd @ br.A.T @ br.B.T + b)
    total += lora.rows * lora_delta
    (br,) = dora.branches
    alone, _ = dora_linear_forward(x, weight, bias, br.A, br.B, dora.magnitude, br.scaling, dora.keep_mask, 0.3, layout)
    total += alone - base
    alone, _ = lora_linear_forward(x, weight, bias, plain.branches, layout=layout)
    total += plain.rows * (alone - base)
    np.testing.assert_allclose(y, total, rtol=0, atol=1e-13)


def flatten(x, weight, bias, adapters) -> dict[str, np.ndarray]:
    """Every tensor of the layer under a name: x, weight, bias, a<i>.A<k>, a<i>.B<k>, a<i>.bias<k>, a<i>.m."""
    named = {"x": x, "weight": weight, "bias": bias}
    for i, ad in enumerate(adapters):
        for k, (br, b) in enumerate(zip(ad.branches, ad.biases)):
            named[f"a{i}.A{k}"], named[f"a{i}.B{k}"] = br.A, br.B
            if b is not None:
                named[f"a{i}.bias{k}"] = b
        if ad.magnitude is not None:
            named[f"a{i}.m"] = ad.magnitude
    return named


def rebuild(named: dict, adapters) -> tuple:
    """(x, weight, bias, adapters) with the tensors of ``named``; the inverse of ``flatten``."""
    new = []
    for i, ad in enumerate(adapters):
        branches = tuple(br._replace(A=named[f"a{i}.A{k}"], B=named[f"a{i}.B{k}"]) for k, br in enumerate(ad.branches))
        biases = tuple(None if b is None else named[f"a{i}.bias{k}"] for k, b in enumerate(ad.biases))
        magnitude = None if ad.magnitude is None else named[f"a{i}.m"]
        new.append(ad._replace(branches=branches, biases=biases, magnitude=magnitude))
    return named["x"], named["weight"], named["bias"], tuple(new)


@pytest.mark.parametrize("layout", ["conv1d", "linear"])
def test_layer_backward_matches_finite_differences(layout):
    """Full DoRA gradient (the true gradient), every element of every tensor."""
    x, weight, bias, adapters, dy = layer_setup(layout, seed=1)
    _, cache = adapted_linear_forward(x, weight, bias, adapters, layout)
    dx, dW, db, grads = adapted_linear_backward(
        dy, cache, weight, adapters, layout, norm_gradient="full", want_dx=True, want_dweight=True, want_dbias=True
    )
    analytic = flatten(dx, dW, db, [ad._replace(branches=tuple(br._replace(A=dA, B=dB) for br, (dA, dB) in zip(ad.branches, g.branches)), biases=tuple(g.biases), magnitude=g.magnitude) for ad, g in zip(adapters, grads)])  # fmt: skip
    named = flatten(x, weight, bias, adapters)
    assert set(analytic) == set(named)
    for key, value in named.items():

        def objective(v, key=key):
            xx, ww, bb, ads = rebuild({**named, key: v}, adapters)
            return float(np.sum(dy * adapted_linear_forward(xx, ww, bb, ads, layout)[0]))

        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            e = np.zeros_like(value)
            e[index] = 1.0
            numeric[index] = fd4(objective, value, e)
        assert rel_err(analytic[key], numeric) < RTOL, f"d{key}: {rel_err(analytic[key], numeric):.2e}"


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

CONFIGS = {
    "math": rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"], lora_dropout=0.2, lora_bias=True),
    "code": rf.LoraConfig(r=3, lora_alpha=2, target_modules=["c_attn", "c_fc"], use_dora=True, lora_dropout=0.1),
    "chat": rf.LoraConfig(r=1, lora_alpha=4, target_modules=["c_fc"], use_rslora=True),
    "qv": rf.LoraConfig(r=2, target_modules=["c_attn"], qkv_slices=["q", "v"]),
}


def model_setup(seed: int = 0, batch: int = 4, seq_len: int = 5, names=("math", "code", "chat")):
    rng = np.random.default_rng(seed)
    params = {k: v * (15.0 if ".ln_" not in k else 1.0) for k, v in rf.init_gpt2_params(TINY, rng).items()}
    adapters = {n: (CONFIGS[n], init_adapter(params, TINY, CONFIGS[n], rng, init="test")[0]) for n in names}
    ids = rng.integers(0, TINY.vocab_size, size=(batch, seq_len))
    labels = rng.integers(0, TINY.vocab_size, size=(batch, seq_len))
    masks = {
        n: rf.draw_dropout_masks(rf.plan_lora(TINY, lora), lora.lora_dropout, batch, seq_len, rng)
        for n, (lora, _) in adapters.items()
        if lora.lora_dropout
    }
    return params, adapters, ids, labels, masks


def test_one_active_adapter_is_the_single_adapter_api():
    params, adapters, ids, _, masks = model_setup()
    for name, (lora, tensors) in adapters.items():
        single, _ = rf.gpt2_forward(params, TINY, ids, adapter=tensors, lora=lora, dropout_masks=masks.get(name))
        named, _ = rf.gpt2_forward(
            params,
            TINY,
            ids,
            adapters=adapters,
            active=[name],
            dropout_masks={name: masks[name]} if name in masks else None,
        )
        np.testing.assert_array_equal(named, single)


def test_no_active_adapter_is_exactly_the_base_model():
    params, adapters, ids, _, _ = model_setup()
    base, _ = rf.gpt2_forward(params, TINY, ids)
    np.testing.assert_array_equal(rf.gpt2_forward(params, TINY, ids, adapters=adapters, active=[])[0], base)
    np.testing.assert_array_equal(
        rf.gpt2_forward(params, TINY, ids, adapters=adapters, adapter_names=["__base__"] * len(ids))[0], base
    )


def test_the_order_of_active_adapters_does_not_matter():
    params, adapters, ids, _, masks = model_setup(names=("math", "code", "chat", "qv"))
    one, _ = rf.gpt2_forward(
        params, TINY, ids, adapters=adapters, active=["code", "math", "qv", "chat"], dropout_masks=masks
    )
    two, _ = rf.gpt2_forward(
        params, TINY, ids, adapters=adapters, active=["chat", "qv", "math", "code"], dropout_masks=masks
    )
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-13)


def test_each_row_of_a_mixed_batch_is_its_adapters_own_output():
    params, adapters, ids, _, _ = model_setup(seed=1, batch=5, names=("math", "code", "chat", "qv"))
    attention_mask = np.ones_like(ids)
    attention_mask[2, :2] = 0  # left padding on one row
    names = ["code", "__base__", "math", "qv", "code"]
    mixed, _ = rf.gpt2_forward(params, TINY, ids, attention_mask=attention_mask, adapters=adapters, adapter_names=names)
    for row, name in enumerate(names):
        one = slice(row, row + 1)
        alone, _ = rf.gpt2_forward(
            params, TINY, ids[one], attention_mask=attention_mask[one], adapters=adapters,
            active=[] if name == "__base__" else [name],
        )  # fmt: skip
        np.testing.assert_allclose(mixed[one], alone, rtol=0, atol=1e-13, err_msg=f"row {row} ({name})")


@pytest.mark.parametrize("mode", ["full", "detached"])
def test_model_gradients_of_a_mixed_batch(mode):
    """The full mode against finite differences; the detached mode's LoRA-only gradients equal the full mode's
    (DoRA's norm term is the only difference) and its DoRA gradients differ."""
    params, adapters, ids, labels, _ = model_setup(seed=2)
    names = ["math", "code", "__base__", "code"]
    kwargs = {"adapters": adapters, "adapter_names": names, "dora_norm_gradient": mode}
    wrt = rf.model.adapter_trainable_keys(TINY, adapters, ["math", "code"])
    wrt += ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.bias"]
    _, _, grads = rf.gpt2_loss_and_grads(params, TINY, ids, labels, wrt=wrt, **kwargs)
    assert not any(k.startswith("chat:") for k in grads)  # chat takes no part
    if mode == "detached":
        _, _, full = rf.gpt2_loss_and_grads(
            params, TINY, ids, labels, wrt=wrt, **{**kwargs, "dora_norm_gradient": "full"}
        )
        for key in wrt:
            norm_term = (key.startswith("code:") and "magnitude" not in key) or key == "transformer.h.0.mlp.c_fc.weight"
            assert (rel_err(grads[key], full[key]) < 1e-14) == (not norm_term), key  # c_fc carries code's DoRA
        return
    rng = np.random.default_rng(3)
    for key in wrt:
        name, file_key = rf.adapters.split_key(key)
        direction = rng.normal(size=grads[key].shape)

        def loss(value, name=name, file_key=file_key):
            if name is None:
                p, a = {**params, file_key: value}, adapters
            else:
                lora, tensors = adapters[name]
                p, a = params, {**adapters, name: (lora, {**tensors, file_key: value})}
            logits, _ = rf.gpt2_forward(p, TINY, ids, **{**kwargs, "adapters": a})
            return float(rf.ops.cross_entropy_forward(logits, labels)[0])

        source = params[file_key] if name is None else adapters[name][1][file_key]
        numeric, analytic = fd4(loss, source, direction), float(np.sum(grads[key] * direction))
        assert abs(analytic - numeric) <= RTOL * max(abs(numeric), 1e-3), f"{key}: {analytic} vs {numeric}"


def test_active_adapters_with_their_own_dropout_match_finite_differences():
    params, adapters, ids, labels, masks = model_setup(seed=4)
    keys = ["math:base_model.model.transformer.h.0.attn.c_proj.lora_B.bias",
            "math:base_model.model.transformer.h.1.attn.c_attn.lora_A.weight",
            "code:base_model.model.transformer.h.0.mlp.c_fc.lora_magnitude_vector",
            "chat:base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"]  # fmt: skip
    kwargs = {"adapters": adapters, "dropout_masks": masks, "dora_norm_gradient": "full"}
    _, _, grads = rf.gpt2_loss_and_grads(params, TINY, ids, labels, wrt=keys, **kwargs)
    rng = np.random.default_rng(5)
    for key in keys:
        name, file_key = rf.adapters.split_key(key)
        lora, tensors = adapters[name]
        direction = rng.normal(size=tensors[file_key].shape)

        def loss(value, name=name, file_key=file_key, lora=lora, tensors=tensors):
            a = {**adapters, name: (lora, {**tensors, file_key: value})}
            return float(
                rf.ops.cross_entropy_forward(
                    rf.gpt2_forward(params, TINY, ids, **{**kwargs, "adapters": a})[0], labels
                )[0]
            )

        numeric, analytic = fd4(loss, tensors[file_key], direction), float(np.sum(grads[key] * direction))
        assert abs(analytic - numeric) <= RTOL * max(abs(numeric), 1e-3), f"{key}: {analytic} vs {numeric}"


def test_clear_errors():
    params, adapters, ids, _, _ = model_setup()
    with pytest.raises(rf.InputError, match="unknown adapters"):
        rf.gpt2_forward(params, TINY, ids, adapters=adapters, adapter_names=["math", "nope", "math", "math"])
    with pytest.raises(rf.InputError, match="at most one"):
        rf.gpt2_forward(params, TINY, ids, adapters=adapters, active=["math"], adapter_names=["math"] * 4)
    with pytest.raises(rf.InputError, match="4 samples"):
        rf.gpt2_forward(params, TINY, ids, adapters=adapters, adapter_names=["math"])
    with pytest.raises(rf.InputError, match="not both"):
        rf.gpt2_forward(params, TINY, ids, adapters=adapters, lora=CONFIGS["math"], adapter=adapters["math"][1])
    with pytest.raises(rf.InputError, match="without"):
        rf.gpt2_forward(params, TINY, ids, adapters={"a:b": adapters["math"]})
    _, cache = rf.gpt2_forward(params, TINY, ids, adapters=adapters, active=["math"])
    with pytest.raises(rf.InputError, match="takes part"):
        rf.gpt2_backward(
            np.ones((4, 5, TINY.vocab_size)), cache, ["chat:base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"]
        )


# ----------------------------------------------------------------------------------------------
# against PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_active_adapters_match_peft_float64():
    pytest.importorskip("peft")
    from conformance.drivers.peft_bridge import run_peft_adapters

    params, adapters, ids, labels, masks = model_setup(seed=6, names=("math", "chat", "qv"))
    adapters.pop("qv")  # PEFT has no per-slice q/k/v LoRA
    wrt = [rf.qualified_key(n, k) for n, (_, t) in adapters.items() for k in t] + ["transformer.h.1.ln_2.weight"]
    _, logits, grads = rf.gpt2_loss_and_grads(
        params, TINY, ids, labels, wrt=wrt, adapters=adapters, dropout_masks=masks
    )
    ref = run_peft_adapters(TINY, params, adapters, ids, labels=labels, dropout_masks=masks, wrt=wrt)
    assert rel_err(logits, ref["logits"]) < PEFT_RTOL
    for key in wrt:
        assert rel_err(grads[key], ref[f"grad/{key}"]) < PEFT_RTOL, key


@pytest.mark.torch
def test_mixed_batch_and_disabled_match_peft_float64():
    pytest.importorskip("peft")
    from conformance.drivers.peft_bridge import run_peft_adapters

    params, adapters, ids, labels, _ = model_setup(seed=7, names=("math", "chat"))
    names = ["chat", "__base__", "math", "chat"]
    wrt = [rf.qualified_key(n, k) for n, (_, t) in adapters.items() for k in t]
    _, logits, grads = rf.gpt2_loss_and_grads(
        params, TINY, ids, labels, wrt=wrt, adapters=adapters, adapter_names=names
    )
    ref = run_peft_adapters(TINY, params, adapters, ids, labels=labels, adapter_names=names, wrt=wrt)
    assert rel_err(logits, ref["logits"]) < PEFT_RTOL
    for key in wrt:
        assert rel_err(grads[key], ref[f"grad/{key}"]) < PEFT_RTOL, key
    off = run_peft_adapters(TINY, params, adapters, ids, active=[])
    np.testing.assert_allclose(
        rf.gpt2_forward(params, TINY, ids, adapters=adapters, active=[])[0], off["logits"], rtol=0, atol=1e-13
    )


@pytest.mark.torch
def test_documented_peft_deviation_dora_next_to_other_adapters():
    """docs/advanced-semantics.md, PEFT deviation D5: with a DoRA adapter active next to another adapter and no
    dropout, PEFT's output depends on the order of the active adapters (the DoRA term rescales the output of
    the adapters before it). reflora measures every delta from the base: order-free, and with p = 0 it is what
    PEFT computes when dropout is on and its mask keeps everything."""
    peft = pytest.importorskip("peft")
    if not peft.__version__.startswith("0.21."):
        pytest.skip(f"the deviation is documented for PEFT 0.21, found {peft.__version__}")
    from conformance.drivers.peft_bridge import run_peft_adapters

    rng = np.random.default_rng(8)
    params = rf.init_gpt2_params(TINY, rng)
    plain = rf.LoraConfig(r=2, target_modules=["c_attn"])
    dora = rf.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True)
    adapters = {
        "plain": (plain, init_adapter(params, TINY, plain, rng, init="test")[0]),
        "dora": (dora, init_adapter(params, TINY, dora, rng, init="test")[0]),
    }
    ids = rng.integers(0, TINY.vocab_size, size=(2, 4))
    first = run_peft_adapters(TINY, params, adapters, ids, active=["plain", "dora"])["logits"]
    second = run_peft_adapters(TINY, params, adapters, ids, active=["dora", "plain"])["logits"]
    assert np.max(np.abs(first - second)) > 1e-4  # PEFT: order-dependent
    ours, _ = rf.gpt2_forward(params, TINY, ids, adapters=adapters, active=["plain", "dora"])
    ours_swapped, _ = rf.gpt2_forward(params, TINY, ids, adapters=adapters, active=["dora", "plain"])
    np.testing.assert_allclose(ours, ours_swapped, rtol=0, atol=1e-14)
    np.testing.assert_allclose(ours, second, rtol=0, atol=1e-13)  # DoRA first: PEFT's DoRA sees only the base


# ----------------------------------------------------------------------------------------------
# the documentation's worked example
# ----------------------------------------------------------------------------------------------


def test_the_worked_example_in_the_docs_runs():
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- example: swap-adapters -->\s*```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/advanced-semantics.md must hold exactly one swap-adapters example"
    exec(compile(blocks[0], str(DOCS), "exec"), {"__name__": "docs_example"})


def test_array_api_strict_runs_the_new_paths():
    """Several adapters, DoRA (full gradient), lora_bias, slices, per-adapter dropout and a mixed batch use only
    the array API standard: array_api_strict gives NumPy's numbers."""
    xps = pytest.importorskip("array_api_strict")
    from reflora.backend import to_namespace, to_numpy

    params, adapters, ids, labels, masks = model_setup(seed=9, batch=3, names=("math", "code", "qv"))
    strict = lambda d: {k: to_namespace(xps, v) for k, v in d.items()}  # noqa: E731
    for kwargs in ({"dropout_masks": masks}, {"adapter_names": ["code", "__base__", "qv"]}):
        _, _, want = rf.gpt2_loss_and_grads(
            params, TINY, ids, labels, adapters=adapters, dora_norm_gradient="full", **kwargs
        )
        if "dropout_masks" in kwargs:
            kwargs = {"dropout_masks": {n: strict(m) for n, m in masks.items()}}
        _, _, got = rf.gpt2_loss_and_grads(
            strict(params), TINY, to_namespace(xps, ids), to_namespace(xps, labels),
            adapters={n: (lora, strict(t)) for n, (lora, t) in adapters.items()}, dora_norm_gradient="full", **kwargs,
        )  # fmt: skip
        for key in want:
            np.testing.assert_allclose(to_numpy(got[key]), want[key], rtol=1e-12, atol=1e-14, err_msg=key)
