"""``modules_to_save`` and ``ensure_weight_tying`` (PEFT 0.21.2 ModulesToSaveWrapper on GPT-2's tied head).

* The model's gradients of every saved copy, every other adapter tensor and every base tensor against finite
  differences in float64 (the fourth-order stencil of tests/test_model_finite_differences.py, 1e-8 relative).
* transformers + PEFT autograd against the reference at 1e-10 (float64) for the same configs (skipped without
  torch/peft).
* The adapter file: PEFT's keys (``base_model.model.<module>.weight``; tied: the copy twice) and a round trip
  through reflora's save/load; for the tied head (D11), PEFT reading reflora's file (the same logits) and reflora
  refusing PEFT's rewritten file.
* Bad configs: a clear ``ConfigError`` naming ``lora.modules_to_save`` / ``lora.ensure_weight_tying``; PEFT's
  tying rewrite (the first entry matching ``lm_head`` only) and its regex of an entry.
* The ``"test"`` init's draw order, and the backward's zero gradients (the replaced originals only).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import reflora as rf
from tests.test_model_finite_differences import (
    RTOL_ELEMENTWISE,
    TINY,
    make_case,
    numerical_gradient,
    relative_error,
)

pytest_plugins = ["pytester"]
P = "base_model.model."
WTE_COPY = P + "transformer.wte.weight"
HEAD_COPY = P + "lm_head.weight"

# (fields, the adapter keys of the copies) for the finite-difference and PEFT cross-checks
CONFIGS = {
    "conv1d_ln_wpe": ({"modules_to_save": ["attn.c_proj", "h.1.ln_2", "ln_f", "wpe"], "lora_dropout": 0.25},
                      [P + "transformer.h.0.attn.c_proj.weight", P + "transformer.h.1.ln_2.bias",
                       P + "transformer.ln_f.weight", P + "transformer.wpe.weight"]),
    "wte": ({"modules_to_save": ["wte"]}, [WTE_COPY]),
    "wte_tying_is_a_no_op": ({"modules_to_save": ["wte"], "ensure_weight_tying": True}, [WTE_COPY]),
    "lm_head": ({"modules_to_save": ["lm_head"]}, [HEAD_COPY]),
    "lm_head_tied": ({"modules_to_save": ["lm_head"], "ensure_weight_tying": True}, [WTE_COPY]),
    "both_untied": ({"modules_to_save": ["lm_head", "wte"]}, [WTE_COPY, HEAD_COPY]),
    "both_tied": ({"modules_to_save": ["lm_head", "wte"], "ensure_weight_tying": True}, [WTE_COPY]),
    "c_proj_saved_and_excluded": ({"target_modules": ["c_attn", "c_proj"], "modules_to_save": ["mlp.c_proj"],
                                   "bias": "lora_only"}, [P + "transformer.h.1.mlp.c_proj.weight"]),
}  # fmt: skip


# base tensors checked by finite differences besides the saved modules' originals (the rest: test_model_finite_differences)
BASE_CHECKED = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight")  # fmt: skip


def lora_for(name: str) -> rf.LoraConfig:
    fields, _ = CONFIGS[name]
    return rf.LoraConfig(**{"r": 2, "lora_alpha": 3.0, "target_modules": ["c_attn"], **fields})


def case_for(name: str, **kwargs):
    return make_case(TINY, lora_for(name), seed=31, position_ids="per_row", **kwargs)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_match_finite_differences(name):
    case = case_for(name)
    _, copies = CONFIGS[name]
    assert all(key in case.adapter for key in copies)
    trained = rf.trainable_keys(TINY, case.lora)
    assert set(copies) <= set(trained) and (HEAD_COPY in trained) == (name in ("lm_head", "both_untied"))
    wrt = list(case.adapter) + [k for k in rf.base_shapes(TINY) if k in BASE_CHECKED or P + k in case.adapter]
    grads = case.gradients(wrt)
    head, lookup = head_and_lookup(case)
    w = case.params["transformer.wte.weight"]
    wte_unused = head is not w and lookup is not w  # both use copies: the base W is used nowhere
    unused = [
        k for k in rf.base_shapes(TINY) if P + k in case.adapter and (k != "transformer.wte.weight" or wte_unused)
    ]
    assert all(not np.any(grads[k]) for k in unused)  # a replaced original gets gradient 0
    wrt = [k for k in wrt if k not in unused]
    errors = {key: relative_error(grads[key], numerical_gradient(case.objective, case.tensor(key))) for key in wrt}
    bad = {k: f"{e:.2e}" for k, e in errors.items() if e > RTOL_ELEMENTWISE}
    assert not bad, f"gradients off (relative error > {RTOL_ELEMENTWISE:.0e}): {bad}"
    for key in copies:  # asking for one key alone gives the same answer
        alone = case.gradients([key])
        np.testing.assert_allclose(alone[key], grads[key], rtol=1e-13, atol=1e-15 * np.max(np.abs(grads[key])))
        assert np.max(np.abs(grads[key])) > 0


def head_and_lookup(case):
    """(the head's W, the lookup's W) the reference used: from the logits and the cache."""
    logits, cache = rf.gpt2_forward(case.params, case.config, case.input_ids, **case.forward_kwargs())
    np.testing.assert_allclose(logits.reshape(-1, TINY.vocab_size), cache["hf"] @ cache["wte"].T, rtol=1e-13)
    return cache["wte"], cache["saved"]["lookup_w"]


@pytest.mark.parametrize(
    ("name", "head", "lookup"),
    [("wte", "base", WTE_COPY), ("lm_head", HEAD_COPY, "base"), ("lm_head_tied", WTE_COPY, WTE_COPY),
     ("both_untied", HEAD_COPY, WTE_COPY), ("both_tied", WTE_COPY, WTE_COPY), ("wte_tying_is_a_no_op", "base", WTE_COPY)],
)  # fmt: skip
def test_which_weight_the_head_and_the_lookup_use(name, head, lookup):
    case = case_for(name)
    w = case.params["transformer.wte.weight"]
    got_head, got_lookup = head_and_lookup(case)
    assert got_head is (w if head == "base" else case.adapter[head])
    assert got_lookup is (w if lookup == "base" else case.adapter[lookup])


def test_a_saved_original_gets_no_gradient_and_the_copy_replaces_it():
    case = case_for("conv1d_ln_wpe")
    grads = case.gradients(["transformer.ln_f.weight", "transformer.wpe.weight", P + "transformer.ln_f.weight"])
    assert not np.any(grads["transformer.ln_f.weight"]) and not np.any(grads["transformer.wpe.weight"])
    swapped = dict(case.params)  # the copies in the base, no modules_to_save: the same logits
    for key in case.adapter:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            swapped[key.removeprefix(P)] = case.adapter[key]
    plain = rf.LoraConfig(r=2, lora_alpha=3.0, target_modules=["c_attn"])
    lora_only = {k: v for k, v in case.adapter.items() if ".lora_" in k}
    a = rf.gpt2_forward(case.params, TINY, case.input_ids, adapter=case.adapter, lora=case.lora)[0]
    b = rf.gpt2_forward(swapped, TINY, case.input_ids, adapter=lora_only, lora=plain)[0]
    np.testing.assert_array_equal(a, b)


def test_peft_init_copies_the_base_and_the_saved_module_gets_no_lora():
    lora = rf.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], modules_to_save=["mlp.c_proj", "lm_head"])
    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    adapter, _ = rf.init_adapter(params, TINY, lora, np.random.default_rng(1))
    assert not any("mlp.c_proj.lora_" in k for k in adapter)  # PEFT: a saved module is excluded from LoRA
    np.testing.assert_array_equal(adapter[HEAD_COPY], params["transformer.wte.weight"])
    np.testing.assert_array_equal(
        adapter[P + "transformer.h.0.mlp.c_proj.bias"], params["transformer.h.0.mlp.c_proj.bias"]
    )
    assert adapter[HEAD_COPY] is not params["transformer.wte.weight"]


# ----------------------------------------------------------------------------------------------
# the adapter file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv1d_ln_wpe", "wte", "lm_head", "lm_head_tied", "both_untied"])
def test_adapter_file_round_trip_with_peft_keys(tmp_path, name):
    from safetensors.numpy import load_file

    case = case_for(name)
    rf.save_adapter(tmp_path, case.adapter, case.lora, TINY)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    expected = set(case.adapter) | ({HEAD_COPY} if case.lora.ensure_weight_tying else set())  # tied: saved twice
    assert keys == expected
    adapter, lora, _ = rf.load_adapter(tmp_path, TINY)
    assert (lora.modules_to_save, lora.ensure_weight_tying) == (
        case.lora.modules_to_save,
        case.lora.ensure_weight_tying,
    )
    assert set(adapter) == set(case.adapter)
    for key, value in case.adapter.items():
        np.testing.assert_array_equal(adapter[key], value)


def test_a_tied_file_whose_two_copies_differ_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    case = case_for("lm_head_tied")
    rf.save_adapter(tmp_path, case.adapter, case.lora, TINY)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors[HEAD_COPY] = tensors[HEAD_COPY] + 1.0
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(rf.CheckpointError, match=r"lm_head\.weight"):
        rf.load_adapter(tmp_path, TINY)


# ----------------------------------------------------------------------------------------------
# bad configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"modules_to_save": ["c_attn"]}, "covers every module"),
     ({"modules_to_save": ["nothere"]}, "matches no module"),
     ({"modules_to_save": ["mlp"]}, "holds sub-modules"),
     ({"modules_to_save": ["drop"]}, "has no parameters"),
     ({"modules_to_save": ["proj"], "target_modules": ["c_proj"]}, "also adapts with LoRA"),
     ({"modules_to_save": ["base_layer"]}, "PEFT's own adapter layers"),
     ({"modules_to_save": ["wte"], "trainable_token_indices": [1]}, "trainable_token_indices"),
     ({"modules_to_save": ["lm_head"], "trainable_token_indices": [1]}, "trainable_token_indices"),
     ({"modules_to_save": ["ln_f"], "bias": "all"}, "bias='all'"),
     ({"modules_to_save": []}, "non-empty list"),
     ({"modules_to_save": "wte"}, "list of module names"),
     ({"modules_to_save": ["ln_(f"]}, "valid regex"),
     ({"ensure_weight_tying": "yes"}, "ensure_weight_tying"),
     ({"modules_to_save": ["lm_head", "head"], "ensure_weight_tying": True}, "untied copy"),
     ({"ensure_weight_tying": True, "target_modules": ["c_attn", "lm_head"]}, "tied LoRA on the head")],
)  # fmt: skip
def test_bad_configs_are_refused_naming_the_field(fields, message):
    with pytest.raises(rf.ConfigError, match=message) as info:
        rf.plan_lora(TINY, rf.LoraConfig(**{"r": 2, "target_modules": ["c_attn"], **fields}))
    assert "lora.modules_to_save" in str(info.value) or "lora.ensure_weight_tying" in str(info.value)


def test_several_adapters_with_modules_to_save_are_refused():
    case = case_for("wte")
    other = rf.LoraConfig(r=2, target_modules=["c_fc"])
    other_adapter = rf.init_lora_adapter(rf.plan_lora(TINY, other), np.random.default_rng(0))
    with pytest.raises(rf.InputError, match="modules_to_save"):
        rf.gpt2_forward(case.params, TINY, case.input_ids,
                        adapters={"a": (case.lora, case.adapter), "b": (other, other_adapter)})  # fmt: skip


@pytest.mark.parametrize("name", ["lm_head_tied", "conv1d_ln_wpe"])
def test_one_named_adapter_gives_the_same_gradients_under_qualified_keys(name):
    case = case_for(name)
    kwargs = {"attention_mask": case.attention_mask, "position_ids": case.position_ids}
    _, _, plain = rf.gpt2_loss_and_grads(case.params, TINY, case.input_ids, case.labels, adapter=case.adapter,
                                         lora=case.lora, **kwargs)  # fmt: skip
    _, _, named = rf.gpt2_loss_and_grads(case.params, TINY, case.input_ids, case.labels,
                                         adapters={"a": (case.lora, case.adapter)}, **kwargs)  # fmt: skip
    assert set(named) == {f"a:{k}" for k in plain}
    for key, value in plain.items():
        np.testing.assert_allclose(named[f"a:{key}"], value, rtol=1e-13, atol=0)


def test_peft_json_fields_are_read_and_old_specs_keep_their_bytes():
    lora = rf.LoraConfig.from_dict({"r": 2, "target_modules": ["c_attn"], "modules_to_save": ["lm_head"],
                                    "ensure_weight_tying": True})  # fmt: skip
    assert lora.modules_to_save == ("lm_head",) and lora.ensure_weight_tying is True
    assert lora.to_dict()["modules_to_save"] == ["lm_head"]
    plain = rf.LoraConfig.from_dict({"r": 2, "modules_to_save": None, "ensure_weight_tying": None})
    assert "modules_to_save" not in plain.to_dict() and "ensure_weight_tying" not in plain.to_dict()


# ----------------------------------------------------------------------------------------------
# PEFT autograd (transformers 5.24 + PEFT 0.21.2), float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_autograd_agrees_to_1e_10(name):
    pytest.importorskip("peft")
    from conformance.drivers import peft_bridge as bridge

    case = case_for(name, weight_std=0.02)
    wrt = [*rf.trainable_keys(TINY, case.lora), "transformer.wte.weight", "transformer.ln_f.weight"]
    loss, logits, grads = rf.gpt2_loss_and_grads(case.params, TINY, case.input_ids, case.labels, wrt=wrt,
                                                 **case.forward_kwargs())  # fmt: skip
    got = bridge.run_peft(TINY, case.params, case.lora, case.adapter, case.input_ids, labels=case.labels,
                          attention_mask=case.attention_mask, position_ids=case.position_ids,
                          dropout_masks=case.dropout_masks, wrt=wrt)  # fmt: skip
    scale = np.max(np.abs(logits))
    assert np.max(np.abs(got["logits"] - logits)) <= 1e-10 * scale
    assert abs(float(got["loss"]) - float(loss)) <= 1e-10 * abs(float(loss))
    for key in wrt:
        g = grads[key]
        assert np.max(np.abs(got[f"grad/{key}"] - g)) <= 1e-10 * max(np.max(np.abs(g)), 1e-30), key
    model = bridge.build_peft_model(TINY, case.params, case.lora, case.adapter)
    assert set(bridge.trainable_parameters(model)) == set(rf.trainable_keys(TINY, case.lora))


# ----------------------------------------------------------------------------------------------
# faulty candidates (tests/mutants/tied.py) fail their feature and pass model.forward_backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutant", ["WteCopyTiesHead", "HeadCopyIgnored"])
def test_the_suite_catches_a_faulty_modules_to_save(pytester, monkeypatch, mutant):
    from pathlib import Path

    from mutants import tied
    from test_conformance_mutants import results_by_feature, run_suite

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cls = getattr(tied, mutant)
    report, _ = run_suite(pytester, f"mutants.tied:{mutant}", "--isolation", "none", "-k",
                          "modules_to_save or forward_backward")  # fmt: skip
    results = results_by_feature(report)
    missed = sorted(f for f in cls.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant} was not caught by {missed}: {results}"
    assert results.get("model.forward_backward") == "pass", results
    assert results.get("model.modules_to_save.module") == "pass", results


def test_documented_peft_deviation_tied_modules_to_save_file(tmp_path):
    """D11 (docs/advanced-semantics.md): PEFT 0.21.2 saves the rewritten list ['transformer.wte'] with both copies."""
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"documented for PEFT 0.21.2, found {peft.__version__}")
    import json
    import warnings

    from conformance.drivers import peft_bridge as bridge

    case = case_for("lm_head_tied", weight_std=0.02)
    model = bridge.build_peft_model(TINY, case.params, case.lora, case.adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["transformer.wte"]
    with pytest.raises(rf.CheckpointError, match=r"unexpected \['base_model\.model\.lm_head\.weight'\]"):
        rf.load_adapter(tmp_path, TINY)
    # reflora's own file of the same adapter keeps ['lm_head'] and PEFT reads it back tied, with the same logits
    rf.save_adapter(tmp_path / "reflora", case.adapter, case.lora, TINY)
    base = bridge.build_hf_model(TINY, case.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "reflora")).eval()
    inner = loaded.base_model.model
    assert type(inner.lm_head).__name__ == "ModulesToSaveWrapper"
    import torch

    with torch.no_grad():
        logits = loaded(input_ids=torch.from_numpy(case.input_ids)).logits.numpy()
    expected = rf.gpt2_forward(case.params, TINY, case.input_ids, adapter=case.adapter, lora=case.lora)[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the tying rewrite, entry regexes, the "test" draw order, zero gradients
# ----------------------------------------------------------------------------------------------


def test_the_tying_rewrite_removes_only_the_first_entry_matching_lm_head():
    """PEFT 0.21.2 ``_add_modules_to_save_to_tie``: ``for m in modules_to_save: if re.match(...): remove; break``."""
    from reflora.targets import saved_entries_after_tying

    lora = rf.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head", "ln_f", "lm_head"],
                         ensure_weight_tying=True)  # fmt: skip
    assert saved_entries_after_tying(lora) == (["ln_f", "lm_head", "transformer.wte"], True)
    with pytest.raises(rf.ConfigError, match="untied copy"):  # the kept entry still wraps lm_head
        rf.plan_lora(TINY, lora)


def test_an_entry_is_checked_inside_peft_regex():
    """PEFT embeds an entry m in ``(^|.*\\.){m}($|\\..*)``: a global flag there is an error, and an entry that is
    no regex alone may complete PEFT's (``(ln_f\\``: the backslash escapes PEFT's ``(``, m's ``(`` takes its ``)``)."""
    with pytest.raises(rf.ConfigError, match=r"lora\.modules_to_save entry '\(\?i\)wte'"):
        rf.LoraConfig(r=2, modules_to_save=["(?i)wte"])
    with pytest.raises(re.error):
        re.compile("(ln_f\\")
    lora = rf.LoraConfig(r=2, modules_to_save=["(ln_f\\"])  # PEFT's combined pattern compiles
    with pytest.raises(rf.ConfigError, match="matches no module"):  # and no module name ends with it
        rf.plan_lora(TINY, lora)


@pytest.mark.parametrize("name", ["lm_head_tied", "both_tied", "both_untied", "conv1d_ln_wpe"])
def test_test_init_draws_as_init_lora_adapter(name):
    """``init_adapter(init="test")`` and the weight-free ``init_lora_adapter`` draw the same tensors in the same
    order: a tied head shares wte's copy and draws nothing (the next draw agrees too)."""
    lora = lora_for(name)
    params = rf.init_gpt2_params(TINY, np.random.default_rng(0))
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    a, _ = rf.init_adapter(params, TINY, lora, rng_a, init="test")
    b = rf.init_lora_adapter(rf.plan_lora(TINY, lora), rng_b)
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert rng_a.random() == rng_b.random()


def test_a_gradient_the_backward_did_not_compute_is_an_error_not_zero(monkeypatch):
    """Zeros only for the replaced originals (and wte when both head and lookup use copies)."""
    import reflora.model as model

    case = case_for("both_untied")
    wrt = ["transformer.wte.weight", *rf.trainable_keys(TINY, case.lora)]
    grads = rf.gpt2_loss_and_grads(case.params, TINY, case.input_ids, case.labels, wrt=wrt,
                                   **case.forward_kwargs())[2]  # fmt: skip
    assert not np.any(grads["transformer.wte.weight"])  # used nowhere: both copies replace it
    real = model.module_backward

    def drops_its_gradients(*args, **kwargs):
        return real(*args, **kwargs)[0], {}

    monkeypatch.setattr(model, "module_backward", drops_its_gradients)
    with pytest.raises(RuntimeError, match=r"no gradient for '.*lora_[AB]"):
        rf.gpt2_loss_and_grads(case.params, TINY, case.input_ids, case.labels, wrt=wrt, **case.forward_kwargs())
