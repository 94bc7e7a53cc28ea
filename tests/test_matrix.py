"""The committed conformance matrix (docs/conformance-matrix.md) is generated and in sync with the drivers.

Fast tests (the default venv: no other LoRA library needed, drivers declare their capabilities without
importing their library):

* the page renders exactly from the committed JSON reports (docs/conformance-reports/): nobody edited it by hand;
* every shipped driver has a column, every row is a feature of conformance/features.py;
* each report's capabilities are the driver's current ones, and every "not supported" cell is a capability the
  driver declares missing (and every missing capability's feature is "not supported").

The slow test (CI=true only) runs ``reflora matrix`` for every candidate and consumer into a temporary folder,
building the candidates' venvs on a fresh machine (never the llama venv: llama_cpp is skipped without it, as
``reflora matrix`` skips it), and checks that it reproduces the committed cells of what it ran (the ci profile and
the consumers' draws are derandomized: the same cases every run).
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
from conformance.files import FILE_FEATURE_IDS
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
    ("keras", "layer.init.he_uniform.linear"): "layer_init_methods holds per layout: Dense (conv1d) draws he_uniform, "
    "EinsumDense (linear) he_uniform_b",
    ("keras", "layer.init.he_uniform_b.conv1d"): "as layer.init.he_uniform.linear",
    ("adapters_hub", "model.merge.safe"): "model_merge holds for merge_adapter; adapters has no safe merge, and one "
    "merged adapter per layer",
    ("adapters_hub", "model.merge.safe_untouched"): "as model.merge.safe",
    ("mlx_lm", "model.merge.safe"): "model_merge holds for fuse(); mlx-lm has no safe merge",
    ("mlx_lm", "model.merge.safe_untouched"): "as model.merge.safe",
    ("adapters_hub", "model.adapters.mixed_batch"): "mixed_batch holds for MultiTask on MLP targets without base rows; "
    "few draws are both (about 1 in 25), and the ci draws hold none",
}


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    return matrix.load_reports(REPORTS)


def declared_capabilities(name: str):
    module = importlib.import_module(f"conformance.drivers.{name}")
    return getattr(module, "driver", module).capabilities


def test_the_page_is_rendered_from_the_committed_reports(reports):
    expected = matrix.render_markdown(reports, matrix.read_index(REPORTS), matrix.load_consumer_reports(REPORTS))
    assert PAGE.read_text() == expected, "docs/conformance-matrix.md was edited by hand: run `reflora matrix`"


def test_every_shipped_driver_has_a_column(reports):
    assert sorted(reports) == sorted(shipped_drivers())
    header = next(line for line in PAGE.read_text().splitlines() if line.startswith("| feature |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == list(reports)


def test_every_row_is_a_feature(reports):
    rows = re.findall(r"^\| `([^`]+)` \|", PAGE.read_text(), flags=re.MULTILINE)
    assert rows, "no feature rows found in the matrix"
    stale = [row for row in rows if row not in FEATURES and row not in FILE_FEATURE_IDS]  # drivers' or consumers' table
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


# ----------------------------------------------------------------------------------------------
# adapter-file consumers: a second table, reports in <reports>/consumers/ (tmp folders only)
# ----------------------------------------------------------------------------------------------


def consumer_report(name: str, outcomes: dict[str, str], notes: dict[str, str] | None = None) -> dict:
    """A ``reflora-consumer/1`` report as reflora.tools.conform_files.build_report writes it."""
    results = [{"feature": f, "outcome": o, "examples": 0 if o == "not_supported" else 2, "worst_ratio": 0.1,
                "detail": f"why {f}" if o != "passed" else "", "title": f} for f, o in outcomes.items()]  # fmt: skip
    for r in results:
        if r["outcome"] in ("not_supported", "known_deviation"):
            r["reason"] = r["detail"]
    return {"format": "reflora-consumer/1", "level": "file", "candidate": name, "versions": {"candidate": f"{name} 1.0"},
            "consumer": {"name": name, "versions": {"candidate": f"{name} 1.0"}, "notes": notes or {}},
            "created": "2026-01-02T03:04:05Z", "reflora": {"version": "0"}, "settings": {"examples": 2},
            "results": results, "deviations": [], "summary": {"runtime_s": 1.0}}  # fmt: skip


def driver_reports_copy(folder: Path) -> Path:
    """The committed drivers' reports (not their consumers/ subfolder) copied into ``folder``."""
    shutil.copytree(REPORTS, folder, ignore=shutil.ignore_patterns(matrix.CONSUMERS_DIR))
    return folder


def write_consumers(folder: Path, reports: dict[str, dict]) -> None:
    (folder / matrix.CONSUMERS_DIR).mkdir(parents=True, exist_ok=True)
    for name, report in reports.items():
        (folder / matrix.CONSUMERS_DIR / f"{name}.json").write_text(json.dumps(report))


def test_consumers_are_selected_by_name():
    assert matrix.parse_consumers(None) == matrix.all_consumers()
    assert matrix.parse_consumers("mlx_lm_fuse, peft_from_pretrained") == ["peft_from_pretrained", "mlx_lm_fuse"]
    with pytest.raises(ValueError, match="--consumers: unknown nope"):
        matrix.parse_consumers("nope")
    assert matrix.selection(None, None) == (matrix.all_candidates(), matrix.all_consumers())
    assert matrix.selection("peft", None) == (["peft"], [])  # --candidates alone: no consumers
    assert matrix.selection(None, "mlx_lm_fuse") == ([], ["mlx_lm_fuse"])
    assert matrix.selection("keras", "mlx_lm_fuse") == (["keras"], ["mlx_lm_fuse"])


def test_a_consumer_runs_isolated_only_with_a_venv_group(tmp_path):
    report = tmp_path / "r.json"
    plain = matrix.consumer_command("peft_from_pretrained", report, None)
    assert plain[-4:] == ["--consumer", "peft_from_pretrained", "--report-json", str(report)]
    assert matrix.consumer_command("mlx_lm_fuse", report, 2)[-3:] == ["--max-examples", "2", "--isolated"]


def test_a_reports_folder_without_consumers_renders_as_before(tmp_path):
    folder = driver_reports_copy(tmp_path / "reports")
    reports, index = matrix.load_reports(folder), matrix.read_index(folder)
    assert matrix.load_consumer_reports(folder) == {}
    assert matrix.render_markdown(reports, index, {}) == matrix.render_markdown(reports, index)
    assert "Adapter-file consumers" not in matrix.render_markdown(reports, index)


def test_consumer_reports_render_as_a_second_table(tmp_path):
    folder = driver_reports_copy(tmp_path / "reports")
    write_consumers(folder, {
        "peft_from_pretrained": consumer_report("peft_from_pretrained", {"file.load.c_attn": "passed",
                                                "file.merge.logits": "failed", "file.load.dora": "error"}),
        "zeta": consumer_report("zeta", {"file.load.c_attn": "known_deviation", "file.load.padding": "not_supported"},
                                {"translation": "translates the folder", "file.load.padding": "no mask"}),
    })  # fmt: skip
    consumers = matrix.load_consumer_reports(folder)
    assert list(consumers) == ["peft_from_pretrained", "zeta"]  # shipped ones first
    page = matrix.render_markdown(matrix.load_reports(folder), matrix.read_index(folder), consumers)
    drivers = matrix.render_drivers(matrix.load_reports(folder), matrix.read_index(folder))
    assert page.startswith(drivers)  # the drivers' part is unchanged
    rest = page[len(drivers) :]
    assert "| feature | peft_from_pretrained | zeta |" in rest
    rows = re.findall(r"^\| `(file\.[^`]+)` \| (.*) \|$", rest, flags=re.MULTILINE)
    assert rows == [("file.load.c_attn", "pass | known deviation"), ("file.load.dora", "**ERROR** | no result"),
                    ("file.load.padding", "no result | not supported"), ("file.merge.logits", "**FAIL** | no result")]  # fmt: skip
    assert (
        "| peft_from_pretrained | peft_from_pretrained 1.0 | 2026-01-02T03:04:05Z | 2/3 | 1 | 0 | 1 | 1 | 0 |" in rest
    )
    assert "* **zeta**, `file.load.padding`, not supported: why file.load.padding" in rest
    assert "* **zeta** (translation): translates the folder" in rest
    assert "(file.load.padding)" not in rest  # a per-feature note is the cell's reason, not a remark
    assert matrix.checked_cells(consumers["zeta"])["checked"] == 1


def test_consumer_reports_only_and_the_image(tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "reports"
    write_consumers(folder, {"mlx_lm_fuse": consumer_report("mlx_lm_fuse", {"file.load.c_attn": "passed"})})
    assert matrix.main(["--render-only", "--docs-dir", str(tmp_path), "--reports-dir", str(folder)]) == 0
    assert "| `file.load.c_attn` | pass |" in (tmp_path / matrix.MATRIX_FILE).read_text()
    assert (tmp_path / matrix.CONSUMER_IMAGE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / matrix.IMAGE_FILE).exists()  # no driver report, no drivers' heatmap


def test_consumer_reports_of_another_format_are_refused_and_the_unversioned_one_read(tmp_path):
    folder = tmp_path / "reports"
    legacy = {"candidate": "old", "level": "file", "versions": {"candidate": "old 1"},
              "results": [{"feature": "file.load.c_attn", "outcome": "passed", "examples": 3, "worst_ratio": 0.1,
                           "detail": ""}]}  # fmt: skip
    write_consumers(folder, {"old": legacy})
    consumers = matrix.load_consumer_reports(folder)
    assert "| old | old 1 |  | 1/1 | 1 |" in "\n".join(matrix.render_consumers(consumers))
    write_consumers(folder, {"bad": {"format": "reflora-conformance/1", "features": []}})
    with pytest.raises(ValueError, match=r"bad\.json: not a reflora-consumer/1 report"):
        matrix.load_consumer_reports(folder)


def test_matrix_runs_a_consumer_into_its_subfolder(tmp_path, monkeypatch):
    """``reflora matrix --consumers NAME``: the consumer's conform run (one feature here, to stay fast), its report
    in <reports>/consumers/, its index entry, the page; no driver runs."""
    pytest.importorskip("peft")
    command = matrix.consumer_command
    monkeypatch.setattr(matrix, "consumer_command", lambda *a: [*command(*a), "-k", "file.load.c_attn"])
    reports = tmp_path / "r"
    code = matrix.main(["--consumers", "transformers_load_adapter", "--max-examples", "1", "--no-image",
                        "--docs-dir", str(tmp_path), "--reports-dir", str(reports)])  # fmt: skip
    assert code == 0
    index = matrix.read_index(reports)
    assert index["candidates"] == {} and index["consumers"]["transformers_load_adapter"]["exit_code"] == 0
    report = json.loads((reports / matrix.CONSUMERS_DIR / "transformers_load_adapter.json").read_text())
    assert report["format"] == "reflora-consumer/1" and report["settings"] == {
        "examples": 1,
        "keyword": "file.load.c_attn",
    }
    assert [r["outcome"] for r in report["results"]] == ["passed"] and report["summary"]["checked"] == 1
    assert report["versions"]["candidate"].startswith("transformers ") and "version_gate" in report["consumer"]["notes"]
    assert "| `file.load.c_attn` | pass |" in (tmp_path / matrix.MATRIX_FILE).read_text()


def test_committed_consumer_cells_agree_with_declared_features():
    """Every committed consumer column is a shipped consumer, and a feature it does not declare is "not
    supported" (with a reason)."""
    from conformance.consumers import SHIPPED, load_consumer

    committed = matrix.load_consumer_reports(REPORTS)
    if not committed:
        pytest.skip("no consumer reports committed yet")
    for name, report in committed.items():
        assert name in SHIPPED, f"{name}: not a shipped consumer (stale column)"
        declared = load_consumer(name).file_features
        for entry in report["results"]:
            if entry["feature"] not in declared:
                assert entry["outcome"] == "not_supported" and entry["reason"], (name, entry)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="builds every candidate's venv: CI only (CI=true)")
def test_matrix_for_every_candidate_reproduces_the_committed_cells(tmp_path, reports):
    """The whole matrix, fresh: venvs built in parallel (two groups at a time), every candidate in the ci profile,
    and every adapter-file consumer that can run here. A consumer whose venv only a request builds (llama_cpp
    without ``python -m conformance.envs build llama``: a fresh CI machine) is skipped exactly as ``reflora
    matrix`` skips it (``matrix.consumer_not_ready``), gets no report and no index entry, and is not compared.
    Measured on a 2-core machine: the five venvs take 446 s to build one after another from an empty pip cache
    (torch 136, keras 115, jax 72, adapters 63, mlx 60), the ten suite runs 387 s one after another on a quiet
    machine (flax 175: JAX compiles per shape; peft 36-59; the others 12-45); the three consumers without the
    llama venv about 45 s; two at a time, about 9-10 min."""
    skipped = {c: why for c in matrix.all_consumers() if (why := matrix.consumer_not_ready(c)) is not None}
    code = matrix.main(["--docs-dir", str(tmp_path), "--jobs", "2"])
    index = json.loads((tmp_path / matrix.REPORTS_DIR / matrix.INDEX_FILE).read_text())
    print(json.dumps({"skipped_consumers": skipped, **index}, indent=1))  # venv and suite seconds, in the CI log
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
    ran = [c for c in matrix.all_consumers() if c not in skipped]
    fresh_consumers = matrix.load_consumer_reports(tmp_path / matrix.REPORTS_DIR)
    assert sorted(fresh_consumers) == sorted(ran) and sorted(index.get("consumers", {})) == sorted(ran)
    committed = matrix.load_consumer_reports(REPORTS)
    differ = {
        (name, fid): (matrix.consumer_result(row.get(name)), matrix.consumer_result(fresh_row.get(name)))
        for fid in {*matrix.consumer_cells(committed), *matrix.consumer_cells(fresh_consumers)}
        for row, fresh_row in [(matrix.consumer_cells(committed).get(fid, {}),
                                matrix.consumer_cells(fresh_consumers).get(fid, {}))]
        for name in ran
        if matrix.consumer_result(row.get(name)) != matrix.consumer_result(fresh_row.get(name))
    }  # fmt: skip
    assert not differ, f"(consumer, feature): (committed, now) {differ}"
