"""``reflora train``: fine-tune a GPT-2 with LoRA, or fully, on text, with the reference's own gradients.

One step s = 0, 1, ..., steps − 1 of a run seeded S:

    for k < grad_accum:  ids_k = windows of the train split (reflora.tools.data.batch_rng(S, s, k))     (B, T)
                         loss_k, g_k = gpt2_loss_and_grads(θ, ids_k, labels=ids_k)             (mean over B·(T−1))
    g = Σ_k g_k / grad_accum          as HF's Trainer does (each micro-batch's loss divided by grad_accum, the
                                      gradients summed); equal to one batch of B·grad_accum rows here, since every
                                      window counts the same number of tokens
    g = clip_grad_norm(g, clip_norm)  (optional; torch.nn.utils.clip_grad_norm_)
    θ = optimizer_step(θ, g, lr(s))   reflora.optim: AdamW or SGD with torch's semantics

θ is what PEFT trains: the adapter (plus the biases of LoRA's ``bias`` mode), or every base tensor for full
fine-tuning. The learning rate follows HF ``transformers.optimization``'s schedules (``lr_factor``). LoRA dropout
masks are drawn from the micro-batch's generator after its offsets.

A run writes, under ``--out``:

* ``checkpoints/step-<s>/``: ``model.safetensors`` + ``config.json`` (``save_gpt2``: the trained model, or the
  frozen base under LoRA), ``adapter_model.safetensors`` + ``adapter_config.json`` (``save_adapter``, LoRA only),
  ``optimizer.safetensors`` (``"<buffer>/<key>"``: AdamW's ``exp_avg``/``exp_avg_sq``, SGD's
  ``momentum_buffer``) and ``trainer_state.json`` (step, every setting, the loss history, the corpus's sha256);
  ``checkpoints/latest`` names the newest complete one, and is rewritten only after it is complete.
* ``adapter/`` (LoRA, PEFT format) or ``model/`` (full fine-tuning, transformers format): the final weights.

``--resume`` continues from ``checkpoints/latest``: since a batch depends only on (S, s, k) and the state is
saved exactly, the continuation is bit-for-bit the run that was never interrupted (tests/test_train.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from reflora._version import __version__
from reflora.checkpoint import (
    CheckpointError,
    atomic_save_safetensors,
    atomic_write_bytes,
    load_adapter,
    load_gpt2,
    read_json,
    read_safetensors,
    save_adapter,
    save_gpt2,
)
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.golden.trajectory import accumulated_loss_and_grads
from reflora.init import draw_dropout_masks, init_lora_adapter
from reflora.model import gpt2_forward, trainable_keys
from reflora.ops.crossentropy import cross_entropy_forward
from reflora.optim import (
    AdamWConfig,
    OptimizerConfig,
    OptimizerError,
    SGDConfig,
    clip_grad_norm,
    init_optimizer_state,
    optimizer_config_from_dict,
    optimizer_config_to_dict,
    optimizer_state_from_tensors,
    optimizer_state_tensors,
    optimizer_step,
)
from reflora.targets import adapter_shapes, base_shapes, plan_lora
from reflora.tools.data import (
    SPLIT_BLOCK,
    SPLITS,
    VOCAB_SIZE,
    DataError,
    batch_rng,
    corpus_info,
    encode,
    eval_windows,
    load_corpus,
    load_text_file,
    sample_windows,
    split_tokens,
)
from reflora.tools.errors import ResourceError, check_memory, output_folder

SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "float64")
EVAL_BATCH = 32  # windows per forward pass when measuring a held-out loss
STATE_FORMAT = "reflora-train/1"
LATEST = "latest"
DEFAULT_STEPS = 200


class TrainError(ValueError):
    """A training setting or a checkpoint to resume from is invalid; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the optimizer's own hyper-parameters live in ``reflora.optim``'s configs)."""

    steps: int
    batch_size: int = 16
    seq_len: int = 64
    grad_accum: int = 1
    schedule: str = "constant"  # one of SCHEDULES
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr · min_lr_ratio
    clip_norm: float | None = None
    seed: int = 0
    eval_every: int = 0  # validation loss every this many steps (0: only at the end)
    eval_windows: int = 64  # windows of the validation split per evaluation (evenly spaced)

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1), ("warmup_steps", 0),
                          ("seed", 0), ("eval_every", 0), ("eval_windows", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrainError(f"train.{name} must be an integer >= {low}, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"train.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise TrainError(f"train.min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")
        if self.clip_norm is not None and not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0):
            raise TrainError(f"train.clip_norm must be a positive number or null, got {self.clip_norm!r}")


@dataclass
class TrainState:
    """Everything that changes during a run. ``params`` are the base tensors (HF keys): trained under full
    fine-tuning, frozen under LoRA except the biases of its ``bias`` mode; ``adapter`` the LoRA tensors or None."""

    config: GPT2Config
    lora: LoraConfig | None
    params: dict[str, np.ndarray]
    adapter: dict[str, np.ndarray] | None
    opt_state: dict[str, Any]
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "validation_loss"}
    only: tuple[str, ...] | None = None  # train just these keys instead of PEFT's set (e.g. some base weights)

    def trained_keys(self) -> list[str]:
        """``only``, or what PEFT trains (``trainable_keys``: the adapter and the bias mode's biases, or the base)."""
        return list(self.only) if self.only is not None else trainable_keys(self.config, self.lora)

    def trainable(self) -> dict[str, np.ndarray]:
        """The trained tensors, by key (PEFT adapter keys, HF base keys), in ``trained_keys`` order."""
        return {k: self.params[k] if k in self.params else self.adapter[k] for k in self.trained_keys()}

    def with_trainable(self, values: Mapping[str, np.ndarray]) -> tuple[dict, dict | None]:
        """``(params, adapter)`` with the trained tensors replaced by ``values``."""
        params = {**self.params, **{k: v for k, v in values.items() if k in self.params}}
        adapter = (
            None if self.adapter is None else {**self.adapter, **{k: v for k, v in values.items() if k in self.adapter}}
        )
        return params, adapter


# ----------------------------------------------------------------------------------------------
# initial weights and state
# ----------------------------------------------------------------------------------------------


def init_rng(seed: int, purpose: int) -> np.random.Generator:
    """A generator for initial weights: ``SeedSequence([seed, purpose])`` (0: the base model, 1: the adapter),
    never the same stream as a batch (``reflora.tools.data.batch_rng`` uses three words)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, purpose])))


def init_pretraining_params(config: GPT2Config, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF ``GPT2PreTrainedModel._init_weights``: weights and embeddings N(0, 0.02²), ``*.c_proj.weight``
    N(0, (0.02/√(2·n_layer))²), biases 0, LayerNorm weights 1. (``reflora.init_gpt2_params`` is the fixtures'
    init, with random LayerNorms and biases; this one is for training from scratch.)"""
    params = {}
    for key, shape in base_shapes(config).items():
        if ".ln_" in key:
            value = np.ones(shape) if key.endswith(".weight") else np.zeros(shape)
        elif key.endswith(".bias"):
            value = np.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if key.endswith("c_proj.weight") else 0.02
            value = std * rng.standard_normal(shape)
        params[key] = value.astype(dtype)
    return params


def new_state(
    config: GPT2Config,
    lora: LoraConfig | None,
    params: Mapping[str, np.ndarray],
    optimizer: OptimizerConfig,
    seed: int,
    only: list[str] | None = None,
) -> TrainState:
    """The state before step 0. Under LoRA the adapter gets PEFT's default init (A kaiming-uniform, B = 0),
    drawn from ``init_rng(seed, 1)``, in the params' dtype. ``only``: train just these base keys (no LoRA)."""
    params = {k: np.array(v) for k, v in params.items()}
    dtype = params["transformer.wte.weight"].dtype
    adapter = None
    if lora is not None:
        adapter = init_lora_adapter(plan_lora(config, lora), init_rng(seed, 1), init=True, dtype=dtype)
    if only is not None:
        unknown = [k for k in only if k not in params]
        if lora is not None or not only or unknown:
            raise TrainError(f"only= names base tensors to train without LoRA; unknown or empty: {unknown[:3] or only}")
        only = tuple(only)
    state = TrainState(config, lora, params, adapter, {}, only=only)
    state.opt_state = init_optimizer_state(optimizer, state.trainable())
    return state


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, train: TrainConfig) -> float:
    """The multiplier of the base lr at step ``step`` (0-based), HF's ``get_{constant,linear,cosine}_schedule_with
    _warmup`` (cosine: half a cycle; ``min_lr_ratio`` as in ``get_cosine_with_min_lr_schedule_with_warmup``):

        step < warmup:  step / max(1, warmup)
        constant: 1;  linear: max(0, 1 − p);  cosine: max(0, ½(1 + cos πp)),  p = (step − warmup) / max(1, steps − warmup)
        decayed factors f become min_lr_ratio + (1 − min_lr_ratio)·f
    """
    if step < train.warmup_steps:
        return step / max(1, train.warmup_steps)
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    if train.schedule == "linear":
        decayed = max(0.0, 1.0 - progress)
    else:
        decayed = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * decayed


def train_step(
    state: TrainState, train: TrainConfig, optimizer: OptimizerConfig, train_tokens: np.ndarray
) -> dict[str, float]:
    """Advance ``state`` by one optimizer step (in place); returns the step's record: ``step`` (steps done, from 1),
    ``loss`` (the mean training loss before the update), ``lr`` and ``grad_norm`` (before clipping)."""
    dtype = state.params["transformer.wte.weight"].dtype
    micro_batches = []
    for micro in range(train.grad_accum):
        rng = batch_rng(train.seed, state.step, micro)
        ids = sample_windows(train_tokens, train.batch_size, train.seq_len, rng)  # (B, T)
        masks = None
        if state.lora is not None and state.lora.lora_dropout > 0:
            plan = plan_lora(state.config, state.lora)
            masks = draw_dropout_masks(plan, state.lora.lora_dropout, train.batch_size, train.seq_len, rng, dtype)
        micro_batches.append({"input_ids": ids, "labels": ids, "dropout_masks": masks})
    loss, grads = accumulated_loss_and_grads(
        state.params, state.adapter, state.config, state.lora, micro_batches, state.trained_keys()
    )
    if not math.isfinite(loss):
        raise TrainError(f"the training loss is {loss} at step {state.step}: lower the lr or set --clip-norm")
    grad_norm = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())))
    if train.clip_norm is not None:
        grads, grad_norm = clip_grad_norm(grads, train.clip_norm)
    lr = optimizer.lr * lr_factor(state.step, train)
    trained, state.opt_state = optimizer_step(optimizer, state.trainable(), grads, state.opt_state, lr)
    state.params, state.adapter = state.with_trainable(trained)
    state.step += 1
    record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    state.history.append(record)
    return record


def evaluate(
    params: Mapping[str, np.ndarray],
    config: GPT2Config,
    windows: np.ndarray,
    adapter: Mapping[str, np.ndarray] | None = None,
    lora: LoraConfig | None = None,
) -> float:
    """Mean next-token loss (nats per token) over every predicted token of ``windows`` (n, T); no dropout."""
    total, count = 0.0, 0
    for start in range(0, len(windows), EVAL_BATCH):
        ids = windows[start : start + EVAL_BATCH]  # (b, T)
        logits, _ = gpt2_forward(params, config, ids, adapter=adapter, lora=lora)
        loss, _ = cross_entropy_forward(logits, ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss) * n
        count += n
    return total / count


def run_training(
    state: TrainState,
    train: TrainConfig,
    optimizer: OptimizerConfig,
    splits: Mapping[str, np.ndarray],
    *,
    stop_at: int | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    save_every: int = 0,
) -> TrainState:
    """Train from ``state.step`` up to ``stop_at`` (default ``train.steps``), measuring the validation loss every
    ``train.eval_every`` steps and at the end, calling ``checkpoint(state)`` every ``save_every`` steps."""
    stop = train.steps if stop_at is None else min(stop_at, train.steps)
    val_windows = eval_windows(splits["validation"], train.seq_len, train.eval_windows)
    while state.step < stop:
        record = train_step(state, train, optimizer, splits["train"])
        if (train.eval_every and state.step % train.eval_every == 0) or state.step == train.steps:
            val = evaluate(state.params, state.config, val_windows, state.adapter, state.lora)
            state.evals.append({"step": state.step, "validation_loss": val})
            record = {**record, "validation_loss": val}
        if on_step is not None:
            on_step(record)
        if checkpoint is not None and save_every and state.step % save_every == 0 and state.step < stop:
            checkpoint(state)
    if checkpoint is not None:
        checkpoint(state)
    return state


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(out: str | Path, state: TrainState, settings: Mapping[str, Any]) -> Path:
    """Write ``out/checkpoints/step-<s>/`` completely, then point ``out/checkpoints/latest`` at it and remove
    older checkpoints. ``settings``: the JSON-able run settings (``run_settings``), stored for ``--resume``."""
    folder = Path(out) / "checkpoints"
    target = folder / f"step-{state.step}"
    if target.exists():
        shutil.rmtree(target)
    save_gpt2(target, state.params, state.config)
    if state.lora is not None:
        save_adapter(target, state.adapter, state.lora, state.config, biases=state.params)
    atomic_save_safetensors(
        target / "optimizer.safetensors", optimizer_state_tensors(state.opt_state), {"format": "pt"}
    )
    files = {name: _sha256(target / name) for name in _checkpoint_files(state.lora is not None)}
    trainer_state = {
        "format": STATE_FORMAT, "reflora_version": __version__, "step": state.step,
        "optimizer_step": state.opt_state["step"], "settings": dict(settings),
        "lora": None if state.lora is None else state.lora.to_dict(),
        "only": None if state.only is None else list(state.only),
        "history": state.history, "evals": state.evals, "files": files,
    }  # fmt: skip
    atomic_write_bytes(target / "trainer_state.json", (json.dumps(trainer_state, indent=1) + "\n").encode())
    atomic_write_bytes(folder / LATEST, f"{target.name}\n".encode())
    for old in folder.glob("step-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old)
    return target


def _checkpoint_files(lora: bool) -> tuple[str, ...]:
    """The files of ``checkpoints/step-<s>/`` whose sha256 ``trainer_state.json`` records."""
    adapter = ("adapter_model.safetensors", "adapter_config.json") if lora else ()
    return ("model.safetensors", "config.json", *adapter, "optimizer.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_trainer_state(path: Path, data: Any) -> dict[str, Any]:
    """``trainer_state.json``'s fields, each of the right kind; ``CheckpointError`` naming the first that is not."""

    def bad(field_name: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field_name} {what}")

    if not isinstance(data, dict):
        raise bad("the file", f"must hold a JSON object, not {type(data).__name__}")
    if data.get("format") != STATE_FORMAT:
        raise bad("format", f"is {data.get('format')!r}, not {STATE_FORMAT!r}")
    for key in ("step", "optimizer_step"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(key, f"must be an integer >= 0, got {value!r}")
    settings = data.get("settings")
    if not isinstance(settings, dict):
        raise bad("settings", f"must be an object, got {settings!r:.60}")
    if not isinstance(settings.get("optimizer"), dict):
        raise bad("settings.optimizer", f"must be an object, got {settings.get('optimizer')!r:.60}")
    if "train" in settings:  # what the command line resumes from (a run through the API may keep only the optimizer)
        if not isinstance(settings["train"], dict):
            raise bad("settings.train", f"must be an object, got {settings['train']!r:.60}")
        try:
            TrainConfig(**settings["train"])
        except TypeError as exc:
            raise bad("settings.train", f"is not a training config ({exc})") from None
        except TrainError as exc:
            raise bad("settings.train", f"is invalid ({exc})") from None
    for key in ("corpus", "text_file", "corpus_sha256"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise bad(f"settings.{key}", f"must be a string or null, got {settings[key]!r:.60}")
    if data.get("lora") is not None and not isinstance(data["lora"], dict):
        raise bad("lora", f"must be an object or null, got {data['lora']!r:.60}")
    if data.get("only") is not None and not (
        isinstance(data["only"], list) and all(isinstance(k, str) for k in data["only"])
    ):
        raise bad("only", f"must be a list of tensor names or null, got {data['only']!r:.60}")
    for key, fields in (("history", ("step", "loss")), ("evals", ("step", "validation_loss"))):
        records = data.get(key)
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(f), (int, float)) for f in fields) for r in records
        ):
            raise bad(key, f"must be a list of objects with {', '.join(fields)} (numbers)")
    files = data.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise bad("files", "must map file names to sha256 digests")
    return data


def load_checkpoint(out: str | Path) -> tuple[TrainState, dict[str, Any]]:
    """``(state, settings)`` from ``out/checkpoints/latest``; every file is validated against the others, and
    against the sha256 that ``trainer_state.json`` recorded when it was saved."""
    folder = Path(out) / "checkpoints"
    try:
        name = (folder / LATEST).read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{folder / LATEST}: no checkpoint to resume from") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / LATEST}: unreadable ({exc})") from None
    if not re.fullmatch(r"step-\d+", name):
        raise CheckpointError(f"{folder / LATEST}: names {name[:40]!r}, not a checkpoint folder step-<s>")
    target = folder / name
    state_file = target / "trainer_state.json"
    trainer_state = _check_trainer_state(state_file, read_json(state_file, what="trainer state"))
    settings = trainer_state["settings"]
    recorded = trainer_state.get("files") or {}  # absent in checkpoints of older versions
    for file_name, digest in recorded.items():
        path = target / file_name
        if "/" in file_name or not path.is_file():
            raise CheckpointError(f"{path}: missing (trainer_state.json records its sha256)")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: sha256 differs from the one trainer_state.json recorded when the "
                                  "checkpoint was saved (the file was changed or corrupted)")  # fmt: skip
    params, config = load_gpt2(target)
    lora = adapter = None
    if trainer_state["lora"] is not None:
        try:
            lora = LoraConfig.from_dict(trainer_state["lora"])
        except ConfigError as exc:
            raise CheckpointError(f"{state_file}: lora: {exc}") from None
        adapter, _, biases = load_adapter(target, config)
        params.update(biases)
    try:
        optimizer = optimizer_config_from_dict(settings["optimizer"])
    except OptimizerError as exc:
        raise CheckpointError(f"{state_file}: settings.optimizer: {exc}") from None
    only = trainer_state.get("only")
    unknown = [k for k in only or () if k not in params]
    if unknown:
        raise CheckpointError(f"{state_file}: only names {unknown[:3]}, which are not base tensors of this GPT-2")
    state = TrainState(config, lora, params, adapter, {}, trainer_state["step"], trainer_state["history"],
                       trainer_state["evals"], None if only is None else tuple(only))  # fmt: skip
    try:
        state.opt_state = optimizer_state_from_tensors(
            optimizer,
            trainer_state["optimizer_step"],
            read_safetensors(target / "optimizer.safetensors"),
            state.trainable(),
        )
    except OptimizerError as exc:
        raise CheckpointError(f"{target / 'optimizer.safetensors'}: {exc}") from None
    return state, settings


# ----------------------------------------------------------------------------------------------
# data for a run
# ----------------------------------------------------------------------------------------------


def corpus_text(corpus: str | None, text_file: str | None) -> str:
    """The text a run trains on: a named corpus (``reflora.tools.data.CORPORA``) or a UTF-8 file."""
    if text_file is not None:
        return load_text_file(text_file)
    return load_corpus(corpus or "pydoc")


def corpus_splits(text: str) -> dict[str, np.ndarray]:
    return split_tokens(encode(text))


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a GPT-2 with LoRA (or fully) on text, with the reference's gradients and a hand-written AdamW",
        description="Train a GPT-2 (byte-level, vocab 256) with LoRA or full fine-tuning on a corpus that ships with "
        "Python (pydoc topics, or the standard library's source) or a text file. Saves a PEFT adapter or a "
        "transformers checkpoint, plus resumable checkpoints (safetensors + JSON). See docs/training.md.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--corpus", choices=["pydoc", "stdlib"], default=None, help="built-in corpus (default pydoc)")
    data.add_argument("--text-file", metavar="FILE", help="train on this UTF-8 text file instead")
    model = p.add_argument_group("model (ignored with --base)")
    model.add_argument("--base", type=Path, metavar="DIR", help="start from this model (a save_pretrained folder)")
    model.add_argument("--n-embd", type=int, default=64)
    model.add_argument("--n-layer", type=int, default=2)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-positions", type=int, default=None, help="default: --seq-len")
    model.add_argument("--dtype", choices=DTYPES, default="float32")
    lora = p.add_argument_group("LoRA (PEFT LoraConfig fields)")
    lora.add_argument("--full", action="store_true", help="full fine-tuning: train every base tensor, no LoRA")
    lora.add_argument("--r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=16)
    lora.add_argument("--target-modules", nargs="+", default=["c_attn", "c_proj"], metavar="NAME")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--use-rslora", action="store_true")
    lora.add_argument("--bias", choices=["none", "all", "lora_only"], default="none")
    opt = p.add_argument_group("optimizer (torch.optim semantics)")
    opt.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"))
    opt.add_argument("--eps", type=float, default=1e-8)
    opt.add_argument("--momentum", type=float, default=0.0, help="SGD only")
    opt.add_argument("--dampening", type=float, default=0.0, help="SGD only")
    opt.add_argument("--nesterov", action="store_true", help="SGD only")
    run = p.add_argument_group("run")
    run.add_argument(
        "--steps", type=_positive_int, default=None, help=f"optimizer steps, >= 1 (default {DEFAULT_STEPS})"
    )
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--seq-len", type=int, default=64)
    run.add_argument("--grad-accum", type=int, default=1)
    run.add_argument("--clip-norm", type=float, default=None)
    run.add_argument("--schedule", choices=SCHEDULES, default="constant")
    run.add_argument("--warmup-steps", type=int, default=0)
    run.add_argument("--min-lr-ratio", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--eval-every", type=int, default=50)
    run.add_argument("--eval-windows", type=int, default=64)
    run.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    run.add_argument("--out", type=output_folder, required=True, metavar="DIR",
                     help="where checkpoints and results go (a new path or a folder)")  # fmt: skip
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                     "(every other setting comes from the checkpoint; --steps may extend a constant-lr run)")  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)


def _positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (``--steps 0`` is refused, not read as the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def check_splits(splits: Mapping[str, np.ndarray], train: TrainConfig, source: str) -> None:
    """``DataError`` up front, naming the corpus, when a split is too short for one window of ``seq_len``: a
    text needs ``9 · SPLIT_BLOCK + seq_len`` bytes before its validation split holds one window."""
    for name in ("train", "validation"):
        if len(splits[name]) < train.seq_len:
            need = SPLIT_BLOCK * SPLITS["validation"] + train.seq_len
            total = sum(len(v) for v in splits.values())
            raise DataError(f"{source}: {total:,} bytes leave the {name} split {len(splits[name]):,} tokens, "
                            f"shorter than one window of --seq-len {train.seq_len}; the corpus needs at least "
                            f"{need:,} bytes")  # fmt: skip


def training_bytes(config: GPT2Config, lora: LoraConfig | None, dtype: Any, train: TrainConfig) -> int:
    """A generous estimate of a run's memory, from shapes alone: the base and trained tensors with their
    gradients and two optimizer buffers, plus one micro-batch's saved activations, attention scores and logits."""
    item = np.dtype(dtype).itemsize
    n_base = sum(math.prod(shape) for shape in base_shapes(config).values())
    n_trained = n_base if lora is None else sum(math.prod(s) for s in adapter_shapes(plan_lora(config, lora)).values())
    b, t, c = max(train.batch_size, EVAL_BATCH), train.seq_len, config.n_embd
    per_layer = b * t * (12 * c + 3 * config.inner_dim) + 4 * b * config.n_head * t * t
    activations = config.n_layer * per_layer + 4 * b * t * config.vocab_size
    return item * (n_base + 4 * n_trained + 2 * activations)


def run_settings(args: argparse.Namespace, train: TrainConfig, optimizer: OptimizerConfig) -> dict[str, Any]:
    """The JSON a checkpoint stores to resume: data source, training and optimizer settings."""
    return {"corpus": args.corpus, "text_file": None if args.text_file is None else str(Path(args.text_file).resolve()),
            "train": asdict(train), "optimizer": optimizer_config_to_dict(optimizer)}  # fmt: skip


def _fail(message: str) -> SystemExit:
    return SystemExit(f"reflora train: error: {message}")


def _new_run(args: argparse.Namespace) -> tuple[TrainState, TrainConfig, OptimizerConfig, dict]:
    train = TrainConfig(steps=DEFAULT_STEPS if args.steps is None else args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                        schedule=args.schedule, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                        clip_norm=args.clip_norm, seed=args.seed, eval_every=args.eval_every,
                        eval_windows=args.eval_windows)  # fmt: skip
    if args.optimizer == "adamw":
        optimizer: OptimizerConfig = AdamWConfig(lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                                 weight_decay=args.weight_decay)  # fmt: skip
    else:
        optimizer = SGDConfig(lr=args.lr, momentum=args.momentum, dampening=args.dampening,
                              weight_decay=args.weight_decay, nesterov=args.nesterov)  # fmt: skip
    if args.base is not None:
        params, config = load_gpt2(args.base)
        params = {k: v.astype(args.dtype) for k, v in params.items()}
        if config.vocab_size != VOCAB_SIZE:
            raise TrainError(f"--base has vocab_size {config.vocab_size}; the byte tokenizer needs {VOCAB_SIZE}")
        if train.seq_len > config.n_positions:
            raise TrainError(f"--seq-len {train.seq_len} exceeds the base model's n_positions {config.n_positions}")
    else:
        config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=args.n_positions or args.seq_len, n_embd=args.n_embd,
                            n_layer=args.n_layer, n_head=args.n_head)  # fmt: skip
        if train.seq_len > config.n_positions:
            raise TrainError(f"--seq-len {train.seq_len} exceeds --n-positions {config.n_positions}")
        check_memory(training_bytes(config, None, args.dtype, train), "this run")  # before allocating the model
        params = init_pretraining_params(config, init_rng(args.seed, 0), np.dtype(args.dtype))
    lora = None
    if not args.full:
        targets: Any = args.target_modules
        if len(targets) == 1 and targets[0].startswith("re:"):
            targets = targets[0][3:]
        lora = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=targets, lora_dropout=args.lora_dropout,
                          use_rslora=args.use_rslora, bias=args.bias)  # fmt: skip
    state = new_state(config, lora, params, optimizer, args.seed)
    return state, train, optimizer, run_settings(args, train, optimizer)


def _resumed_run(args: argparse.Namespace) -> tuple[TrainState, TrainConfig, OptimizerConfig, dict]:
    state, settings = load_checkpoint(args.out)
    if "train" not in settings:
        raise TrainError(f"{Path(args.out) / 'checkpoints'}: the checkpoint records no settings.train to resume with")
    train = TrainConfig(**settings["train"])
    optimizer = optimizer_config_from_dict(settings["optimizer"])
    if args.steps is not None and args.steps != train.steps:
        if args.steps < state.step:
            raise TrainError(f"--steps {args.steps} is below the checkpoint's step {state.step}")
        if train.schedule != "constant":
            raise TrainError(f"--steps cannot change the length of a {train.schedule!r}-schedule run on resume "
                             "(the lr at every step depends on it)")  # fmt: skip
        train = replace(train, steps=args.steps)
        settings = {**settings, "train": asdict(train)}
    args.corpus, args.text_file = settings.get("corpus"), settings.get("text_file")
    return state, train, optimizer, settings


def run_cli(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    try:
        if args.corpus is not None and args.text_file is not None:
            raise TrainError("give --corpus or --text-file, not both")
        state, train, optimizer, settings = _resumed_run(args) if args.resume else _new_run(args)
        text = corpus_text(args.corpus, args.text_file)
        info = corpus_info(text)
        if args.resume and settings.get("corpus_sha256") not in (None, info["sha256"]):
            raise TrainError("the corpus differs from the one this run started on (sha256 changed)")
        settings["corpus_sha256"] = info["sha256"]
        splits = corpus_splits(text)
        check_splits(
            splits, train, f"text file {args.text_file}" if args.text_file else f"corpus {args.corpus or 'pydoc'}"
        )
        check_memory(training_bytes(state.config, state.lora, state.params["transformer.wte.weight"].dtype, train),
                     "this run")  # fmt: skip
    except (TrainError, ConfigError, OptimizerError, CheckpointError, DataError, ResourceError) as exc:
        raise _fail(str(exc)) from None
    if state.step >= train.steps:
        console.print(f"nothing to do: the checkpoint is at step {state.step} of {train.steps}")
        return 0
    source = args.text_file or f"corpus {args.corpus or 'pydoc'}"
    what = "full fine-tuning" if state.lora is None else f"LoRA r={state.lora.r} on {_targets(state.lora)}"
    n_trained = sum(v.size for v in state.trainable().values())
    console.print(f"{what}: {n_trained:,} trained parameters; {source}: {info['bytes']:,} bytes "
                  f"({len(splits['train']):,} train); {optimizer.name} lr {optimizer.lr:g}; "
                  f"{'resuming at' if args.resume else 'starting at'} step {state.step} of {train.steps}")  # fmt: skip

    def checkpoint(s: TrainState) -> None:
        save_checkpoint(args.out, s, settings)

    start = time.perf_counter()
    last_val = [state.evals[-1]["validation_loss"] if state.evals else float("nan")]
    try:
        if args.quiet:
            run_training(state, train, optimizer, splits, checkpoint=checkpoint, save_every=args.save_every)
        else:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)  # fmt: skip
            with progress:
                task = progress.add_task("train", total=train.steps, completed=state.step, loss="-", val="-")

                def on_step(record: dict[str, float]) -> None:
                    if "validation_loss" in record:
                        last_val[0] = record["validation_loss"]
                    progress.update(task, advance=1, loss=f"{record['loss']:.4f}", val=f"{last_val[0]:.4f}")

                run_training(state, train, optimizer, splits, on_step=on_step, checkpoint=checkpoint,
                             save_every=args.save_every)  # fmt: skip
    except (TrainError, DataError, CheckpointError) as exc:
        raise _fail(str(exc)) from None
    if state.lora is not None:
        save_adapter(args.out / "adapter", state.adapter, state.lora, state.config, biases=state.params)
        final = args.out / "adapter"
    else:
        save_gpt2(args.out / "model", state.params, state.config)
        final = args.out / "model"
    val = state.evals[-1]["validation_loss"]
    console.print(f"step {state.step}: train loss {state.history[-1]['loss']:.4f}, validation loss {val:.4f} "
                  f"({val / math.log(2):.3f} bits/byte) in {time.perf_counter() - start:.1f} s; "
                  f"saved {final} and {args.out / 'checkpoints'}")  # fmt: skip
    return 0


def _targets(lora: LoraConfig) -> str:
    tm = lora.target_modules
    return ",".join(tm) if isinstance(tm, tuple) else str(tm)
