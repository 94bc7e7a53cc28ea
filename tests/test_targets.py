"""Target selection (``all-linear``, ``exclude_modules``) and pattern keys (regex keys, overlapping keys in both
orders) against PEFT 0.21: the modules PEFT adapts, and each module's r / alpha, equal reflora's plan; logits
and every gradient agree with HF + PEFT autograd to 1e-10 (float64)."""

from __future__ import annotations

import warnings

import pytest

from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.targets import linear_module_names, plan_lora
from tests.test_peft_crosscheck import Case, check_against_peft

TINY = {"vocab_size": 17, "n_positions": 9, "n_embd": 6, "n_layer": 2, "n_head": 3, "n_inner": None}
OVERLAP = {"mlp.c_proj": 11.0, "c_proj": 2.0, "h.0.mlp.c_proj": 9.0}  # the alpha_pattern
TARGET_CASES = {
    "all-linear": {"target_modules": "all-linear"},
    "ALL-Linear (case-insensitive)": {"target_modules": "ALL-Linear"},
    "all-linear, exclude list": {"target_modules": "all-linear", "exclude_modules": ["c_proj", "h.1.mlp.c_fc"]},
    "all-linear, exclude regex": {"target_modules": "all-linear", "exclude_modules": r".*\.h\.1\.attn\..*"},
    "list targets, exclude exact name": {"target_modules": ["c_attn", "c_fc"],
                                         "exclude_modules": ["transformer.h.0.attn.c_attn"]},
    "regex targets, exclude list suffix": {"target_modules": r".*c_(attn|proj)", "exclude_modules": ["attn.c_proj"]},
    "overlapping alpha keys": {"target_modules": ["c_attn", "c_proj"], "alpha_pattern": OVERLAP},
    "overlapping alpha keys, reversed": {"target_modules": ["c_attn", "c_proj"],
                                         "alpha_pattern": dict(reversed(OVERLAP.items()))},
    "overlapping rank keys": {"target_modules": "all-linear", "rank_pattern": {"c_fc": 1, "h.1.mlp.c_fc": 4}},
    "overlapping rank keys, reversed": {"target_modules": "all-linear", "rank_pattern": {"h.1.mlp.c_fc": 4, "c_fc": 1}},
    "layers_pattern 'h'": {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1], "layers_pattern": "h"},
    "layers_pattern list, first misses": {"target_modules": ["c_proj"], "layers_to_transform": 0,
                                          "layers_pattern": ["layers", "h"]},
    "layers_pattern regex 'transformer.h'": {"target_modules": ["c_fc", "attn.c_proj"], "layers_to_transform": [0],
                                             "layers_pattern": "transformer.h"},
    "regex keys with anchors": {"target_modules": "all-linear",
                                "rank_pattern": {r"^transformer\.h\.0\..*": 3, r"c_(fc|proj)$": 1},
                                "alpha_pattern": {r"h\.\d\.attn\.c_.*": 5.0, "^c_attn": 7.0}},
}  # fmt: skip


def peft_plan(config: GPT2Config, lora: LoraConfig) -> dict[str, tuple[int, float]]:
    """PEFT's adapted modules, with each one's r and lora_alpha (get_peft_model on the HF model)."""
    import numpy as np
    import peft

    from conformance.drivers.peft_bridge import build_hf_model
    from reflora import init_gpt2_params

    model = build_hf_model(config, init_gpt2_params(config, np.random.default_rng(0)), "float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora.to_peft_dict()))
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            out[name] = (module.r["default"], module.lora_alpha["default"])
    return out


@pytest.mark.parametrize("name", list(TARGET_CASES))
def test_plan_matches_peft(name):
    config = GPT2Config(**TINY)
    lora = LoraConfig(r=2, lora_alpha=4.0, **TARGET_CASES[name])
    ours = {n: (m.r, m.lora_alpha) for n, m in plan_lora(config, lora).items()}
    assert ours == peft_plan(config, lora)


@pytest.mark.parametrize("name", list(TARGET_CASES))
def test_autograd_matches_peft(name):
    check_against_peft(Case(TINY, {"r": 2, "lora_alpha": 4.0, **TARGET_CASES[name]}, 2, 5, 7, objective="dlogits"))


def test_order_decides_overlapping_keys():
    config = GPT2Config(**TINY)
    first = plan_lora(config, LoraConfig(target_modules=["c_proj"], alpha_pattern=OVERLAP))
    last = plan_lora(config, LoraConfig(target_modules=["c_proj"], alpha_pattern=dict(reversed(OVERLAP.items()))))
    assert first["transformer.h.0.mlp.c_proj"].lora_alpha == 11.0  # "mlp.c_proj" comes first
    assert last["transformer.h.0.mlp.c_proj"].lora_alpha == 9.0  # "h.0.mlp.c_proj" comes first
    assert first["transformer.h.0.attn.c_proj"].lora_alpha == last["transformer.h.0.attn.c_proj"].lora_alpha == 2.0


def test_all_linear_is_every_conv1d_without_lm_head():
    config = GPT2Config(**TINY)
    names = linear_module_names(config)
    assert len(names) == 4 * config.n_layer and "lm_head" not in names
    assert list(plan_lora(config, LoraConfig(target_modules="all-linear"))) == names


def test_bad_target_fields_are_named():
    config = GPT2Config(**TINY)
    with pytest.raises(ConfigError, match=r"exclude_modules.*excludes every module"):
        plan_lora(config, LoraConfig(target_modules=["c_attn"], exclude_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"lora\.exclude_modules is not a valid regex"):
        LoraConfig(exclude_modules="(")
    with pytest.raises(ConfigError, match=r"lora\.exclude_modules must be"):
        LoraConfig(exclude_modules=[""])
    with pytest.raises(ConfigError, match="matches no module"):  # PEFT: "Target modules ... not found"
        plan_lora(config, LoraConfig(target_modules=["c_fc"], layers_to_transform=[0], layers_pattern="layers"))
    with pytest.raises(ConfigError, match="layers_pattern entry"):
        LoraConfig(target_modules=["c_fc"], layers_to_transform=[0], layers_pattern=["("])
    with pytest.raises(ConfigError, match="layers_to_transform cannot be used"):
        LoraConfig(target_modules="all-linear", layers_to_transform=[0])  # PEFT refuses it too (a str target)
    assert "exclude_modules" not in LoraConfig().to_dict()  # older specs and manifests keep their bytes
    assert LoraConfig.from_dict({"exclude_modules": ["c_fc"]}).to_dict()["exclude_modules"] == ["c_fc"]


# ----------------------------------------------------------------------------------------------
# the stored spec keeps the order of pattern keys (issue 13)
# ----------------------------------------------------------------------------------------------


def test_fixture_with_overlapping_keys_verifies_against_its_own_spec(tmp_path):
    import json

    from reflora.golden.derive import generate_case
    from reflora.golden.files import write_case
    from reflora.golden.spec import load_spec, stored_spec, stored_spec_json
    from reflora.golden.verify import verify_fixture

    gpt2 = {"vocab_size": 29, "n_positions": 12, "n_embd": 12, "n_layer": 2, "n_head": 3}
    spec = {"gpt2": gpt2, "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"],
                                   "alpha_pattern": OVERLAP, "rank_pattern": {"c_proj": 1, "h.1.attn.c_proj": 3}},
            "seed": 5}  # fmt: skip
    tensors, metadata = generate_case(spec)
    stored = json.loads(metadata["spec"])
    assert list(stored["lora"]["alpha_pattern"]) == list(OVERLAP)  # not sorted
    assert list(stored["lora"]["rank_pattern"]) == ["c_proj", "h.1.attn.c_proj"]
    write_case(tmp_path / "overlap.safetensors", tensors, metadata)
    assert verify_fixture(tmp_path / "overlap.safetensors").ok
    plain = load_spec({"gpt2": gpt2, "lora": {"r": 2, "lora_alpha": 4}})  # no pattern keys: sort_keys bytes
    assert stored_spec_json(plain) == json.dumps(stored_spec(plain), sort_keys=True)


# ----------------------------------------------------------------------------------------------
# runtime scaling: set_scale / scale_layer / unscale_layer (reflora.scaling)
# ----------------------------------------------------------------------------------------------

SCALE_CASES = {
    "set_scale": [["set_scale", "default", 2.5]],
    "set_scale twice, other adapter ignored": [["set_scale", "default", 3.0], ["set_scale", "other", 7.0],
                                               ["set_scale", "default", -1.5]],
    "scale_layer after set_scale": [["set_scale", "default", 0.5], ["scale_layer", 3.0]],
    "unscale_layer(c)": [["scale_layer", 2.5], ["unscale_layer", 0.25]],
    "unscale_layer(None) resets": [["set_scale", "default", 3.0], ["unscale_layer", None], ["scale_layer", 0.5]],
}  # fmt: skip


def test_runtime_multiplier():
    from reflora.scaling import runtime_multiplier

    assert runtime_multiplier([]) == 1.0
    expected = [2.5, -1.5, 1.5, 10.0, 0.5]
    assert [runtime_multiplier(ops) for ops in SCALE_CASES.values()] == expected
    assert runtime_multiplier([["scale_layer", 3.0]], active=()) == 1.0  # only active adapters are scaled
    with pytest.raises(ConfigError, match="runtime scaling op"):
        runtime_multiplier([["set_scale", 2.0]])
    with pytest.raises(ConfigError, match="by zero"):
        runtime_multiplier([["unscale_layer", 0]])


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", list(SCALE_CASES))
def test_peft_layer_scaling_is_the_multiplier(name, rslora):
    """Every PEFT LoraLayer's ``scaling['default']`` after the ops equals reflora's per-module scaling of
    ``scaled_lora`` (rsLoRA honoured by set_scale and unscale_layer(None) in PEFT 0.21.2: no #2733 deviation)."""
    import numpy as np
    import peft

    from conformance.drivers.peft_bridge import apply_scale_ops, build_peft_model
    from reflora import init_gpt2_params, init_lora_adapter
    from reflora.scaling import runtime_multiplier, scaled_lora

    config = GPT2Config(**TINY)
    lora = LoraConfig(r=4, lora_alpha=6.0, use_rslora=rslora, target_modules="all-linear",
                      rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 5.0})  # fmt: skip
    rng = np.random.default_rng(1)
    model = build_peft_model(
        config, init_gpt2_params(config, rng), lora, init_lora_adapter(plan_lora(config, lora), rng)
    )
    apply_scale_ops(model, SCALE_CASES[name])
    ours = plan_lora(config, scaled_lora(lora, runtime_multiplier(SCALE_CASES[name])))
    theirs = {n: m.scaling["default"] for n, m in model.base_model.model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip
    assert set(theirs) == set(ours)
    for module, s in theirs.items():
        assert abs(s - ours[module].scaling) <= 1e-15 * abs(s), (module, s, ours[module].scaling)


@pytest.mark.parametrize("name", list(SCALE_CASES))
def test_runtime_scaling_matches_peft_autograd(name):
    """Logits and every gradient: reflora (scaled_lora) against PEFT after its own methods, float64, 1e-10."""
    import numpy as np

    from conformance.cases import build_model_case
    from conformance.drivers.peft import PeftDriver
    from conformance.expectations import model_forward_backward

    spec = {"feature": "model.scaling.scale_layer", "dtype": "float64", "seed": 3, "batch": 2, "seq_len": 4,
            "objective": "loss", "ignored_labels": 0, "gpt2": TINY, "scale_ops": SCALE_CASES[name],
            "lora": {"r": 2, "lora_alpha": 5, "use_rslora": True, "target_modules": ["c_attn", "c_proj"]}}  # fmt: skip
    case = build_model_case(spec)
    ours, theirs = model_forward_backward(case, "float64"), PeftDriver().model_forward_backward(case)
    unscaled = model_forward_backward(build_model_case({**spec, "scale_ops": []}), "float64")
    scale = np.max(np.abs(ours["logits"]))
    assert np.max(np.abs(ours["logits"] - theirs["logits"])) <= 1e-10 * scale
    assert np.max(np.abs(ours["logits"] - unscaled["logits"])) > 1e-4 * scale  # the ops change the output
    for key, grad in ours["grads"].items():
        assert np.max(np.abs(grad - theirs["grads"][key])) <= 1e-10 * np.max(np.abs(grad)), key


# ----------------------------------------------------------------------------------------------
# the new features have teeth (tests/mutants/targets.py)
# ----------------------------------------------------------------------------------------------

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("name", ["LAST_KEY", "NO_SCALE", "NO_EXCLUDE"])
def test_suite_catches_the_faulty_candidate(pytester, monkeypatch, name):
    import json
    from pathlib import Path

    from mutants import targets

    import conformance

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report = pytester.path / "report.json"
    pytester.runpytest_inprocess(
        str(Path(conformance.__file__).parent), "-p", "no:cacheprovider", "-q", "--candidate",
        f"mutants.targets:{name}", "--profile", "ci", "--max-examples", "6", "--isolation", "none",
        "-k", "targets or scaling", "--report-json", str(report),
    )  # fmt: skip
    results = {f["id"]: f["result"] for f in json.loads(report.read_text())["features"]}
    mutant = targets.MUTANTS[name]
    assert all(results[f] == "fail" for f in mutant.MUST_FAIL), results
    others = {f: r for f, r in results.items() if f not in mutant.MUST_FAIL and f.startswith("model.")}
    assert set(others.values()) <= {"pass"}, others


def test_peft_also_refuses_a_layers_pattern_that_names_no_layer_list():
    lora = LoraConfig(target_modules=["c_fc"], layers_to_transform=[0], layers_pattern="layers")
    with pytest.raises(ValueError, match="not found in the base model"):
        peft_plan(GPT2Config(**TINY), lora)
