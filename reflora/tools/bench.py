"""``reflora bench``: time one LoRA training step of the reference against transformers + PEFT (torch eager).

The workload (defaults): GPT-2 small (``GPT2Config()``, 124M) with seeded random weights; LoRA r=8, α=16 on
``c_attn`` and ``c_proj`` (PEFT's suffix rule: attn.c_attn, attn.c_proj and mlp.c_proj); batch 4, sequence
128, float32, 2 threads. One step is the forward, the shifted causal cross-entropy, and the backward with
gradients for the LoRA tensors only (``--grads full``: every base tensor, no LoRA).

Each implementation runs in its own process (``reflora.tools.bench_worker``) with ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set before NumPy or torch loads (and ``torch.set_num_threads``).
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (set on some machines for old OpenBLAS builds) are removed
from the workers' environment unless ``--keep-openblas-env``, and the kernel OpenBLAS then picks is reported.
A third worker measures the machine's sustained matrix-product rate (the best of NumPy and torch on an
n×n×n product in the run's dtype). Every figure is the median of ``--repeats`` steps after ``--warmup``;
``--rounds`` repeats the pair of workers (alternating their order) and pools the step times.

FLOPs are counted from shapes: ``step_products`` lists every matrix product the step executes (attention as
the dense T×T products it computes) and ``step_flops`` sums 2·m·n·k over it; elementwise work is not counted.
The matrix-product worker also replays that list alone in NumPy and in torch: the time a step made of nothing
but its products would take with each library's BLAS, the floor under both implementations.

``--json PATH`` writes everything; ``--sweep-seq-len`` / ``--sweep-layers`` time more shapes (both
implementations, one worker each); ``--plot PATH`` draws time against sequence length from the sweep.
See docs/performance.md for the figures and the command that produced them.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

from reflora.checkpoint import atomic_write_bytes
from reflora.config import GPT2Config, LoraConfig
from reflora.targets import plan_lora
from reflora.tools.errors import output_file

OPENBLAS_TUNING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# The environment both workers run in unless --plain-env (docs/performance.md measures each variable):
# glibc keeps freed memory for the next step instead of returning it to the system and faulting it back in
# (arrays up to 32 MiB come from the heap, and the heap is never trimmed), and OpenBLAS's idle threads sleep
# right after a product instead of spinning for ~0.1 s on the core that reflora's elementwise blocks want.
STEP_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "OPENBLAS_THREAD_TIMEOUT": "4",
}
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Position of each op inside a block, as reflora.model orders them: backpropagation stops at the lowest
# position whose parameters are wanted, and a product below it is never executed.
_OP_POSITION = {"attn.c_attn": 1, "attn.c_proj": 2, "mlp.c_fc": 4, "mlp.c_proj": 5}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time a LoRA training step: the reference against transformers + PEFT",
        description=__doc__.split("\n\n")[0],
    )
    shape = parser.add_argument_group("workload")
    shape.add_argument("--batch", type=int, default=4)
    shape.add_argument("--seq-len", type=int, default=128)
    shape.add_argument("--layers", type=int, default=12, help="n_layer of GPT-2 (default 12, GPT-2 small)")
    shape.add_argument("--n-embd", type=int, default=768, help="model width (smaller models for smoke tests)")
    shape.add_argument("--n-head", type=int, default=12)
    shape.add_argument("--vocab-size", type=int, default=50257)
    shape.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    shape.add_argument("--grads", choices=("lora", "full"), default="lora", help="LoRA tensors, or full fine-tuning")
    shape.add_argument("--lora-r", type=int, default=8)
    shape.add_argument("--lora-alpha", type=float, default=16.0)
    shape.add_argument("--lora-targets", default="c_attn,c_proj", help="comma-separated target_modules")
    shape.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("measurement")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--repeats", type=int, default=7)
    run.add_argument("--rounds", type=int, default=1, help="run the reference and torch workers this many times")
    run.add_argument("--impl", default="reference,torch", help="which of reference,torch to run")
    run.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="the reference's arrays")
    run.add_argument("--device", choices=("cpu", "cuda"), default=None, help="torch's device (default: by backend)")
    run.add_argument("--matmul-n", type=int, default=2048, help="size of the n×n×n product for the machine's rate")
    run.add_argument("--no-float64", action="store_true", help="skip timing the reference in float64 as well")
    run.add_argument("--keep-openblas-env", action="store_true", help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE")
    run.add_argument(
        "--plain-env", action="store_true", help="do not set the allocator / OpenBLAS variables of STEP_ENVIRONMENT"
    )
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for each worker")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=output_file, default=None, help="write every figure to this JSON file")
    out.add_argument("--sweep-seq-len", default=None, help="comma-separated sequence lengths to time as well")
    out.add_argument("--sweep-layers", default=None, help="comma-separated depths to time as well")
    out.add_argument("--sweep-rounds", type=int, default=1, help="rounds of workers for the sweeps (default 1)")
    out.add_argument(
        "--plot", type=output_file, default=None, help="PNG of time against sequence length (needs the sweep)"
    )
    parser.set_defaults(func=run_bench)


# ----------------------------------------------------------------------------------------------
# FLOPs from shapes
# ----------------------------------------------------------------------------------------------


class Product(NamedTuple):
    """One matrix product of the step, as the reference executes it: ``stack`` × (m, k) @ (k, n).

    ``a_transposed`` / ``b_transposed``: the operand is the transpose of a C-ordered array (the reference
    passes ``matrix_transpose`` views, so the BLAS reads it transposed). ``weight``: the model tensor that is
    the right operand (the same array in the forward and the backward), or None for an activation.
    """

    phase: str  # "forward" or "backward"
    what: str
    stack: tuple[int, ...]
    m: int
    k: int
    n: int
    a_transposed: bool = False
    b_transposed: bool = False
    weight: str | None = None

    @property
    def flops(self) -> int:
        return 2 * math.prod(self.stack) * self.m * self.k * self.n


def step_products(config: GPT2Config, batch: int, seq_len: int, lora: LoraConfig | None) -> list[Product]:
    """Every matrix product of one training step, in the order the reference executes them.

    Forward, with N = B·T, C = n_embd, F = the MLP width, V = vocab: per block the four Conv1D products
    x W (N·C·3C, N·C·C, N·C·F, N·F·C), attention's S = q kᵀ and O = P v (B·H products of T·d·T each: the dense
    T×T, as computed), and per LoRA branch x Aᵀ (N·in·r) and u Bᵀ (N·r·out); then the head h wteᵀ (N·C·V).

    Backward with ``lora`` (only the adapter is trained): the head's dX (N·V·C); per block, going down, each
    Conv1D's dX = dy Wᵀ while a wanted tensor lies below it; attention's four products (dv = Pᵀ dO, dP = dO vᵀ,
    dq = dS k, dk = dSᵀ q) while one lies below it; per branch gB = g B (N·out·r), dB = gᵀ u (out·N·r),
    dA = gBᵀ x (r·N·in) and, while a wanted tensor lies below, gB A (N·r·in). The frozen weights' dW are never
    computed. With ``lora=None`` (full fine-tuning): every dX and every dW = xᵀ dy (the head's too: V·N·C).
    """
    b, t, c, v, h = batch, seq_len, config.n_embd, config.vocab_size, config.n_head
    n, inner, d = b * t, config.inner_dim, config.n_embd // config.n_head
    shapes = {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, inner), "mlp.c_proj": (inner, c)}
    plan = plan_lora(config, lora) if lora is not None else {}
    lowest = -1  # no LoRA, or LoRA on wte (layer -1): down to the embeddings
    if lora is not None:
        lowest = min(max(-1, 6 * m.layer + _OP_POSITION.get(m.kind, 0)) for m in plan.values())
    full = lora is None

    def linear_forward(layer: int, kind: str) -> list[Product]:
        name, (fan_in, fan_out) = f"transformer.h.{layer}.{kind}", shapes[kind]
        out = [Product("forward", f"{name} x W", (), n, fan_in, fan_out, weight=f"{name}.weight")]
        module = plan.get(name)
        for i, branch in enumerate(module.branches if module is not None else ()):
            out_b, r = branch.out_stop - branch.out_start, module.r
            out.append(Product("forward", f"{name} x Aᵀ", (), n, fan_in, r, b_transposed=True, weight=f"{name}.A{i}"))
            out.append(Product("forward", f"{name} u Bᵀ", (), n, r, out_b, b_transposed=True, weight=f"{name}.B{i}"))
        return out

    def linear_backward(layer: int, kind: str) -> list[Product]:
        name, (fan_in, fan_out) = f"transformer.h.{layer}.{kind}", shapes[kind]
        want_dx = 6 * layer + _OP_POSITION[kind] > lowest
        out = []
        if want_dx:
            out.append(Product("backward", f"{name} dy Wᵀ", (), n, fan_out, fan_in, b_transposed=True,
                               weight=f"{name}.weight"))  # fmt: skip
        if full:
            out.append(Product("backward", f"{name} xᵀ dy", (), fan_in, n, fan_out, a_transposed=True))
        module = plan.get(name)
        for i, branch in enumerate(module.branches if module is not None else ()):
            out_b, r = branch.out_stop - branch.out_start, module.r
            out.append(Product("backward", f"{name} g B", (), n, out_b, r, weight=f"{name}.B{i}"))
            out.append(Product("backward", f"{name} gᵀ u", (), out_b, n, r, a_transposed=True))
            out.append(Product("backward", f"{name} gBᵀ x", (), r, n, fan_in, a_transposed=True))
            if want_dx:
                out.append(Product("backward", f"{name} gB A", (), n, r, fan_in, weight=f"{name}.A{i}"))
        return out

    def attention(layer: int, phase: str) -> list[Product]:
        name, stack = f"transformer.h.{layer}.attn", (b, h)
        if phase == "forward":
            return [Product(phase, f"{name} q kᵀ", stack, t, d, t, b_transposed=True),
                    Product(phase, f"{name} P v", stack, t, t, d)]  # fmt: skip
        return [Product(phase, f"{name} Pᵀ dO", stack, t, t, d, a_transposed=True),
                Product(phase, f"{name} dO vᵀ", stack, t, d, t, b_transposed=True),
                Product(phase, f"{name} dS k", stack, t, t, d),
                Product(phase, f"{name} dSᵀ q", stack, t, t, d, a_transposed=True)]  # fmt: skip

    products: list[Product] = []
    for layer in range(config.n_layer):
        products += linear_forward(layer, "attn.c_attn") + attention(layer, "forward")
        products += linear_forward(layer, "attn.c_proj") + linear_forward(layer, "mlp.c_fc")
        products += linear_forward(layer, "mlp.c_proj")
    wte = "transformer.wte.weight"
    products.append(Product("forward", "head h wteᵀ", (), n, c, v, b_transposed=True, weight=wte))
    if full:
        products.append(Product("backward", "head dlogitsᵀ h", (), v, n, c, a_transposed=True))
    if lowest < 6 * config.n_layer:
        products.append(Product("backward", "head dlogits wte", (), n, v, c, weight=wte))
    for layer in reversed(range(config.n_layer)):
        base = 6 * layer
        for kind, position in (("mlp.c_proj", 5), ("mlp.c_fc", 4)):
            products += linear_backward(layer, kind)
            if base + position <= lowest:
                return products
        if base + 3 <= lowest:
            return products
        products += linear_backward(layer, "attn.c_proj")
        if base + 2 <= lowest:
            return products
        products += attention(layer, "backward") + linear_backward(layer, "attn.c_attn")
        if base + 1 <= lowest:
            return products
    return products


def step_flops(config: GPT2Config, batch: int, seq_len: int, lora: LoraConfig | None) -> dict[str, int]:
    """FLOPs of one training step: 2·m·n·k for every product of ``step_products`` (elementwise work is not
    counted), split into forward and backward."""
    products = step_products(config, batch, seq_len, lora)
    forward = sum(p.flops for p in products if p.phase == "forward")
    backward = sum(p.flops for p in products if p.phase == "backward")
    return {"forward": forward, "backward": backward, "total": forward + backward}


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------


def worker_env(threads: int, keep_openblas_env: bool, plain_env: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """The workers' environment, and the OpenBLAS tuning variables that were removed from it."""
    env = dict(os.environ)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    if not plain_env:
        env.update(STEP_ENVIRONMENT)
    removed = {}
    if not keep_openblas_env:
        removed = {name: env.pop(name) for name in OPENBLAS_TUNING_VARIABLES if name in env}
    repo_root = str(Path(__file__).resolve().parents[2])  # the workers import this very reflora
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    return env, removed


def run_worker(job: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one ``reflora.tools.bench_worker`` job in a fresh interpreter; its last stdout line is the result."""
    proc = subprocess.run(
        [sys.executable, "-m", "reflora.tools.bench_worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {job['kind']!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _job(args, kind: str, shapes: list[dict[str, int]], dtype: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "shapes": shapes,
        "dtype": dtype,
        "grads": args.grads,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_targets": [t for t in args.lora_targets.split(",") if t],
        "seed": args.seed,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "backend": args.backend,
        "device": args.device,
        "matmul_n": args.matmul_n,
        "model_overrides": _model_overrides(args),
    }


def _model_overrides(args) -> dict[str, int]:
    """GPT2Config fields other than n_layer (the defaults are GPT-2 small's)."""
    return {"n_embd": args.n_embd, "n_head": args.n_head, "vocab_size": args.vocab_size}


def _pooled(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the per-shape results of several rounds: pooled times, their median, the largest peaks."""
    merged = []
    for per_shape in zip(*(run["shapes"] for run in runs), strict=True):
        entry = dict(per_shape[0])
        entry["times_s"] = [t for s in per_shape for t in s["times_s"]]
        entry["cpu_times_s"] = [t for s in per_shape for t in s["cpu_times_s"]]
        entry["median_s"] = statistics.median(entry["times_s"])
        for key in entry:
            if key.endswith("_bytes"):
                entry[key] = max(s[key] for s in per_shape)
        merged.append(entry)
    return merged


def measure_pair(args, impls: list[str], shapes: list[dict[str, int]], dtype: str, env, rounds: int) -> dict[str, Any]:
    """Each implementation's per-shape results over ``rounds`` rounds of fresh workers."""
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    for round_index in range(rounds):
        order = impls if round_index % 2 == 0 else impls[::-1]
        for impl in order:
            runs[impl].append(run_worker(_job(args, impl, shapes, dtype), env, args.timeout))
    return {impl: {**rs[0], "shapes": _pooled(rs)} for impl, rs in runs.items()}


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def _int_list(text: str | None) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()] if text else []


def _validate(args) -> list[str]:
    impls = [impl for impl in args.impl.split(",") if impl]
    unknown = sorted(set(impls) - {"reference", "torch"})
    if unknown or not impls:
        raise SystemExit(f"reflora bench: --impl takes reference and/or torch, got {args.impl!r}")
    positive = ("batch", "seq_len", "layers", "n_embd", "n_head", "vocab_size", "threads", "repeats", "rounds")
    for name in (*positive, "sweep_rounds", "matmul_n", "lora_r"):
        if getattr(args, name) < 1:
            raise SystemExit(f"reflora bench: --{name.replace('_', '-')} must be at least 1")
    if max([args.seq_len, *_int_list(args.sweep_seq_len)]) > GPT2Config().n_positions:
        raise SystemExit(f"reflora bench: sequence lengths go up to n_positions={GPT2Config().n_positions}")
    if args.n_embd % args.n_head:
        raise SystemExit("reflora bench: --n-embd must be divisible by --n-head")
    if args.warmup < 0:
        raise SystemExit("reflora bench: --warmup must be at least 0")
    if args.device is None:
        args.device = "cuda" if args.backend == "cupy" else "cpu"
    if (args.backend == "cupy") != (args.device == "cuda"):
        raise SystemExit("reflora bench: --backend cupy goes with --device cuda, and numpy with cpu")
    if args.plot is not None and not args.sweep_seq_len:
        raise SystemExit("reflora bench: --plot draws the --sweep-seq-len results; give that too")
    return impls


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def run_bench(args) -> int:
    impls = _validate(args)
    import numpy

    env, removed = worker_env(args.threads, args.keep_openblas_env, args.plain_env)
    main_shape = {"batch": args.batch, "seq_len": args.seq_len, "n_layer": args.layers}
    config = GPT2Config(n_layer=args.layers, **_model_overrides(args))
    lora = None
    if args.grads == "lora":
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_targets.split(","))
    flops = step_flops(config, args.batch, args.seq_len, lora)

    report: dict[str, Any] = {
        "workload": {**main_shape, **_model_overrides(args), "dtype": args.dtype, "grads": args.grads, "lora_r": args.lora_r,
                     "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets, "seed": args.seed},
        "settings": {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds,
                     "backend": args.backend, "device": args.device, "openblas_env_removed": removed,
                     "environment": {} if args.plain_env else STEP_ENVIRONMENT,
                     "numpy": numpy.__version__},
        "machine": machine_description(),
        "flops": flops,
    }  # fmt: skip
    print(f"reflora bench: {_describe(report['workload'])}, {args.threads} threads", flush=True)

    products = step_products(config, args.batch, args.seq_len, lora)
    matmul_job = {**_job(args, "matmul", [], args.dtype), "products": [p._asdict() for p in products]}
    matmul = run_worker(matmul_job, env, args.timeout)
    machine_gflops = max(matmul["gflops"].values())
    report["matmul"] = {**matmul, "machine_gflops": machine_gflops}
    print(f"  matrix product {args.matmul_n}³ {args.dtype}: " + ", ".join(
        f"{k} {v:.0f} GFLOP/s" for k, v in matmul["gflops"].items()), flush=True)  # fmt: skip
    print(f"  the step's {len(products)} products alone: " + ", ".join(
        f"{k} {t:.3f} s ({matmul['products']['gflops'][k]:.0f} GFLOP/s)"
        for k, t in matmul["products"]["median_s"].items()), flush=True)  # fmt: skip

    results = measure_pair(args, impls, [main_shape], args.dtype, env, args.rounds)
    summary: dict[str, Any] = {}
    for impl, result in results.items():
        entry = result["shapes"][0]
        gflops = flops["total"] / entry["median_s"] / 1e9
        summary[impl] = {
            **{k: v for k, v in entry.items() if k not in ("batch", "seq_len", "n_layer")},
            "gflops": gflops,
            "fraction_of_machine": gflops / machine_gflops,
            "blas": result.get("blas"),
        }
    if "reference" in summary and "torch" in summary:
        ref, torch_ = summary["reference"], summary["torch"]
        summary["ratio_reference_over_torch"] = ref["median_s"] / torch_["median_s"]
        peak = "peak_rss_bytes" if args.backend == "numpy" else "peak_device_bytes"
        summary["peak_memory_ratio_reference_over_torch"] = ref[peak] / torch_[peak]
        summary["loss_relative_difference"] = abs(ref["loss"] - torch_["loss"]) / abs(torch_["loss"])
        alone = report["matmul"]["products"]["median_s"]
        if args.backend in alone:  # the best ratio a step made of nothing but its products could reach
            summary["ratio_products_alone_over_torch"] = alone[args.backend] / torch_["median_s"]
    if "reference" in impls and args.dtype == "float32" and not args.no_float64:
        other = measure_pair(args, ["reference"], [main_shape], "float64", env, args.rounds)["reference"]["shapes"][0]
        summary["reference_float64"] = {"median_s": other["median_s"], "times_s": other["times_s"]}
        summary["float64_over_float32"] = other["median_s"] / summary["reference"]["median_s"]
    report["results"] = summary
    _print_summary(summary, args)

    sweeps = {}
    for name, values, key in (("seq_len", _int_list(args.sweep_seq_len), "seq_len"),
                              ("n_layer", _int_list(args.sweep_layers), "n_layer")):  # fmt: skip
        if not values:
            continue
        shapes = [{**main_shape, key: value} for value in values]
        swept = measure_pair(args, impls, shapes, args.dtype, env, args.sweep_rounds)
        rows = []
        for i, shape in enumerate(shapes):
            row = dict(shape)
            for impl in impls:
                row[f"{impl}_median_s"] = swept[impl]["shapes"][i]["median_s"]
            depth = GPT2Config(n_layer=shape["n_layer"], **_model_overrides(args))
            row["flops"] = step_flops(depth, shape["batch"], shape["seq_len"], lora)["total"]
            rows.append(row)
            print("  sweep " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)
        sweeps[name] = rows
    if sweeps:
        report["sweeps"] = sweeps
    if args.plot is not None:
        plot_seq_len(sweeps["seq_len"], impls, args.plot, report)
        print(f"  plot written to {args.plot}")
    if args.json is not None:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
        print(f"  JSON written to {args.json}")
    return 0


def _describe(workload: dict[str, Any]) -> str:
    grads = (
        f"LoRA r={workload['lora_r']} on {workload['lora_targets']}"
        if workload["grads"] == "lora"
        else "full fine-tuning"
    )
    return (f"GPT-2 n_layer={workload['n_layer']}, batch {workload['batch']}, seq {workload['seq_len']}, "
            f"{workload['dtype']}, {grads}")  # fmt: skip


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _print_summary(summary: dict[str, Any], args) -> None:
    for impl in ("reference", "torch"):
        if impl not in summary:
            continue
        s = summary[impl]
        peak = s.get("peak_rss_bytes", s.get("peak_device_bytes"))
        step = s.get("step_rss_bytes", s.get("step_device_bytes"))
        print(f"  {impl:9s} median {s['median_s']:.3f} s  {s['gflops']:.0f} GFLOP/s "
              f"({100 * s['fraction_of_machine']:.0f}% of the matrix-product rate)  "
              f"peak memory {_mib(peak)} (the step adds {_mib(step)})  loss {s['loss']:.6f}")  # fmt: skip
    if "ratio_reference_over_torch" in summary:
        print(f"  reference / torch = {summary['ratio_reference_over_torch']:.3f}; "
              f"peak memory reference / torch = {summary['peak_memory_ratio_reference_over_torch']:.2f}")  # fmt: skip
    if "ratio_products_alone_over_torch" in summary:
        print(
            f"  the reference's products alone / torch's step = {summary['ratio_products_alone_over_torch']:.3f} "
            "(the ratio a step of nothing but matrix products would reach)"
        )
    if "float64_over_float32" in summary:
        print(f"  reference float64 median {summary['reference_float64']['median_s']:.3f} s "
              f"= {summary['float64_over_float32']:.2f}x float32")  # fmt: skip


def plot_seq_len(rows: list[dict[str, Any]], impls: list[str], path: Path, report: dict[str, Any]) -> None:
    """Time of one step against sequence length, one line per implementation (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"reference": "reflora (NumPy)" if report["settings"]["backend"] == "numpy" else "reflora (CuPy)",
              "torch": f"transformers + PEFT (torch eager, {report['settings']['device']})"}  # fmt: skip
    seq_lens = [row["seq_len"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for impl in impls:
        ax.plot(seq_lens, [row[f"{impl}_median_s"] for row in rows], marker="o", label=labels[impl])
    floor = [row["flops"] / (report["matmul"]["machine_gflops"] * 1e9) for row in rows]
    ax.plot(seq_lens, floor, linestyle="--", color="grey", label="FLOPs / matrix-product rate")
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens, [str(s) for s in seq_lens])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("seconds per training step (median)")
    w = report["workload"]
    ax.set_title(
        f"GPT-2 {w['n_layer']} layers, batch {w['batch']}, {w['dtype']}, {report['settings']['threads']} threads"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # never a partial image, never through a device or a fifo
