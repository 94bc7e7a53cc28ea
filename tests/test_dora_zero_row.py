"""A DoRA row of zero norm in the merge, the unmerge and DoRA's init (docs/advanced-semantics.md, DoRA, "A row
of zero norm"): the reference's answers (merged row 0, unmerge exact, magnitude 0 and output = base at init) and
PEFT 0.21.2's NaN there (deviation D10, PEFT #2049), on the cases of ``model.merge.dora_zero_row`` and
``model.dora.init_zero_row``."""

from __future__ import annotations

import numpy as np
import pytest

import reflora as rf
from conformance import expectations
from conformance.cases import build_advanced_case
from reflora.lora_init import init_adapter
from reflora.merge import merge_adapters, unmerge_adapters

TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=1, n_head=3, n_inner=10)
MODULE = "transformer.h.0.mlp.c_fc"


def dora_case(cancel: bool):
    """params and a DoRA adapter whose row 3 of c_fc's Wt + s·B A is exactly zero: W's column 3 and B's row 3
    zeroed, or (``cancel``) W's column 3 set to −s·(B A)_3 with B's row nonzero."""
    rng = np.random.default_rng(5)
    params = rf.init_gpt2_params(TINY, rng)
    lora = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], use_dora=True)
    tensors, _ = init_adapter(params, TINY, lora, rng, init="test")
    module = rf.plan_lora(TINY, lora)[MODULE]
    (branch,) = module.branches
    weight = params[f"{MODULE}.weight"].copy()  # (in, out)
    if cancel:
        weight[:, 3] = -module.scaling * (tensors[branch.b_key] @ tensors[branch.a_key])[3]
    else:
        weight[:, 3] = 0.0
        tensors = {**tensors, branch.b_key: tensors[branch.b_key].copy()}
        tensors[branch.b_key][3, :] = 0.0
    return {**params, f"{MODULE}.weight": weight}, {"d": (lora, tensors)}


@pytest.mark.parametrize("cancel", [False, True])
def test_merge_writes_a_zero_row_and_unmerge_restores_it(cancel):
    params, adapters = dora_case(cancel)
    merged, record = merge_adapters(params, TINY, adapters)
    assert np.all(merged[f"{MODULE}.weight"][:, 3] == 0.0)  # c_3 = 0
    assert all(np.isfinite(v).all() for v in merged.values())
    with np.errstate(all="raise"):  # no 0/0 on the way
        restored = unmerge_adapters(merged, TINY, adapters, record)
    for key in params:
        np.testing.assert_allclose(restored[key], params[key], rtol=0, atol=1e-15, err_msg=key)
    ids = np.array([[1, 4, 2]])
    np.testing.assert_allclose(rf.gpt2_forward(merged, TINY, ids)[0],
                               rf.gpt2_forward(params, TINY, ids, adapters=adapters)[0], rtol=0, atol=1e-13)  # fmt: skip


def with_zero_row(lora: rf.LoraConfig, params, seed: int):
    """A second adapter (``init="test"``) whose B row 3 on c_fc is zeroed, so c_fc's row 3 stays of zero norm
    whatever the merge order."""
    tensors, _ = init_adapter(params, TINY, lora, np.random.default_rng(seed), init="test")
    (branch,) = rf.plan_lora(TINY, lora)[MODULE].branches
    tensors[branch.b_key] = tensors[branch.b_key].copy()
    tensors[branch.b_key][3, :] = 0.0
    return lora, tensors


@pytest.mark.parametrize("second", ["lora", "dora"])
@pytest.mark.parametrize("first", [True, False])
def test_a_zero_row_with_a_second_adapter_merges_and_unmerges_exactly(second, first):
    """DoRA + LoRA and two DoRA adapters on c_fc, in either order: merged row 0 (no NaN), unmerge exact."""
    params, adapters = dora_case(False)
    lora = rf.LoraConfig(r=2, lora_alpha=5, target_modules=["c_fc", "c_attn"], use_dora=second == "dora")
    other = {"e": with_zero_row(lora, params, 9)}
    adapters = {**adapters, **other} if first else {**other, **adapters}
    with np.errstate(all="raise"):
        merged, record = merge_adapters(params, TINY, adapters)
        restored = unmerge_adapters(merged, TINY, adapters, record)
    assert np.all(merged[f"{MODULE}.weight"][:, 3] == 0.0)
    assert all(np.isfinite(v).all() for v in merged.values())
    for key in params:
        np.testing.assert_allclose(restored[key], params[key], rtol=0, atol=1e-14, err_msg=key)
    ids = np.array([[1, 4, 2]])
    np.testing.assert_allclose(rf.gpt2_forward(merged, TINY, ids)[0],
                               rf.gpt2_forward(params, TINY, ids, adapters=adapters)[0], rtol=0, atol=1e-12)  # fmt: skip


def test_dora_init_on_a_zero_row_has_magnitude_zero_and_output_base():
    rng = np.random.default_rng(2)
    params = rf.init_gpt2_params(TINY, rng)
    params[f"{MODULE}.weight"][:, 3] = 0.0
    lora = rf.LoraConfig(r=2, lora_alpha=3, target_modules=["c_fc"], use_dora=True)
    tensors, used = init_adapter(params, TINY, lora, rng)
    magnitude = tensors[rf.plan_lora(TINY, lora)[MODULE].magnitude_key]
    assert magnitude[3] == 0.0 and np.all(magnitude[np.arange(10) != 3] > 0)
    ids = np.array([[1, 4, 2, 7]])
    with np.errstate(all="raise"):
        logits = rf.gpt2_forward(used, TINY, ids, adapter=tensors, lora=lora)[0]
    np.testing.assert_allclose(logits, rf.gpt2_forward(params, TINY, ids)[0], rtol=0, atol=1e-15)


SPECS = {
    "model.merge.dora_zero_row": {
        "adapters": {"d": {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_attn", "c_fc"], "use_dora": True}},
        "active": ["d"], "zero_norm_row": {"module": 1, "row": 5}, "labels": True,
    },
    "model.dora.init_zero_row": {
        "adapters": {}, "labels": False, "zero_weight_row": {"module": 2, "row": 5},
        "init": {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                 "use_dora": True, "init_lora_weights": True},
    },
}  # fmt: skip


def feature_spec(feature: str) -> dict:
    n_layer = 2 if "init" in feature else 1
    return {"feature": feature, "seed": 1, "dtype": "float64", "batch": 2, "seq_len": 3,
            "gpt2": {"vocab_size": 23, "n_positions": 16, "n_embd": 8 * n_layer, "n_layer": n_layer, "n_head": 2},
            **SPECS[feature]}  # fmt: skip


def test_reference_expectations_are_finite():
    merge = expectations.merge_expectation(build_advanced_case(feature_spec("model.merge.dora_zero_row")), "float64")
    assert all(np.isfinite(v).all() for v in [merge["logits"], merge["merged_logits"], *merge["merged"].values()])
    case = build_advanced_case(feature_spec("model.dora.init_zero_row"))
    init = expectations.init_expectation(case, "float64")
    assert np.isfinite(init["logits"]).all()
    assert sum(int(np.sum(m == 0)) for m in init["magnitude"].values()) == 1


@pytest.mark.torch
def test_documented_peft_deviation_d10_in_merge_and_init():
    """D10: PEFT 0.21.2's DoRA divides by the zero norm in its merge (the merged row and the unmerged row are
    NaN, and so are the logits) and in its forward at init (0/0: every logit NaN, the magnitude itself 0)."""
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"deviation D10 is documented for PEFT 0.21.2, found {peft.__version__}")
    from conformance.drivers.peft import driver

    case = build_advanced_case(feature_spec("model.merge.dora_zero_row"))
    got = driver.model_merge(case)
    weight = "transformer.h.0.mlp.c_fc.weight"
    assert np.isnan(got["merged"][weight]).sum() == 8  # one output row of the (in = 8, out) Conv1D weight
    assert np.isnan(got["unmerged"][weight]).sum() == 8
    assert np.isnan(got["logits"]).all() and np.isnan(got["merged_logits"]).all()
    case = build_advanced_case(feature_spec("model.dora.init_zero_row"))
    got = driver.init_adapter(case)
    assert np.isnan(got["logits"]).all()
    magnitudes = [v for k, v in got["adapter"].items() if k.endswith("lora_magnitude_vector")]
    assert sum(int(np.sum(m == 0)) for m in magnitudes) == 1 and not any(np.isnan(m).any() for m in magnitudes)
