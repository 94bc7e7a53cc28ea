"""``reflora matrix``: every candidate library through the conformance suite, side by side.

    reflora matrix                                   # every shipped driver, ci profile -> docs/
    reflora matrix --candidates peft,loralib,mlx-lm  # a subset (names or aliases)
    reflora matrix --render-only                     # re-render docs/ from the stored JSON reports
    reflora matrix --consumers mlx_lm_fuse           # adapter-file consumers only (conformance.consumers)

Each candidate runs ``reflora conform --candidate NAME --profile ci --report-json ...`` in its own process
(``python -m reflora.tools``, the console script, with this interpreter):
peft and reference in the current environment, every other one with ``--isolated`` (its group's virtual
environment, built once by ``conformance.envs``). The JSON reports (format ``reflora-conformance/1``) are kept
in the reports folder (default ``docs/conformance-reports/<driver>.json``), next to ``index.json`` (exit codes
and seconds per candidate), and rendered into

* ``docs/conformance-matrix.md``: features as rows, candidates as columns, each cell pass / FAIL / known
  deviation / not supported, then the versions, dates and scores, and the reason of every failure and deviation;
* ``docs/img/conformance-matrix.png``: the same matrix as a heatmap (matplotlib, imported lazily).

The adapter-file consumers (conformance.consumers.SHIPPED: programs that load a PEFT adapter folder) run too:
``reflora conform --consumer NAME --report-json ...`` (``--isolated`` when conformance.envs.CONSUMERS gives the
consumer a venv group), their reports (format ``reflora-consumer/1``) in the ``consumers/`` subfolder of the
reports folder (``docs/conformance-reports/consumers/<consumer>.json``: a subfolder, so a consumer name can never
clash with a driver name, and a renderer that predates consumers never reads them), rendered as a second table
(``file.*`` features as rows, consumers as columns) and ``docs/img/conformance-consumers.png``. Selection: with
neither ``--candidates`` nor ``--consumers`` every driver and every consumer runs; with one of them, only what it
names. A consumer that cannot run on this machine (``consumer_not_ready``: llama_cpp without the ``llama`` venv,
which is built only by ``python -m conformance.envs build llama``) is not run at all: a printed line says why, and
its stored report and index entry stay as they are (named in ``--consumers``, it makes the exit status 1). A
reports folder without ``consumers/`` renders exactly as before.

The committed matrix is generated, never edited by hand: tests/test_matrix.py checks it renders exactly from the
committed reports and agrees with the drivers' declared capabilities.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reflora.checkpoint import atomic_write_bytes

REPO = Path(__file__).resolve().parents[2]  # reflora/tools/matrix.py -> the checkout
CONSOLE_MODULE = "reflora.tools"  # ``python -m reflora.tools`` is the ``reflora`` console script
DEFAULT_DOCS = REPO / "docs"
MATRIX_FILE = "conformance-matrix.md"
IMAGE_FILE = Path("img") / "conformance-matrix.png"
REPORTS_DIR = "conformance-reports"
INDEX_FILE = "index.json"
CONSUMERS_DIR = "consumers"  # <reports>/consumers/<consumer>.json
CONSUMER_IMAGE_FILE = Path("img") / "conformance-consumers.png"
IN_CURRENT_ENV = ("reference", "peft")  # run without --isolated: the default environment has what they need
FIRST = ("reference", "peft")  # column order: these first, then the others alphabetically

LABEL = {"pass": "pass", "fail": "**FAIL**", "known_deviation": "known deviation", "not_supported": "not supported",
         "skipped": "skipped", "error": "**ERROR**", None: "no result"}  # fmt: skip
SHORT = {"pass": "pass", "fail": "FAIL", "known_deviation": "deviation", "not_supported": "n/s", "skipped": "skip",
         "error": "ERROR", None: "?"}  # fmt: skip
COLOUR = {"pass": "#4caf50", "fail": "#e53935", "known_deviation": "#ffb300", "not_supported": "#e0e0e0",
          "skipped": "#bdbdbd", "error": "#8e24aa", None: "#ffffff"}  # fmt: skip
# a consumer report's outcome -> the matrix's cell kind
CONSUMER_RESULT = {"passed": "pass", "failed": "fail", "known_deviation": "known_deviation",
                   "not_supported": "not_supported", "error": "error"}  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "matrix",
        help="run every candidate library through the conformance suite and write the conformance matrix",
        description="Run the conformance suite (ci profile) against every shipped candidate, each in its own "
        "environment, and the adapter-file consumers, and write docs/conformance-matrix.md, its PNGs and the JSON reports.",
    )
    p.add_argument(
        "--candidates",
        metavar="A,B,...",
        help="comma-separated candidates (default: every shipped one; with --consumers alone, none)",
    )
    p.add_argument("--consumers", metavar="A,B,...",
                   help="comma-separated adapter-file consumers (default: every shipped one; with --candidates "
                   "alone, none)")  # fmt: skip
    p.add_argument("--profile", choices=["ci", "dev", "thorough"], default="ci", help="suite profile (default ci)")
    p.add_argument("--max-examples", type=int, metavar="N", help="examples per feature, overriding the profile")
    p.add_argument("--docs-dir", metavar="DIR", default=str(DEFAULT_DOCS),
                   help="where conformance-matrix.md and img/conformance-matrix.png go (default: docs/)")  # fmt: skip
    p.add_argument("--reports-dir", metavar="DIR",
                   help="where the JSON reports go (default: <docs-dir>/conformance-reports)")  # fmt: skip
    p.add_argument("--render-only", action="store_true", help="run nothing: re-render from the stored reports")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="candidates run at the same time (default 1; venvs of different groups build in parallel)")  # fmt: skip
    p.add_argument("--no-image", action="store_true", help="skip the PNG heatmap")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------
# running the candidates
# ----------------------------------------------------------------------------------------------


def all_candidates() -> list[str]:
    from conformance.loader import shipped_drivers

    return order(shipped_drivers())


def order(names) -> list[str]:
    return sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))


def parse_candidates(text: str | None) -> list[str]:
    """Driver names for ``--candidates`` (aliases such as ``adapters`` accepted); an unknown name is an error."""
    from conformance.loader import shipped_name

    shipped = all_candidates()
    if not text:
        return shipped
    names = [shipped_name(n.strip()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in shipped]
    if unknown:
        raise ValueError(f"--candidates: unknown {', '.join(unknown)} (shipped: {', '.join(shipped)})")
    return order(dict.fromkeys(names))


def all_consumers() -> list[str]:
    """The shipped adapter-file consumers (conformance.consumers.SHIPPED), in that order."""
    from conformance.consumers import SHIPPED

    return list(SHIPPED)


def parse_consumers(text: str | None) -> list[str]:
    """Consumer names for ``--consumers``; None or "" is every shipped one, an unknown name is an error."""
    shipped = all_consumers()
    if not text:
        return shipped
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in shipped]
    if unknown:
        raise ValueError(f"--consumers: unknown {', '.join(unknown)} (shipped: {', '.join(shipped)})")
    return [n for n in shipped if n in names]


def selection(candidates: str | None, consumers: str | None) -> tuple[list[str], list[str]]:
    """(drivers, consumers) to run: neither option given, every one of both; one given, only what it names."""
    if candidates is None and consumers is None:
        return parse_candidates(None), parse_consumers(None)
    return ([] if candidates is None else parse_candidates(candidates),
            [] if consumers is None else parse_consumers(consumers))  # fmt: skip


def consumer_not_ready(consumer: str) -> str | None:
    """Why the shipped ``consumer`` cannot run on this machine (reflora.tools.conform_files.not_ready over every
    ``file.*`` feature: llama_cpp without its ``llama`` venv, which only ``python -m conformance.envs build llama``
    builds), or None."""
    from conformance.consumers import load_consumer
    from reflora.tools.conform_files import not_ready

    return not_ready(load_consumer(consumer))


def skip_unready(consumers: list[str]) -> dict[str, str]:
    """consumer -> why, for each of ``consumers`` that cannot run here; each gets a printed line. Such a consumer is
    not run at all: its stored report (``consumers/<name>.json``) and index entry are left as they are, so the page
    renders it as before (a fresh reports folder simply has no column for it)."""
    skipped = {}
    for consumer in consumers:
        why = consumer_not_ready(consumer)
        if why is not None:
            skipped[consumer] = why
            print(f"[reflora matrix] consumer {consumer}: not run, {why}; its stored report, if any, is kept and "
                  "rendered as before", file=sys.stderr, flush=True)  # fmt: skip
    return skipped


def consumer_command(consumer: str, report: Path, max_examples: int | None) -> list[str]:
    """``reflora conform --consumer NAME --report-json REPORT`` (``--isolated`` when the consumer has a venv
    group; the adapter-file level has no profile: ``--max-examples``, else conform's default of 3 draws)."""
    from conformance.envs import consumer_group

    command = [sys.executable, "-m", CONSOLE_MODULE, "conform", "--consumer", consumer, "--report-json", str(report)]
    if max_examples is not None:
        command += ["--max-examples", str(max_examples)]
    if consumer_group(consumer) is not None:
        command.append("--isolated")
    return command


def conform_command(candidate: str, report: Path, profile: str, max_examples: int | None) -> list[str]:
    command = [sys.executable, "-m", CONSOLE_MODULE, "conform", "--candidate", candidate, "--profile", profile,
               "--report-json", str(report)]  # fmt: skip
    if max_examples is not None:
        command += ["--max-examples", str(max_examples)]
    if candidate not in IN_CURRENT_ENV:
        command.append("--isolated")
    return command


def build_envs(candidates: list[str], jobs: int, consumers: list[str] = ()) -> dict[str, dict]:
    """Build (or reuse) the venv of every group the isolated ``candidates`` need, ``jobs`` groups at a time
    (before any candidate runs: two candidates of one group must not build its venv at once).
    group -> {"seconds": ..., "error": ... (only when it failed)}."""
    from concurrent.futures import ThreadPoolExecutor

    from conformance.envs import CANDIDATES, consumer_group, ensure_env

    groups = [CANDIDATES[c] for c in candidates if c not in IN_CURRENT_ENV]
    groups = list(dict.fromkeys([*groups, *(g for g in map(consumer_group, consumers) if g is not None)]))

    def build(group: str) -> dict:
        print(f"[reflora matrix] venv {group}: building or reusing", file=sys.stderr, flush=True)
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            ensure_env(group)
        except Exception as exc:  # EnvError, or pip failing: that group's candidates get no report
            entry["error"] = str(exc)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[reflora matrix] venv {group}: {entry['seconds']} s {entry.get('error', '')}", file=sys.stderr,
              flush=True)  # fmt: skip
        return entry

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(groups, pool.map(build, groups)))


def run_candidate(candidate: str, reports_dir: Path, profile: str, max_examples: int | None, log: Path) -> dict:
    """Run one candidate's suite; its index entry: exit code and seconds."""
    report = reports_dir / f"{candidate}.json"
    return run_report(conform_command(candidate, report, profile, max_examples), report, log)


def run_consumer(consumer: str, reports_dir: Path, max_examples: int | None, log: Path) -> dict:
    """Run one consumer's ``file.*`` features into ``<reports_dir>/consumers/<consumer>.json``; its index entry."""
    report = reports_dir / CONSUMERS_DIR / f"{consumer}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    return run_report(consumer_command(consumer, report, max_examples), report, log)


def run_report(command: list[str], report: Path, log: Path) -> dict:
    """Run ``command``, which writes ``report``; the index entry: exit code, seconds, and an error without one."""
    report.unlink(missing_ok=True)  # a stale report must never pass for this run's
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    entry: dict[str, Any] = {"exit_code": code, "run_seconds": round(time.perf_counter() - start, 1)}
    if not report.is_file():
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
        entry["error"] = f"no report (exit code {code}): {tail}"
    return entry


def run_all(
    candidates: list[str],
    reports_dir: Path,
    profile: str,
    max_examples: int | None,
    jobs: int,
    consumers: list[str] = (),
) -> dict:
    """Build the venvs, then run every candidate and every consumer, ``jobs`` at a time; the index
    (``reports_dir/index.json``: ``candidates`` and ``consumers`` entries, each kept from earlier runs when not
    run again)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from conformance.envs import CANDIDATES, consumer_group

    reports_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="reflora-matrix-logs-"))  # not next to the reports: those get committed
    started = time.perf_counter()
    envs = build_envs(candidates, jobs, consumers)

    def one(candidate: str) -> dict:
        group = None if candidate in IN_CURRENT_ENV else CANDIDATES[candidate]
        if group is not None and "error" in envs[group]:
            return {"exit_code": None, "run_seconds": 0.0, "env": group, "error": f"venv: {envs[group]['error']}"}
        log = log_dir / f"{candidate}.log"
        print(f"[reflora matrix] {candidate}: running (log {log})", file=sys.stderr, flush=True)
        entry = {"env": group or "current", **run_candidate(candidate, reports_dir, profile, max_examples, log)}
        print(f"[reflora matrix] {candidate}: exit {entry['exit_code']}, {entry['run_seconds']} s"
              + (f" ({entry['error']})" if "error" in entry else ""), file=sys.stderr, flush=True)  # fmt: skip
        return entry

    def one_consumer(consumer: str) -> dict:
        group = consumer_group(consumer)
        if group is not None and "error" in envs[group]:
            return {"exit_code": None, "run_seconds": 0.0, "env": group, "error": f"venv: {envs[group]['error']}"}
        log = log_dir / f"consumer.{consumer}.log"
        print(f"[reflora matrix] consumer {consumer}: running (log {log})", file=sys.stderr, flush=True)
        entry = {"env": group or "current", **run_consumer(consumer, reports_dir, max_examples, log)}
        print(f"[reflora matrix] consumer {consumer}: exit {entry['exit_code']}, {entry['run_seconds']} s"
              + (f" ({entry['error']})" if "error" in entry else ""), file=sys.stderr, flush=True)  # fmt: skip
        return entry

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # consumers queued with the drivers: no idle tail
        driver_runs = [pool.submit(one, c) for c in candidates]
        consumer_runs = [pool.submit(one_consumer, c) for c in consumers]
        entries = {c: run.result() for c, run in zip(candidates, driver_runs)}
        consumer_entries = {c: run.result() for c, run in zip(consumers, consumer_runs)}
    index = {"profile": profile, "max_examples": max_examples, "jobs": jobs,
             "total_seconds": round(time.perf_counter() - started, 1), "envs": envs, "candidates": entries}  # fmt: skip
    if consumer_entries:
        index["consumers"] = consumer_entries
    previous = read_index(reports_dir)
    if previous is not None:  # a subset run keeps the other candidates' entries
        index["envs"] = {**previous.get("envs", {}), **envs}
        index["candidates"] = {**previous.get("candidates", {}), **entries}
        if consumer_entries or "consumers" in previous:
            index["consumers"] = {**previous.get("consumers", {}), **consumer_entries}
    atomic_write_bytes(reports_dir / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())
    return index


def read_index(reports_dir: Path) -> dict | None:
    try:
        return json.loads((reports_dir / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# reading the reports
# ----------------------------------------------------------------------------------------------


def load_reports(reports_dir: Path) -> dict[str, dict]:
    """driver name -> its JSON report, for every ``<driver>.json`` in the folder (index.json aside)."""
    from conformance.report import FORMAT

    reports = {}
    for path in sorted(Path(reports_dir).glob("*.json")):
        if path.name == INDEX_FILE:
            continue
        report = json.loads(path.read_text())
        if report.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} report (format {report.get('format')!r})")
        reports[path.stem] = report
    return {name: reports[name] for name in order(reports)}


def cells(reports: dict[str, dict]) -> dict[str, dict[str, dict | None]]:
    """feature id -> candidate -> the report's feature entry (None: the report has no such feature).

    Rows: every feature some report has, in ``conformance.features`` order; an id that is no longer a feature
    comes last (tests/test_matrix.py flags it: the matrix is stale)."""
    from conformance.features import FEATURES

    by_candidate = {name: {f["id"]: f for f in r["features"]} for name, r in reports.items()}
    reported = {f for table in by_candidate.values() for f in table}
    feature_ids = [f for f in FEATURES if f in reported] + sorted(reported - set(FEATURES))
    return {fid: {name: table.get(fid) for name, table in by_candidate.items()} for fid in dict.fromkeys(feature_ids)}


def result_of(entry: dict | None) -> str | None:
    return None if entry is None else entry["result"]


def load_consumer_reports(reports_dir: Path) -> dict[str, dict]:
    """consumer name -> its ``reflora-consumer/1`` report, for every ``<reports_dir>/consumers/<name>.json``
    (none when the folder has no ``consumers/``: a reports folder from before consumers). Column order: the
    shipped consumers' order, then any other alphabetically. A report of the earlier, unversioned consumer JSON
    (``"level": "file"`` and ``results``, no ``format``) is read as well; anything else is an error."""
    from reflora.tools.conform_files import REPORT_FORMAT

    reports = {}
    for path in sorted((Path(reports_dir) / CONSUMERS_DIR).glob("*.json")):
        report = json.loads(path.read_text())
        legacy = report.get("format") is None and report.get("level") == "file" and "results" in report
        if report.get("format") != REPORT_FORMAT and not legacy:
            raise ValueError(f"{path}: not a {REPORT_FORMAT} report (format {report.get('format')!r})")
        reports[path.stem] = report
    shipped = all_consumers()
    return {
        n: reports[n] for n in sorted(reports, key=lambda n: (shipped.index(n) if n in shipped else len(shipped), n))
    }


def consumer_cells(consumers: dict[str, dict]) -> dict[str, dict[str, dict | None]]:
    """``file.*`` feature id -> consumer -> its report entry (None: not in that report); rows in
    conformance.files.FILE_FEATURES order, ids no longer features last."""
    from conformance.files import FILE_FEATURE_IDS

    by_consumer = {name: {e["feature"]: e for e in r["results"]} for name, r in consumers.items()}
    reported = {f for table in by_consumer.values() for f in table}
    ids = [f for f in FILE_FEATURE_IDS if f in reported] + sorted(reported - set(FILE_FEATURE_IDS))
    return {fid: {name: table.get(fid) for name, table in by_consumer.items()} for fid in ids}


def consumer_result(entry: dict | None) -> str | None:
    """A consumer report entry's cell kind (``pass``, ``fail``, ``known_deviation``, ``not_supported``, ``error``)."""
    return None if entry is None else CONSUMER_RESULT[entry["outcome"]]


def checked_cells(report: dict) -> dict[str, int]:
    """A consumer report's cells by kind, and ``checked`` (pass + FAIL + known deviation: the consumer ran and its
    results were compared)."""
    counts = {k: 0 for k in CONSUMER_RESULT.values()}
    for entry in report["results"]:
        counts[consumer_result(entry)] += 1
    counts["checked"] = counts["pass"] + counts["fail"] + counts["known_deviation"]
    return counts


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _versions(report: dict) -> str:
    versions = report["candidate"]["versions"]  # {"candidate": "peft 0.21.2", "transformers": "5.24.0", ...}
    named = [v if k in ("candidate", "framework") or v.startswith(k) else f"{k} {v}" for k, v in versions.items()]
    return ", ".join(named)


def _one_line(text: str | None, most: int = 300) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= most else text[: most - 1] + "…"


def render_markdown(
    reports: dict[str, dict], index: dict | None = None, consumers: dict[str, dict] | None = None
) -> str:
    """The matrix page. Deterministic in the reports (and index): re-rendering gives the same bytes. Without
    ``consumers`` the page is the drivers' matrix alone (as before consumers existed); with them, the adapter-file
    consumers' table follows (``render_consumers``)."""
    if not reports:  # consumers only
        lines = ["# Conformance matrix", "", "<!-- generated by `reflora matrix` from docs/conformance-reports/"
                 "consumers/*.json; do not edit by hand (re-render with `reflora matrix --render-only`) -->"]  # fmt: skip
        return "\n".join(lines + render_consumers(consumers or {}, index)) + "\n"
    page = render_drivers(reports, index)
    return page if not consumers else page + "\n".join(render_consumers(consumers, index)) + "\n"


def render_drivers(reports: dict[str, dict], index: dict | None = None) -> str:
    """The drivers' matrix: features x candidates, the candidates' table, failures and known deviations."""
    from conformance.features import FEATURES

    names = list(reports)
    table = cells(reports)
    created = sorted(r["created"] for r in reports.values())
    profiles = sorted({r["settings"]["profile"] for r in reports.values()})
    reflora_versions = sorted({r["reflora"]["version"] for r in reports.values()})
    lines = [
        "# Conformance matrix",
        "",
        "<!-- generated by `reflora matrix` from docs/conformance-reports/*.json; do not edit by hand "
        "(re-render with `reflora matrix --render-only`) -->",
        "",
        "Every candidate LoRA library run through the conformance suite (docs/conformance.md) against reflora "
        f"{', '.join(reflora_versions)}, profile `{'`, `'.join(profiles)}`, "
        f"runs from {created[0][:10]} to {created[-1][:10]} (UTC). "
        "A cell is **pass**, **FAIL** (an unknown disagreement with the reference), **known deviation** (a "
        "documented difference, see docs/findings.md and the reasons below) or **not supported** (the library "
        "lacks the capability; the driver declares it). Reproduce one column with "
        "`reflora conform --candidate NAME --isolated --profile ci`.",
        "",
        "![conformance matrix](img/conformance-matrix.png)",
        "",
        "| feature | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for fid, row in table.items():
        lines.append(f"| `{fid}` | " + " | ".join(LABEL[result_of(row[n])] for n in names) + " |")
    lines += ["", "## Candidates", "", "| candidate | versions | run (UTC) | score | supported score | suite time |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, report in reports.items():
        s = report["summary"]
        lines.append(
            f"| {name} | {_one_line(_versions(report))} | {report['created']} | {100 * s['score']:.0f}% "
            f"({s['features_pass']}/{s['features'] - s['features_skipped']}) | {100 * s['supported_score']:.0f}% | "
            f"{s['runtime_s']:.0f} s |"
        )
    failed = [] if index is None else [(n, e) for n, e in index.get("candidates", {}).items() if n not in reports]
    for name, entry in failed:
        lines.append(f"| {name} | no report: {_one_line(entry.get('error'), 200)} | | | | |")
    lines += ["", "## Failures and known deviations", ""]
    notes = 0
    for fid, row in table.items():
        for name in names:
            entry = row[name]
            if entry is None or entry["result"] not in ("fail", "known_deviation"):
                continue
            notes += 1
            what = "FAIL" if entry["result"] == "fail" else "known deviation"
            worst = entry.get("worst")
            error = f" Worst: {worst['error']:.1e} ({worst['ratio']:.2g}× bound, {worst['dtype']})." if worst else ""
            reason = _one_line(entry.get("reason") or _first_message(reports[name], fid))
            lines.append(f"* **{name}**, `{fid}`, {what}: {reason}{error}")
    if not notes:
        lines.append("None.")
    partial = [(name, t) for name, r in reports.items() for t in r["tests"]
               if t["outcome"] == "passed" and (t.get("reason") or "").startswith("the driver refused")]  # fmt: skip
    if partial:
        lines += ["", "## Partly expressible features", "",
                  "These passed on the drawn cases the library can express; the driver refused the others (the "
                  "suite then draws another case):", ""]  # fmt: skip
        lines += [f"* **{name}**, `{t['id']}`: {_one_line(t['reason'])}" for name, t in partial]
    lines += ["", "Feature descriptions:", ""]
    lines += [f"* `{fid}`: {FEATURES[fid].title}" for fid in table if fid in FEATURES]
    return "\n".join(lines) + "\n"


def _consumer_versions(report: dict) -> str:
    versions = report.get("versions") or report.get("consumer", {}).get("versions", {})
    named = [v if k in ("candidate", "framework") or v.startswith(k) else f"{k} {v}" for k, v in versions.items()]
    return ", ".join(dict.fromkeys(named))


def render_consumers(consumers: dict[str, dict], index: dict | None = None) -> list[str]:
    """The adapter-file consumers' section (lines): ``file.*`` features x consumers, the consumers' table
    (versions, run date, checked cells by kind), every FAIL / error / known deviation and "not supported" cell with
    its reason, and each consumer's remarks (its ``notes`` that are not a feature: a translation, a workaround)."""
    from conformance.files import FILE_FEATURE_IDS

    names = list(consumers)
    table = consumer_cells(consumers)
    lines = ["", "## Adapter-file consumers", "",
             "Programs that load a PEFT adapter folder: each `file.*` feature draws a HF GPT-2 folder and a PEFT "
             "adapter folder written by reflora (conformance/files.py, docs/conformance.md \"Adapter-file "
             "consumers\"); the consumer returns logits, and merged logits and weights where it merges. A cell is "
             "**pass**, **FAIL**, **known deviation**, **not supported** (the reason is listed below) or **ERROR** "
             "(the consumer raised or crashed). Reports: "
             "docs/conformance-reports/consumers/<consumer>.json; reproduce one column with "
             "`reflora conform --consumer NAME --isolated`.", "",
             "![adapter-file consumers](img/conformance-consumers.png)", "",
             "| feature | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for fid, row in table.items():
        lines.append(f"| `{fid}` | " + " | ".join(LABEL[consumer_result(row[n])] for n in names) + " |")
    lines += ["", "### Consumers", "",
              "| consumer | versions | run (UTC) | checked cells | pass | known deviation | FAIL | ERROR | not supported |"
              " suite time |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, report in consumers.items():
        c = checked_cells(report)
        seconds = report.get("summary", {}).get("runtime_s")
        lines.append(f"| {name} | {_one_line(_consumer_versions(report))} | {report.get('created', '')} | "
                     f"{c['checked']}/{len(report['results'])} | {c['pass']} | {c['known_deviation']} | {c['fail']} | "
                     f"{c['error']} | {c['not_supported']} | {'' if seconds is None else f'{seconds:.0f} s'} |")  # fmt: skip
    missing = [] if index is None else [(n, e) for n, e in index.get("consumers", {}).items() if n not in consumers]
    for name, entry in missing:
        lines.append(f"| {name} | no report: {_one_line(entry.get('error'), 200)} | | | | | | | | |")
    for title, kinds in (("Failures, errors and known deviations", ("fail", "error", "known_deviation")),
                         ("Not supported", ("not_supported",))):  # fmt: skip
        lines += ["", f"### {title}", ""]
        shown = 0
        for fid, row in table.items():
            for name in names:
                entry = row[name]
                if consumer_result(entry) not in kinds:
                    continue
                shown += 1
                reason = entry.get("reason") or entry.get("detail") or ""
                lines.append(f"* **{name}**, `{fid}`, {LABEL[consumer_result(entry)].strip('*')}: {_one_line(reason)}")
        if not shown:
            lines.append("None.")
    remarks = [(name, key, text) for name, r in consumers.items()
               for key, text in sorted(r.get("consumer", {}).get("notes", {}).items()) if key not in table]  # fmt: skip
    if remarks:
        lines += ["", "### Consumer remarks", ""]
        lines += [f"* **{name}** ({key}): {_one_line(text, 400)}" for name, key, text in remarks]
    lines += ["", "Adapter-file feature descriptions:", ""]
    lines += [f"* `{fid}`: {FILE_FEATURE_IDS[fid].title}" for fid in table if fid in FILE_FEATURE_IDS]
    return lines


def _first_message(report: dict, feature_id: str) -> str:
    for test in report["tests"]:
        if test["feature"] == feature_id and test.get("message"):
            first = next((line for line in test["message"].splitlines() if line.strip()), "")
            return first
    return ""


def render_image(reports: dict[str, dict], path: Path) -> None:
    """The matrix as a heatmap: one coloured, labelled cell per feature and candidate."""
    table = cells(reports)
    results = [[result_of(table[f][n]) for n in reports] for f in table]
    created = sorted(r["created"][:10] for r in reports.values())
    caption = f"reflora conformance matrix, ci profile, runs {created[0]} to {created[-1]} (docs/conformance-matrix.md)"
    heatmap(list(reports), list(table), results, caption, path)


def render_consumer_image(consumers: dict[str, dict], path: Path) -> None:
    """The adapter-file consumers' table as a heatmap (``file.*`` features x consumers)."""
    table = consumer_cells(consumers)
    results = [[consumer_result(table[f][n]) for n in consumers] for f in table]
    created = sorted(r.get("created", "")[:10] for r in consumers.values())
    caption = f"reflora adapter-file consumers, runs {created[0]} to {created[-1]} (docs/conformance-matrix.md)"
    heatmap(list(consumers), list(table), results, caption, path)


def heatmap(names: list[str], features: list[str], results: list[list[str | None]], caption: str, path: Path) -> None:
    """A heatmap PNG: ``results[i][j]`` (a ``COLOUR`` kind) for feature i and column j, labelled, with a legend of
    the kinds shown and ``caption``; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    kinds = list(COLOUR)
    grid = [[kinds.index(result) for result in row] for row in results]  # (features, candidates)
    width, height = max(9.0, 3.2 + 1.05 * len(names)), 1.6 + 0.32 * len(features)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.imshow(grid, cmap=ListedColormap([COLOUR[k] for k in kinds]), vmin=0, vmax=len(kinds) - 1, aspect="auto")
    for i, row in enumerate(results):
        for j, result in enumerate(row):
            ax.text(j, i, SHORT[result], ha="center", va="center", fontsize=8,
                    color="white" if result in ("fail", "error") else "black")  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(len(features)), features, fontsize=8)
    ax.xaxis.tick_top()
    plt.setp(ax.get_xticklabels(), rotation=35, ha="left")
    ax.set_xticks([x - 0.5 for x in range(1, len(names))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(features))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    shown = [k for k in COLOUR if any(k in row for row in results)]
    handles = [Patch(facecolor=COLOUR[k], edgecolor="grey", label=LABEL[k].strip("*")) for k in shown]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(shown), fontsize=8,
              frameon=False, title=caption, title_fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # never a partial image


def write_outputs(reports_dir: Path, docs_dir: Path, image: bool = True) -> Path:
    """Render the page (and the PNGs) from the reports folder: drivers' ``*.json`` and ``consumers/*.json``."""
    reports = load_reports(reports_dir)
    consumers = load_consumer_reports(reports_dir)
    if not reports and not consumers:
        raise ValueError(f"no reports in {reports_dir}: run `reflora matrix` first")
    page = docs_dir / MATRIX_FILE
    atomic_write_bytes(page, render_markdown(reports, read_index(reports_dir), consumers).encode())
    if image and reports:
        render_image(reports, docs_dir / IMAGE_FILE)
    if image and consumers:
        render_consumer_image(consumers, docs_dir / CONSUMER_IMAGE_FILE)
    return page


def run(args: argparse.Namespace) -> int:
    docs_dir = Path(args.docs_dir)
    reports_dir = Path(args.reports_dir) if args.reports_dir else docs_dir / REPORTS_DIR
    try:
        if not args.render_only:
            candidates, consumers = selection(args.candidates, args.consumers)
            skipped = skip_unready(consumers)
            consumers = [c for c in consumers if c not in skipped]
            index = run_all(candidates, reports_dir, args.profile, args.max_examples, args.jobs, consumers)
        page = write_outputs(reports_dir, docs_dir, image=not args.no_image)
    except ValueError as exc:
        print(f"reflora matrix: error: {exc}", file=sys.stderr)
        return 2
    images = (
        [] if args.no_image else [p for p in (docs_dir / IMAGE_FILE, docs_dir / CONSUMER_IMAGE_FILE) if p.is_file()]
    )
    print(f"wrote {page}" + "".join(f" and {p}" for p in images))
    if args.render_only:
        return 0
    broken = [n for n, e in index["candidates"].items() if n in candidates and e.get("exit_code") not in (0, 1)]
    broken += [f"consumer {n}" for n, e in index.get("consumers", {}).items()
               if n in consumers and e.get("exit_code") not in (0, 1)]  # fmt: skip
    if args.consumers is not None:  # named on the command line but not runnable here: not a usable run
        broken += [f"consumer {n} (not run: {why})" for n, why in skipped.items()]
    if broken:
        print(f"reflora matrix: no usable run for {', '.join(broken)} (their logs are named above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflora.tools.matrix")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["matrix", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
