"""``reflora golden``: generate and verify the golden fixtures (``reflora.golden``), with rich progress and tables."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from reflora.golden import (
    DTYPES,
    RTOL,
    GoldenError,
    default_golden_dir,
    generate_case,
    generate_corpus,
    load_spec,
    read_case_specs,
    read_manifest,
    verify_corpus,
    verify_fixture,
    write_case,
)
from reflora.golden.spec import fixture_layout
from reflora.golden.trajectory import verify_trajectory_corpus
from reflora.targets import ADAPTER_PREFIX
from reflora.tools.errors import check_disk, check_memory, output_file


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "golden",
        help="generate and verify the golden fixtures (inputs, weights, outputs, gradients)",
        description="Golden fixtures: one safetensors file per case, format reflora-golden/1 "
        "(docs/golden-format.md). The committed corpus is golden/ in the repository.",
    )
    sub = p.add_subparsers(dest="golden_command", metavar="ACTION", required=True)
    gen = sub.add_parser(
        "generate",
        help="rewrite the committed corpus, or write one custom case (--spec/--out)",
        description="Without --spec: regenerate golden/fixtures/ and golden/manifest.json from golden/cases/*.json. "
        "With --spec CASE.json --out FILE: write one fixture for any spec (any size, e.g. GPT-2 small).",
    )
    gen.add_argument("--dir", type=Path, default=None, help="the corpus folder (default: golden/ of this checkout)")
    gen.add_argument("--spec", type=Path, help="a case spec (JSON) to generate instead of the corpus")
    gen.add_argument("--out", type=output_file,
                     help="where to write the --spec case's fixture (.safetensors; a new path or a regular file)")  # fmt: skip
    gen.add_argument("--force", action="store_true",
                     help="rewrite every fixture, even those that still verify (default: keep their bytes)")  # fmt: skip
    gen.set_defaults(func=_run_generate)
    ver = sub.add_parser(
        "verify",
        help="regenerate every committed case in memory and compare with the stored files",
        description="Regenerate every case of the manifest and compare with the stored fixture: inputs bit-exact, "
        "outputs to max|new − stored| ≤ rtol · max|stored| (rtol 1e-12 in float64, 1e-4 in float32); hashes, specs "
        "and the case count must match the manifest. With FIXTURE paths: verify those files against their own spec.",
    )
    ver.add_argument("fixtures", nargs="*", type=Path, metavar="FIXTURE", help="fixture files to verify instead")
    ver.add_argument("--dir", type=Path, default=None, help="the corpus folder (default: golden/ of this checkout)")
    ver.set_defaults(func=_run_verify)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"reflora golden: error: {message}")


def _run_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if (args.spec is None) != (args.out is None):
        raise _fail("--spec and --out go together (one custom case); give neither to rewrite the corpus")
    start = time.perf_counter()
    if args.spec is not None:
        try:
            spec = load_spec(args.spec)
            check_resources(spec, args.out)
            with console.status(f"generating {args.spec} (forward, backward)"):
                tensors, metadata = generate_case(spec)
            with console.status(f"writing {args.out}"):
                digest = write_case(args.out, tensors, metadata)
        except ValueError as exc:  # ConfigError, CheckpointError, the model's InputError
            raise _fail(str(exc)) from None
        size = args.out.stat().st_size
        loss = f", loss {float(tensors['loss']):.6f}" if "loss" in tensors else ""
        console.print(f"wrote {args.out}: {len(tensors)} tensors, {size:,} bytes{loss}, sha256 {digest[:16]}…, "
                      f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        return 0
    golden_dir = args.dir or default_golden_dir()
    try:
        n_cases = len(read_case_specs(golden_dir))
        progress, task = _progress(console, "generating", n_cases)
        with progress:
            manifest = generate_corpus(golden_dir, progress=lambda name: progress.advance(task), force=args.force)
    except ValueError as exc:  # ConfigError, CheckpointError, the model's InputError
        raise _fail(str(exc)) from None
    console.print(f"wrote {manifest['case_count']} cases, {manifest['total_bytes']:,} bytes, to {golden_dir} "
                  f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def fixture_bytes(spec: dict) -> int:
    """The size of the fixture a (filled) spec gives, from its layout alone (nothing is allocated)."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in fixture_layout(spec).values())


def generation_bytes(spec: dict) -> int:
    """A generous estimate of the memory ``generate_case`` + ``write_case`` need: the fixture's tensors three
    times (the tensors, their bytes, the file's bytes) plus the forward pass's saved activations, the
    attention scores and the logits' softmax and gradient."""
    gpt2 = spec["gpt2"]
    b, t, c, h = spec["batch_size"], spec["seq_len"], gpt2["n_embd"], gpt2["n_head"]
    inner = gpt2.get("n_inner") or 4 * c
    item = np.dtype(spec["dtype"]).itemsize
    per_layer = b * t * (12 * c + 3 * inner) + 4 * b * h * t * t
    activations = item * (gpt2["n_layer"] * per_layer + 4 * b * t * gpt2["vocab_size"])
    return 3 * fixture_bytes(spec) + 2 * activations


def check_resources(spec: dict, out) -> None:
    """Refuse a spec too large for this machine's memory, or its fixture too large for the disk, up front."""
    size = fixture_bytes(spec)
    check_memory(generation_bytes(spec), f"this spec (a {size:,}-byte fixture)")
    check_disk(out, size, f"this spec's fixture ({size:,} bytes)")


def _progress(console, verb: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(f"{verb} cases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)  # fmt: skip
    return progress, progress.add_task(verb, total=total)


def _run_verify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tolerance = ", ".join(f"{d} rtol {r:.0e}" for d, r in RTOL.items())
    console.print(
        f"tolerance: inputs bit-exact; outputs max|new − stored| ≤ rtol · max|stored| per tensor ({tolerance})"
    )
    if args.fixtures:
        cases = [verify_fixture(path) for path in args.fixtures]
        problems: list[str] = []
        ok = all(c.ok for c in cases)
    else:
        golden_dir = args.dir or default_golden_dir()
        try:
            total = read_manifest(golden_dir)["case_count"]
        except GoldenError as exc:
            raise _fail(str(exc)) from None
        progress, task = _progress(console, "verifying", total)
        with progress:
            report = verify_corpus(golden_dir, progress=lambda case: progress.advance(task))
        cases, problems, ok = report.cases, report.problems, report.ok
    table = Table(title="golden fixtures (worst: the largest output error, max|new − stored| / max|stored|)")
    table.add_column("case", no_wrap=True, min_width=12)
    table.add_column("dtype", no_wrap=True, min_width=7)
    table.add_column("tensors", justify="right", no_wrap=True, min_width=7)
    table.add_column("status", no_wrap=True, min_width=6)
    table.add_column("worst", justify="right", no_wrap=True, min_width=7)
    table.add_column("in (base_model.model. omitted)", overflow="ellipsis", no_wrap=True, max_width=44)
    for case in cases:
        status = "[green]ok[/]" if case.ok else f"[red]FAIL ({len(case.problems)})[/]"
        where = case.worst_tensor.replace(ADAPTER_PREFIX, "")
        table.add_row(case.name, case.dtype, str(case.n_tensors), status, f"{case.worst_error:.1e}", where)
    console.print(table)
    for case in cases:
        for problem in case.problems:
            console.print(f"[red]case {case.name}[/]: {problem}", highlight=False)
    for problem in problems:
        console.print(f"[red]corpus[/]: {problem}", highlight=False)
    if not args.fixtures:
        console.print(f"{len(cases)} of {report.expected_cases} cases, {report.total_bytes:,} bytes, "
                      f"{report.seconds:.1f} s")  # fmt: skip
    for dtype in DTYPES:
        worst = max((c for c in cases if c.dtype == dtype), key=lambda c: c.worst_error, default=None)
        if worst is not None:
            console.print(f"worst {dtype} output error: {worst.worst_error:.2e} (rtol {RTOL[dtype]:.0e}) in "
                          f"{worst.name}: {worst.worst_tensor}", highlight=False)  # fmt: skip
    if not args.fixtures and args.dir is None:  # the committed corpus: its trajectories too (reflora.golden.trajectory)
        trajectories = verify_trajectory_corpus()
        for name, problems_of_case in trajectories.items():
            for problem in problems_of_case:
                console.print(f"[red]trajectory {name}[/]: {problem}", highlight=False)
        bad = sum(1 for p in trajectories.values() if p)
        console.print(f"trajectories: {len(trajectories) - bad} of {len(trajectories)} ok (golden/trajectories)")
        ok = ok and bad == 0
    console.print("[green]verify: ok[/]" if ok else "[red]verify: FAILED[/]")
    return 0 if ok else 1
