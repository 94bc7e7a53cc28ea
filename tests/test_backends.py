"""The same model code on other array namespaces: ``array_api_strict`` (proves reflora uses only the array API
standard: that namespace rejects everything outside it) and CuPy on a GPU (skipped cleanly without one).

Each backend runs the whole forward and backward and is compared with the NumPy run of the same inputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import reflora as rf
from reflora.backend import get_backend, namespace, to_namespace, to_numpy

CONFIG = rf.GPT2Config(vocab_size=23, n_positions=10, n_embd=12, n_layer=2, n_head=3, n_inner=20)
SCENARIOS = {
    # full-matrix LoRA everywhere, dropout, bias='all', padding on both sides, HF positions; loss backward
    "lora_loss": dict(
        lora=rf.LoraConfig(
            r=3,
            lora_alpha=6.0,
            target_modules=["c_attn", "c_proj", "c_fc"],
            lora_dropout=0.2,
            bias="all",
            rank_pattern={"c_fc": 2},
        ),
        objective="loss",
        positions="per_row",
    ),
    # per-slice q/k/v LoRA, (1, T) positions, backward from a random dlogits
    "per_slice_dlogits": dict(
        lora=rf.LoraConfig(r=2, lora_alpha=3.0, target_modules=["c_attn"], qkv_slices=["q", "k", "v"]),
        objective="dlogits",
        positions="shared",
    ),
    # no LoRA, forward from inputs_embeds
    "inputs_embeds": dict(lora=None, objective="embeds", positions=None),
}


def make_inputs(scenario: str, dtype=np.float64) -> dict:
    spec = SCENARIOS[scenario]
    rng = np.random.default_rng(20)
    batch, seq_len = 3, 6
    lora = spec["lora"]
    params = rf.init_gpt2_params(CONFIG, rng, dtype)
    adapter = masks = None
    if lora is not None:
        plan = rf.plan_lora(CONFIG, lora)
        adapter = rf.init_lora_adapter(plan, rng, dtype=dtype)
        if lora.lora_dropout > 0:
            masks = rf.draw_dropout_masks(plan, lora.lora_dropout, batch, seq_len, rng, dtype)
    ids = rng.integers(0, CONFIG.vocab_size, (batch, seq_len))
    attention_mask = np.ones((batch, seq_len), dtype=np.int64)
    attention_mask[0, :2] = 0
    attention_mask[2, -1] = 0
    labels = np.where(attention_mask == 1, ids, -100)
    positions = None
    if spec["positions"] == "per_row":
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    elif spec["positions"] == "shared":
        positions = np.arange(2, 2 + seq_len)[None, :]
    wrt = [*rf.trainable_keys(CONFIG, lora), "transformer.wpe.weight", "transformer.wte.weight", "inputs_embeds"]
    if spec["objective"] == "embeds":  # without input_ids, wte is only the head: its gradient is not defined here
        wrt = [key for key in wrt if key != "transformer.wte.weight"]
    return {
        "params": params, "adapter": adapter, "lora": lora, "dropout_masks": masks, "input_ids": ids,
        "attention_mask": attention_mask, "position_ids": positions, "labels": labels,
        "dlogits": rng.standard_normal((batch, seq_len, CONFIG.vocab_size)).astype(dtype),
        "embeds": params["transformer.wte.weight"][ids], "wrt": list(dict.fromkeys(wrt)),
    }  # fmt: skip


def convert(value, xp):
    """NumPy arrays (also inside dicts) -> namespace ``xp``; everything else unchanged."""
    if isinstance(value, dict):
        return {k: convert(v, xp) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_namespace(xp, value)
    return value


def run_model(inputs: dict, scenario: str, xp) -> dict:
    """Forward and backward on namespace ``xp``; returns NumPy copies of logits, loss and gradients."""
    x = convert(inputs, xp)
    objective = SCENARIOS[scenario]["objective"]
    fw = {k: x[k] for k in ("attention_mask", "position_ids", "adapter", "lora", "dropout_masks")}
    out = {}
    if objective == "loss":
        loss, logits, grads = rf.gpt2_loss_and_grads(
            x["params"], CONFIG, x["input_ids"], x["labels"], wrt=x["wrt"], **fw
        )
        out["loss"] = loss
    elif objective == "dlogits":
        logits, cache = rf.gpt2_forward(x["params"], CONFIG, x["input_ids"], **fw)
        grads = rf.gpt2_backward(x["dlogits"], cache, x["wrt"])
    else:
        logits, cache = rf.gpt2_forward(x["params"], CONFIG, inputs_embeds=x["embeds"], **fw)
        grads = rf.gpt2_backward(x["dlogits"], cache, x["wrt"])
    out["logits"] = logits
    out.update({f"grad/{k}": v for k, v in grads.items()})
    for key, value in out.items():
        assert namespace(value) is xp, f"{key} left the {xp.__name__} namespace"
    return {k: to_numpy(v) for k, v in out.items()}


def assert_same_results(got: dict, expected: dict, rtol: float) -> None:
    assert set(got) == set(expected)
    for key in expected:
        scale = max(float(np.max(np.abs(expected[key]))), np.finfo(np.float64).tiny)
        error = float(np.max(np.abs(np.asarray(got[key], np.float64) - expected[key]))) / scale
        assert error <= rtol, f"{key}: relative error {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_array_api_strict_matches_numpy(scenario):
    xps = pytest.importorskip("array_api_strict")
    inputs = make_inputs(scenario)
    expected = run_model(inputs, scenario, np)
    got = run_model(inputs, scenario, xps)
    # the strict path differs from NumPy's only in the embedding scatter-add (one-hot matmul): rounding only
    assert_same_results(got, expected, rtol=1e-13)


def test_array_api_strict_float32_matches_numpy_float32():
    xps = pytest.importorskip("array_api_strict")
    inputs = make_inputs("lora_loss", np.float32)
    expected = run_model(inputs, "lora_loss", np)
    got = run_model(inputs, "lora_loss", xps)
    assert got["logits"].dtype == np.float32
    assert_same_results(got, expected, rtol=1e-5)


def test_get_backend_names():
    assert get_backend("numpy") is np
    with pytest.raises(ValueError, match="backend must be"):
        get_backend("jax")


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cupy_matches_numpy(scenario):
    cp = pytest.importorskip("cupy")
    try:
        gpus = cp.cuda.runtime.getDeviceCount()
    except Exception:  # CUDARuntimeError when the driver is missing
        gpus = 0
    if gpus == 0:
        pytest.skip("CuPy is installed but no GPU is visible")
    inputs = make_inputs(scenario)
    expected = run_model(inputs, scenario, np)
    got = run_model(inputs, scenario, cp)
    # cuBLAS sums in another order than NumPy's BLAS: float64 rounding differences only
    assert_same_results(got, expected, rtol=1e-11)


def test_api_doc_example_runs(tmp_path, monkeypatch):
    """The worked example in docs/api.md runs as written (NumPy backend)."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "api.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert blocks, "docs/api.md has no python example"
    monkeypatch.chdir(tmp_path)  # the example may write files
    exec(compile(blocks[0], str(doc), "exec"), {"__name__": "docs_api_example"})
