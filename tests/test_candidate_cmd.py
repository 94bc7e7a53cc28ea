"""``reflora conform --candidate-cmd``: the example JavaScript candidate (tests/candidates/gpt2_lora.js) passes the
adapter-file features; its faulty variant (no alpha scaling) is caught; crashes, hangs, missing or malformed
output and "not supported" exits are handled like a Python driver's."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conformance.consumers.command import CommandConsumer
from conformance.files import FILE_FEATURE_IDS, run_file_feature
from reflora.tools.cli import main

JS = Path(__file__).parent / "candidates" / "gpt2_lora.js"
ARGS = "--base {base} --adapter {adapter} --input {input} --out {out}"
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@needs_node
def test_the_javascript_candidate_passes_every_file_feature(tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = main(["conform", "--candidate-cmd", f"node {JS} {ARGS}", "--cmd-merge", "--max-examples", "2",
               "--report-json", str(report)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    results = json.loads(report.read_text())["results"]
    assert {r["feature"] for r in results} == set(FILE_FEATURE_IDS)
    assert all(r["outcome"] == "passed" and r["examples"] == 2 for r in results), out


@needs_node
def test_the_faulty_candidate_without_alpha_scaling_is_caught(tmp_path, capsys):
    rc = main(["conform", "--candidate-cmd", f"node {JS} --no-scaling {ARGS}", "--max-examples", "1",
               "-k", "file.load"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL   file.load.c_attn" in out and "logits: error" in out


def _outcome(tmp_path, script: str, timeout: float = 20.0):
    prog = tmp_path / "prog.py"
    prog.write_text(script)
    consumer = CommandConsumer(f"{sys.executable} {prog} {{input}} {{out}}", timeout=timeout)
    return run_file_feature(consumer, FILE_FEATURE_IDS["file.load.c_attn"], tmp_path / "work", examples=1)


def test_a_crash_a_hang_and_bad_output_are_candidate_errors(tmp_path):
    crash = _outcome(tmp_path, "import os\nos.abort()\n")
    assert crash.outcome == "error" and "exited with status" in crash.detail
    hang = _outcome(tmp_path, "import time\ntime.sleep(60)\n", timeout=1.0)
    assert hang.outcome == "error" and "ran longer than 1 s" in hang.detail
    nothing = _outcome(tmp_path, "pass\n")
    assert nothing.outcome == "error" and "wrote no" in nothing.detail
    garbage = _outcome(tmp_path, "import sys\nopen(sys.argv[2], 'wb').write(b'nonsense')\n")
    assert garbage.outcome == "error" and "not a readable safetensors file" in garbage.detail


def test_exit_status_3_is_not_supported(tmp_path):
    refused = _outcome(tmp_path, "import sys\nprint('no DoRA here', file=sys.stderr)\nsys.exit(3)\n")
    assert refused.outcome == "not_supported" and "no DoRA here" in refused.detail


def test_a_template_without_input_or_out_is_refused(capsys):
    assert main(["conform", "--candidate-cmd", "my-engine --base {base}"]) == 2
    assert "{input}" in capsys.readouterr().err
