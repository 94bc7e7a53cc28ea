"""The golden fixtures: the committed corpus verifies, its numbers agree with transformers + PEFT, the format is
what docs/golden-format.md says, and bad input is refused with an error that names the problem.

Reproduce a failing random-spec example with the spec it prints:
``reflora golden generate --spec spec.json --out /tmp/case.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from reflora import golden, gpt2_forward
from reflora.config import ConfigError, LoraConfig
from reflora.golden import (
    FORMAT,
    GoldenError,
    corpus_fixtures,
    default_golden_dir,
    draw_case,
    fixture_layout,
    generate_case,
    generate_corpus,
    gradient_floor,
    load_fixture,
    load_spec,
    read_fixture,
    read_manifest,
    relative_error,
    serialize_fixture,
    unpack_fixture,
    verify_corpus,
    verify_fixture,
    write_case,
)
from reflora.init import draw_dropout_masks, init_gpt2_params, init_lora_adapter
from reflora.targets import plan_lora
from reflora.tools import golden as golden_cli
from reflora.tools.cli import main as reflora_main

GOLDEN = default_golden_dir()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "golden-format.md"
# The minimum-case-count tripwire: a corpus that loads fewer cases (0 above all) can never pass.
MIN_CASES = 52
PEFT_RTOL = {"float64": 1e-10, "float32": 1e-4}  # replay through transformers + PEFT, relative to max|stored|
SMALL_GPT2 = {"vocab_size": 11, "n_positions": 8, "n_embd": 6, "n_layer": 2, "n_head": 2}


def cli_main(argv: list[str]) -> int:
    """``reflora golden ...`` through its own ``register`` only, so that another subcommand's import problem
    cannot fail these tests (``test_cli_verify_is_green`` goes through the real ``reflora`` entry point)."""
    import argparse

    parser = argparse.ArgumentParser(prog="reflora")
    golden_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def committed_case_names() -> list[str]:
    return sorted(read_manifest(GOLDEN)["cases"])


def small_spec(**overrides) -> dict:
    spec = {"gpt2": SMALL_GPT2, "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]}, "seed": 3}
    return {**spec, **overrides}


def copy_corpus(tmp_path: Path) -> Path:
    target = tmp_path / "golden"
    shutil.copytree(GOLDEN, target)
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# the committed corpus
# ----------------------------------------------------------------------------------------------


def test_verify_committed_corpus():
    report = verify_corpus(GOLDEN)
    problems = report.problems + [f"{c.name}: {p}" for c in report.cases for p in c.problems]
    assert not problems, "\n".join(problems)
    assert report.ok
    assert len(report.cases) == report.expected_cases >= MIN_CASES
    assert 0 < report.total_bytes < 20 * 1024 * 1024
    assert all(c.n_tensors > 0 for c in report.cases)


def test_cli_verify_is_green(capsys):
    assert reflora_main(["golden", "verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: ok" in out and "rtol 1e-12" in out


def test_corpus_covers_every_feature():
    """Deleting a case that is the only one with a feature fails here, not silently."""
    specs = [load_spec(e["spec"]) for e in read_manifest(GOLDEN)["cases"].values()]
    seen: set[str] = set()
    for spec in specs:
        lora = spec["lora"]
        if lora is None:
            seen.add("no lora (full fine-tuning)")
        else:
            from reflora.golden import spec_configs

            config, parsed = spec_configs(spec)
            plan = plan_lora(config, parsed)
            seen.update(f"module {m.kind}" for m in plan.values())
            seen.add(f"module set {sorted({m.kind for m in plan.values()})}")
            seen.add("regex targets" if isinstance(lora["target_modules"], str) else "list targets")
            if lora["target_modules"] is None:
                seen.add("default targets")
            if isinstance(lora["layers_to_transform"], list):
                seen.add("layers_to_transform list")
            if isinstance(lora["layers_to_transform"], int):
                seen.add("layers_to_transform int")
            seen.update(k for k in ("rank_pattern", "alpha_pattern") if lora[k])
            seen.add(f"bias {lora['bias']}")
            if lora["use_rslora"]:
                seen.add("rslora")
            if lora["lora_dropout"] > 0 and spec["dropout"] == "train":
                seen.add("dropout masks")
            if lora["lora_dropout"] > 0 and spec["dropout"] == "eval":
                seen.add("dropout eval")
            if any(m.r == min(m.in_features, m.out_features) for m in plan.values()):
                seen.add("full rank")
            if spec["reflora_lora"]["qkv_slices"] is not None:
                seen.add(f"qkv {spec['reflora_lora']['qkv_slices']}")
        seen.add(f"padding {spec['padding']}")
        seen.add(f"position_ids {spec['position_ids']}")
        seen.add(f"objective {spec['objective']}")
        seen.add(f"dtype {spec['dtype']}")
        if spec["ignore_label_fraction"] > 0:
            seen.add("ignored labels")
        if spec["padding"] != "none" and not spec["ignore_padding_labels"]:
            seen.add("padding labels counted")
        if spec["seq_len"] == 1:
            seen.add("T=1")
        if spec["batch_size"] == 1:
            seen.add("B=1")
        if spec["train_base"] and lora is not None:
            seen.add("lora + train_base")
        if lora is not None and lora["use_dora"]:
            seen.add("dora " + ("dropout masks" if lora["lora_dropout"] > 0 else "no dropout"))
        if spec["dora_full_gradient"]:
            seen.add("dora full gradient")
        if lora is not None and lora["lora_bias"]:
            seen.add("lora_bias")
        if spec["adapters"] and spec["adapter_names"] is None:
            seen.add("several active adapters")
        if spec["adapter_names"] is not None and "__base__" in spec["adapter_names"]:
            seen.add("mixed batch with __base__")
        if spec["merge"]:
            seen.add("merge " + ("dora" if lora["use_dora"] else "lora"))
        if spec["adapter_init"] == "peft":
            seen.add(f"init {lora['init_lora_weights']}")
        if spec["weighted"] is not None:
            seen.add(f"weighted {spec['weighted']['combination_type']}")
        if spec["scale_ops"]:
            seen.add("runtime scaling" + (" rslora" if lora["use_rslora"] else ""))
        if spec["merge"] and lora.get("trainable_token_indices"):
            seen.add("merge trainable tokens" + (" with another adapter" if spec["adapters"] else ""))
    required = {f"module {k}" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {
        "module set ['attn.c_proj', 'mlp.c_proj']", "module set ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']",
        "no lora (full fine-tuning)", "regex targets", "list targets", "default targets", "layers_to_transform list",
        "layers_to_transform int", "rank_pattern", "alpha_pattern", "bias none", "bias all", "bias lora_only", "rslora",
        "dropout masks", "dropout eval", "full rank", "qkv ['q', 'v']", "qkv ['q', 'k', 'v']", "qkv ['k']",
        "padding none", "padding left", "padding right", "padding random", "position_ids default",
        "position_ids from_mask", "position_ids random", "objective loss", "objective dlogits", "dtype float64",
        "dtype float32", "ignored labels", "padding labels counted", "T=1", "B=1", "lora + train_base",
        "dora no dropout", "dora dropout masks", "lora_bias", "several active adapters", "mixed batch with __base__",
        "dora full gradient", "merge lora", "merge dora", "init pissa", "init olora", "weighted cat", "weighted linear", "weighted svd",
        "weighted dare_ties", "weighted dare_linear_svd", "runtime scaling rslora",
        "merge trainable tokens with another adapter",
    }  # fmt: skip
    assert not required - seen, f"features no committed case covers: {sorted(required - seen)}"


def test_every_lora_B_is_nonzero():
    for name, path in corpus_fixtures(GOLDEN).items():
        case = load_fixture(path)
        rows = case.spec.get("zero_norm_rows", [])
        zeroed = {(f"base_model.model.{z['module']}.lora_B.weight", z["row"]) for z in rows}
        for key, value in (case.adapter or {}).items():
            if ".lora_B." in key:  # but the rows a spec's zero_norm_rows zeroes on purpose (a DoRA row of norm 0)
                value = np.delete(value, [row for k, row in zeroed if k == key], axis=0)
                assert np.all(value != 0), f"{name}: {key} has zeros (B must never be zero in a fixture)"


@pytest.mark.torch
def test_specs_are_accepted_by_transformers_and_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    for entry in read_manifest(GOLDEN)["cases"].values():
        transformers.GPT2Config(**entry["spec"]["gpt2"])
        if entry["spec"]["lora"] is not None:
            peft.LoraConfig(**entry["spec"]["lora"])  # raises on a field PEFT does not know


def test_inputs_follow_the_documented_derivation():
    """Re-derive every input of a rich case from the seed exactly as docs/golden-format.md lists the draws."""
    spec, stored = read_fixture(GOLDEN / "fixtures" / "kitchen_sink.safetensors")
    from reflora.golden import spec_configs

    config, lora = spec_configs(spec)
    b, t = spec["batch_size"], spec["seq_len"]
    rng = np.random.Generator(np.random.PCG64(spec["seed"]))
    params = init_gpt2_params(config, rng)
    plan = plan_lora(config, lora)
    adapter = init_lora_adapter(plan, rng, init="test")
    ids = rng.integers(0, config.vocab_size, size=(b, t))
    n_pad = rng.integers(1, t, size=b)
    mask = (np.arange(t)[None, :] >= n_pad[:, None]).astype(np.int64)  # left padding
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    labels = np.where(mask == 1, ids, -100)
    labels[rng.random((b, t)) < spec["ignore_label_fraction"]] = -100
    masks = draw_dropout_masks(plan, lora.lora_dropout, b, t, rng)
    expected = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    expected.update({f"base/{k}": v for k, v in params.items()})
    expected.update({f"adapter/{k}": v for k, v in adapter.items()})
    expected.update({f"dropout/{k}": v for k, v in masks.items()})
    inputs = {k: v for k, v in stored.items() if not (k in ("logits", "loss") or k.startswith("grad/"))}
    assert sorted(inputs) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(inputs[key], value, err_msg=key)


def test_advanced_inputs_follow_the_documented_derivation():
    """The additive draws: DoRA magnitudes after each module's A and B (m = ‖Wᵀ + s·B A‖ ⊙ U(0.5, 1.5)), extra
    adapters after the first in name order, their dropout masks after the first's, in name order."""
    from reflora.golden import spec_configs

    for name in ("dora_dropout", "multi_adapter_active"):
        spec, stored = read_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
        config, lora = spec_configs(spec)
        b, t = spec["batch_size"], spec["seq_len"]
        rng = np.random.Generator(np.random.PCG64(spec["seed"]))
        params = init_gpt2_params(config, rng)
        expected = {f"base/{k}": v for k, v in params.items()}
        loras = {"": lora}
        loras.update({f"{n}/": LoraConfig.from_dict({**e["lora"], **e["reflora_lora"]})
                      for n, e in sorted(spec["adapters"].items())})  # fmt: skip
        for prefix, adapter_lora in loras.items():
            plan = plan_lora(config, adapter_lora)
            for module_name, module in plan.items():  # the documented per-module draw, spelled out
                A_key, B_key = module.branches[0].a_key, module.branches[0].b_key
                A = rng.uniform(-1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features),
                                (module.r, module.in_features))  # fmt: skip
                B = rng.uniform(-1 / math.sqrt(module.r), 1 / math.sqrt(module.r), (module.out_features, module.r))
                expected[f"adapter/{prefix}{A_key}"], expected[f"adapter/{prefix}{B_key}"] = A, B
                if module.branches[0].bias_key is not None:
                    bound = 1 / math.sqrt(module.r)
                    expected[f"adapter/{prefix}{module.branches[0].bias_key}"] = rng.uniform(
                        -bound, bound, module.out_features
                    )
                if module.magnitude_key is not None:
                    V = params[f"{module_name}.weight"].T + module.scaling * B @ A
                    norm = np.sqrt((V * V).sum(axis=1))
                    expected[f"adapter/{module.magnitude_key}"] = norm * rng.uniform(0.5, 1.5, module.out_features)
        ids = rng.integers(0, config.vocab_size, size=(b, t))
        if spec["padding"] == "left":
            rng.integers(1, t, size=b)  # the attention mask's draw (its values are checked elsewhere)
        for prefix, adapter_lora in loras.items():
            if adapter_lora.lora_dropout > 0:
                masks = draw_dropout_masks(plan_lora(config, adapter_lora), adapter_lora.lora_dropout, b, t, rng)
                expected.update({f"dropout/{prefix}{k}": v for k, v in masks.items()})
        expected["input_ids"] = ids
        for key, value in expected.items():
            if key.startswith("adapter/") and key.endswith("lora_magnitude_vector"):
                np.testing.assert_allclose(stored[key], value, rtol=1e-14, atol=0, err_msg=f"{name}: {key}")
            else:
                np.testing.assert_array_equal(stored[key], value, err_msg=f"{name}: {key}")
        drawn = {k for k in stored if k.startswith(("adapter/", "dropout/"))}
        assert drawn == {k for k in expected if k.startswith(("adapter/", "dropout/"))}, name


def test_generate_keeps_fixtures_that_still_verify(tmp_path):
    """Regenerating, adding a case, or re-associated reference ops never change the bytes (sha256) of a committed
    fixture that still verifies; --force rewrites from a fresh regeneration."""
    golden = tmp_path / "golden"
    (golden / "fixtures").mkdir(parents=True)
    (golden / "cases").mkdir()
    names = ("kitchen_sink", "dora_dropout", "weighted_svd")
    for name in names:
        shutil.copy(GOLDEN / "cases" / f"{name}.json", golden / "cases")
        shutil.copy(GOLDEN / "fixtures" / f"{name}.safetensors", golden / "fixtures")
    (golden / "cases" / "zz_new.json").write_text(json.dumps(small_spec(merge=True)))
    manifest = generate_corpus(golden)
    committed = read_manifest(GOLDEN)["cases"]
    assert all(manifest["cases"][n]["sha256"] == committed[n]["sha256"] for n in names)
    assert manifest["case_count"] == len(names) + 1 and verify_corpus(golden).ok
    assert cli_main(["golden", "generate", "--dir", str(golden), "--force"]) == 0
    assert verify_corpus(golden).ok


def test_original_cases_store_no_additive_keys():
    """A case that does not use the additive keys stores its spec exactly as before they existed."""
    from reflora.golden import SPEC_DEFAULTS

    additive = ("adapter_init", "adapters", "adapter_names", "merge", "weighted", "dora_full_gradient")
    assert all(k in SPEC_DEFAULTS for k in additive)
    spec, _ = read_fixture(GOLDEN / "fixtures" / "kitchen_sink.safetensors")
    from safetensors import safe_open

    with safe_open(str(GOLDEN / "fixtures" / "kitchen_sink.safetensors"), framework="numpy") as handle:
        stored = json.loads(handle.metadata()["spec"])
    assert not set(additive) & set(stored)
    assert load_spec(stored) == spec


# ----------------------------------------------------------------------------------------------
# independent check: replay through transformers + PEFT (torch autograd, float64)
# ----------------------------------------------------------------------------------------------


def block_equivalent(case):
    """Per-slice q/k/v LoRA written as PEFT's full-matrix LoRA: on a module with k slices of rank r,
    A = [A_q; A_k; ...] (k·r, in) and B (3C, k·r) block-structured (B_s in its slice's rows and its own r
    columns, zero elsewhere), rank k·r and alpha chosen so the scaling is the same. Returns the PEFT-side
    config and adapter and, per per-slice key, (full key, row slice, column slice) of its gradient block."""
    plan = plan_lora(case.config, case.lora)
    adapter, blocks = dict(case.adapter), {}
    rank_pattern, alpha_pattern = {}, {}
    for name, module in plan.items():
        if case.lora.qkv_slices is None or module.kind != "attn.c_attn":
            continue
        r, k = module.r, len(module.branches)
        rank = k * r
        rank_pattern[re.escape(name)] = rank  # listed first: PEFT takes the first matching key
        alpha_pattern[re.escape(name)] = module.scaling * (math.sqrt(rank) if case.lora.use_rslora else rank)
        a_full, b_full = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
        A = np.zeros((rank, module.in_features))  # (k·r, in)
        B = np.zeros((module.out_features, rank))  # (3C, k·r)
        for j, branch in enumerate(module.branches):
            cols = slice(j * r, (j + 1) * r)
            rows = slice(branch.out_start, branch.out_stop)
            A[cols] = adapter.pop(branch.a_key)
            B[rows, cols] = adapter.pop(branch.b_key)
            blocks[branch.a_key] = (a_full, cols, slice(None))
            blocks[branch.b_key] = (b_full, rows, cols)
        adapter[a_full], adapter[b_full] = A, B
    peft_dict = case.lora.to_peft_dict()
    peft_dict["rank_pattern"] = {**rank_pattern, **peft_dict["rank_pattern"]}
    peft_dict["alpha_pattern"] = {**alpha_pattern, **peft_dict["alpha_pattern"]}
    return LoraConfig.from_dict(peft_dict), adapter, blocks


def uses_advanced_features(case) -> bool:
    """DoRA, lora_bias, several adapters, a mixed batch or a PEFT init: replayed with ``run_peft_adapters``."""
    lora = case.lora
    return lora is not None and (case.multi or lora.use_dora or lora.lora_bias or case.spec["adapter_init"] != "test")


def replay_adapters_with_peft(case) -> dict[str, float]:
    """``replay_with_peft`` through ``peft_bridge.run_peft_adapters``: every adapter under its name (the spec's
    own as PEFT's ``default``), all active or PEFT's mixed batch (``adapter_names``), per-adapter dropout masks
    injected, PEFT's autograd gradient (DoRA: PEFT's detached norm, as the fixture)."""
    from conformance.drivers.peft_bridge import run_peft_adapters
    from reflora.adapters import qualified_key, split_key
    from reflora.golden import DEFAULT_ADAPTER

    assert case.position_ids is None and case.spec["dropout"] == "train", "run_peft_adapters has no such input"
    kwargs = case.forward_kwargs()
    adapters = case.all_adapters()
    wrt = [k if split_key(k)[0] is not None or k in case.params else qualified_key(DEFAULT_ADAPTER, k)
           for k in case.wrt]  # fmt: skip
    ref = run_peft_adapters(
        case.config, case.params, adapters, case.input_ids, adapter_names=case.adapter_names,
        labels=case.labels, dlogits=case.dlogits, attention_mask=case.attention_mask,
        dropout_masks=kwargs["dropout_masks"] if case.multi else ({DEFAULT_ADAPTER: case.dropout_masks}
                                                                   if case.dropout_masks else None),
        wrt=wrt, dtype=case.spec["dtype"],
    )  # fmt: skip
    floor = gradient_floor(g.astype(np.float64) for g in case.grads.values())
    errors = {"logits": relative_error(ref["logits"], case.logits.astype(np.float64))}
    if case.loss is not None:
        errors["loss"] = relative_error(ref["loss"], case.loss.astype(np.float64))
    for key, peft_key in zip(case.wrt, wrt, strict=True):
        errors[key] = relative_error(ref[f"grad/{peft_key}"], case.grads[key].astype(np.float64), floor)
    return errors


def replay_with_peft(case) -> dict[str, float]:
    """relative_error(PEFT, stored) for logits, loss and every stored gradient of a ``GoldenCase``."""
    from conformance.drivers.peft_bridge import run_peft

    if uses_advanced_features(case):
        return replay_adapters_with_peft(case)
    lora, adapter, blocks = case.lora, case.adapter, {}
    if lora is not None and lora.qkv_slices is not None:
        lora, adapter, blocks = block_equivalent(case)
    if lora is not None and case.dropout_masks is None and lora.lora_dropout > 0:
        # eval mode: run_peft puts the model in train mode, where PEFT would draw its own dropout
        lora = dataclasses.replace(lora, lora_dropout=0.0)
    wrt = list(dict.fromkeys(blocks.get(k, (k,))[0] for k in case.wrt))
    ref = run_peft(
        case.config, case.params, lora, adapter, case.input_ids, labels=case.labels, dlogits=case.dlogits,
        attention_mask=case.attention_mask, position_ids=case.position_ids, dropout_masks=case.dropout_masks,
        wrt=wrt, dtype=case.spec["dtype"], scale_ops=case.spec.get("scale_ops") or (),
    )  # fmt: skip
    floor = gradient_floor(g.astype(np.float64) for g in case.grads.values())
    errors = {"logits": relative_error(ref["logits"], case.logits.astype(np.float64))}
    if case.loss is not None:
        errors["loss"] = relative_error(ref["loss"], case.loss.astype(np.float64))
    for key, stored in case.grads.items():
        if key in blocks:
            full, rows, cols = blocks[key]
            computed = ref[f"grad/{full}"][rows, cols]
        else:
            computed = ref[f"grad/{key}"]
        errors[key] = relative_error(computed, stored.astype(np.float64), floor)
    return errors


@pytest.mark.torch
@pytest.mark.parametrize("name", committed_case_names())
def test_committed_fixture_agrees_with_peft(name):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    errors = replay_with_peft(case)
    assert len(errors) == 1 + (case.loss is not None) + len(case.wrt)
    if case.spec.get("zero_norm_rows"):  # D10 (docs/advanced-semantics.md): PEFT divides by the zero norm
        import peft

        if peft.__version__ != "0.21.2":
            pytest.skip(f"deviation D10 is documented for PEFT 0.21.2, found {peft.__version__}")
        assert all(np.isnan(e) for e in errors.values()), f"{name}: PEFT no longer returns NaN (D10): {errors}"
        return
    rtol = PEFT_RTOL[case.spec["dtype"]]
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= rtol}
    assert not bad, f"{name}: transformers + PEFT disagree with the stored fixture (rtol {rtol:.0e}): {bad}"


def advanced_case_names(key: str) -> list[str]:
    """Committed cases whose spec sets the additive key ``key`` away from its default."""
    from reflora.golden import SPEC_DEFAULTS

    cases = read_manifest(GOLDEN)["cases"]
    return sorted(n for n, e in cases.items() if load_spec(e["spec"])[key] != SPEC_DEFAULTS[key])


def peft_model_of(case):
    """transformers + PEFT (float64) holding the case's base and every adapter, all adapters active."""
    from conformance.drivers.peft_bridge import build_peft_adapters

    model = build_peft_adapters(case.config, case.params, case.all_adapters())
    model.base_model.set_adapter(list(case.all_adapters()))
    return model.eval()


@pytest.mark.torch
@pytest.mark.parametrize("name", advanced_case_names("merge"))
def test_merged_fixture_agrees_with_peft_merge_and_unload(name):
    """merged/base/* against PEFT's own merge_and_unload, and merged/logits against plain transformers GPT-2
    loaded with PEFT's merged weights (float64, rtol 1e-10). The merge cases have no DoRA next to another
    adapter (PEFT's merge then depends on the order: D5)."""
    torch = pytest.importorskip("torch")
    from conformance.drivers.peft_bridge import build_hf_model

    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    assert not (case.lora.use_dora and case.extra_adapters)
    merged = peft_model_of(case).merge_and_unload()
    state = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    stored = {k.removeprefix("merged/base/"): v for k, v in case.derived.items() if k.startswith("merged/base/")}
    assert stored, "a merge case stores merged/base/*"
    for key, value in stored.items():
        assert relative_error(state[key], value) <= PEFT_RTOL["float64"], key
    for key in case.params:  # every weight the merge does not list is the base's, unchanged
        if key not in stored:
            np.testing.assert_array_equal(state[key], case.params[key], err_msg=key)
    hf = build_hf_model(case.config, {k: state[k] for k in case.params})
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(case.input_ids),
                    attention_mask=torch.from_numpy(case.attention_mask)).logits.numpy()  # fmt: skip
    assert relative_error(logits, case.derived["merged/logits"]) <= PEFT_RTOL["float64"]
    # the merged model is the unmerged one in eval mode: the stored logits agree when no dropout was drawn, and
    # when wte is not merged (its merge moves the tied head to W + ΔW: docs/semantics.md, "Tied embedding")
    if case.dropout_masks is None and not case.extra_dropout_masks and "transformer.wte.weight" not in stored:
        assert relative_error(case.derived["merged/logits"], case.logits) <= 1e-12


def scaled_delta(case) -> dict[str, np.ndarray]:
    """s·B A (out, in) per targeted module of the case's own adapter: sign-free under PiSSA/OLoRA."""
    plan = plan_lora(case.config, case.lora)
    return {name: m.scaling * case.adapter[m.branches[0].b_key] @ case.adapter[m.branches[0].a_key]
            for name, m in plan.items()}  # fmt: skip


@pytest.mark.parametrize("name", advanced_case_names("adapter_init"))
def test_peft_init_fixture_against_closed_form(name):
    """PiSSA/OLoRA, independently of reflora: s·B A is the best rank-r part of Wᵀ (SVD) or s·Q_r R_r (QR), the
    stored base is the residual, and the stored logits are the original model's (output unchanged at init).
    Only sign-free quantities are compared (singular vectors and QR factors have free signs)."""
    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    init = case.lora.init_lora_weights
    assert init in ("pissa", "olora") and case.original_params
    for module, delta in scaled_delta(case).items():
        key = f"{module}.weight"
        Wt = case.original_params[key].T  # (out, in)
        r = case.lora.r
        if init == "pissa":
            U, S, Vh = np.linalg.svd(Wt, full_matrices=False)
            want = (U[:, :r] * S[:r]) @ Vh[:r]
        else:
            Q, R = np.linalg.qr(Wt)
            want = Q[:, :r] @ R[:r]
            scaling = plan_lora(case.config, case.lora)[module].scaling
            want = scaling * want
        assert relative_error(delta, want) <= 1e-12, module
        assert relative_error(case.params[key], (Wt - delta).T) <= 1e-12, module
    original = {**case.params, **case.original_params}
    logits, _ = gpt2_forward(original, case.config, case.input_ids, attention_mask=case.attention_mask)
    assert relative_error(logits, case.logits) <= 1e-12


@pytest.mark.torch
def test_pissa_fixture_agrees_with_peft_float32_init():
    """PEFT's own PiSSA (float32: PEFT refuses float64) on the original base gives the stored residual and s·B A
    to float32 accuracy (rtol 1e-4; measured 3.9e-6: a float32 SVD)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from conformance.drivers.peft_bridge import build_hf_model

    case = load_fixture(GOLDEN / "fixtures" / "init_pissa.safetensors")
    model = build_hf_model(case.config, {**case.params, **case.original_params}, "float32")
    peft_model = get_peft_model(model, PeftLoraConfig(**case.lora.to_peft_dict()))
    named = dict(peft_model.named_parameters())
    for module, delta in scaled_delta(case).items():
        live = f"base_model.model.{module}"
        A = named[f"{live}.lora_A.default.weight"].detach().double().numpy()
        B = named[f"{live}.lora_B.default.weight"].detach().double().numpy()
        scaling = plan_lora(case.config, case.lora)[module].scaling
        assert relative_error(scaling * B @ A, delta) <= 1e-4, module
        residual = named[f"{live}.base_layer.weight"].detach().double().numpy()
        assert relative_error(residual, case.params[f"{module}.weight"]) <= 1e-4, module


@pytest.mark.torch
def test_olora_fixture_shows_documented_peft_deviation_d1():
    """D1 (docs/advanced-semantics.md): PEFT's OLoRA factors the untransposed Conv1D weight, so on this GPT-2
    (non-square c_attn) its model cannot even run; the fixture follows the closed form instead (test above)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip("D1 is documented for PEFT 0.21.2")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from conformance.drivers.peft_bridge import build_hf_model

    case = load_fixture(GOLDEN / "fixtures" / "init_olora.safetensors")
    model = build_hf_model(case.config, {**case.params, **case.original_params}, "float32")
    peft_model = get_peft_model(model, PeftLoraConfig(**case.lora.to_peft_dict()))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        peft_model(input_ids=torch.from_numpy(case.input_ids))


# pruned combinations and pattern sources: test_pruned_or_pattern_weighted_fixture_against_peft
PRUNED_OR_PATTERN_WEIGHTED = ("weighted_ties", "weighted_magnitude_prune_svd", "weighted_patterns")


@pytest.mark.torch
@pytest.mark.parametrize("name", [n for n in advanced_case_names("weighted")
                                  if n not in PRUNED_OR_PATTERN_WEIGHTED and not n.startswith("weighted_dare")])  # fmt: skip
def test_weighted_fixture_agrees_with_peft_and_closed_form(name):
    """weighted/*: the closed form of docs/advanced-semantics.md to 1e-12 (cat: Σ w ΔW exactly; linear: PEFT's
    formula with its cross terms; svd: the best rank-k part of Σ w ΔW), r and lora_alpha (scaling 1), and PEFT's
    add_weighted_adapter: cat to 1e-10; linear and svd within D6 (PEFT's float32 coefficients: 1e-6, and they
    do differ by more than 1e-10 from the float64 result). Compared as B A, which is sign-free for svd."""
    torch = pytest.importorskip("torch")
    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    spec = case.spec["weighted"]
    kind = spec["combination_type"]
    adapters = case.all_adapters()
    plans = {n: plan_lora(case.config, adapters[n][0]) for n in spec["adapters"]}
    stored_r, stored_alpha = int(case.derived["weighted/r"]), float(case.derived["weighted/lora_alpha"])
    ranks = [adapters[n][0].r for n in spec["adapters"]]
    assert stored_r == {"cat": sum(ranks), "linear": ranks[0], "svd": spec["svd_rank"] or max(ranks)}[kind]
    assert stored_alpha == stored_r  # scaling α/r = 1 (no rsLoRA here; under rsLoRA PEFT deviates: D2)
    model = peft_model_of(case)
    model.add_weighted_adapter(spec["adapters"], spec["weights"], "w", combination_type=kind,
                               svd_rank=spec["svd_rank"])  # fmt: skip
    named = dict(model.named_parameters())
    peft_errors = []
    modules = sorted({m for p in plans.values() for m in p})
    for module in modules:
        a_key, b_key = (f"base_model.model.{module}.lora_{x}.weight" for x in "AB")
        A, B = case.derived[f"weighted/{a_key}"], case.derived[f"weighted/{b_key}"]
        terms = [(w, plans[n][module].scaling, adapters[n][1][a_key], adapters[n][1][b_key])
                 for n, w in zip(spec["adapters"], spec["weights"], strict=True) if module in plans[n]]  # fmt: skip
        weighted_sum = sum(w * s * b @ a for w, s, a, b in terms)  # Σ w ΔWt (out, in)
        if kind == "cat":
            want = weighted_sum
        elif kind == "linear":
            roots = [(math.sqrt(abs(w * s)), math.copysign(1.0, w * s), a, b) for w, s, a, b in terms]
            want = sum(ri * rj * sj * bi @ aj for ri, _, _, bi in roots for rj, sj, aj, _ in roots)
        else:
            U, S, Vh = np.linalg.svd(weighted_sum, full_matrices=False)
            want = (U[:, :stored_r] * S[:stored_r]) @ Vh[:stored_r]
        assert relative_error(B @ A, want) <= 1e-12, module
        peft_A = named[f"base_model.model.{module}.lora_A.w.weight"].detach().numpy()
        peft_B = named[f"base_model.model.{module}.lora_B.w.weight"].detach().numpy()
        peft_errors.append(relative_error(peft_B @ peft_A, B @ A))
        if kind == "cat":
            np.testing.assert_allclose(peft_A, A, rtol=0, atol=1e-12)
            np.testing.assert_allclose(peft_B, B, rtol=0, atol=1e-12)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.r["w"] == stored_r and layer.scaling["w"] == 1.0
    model.base_model.set_adapter("w")
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(case.input_ids),
                       attention_mask=torch.from_numpy(case.attention_mask)).logits.numpy()  # fmt: skip
    peft_errors.append(relative_error(logits, case.derived["weighted/logits"]))
    if kind == "cat":
        assert max(peft_errors) <= PEFT_RTOL["float64"]
    else:  # D6: float32 coefficients
        assert max(peft_errors) <= 1e-6
        assert max(peft_errors) > PEFT_RTOL["float64"], "PEFT now agrees to 1e-10: D6 is fixed, update the docs"


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("name", PRUNED_OR_PATTERN_WEIGHTED)
def test_pruned_or_pattern_weighted_fixture_against_peft(name):
    """weighted/* of ties, magnitude_prune_svd and of sources with rank_pattern/alpha_pattern against PEFT's
    add_weighted_adapter (same density and majority_sign_method): B A per module to 1e-10 relative (the
    weights are not float32 numbers, so D6 allows 1e-6 where PEFT's float32 coefficients enter: ties, svd)."""
    torch = pytest.importorskip("torch")
    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    spec = case.spec["weighted"]
    model = peft_model_of(case)
    model.add_weighted_adapter(spec["adapters"], spec["weights"], "w", combination_type=spec["combination_type"],
                               svd_rank=spec["svd_rank"], density=spec.get("density"),
                               majority_sign_method=spec.get("majority_sign_method", "total"))  # fmt: skip
    rtol = PEFT_RTOL["float64"] if spec["combination_type"] == "cat" else 1e-6
    named = dict(model.named_parameters())
    modules = sorted({m for n in spec["adapters"] for m in plan_lora(case.config, case.all_adapters()[n][0])})
    for module in modules:
        a_key, b_key = (f"base_model.model.{module}.lora_{x}.weight" for x in "AB")
        A, B = case.derived[f"weighted/{a_key}"], case.derived[f"weighted/{b_key}"]
        peft_A = named[f"base_model.model.{module}.lora_A.w.weight"].detach().numpy()
        peft_B = named[f"base_model.model.{module}.lora_B.w.weight"].detach().numpy()
        assert relative_error(peft_B @ peft_A, B @ A) <= rtol, module
    model.base_model.set_adapter("w")
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(case.input_ids),
                       attention_mask=torch.from_numpy(case.attention_mask)).logits.numpy()  # fmt: skip
    assert relative_error(logits, case.derived["weighted/logits"]) <= rtol


@pytest.mark.torch
@pytest.mark.parametrize("name", [n for n in advanced_case_names("weighted") if n.startswith("weighted_dare")])
def test_dare_weighted_fixture_against_peft_with_injected_masks(name):
    """weighted/* of the DARE cases against PEFT's add_weighted_adapter with the fixture's dare_mask/* injected
    into torch.bernoulli in PEFT's call order (conformance/drivers/peft.py: a shape check on every draw): B A
    per module and the logits to 1e-10 relative (float32-exact coefficients, so D6 does not enter)."""
    pytest.importorskip("torch")
    from conformance.drivers.peft import driver
    from conformance.protocol import AdaptersCase

    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    spec = case.spec["weighted"]
    assert case.dare_masks, "a DARE fixture with density < 1 carries its keep-masks"
    combination = {"names": spec["adapters"], "weights": spec["weights"], "combination_type": spec["combination_type"],
                   "svd_rank": spec["svd_rank"], "density": spec["density"],
                   "majority_sign_method": spec.get("majority_sign_method", "total")}  # fmt: skip
    theirs = driver.weighted_adapter(AdaptersCase(config=case.config, params=case.params,
                                                  adapters=case.all_adapters(), input_ids=case.input_ids,
                                                  combination=combination, keep_masks=case.dare_masks))  # fmt: skip
    modules = sorted({m for n in spec["adapters"] for m in plan_lora(case.config, case.all_adapters()[n][0])})
    assert sorted(theirs["deltas"]) == modules
    for module in modules:
        a_key, b_key = (f"base_model.model.{module}.lora_{x}.weight" for x in "AB")
        ours = case.derived[f"weighted/{b_key}"] @ case.derived[f"weighted/{a_key}"]  # scaling 1
        assert relative_error(theirs["deltas"][module], ours) <= PEFT_RTOL["float64"], module
    assert relative_error(theirs["logits"], case.derived["weighted/logits"]) <= PEFT_RTOL["float64"]


@pytest.mark.torch
@pytest.mark.parametrize("name", advanced_case_names("scale_ops"))
def test_runtime_scaling_fixture_needs_peft_scale_ops(name):
    """A scale_ops fixture agrees with PEFT after its set_scale / scale_layer / unscale_layer calls (checked in
    test_committed_fixture_agrees_with_peft), and not without them: the multiplier is really in the outputs."""
    pytest.importorskip("torch")
    from reflora.golden.spec import scale_multiplier

    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    assert scale_multiplier(case.spec) != 1
    plain = dataclasses.replace(case, spec={**case.spec, "scale_ops": []})
    assert replay_with_peft(plain)["logits"] > 1e-3


@pytest.mark.torch
def test_dora_full_gradient_fixture_against_peft_finite_differences():
    """grad_dora_full/ is the exact gradient of the loss: central differences of transformers + PEFT's own DoRA
    forward (float64, h = 1e-5) agree to 1e-6 of the largest gradient on a sample of entries of every tensor kind,
    while PEFT's autograd (detached norm, stored under grad/) differs from it on A and B by far more. The
    magnitude's gradient is the same under both conventions (the norm does not depend on m)."""
    torch = pytest.importorskip("torch")
    from conformance.drivers.peft_bridge import build_peft_adapters, hf_causal_lm_loss, live_adapter_param

    case = load_fixture(GOLDEN / "fixtures" / "dora_full_gradient.safetensors")
    model = build_peft_adapters(case.config, case.params, {"default": (case.lora, case.adapter)}).eval()
    named = dict(model.named_parameters())
    ids, mask = torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)
    labels = torch.from_numpy(case.labels)

    def loss() -> float:
        with torch.no_grad():
            return float(hf_causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels))

    assert abs(loss() - float(case.loss)) <= 1e-12 * abs(float(case.loss))
    rng = np.random.default_rng(0)
    h, checked = 1e-5, set()
    # central differences: truncation ~h², rounding ~1e-16·loss/h; both far below 1e-6 of the largest gradient
    scale = max(np.abs(v).max() for k, v in case.derived.items() if k.startswith("grad_dora_full/"))
    for key in case.wrt:
        full = case.derived["grad_dora_full/" + golden.grad_name(key).removeprefix("grad/")]
        detached = case.grads[key]
        param = named[live_adapter_param(key, "default")]
        flat = param.data.view(-1)
        for index in rng.choice(flat.numel(), size=2, replace=False):
            original = float(flat[index])
            flat[index] = original + h
            up = loss()
            flat[index] = original - h
            down = loss()
            flat[index] = original
            numeric = (up - down) / (2 * h)
            assert abs(numeric - full.reshape(-1)[index]) <= 1e-6 * scale, (key, index)
            detached_entry = detached.reshape(-1)[index]
            if abs(detached_entry - full.reshape(-1)[index]) > 1e-4 * scale:  # FD tells the conventions apart
                assert abs(numeric - detached_entry) > 1e-5 * scale, (key, index)
        kind = key.rsplit(".", 2)[-2] if key.endswith(".weight") else "lora_magnitude_vector"
        checked.add(kind)
        if kind == "lora_magnitude_vector":
            assert relative_error(detached, full) <= 1e-12, key
        else:
            assert relative_error(detached, full) > 1e-3, key  # the two conventions really differ
    assert checked == {"lora_A", "lora_B", "lora_magnitude_vector"}


@st.composite
def random_specs(draw) -> dict:
    """A small spec over every spec key; every draw is labelled."""
    n_head = draw(st.integers(1, 3), label="n_head")
    # n_embd >= 4: LayerNorm over 1 or 2 channels maps every input to its bias or to ±1, so the gradients below
    # it are 0 or pure cancellation and two correct implementations agree only to their conditioning
    n_embd = n_head * draw(st.integers(max(2, -(-4 // n_head)), 4), label="head_dim")
    seq_len = draw(st.integers(1, 6), label="seq_len")
    gpt2 = {"vocab_size": draw(st.integers(2, 17), label="vocab_size"), "n_embd": n_embd, "n_head": n_head,
            "n_positions": draw(st.integers(seq_len, 9), label="n_positions"),
            "n_layer": draw(st.integers(1, 2), label="n_layer"),
            "n_inner": draw(st.none() | st.integers(1, 9), label="n_inner")}  # fmt: skip
    spec = {"gpt2": gpt2, "seed": draw(st.integers(0, 2**32), label="seed"), "seq_len": seq_len,
            "batch_size": draw(st.integers(1, 3), label="batch_size"),
            "padding": draw(st.sampled_from(["none", "left", "right", "random"] if seq_len > 1 else ["none", "random"]),
                            label="padding"),
            "position_ids": draw(st.sampled_from(["default", "from_mask", "random"]), label="position_ids"),
            "ignore_padding_labels": draw(st.booleans(), label="ignore_padding_labels"),
            "ignore_label_fraction": draw(st.sampled_from([0.0, 0.3]), label="ignore_label_fraction"),
            "dropout": draw(st.sampled_from(["train", "eval"]), label="dropout"),
            "objective": "dlogits" if seq_len == 1 else draw(st.sampled_from(["loss", "dlogits"]), label="objective")}  # fmt: skip
    if draw(st.booleans(), label="no lora"):
        return {**spec, "lora": None}
    kinds = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    if draw(st.booleans(), label="regex targets"):
        chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4, unique=True), label="regex kinds")
        targets = r"transformer\.h\.\d+\.(" + "|".join(re.escape(k) for k in chosen) + ")"
        layers = None
    else:
        targets = draw(st.lists(st.sampled_from(["c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj"]),
                                min_size=1, max_size=3, unique=True), label="target_modules")  # fmt: skip
        layers = draw(st.none() | st.lists(st.integers(0, gpt2["n_layer"] - 1), min_size=1, unique=True),
                      label="layers_to_transform")  # fmt: skip
    lora = {"r": draw(st.integers(1, 4), label="r"), "lora_alpha": draw(st.sampled_from([1, 3, 7.5, 16]), label="lora_alpha"),
            "target_modules": targets, "layers_to_transform": layers,
            "use_rslora": draw(st.booleans(), label="use_rslora"),
            "bias": draw(st.sampled_from(["none", "all", "lora_only"]), label="bias"),
            "lora_dropout": draw(st.sampled_from([0.0, 0.0, 0.25]), label="lora_dropout"),
            "rank_pattern": draw(st.sampled_from([{}, {"c_fc": 3}, {"h.0.attn.c_attn": 2}]), label="rank_pattern"),
            "alpha_pattern": draw(st.sampled_from([{}, {"c_proj": 5}]), label="alpha_pattern")}  # fmt: skip
    slices = draw(st.none() | st.lists(st.sampled_from("qkv"), min_size=1, max_size=3, unique=True), label="qkv_slices")
    return {**spec, "lora": lora, "reflora_lora": {"qkv_slices": slices},
            "train_base": draw(st.booleans(), label="train_base")}  # fmt: skip


@pytest.mark.torch
@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=random_specs())
def test_random_spec_agrees_with_peft(spec):
    pytest.importorskip("peft")
    note(
        f"reproduce: echo '{json.dumps(spec)}' > spec.json && reflora golden generate --spec spec.json --out case.safetensors"
    )
    try:
        tensors, _ = generate_case(spec)
    except ConfigError as exc:
        assume("matches no module" not in str(exc) and "every label" not in str(exc))
        raise
    case = unpack_fixture(load_spec(spec), tensors)
    errors = replay_with_peft(case)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= PEFT_RTOL["float64"]}
    assert not bad, f"transformers + PEFT disagree with the regenerated case: {bad}"


# ----------------------------------------------------------------------------------------------
# the format
# ----------------------------------------------------------------------------------------------


def test_fixture_round_trip_and_metadata(tmp_path):
    spec = small_spec(padding="left", position_ids="from_mask", lora={**small_spec()["lora"], "lora_dropout": 0.2})
    tensors, metadata = generate_case(spec)
    path = tmp_path / "case.safetensors"
    digest = write_case(path, tensors, metadata)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        stored_metadata = handle.metadata()
    assert stored_metadata["format"] == FORMAT
    assert set(stored_metadata) == {"format", "spec", "reflora_version", "numpy_version"}
    # every default filled in, except the additive keys at their defaults (golden.stored_spec)
    assert json.loads(stored_metadata["spec"]) == golden.stored_spec(load_spec(spec))
    assert load_spec(json.loads(stored_metadata["spec"])) == load_spec(spec)
    read_spec, read_tensors = read_fixture(path)
    assert read_spec == load_spec(spec) == load_spec(read_spec)
    assert list(read_tensors) == list(fixture_layout(read_spec))
    for name, value in tensors.items():
        np.testing.assert_array_equal(read_tensors[name], value, err_msg=name)
    assert read_tensors["loss"].shape == () and read_tensors["input_ids"].dtype == np.int64
    assert any(k.startswith("dropout/transformer.h.0.") for k in read_tensors)
    assert write_case(tmp_path / "again.safetensors", tensors, metadata) == digest  # canonical bytes
    report = verify_fixture(path)
    assert report.ok, report.problems


def test_serialization_is_standard_safetensors():
    from safetensors.numpy import load

    tensors = {"b": np.arange(6.0).reshape(2, 3), "a": np.asarray(2.5), "i": np.arange(3, dtype=np.int64),
               "f": np.ones((1, 2), dtype=np.float32)}  # fmt: skip
    loaded = load(serialize_fixture(tensors, {"format": FORMAT}))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)


def test_seq_len_1_is_a_dlogits_case():
    spec = load_spec(small_spec(seq_len=1, objective="dlogits"))
    layout = fixture_layout(spec)
    assert "dlogits" in layout and "loss" not in layout and "labels" not in layout
    with pytest.raises(ConfigError, match=r"spec\.seq_len=1.*objective"):
        load_spec(small_spec(seq_len=1))


def test_float32_variant(tmp_path):
    tensors, metadata = generate_case(small_spec(dtype="float32"))
    assert all(v.dtype in (np.float32, np.int64) for v in tensors.values())
    f64, _ = generate_case(small_spec())
    assert np.array_equal(tensors["base/transformer.wte.weight"], f64["base/transformer.wte.weight"].astype(np.float32))
    assert relative_error(tensors["logits"].astype(np.float64), f64["logits"]) < 1e-5
    path = tmp_path / "c_float32.safetensors"
    write_case(path, tensors, metadata)
    assert verify_fixture(path).ok


def test_docs_example_runs(monkeypatch):
    """Every python block of docs/golden-format.md runs as written, from the repository root."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert blocks, "docs/golden-format.md has no python example"
    monkeypatch.chdir(DOCS.parent.parent)
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {"__name__": "__docs__"})


def test_docs_name_every_spec_key():
    from reflora.golden import SPEC_DEFAULTS

    text = DOCS.read_text()
    for key in SPEC_DEFAULTS:
        assert f"`{key}`" in text, f"docs/golden-format.md does not document spec key {key!r}"
    assert "1e-12" in text and FORMAT in text


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the field, and nothing written
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (small_spec(bogus=1), "spec.bogus"),
        (small_spec(gpt2={**SMALL_GPT2, "n_embdd": 4}), "gpt2.n_embdd"),
        (small_spec(lora={"r": 2, "lora_alpah": 4}), "lora.lora_alpah"),
        (small_spec(padding="middle"), "spec.padding"),
        (small_spec(seq_len=99), "spec.seq_len"),
        (small_spec(batch_size=0), "spec.batch_size"),
        (small_spec(ignore_label_fraction=1.0), "spec.ignore_label_fraction"),
        (small_spec(reflora_lora={"r": 3}), "spec.reflora_lora.r"),
        (small_spec(lora=None, train_base=False), "spec.train_base"),
        (small_spec(lora=None, reflora_lora={"qkv_slices": ["q"]}), "spec.reflora_lora.qkv_slices"),
        ({"lora": None}, "spec.gpt2"),
        (small_spec(lora={"r": 2, "init_lora_weights": "gaussian"}), "spec.lora.init_lora_weights"),
        (
            small_spec(lora={"r": 2, "init_lora_weights": "pissa"}, adapter_init="peft", adapters={"b": {"lora": {}}}),
            "spec.adapters",
        ),
        (small_spec(adapter_init="random"), "spec.adapter_init"),
        (small_spec(lora=None, adapter_init="peft"), "spec.adapter_init"),
        (small_spec(lora={"r": 2, "use_dora": True, "lora_bias": True}), "lora_bias"),
        (small_spec(adapters={"default": {"lora": {"r": 2}}}), "spec.adapters.default"),
        (small_spec(adapters={"a/b": {"lora": {"r": 2}}}), "spec.adapters.a/b"),
        (small_spec(adapters={"b": {"lora": {"r": 2, "bogus": 1}}}), "spec.adapters.b"),
        (small_spec(adapters={"b": {"lora": {"r": 2}, "extra": 1}}), "spec.adapters.b"),
        (small_spec(adapter_names=["default"]), "spec.adapter_names"),
        (small_spec(adapter_names=["default", "nope"]), "spec.adapter_names"),
        (small_spec(lora={"r": 2, "lora_dropout": 0.1}, adapter_names=["default", "__base__"]), "spec.adapter_names"),
        (small_spec(merge="yes"), "spec.merge"),
        (small_spec(dora_full_gradient=True), "spec.dora_full_gradient"),
        (small_spec(merge=True, adapter_names=["default", "__base__"]), "spec.merge"),
        (small_spec(weighted={"adapters": ["default"]}), "spec.weighted.weights"),
        (small_spec(weighted={"adapters": ["x"], "weights": [1.0]}), "spec.weighted.adapters"),
        (
            small_spec(weighted={"adapters": ["default"], "weights": [1.0], "combination_type": "dare_magic"}),
            "spec.weighted.combination_type",
        ),
        (
            small_spec(weighted={"adapters": ["default"], "weights": [1.0], "combination_type": "ties"}),
            "spec.weighted.density",
        ),
        (small_spec(weighted={"adapters": ["default"], "weights": [1.0], "density": 0.5}), "spec.weighted.density"),
        (small_spec(weighted={"adapters": ["default"], "weights": [1.0], "svd_rank": 0}), "spec.weighted.svd_rank"),
        (small_spec(scale_ops=[["bogus", 1.0]]), "spec.scale_ops"),
        (small_spec(scale_ops="set_scale"), "spec.scale_ops"),
        (small_spec(scale_ops=[["scale_layer", 2.0]], merge=True), "spec.scale_ops"),
        (small_spec(scale_ops=[["set_scale", "other", 2.0]]), "spec.scale_ops"),  # PEFT would ignore it
        *[
            (
                small_spec(lora={"r": 2, "target_modules": ["c_attn"], "modules_to_save": ["ln_f"]}, **extra),
                "spec.lora.modules_to_save",
            )
            for extra in (
                {"merge": True},
                {"adapter_names": ["default", "__base__"]},
                {"weighted": {"adapters": ["default"], "weights": [1.0]}},
                {"adapters": {"b": {"lora": {"r": 2}}}},
            )
        ],
        (
            small_spec(adapters={"b": {"lora": {"r": 2, "target_modules": ["c_attn"], "modules_to_save": ["ln_f"]}}}),
            "spec.adapters.b.lora.modules_to_save",
        ),
        (
            small_spec(
                lora={"r": 2, "target_modules": ["c_attn"], "trainable_token_indices": [1]},
                weighted={"adapters": ["default"], "weights": [1.0]},
            ),
            "spec.weighted.adapters",
        ),
        (
            small_spec(
                reflora_lora={"qkv_slices": ["q", "v"]},
                adapters={"b": {"lora": {"r": 2}}},
                weighted={"adapters": ["default", "b"], "weights": [1.0, 1.0]},
            ),
            "spec.weighted.adapters",
        ),
        (
            small_spec(lora={"r": 2, "use_dora": True}, weighted={"adapters": ["default"], "weights": [1.0]}),
            "spec.weighted.adapters",
        ),
    ],
)
def test_bad_spec_names_the_field(spec, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_spec(spec)


# lora dicts that PEFT's LoraConfig rejects; reflora must reject them too, naming the field
PEFT_REJECTS = [
    ({"r": 2, "target_modules": "c_attn", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"r": 2, "target_modules": "c_attn", "layers_pattern": "h"}, "layers_pattern"),
    ({"r": 2, "target_modules": ["c_attn"], "layers_pattern": "h"}, "layers_pattern"),
    ({"r": 2, "lora_alpah": 4}, "lora_alpah"),
    ({"r": 2, "qkv_slices": ["q"]}, "qkv_slices"),
    ({"r": 2, "use_dora": True, "lora_bias": True}, "use_dora"),
]


@pytest.mark.parametrize(("lora", "field"), PEFT_REJECTS)
def test_spec_that_peft_rejects_is_rejected(lora, field, tmp_path, capsys):
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        with pytest.raises((ValueError, TypeError)):
            peft.LoraConfig(**lora)
    with pytest.raises(ConfigError, match=field):
        load_spec(small_spec(lora=lora))
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.safetensors"
    spec_path.write_text(json.dumps(small_spec(lora=lora)))
    with pytest.raises(SystemExit, match=field):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    assert list(tmp_path.iterdir()) == [spec_path]  # nothing written, no temporary file left


def test_unknown_spec_field_via_cli_writes_nothing(tmp_path):
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.safetensors"
    spec_path.write_text(json.dumps(small_spec(paddding="left")))
    with pytest.raises(SystemExit, match=r"spec\.paddding is not a golden spec field"):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    spec_path.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    assert not out.exists() and sorted(tmp_path.iterdir()) == [spec_path]


def test_undefined_loss_is_refused_before_writing(tmp_path):
    # one row of 2 tokens, right padding (always 1 pad here) and ignored padding labels: the only label the
    # causal shift keeps (position 1) is padding, so every label is ignored
    spec = small_spec(batch_size=1, seq_len=2, padding="right")
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.safetensors"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match="every label after the causal shift is ignored"):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    assert not out.exists()


def test_malformed_fixture_is_named(tmp_path):
    source = GOLDEN / "fixtures" / "target_c_attn.safetensors"
    data = source.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GoldenError, match=r"truncated\.safetensors: not a readable safetensors file"):
        read_fixture(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(GoldenError, match=r"garbage\.safetensors"):
        read_fixture(garbage)
    with pytest.raises(GoldenError, match="no such fixture file"):
        read_fixture(tmp_path / "absent.safetensors")
    spec, tensors = read_fixture(source)
    metadata = {"format": FORMAT, "spec": json.dumps(spec)}
    cases = {
        "__metadata__.format": ({**tensors}, {**metadata, "format": "reflora-golden/0"}),
        "missing": ({k: v for k, v in tensors.items() if k != "logits"}, metadata),
        "unexpected": ({**tensors, "extra": np.zeros(2)}, metadata),
        "tensor logits is float32": ({**tensors, "logits": tensors["logits"].astype(np.float32)}, metadata),
        "tensor input_ids has values outside": ({**tensors, "input_ids": tensors["input_ids"] + 1000}, metadata),
        "tensor grad/adapter/.* has non-finite": (
            {k: (v * np.nan if k.startswith("grad/adapter/") else v) for k, v in tensors.items()}, metadata),
        "__metadata__.spec is not a valid spec": (tensors, {**metadata, "spec": json.dumps({**spec, "seed": -1})}),
    }  # fmt: skip
    for message, (bad_tensors, bad_metadata) in cases.items():
        path = tmp_path / "bad.safetensors"
        path.write_bytes(serialize_fixture(bad_tensors, bad_metadata))
        with pytest.raises(GoldenError, match=message):
            read_fixture(path)
        report = verify_fixture(path)
        assert not report.ok and re.search(message, report.problems[0])
    assert cli_main(["golden", "verify", str(truncated)]) == 1


def test_drift_is_named_by_case_and_tensor(tmp_path, capsys):
    golden = copy_corpus(tmp_path)
    path = golden / "fixtures" / "rslora.safetensors"
    _, tensors = read_fixture(path)
    key = "grad/adapter/base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    tensors[key] = tensors[key] * (1 + 1e-9)  # a drift far above rtol 1e-12
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    path.write_bytes(serialize_fixture(tensors, metadata))
    before = snapshot(golden)
    report = verify_corpus(golden)
    assert not report.ok
    problems = {c.name: c.problems for c in report.cases if c.problems}
    assert list(problems) == ["rslora"]
    assert any("sha256" in p for p in problems["rslora"])
    assert any(key in p and "> rtol 1e-12" in p for p in problems["rslora"])
    assert cli_main(["golden", "verify", "--dir", str(golden)]) == 1
    out = capsys.readouterr().out
    assert "case rslora" in out and "sha256" in out and "verify: FAILED" in out
    assert snapshot(golden) == before  # verify writes nothing


def test_hash_mismatch_alone_fails(tmp_path):
    golden = copy_corpus(tmp_path)
    manifest = json.loads((golden / "manifest.json").read_text())
    manifest["cases"]["bias_all"]["sha256"] = "0" * 64
    (golden / "manifest.json").write_text(json.dumps(manifest))
    report = verify_corpus(golden)
    assert not report.ok
    failing = {c.name: c.problems for c in report.cases if not c.ok}
    assert list(failing) == ["bias_all"]
    assert "sha256 differs from the manifest" in failing["bias_all"][0]
    with pytest.raises(GoldenError, match=r"bias_all.*sha256"):
        corpus_fixtures(golden)


def test_missing_case_and_count_tripwire(tmp_path):
    golden = copy_corpus(tmp_path)
    (golden / "fixtures" / "padding_left.safetensors").unlink()
    report = verify_corpus(golden)
    assert not report.ok
    assert any("padding_left" in p and "missing" in p for c in report.cases for p in c.problems)
    assert any("bytes, the manifest says" in p for p in report.problems)  # the corpus is smaller than it says
    manifest = json.loads((golden / "manifest.json").read_text())
    for bad in ({**manifest, "case_count": manifest["case_count"] + 1}, {**manifest, "cases": {}, "case_count": 0}):
        (golden / "manifest.json").write_text(json.dumps(bad))
        report = verify_corpus(golden)
        assert not report.ok and report.problems and not report.cases


def test_corpus_out_of_date_with_cases_is_reported(tmp_path):
    golden = copy_corpus(tmp_path)
    spec = json.loads((golden / "cases" / "rslora.json").read_text())
    (golden / "cases" / "rslora.json").write_text(json.dumps({**spec, "seed": spec["seed"] + 1}))
    (golden / "cases" / "brand_new.json").write_text(json.dumps(small_spec()))
    problems = verify_corpus(golden).problems
    assert any("rslora" in p and "differs from the manifest" in p for p in problems)
    assert any("brand_new" in p and "not the manifest" in p for p in problems)


def test_generate_corpus_with_a_bad_case_writes_nothing(tmp_path):
    golden = copy_corpus(tmp_path)
    (golden / "cases" / "zz_bad.json").write_text(json.dumps(small_spec(lora={"r": 0})))
    before = snapshot(golden)
    with pytest.raises(ConfigError, match=r"zz_bad\.json.*lora\.r"):
        generate_corpus(golden)
    with pytest.raises(SystemExit, match=r"zz_bad\.json"):
        cli_main(["golden", "generate", "--dir", str(golden)])
    assert snapshot(golden) == before


def test_generate_corpus_round_trip(tmp_path):
    """generate into a fresh folder: the manifest lists the cases, stale fixtures are removed, and a float32
    case must be named *_float32."""
    golden = tmp_path / "golden"
    (golden / "cases").mkdir(parents=True)
    for name in ("target_c_attn", "kitchen_sink_float32"):
        shutil.copy(GOLDEN / "cases" / f"{name}.json", golden / "cases")
    (golden / "fixtures").mkdir()
    (golden / "fixtures" / "stale.safetensors").write_bytes(b"old")
    assert cli_main(["golden", "generate", "--dir", str(golden)]) == 0
    assert sorted(p.name for p in (golden / "fixtures").iterdir()) == [
        "kitchen_sink_float32.safetensors",
        "target_c_attn.safetensors",
    ]
    assert verify_corpus(golden).ok
    manifest = read_manifest(golden)
    assert manifest["case_count"] == 2
    assert manifest["cases"]["target_c_attn"]["provenance"]["command"] == "reflora golden generate"
    (golden / "cases" / "kitchen_sink_float32.json").rename(golden / "cases" / "sink.json")
    with pytest.raises(ConfigError, match="_float32"):
        generate_corpus(golden)


def test_custom_case_cli(tmp_path, capsys):
    spec_path, out = tmp_path / "case.json", tmp_path / "case.safetensors"
    spec_path.write_text(json.dumps(small_spec(train_base=True, padding="right")))
    assert cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    spec, tensors = read_fixture(out)
    assert spec["train_base"] and "grad/base/transformer.wte.weight" in tensors
    assert cli_main(["golden", "verify", str(out)]) == 0
    with pytest.raises(SystemExit, match="--spec and --out go together"):
        cli_main(["golden", "generate", "--spec", str(spec_path)])


def test_draw_case_is_deterministic():
    spec = load_spec(small_spec(padding="random", ignore_label_fraction=0.3))
    first, second = draw_case(spec), draw_case(spec)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert np.all(first["attention_mask"][:, -1] == 1)
