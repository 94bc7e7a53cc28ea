"""``reflora conform --candidate-cmd TEMPLATE`` / ``--consumer NAME``: the adapter-file level (conformance.files).

Runs every ``file.*`` feature (``-k`` keeps those whose id contains the text) with ``--max-examples`` draws each
(default 3), prints one line per feature and a summary, and writes ``--report-json``. Exit status: 0 when no
feature failed or errored (known deviations and "not supported" do not fail), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

OUTCOME_MARK = {"passed": "PASS", "failed": "FAIL", "known_deviation": "KNOWN", "not_supported": "n/s",
                "error": "ERROR"}  # fmt: skip


def run_files(args: argparse.Namespace) -> int:
    from conformance.consumers import load_consumer
    from conformance.consumers.command import CommandConsumer
    from conformance.deviations import load_deviations
    from conformance.files import consumer_deviations, run_file_features

    if args.candidate_cmd and args.consumer:
        print("reflora conform: give --candidate-cmd or --consumer, not both", file=sys.stderr)
        return 2
    try:
        if args.candidate_cmd:
            consumer = CommandConsumer(args.candidate_cmd, timeout=args.timeout or 60.0, merge=args.cmd_merge)
        else:
            consumer = load_consumer(args.consumer)
        deviations = load_deviations(args.deviations) if args.deviations else consumer_deviations(consumer)
    except ValueError as exc:
        print(f"reflora conform: {exc}", file=sys.stderr)
        return 2
    examples = args.max_examples or 3
    with tempfile.TemporaryDirectory(prefix="reflora-files-") as workdir:
        outcomes = run_file_features(consumer, Path(workdir), examples, args.keyword, deviations)
    versions = consumer.versions()
    shown = ", ".join(dict.fromkeys(versions.values()))
    print(f"candidate: {consumer.name} ({shown}), adapter-file level, {examples} draws each")
    for o in outcomes:
        line = f"  {OUTCOME_MARK[o.outcome]:<6} {o.feature:<24} {o.examples} examples"
        print(line + (f"  {o.detail.splitlines()[0][:300]}" if o.detail else ""))
    counts = {k: sum(o.outcome == k for o in outcomes) for k in OUTCOME_MARK}
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    if args.report_json:
        report = {"candidate": consumer.name, "level": "file", "versions": versions,
                  "results": [o.to_json() for o in outcomes]}  # fmt: skip
        Path(args.report_json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if counts["failed"] or counts["error"] else 0
