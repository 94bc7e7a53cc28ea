"""``reflora trajectory``: generate and verify the golden trajectories (``reflora.golden.trajectory``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from reflora.checkpoint import CheckpointError
from reflora.config import ConfigError
from reflora.golden.trajectory import generate_trajectory_corpus, verify_trajectory_corpus


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trajectory",
        help="generate and verify the golden trajectories (a few AdamW steps of LoRA training)",
        description="Golden trajectories: golden cases plus a few optimizer steps (reflora.golden.trajectory). The committed "
        "cases are golden/trajectories/.",
    )
    sub = p.add_subparsers(dest="trajectory_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="rewrite golden/trajectories/ from its cases/*.json")
    gen.add_argument("--dir", type=Path, default=None, help="the trajectory folder (default golden/trajectories)")
    gen.set_defaults(func=_run_generate)
    ver = sub.add_parser("verify", help="regenerate every committed trajectory in memory and compare")
    ver.add_argument("--dir", type=Path, default=None, help="the trajectory folder (default golden/trajectories)")
    ver.set_defaults(func=_run_verify)


def _run_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        manifest = generate_trajectory_corpus(args.dir)
    except (ConfigError, CheckpointError) as exc:
        raise SystemExit(f"reflora trajectory: error: {exc}") from None
    print(f"wrote {manifest['case_count']} trajectory cases, {manifest['total_bytes']:,} bytes, "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify_trajectory_corpus(args.dir)
    except (ConfigError, CheckpointError) as exc:
        raise SystemExit(f"reflora trajectory: error: {exc}") from None
    for name, problems in report.items():
        print(f"{name}: {'ok' if not problems else 'FAIL'}")
        for problem in problems:
            print(f"  {problem}")
    ok = all(not p for p in report.values())
    print("verify: ok" if ok else "verify: FAILED")
    return 0 if ok else 1
