"""``reflora bench``: its FLOP count against the products the reference really executes, and a smoke run on a
tiny model. No timing is asserted: speed targets live in docs/performance.md, never in tests."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

import reflora
from reflora.tools.bench import step_flops, step_products
from reflora.tools.cli import main

TINY = reflora.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_head=2, n_layer=3)


@pytest.mark.parametrize(
    "targets",
    [["c_attn", "c_proj"], ["c_fc"], ["mlp.c_proj"], None],
    ids=["c_attn+c_proj", "c_fc", "mlp.c_proj", "full-fine-tuning"],
)
def test_step_products_are_the_matrix_products_the_reference_executes(monkeypatch, targets):
    rng = np.random.default_rng(0)
    params = reflora.init_gpt2_params(TINY, rng)
    lora = None if targets is None else reflora.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    adapter = None if lora is None else reflora.init_lora_adapter(reflora.plan_lora(TINY, lora), rng)
    ids = rng.integers(0, TINY.vocab_size, (2, 5))
    executed: Counter = Counter()  # (m, k, n) -> how many (m, k) @ (k, n) products, stacks unrolled
    matmul = np.matmul

    def counting_matmul(a, b, *args, **kwargs):
        out = matmul(a, b, *args, **kwargs)
        executed[(a.shape[-2], a.shape[-1], b.shape[-1])] += math.prod(out.shape[:-2])
        return out

    monkeypatch.setattr(np, "matmul", counting_matmul)
    reflora.gpt2_loss_and_grads(params, TINY, ids, ids, adapter=adapter, lora=lora)
    monkeypatch.undo()
    listed: Counter = Counter()
    for product in step_products(TINY, 2, 5, lora):
        listed[(product.m, product.k, product.n)] += math.prod(product.stack)
    assert listed == executed, f"step_products lists {listed - executed} too many, misses {executed - listed}"
    counted = step_flops(TINY, 2, 5, lora)
    assert counted["total"] == sum(2 * m * k * n * count for (m, k, n), count in executed.items())
    assert counted["forward"] + counted["backward"] == counted["total"]


def test_step_flops_of_the_issue_workload_is_near_the_6n_rule():
    """GPT-2 small, LoRA r=8 on c_attn/c_proj, B·T = 512: forward 2·P·N plus attention, backward without dW."""
    lora = reflora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])
    flops = step_flops(reflora.GPT2Config(), 4, 128, lora)
    matmul_params = 12 * 12 * 768**2 + 50257 * 768  # Conv1D weights and the head
    assert 2 * matmul_params * 512 < flops["forward"] < 1.03 * 2 * matmul_params * 512
    # dX only (no dW), attention's backward twice its forward, layer 0's c_attn dX skipped: about the forward
    assert 0.95 * flops["forward"] < flops["backward"] < 1.05 * flops["forward"]


@pytest.mark.torch
def test_bench_smoke_run_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "seq.png"
    argv = ["bench", "--layers", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size", "97", "--batch", "2",
            "--seq-len", "8", "--warmup", "0", "--repeats", "1", "--matmul-n", "32",
            "--sweep-seq-len", "4,8", "--json", str(out), "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    for impl in ("reference", "torch"):
        assert results[impl]["median_s"] > 0
        assert results[impl]["peak_rss_bytes"] > 0
        assert results[impl]["gflops"] > 0
    # same seeded weights and tokens on both sides: the losses agree to float32 rounding
    assert results["loss_relative_difference"] < 1e-5
    assert results["ratio_reference_over_torch"] > 0
    products = report["matmul"]["products"]  # the step's products replayed alone, in NumPy and in torch
    assert products["count"] == len(step_products(
        reflora.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97),
        2, 8, reflora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
    ))  # fmt: skip
    assert products["flops"] == report["flops"]["total"]
    assert products["median_s"]["numpy"] > 0 and products["median_s"]["torch"] > 0
    assert results["ratio_products_alone_over_torch"] > 0
    assert results["float64_over_float32"] > 0
    assert report["flops"]["total"] == step_flops(
        reflora.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97),
        2, 8, reflora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
    )["total"]  # fmt: skip
    assert [row["seq_len"] for row in report["sweeps"]["seq_len"]] == [4, 8]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reference / torch" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--impl", "jax"], "--impl"),
        (["bench", "--plot", "x.png"], "--sweep-seq-len"),
        (["bench", "--seq-len", "2048"], "n_positions"),
        (["bench", "--backend", "cupy", "--device", "cpu"], "cupy"),
    ],
)
def test_bench_rejects_bad_options_before_running(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


# ----------------------------------------------------------------------------------------------
# the speed helpers of reflora.backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block_bytes", [1, 100, 1 << 20])
def test_row_blocks_cover_every_row_once_in_a_multiple_of_the_threads(monkeypatch, threads, block_bytes):
    import reflora.backend as backend

    monkeypatch.setattr(backend, "BLOCK_BYTES", block_bytes)
    x = np.zeros((37, 5))
    blocks = backend.row_blocks(x, threads)
    covered = [i for rows in blocks for i in range(37)[rows]]
    assert covered == list(range(37))
    assert len(blocks) == 37 or len(blocks) % threads == 0
    assert max(r.stop - r.start for r in blocks) - min(r.stop - r.start for r in blocks) <= 1


def test_for_each_row_block_runs_every_block_on_threads_and_reraises(monkeypatch):
    import threading

    import reflora.backend as backend

    monkeypatch.setattr(backend, "BLOCK_BYTES", 8 * 5)  # one row of (N, 5) float64 per block
    monkeypatch.setenv("REFLORA_NUM_THREADS", "2")
    x = np.arange(40.0).reshape(8, 5)
    out = np.zeros_like(x)
    names = set()

    def double(rows):
        names.add(threading.current_thread().name)
        out[rows, :] = 2 * x[rows, :]

    backend.for_each_row_block(double, x)
    np.testing.assert_array_equal(out, 2 * x)
    assert len(names) == 2  # the caller and one pool thread

    def fail(rows):
        if rows.start == 5:
            raise RuntimeError("block 5")

    with pytest.raises(RuntimeError, match="block 5"):
        backend.for_each_row_block(fail, x)


def test_blocks_run_their_products_on_one_blas_thread_each(monkeypatch):
    """Blocks are the parallelism: while they run, each BLAS call uses one thread, and the count comes back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import reflora.backend as backend

    monkeypatch.setattr(backend, "BLOCK_BYTES", 8 * 5)
    monkeypatch.setenv("REFLORA_NUM_THREADS", "2")
    controller = threadpoolctl.ThreadpoolController()
    if not controller.select(user_api="blas").lib_controllers:
        pytest.skip("no BLAS found by threadpoolctl")
    with controller.limit(limits=2, user_api="blas"):
        seen = []
        backend.for_each_row_block(
            lambda rows: seen.append(max(c.num_threads for c in threadpoolctl.ThreadpoolController().select(
                user_api="blas").lib_controllers)), np.zeros((8, 5)))  # fmt: skip
        assert seen and set(seen) == {1}
        after = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        assert max(c.num_threads for c in after) == 2


def test_add_at_columns_matches_the_one_hot_update():
    import array_api_strict as xps

    from reflora.backend import add_at_columns

    rng = np.random.default_rng(0)
    array, columns, values = rng.standard_normal((6, 4)), rng.integers(0, 4, 6), rng.standard_normal(6)
    expected = array + np.eye(4)[columns] * values[:, None]
    np.testing.assert_array_equal(add_at_columns(np, array.copy(), columns, values), expected)
    strict = add_at_columns(xps, xps.asarray(array), xps.asarray(columns), xps.asarray(values))
    np.testing.assert_allclose(np.asarray(strict), expected, rtol=0, atol=1e-15)
