"""The why-lora experiment's runs: the plan, pretraining, one fine-tuning run, and the pool of worker processes
that executes them (``run_experiment``). Every run is a ``reflora.tools.train`` run."""

from __future__ import annotations

import functools
import multiprocessing
import os
import resource
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from reflora._version import __version__
from reflora.checkpoint import load_gpt2, save_gpt2
from reflora.config import GPT2Config, LoraConfig
from reflora.optim import AdamWConfig
from reflora.targets import plan_lora
from reflora.tools.data import VOCAB_SIZE, encode, eval_windows, load_corpus, split_tokens
from reflora.tools.train import TrainConfig, evaluate, init_pretraining_params, init_rng, new_state, run_training

TARGET_SETS = {"seed": ["c_attn", "c_proj"], "all": ["c_attn", "c_proj", "c_fc"]}
TARGET_SHORT = {"seed": "seed's targets", "all": "all four kinds"}
KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class Plan:
    """Every setting of the experiment; ``quick_plan()`` is the smoke-test variant."""

    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 16
    pretrain_corpus: str = "stdlib"
    pretrain_steps: int = 2000
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 0.01
    finetune_corpus: str = "pydoc"
    finetune_steps: int = 300
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    alpha_over_r: float = 2.0  # lora_alpha = 2r: the scaling s = alpha/r is 2 at every rank (the seed's r=8, alpha=16)
    full_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lora_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    validation_windows: int = 128
    test_windows: int | None = None  # None: every window of the test split
    forgetting_windows: int = 256
    random_baseline_draws: int = 8
    quick: bool = False


def quick_plan() -> Plan:
    return Plan(n_embd=16, n_layer=1, n_head=2, seq_len=16, batch_size=4, pretrain_steps=30, finetune_steps=6,
                warmup_steps=2, ranks=(1, 4, 32, 64), full_lrs=(1e-3, 3e-3), lora_lrs=(1e-2,), seeds=(0, 1),
                validation_windows=8, test_windows=16, forgetting_windows=8, random_baseline_draws=2,
                quick=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# runs (each executes in a worker process)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One fine-tuning run, a seed and an lr. ``method`` "lora": LoRA of rank ``r`` on ``targets``; "full" without
    targets: every base tensor (full fine-tuning); "full" with ``targets``: only the weight matrices LoRA would
    adapt there, at full rank (the control that isolates the rank restriction)."""

    method: str
    seed: int
    lr: float
    targets: str | None = None
    r: int | None = None

    @property
    def config_key(self) -> str:
        if self.method == "full":
            return "full" if self.targets is None else f"full/{self.targets}"
        return f"lora/{self.targets}/r{self.r}"


def model_config(plan: Plan) -> GPT2Config:
    """The experiment's byte-level GPT-2 for a plan."""
    return GPT2Config(vocab_size=VOCAB_SIZE, n_positions=plan.seq_len, n_embd=plan.n_embd, n_layer=plan.n_layer,
                      n_head=plan.n_head)  # fmt: skip


@functools.lru_cache(maxsize=4)
def _splits(corpus: str) -> dict[str, np.ndarray]:
    """A corpus's splits, read once per worker process (the arrays are only read)."""
    return split_tokens(encode(load_corpus(corpus)))


def pretrain(plan: Plan, folder: str) -> dict[str, Any]:
    """Train the base from HF's init on ``plan.pretrain_corpus``; saves it to ``folder`` (transformers format)."""
    start = time.perf_counter()
    config = model_config(plan)
    splits = _splits(plan.pretrain_corpus)
    optimizer = AdamWConfig(lr=plan.pretrain_lr, weight_decay=plan.pretrain_weight_decay)
    train = TrainConfig(steps=plan.pretrain_steps, batch_size=plan.batch_size, seq_len=plan.seq_len,
                        schedule="cosine", warmup_steps=max(1, plan.pretrain_steps // 40),
                        min_lr_ratio=plan.min_lr_ratio, seed=1000, eval_windows=plan.validation_windows)  # fmt: skip
    state = new_state(config, None, init_pretraining_params(config, init_rng(1000, 0)), optimizer, seed=1000)
    run_training(state, train, optimizer, splits)
    save_gpt2(folder, state.params, config)
    test = eval_windows(splits["test"], plan.seq_len, plan.forgetting_windows)
    finetune_splits = _splits(plan.finetune_corpus)
    return {
        "pretrain_test_loss": evaluate(state.params, config, test),
        "finetune_test_loss_before": evaluate(state.params, config, eval_windows(finetune_splits["test"], plan.seq_len,
                                                                                  plan.test_windows)),
        "curve": [[r["step"], r["loss"]] for r in state.history[:: max(1, plan.pretrain_steps // 100)]],
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def finetune(plan: Plan, base_folder: str, run: Run) -> dict[str, Any]:
    """One fine-tuning run; returns its measurements (and, for full fine-tuning, the spectrum of each ΔW)."""
    base, config = load_gpt2(base_folder)
    splits = _splits(plan.finetune_corpus)
    pre_splits = _splits(plan.pretrain_corpus)
    lora = only = None
    if run.method == "lora":
        lora = LoraConfig(r=run.r, lora_alpha=plan.alpha_over_r * run.r, target_modules=TARGET_SETS[run.targets])
    elif run.targets is not None:
        only = target_weight_keys(config, run.targets)
    optimizer = AdamWConfig(lr=run.lr, weight_decay=0.0)
    train = TrainConfig(steps=plan.finetune_steps, batch_size=plan.batch_size, seq_len=plan.seq_len,
                        schedule="cosine", warmup_steps=plan.warmup_steps, min_lr_ratio=plan.min_lr_ratio,
                        seed=run.seed, eval_windows=plan.validation_windows)  # fmt: skip
    start, cpu_start = time.perf_counter(), time.process_time()
    tracemalloc.start()
    state = new_state(config, lora, base, optimizer, seed=run.seed, only=only)
    run_training(state, train, optimizer, splits)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test = eval_windows(splits["test"], plan.seq_len, plan.test_windows)
    forgetting = eval_windows(pre_splits["test"], plan.seq_len, plan.forgetting_windows)
    result = {
        **asdict(run), "config_key": run.config_key,
        "trainable_params": int(sum(v.size for v in state.trainable().values())),
        "peak_bytes": int(peak), "seconds": seconds, "seconds_per_step": seconds / plan.finetune_steps,
        "cpu_seconds_per_step": cpu_seconds / plan.finetune_steps,
        "validation_loss": state.evals[-1]["validation_loss"],
        "test_loss": evaluate(state.params, config, test, state.adapter, lora),
        "pretrain_test_loss": evaluate(state.params, config, forgetting, state.adapter, lora),
        "curve": [[r["step"], r["loss"]] for r in state.history[:: max(1, plan.finetune_steps // 60)]],
    }  # fmt: skip
    if run.config_key == "full":
        result["spectra"] = update_spectra(base, state.params, config.n_layer)
        result["update_norms"] = {
            key: [float(np.linalg.norm(state.params[key].astype(np.float64) - value)), float(np.linalg.norm(value))]
            for key, value in base.items()
        }  # ‖ΔW‖_F and ‖W‖_F of every base tensor
    return result


def target_weight_keys(config, targets: str) -> list[str]:
    """The HF keys of the Conv1D weights that LoRA adapts for a target set."""
    return [f"{name}.weight" for name in plan_lora(config, LoraConfig(target_modules=TARGET_SETS[targets]))]


def update_spectra(before: dict, after: dict, n_layer: int) -> dict[str, list[float]]:
    """Singular values (descending) of ΔW = W_after − W_before for every Conv1D weight, by module name."""
    spectra = {}
    for i in range(n_layer):
        for kind in KINDS:
            key = f"transformer.h.{i}.{kind}.weight"
            delta = after[key].astype(np.float64) - before[key].astype(np.float64)  # (in, out)
            spectra[f"h.{i}.{kind}"] = np.linalg.svd(delta, compute_uv=False).tolist()
    return spectra


def _execute(job: tuple) -> tuple[tuple, dict[str, Any]]:
    kind, plan, *rest = job
    if kind == "pretrain":
        return job, pretrain(plan, *rest)
    return job, finetune(plan, *rest)


class _Pool:
    """``workers`` processes started with single-threaded BLAS (the variables must be set before NumPy loads)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.saved = {k: os.environ.get(k) for k in _BLAS_VARIABLES}
        os.environ.update({k: "1" for k in _BLAS_VARIABLES})
        self.pool = multiprocessing.get_context("spawn").Pool(workers)

    def map(self, jobs: list[tuple], on_done) -> list[dict[str, Any]]:
        """Run every job; ``on_done(job, result)`` is called in submission order; results in that order."""
        results = []
        for job, handle in [(job, self.pool.apply_async(_execute, (job,))) for job in jobs]:
            _, result = handle.get()
            on_done(job, result)
            results.append(result)
        return results

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def run_experiment(plan: Plan, workers: int, work_dir: str | Path, log=print) -> dict[str, Any]:
    """Pretrain, choose each configuration's lr on seed 0, run the other seeds; returns every measurement."""
    started = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    work_dir = Path(work_dir)
    base_folder = str(work_dir / "base")
    pool = _Pool(workers)
    try:
        log(f"pretraining on {plan.pretrain_corpus} ({plan.pretrain_steps} steps)")
        (pre,) = pool.map([("pretrain", plan, base_folder)], lambda job, r: log(f"  done in {r['seconds']:.0f} s"))
        configs = [Run("full", plan.seeds[0], lr, targets) for targets in (None, *TARGET_SETS) for lr in plan.full_lrs]
        configs += [Run("lora", plan.seeds[0], lr, targets, r) for targets in TARGET_SETS for r in plan.ranks
                    for lr in plan.lora_lrs]  # fmt: skip
        n_configs = (1 + len(TARGET_SETS)) * (1 + len(plan.ranks))
        log(f"choosing the lr of {n_configs} configurations: {len(configs)} runs, seed {plan.seeds[0]}")
        tuning = pool.map([("finetune", plan, base_folder, run) for run in configs], _progress(log, len(configs)))
        best: dict[str, dict] = {}
        for result in tuning:
            key = result["config_key"]
            if key not in best or result["validation_loss"] < best[key]["validation_loss"]:
                best[key] = result
        extra = [replace(_run_of(result), seed=seed) for result in best.values() for seed in plan.seeds[1:]]
        log(f"running seeds {list(plan.seeds[1:])} at the chosen lrs: {len(extra)} runs")
        others = pool.map([("finetune", plan, base_folder, run) for run in extra], _progress(log, len(extra)))
    finally:
        pool.close()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the joined workers' CPU time
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "plan": asdict(plan), "reflora_version": __version__, "python": sys.version.split()[0],
        "numpy": np.__version__, "workers": workers, "pretrain": pre, "tuning": tuning,
        "runs": list(best.values()) + others, "seconds": time.perf_counter() - started,
        "worker_cpu_seconds": cpu_seconds, "load_average_at_end": os.getloadavg()[1],
    }  # fmt: skip


def _run_of(result: dict) -> Run:
    return Run(result["method"], result["seed"], result["lr"], result["targets"], result["r"])


def _progress(log, total: int):
    count = [0]

    def done(job, result) -> None:
        count[0] += 1
        what = result["config_key"]
        log(f"  [{count[0]}/{total}] {what} seed {result['seed']} lr {result['lr']:g}: validation "
            f"{result['validation_loss']:.4f}, test {result['test_loss']:.4f} ({result['seconds']:.0f} s)")  # fmt: skip

    return done
