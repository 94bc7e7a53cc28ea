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


def build_report(suite) -> dict[str, Any]:
    import numpy

    from reflora import __version__

    tests = []
    for record in suite.records.values():
        tests.append({
            "id": record.test_id, "nodeid": record.nodeid, "feature": record.feature, "outcome": record.outcome,
            "examples": record.examples, "discarded": record.discarded, "duration_s": round(record.duration, 3),
            "worst": _worst(record),
            "reason": record.reason, "message": record.failure if record.outcome in ("failed", "known_deviation", "error") else None,
            "deviation": record.deviation.to_json() if record.deviation is not None else None,
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
            "examples": sum(r.examples for r in mine), "worst": _worst(worst) if worst is not None else None,
            "reason": "; ".join(reasons) if reasons else None,
        })  # fmt: skip
    counts = {result: sum(f["result"] == result for f in features) for result in RESULTS}
    scored = counts["pass"] + counts["fail"] + counts["known_deviation"] + counts["not_supported"]
    supported = counts["pass"] + counts["fail"] + counts["known_deviation"]
    deviations = getattr(suite, "deviations", [])
    unmatched = [d.id for d in deviations if not any(t.startswith(d.id) for t in all_test_ids(suite))]
    not_reproduced = [
        d.id for d in deviations
        if d.id not in unmatched and all(t["outcome"] == "passed" for t in tests if t["id"].startswith(d.id))
        and any(t["outcome"] == "passed" for t in tests if t["id"].startswith(d.id))
    ]  # fmt: skip
    info = getattr(suite, "info", {"name": suite.candidate, "versions": {}, "capabilities": {}})
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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


def render_text(report: dict[str, Any], width: int = 120) -> str:
    """The table (features as rows) and the score, rendered by rich to text with ANSI colours off."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['candidate']['name']} vs reflora {report['reflora']['version']}", expand=False)
    for column, justify in (("feature", "left"), ("result", "left"), ("examples", "right"), ("worst error", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for f in report["features"]:
        worst = f["worst"]
        if worst is not None:
            tensor = worst["tensor"].split("/")[-1].removeprefix("base_model.model.").removeprefix("transformer.")
            text = f"{worst['error']:.1e} = {worst['ratio']:.2f}× bound ({worst['dtype']}, {tensor})"
        else:
            text = ""
        if f["result"] in ("not_supported", "skipped", "known_deviation") and f["reason"]:
            text = (text + "  " if text else "") + f["reason"][:160]
        label = f"[{_STYLE[f['result']]}]{_LABEL[f['result']]}[/]"
        table.add_row(f["id"], label, str(f["examples"]), text)
    s = report["summary"]
    buffer = io.StringIO()
    console = Console(file=buffer, width=max(width, 100), force_terminal=False, color_system=None, emoji=False)
    console.print(table)
    console.print(
        f"conformance score: {100 * s['score']:.0f}% ({s['features_pass']} of {s['features'] - s['features_skipped']} "
        f"features pass; {s['features_fail']} fail, {s['features_known_deviation']} known deviations, "
        f"{s['features_not_supported']} not supported, {s['features_skipped']} skipped). "
        f"Of the supported features: {100 * s['supported_score']:.0f}%. {s['examples']} examples, {s['runtime_s']} s."
    )
    deviations = report["deviations"]
    for deviation_id in deviations["unmatched"]:
        console.print(f"[yellow]known deviation {deviation_id!r} matches no test: remove or fix it[/]")
    for deviation_id in deviations["not_reproduced"]:
        console.print(f"[yellow]known deviation {deviation_id!r} did not reproduce: its tests passed[/]")
    return buffer.getvalue()
