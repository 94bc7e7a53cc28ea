"""The committed conformance matrix (docs/conformance-matrix.md) is generated and in sync with the drivers.

Fast tests (the default venv: no other LoRA library needed, drivers declare their capabilities without
importing their library):

* the page renders exactly from the committed JSON reports (docs/conformance-reports/): nobody edited it by hand;
* every shipped driver has a column, every row is a feature of conformance/features.py;
* each report's capabilities are the driver's current ones, and every "not supported" cell is a capability the
  driver declares missing (and every missing capability's feature is "not supported").

The slow test (CI=true only) runs ``reflora matrix`` for every candidate into a temporary folder, building the
candidates' venvs on a fresh machine, and checks that it reproduces the committed cells (the ci profile is
derandomized: the same cases every run).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conformance.envs import ALIASES
from conformance.features import FEATURES, missing_capability
from conformance.loader import capabilities_from_json, load_driver, shipped_drivers
from reflora.tools import matrix

DOCS = Path(__file__).resolve().parent.parent / "docs"
REPORTS = DOCS / matrix.REPORTS_DIR
PAGE = DOCS / matrix.MATRIX_FILE


# Cells "not supported" at run time although the driver declares the capability: the capability holds at one level
# only, and the driver refuses every draw of the other. Each one is listed here with its reason; anything else
# "not supported" must be a missing capability.
REFUSED_EVERY_DRAW = {
    ("keras", "model.bias.all"): "bias_modes holds for Dense (layer level); GPT2Backbone.enable_lora has one fixed "
    "bias behaviour at model level",
    ("keras", "model.bias.lora_only"): "as model.bias.all",
}


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    return matrix.load_reports(REPORTS)


def declared_capabilities(name: str):
    module = importlib.import_module(f"conformance.drivers.{name}")
    return getattr(module, "driver", module).capabilities


def test_the_page_is_rendered_from_the_committed_reports(reports):
    expected = matrix.render_markdown(reports, matrix.read_index(REPORTS))
    assert PAGE.read_text() == expected, "docs/conformance-matrix.md was edited by hand: run `reflora matrix`"


def test_every_shipped_driver_has_a_column(reports):
    assert sorted(reports) == sorted(shipped_drivers())
    header = next(line for line in PAGE.read_text().splitlines() if line.startswith("| feature |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == list(reports)


def test_every_row_is_a_feature(reports):
    rows = re.findall(r"^\| `([^`]+)` \|", PAGE.read_text(), flags=re.MULTILINE)
    assert rows, "no feature rows found in the matrix"
    stale = [row for row in rows if row not in FEATURES]
    assert not stale, f"rows that are no longer features (re-run `reflora matrix`): {stale}"
    for name, report in reports.items():
        assert {f["id"] for f in report["features"]} <= set(rows), name


@pytest.mark.parametrize("name", shipped_drivers())
def test_cells_agree_with_declared_capabilities(reports, name):
    caps = declared_capabilities(name)
    # a report older than a capability field holds no value for it: read back, it takes the field's default
    stored = replace(capabilities_from_json(reports[name]["capabilities"]), notes={})
    assert stored == replace(caps, notes={}), (
        f"{name}'s capabilities changed since its matrix run: re-run `reflora matrix`"
    )
    for entry in reports[name]["features"]:
        if entry["id"] == "golden.replay":  # per-fixture needs; a driver without a model level runs none
            if not caps.model_level:
                assert entry["result"] == "not_supported", (name, entry)
            continue
        missing = missing_capability(caps, FEATURES[entry["id"]].needs)
        if missing is not None:
            assert entry["result"] == "not_supported", f"{name} {entry['id']}: lacks {missing} but {entry['result']}"
        elif (name, entry["id"]) in REFUSED_EVERY_DRAW:
            assert entry["result"] == "not_supported" and "refused all" in entry["reason"], (name, entry)
        else:
            assert entry["result"] != "not_supported", (
                f"{name} {entry['id']}: 'not supported' although the driver declares every capability it needs "
                f"({entry['reason']})"
            )


def test_render_only_rewrites_the_same_page(tmp_path):
    pytest.importorskip("matplotlib")
    shutil.copytree(REPORTS, tmp_path / "reports")
    code = matrix.main(["--render-only", "--docs-dir", str(tmp_path), "--reports-dir", str(tmp_path / "reports")])
    assert code == 0
    assert (tmp_path / matrix.MATRIX_FILE).read_text() == PAGE.read_text()
    assert (tmp_path / matrix.IMAGE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_candidates_accept_aliases_and_reject_unknown_names():
    assert matrix.parse_candidates("adapters, mlx-lm,peft") == ["peft", "adapters_hub", "mlx_lm"]
    assert matrix.parse_candidates(None) == matrix.all_candidates()
    with pytest.raises(ValueError, match="unknown nope"):
        matrix.parse_candidates("peft,nope")


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_library_names_load_their_driver(alias):
    """``--candidate adapters`` (the library's own name) is the adapters_hub driver, without importing adapters."""
    assert load_driver(alias) is importlib.import_module(f"conformance.drivers.{ALIASES[alias]}")


def test_isolated_only_outside_the_default_environment(tmp_path):
    report = tmp_path / "r.json"
    assert "--isolated" not in matrix.conform_command("peft", report, "ci", None)
    assert "--isolated" not in matrix.conform_command("reference", report, "ci", None)
    command = matrix.conform_command("keras", report, "ci", 3)
    assert command[-3:] == ["--max-examples", "3", "--isolated"] and str(report) in command


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="builds every candidate's venv: CI only (CI=true)")
def test_matrix_for_every_candidate_reproduces_the_committed_cells(tmp_path, reports):
    """The whole matrix, fresh: venvs built in parallel (two groups at a time), every candidate in the ci profile.
    Measured on a 2-core machine: the five venvs take 446 s to build one after another from an empty pip cache
    (torch 136, keras 115, jax 72, adapters 63, mlx 60), the ten suite runs 387 s one after another on a quiet
    machine (flax 175: JAX compiles per shape; peft 36-59; the others 12-45); two at a time, about 9-10 min."""
    code = matrix.main(["--docs-dir", str(tmp_path), "--jobs", "2"])
    index = json.loads((tmp_path / matrix.REPORTS_DIR / matrix.INDEX_FILE).read_text())
    print(json.dumps(index, indent=1))  # per-candidate venv and suite seconds, in the CI log
    assert code == 0, index
    fresh = matrix.load_reports(tmp_path / matrix.REPORTS_DIR)
    assert sorted(fresh) == sorted(reports)
    differ = {
        (name, fid): (matrix.result_of(row[name]), matrix.result_of(matrix.cells(fresh).get(fid, {}).get(name)))
        for fid, row in matrix.cells(reports).items()
        for name in reports
        if matrix.result_of(row[name]) != matrix.result_of(matrix.cells(fresh).get(fid, {}).get(name))
    }
    assert not differ, f"(candidate, feature): (committed, now) {differ}"
