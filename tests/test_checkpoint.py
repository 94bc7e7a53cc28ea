"""Checkpoints and adapters in the files transformers and PEFT write, both ways.

* HF ``GPT2LMHeadModel.save_pretrained`` -> ``reflora.load_gpt2``: bit-identical tensors, the same logits;
  ``reflora.save_gpt2`` -> ``GPT2LMHeadModel.from_pretrained``: the same again.
* PEFT ``save_pretrained`` -> ``reflora.load_adapter`` -> the same outputs as PEFT, and
  ``reflora.save_adapter`` -> ``PeftModel.from_pretrained`` -> the same outputs, for bias 'none', 'all' and
  'lora_only' (trained biases saved) and rank/alpha patterns.
* Torch-side files are safetensors only: ``torch.load`` is made to fail for every test in this module.
* A save that fails half-way leaves nothing behind (no partial file, no temporary file, an older file intact).

Logits are compared in float64 on both sides, to 1e-12 relative to their largest entry (they differ only in
summation order, ~1e-15).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import reflora as rf
import reflora.checkpoint

# transformers deprecation noise from inside PeftModel.from_pretrained; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CONFIG = rf.GPT2Config(vocab_size=19, n_positions=11, n_embd=8, n_layer=2, n_head=2, n_inner=12)
RTOL = 1e-12


def relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    assert value.shape == reference.shape
    return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


def batch(seed: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (2, 7))
    attention_mask = np.ones((2, 7), dtype=np.int64)
    attention_mask[1, :2] = 0  # left padding
    return ids, attention_mask


@pytest.fixture
def torch_without_load(monkeypatch):
    """torch, with ``torch.load`` made to fail: nothing in these round trips may unpickle."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called: checkpoints must be read from safetensors")

    monkeypatch.setattr(torch, "load", forbidden)
    return torch


def hf_logits(model, ids, attention_mask) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention_mask)).logits
    return out.to(torch.float64).numpy()


# ----------------------------------------------------------------------------------------------
# GPT-2 checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_hf_save_pretrained_loads_into_reflora(tmp_path, torch_without_load):
    torch = torch_without_load
    from transformers import GPT2LMHeadModel

    from conformance.drivers.peft_bridge import hf_config

    torch.manual_seed(51)
    model = GPT2LMHeadModel(hf_config(CONFIG))
    with torch.no_grad():  # HF's init leaves biases 0 and LayerNorms 1: randomize everything so every key matters
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))

    params, config = rf.load_gpt2(tmp_path)
    assert config == CONFIG
    state = model.state_dict()
    assert set(params) == set(rf.base_shapes(CONFIG))
    for key, value in params.items():
        assert value.dtype == np.float32, key
        assert np.array_equal(value, state[key].numpy()), key

    ids, attention_mask = batch()
    logits32, _ = rf.gpt2_forward(params, config, ids, attention_mask=attention_mask)
    assert relative_error(logits32, hf_logits(model, ids, attention_mask)) < 1e-5  # float32 on both sides
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    logits64, _ = rf.gpt2_forward(params64, config, ids, attention_mask=attention_mask)
    assert relative_error(logits64, hf_logits(model.double(), ids, attention_mask)) <= RTOL


@pytest.mark.torch
def test_reflora_save_gpt2_loads_into_hf(tmp_path, torch_without_load):
    from transformers import GPT2LMHeadModel

    params = rf.init_gpt2_params(CONFIG, np.random.default_rng(52))
    rf.save_gpt2(tmp_path, params, CONFIG)
    model = GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch_without_load.float64, attn_implementation="sdpa")
    state = model.state_dict()
    for key, value in params.items():
        assert np.array_equal(state[key].numpy(), value), key
    assert np.array_equal(state["lm_head.weight"].numpy(), params["transformer.wte.weight"])  # tied
    ids, attention_mask = batch()
    logits, _ = rf.gpt2_forward(params, CONFIG, ids, attention_mask=attention_mask)
    assert relative_error(logits, hf_logits(model, ids, attention_mask)) <= RTOL


def test_save_gpt2_load_gpt2_round_trip(tmp_path):
    params = rf.init_gpt2_params(CONFIG, np.random.default_rng(53), np.float32)
    rf.save_gpt2(tmp_path, params, CONFIG)
    loaded, config = rf.load_gpt2(tmp_path / "model.safetensors", CONFIG)
    assert config == CONFIG
    assert list(loaded) == list(params)
    for key in params:
        assert loaded[key].dtype == np.float32 and np.array_equal(loaded[key], params[key])
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"


# ----------------------------------------------------------------------------------------------
# PEFT adapters
# ----------------------------------------------------------------------------------------------

ADAPTER_CONFIGS = {
    "bias none, rank and alpha patterns": rf.LoraConfig(
        r=3, lora_alpha=6.0, target_modules=["c_attn", "c_proj"], rank_pattern={"mlp.c_proj": 2},
        alpha_pattern={"h.1.attn.c_attn": 1.5}),
    "bias all, rsLoRA": rf.LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_fc"], bias="all", use_rslora=True),
    "bias lora_only, regex": rf.LoraConfig(r=4, lora_alpha=8.0, target_modules=r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)",
                                           bias="lora_only"),
}  # fmt: skip


def trained_state(lora: rf.LoraConfig, seed: int):
    """Base params, an adapter with non-zero B, and 'trained' biases for the bias mode (different from the base)."""
    rng = np.random.default_rng(seed)
    params = rf.init_gpt2_params(CONFIG, rng)
    plan = rf.plan_lora(CONFIG, lora)
    adapter = rf.init_lora_adapter(plan, rng)
    biases = {k: params[k] + rng.standard_normal(params[k].shape) for k in rf.trainable_bias_keys(CONFIG, lora, plan)}
    return params, adapter, biases


def reflora_logits(params, adapter, lora, biases, ids, attention_mask) -> np.ndarray:
    logits, _ = rf.gpt2_forward(
        {**params, **biases}, CONFIG, ids, attention_mask=attention_mask, adapter=adapter, lora=lora
    )
    return logits


@pytest.mark.torch
@pytest.mark.parametrize("name", list(ADAPTER_CONFIGS))
def test_peft_save_pretrained_loads_into_reflora(tmp_path, torch_without_load, name):
    pytest.importorskip("peft")
    torch = torch_without_load
    from conformance.drivers.peft_bridge import build_peft_model, live_base_name

    lora = ADAPTER_CONFIGS[name]
    params, adapter, biases = trained_state(lora, 54)
    peft_model = build_peft_model(CONFIG, params, lora, adapter)
    plan = rf.plan_lora(CONFIG, lora)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in biases.items():
            named[live_base_name(key, plan)].copy_(torch.from_numpy(value))
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))

    loaded, loaded_lora, loaded_biases = rf.load_adapter(tmp_path, CONFIG)
    assert rf.plan_lora(CONFIG, loaded_lora) == plan  # same modules, ranks, alphas, scalings, tensor names
    assert loaded_lora.bias == lora.bias and loaded_lora.use_rslora == lora.use_rslora
    assert set(loaded) == set(adapter) and set(loaded_biases) == set(biases)
    for key in adapter:
        assert np.array_equal(loaded[key], adapter[key]), key
    for key in biases:
        assert np.array_equal(loaded_biases[key], biases[key]), key

    ids, attention_mask = batch()
    logits = reflora_logits(params, loaded, loaded_lora, loaded_biases, ids, attention_mask)
    assert relative_error(logits, hf_logits(peft_model, ids, attention_mask)) <= RTOL


@pytest.mark.torch
@pytest.mark.parametrize("name", list(ADAPTER_CONFIGS))
def test_reflora_save_adapter_loads_into_peft(tmp_path, torch_without_load, name):
    pytest.importorskip("peft")
    torch = torch_without_load
    from peft import PeftModel

    from conformance.drivers.peft_bridge import build_hf_model, live_base_name

    lora = ADAPTER_CONFIGS[name]
    params, adapter, biases = trained_state(lora, 55)
    rf.save_adapter(tmp_path, adapter, lora, CONFIG, biases=biases)
    peft_model = PeftModel.from_pretrained(build_hf_model(CONFIG, params), tmp_path)
    named = dict(peft_model.named_parameters())
    plan = rf.plan_lora(CONFIG, lora)
    for key, value in adapter.items():
        head, _, leaf = key.rpartition(".")
        live = named[f"{head}.default.{leaf}"]
        assert live.dtype == torch.float64 and np.array_equal(live.detach().numpy(), value), key
    for key, value in biases.items():
        assert np.array_equal(named[live_base_name(key, plan)].detach().numpy(), value), key

    ids, attention_mask = batch()
    logits = reflora_logits(params, adapter, lora, biases, ids, attention_mask)
    assert relative_error(logits, hf_logits(peft_model, ids, attention_mask)) <= RTOL


def test_per_slice_adapter_round_trip(tmp_path):
    """qkv_slices is reflora-only (PEFT cannot load it); reflora reads back exactly what it wrote."""
    lora = rf.LoraConfig(r=2, lora_alpha=3.0, target_modules=["c_attn", "mlp.c_proj"], qkv_slices=["q", "v"])
    adapter = rf.init_lora_adapter(rf.plan_lora(CONFIG, lora), np.random.default_rng(56))
    rf.save_adapter(tmp_path, adapter, lora, CONFIG)
    loaded, loaded_lora, biases = rf.load_adapter(tmp_path, CONFIG)
    assert loaded_lora.qkv_slices == ("q", "v") and biases == {}
    assert rf.plan_lora(CONFIG, loaded_lora) == rf.plan_lora(CONFIG, lora)
    assert list(loaded) == list(adapter) and all(np.array_equal(loaded[k], adapter[k]) for k in adapter)


# ----------------------------------------------------------------------------------------------
# nothing half-written
# ----------------------------------------------------------------------------------------------


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    lora = rf.LoraConfig(r=2, target_modules=["c_attn"])
    adapter = rf.init_lora_adapter(rf.plan_lora(CONFIG, lora), np.random.default_rng(57))

    def disk_full(fd):  # the bytes are in the temporary file, but they never reach the disk
        raise OSError("No space left on device")

    monkeypatch.setattr(reflora.checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        rf.save_adapter(tmp_path / "adapter", adapter, lora, CONFIG)
    with pytest.raises(OSError, match="No space left"):
        rf.save_gpt2(tmp_path / "model", rf.init_gpt2_params(CONFIG, np.random.default_rng(58)), CONFIG)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no target file and no temporary file


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    lora = rf.LoraConfig(r=2, target_modules=["c_attn"])
    plan = rf.plan_lora(CONFIG, lora)
    rf.save_adapter(tmp_path, rf.init_lora_adapter(plan, np.random.default_rng(59)), lora, CONFIG)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_fsync = reflora.checkpoint.os.fsync
    calls = []

    def fsync_fails(fd):
        calls.append(fd)
        raise OSError("I/O error")

    monkeypatch.setattr(reflora.checkpoint.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="I/O error"):
        reflora.checkpoint.atomic_write_bytes(tmp_path / "adapter_config.json", b'{"r": 99}')
    monkeypatch.setattr(reflora.checkpoint.os, "fsync", real_fsync)
    assert calls, "the write did not go through atomic_write_bytes' fsync"

    def dies(tensors, metadata=None):
        raise OSError("No space left on device")

    monkeypatch.setattr(reflora.checkpoint, "safetensors_bytes", dies)
    with pytest.raises(OSError, match="No space left"):
        rf.save_adapter(tmp_path, rf.init_lora_adapter(plan, np.random.default_rng(60)), lora, CONFIG)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_adapter_save_that_fails_on_its_second_file_changes_neither(tmp_path, monkeypatch):
    """adapter_model.safetensors and adapter_config.json are replaced together or not at all."""
    lora = rf.LoraConfig(r=2, target_modules=["c_attn"])
    plan = rf.plan_lora(CONFIG, lora)
    rf.save_adapter(tmp_path, rf.init_lora_adapter(plan, np.random.default_rng(61)), lora, CONFIG)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync, calls = reflora.checkpoint.os.fsync, []

    def second_fsync_fails(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("I/O error")
        real_fsync(fd)

    monkeypatch.setattr(reflora.checkpoint.os, "fsync", second_fsync_fails)
    with pytest.raises(OSError, match="I/O error"):
        rf.save_adapter(tmp_path, rf.init_lora_adapter(plan, np.random.default_rng(62)), lora, CONFIG)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
