"""The shipped adapter-file consumers (conformance/consumers): transformers' own ``load_adapter``
(PeftAdapterMixin) and PEFT's ``PeftModel.from_pretrained`` + ``merge_and_unload``, on files reflora wrote; and
mlx-lm's ``load_adapters`` + ``fuse`` on the PEFT folder translated to mlx-lm's format (mlx_lm_fuse).

The torch consumers' tests need peft and transformers (the default venv); the mlx_lm_fuse tests need mlx-lm and
run in the mlx venv (``python -m conformance.envs run mlx -- python -m pytest tests/test_consumers.py``), or, from
the default venv, through ``reflora conform --consumer mlx_lm_fuse --isolated`` when that venv is already built.
Each skips cleanly where its libraries are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from conformance.consumers import load_consumer
from conformance.files import (
    FILE_FEATURE_IDS,
    FILE_FEATURES,
    check_file_case,
    consumer_deviations,
    draw_file_case,
    run_file_feature,
    write_file_case,
)
from reflora.checkpoint import load_adapter, load_gpt2

needs_torch = pytest.mark.skipif(find_spec("peft") is None or find_spec("transformers") is None,
                                 reason="needs peft and transformers (the default venv)")  # fmt: skip
needs_mlx = pytest.mark.skipif(find_spec("mlx_lm") is None, reason="needs mlx-lm (the mlx venv)")

LOAD = ["file.load.c_attn", "file.load.all_targets", "file.load.rslora", "file.load.patterns", "file.load.layers",
        "file.load.lora_bias", "file.load.padding", "file.load.several", "file.dtype.float16", "file.dtype.bfloat16"]  # fmt: skip


@needs_torch
@pytest.mark.parametrize("feature", [*LOAD, "file.load.dora", "file.merge.logits", "file.merge.dora"])
def test_peft_from_pretrained(feature, tmp_path):
    consumer = load_consumer("peft_from_pretrained")
    outcome = run_file_feature(consumer, FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "passed", outcome.detail


@needs_torch
@pytest.mark.parametrize("feature", LOAD)
def test_transformers_load_adapter(feature, tmp_path):
    consumer = load_consumer("transformers_load_adapter")
    outcome = run_file_feature(consumer, FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "passed", outcome.detail


@needs_torch
def test_transformers_load_adapter_drops_the_dora_magnitude_a_known_deviation(tmp_path):
    consumer = load_consumer("transformers_load_adapter")
    feature = FILE_FEATURE_IDS["file.load.dora"]
    outcome = run_file_feature(consumer, feature, tmp_path, examples=1, deviations=consumer_deviations(consumer))
    assert outcome.outcome == "known_deviation", outcome.detail
    merge = run_file_feature(consumer, FILE_FEATURE_IDS["file.merge.logits"], tmp_path, examples=1)
    assert merge.outcome == "not_supported" and "no merge" in merge.detail


@pytest.mark.parametrize("feature", FILE_FEATURES, ids=lambda f: f.id)
def test_the_files_reflora_writes_read_back_to_the_case(feature, tmp_path):
    case = draw_file_case(feature.variant, 5)
    paths = write_file_case(case, tmp_path)
    if case.file_dtype == "bfloat16":  # NumPy cannot read BF16: check the header, then read with torch
        pytest.importorskip("torch")
        from safetensors.torch import load_file

        data = (paths["base"] / "model.safetensors").read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
        loaded = load_file(paths["base"] / "model.safetensors")
        assert all(np.array_equal(loaded[k].double().numpy(), v) for k, v in case.params.items())
        return
    params, config = load_gpt2(paths["base"])
    assert config == case.config
    assert all(np.array_equal(params[k].astype(np.float64), v) for k, v in case.params.items())
    tensors, lora, _ = load_adapter(paths["adapter"], config)
    expected = case.adapters["default"][0]
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.use_dora, lora.lora_bias, lora.rank_pattern) == (
        expected.r, expected.lora_alpha, expected.use_rslora, expected.use_dora, expected.lora_bias,
        expected.rank_pattern)  # fmt: skip
    assert all(np.array_equal(tensors[k].astype(np.float64), v) for k, v in case.adapters["default"][1].items())


def test_a_consumer_missing_the_scaling_fails(tmp_path):
    case = draw_file_case("plain", 3)
    lora, tensors = case.adapters["default"]
    import dataclasses

    from reflora.model import gpt2_forward

    unscaled = dataclasses.replace(lora, lora_alpha=lora.r)  # scaling 1 instead of alpha/r
    logits, _ = gpt2_forward(case.params, case.config, case.input_ids, adapter=tensors, lora=unscaled)
    comparisons = check_file_case(case, FILE_FEATURE_IDS["file.load.c_attn"], {"logits": np.asarray(logits)})
    assert not all(c.passed for c in comparisons)


@needs_torch
def test_transformers_load_adapter_refuses_the_newest_peft_release_without_the_gate_turned_off():
    """transformers 5.24.0 demands peft >= 0.22.0 in every PeftAdapterMixin method but load_adapter (set_adapter
    included); 0.21.2 is the newest release (the consumer turns this one gate off; see its docstring)."""
    import peft
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    if Version(peft.__version__) >= Version(MIN_PEFT_VERSION):
        pytest.skip(f"peft {peft.__version__} passes the gate")
    with pytest.raises(ValueError, match="not compatible"):
        check_peft_version(min_version=MIN_PEFT_VERSION)


# ----------------------------------------------------------------------------------------------
# mlx-lm: load_adapters + fuse on the translated folder (conformance/consumers/mlx_lm_fuse.py)
# ----------------------------------------------------------------------------------------------

MLX_PASS = ["file.load.c_attn", "file.load.all_targets", "file.load.layers", "file.load.dora",
            "file.load.several", "file.dtype.float32", "file.dtype.float16", "file.dtype.bfloat16",
            "file.merge.logits", "file.merge.dora"]  # fmt: skip
MLX_NOT_SUPPORTED = {"file.load.patterns": "one lora_parameters.rank", "file.load.lora_bias": "no bias on B",
                     "file.load.padding": "no attention mask", "file.load.rslora": "no rsLoRA"}  # fmt: skip


def test_mlx_lm_fuse_declares_what_mlx_lm_format_cannot_carry():
    """Declared without importing mlx: every file.* feature is either supported or has a reason."""
    consumer = load_consumer("mlx_lm_fuse")
    assert set(FILE_FEATURE_IDS) - consumer.file_features == set(MLX_NOT_SUPPORTED)
    for feature, words in MLX_NOT_SUPPORTED.items():
        assert words in consumer.notes[feature]
    assert "no PEFT reader" in consumer.notes["translation"]
    assert "scale = lora_alpha / r" in consumer.notes["scale"] and "given that scale" in consumer.notes["scale"]


def test_mlx_lm_fuse_does_not_translate_rslora_into_a_scale():
    """mlx-lm has no rsLoRA (its lora_parameters.scale is an absolute multiplier): writing reflora's alpha / √r
    there would check reflora's formula, so a use_rslora file is refused at translation, naming the reason."""
    from conformance.consumers.mlx_lm_fuse import _mlx_plan
    from conformance.protocol import NotSupported

    case = draw_file_case("rslora", 1)
    lora, _ = case.adapters["default"]
    assert lora.use_rslora
    with pytest.raises(NotSupported, match="no rsLoRA"):
        _mlx_plan(case.config, lora, Path("adapter"))


@needs_mlx
@pytest.mark.parametrize("feature", MLX_PASS)
def test_mlx_lm_fuse(feature, tmp_path):
    outcome = run_file_feature(load_consumer("mlx_lm_fuse"), FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "passed", outcome.detail


@needs_mlx
@pytest.mark.parametrize("feature", sorted(MLX_NOT_SUPPORTED))
def test_mlx_lm_fuse_not_supported_with_its_reason(feature, tmp_path):
    outcome = run_file_feature(load_consumer("mlx_lm_fuse"), FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "not_supported" and MLX_NOT_SUPPORTED[feature] in outcome.detail, outcome.detail


@needs_mlx
def test_mlx_lm_fuse_translation_key_map(tmp_path):
    """PEFT lora_A (r, in) -> lora_a (in, r), lora_B (out, r) -> lora_b (r, out), magnitude -> m; the config's
    num_layers / rank / scale / keys; mlx-lm's own load_adapters accepts the folder."""
    import mlx.core as mx

    from conformance.consumers.mlx_lm_fuse import translate

    case = draw_file_case("dora", 2)
    paths = write_file_case(case, tmp_path / "case")
    lora, tensors = case.adapters["default"]
    out = translate(paths["adapter"], case.config, tmp_path / "mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {
        "rank": lora.r, "scale": lora.lora_alpha / lora.r, "dropout": 0.0, "keys": ["attn.c_attn", "mlp.c_fc"]}}  # fmt: skip
    weights = {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}
    assert len(weights) == len(tensors) == 12
    peft = "base_model.model.transformer.h.1.mlp.c_fc"
    np.testing.assert_array_equal(weights["model.h.1.mlp.c_fc.lora_a"], tensors[f"{peft}.lora_A.weight"].T)
    np.testing.assert_array_equal(weights["model.h.1.mlp.c_fc.lora_b"], tensors[f"{peft}.lora_B.weight"].T)
    np.testing.assert_array_equal(weights["model.h.1.mlp.c_fc.m"], tensors[f"{peft}.lora_magnitude_vector"])


@needs_mlx
def test_mlx_lm_fuse_refuses_layers_that_are_not_the_last_blocks(tmp_path):
    import dataclasses

    from conformance.consumers.mlx_lm_fuse import translate
    from conformance.protocol import NotSupported

    case = draw_file_case("layers", 4)
    lora, tensors = case.adapters["default"]
    case.adapters["default"] = (dataclasses.replace(lora, layers_to_transform=(0,)),
                                {k.replace(".h.1.", ".h.0."): v for k, v in tensors.items()})  # fmt: skip
    paths = write_file_case(case, tmp_path / "case")
    with pytest.raises(NotSupported, match="last N blocks"):
        translate(paths["adapter"], case.config, tmp_path / "mlx")


@needs_mlx
def test_mlx_lm_fuse_a_wrong_scale_in_the_translation_is_caught(tmp_path, monkeypatch):
    """The check is not blind to the translation: scale = alpha instead of alpha / r fails file.load.c_attn."""
    from conformance.consumers import mlx_lm_fuse

    original = mlx_lm_fuse._mlx_plan

    def unscaled(base_config, lora, where):
        config, keys = original(base_config, lora, where)
        config["lora_parameters"]["scale"] = lora.lora_alpha
        return config, keys

    monkeypatch.setattr(mlx_lm_fuse, "_mlx_plan", unscaled)
    outcome = run_file_feature(mlx_lm_fuse.consumer, FILE_FEATURE_IDS["file.load.c_attn"], tmp_path, examples=1)
    assert outcome.outcome == "failed", outcome.detail


def _mlx_env_built() -> bool:
    from conformance.envs import GROUPS, env_root, is_current

    return is_current(GROUPS["mlx"], env_root() / "mlx")


@pytest.mark.skipif(not _mlx_env_built(), reason="the mlx venv is not built (python -m conformance.envs build mlx)")
def test_mlx_lm_fuse_isolated_from_the_default_venv_writes_its_report(tmp_path):
    """``reflora conform --consumer mlx_lm_fuse --isolated`` runs in the mlx venv and writes the
    ``reflora-consumer/1`` report the matrix reads."""
    report = tmp_path / "mlx_lm_fuse.json"
    command = [sys.executable, "-m", "reflora.tools", "conform", "--consumer", "mlx_lm_fuse", "--isolated",
               "--max-examples", "1", "-k", "file.load", "--report-json", str(report)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(report.read_text())
    assert data["format"] == "reflora-consumer/1" and data["versions"]["candidate"].startswith("mlx-lm 0.32")
    outcomes = {r["feature"]: r["outcome"] for r in data["results"]}
    assert outcomes["file.load.c_attn"] == "passed" and outcomes["file.load.padding"] == "not_supported"
    assert data["summary"]["checked"] == 5 and data["summary"]["not_supported"] == 4
