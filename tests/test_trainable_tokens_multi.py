"""Trainable tokens (``trainable_token_indices``) with several adapters and in the merge
(docs/advanced-semantics.md, "Several adapters"; PEFT 0.21.2's TrainableTokensLayer): finite differences of the
reference in float64, transformers + PEFT autograd at 1e-10, the merge / unmerge / merge_and_unload against PEFT,
the refusals both share, a mixed batch (``adapter_names``: each row its own W', finite differences, PEFT where it
runs), and PEFT's deviations D12 and D13 as minimal reproductions."""

from __future__ import annotations

import numpy as np
import pytest

import reflora as rf
from reflora.adapters import split_key
from reflora.lora_init import init_adapter
from reflora.merge import MergeError, merge_adapters, merge_and_unload, unmerge_adapters
from reflora.model import adapter_trainable_keys
from reflora.validate import InputError

TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=1, n_head=3, n_inner=10)
IDS = np.array([[1, 5, 2, 3], [2, 2, 7, 1]])
LABELS = np.array([[3, 1, 2, 5], [1, 2, 3, 4]])
WTE = "transformer.wte.weight"


def setup():
    rng = np.random.default_rng(0)
    params = rf.init_gpt2_params(TINY, rng)
    configs = {
        "t": rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], trainable_token_indices=[1, 2]),
        "u": rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_fc"], trainable_token_indices=[5]),
        "p": rf.LoraConfig(r=2, lora_alpha=5, target_modules=["c_fc", "c_attn"]),
    }
    adapters = {n: (lora, init_adapter(params, TINY, lora, rng, init="test")[0]) for n, lora in configs.items()}
    return params, adapters


def test_one_tokens_adapter_among_several_is_its_rows_plus_the_others_deltas():
    params, adapters = setup()
    both = {n: adapters[n] for n in ("t", "p")}
    logits = rf.gpt2_forward(params, TINY, IDS, adapters=both)[0]
    # the same model by hand: wte's rows replaced, then both LoRA adapters active
    module = rf.plan_lora(TINY, adapters["t"][0])["transformer.wte.token_adapter"]
    wte = params[WTE].copy()
    wte[list(module.token_indices)] = adapters["t"][1][module.tokens_key]
    plain_t = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"])
    lora_only = {
        "t": (plain_t, {k: v for k, v in adapters["t"][1].items() if "token_adapter" not in k}),
        "p": both["p"],
    }
    want = rf.gpt2_forward({**params, WTE: wte}, TINY, IDS, adapters=lora_only)[0]
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-14)
    alone = rf.gpt2_forward(params, TINY, IDS, adapters=both, active=["p"])[0]  # t inactive: wte's own rows
    np.testing.assert_allclose(alone, rf.gpt2_forward(params, TINY, IDS, adapters={"p": both["p"]})[0], rtol=0, atol=0)
    assert np.abs(alone - logits).max() > 1e-3


def test_gradients_match_finite_differences():
    params, adapters = setup()
    both = {n: adapters[n] for n in ("t", "p")}
    wrt = [*adapter_trainable_keys(TINY, both, ["t", "p"]), WTE]
    _, _, grads = rf.gpt2_loss_and_grads(params, TINY, IDS, LABELS, adapters=both, wrt=wrt)
    rng = np.random.default_rng(1)
    h = 1e-6
    for key in wrt:
        name, file_key = split_key(key)
        for _ in range(3):
            if name is None:
                value = params[key]
            else:
                value = both[name][1][file_key]
            index = tuple(int(rng.integers(s)) for s in value.shape)

            def loss_at(delta, value=value, index=index, name=name, file_key=file_key, key=key):
                bumped = value.copy()
                bumped[index] += delta
                if name is None:
                    return rf.gpt2_loss_and_grads({**params, key: bumped}, TINY, IDS, LABELS, adapters=both, wrt=[])[0]
                changed = {**both, name: (both[name][0], {**both[name][1], file_key: bumped})}
                return rf.gpt2_loss_and_grads(params, TINY, IDS, LABELS, adapters=changed, wrt=[])[0]

            fd = (loss_at(h) - loss_at(-h)) / (2 * h)
            assert abs(fd - grads[key][index]) <= 1e-7 * max(1.0, np.abs(grads[key]).max()), (key, index)
    module = rf.plan_lora(TINY, adapters["t"][0])["transformer.wte.token_adapter"]
    assert np.all(grads[WTE][list(module.token_indices)] == 0)  # replaced rows reach nothing


def test_two_active_tokens_adapters_are_refused():
    params, adapters = setup()
    with pytest.raises(InputError, match="at most one"):
        rf.gpt2_forward(params, TINY, IDS, adapters={n: adapters[n] for n in ("t", "u")})


def test_a_tokens_adapter_next_to_lora_on_wte_is_refused():
    """PEFT 0.21.2's add_adapter raises 'Target module TrainableTokensWrapper(...) is not supported'."""
    params, adapters = setup()
    embedding = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["wte", "c_fc"])
    adapters["e"] = (embedding, init_adapter(params, TINY, embedding, np.random.default_rng(3), init="test")[0])
    for names in (("t", "e"), ("e", "t")):
        with pytest.raises(InputError, match="adapter 't' has trainable_token_indices and adapter 'e' has LoRA"):
            rf.gpt2_forward(params, TINY, IDS, adapters={n: adapters[n] for n in names})


@pytest.mark.parametrize("names", [["t"], ["t", "p"], ["t", "u"]])
def test_merge_replaces_the_rows_and_unmerge_restores_them(names):
    params, adapters = setup()
    chosen = {n: adapters[n] for n in names}
    merged, record = merge_adapters(params, TINY, chosen)
    for name in names:
        lora, tensors = chosen[name]
        module = rf.plan_lora(TINY, lora).get("transformer.wte.token_adapter")
        if module is not None:
            np.testing.assert_array_equal(merged[WTE][list(module.token_indices)], tensors[module.tokens_key])
    if len([n for n in names if chosen[n][0].trainable_token_indices]) == 1:  # forwardable: merged = unmerged
        np.testing.assert_allclose(rf.gpt2_forward(merged, TINY, IDS)[0],
                                   rf.gpt2_forward(params, TINY, IDS, adapters=chosen)[0], rtol=0, atol=1e-14)  # fmt: skip
    restored = unmerge_adapters(merged, TINY, chosen, record)
    for key in params:
        np.testing.assert_allclose(restored[key], params[key], rtol=0, atol=1e-15, err_msg=key)
    with pytest.raises(MergeError, match="MergeRecord"):
        unmerge_adapters(merged, TINY, chosen)


def test_merge_refuses_overlapping_rows():
    params, adapters = setup()
    lora = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_fc"], trainable_token_indices=[2, 4])
    clash = (lora, init_adapter(params, TINY, lora, np.random.default_rng(3), init="test")[0])
    with pytest.raises(MergeError, match="disjoint"):
        merge_adapters(params, TINY, {"t": adapters["t"], "v": clash})


# ----------------------------------------------------------------------------------------------
# against PEFT 0.21.2
# ----------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("active", [["t", "p"], ["p", "t"], ["t"]])
def test_several_adapters_match_peft_autograd(active):
    pytest.importorskip("peft")
    from conformance.drivers.peft_bridge import run_peft_adapters

    params, adapters = setup()
    both = {n: adapters[n] for n in ("p", "t")}
    wrt = [*adapter_trainable_keys(TINY, both, active), WTE]
    loss, logits, grads = rf.gpt2_loss_and_grads(params, TINY, IDS, LABELS, adapters=both, active=active, wrt=wrt)
    ref = run_peft_adapters(TINY, params, both, IDS, active=active, labels=LABELS, wrt=wrt)
    assert abs(loss - ref["loss"]) <= 1e-10 * abs(loss)
    np.testing.assert_allclose(ref["logits"], logits, rtol=0, atol=1e-10 * np.abs(logits).max())
    for key in wrt:
        np.testing.assert_allclose(ref[f"grad/{key}"], grads[key], rtol=0, atol=1e-10 * np.abs(grads[key]).max(),
                                   err_msg=key)  # fmt: skip


@pytest.mark.torch
def test_peft_refuses_two_active_tokens_adapters_too():
    pytest.importorskip("peft")
    from conformance.drivers.peft_bridge import build_peft_adapters

    params, adapters = setup()
    model = build_peft_adapters(TINY, params, {n: adapters[n] for n in ("t", "u")})
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        model.base_model.set_adapter(["t", "u"])


@pytest.mark.torch
@pytest.mark.parametrize("names", [["t"], ["t", "u"], ["t", "p"]])
def test_merge_matches_peft(names):
    """PEFT's merge_adapter (by name; for t + p, whose named merge raises D12, the active set), unmerge_adapter
    and merge_and_unload against reflora's merge, unmerge and merge_and_unload."""
    torch = pytest.importorskip("torch")
    from conformance.drivers.peft_bridge import build_peft_adapters, live_base_name

    params, adapters = setup()
    chosen = {n: adapters[n] for n in names}
    merged, record = merge_adapters(params, TINY, chosen)
    model = build_peft_adapters(TINY, params, chosen).eval()
    plans = {}
    for lora, _ in chosen.values():
        plans.update(rf.plan_lora(TINY, lora))
    with torch.no_grad():
        if "p" in names:
            model.base_model.set_adapter(names)
            model.base_model.merge_adapter()
        else:
            model.base_model.merge_adapter(adapter_names=names)
        named = dict(model.named_parameters())
        for key in (WTE, "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
            np.testing.assert_allclose(named[live_base_name(key, plans)].numpy(), merged[key], rtol=0, atol=1e-15)
        logits = model(input_ids=torch.from_numpy(IDS)).logits.numpy()
        np.testing.assert_allclose(logits, rf.gpt2_forward(merged, TINY, IDS)[0], rtol=0, atol=1e-13)
        model.base_model.unmerge_adapter()
        restored = unmerge_adapters(merged, TINY, chosen, record)
        np.testing.assert_array_equal(dict(model.named_parameters())[live_base_name(WTE, plans)].numpy(), params[WTE])
        np.testing.assert_array_equal(restored[WTE], params[WTE])
        fresh = build_peft_adapters(TINY, params, chosen).eval()
        if "p" in names:
            fresh.base_model.set_adapter(names)
        plain = fresh.merge_and_unload(**({} if "p" in names else {"adapter_names": names}))
    state = {k: v.numpy() for k, v in plain.state_dict().items()}
    ours = merge_and_unload(params, TINY, adapters=chosen)
    for key, value in ours.items():
        np.testing.assert_allclose(state[key], value, rtol=0, atol=1e-15, err_msg=key)
    np.testing.assert_array_equal(state["lm_head.weight"], ours[WTE])  # the head tied to the merged wte


@pytest.mark.torch
def test_documented_peft_deviation_d12_named_merge_with_a_plain_adapter():
    """D12 (docs/advanced-semantics.md): merge_adapter(adapter_names=[t, p]) with p lacking trainable tokens
    raises KeyError in TrainableTokensLayer._check_overlapping_tokens (and so does merge_and_unload)."""
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"deviation D12 is documented for PEFT 0.21.2, found {peft.__version__}")
    from conformance.drivers.peft_bridge import build_peft_adapters

    params, adapters = setup()
    chosen = {n: adapters[n] for n in ("t", "p")}
    with pytest.raises(KeyError, match="p"):
        build_peft_adapters(TINY, params, chosen).base_model.merge_adapter(adapter_names=["t", "p"])
    with pytest.raises(KeyError, match="p"):
        build_peft_adapters(TINY, params, chosen).merge_and_unload(adapter_names=["t", "p"])
    merge_adapters(params, TINY, chosen)  # reflora merges both


# ---------------------------------------------------------------------------------------------- mixed batch

MIXED_IDS = np.array([[1, 5, 2, 3], [2, 2, 7, 1], [1, 2, 5, 5], [5, 1, 1, 2]])
MIXED_LABELS = np.array([[3, 1, 2, 5], [1, 2, 3, 4], [2, 5, 1, 0], [1, 1, 2, 3]])


@pytest.mark.parametrize(
    ("names", "rows"),
    [(("t", "p"), ["t", "p", "__base__", "t"]), (("t", "u", "p"), ["u", "t", "p", "u"]), (("t", "p"), ["p"] * 4)],
)
def test_mixed_batch_each_row_is_its_adapter_alone_lookup_and_head(names, rows):
    """A mixed batch with trainable tokens: sample b uses its adapter's W' (rows replaced) in the lookup and the
    tied head; plain adapters and "__base__" keep wte's own rows."""
    params, adapters = setup()
    chosen = {n: adapters[n] for n in names}
    logits = rf.gpt2_forward(params, TINY, MIXED_IDS, adapters=chosen, adapter_names=rows)[0]
    for b, row in enumerate(rows):
        active = [] if row == "__base__" else [row]
        alone = rf.gpt2_forward(params, TINY, MIXED_IDS[b : b + 1], adapters=chosen, active=active)[0]
        np.testing.assert_allclose(logits[b : b + 1], alone, rtol=0, atol=1e-14, err_msg=f"row {b} ({row})")


def test_mixed_batch_gradients_match_finite_differences():
    params, adapters = setup()
    chosen = {n: adapters[n] for n in ("t", "u", "p")}
    rows = ["t", "p", "u", "__base__"]
    wrt = [*adapter_trainable_keys(TINY, chosen, ["t", "u", "p"]), WTE]
    kwargs = dict(adapters=chosen, adapter_names=rows)
    _, _, grads = rf.gpt2_loss_and_grads(params, TINY, MIXED_IDS, MIXED_LABELS, wrt=wrt, **kwargs)
    rng = np.random.default_rng(2)
    h = 1e-6
    for key in wrt:
        name, file_key = split_key(key)
        value = params[key] if name is None else chosen[name][1][file_key]
        for _ in range(4):
            index = tuple(int(rng.integers(s)) for s in value.shape)

            def loss_at(delta, value=value, index=index, name=name, file_key=file_key, key=key):
                bumped = value.copy()
                bumped[index] += delta
                if name is None:
                    return rf.gpt2_loss_and_grads({**params, key: bumped}, TINY, MIXED_IDS, MIXED_LABELS, wrt=[],
                                                  **kwargs)[0]  # fmt: skip
                changed = {**chosen, name: (chosen[name][0], {**chosen[name][1], file_key: bumped})}
                return rf.gpt2_loss_and_grads(params, TINY, MIXED_IDS, MIXED_LABELS, wrt=[], adapters=changed,
                                              adapter_names=rows)[0]  # fmt: skip

            fd = (loss_at(h) - loss_at(-h)) / (2 * h)
            assert abs(fd - grads[key][index]) <= 1e-7 * max(1.0, np.abs(grads[key]).max()), (key, index)
    # wte's rows that t and u replace still reach the samples of the other groups: not zero in a mixed batch
    assert np.abs(grads[WTE][[1, 2, 5]]).max() > 1e-6


def test_mixed_batch_matches_peft_autograd_where_peft_runs():
    """PEFT 0.21.2 honours adapter_names per row in the lookup and the tied head when every row names an adapter
    with trainable tokens or "__base__" (TrainableTokensWrapper._mixed_batch_forward): gradients at 1e-10."""
    pytest.importorskip("peft")
    from conformance.drivers.peft_bridge import run_peft_adapters

    params, adapters = setup()
    chosen = {n: adapters[n] for n in ("t", "u", "p")}
    rows = ["u", "__base__", "t", "u"]
    acting = ["t", "u"]
    wrt = [*adapter_trainable_keys(TINY, chosen, acting), WTE]
    loss, logits, grads = rf.gpt2_loss_and_grads(
        params, TINY, MIXED_IDS, MIXED_LABELS, wrt=wrt, adapters=chosen, adapter_names=rows
    )
    ref = run_peft_adapters(TINY, params, chosen, MIXED_IDS, adapter_names=rows, labels=MIXED_LABELS, wrt=wrt)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-10)
    assert abs(float(loss) - float(ref["loss"])) <= 1e-10
    for key in wrt:
        np.testing.assert_allclose(grads[key], ref[f"grad/{key}"], rtol=0, atol=1e-10, err_msg=key)


def test_documented_peft_deviation_d13_mixed_batch_row_of_a_plain_adapter():
    """D13: with a trainable-tokens adapter in the model, a row that names a plain LoRA adapter makes PEFT 0.21.2
    raise KeyError (TrainableTokensLayer.get_merged_weights reads token_indices[name]); reflora runs that row
    with wte's own rows and the plain adapter's LoRA."""
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"deviation D13 is documented for PEFT 0.21.2, found {peft.__version__}")
    import torch

    from conformance.drivers.peft_bridge import build_peft_adapters

    params, adapters = setup()
    chosen = {n: adapters[n] for n in ("t", "p")}
    model = build_peft_adapters(TINY, params, chosen).eval()
    with pytest.raises(KeyError, match="'p'"), torch.no_grad():
        model(input_ids=torch.from_numpy(MIXED_IDS), adapter_names=["t", "p", "__base__", "t"])
    logits = rf.gpt2_forward(params, TINY, MIXED_IDS, adapters=chosen, adapter_names=["t", "p", "__base__", "t"])[0]
    alone = rf.gpt2_forward(params, TINY, MIXED_IDS[1:2], adapters=chosen, active=["p"])[0]
    np.testing.assert_allclose(logits[1:2], alone, rtol=0, atol=1e-14)


def test_mixed_batch_with_lora_on_wte_next_to_trainable_tokens_is_refused():
    params, adapters = setup()
    embedding = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["wte", "c_fc"])
    adapters["e"] = (embedding, init_adapter(params, TINY, embedding, np.random.default_rng(3), init="test")[0])
    with pytest.raises(InputError, match="adapter 't' has trainable_token_indices and adapter 'e' has LoRA"):
        rf.gpt2_forward(params, TINY, IDS, adapters={n: adapters[n] for n in ("t", "e")}, adapter_names=["t", "e"])
