"""float32 against float64: how far reflora's float32 run is from its own float64 run.

The same seeded tensors are run in float64 and, cast once, in float32. The error of a tensor is
max |x32 − x64| / max |x64| (per tensor; the loss as a plain relative error). The measured worst cases
(docs/semantics.md, "dtypes"), over the four configs below and seeds 30..37 each, are

    logits 1.7e-6, loss 1.0e-7, gradients 8.1e-6         (float32's ε is 1.2e-7)

The tests (seed 30) assert the bounds in ``BOUNDS``: the measured worst case times a safety factor of 10,
which leaves room for other BLAS builds and summation orders but fails on a float32 path that is an order
of magnitude less accurate than today's, or on one that silently computes in float64 (error exactly 0).
"""

from __future__ import annotations

import numpy as np
import pytest

import reflora as rf

SAFETY_FACTOR = 10
MEASURED = {"logits": 1.7e-6, "loss": 1.0e-7, "grads": 8.1e-6}
BOUNDS = {kind: SAFETY_FACTOR * value for kind, value in MEASURED.items()}

CONFIGS = {
    # a small model with LoRA on attention, dropout and bias='all'; padded batch
    "small": dict(
        gpt2=rf.GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4),
        lora=rf.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], lora_dropout=0.1, bias="all"),
        batch=2, seq_len=16,
    ),
    # deeper, head_dim 8, per-slice q/v LoRA and every base tensor's gradient
    "deep_per_slice": dict(
        gpt2=rf.GPT2Config(vocab_size=257, n_positions=24, n_embd=48, n_layer=4, n_head=6),
        lora=rf.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], qkv_slices=["q", "v"]),
        batch=2, seq_len=24, everything=True,
    ),
    # trained-like weight scale (std 0.2, not 0.02): peaked attention, large logits, a 3-layer stack
    "large_weights": dict(
        gpt2=rf.GPT2Config(vocab_size=211, n_positions=20, n_embd=96, n_layer=3, n_head=8, n_inner=200),
        lora=rf.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.05,
                           bias="lora_only"),
        batch=3, seq_len=20, weight_std=0.2, everything=True,
    ),
    # GPT-2 small's width and head size in one layer, with a 1000-token vocabulary
    "gpt2_width": dict(
        gpt2=rf.GPT2Config(vocab_size=1000, n_positions=64, n_embd=768, n_layer=1, n_head=12),
        lora=rf.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], use_rslora=True),
        batch=1, seq_len=32,
    ),
}  # fmt: skip


def run(name: str, dtype, seed: int = 30) -> dict[str, np.ndarray]:
    spec = CONFIGS[name]
    config, lora, batch, seq_len = spec["gpt2"], spec["lora"], spec["batch"], spec["seq_len"]
    rng = np.random.default_rng(seed)
    params = rf.init_gpt2_params(config, rng)  # float64 draws, cast once below
    for key, value in params.items():
        if not (".ln_" in key and key.endswith(".weight")):
            value *= spec.get("weight_std", 0.02) / 0.02
    plan = rf.plan_lora(config, lora)
    adapter = rf.init_lora_adapter(plan, rng)
    masks = rf.draw_dropout_masks(plan, lora.lora_dropout, batch, seq_len, rng) if lora.lora_dropout else None
    ids = rng.integers(0, config.vocab_size, (batch, seq_len))
    attention_mask = np.ones((batch, seq_len), dtype=np.int64)
    attention_mask[0, :3] = 0
    labels = np.where(attention_mask == 1, ids, -100)
    wrt = rf.trainable_keys(config, lora)
    if spec.get("everything"):
        wrt = list(dict.fromkeys([*wrt, *rf.base_shapes(config), "inputs_embeds"]))
    cast = lambda d: None if d is None else {k: v.astype(dtype) for k, v in d.items()}  # noqa: E731
    loss, logits, grads = rf.gpt2_loss_and_grads(
        cast(params), config, ids, labels, wrt=wrt, adapter=cast(adapter), lora=lora, attention_mask=attention_mask,
        dropout_masks=cast(masks),
    )  # fmt: skip
    assert logits.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    return {"loss": np.asarray(loss), "logits": logits, **{f"grad/{k}": g for k, g in grads.items()}}


def float32_errors(name: str, seed: int = 30) -> dict[str, float]:
    """Relative error of every output of the float32 run against the float64 run."""
    exact, single = run(name, np.float64, seed), run(name, np.float32, seed)
    errors = {}
    for key, reference in exact.items():
        error = np.max(np.abs(single[key].astype(np.float64) - reference)) / np.max(np.abs(reference))
        errors[key] = float(error)
    return errors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_stays_within_the_documented_bound(name):
    errors = float32_errors(name)
    worst = {
        "logits": errors["logits"],
        "loss": errors["loss"],
        "grads": max(v for k, v in errors.items() if k.startswith("grad/")),
    }
    for kind, bound in BOUNDS.items():
        assert worst[kind] <= bound, f"{name}: float32 {kind} error {worst[kind]:.2e} > bound {bound:.0e}"
    # and float32 really is float32: an error of exactly 0 would mean the run silently stayed in float64
    assert worst["logits"] > 0 and worst["grads"] > 0
