"""reflora.tools.train and reflora.tools.data: batches, accumulation, schedules, checkpoints and bit-exact resume, the CLI.

Every model here is tiny (n_embd 8, one or two layers, T = 8), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from reflora import LoraConfig, load_adapter, load_gpt2
from reflora.config import GPT2Config
from reflora.optim import AdamWConfig, SGDConfig, optimizer_config_to_dict
from reflora.tools.cli import main
from reflora.tools.data import (
    SPLIT_BLOCK,
    VOCAB_SIZE,
    batch_rng,
    decode,
    encode,
    eval_windows,
    load_corpus,
    sample_windows,
    split_tokens,
)
from reflora.tools.train import (
    TrainConfig,
    accumulated_loss_and_grads,
    evaluate,
    init_pretraining_params,
    init_rng,
    load_checkpoint,
    lr_factor,
    new_state,
    run_training,
    save_checkpoint,
)

TINY = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=8, n_embd=8, n_layer=2, n_head=2)
TINY_ARGS = ["--n-embd", "8", "--n-layer", "1", "--n-head", "2", "--seq-len", "8", "--batch-size", "2",
             "--eval-windows", "4", "--eval-every", "0", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def splits():
    """A small deterministic corpus (the first 60 kB of pydoc topics), split as any corpus is."""
    return split_tokens(encode(load_corpus("pydoc"))[: 30 * SPLIT_BLOCK])


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_utf8():
    text = "LoRA: ΔW = B·A, r ≪ d ✓\n"
    ids = encode(text)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < VOCAB_SIZE
    assert len(ids) == len(text.encode("utf-8")) and decode(ids) == text


def test_split_is_a_deterministic_partition_into_interleaved_blocks():
    tokens = np.arange(45 * SPLIT_BLOCK + 100) % 251
    split = split_tokens(tokens)
    assert sum(len(v) for v in split.values()) == len(tokens)
    # blocks 9, 29 are validation; 19, 39 are test; the partial last block (44) is train
    assert np.array_equal(
        split["validation"], np.concatenate([tokens[i * SPLIT_BLOCK : (i + 1) * SPLIT_BLOCK] for i in (9, 29)])
    )
    assert np.array_equal(
        split["test"], np.concatenate([tokens[i * SPLIT_BLOCK : (i + 1) * SPLIT_BLOCK] for i in (19, 39)])
    )
    assert all(np.array_equal(a, b) for a, b in zip(split.values(), split_tokens(tokens).values()))


def test_a_batch_depends_only_on_seed_step_and_micro_batch(splits):
    def batch(seed, step, micro):
        return sample_windows(splits["train"], 3, 8, batch_rng(seed, step, micro))

    assert np.array_equal(batch(1, 5, 0), batch(1, 5, 0))
    assert not np.array_equal(batch(1, 5, 0), batch(1, 5, 1))
    assert not np.array_equal(batch(1, 5, 0), batch(1, 6, 0))
    assert not np.array_equal(batch(1, 5, 0), batch(2, 5, 0))


def test_eval_windows_are_consecutive_and_evenly_spaced():
    tokens = np.arange(100)
    assert np.array_equal(eval_windows(tokens, 10)[3], np.arange(30, 40))
    assert [w[0] for w in eval_windows(tokens, 10, max_windows=4)] == [0, 30, 60, 90]


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_the_whole_batch(splits):
    """Two micro-batches of 2 windows give the gradient of one batch of 4: every window counts T − 1 tokens."""
    params = init_pretraining_params(TINY, init_rng(0, 0), np.float64)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"])
    state = new_state(TINY, lora, params, AdamWConfig(), seed=0)
    state.adapter = {k: v + 0.01 for k, v in state.adapter.items()}  # B ≠ 0, so A's gradient is not zero
    ids = sample_windows(splits["train"], 4, 8, batch_rng(0, 0, 0))
    whole_loss, whole = accumulated_loss_and_grads(
        state.params, state.adapter, TINY, lora, [{"input_ids": ids, "labels": ids}]
    )
    halves = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    acc_loss, acc = accumulated_loss_and_grads(state.params, state.adapter, TINY, lora, halves)
    assert abs(acc_loss - whole_loss) <= 1e-14 * whole_loss
    for key in whole:
        np.testing.assert_allclose(acc[key], whole[key], rtol=0, atol=1e-14 * np.abs(whole[key]).max())


@pytest.mark.torch
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_are_hf_transformers(schedule):
    import torch
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    train = TrainConfig(steps=20, schedule=schedule, warmup_steps=4)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(opt, 4)
    elif schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(opt, 4, 20)
    else:
        scheduler = get_cosine_schedule_with_warmup(opt, 4, 20)
    for step in range(20):
        assert lr_factor(step, train) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-15, abs=1e-15), step
        opt.step()
        scheduler.step()


def test_min_lr_ratio_bounds_the_decay():
    train = TrainConfig(steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, train) == 1.0 and lr_factor(10, train) == pytest.approx(0.1)
    assert all(0.1 - 1e-12 <= lr_factor(s, train) <= 1.0 for s in range(11))


def test_training_lowers_the_held_out_loss(splits):
    params = init_pretraining_params(TINY, init_rng(0, 0), np.float32)
    optimizer = AdamWConfig(lr=1e-2, weight_decay=0.0)
    state = new_state(TINY, None, params, optimizer, seed=0)
    windows = eval_windows(splits["validation"], 8, 16)
    before = evaluate(state.params, TINY, windows)
    assert abs(before - math.log(VOCAB_SIZE)) < 0.05  # an untrained model is uniform over the bytes
    run_training(state, TrainConfig(steps=40, batch_size=8, seq_len=8, eval_windows=16), optimizer, splits)
    assert state.evals[-1]["validation_loss"] < before - 1.0
    assert [r["step"] for r in state.history] == list(range(1, 41))


# ----------------------------------------------------------------------------------------------
# checkpoints and resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "optimizer"),
    [
        (LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.1, bias="lora_only"),
         AdamWConfig(lr=1e-2, weight_decay=0.1)),
        (None, SGDConfig(lr=0.1, momentum=0.9)),
    ],
    ids=["lora-adamw-dropout-bias", "full-sgd-momentum"],
)  # fmt: skip
def test_resume_is_bit_exact(tmp_path, splits, lora, optimizer):
    """Stop after 3 of 6 steps, save, load, finish: every tensor, the optimizer state and the history are exactly
    those of the uninterrupted run."""
    train = TrainConfig(steps=6, batch_size=2, seq_len=8, grad_accum=2, clip_norm=0.5, schedule="cosine",
                        warmup_steps=2, eval_every=2, eval_windows=4)  # fmt: skip
    params = init_pretraining_params(TINY, init_rng(0, 0), np.float64)
    straight = run_training(new_state(TINY, lora, params, optimizer, seed=0), train, optimizer, splits)

    settings = {"optimizer": optimizer_config_to_dict(optimizer)}
    first = run_training(new_state(TINY, lora, params, optimizer, seed=0), train, optimizer, splits, stop_at=3,
                         checkpoint=lambda s: save_checkpoint(tmp_path, s, settings))  # fmt: skip
    assert first.step == 3
    resumed, _ = load_checkpoint(tmp_path)
    assert resumed.step == 3 and resumed.lora == lora
    run_training(resumed, train, optimizer, splits)
    for got, want in ((resumed.params, straight.params), (resumed.adapter or {}, straight.adapter or {})):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    for buffer in straight.opt_state:
        if buffer != "step":
            assert all(np.array_equal(resumed.opt_state[buffer][k], v) for k, v in straight.opt_state[buffer].items())
    assert resumed.history == straight.history and resumed.evals == straight.evals


def test_cli_trains_saves_and_resumes_bit_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "--out", str(straight), "--steps", "4", *TINY_ARGS]) == 0
    assert main(["train", "--out", str(interrupted), "--steps", "2", *TINY_ARGS]) == 0
    assert main(["train", "--out", str(interrupted), "--resume", "--steps", "4", "--quiet"]) == 0
    adapter, lora, _ = load_adapter(straight / "adapter", load_gpt2(straight / "checkpoints" / "step-4")[1])
    resumed, _, _ = load_adapter(interrupted / "adapter", load_gpt2(interrupted / "checkpoints" / "step-4")[1])
    assert lora.r == 8 and lora.target_modules == ("c_attn", "c_proj")
    assert all(np.array_equal(adapter[k], resumed[k]) for k in adapter)
    history = json.loads((interrupted / "checkpoints" / "step-4" / "trainer_state.json").read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert not (interrupted / "checkpoints" / "step-2").exists()
    optimizer_file = (interrupted / "checkpoints" / "step-4" / "optimizer.safetensors").read_bytes()
    assert b"exp_avg/base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in optimizer_file


def test_cli_full_fine_tuning_writes_a_transformers_model(tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--out", str(base), "--steps", "2", "--full", *TINY_ARGS]) == 0
    _, config = load_gpt2(base / "model")
    assert config.n_embd == 8 and config.vocab_size == VOCAB_SIZE
    # fine-tune that model with LoRA from --base
    assert main(["train", "--out", str(tmp_path / "ft"), "--base", str(base / "model"), "--steps", "1",
                 "--r", "2", *TINY_ARGS[6:]]) == 0  # fmt: skip
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--corpus", "pydoc", "--text-file", "x.txt"], "not both"),
        (["--text-file", "/nonexistent.txt"], "no such file"),
        (["--resume"], "no checkpoint to resume from"),
        (["--grad-accum", "0"], "train.grad_accum"),
        (["--optimizer", "sgd", "--nesterov"], "sgd.nesterov"),
        (["--seq-len", "16", "--n-positions", "8"], "exceeds --n-positions"),
    ],
)
def test_cli_errors_name_the_problem(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), "--steps", "1", *TINY_ARGS, *argv])
    assert message in str(exc.value)


def test_resume_cannot_change_the_length_of_a_decaying_schedule(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "2", "--schedule", "cosine", *TINY_ARGS]) == 0
    with pytest.raises(SystemExit, match="cosine"):
        main(["train", "--out", str(out), "--resume", "--steps", "3", "--quiet"])


# ----------------------------------------------------------------------------------------------
# the why-LoRA experiment's pipeline (smoke test)
# ----------------------------------------------------------------------------------------------


def test_why_lora_quick_writes_the_page_from_its_measurements(tmp_path):
    """``--quick`` runs the whole pipeline on a tiny model (pretraining, lr choice, seeds, spectra, figures, page);
    ``--from-results`` rewrites the same page from the saved measurements."""
    out = tmp_path / "page"
    assert main(["experiment", "why-lora", "--quick", "--workers", "1", "--out", str(out)]) == 0
    page = (out / "why-lora-works.md").read_text()
    results = json.loads((out / "why-lora-works.json").read_text())
    assert "Smoke test" in page and "| claim | measured | verdict |" in page
    for name in ("loss-vs-rank", "params-memory", "spectrum", "forgetting"):
        assert (out / "img" / f"why-lora-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = {run["config_key"] for run in results["runs"]}
    assert {"full", "full/seed", "full/all", "lora/seed/r1", "lora/all/r64"} <= keys
    assert len(results["runs"]) == len(keys) * len(results["plan"]["seeds"])
    full = next(run for run in results["runs"] if run["config_key"] == "full")
    r1 = next(run for run in results["runs"] if run["config_key"] == "lora/seed/r1")
    assert full["trainable_params"] > r1["trainable_params"] > 0
    from reflora.tools.experiment import summarize

    assert f"| {summarize(results)['full'].test_mean:.4f} ± " in page  # the table quotes the measurements
    again = tmp_path / "again"
    assert (
        main(
            [
                "experiment",
                "why-lora",
                "--quick",
                "--out",
                str(again),
                "--from-results",
                str(out / "why-lora-works.json"),
            ]
        )
        == 0
    )
    assert (again / "why-lora-works.md").read_text() == page


def test_why_lora_quick_needs_an_out_folder():
    with pytest.raises(SystemExit, match="--out"):
        main(["experiment", "why-lora", "--quick"])


@pytest.mark.torch
def test_a_trained_adapter_loads_in_peft_and_gives_reflora_logits(tmp_path):
    """The files ``reflora train`` writes are transformers' and PEFT's: load them with ``from_pretrained`` and the
    logits agree with reflora's forward on the trained adapter."""
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from reflora import gpt2_forward

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "3", "--lr", "0.05", "--dtype", "float64", *TINY_ARGS]) == 0
    base_dir = out / "checkpoints" / "step-3"
    params, config = load_gpt2(base_dir)
    adapter, lora, _ = load_adapter(out / "adapter", config)
    assert any(np.any(v != 0) for k, v in adapter.items() if "lora_B" in k)  # B moved away from its zero init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers and PEFT deprecation chatter, not about these files
        model = GPT2LMHeadModel.from_pretrained(base_dir, torch_dtype=torch.float64, attn_implementation="sdpa")
        peft_model = PeftModel.from_pretrained(model, out / "adapter").eval()
    ids = np.arange(16).reshape(2, 8) * 7 % VOCAB_SIZE
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours, _ = gpt2_forward(params, config, ids, adapter=adapter, lora=lora)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())
