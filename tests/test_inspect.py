"""``reflora inspect``: parameter counts and LoRA tensor shapes from shapes alone.

The defaults are the seed article's example (GPT-2 small, r=8, alpha=16, target_modules c_attn c_proj):
124,439,808 base parameters and 811,008 trainable ones, because ``c_proj`` also matches ``mlp.c_proj``.
The counts are cross-checked against a real PEFT model (sum of ``requires_grad`` numel) on small configs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import reflora as rf
from reflora.tools.cli import main
from reflora.tools.inspect import inspect_lora

PREFIX = "base_model.model.transformer.h"


def inspect_json(capsys, *args: str) -> dict:
    assert main(["inspect", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_defaults_are_the_seed_article_numbers(capsys):
    report = inspect_json(capsys)
    assert {"base_params", "trainable_params", "total_params", "trainable_fraction", "lora_tensors"} <= set(report)
    assert report["base_params"] == 124_439_808
    assert report["trainable_params"] == 811_008
    assert report["total_params"] == 124_439_808 + 811_008
    assert report["trainable_fraction"] == pytest.approx(811_008 / (124_439_808 + 811_008), rel=1e-15)
    tensors = report["lora_tensors"]
    assert tensors[f"{PREFIX}.0.attn.c_attn.lora_B.weight"] == [2304, 8]  # (out, r)
    assert tensors[f"{PREFIX}.0.attn.c_attn.lora_A.weight"] == [8, 768]  # (r, in)
    assert tensors[f"{PREFIX}.11.mlp.c_proj.lora_A.weight"] == [8, 3072]  # c_proj matches mlp.c_proj too
    assert tensors[f"{PREFIX}.11.mlp.c_proj.lora_B.weight"] == [768, 8]
    assert len(tensors) == 12 * 3 * 2
    assert not any(".c_fc." in key for key in tensors)


def test_per_slice_qv_rank_2(capsys):
    report = inspect_json(capsys, "--r", "2", "--target-modules", "c_attn", "--qkv-slices", "q,v")
    assert report["trainable_params"] == 73_728  # 12 layers x 2 slices x (2x768 + 768x2)
    assert report["lora_tensors"][f"{PREFIX}.3.attn.c_attn.lora_B.v.weight"] == [768, 2]
    assert f"{PREFIX}.3.attn.c_attn.lora_A.k.weight" not in report["lora_tensors"]


def test_regex_bias_and_layer_options(capsys):
    report = inspect_json(capsys, "--target-modules", r"re:.*\.h\.(0|5)\.mlp\.c_fc", "--bias", "lora_only")
    assert set(report["modules"]) == {"transformer.h.0.mlp.c_fc", "transformer.h.5.mlp.c_fc"}
    assert report["trainable_params"] == 2 * (8 * 768 + 3072 * 8) + 2 * 3072  # + the two c_fc biases
    report = inspect_json(capsys, "--target-modules", "c_attn", "--layers-to-transform", "1", "2", "--use-rslora")
    assert set(report["modules"]) == {"transformer.h.1.attn.c_attn", "transformer.h.2.attn.c_attn"}
    assert report["modules"]["transformer.h.1.attn.c_attn"]["scaling"] == pytest.approx(16 / 8**0.5)


def test_table_output_shows_the_counts(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "811,008" in out
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight" in out and "(2304, 8)" in out


def test_console_script_and_errors():
    done = subprocess.run(
        [sys.executable, "-m", "reflora.tools", "inspect", "--json", "--r", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout)["trainable_params"] == 811_008 // 2
    done = subprocess.run(
        [sys.executable, "-m", "reflora.tools", "inspect", "--r", "0"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "lora.r must be an integer >= 1, got 0" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "reflora.tools", "inspect", "--target-modules", "q_proj"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "matches no module" in done.stderr


SMALL = rf.GPT2Config(vocab_size=97, n_positions=16, n_embd=12, n_layer=3, n_head=3, n_inner=20)
PEFT_CONFIGS = [
    rf.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
    rf.LoraConfig(r=3, target_modules=["c_attn", "c_fc", "mlp.c_proj"], bias="all", rank_pattern={"c_fc": 5}),
    rf.LoraConfig(r=2, target_modules=["c_proj"], bias="lora_only", layers_to_transform=[0, 2]),
    rf.LoraConfig(r=16, target_modules=r".*\.h\.1\.(attn|mlp)\.c_.*", bias="lora_only"),
]


@pytest.mark.torch
@pytest.mark.parametrize("lora", PEFT_CONFIGS, ids=lambda lora: f"r{lora.r}-{lora.bias}-{lora.target_modules}")
def test_counts_match_a_real_peft_model(lora):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import numpy as np

    from conformance.drivers.peft_bridge import build_peft_model

    rng = np.random.default_rng(70)
    params = rf.init_gpt2_params(SMALL, rng)
    plan = rf.plan_lora(SMALL, lora)
    peft_model = build_peft_model(SMALL, params, lora, rf.init_lora_adapter(plan, rng))
    report = inspect_lora(SMALL, lora)
    named = dict(peft_model.named_parameters())  # tied wte / lm_head counted once, as in the report
    assert report["trainable_params"] == sum(p.numel() for p in named.values() if p.requires_grad)
    assert report["total_params"] == sum(p.numel() for p in named.values())
    assert (
        report["base_params"]
        == sum(p.numel() for p in peft_model.get_base_model().parameters()) - report["lora_params"]
    )
    live_lora = {name.replace(".default.", "."): list(p.shape) for name, p in named.items() if ".lora_" in name}
    assert report["lora_tensors"] == live_lora
