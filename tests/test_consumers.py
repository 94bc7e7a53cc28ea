"""The shipped adapter-file consumers (conformance/consumers): transformers' own ``load_adapter``
(PeftAdapterMixin) and PEFT's ``PeftModel.from_pretrained`` + ``merge_and_unload``, on files reflora wrote."""

from __future__ import annotations

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

pytest.importorskip("peft")
pytest.importorskip("transformers")

LOAD = ["file.load.c_attn", "file.load.all_targets", "file.load.rslora", "file.load.patterns", "file.load.layers",
        "file.load.lora_bias", "file.load.padding", "file.load.several", "file.dtype.float16", "file.dtype.bfloat16"]  # fmt: skip


@pytest.mark.parametrize("feature", [*LOAD, "file.load.dora", "file.merge.logits", "file.merge.dora"])
def test_peft_from_pretrained(feature, tmp_path):
    consumer = load_consumer("peft_from_pretrained")
    outcome = run_file_feature(consumer, FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "passed", outcome.detail


@pytest.mark.parametrize("feature", LOAD)
def test_transformers_load_adapter(feature, tmp_path):
    consumer = load_consumer("transformers_load_adapter")
    outcome = run_file_feature(consumer, FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "passed", outcome.detail


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
        import json

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
