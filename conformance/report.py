"""The results of a run: the terminal table (rich) and the JSON report (format ``reflora-conformance/1``).

The JSON schema is documented in docs/conformance.md and is stable: ``reflora matrix`` joins reports on
feature ids. Fields are only ever added, never renamed or removed, within a format version.
"""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path
from typing import Any

from conformance.features import FEATURES

FIXTURE_CORRUPTED = "fixture corrupted: "  # conformance.suite.fixture_problem's reasons start so
LEVEL_ORDER = {"layer": 0, "model": 1, "golden": 2, "advanced": 3}  # the table: core features first

FORMAT = "reflora-conformance/1"
RESULTS = ("pass", "fail", "known_deviation", "not_supported", "skipped")
_FEATURE_RESULT = {"passed": "pass", "failed": "fail", "error": "fail", "known_deviation": "known_deviation",
                   "not_supported": "not_supported", "skipped": "skipped", "not run": "skipped"}  # fmt: skip


def _worst(record) -> dict | None:
    if record.worst is None:
        return None
    c = record.worst
    return {"tensor": c.name, "error": c.error, "bound": c.bound, "ratio": c.ratio, "dtype": record.worst_dtype,
            "max_abs": c.max_abs, "abs_index": list(c.abs_index) if c.abs_index is not None else None,
            "max_rel": c.max_rel, "rel_index": list(c.rel_index) if c.rel_index is not None else None}  # fmt: skip


def _feature_result(outcomes: list[str]) -> str:
    results = {_FEATURE_RESULT[o] for o in outcomes}
    for result in ("fail", "known_deviation", "pass", "not_supported"):
        if result in results:
            return result
    return "skipped"


def build_report(suite, complete: bool = True, running: str | None = None) -> dict[str, Any]:
    """The JSON report of ``suite``. ``complete``: False for the copies written while the run goes on (see
    conformance/plugin.py), with ``running`` the test id in progress then (null between tests)."""
    import numpy

    from conformance.deviations import stack_hints
    from reflora import __version__

    info = getattr(suite, "info", {"name": suite.candidate, "versions": {}, "capabilities": {}})
    failed = [r.test_id for r in suite.records.values() if r.outcome in ("failed", "error")]
    hints = stack_hints(failed, suite.candidate, info.get("versions", {}), getattr(suite, "deviations_path", None))
    tests = []
    for record in suite.records.values():
        tests.append({
            "id": record.test_id, "nodeid": record.nodeid, "feature": record.feature, "outcome": record.outcome,
            "examples": record.examples, "after_failure": record.after_failure, "discarded": record.discarded,
            "duration_s": round(record.duration, 3),
            "worst": _worst(record),
            "reason": record.reason, "message": record.failure if record.outcome in ("failed", "known_deviation", "error") else None,
            "deviation": record.deviation.to_json() if record.deviation is not None else None,
            "hint": hints.get(record.test_id) if record.outcome in ("failed", "error") else None,
        })  # fmt: skip
    features = []
    for feature_id in dict.fromkeys(t["feature"] for t in tests):
        feature = FEATURES[feature_id]
        mine = [suite.records[t["id"]] for t in tests if t["feature"] == feature_id]
        result = _feature_result([r.outcome for r in mine])
        worst = max((r for r in mine if r.worst is not None), key=lambda r: r.worst.ratio, default=None)
        reasons = sorted({r.reason for r in mine if r.reason and r.outcome != "passed"})
        features.append({
            "id": feature_id, "level": feature.level, "title": feature.title, "result": result, "tests": len(mine),
            "examples": sum(r.examples for r in mine), "after_failure": sum(r.after_failure for r in mine),
            "worst": _worst(worst) if worst is not None else None,
            "reason": "; ".join(reasons) if reasons else None,
        })  # fmt: skip
    counts = {result: sum(f["result"] == result for f in features) for result in RESULTS}
    scored = counts["pass"] + counts["fail"] + counts["known_deviation"] + counts["not_supported"]
    supported = counts["pass"] + counts["fail"] + counts["known_deviation"]
    deviations = getattr(suite, "deviations", [])
    from conformance.deviations import covers

    unmatched = [d.id for d in deviations if not any(covers(d.id, t) for t in all_test_ids(suite))]
    not_reproduced = [
        d.id for d in deviations
        if d.id not in unmatched and all(t["outcome"] == "passed" for t in tests if covers(d.id, t["id"]))
        and any(t["outcome"] == "passed" for t in tests if covers(d.id, t["id"]))
    ]  # fmt: skip
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": complete,
        "running": running,
        "candidate": {"name": info["name"], "spec": suite.candidate, "versions": info["versions"]},
        "reflora": {
            "version": __version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": suite.settings_summary(),
        "capabilities": info["capabilities"],
        "summary": {
            **{f"features_{k}": v for k, v in counts.items()},
            "features": len(features),
            "score": counts["pass"] / scored if scored else 0.0,
            "supported_score": counts["pass"] / supported if supported else 0.0,
            "tests": len(tests),
            "checked": sum(t["outcome"] in ("passed", "failed", "known_deviation") for t in tests),
            "examples": sum(t["examples"] for t in tests),
            "unknown_failures": sum(t["outcome"] in ("failed", "error") for t in tests),
            "fixtures_corrupted": [t["id"] for t in tests if (t["reason"] or "").startswith(FIXTURE_CORRUPTED)],
            "runtime_s": round(time.time() - suite.started, 1),
        },
        "features": features,
        "tests": tests,
        "deviations": {
            "file": getattr(suite, "deviations_path", None),
            "entries": [d.to_json() for d in deviations],
            "unmatched": unmatched,
            "not_reproduced": not_reproduced,
        },
    }


def all_test_ids(suite) -> list[str]:
    """Every test id the suite has, selected or not: the features and one per golden fixture."""
    from conformance.suite import golden_fixtures

    fixtures = [f"golden.replay.{name}" for name, _ in golden_fixtures(suite.golden_dir)]
    return [f for f in FEATURES if f != "golden.replay"] + (fixtures or ["golden.replay"])


def write_json(report: dict[str, Any], path: str | Path) -> None:
    from reflora.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(report, indent=1) + "\n").encode())


_STYLE = {"pass": "green", "fail": "bold red", "known_deviation": "yellow", "not_supported": "dim", "skipped": "dim"}
_LABEL = {"pass": "pass", "fail": "FAIL", "known_deviation": "known deviation", "not_supported": "not supported",
          "skipped": "skipped"}  # fmt: skip


def ratio_text(ratio: float) -> str:
    """An error/bound ratio for the table: ``0.06``, ``3.5``, ``42``, then scientific (``7.5e+13``)."""
    if ratio != ratio:  # NaN
        return "nan"
    if ratio < 10:
        return f"{ratio:.2f}"
    if ratio < 1000:
        return f"{ratio:.0f}"
    return f"{ratio:.1e}"


def examples_text(feature: dict[str, Any]) -> str:
    """The examples drawn, without the runs after the first failure (shrink attempts, hypothesis's replay)."""
    after = feature.get("after_failure") or 0
    drawn = feature["examples"] - after
    return f"{drawn} (+{after} reruns)" if after else str(drawn)


def score_line(report: dict[str, Any]) -> str:
    """The headline: the score over what the candidate declares; the coverage over every feature, labelled."""
    s = report["summary"]
    supported = s["features_pass"] + s["features_fail"] + s["features_known_deviation"]
    scored = s["features"] - s["features_skipped"]
    return (
        f"conformance score: {100 * s['supported_score']:.0f}% of what {report['candidate']['name']} declares "
        f"({s['features_pass']} of {supported} supported features pass; {s['features_fail']} fail, "
        f"{s['features_known_deviation']} known deviations). "
        f"Coverage: {100 * s['score']:.0f}% of all {scored} features pass ({s['features_not_supported']} not "
        f"supported, {s['features_skipped']} skipped). {s['examples']} examples, {s['runtime_s']} s."
    )


def order_line(settings: dict[str, Any]) -> str:
    """How the features ran (docs/conformance.md "State isolation"): the shuffle seed, to replay the order with
    ``--feature-seed N``, and whether each feature had a fresh candidate process."""
    seed = settings.get("feature_seed")
    order = f"feature order shuffled with seed {seed} (--feature-seed {seed} replays it)"
    order = "fixed feature order" if seed is None else order
    fresh = "; a fresh candidate process per feature (--fresh-process)" if settings.get("fresh_process") else ""
    return order + fresh


def render_text(report: dict[str, Any], width: int = 120) -> str:
    """The table (features as rows: layer, model, golden, then advanced) and the score, rendered by rich to text
    with ANSI colours off."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report['candidate']['name']} vs reflora {report['reflora']['version']}", expand=False)
    for column, justify in (("feature", "left"), ("result", "left"), ("examples", "right"), ("worst error", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    rows = sorted(report["features"], key=lambda f: LEVEL_ORDER.get(f["level"], len(LEVEL_ORDER)))
    for f in rows:
        worst = f["worst"]
        if worst is not None:
            tensor = worst["tensor"].split("/")[-1].removeprefix("base_model.model.").removeprefix("transformer.")
            text = f"{worst['error']:.1e} = {ratio_text(worst['ratio'])}× bound ({worst['dtype']}, {tensor})"
        else:
            text = ""
        if f["result"] in ("not_supported", "skipped", "known_deviation") and f["reason"]:
            text = (text + "  " if text else "") + f["reason"][:160]
        label = f"[{_STYLE[f['result']]}]{_LABEL[f['result']]}[/]"
        table.add_row(f["id"], label, examples_text(f), escape(text))
    buffer = io.StringIO()
    console = Console(file=buffer, width=max(width, 100), force_terminal=False, color_system=None, emoji=False)
    console.print(table)
    console.print(escape(score_line(report)))
    settings = report.get("settings", {})
    if settings.get("feature_seed") is not None or settings.get("fresh_process"):
        console.print(escape(order_line(settings)))
    for test in report["tests"]:
        hint = test.get("hint")
        if hint:
            console.print(escape(
                f"hint: {test['id']} fails like the known deviation {hint['id']!r} of the {hint['driver']} driver, "
                f"which shares {', '.join(hint['shared'])} with this candidate: {hint['reason'][:240]}"
            ))  # fmt: skip
    for test_id in report["summary"].get("fixtures_corrupted", []):
        console.print(escape(f"{test_id}: the golden fixture is corrupted (sha256 differs from its manifest): not "
                             "replayed, and the run fails; the candidate is not blamed"))  # fmt: skip
    deviations = report["deviations"]
    for deviation_id in deviations["unmatched"]:
        console.print(f"[yellow]known deviation {escape(repr(deviation_id))} matches no test: remove or fix it[/]")
    for deviation_id in deviations["not_reproduced"]:
        console.print(f"[yellow]known deviation {escape(repr(deviation_id))} did not reproduce: its tests passed[/]")
    return buffer.getvalue()
