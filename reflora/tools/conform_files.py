"""``reflora conform --candidate-cmd TEMPLATE`` / ``--consumer NAME``: the adapter-file level (conformance.files).

Runs every ``file.*`` feature (``-k`` keeps those whose id contains the text) with ``--max-examples`` draws each
(default 3), prints one line per feature and a summary, and writes ``--report-json`` (format
``reflora-consumer/1``, documented in docs/conformance.md, "Adapter-file consumers"; ``reflora matrix`` renders it).
``--consumer NAME --isolated`` re-runs the command inside the consumer's own venv (conformance.envs.CONSUMERS);
a consumer with no group runs in the current environment. Exit status: 0 when no feature failed or errored (known
deviations and "not supported" do not fail), 1 otherwise, 2 on a usage error or a consumer that cannot run here
(``not_ready``: e.g. llama_cpp without its ``llama`` venv).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

OUTCOME_MARK = {"passed": "PASS", "failed": "FAIL", "known_deviation": "KNOWN", "not_supported": "n/s",
                "error": "ERROR"}  # fmt: skip
REPORT_FORMAT = "reflora-consumer/1"
CHECKED = ("passed", "failed", "known_deviation")  # a checked cell: the consumer ran and was compared


def isolated_argv(args: argparse.Namespace) -> list[str]:
    """``args`` as a ``reflora conform --consumer`` command line again, without ``--isolated``."""
    argv = ["--consumer", args.consumer]
    for flag, value in (("--max-examples", args.max_examples), ("-k", args.keyword), ("--timeout", args.timeout),
                        ("--deviations", args.deviations), ("--report-json", args.report_json)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    return argv


def build_report(consumer, outcomes, examples: int, keyword: str | None, deviations, seconds: float) -> dict:
    """The ``reflora-consumer/1`` report: what ``reflora matrix`` needs to render a consumer column.

    ``consumer``: name, versions and its ``notes`` (per-feature reasons and consumer-wide remarks, e.g. a
    translation or a workaround); ``results``: one entry per feature (``outcome``, ``examples``, ``worst_ratio``,
    ``detail``; ``reason`` for "not supported" and known deviations); ``deviations``: the consumer's known
    deviations (id, reason); ``summary``: counts per outcome and ``checked`` (pass + FAIL + known deviation)."""
    from conformance.files import FILE_FEATURE_IDS
    from reflora import __version__

    notes = dict(getattr(consumer, "notes", {}))
    results = []
    for o in outcomes:
        entry = {**o.to_json(), "title": FILE_FEATURE_IDS[o.feature].title}
        if o.outcome in ("not_supported", "known_deviation"):
            entry["reason"] = o.detail or notes.get(o.feature, "")
        results.append(entry)
    counts = {k: sum(o.outcome == k for o in outcomes) for k in OUTCOME_MARK}
    versions = consumer.versions()
    return {
        "format": REPORT_FORMAT,
        "level": "file",
        "candidate": consumer.name,
        "versions": versions,
        "consumer": {"name": consumer.name, "versions": versions, "notes": notes},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reflora": {"version": __version__},
        "settings": {"examples": examples, "keyword": keyword},
        "results": results,
        "deviations": [{"id": d.id, "reason": d.reason} for d in deviations],
        "summary": {
            "features": len(outcomes),
            **counts,
            "checked": sum(counts[k] for k in CHECKED),
            "runtime_s": round(seconds, 1),
        },
    }


def not_ready(consumer, keyword: str | None = None) -> str | None:
    """Why ``consumer`` cannot run the ``file.*`` features selected by ``keyword`` here (its optional
    ``not_ready(features)``: a venv that must be built first, e.g. llama_cpp's), or None. Such a consumer is not
    run at all: ``reflora conform`` exits 2 with the reason, ``reflora matrix`` skips it and keeps its stored
    report; it never turns into "not supported" cells, which name what the consumer's program lacks."""
    from conformance.files import FILE_FEATURE_IDS

    check = getattr(consumer, "not_ready", None)
    if check is None:
        return None
    return check([f for f in FILE_FEATURE_IDS if keyword is None or keyword in f])


def run_files(args: argparse.Namespace) -> int:
    from conformance.consumers import load_consumer
    from conformance.consumers.command import CommandConsumer
    from conformance.deviations import load_deviations
    from conformance.files import consumer_deviations, run_file_features

    if args.candidate_cmd and args.consumer:
        print("reflora conform: give --candidate-cmd or --consumer, not both", file=sys.stderr)
        return 2
    if getattr(args, "isolated", False) and args.consumer:
        from conformance.envs import EnvError, consumer_group, run_in_env

        group = consumer_group(args.consumer)
        if group is not None:
            try:
                return run_in_env(group, ["reflora", "conform", *isolated_argv(args)])
            except EnvError as exc:
                print(f"reflora conform: {exc}", file=sys.stderr)
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
    why = not_ready(consumer, args.keyword)
    if why is not None:
        print(f"reflora conform: {consumer.name} cannot run on this machine: {why}", file=sys.stderr)
        return 2
    examples = args.max_examples or 3
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reflora-files-") as workdir:
        outcomes = run_file_features(consumer, Path(workdir), examples, args.keyword, deviations)
    seconds = time.perf_counter() - start
    versions = consumer.versions()
    shown = ", ".join(dict.fromkeys(versions.values()))
    print(f"candidate: {consumer.name} ({shown}), adapter-file level, {examples} draws each")
    for o in outcomes:
        line = f"  {OUTCOME_MARK[o.outcome]:<6} {o.feature:<24} {o.examples} examples"
        print(line + (f"  {o.detail.splitlines()[0][:300]}" if o.detail else ""))
    counts = {k: sum(o.outcome == k for o in outcomes) for k in OUTCOME_MARK}
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    if args.consumer and any(o.detail.startswith("ModuleNotFoundError") for o in outcomes):
        from conformance.envs import consumer_group

        group = consumer_group(args.consumer)
        if group is not None:
            print(f"reflora conform: {args.consumer} needs its libraries: add --isolated (runs it in the {group!r} "
                  "venv, conformance.envs)", file=sys.stderr)  # fmt: skip
    if args.report_json:
        from reflora.checkpoint import atomic_write_bytes

        report = build_report(consumer, outcomes, examples, args.keyword, deviations, seconds)
        atomic_write_bytes(Path(args.report_json), (json.dumps(report, indent=1) + "\n").encode())
    return 1 if counts["failed"] or counts["error"] else 0
