"""One measurement of ``reflora bench``, run in a process of its own (``python -m reflora.tools.bench_worker``).

The parent (``reflora.tools.bench``) starts one worker per implementation, with the thread-count variables already
in the environment, so that NumPy's OpenBLAS and torch read them when they load, and so that each peak-memory
figure belongs to one implementation alone. The job arrives as JSON on stdin; the result leaves as one JSON
line on stdout.

Jobs (``"kind"``):

* ``"matmul"``: the sustained rate of an n×n×n float matrix product, for NumPy (or CuPy) and torch; with
  ``"products"`` (``reflora.tools.bench.step_products``), also the step's own products replayed alone in both.
* ``"reference"``: ``reflora.gpt2_loss_and_grads`` on NumPy (or CuPy) arrays.
* ``"torch"``: transformers ``GPT2LMHeadModel`` + PEFT, the loss and ``loss.backward()`` under eager autograd.

Both models get the same seeded weights and tokens (``reflora.init_gpt2_params``, a fixed seed), so their
losses agree to the dtype's rounding; the worker reports the loss of its first step as a check.

Memory (Linux): once the weights are built, before the first step, the worker drops what setup left behind,
resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads the resident set size; after the
last step it reads the high-water mark again (``VmHWM``). ``peak_rss_bytes`` is that peak for the whole
process (interpreter, libraries, weights, and the steps' working set): the figure to compare.
``step_rss_bytes`` is the part the steps added. The
reference also reports ``tracemalloc_peak_bytes``: the peak of the array buffers that NumPy reports to
``tracemalloc`` during one extra, untimed step. On a GPU the figures are the device allocators' own peaks.
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def main() -> int:
    job = json.loads(sys.stdin.read())
    measure = {"matmul": measure_matmul, "reference": measure_reference, "torch": measure_torch}[job["kind"]]
    result = {"kind": job["kind"], **measure(job), "blas": blas_info()}
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------
# the workload
# ----------------------------------------------------------------------------------------------


def build_workload(job: dict[str, Any], n_layer: int):
    """Config, LoRA config (None for full fine-tuning), NumPy params and adapter, from the job's seed."""
    from reflora import GPT2Config, LoraConfig, init_gpt2_params, init_lora_adapter, plan_lora

    config = GPT2Config(n_layer=n_layer, **job.get("model_overrides", {}))
    rng = np.random.default_rng(job["seed"])
    params = init_gpt2_params(config, rng, dtype=np.dtype(job["dtype"]))
    if job["grads"] == "full":
        return config, None, params, None
    lora = LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"], target_modules=list(job["lora_targets"]))
    adapter = init_lora_adapter(plan_lora(config, lora), rng, dtype=np.dtype(job["dtype"]))
    return config, lora, params, adapter


def tokens(job: dict[str, Any], config, batch: int, seq_len: int) -> np.ndarray:
    """(B, T) int64 token ids; the labels are the ids themselves (causal LM)."""
    return np.random.default_rng(job["seed"] + 1).integers(0, config.vocab_size, (batch, seq_len), dtype=np.int64)


def time_steps(
    step: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]
) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones.

    The CPU time (all threads, ``time.process_time``) is a check on a shared machine: a wall time far above
    it / threads means the step waited for a core. It counts BLAS threads that spin while they wait, too."""
    for _ in range(warmup):
        step()
        sync()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def run_shapes(job, make_step, memory) -> dict[str, Any]:
    """Build the weights per depth, then time every (batch, seq_len, n_layer) shape of the job."""
    results, built = [], {}
    for shape in job["shapes"]:
        n_layer = shape["n_layer"]
        if n_layer not in built:
            built.clear()
            gc.collect()
            built[n_layer] = make_step.prepare(build_workload(job, n_layer))
        before = memory.start()  # after the weights are built, before the first step
        step, loss = make_step.step(built[n_layer], shape["batch"], shape["seq_len"])
        times, cpu_times = time_steps(step, job["warmup"], job["repeats"], make_step.sync)
        results.append(
            {
                **shape,
                "times_s": times,
                "median_s": statistics.median(times),
                "cpu_times_s": cpu_times,
                "loss": loss,
                **memory.stop(before),
                **make_step.extra_memory(built[n_layer], shape["batch"], shape["seq_len"]),
            }
        )
    return {"shapes": results}


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class HostMemory:
    """Resident-set figures of this process around the timed steps (see the module docstring)."""

    def start(self) -> int | None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False  # the peak then covers setup too; reported as such
        return _status_kib("VmRSS")

    def stop(self, rss_before_kib: int | None) -> dict[str, Any]:
        import resource

        peak_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"peak_rss_bytes": peak_kib * 1024, "peak_covers_steps_only": self.reset}
        if rss_before_kib is not None:
            out["rss_before_steps_bytes"] = rss_before_kib * 1024
            out["step_rss_bytes"] = (peak_kib - rss_before_kib) * 1024
        return out


class CupyMemory:
    """The CuPy memory pool's peak: the pool keeps freed blocks, so its size after the steps is their peak."""

    def start(self) -> int:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        return int(cupy.get_default_memory_pool().total_bytes())

    def stop(self, before: int) -> dict[str, Any]:
        import cupy

        total = int(cupy.get_default_memory_pool().total_bytes())
        return {"peak_device_bytes": total, "step_device_bytes": total - before}


class TorchCudaMemory:
    """torch's CUDA caching allocator: ``max_memory_allocated`` over the steps."""

    def start(self) -> int:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())

    def stop(self, before: int) -> dict[str, Any]:
        import torch

        peak = int(torch.cuda.max_memory_allocated())
        return {"peak_device_bytes": peak, "step_device_bytes": peak - before}


# ----------------------------------------------------------------------------------------------
# the three measurements
# ----------------------------------------------------------------------------------------------


class ReferenceStep:
    """``reflora.gpt2_loss_and_grads`` with the default ``wrt`` (the adapter, or every base tensor)."""

    def __init__(self, job):
        from reflora.backend import get_backend

        self.job = job
        self.xp = get_backend(job["backend"])
        self.sync = (lambda: self.xp.cuda.Device().synchronize()) if job["backend"] == "cupy" else (lambda: None)

    def prepare(self, workload):
        config, lora, params, adapter = workload
        xp = self.xp
        params = {k: xp.asarray(v) for k, v in params.items()}
        adapter = None if adapter is None else {k: xp.asarray(v) for k, v in adapter.items()}
        return config, lora, params, adapter

    def step(self, prepared, batch, seq_len):
        import reflora

        config, lora, params, adapter = prepared
        ids = self.xp.asarray(tokens(self.job, config, batch, seq_len))

        def step():
            loss, _, _ = reflora.gpt2_loss_and_grads(params, config, ids, ids, adapter=adapter, lora=lora)
            return loss

        return step, float(step())

    def extra_memory(self, prepared, batch, seq_len) -> dict[str, Any]:
        if self.job["backend"] != "numpy":
            return {}
        import tracemalloc

        step, _ = self.step(prepared, batch, seq_len)
        gc.collect()
        tracemalloc.start()
        step()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {"tracemalloc_peak_bytes": int(peak)}


class TorchStep:
    """transformers + PEFT (``conformance.drivers.peft_bridge``), ``loss.backward()`` under eager autograd."""

    def __init__(self, job):
        import torch

        torch.set_num_threads(job["threads"])
        self.job = job
        self.device = torch.device(job["device"])
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def prepare(self, workload):
        import torch

        from conformance.drivers.peft_bridge import build_hf_model, build_peft_model

        config, lora, params, adapter = workload
        if lora is None:
            model = build_hf_model(config, params, self.job["dtype"])
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            model = build_peft_model(config, params, lora, adapter, self.job["dtype"])  # only LoRA trains
        model.train()
        del params, adapter
        gc.collect()
        with torch.no_grad():
            model.to(self.device)
        return config, model

    def step(self, prepared, batch, seq_len):
        import torch

        from conformance.drivers.peft_bridge import hf_causal_lm_loss

        config, model = prepared
        ids = torch.from_numpy(tokens(self.job, config, batch, seq_len)).to(self.device)

        def step():
            model.zero_grad(set_to_none=True)
            loss = hf_causal_lm_loss(model(input_ids=ids).logits, ids)
            loss.backward()
            return loss

        return step, float(step().detach())

    def extra_memory(self, prepared, batch, seq_len) -> dict[str, Any]:
        return {}


def measure_reference(job) -> dict[str, Any]:
    memory = CupyMemory() if job["backend"] == "cupy" else HostMemory()
    return {"backend": job["backend"], **run_shapes(job, ReferenceStep(job), memory)}


def measure_torch(job) -> dict[str, Any]:
    import torch

    memory = TorchCudaMemory() if job["device"] == "cuda" else HostMemory()
    return {"device": job["device"], "torch_version": torch.__version__, **run_shapes(job, TorchStep(job), memory)}


def measure_matmul(job) -> dict[str, Any]:
    """GFLOP/s of ``a @ b`` with a, b: (n, n) in the job's dtype: 2n³ / the median of ``repeats`` products."""
    n, repeats = job["matmul_n"], job["repeats"]
    rates = {}
    xp = np
    sync: Callable[[], None] = lambda: None  # noqa: E731
    if job["backend"] == "cupy":
        import cupy as xp

        sync = lambda: xp.cuda.Device().synchronize()  # noqa: E731
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(job["dtype"]))
    b = xp.asarray(np.random.default_rng(1).standard_normal((n, n)).astype(job["dtype"]))
    times, _ = time_steps(lambda: xp.matmul(a, b), 2, repeats, sync)
    rates[job["backend"]] = 2 * n**3 / statistics.median(times) / 1e9
    if job.get("with_torch", True):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            torch.set_num_threads(job["threads"])
            device = torch.device(job["device"])
            ta = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n)).astype(job["dtype"])).to(device)
            tb = torch.from_numpy(np.random.default_rng(1).standard_normal((n, n)).astype(job["dtype"])).to(device)
            tsync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            times, _ = time_steps(lambda: torch.matmul(ta, tb), 2, repeats, tsync)
            rates["torch"] = 2 * n**3 / statistics.median(times) / 1e9
    out: dict[str, Any] = {"n": n, "gflops": rates}
    if job.get("products"):
        out["products"] = measure_products(job, xp, sync)
    return out


def measure_products(job, xp, sync: Callable[[], None]) -> dict[str, Any]:
    """The step's matrix products alone (``reflora.tools.bench.step_products``), back to back, in NumPy (or CuPy) and
    in torch on the same operands: the time a step would take if it did nothing but its products.

    Operands are made once, as in the model: one array per weight, shared by the forward and the backward (so
    that a weight is read from memory, not cache, as in a real step), one per activation; outputs are fresh.
    Transposed operands are transposed views, as the reference passes them. Stacked (attention) products run
    as one stacked matmul on contiguous operands."""
    rng = np.random.default_rng(2)
    weights: dict[str, np.ndarray] = {}

    def operand(shape: tuple[int, ...], weight: str | None) -> np.ndarray:
        if weight is None:
            return rng.standard_normal(shape, dtype=np.float64).astype(job["dtype"])
        if weight not in weights:
            weights[weight] = rng.standard_normal(shape, dtype=np.float64).astype(job["dtype"])
        if weights[weight].shape != shape:
            raise ValueError(f"weight {weight} is used with shapes {weights[weight].shape} and {shape}")
        return weights[weight]

    pairs = []  # (a, b, a_transposed, b_transposed): NumPy arrays in their stored layout
    flops = 0
    for p in job["products"]:
        stack = tuple(p["stack"])
        a = operand(stack + ((p["k"], p["m"]) if p["a_transposed"] else (p["m"], p["k"])), None)
        b = operand(stack + ((p["n"], p["k"]) if p["b_transposed"] else (p["k"], p["n"])), p["weight"])
        pairs.append((a, b, p["a_transposed"], p["b_transposed"]))
        flops += 2 * math.prod(stack) * p["m"] * p["k"] * p["n"]

    def replay(lib, transpose, arrays) -> Callable[[], None]:
        def run() -> None:
            for a, b, a_t, b_t in arrays:
                lib.matmul(transpose(a) if a_t else a, transpose(b) if b_t else b)

        return run

    on_device = [(xp.asarray(a), xp.asarray(b), a_t, b_t) for a, b, a_t, b_t in pairs]
    runs = {job["backend"]: (replay(xp, lambda x: xp.swapaxes(x, -1, -2), on_device), sync)}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and job.get("with_torch", True):
        device = torch.device(job["device"])
        tensors = [
            (torch.from_numpy(a).to(device), torch.from_numpy(b).to(device), a_t, b_t) for a, b, a_t, b_t in pairs
        ]
        tsync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        runs["torch"] = (replay(torch, lambda x: x.mT, tensors), tsync)
    # two halves in opposite orders, so that a drift of the machine's speed hits both libraries alike
    times: dict[str, list[float]] = {lib: [] for lib in runs}
    for order in (list(runs), list(runs)[::-1]):
        for lib in order:
            times[lib] += time_steps(runs[lib][0], 1, max(1, job["repeats"] // 2), runs[lib][1])[0]
    timed = {lib: statistics.median(ts) for lib, ts in times.items()}
    return {"count": len(pairs), "flops": flops, "median_s": timed, "times_s": times,
            "gflops": {lib: flops / t / 1e9 for lib, t in timed.items()}}  # fmt: skip


def blas_info() -> list[dict[str, Any]]:
    """The BLAS / OpenMP libraries loaded in this process, with their kernel (``threadpoolctl``, if installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "install threadpoolctl to see which BLAS kernel runs"}]
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads", "threading_layer")
    return [{k: lib.get(k) for k in keys if lib.get(k) is not None} for lib in threadpool_info()]


if __name__ == "__main__":
    sys.exit(main())
