"""LoRA on ``wte`` (PEFT ``lora.Embedding``): the op and the whole model against finite differences in float64.

The model's gradients of ``lora_embedding_A`` / ``lora_embedding_B``, every base tensor (``wte`` tied: head plus
lookup) and the other adapters are checked elementwise with the fourth-order stencil of
tests/test_model_finite_differences.py (tolerance 1e-8 relative); the PEFT autograd cross-check is in
tests/test_peft_crosscheck.py (EXPLICIT_CASES, "LoRA on wte ...").
"""

from __future__ import annotations

import numpy as np
import pytest

import reflora as rf
from reflora.ops import lora_embedding_backward, lora_embedding_forward
from tests.test_model_finite_differences import (
    RTOL_ELEMENTWISE,
    TINY,
    make_case,
    numerical_gradient,
    relative_error,
)

WTE_A = "base_model.model.transformer.wte.lora_embedding_A"
WTE_B = "base_model.model.transformer.wte.lora_embedding_B"


def test_op_matches_finite_differences_and_the_weight_delta():
    rng = np.random.default_rng(0)
    vocab, c, r, s = 7, 5, 3, 1.7
    ids = np.array([[0, 3, 3, 6], [1, 3, 0, 0]])  # repeated ids accumulate
    A, B = rng.standard_normal((r, vocab)), rng.standard_normal((c, r))
    g = rng.standard_normal((2, 4, c))
    delta, cache = lora_embedding_forward(ids, A, B, s)
    np.testing.assert_allclose(delta, (s * (B @ A)).T[ids], rtol=1e-14)  # ΔW = s (B A)ᵀ, looked up
    dA, dB = lora_embedding_backward(g, cache, A, B, s)

    def f():
        return float(np.sum(g * lora_embedding_forward(ids, A, B, s)[0]))

    assert relative_error(dA, numerical_gradient(f, A)) <= RTOL_ELEMENTWISE
    assert relative_error(dB, numerical_gradient(f, B)) <= RTOL_ELEMENTWISE
    assert np.all(dA[:, [2, 4, 5]] == 0)  # ids never looked up get no gradient


def wte_case():
    lora = rf.LoraConfig(r=2, lora_alpha=3.0, target_modules=["wte", "c_fc"], lora_dropout=0.25, use_rslora=True,
                         rank_pattern={"wte": 3}, bias="lora_only")  # fmt: skip
    return make_case(TINY, lora, seed=21, position_ids="per_row")


def test_model_gradients_with_lora_on_wte_match_finite_differences():
    case = wte_case()
    assert set(case.dropout_masks) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}  # none for wte
    assert case.adapter[WTE_A].shape == (3, TINY.vocab_size) and case.adapter[WTE_B].shape == (TINY.n_embd, 3)
    wrt = list(case.adapter) + list(rf.base_shapes(case.config))
    grads = case.gradients(wrt)
    errors = {key: relative_error(grads[key], numerical_gradient(case.objective, case.tensor(key))) for key in wrt}
    bad = {k: f"{e:.2e}" for k, e in errors.items() if e > RTOL_ELEMENTWISE}
    assert not bad, f"gradients off (relative error > {RTOL_ELEMENTWISE:.0e}): {bad}"
    for key in (WTE_A, WTE_B, "transformer.wte.weight"):  # asking for one key alone gives the same answer
        alone = case.gradients([key])
        np.testing.assert_allclose(alone[key], grads[key], rtol=1e-14, atol=1e-15 * np.max(np.abs(grads[key])))


def test_tied_head_keeps_the_base_wte():
    """The head computes ln_f(x) @ Wᵀ with the base W, never W + ΔW (PEFT: lm_head.weight is the base weight)."""
    case = wte_case()
    logits, cache = rf.gpt2_forward(case.params, case.config, case.input_ids, **case.forward_kwargs())
    np.testing.assert_allclose(
        logits.reshape(-1, TINY.vocab_size), cache["hf"] @ case.params["transformer.wte.weight"].T
    )


def test_trainable_keys_and_dropout_masks_leave_wte_out():
    lora = rf.LoraConfig(r=2, target_modules=["wte"], bias="lora_only", lora_dropout=0.5)
    assert rf.trainable_keys(TINY, lora) == [WTE_A, WTE_B]  # lora_only: wte has no bias
    assert rf.draw_dropout_masks(rf.plan_lora(TINY, lora), 0.5, 2, 3, np.random.default_rng(0)) == {}
    case = make_case(TINY, lora, seed=3)
    bad = {"transformer.wte": np.ones((3, 5, TINY.vocab_size))}
    with pytest.raises(rf.InputError, match=r"unexpected \['transformer.wte'\]"):
        rf.gpt2_forward(case.params, TINY, case.input_ids, adapter=case.adapter, lora=lora, dropout_masks=bad)


def test_peft_default_init_on_wte_is_a_zero_and_b_normal():
    plan = rf.plan_lora(TINY, rf.LoraConfig(r=2, target_modules=["wte"]))
    adapter = rf.init_lora_adapter(plan, np.random.default_rng(0), init=True)
    assert np.all(adapter[WTE_A] == 0) and np.all(adapter[WTE_B] != 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"use_dora": True}, "use_dora"), ({"lora_bias": True}, "lora_bias"),
     ({"init_lora_weights": "gaussian"}, "init_lora_weights")],
)  # fmt: skip
def test_unsupported_combinations_on_wte_are_refused(fields, message):
    with pytest.raises(rf.ConfigError, match=message):
        rf.plan_lora(TINY, rf.LoraConfig(r=2, target_modules=["wte"], **fields))


# ----------------------------------------------------------------------------------------------
# trainable_token_indices (PEFT TrainableTokens on the tied wte)
# ----------------------------------------------------------------------------------------------

TOKENS = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"


@pytest.mark.parametrize("indices", [[3, 1, 10], {"wte": [0, 7]}, {"transformer.wte": [4]}])
def test_trainable_tokens_gradients_match_finite_differences(indices):
    lora = rf.LoraConfig(r=2, lora_alpha=3.0, target_modules=["c_attn"], trainable_token_indices=indices,
                         lora_dropout=0.25)  # fmt: skip
    case = make_case(TINY, lora, seed=22, position_ids="per_row")
    ids = indices if isinstance(indices, list) else next(iter(indices.values()))
    assert case.adapter[TOKENS].shape == (len(ids), TINY.n_embd)
    assert rf.trainable_keys(TINY, lora)[0] == TOKENS
    wrt = list(case.adapter) + list(rf.base_shapes(case.config))
    grads = case.gradients(wrt)
    errors = {key: relative_error(grads[key], numerical_gradient(case.objective, case.tensor(key))) for key in wrt}
    bad = {k: f"{e:.2e}" for k, e in errors.items() if e > RTOL_ELEMENTWISE}
    assert not bad, f"gradients off (relative error > {RTOL_ELEMENTWISE:.0e}): {bad}"
    assert np.all(grads["transformer.wte.weight"][ids] == 0)  # the replaced rows of W are used nowhere


def test_trainable_tokens_replace_rows_in_the_lookup_and_the_tied_head():
    lora = rf.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[2, 5])
    case = make_case(TINY, lora, seed=23)
    logits, cache = rf.gpt2_forward(case.params, TINY, case.input_ids, adapter=case.adapter, lora=lora)
    new_wte = case.params["transformer.wte.weight"].copy()
    new_wte[[2, 5]] = case.adapter[TOKENS]
    np.testing.assert_array_equal(cache["wte"], new_wte)
    np.testing.assert_allclose(logits.reshape(-1, TINY.vocab_size), cache["hf"] @ new_wte.T)


def test_peft_init_of_trainable_tokens_is_the_base_rows():
    lora = rf.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[2, 5])
    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    adapter, _ = rf.init_adapter(params, TINY, lora, np.random.default_rng(1))
    np.testing.assert_array_equal(adapter[TOKENS], params["transformer.wte.weight"][[2, 5]])


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"trainable_token_indices": [1, 1]}, "repeats"), ({"trainable_token_indices": [99]}, "vocab_size"),
     ({"trainable_token_indices": {"lm_head": [1]}}, "wte only"),
     ({"trainable_token_indices": [1], "target_modules": ["wte"]}, "cannot be combined")],
)  # fmt: skip
def test_trainable_tokens_bad_configs_are_refused(fields, message):
    with pytest.raises(rf.ConfigError, match=message):
        rf.plan_lora(TINY, rf.LoraConfig(**{"r": 2, "target_modules": ["c_attn"], **fields}))
