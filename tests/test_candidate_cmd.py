"""``reflora conform --candidate-cmd``: the example JavaScript candidate (tests/candidates/gpt2_lora.js) passes the
adapter-file features; its faulty variant (no alpha scaling) is caught; crashes, hangs, missing or malformed
output and "not supported" exits are handled like a Python driver's."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conformance.consumers.command import CommandConsumer
from conformance.files import FILE_FEATURE_IDS, run_file_feature
from conformance.protocol import CandidateError, NotSupported
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


# ---------------------------------------------------------------------------------------------- the layer level
# ``--candidate-cmd`` with {case} {out} (conformance.consumers.command_layer): the example Node layer
# tests/candidates/lora_layer.js, its two faulty variants, and a crash, a hang, garbage and exit 3.

LAYER_JS = Path(__file__).parent / "candidates" / "lora_layer.js"
LAYER_CAPS = Path(__file__).parent / "candidates" / "lora_layer.caps.json"
LAYER_ARGS = "--case {case} --out {out}"


def conform_cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``reflora conform ...`` in a subprocess (the layer level runs pytest, which is not nested here)."""
    env = {**os.environ, "CI": "true"}
    return subprocess.run([sys.executable, "-m", "reflora.tools", "conform", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@needs_node
def test_the_javascript_layer_passes_every_layer_feature_it_declares(tmp_path):
    from conformance.consumers.command_layer import load_capabilities
    from conformance.features import FEATURES, missing_capability

    report = tmp_path / "r.json"
    result = conform_cli(tmp_path, "--candidate-cmd", f"node {LAYER_JS} {LAYER_ARGS}", "--cmd-capabilities",
                         str(LAYER_CAPS), "-k", "layer.", "--max-examples", "3", "--report-json", str(report))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    results = {r["id"]: r for r in json.loads(report.read_text())["features"]}
    caps = load_capabilities(LAYER_CAPS)
    declared = {f.id for f in FEATURES.values() if f.level == "layer" and missing_capability(caps, f.needs) is None}
    assert {"layer.rslora.linear", "layer.dropout.conv1d", "layer.bias.linear", "layer.qkv_slices.conv1d",
            "layer.merge_square.conv1d", "layer.unmerge.linear", "layer.lora_bias.conv1d", "layer.dora_full_norm.linear",
            "layer.dora_unmerge.conv1d"} <= declared  # fmt: skip
    assert {k for k, r in results.items() if r["result"] == "pass"} == declared
    assert all(results[k]["examples"] == 3 for k in declared)
    assert {r["result"] for k, r in results.items() if k not in declared} == {"not_supported"}
    assert "layer_forward_backward and layer_merge only" in results["layer.init.gaussian.linear"]["reason"]


@needs_node
def test_the_faulty_layers_are_caught(tmp_path):
    square = conform_cli(tmp_path, "--candidate-cmd", f"node {LAYER_JS} --transpose-square-bug {LAYER_ARGS}",
                         "-k", "layer.merge", "--max-examples", "3")  # fmt: skip
    assert square.returncode == 1
    assert failures(square.stdout) == {"layer.merge_square.conv1d"}, square.stdout[-3000:]
    # the replay line carries the template and runs as printed
    line = next(ln.strip() for ln in square.stdout.splitlines() if "REFLORA_CANDIDATE_CMD=" in ln and "--replay" in ln)
    replay = subprocess.run(line.replace("reflora conform", f"{shlex.quote(sys.executable)} -m reflora.tools conform"),
                            shell=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert replay.returncode == 1 and "FAILED: layer.merge_square.conv1d" in replay.stdout, replay.stderr[-2000:]
    assert (tmp_path / "case.safetensors").is_file()  # --dump, in the folder the line cds to
    unscaled = conform_cli(tmp_path, "--candidate-cmd", f"node {LAYER_JS} --no-scaling {LAYER_ARGS}",
                           "-k", "layer.forward_backward or layer.merge.", "--max-examples", "3")  # fmt: skip
    assert unscaled.returncode == 1
    assert failures(unscaled.stdout) == {f"layer.{kind}.{layout}" for kind in ("forward_backward", "merge")
                      for layout in ("linear", "conv1d")}, unscaled.stdout[-3000:]  # fmt: skip


def failures(stdout: str) -> set[str]:
    """The features a run's progress lines (``[ 3/29] layer.merge.linear   FAIL ...``) mark FAIL."""
    return set(re.findall(r"^\[\s*\d+/\d+\] (\S+)\s+FAIL", stdout, re.MULTILINE))


def _layer_case(**changes):
    from conformance.protocol import LayerCase

    rng = np.random.default_rng(0)
    case = LayerCase(layout="linear", x=rng.standard_normal((2, 3, 4)), weight=rng.standard_normal((5, 4)),
                     bias=rng.standard_normal(5), lora_A={None: rng.standard_normal((2, 4))},
                     lora_B={None: rng.standard_normal((5, 2))}, r=2, lora_alpha=8.0, use_rslora=True,
                     lora_dropout=0.25, keep_mask=(rng.random((2, 3, 4)) > 0.25).astype(float),
                     bias_trainable=True, dy=rng.standard_normal((2, 3, 5)))  # fmt: skip
    return dataclasses.replace(case, **changes)


def _layer_driver(tmp_path, script: str, timeout: float = 20.0):
    from conformance.consumers.command_layer import CommandLayerDriver

    prog = tmp_path / "layer.py"
    prog.write_text(script)
    return CommandLayerDriver(f"{sys.executable} {prog} {{case}} {{out}}", timeout=timeout)


def test_the_case_file_carries_the_arrays_and_the_scalars(tmp_path):
    from safetensors import safe_open

    copy = tmp_path / "copy.safetensors"
    driver = _layer_driver(tmp_path, f"import shutil, sys\nshutil.copy(sys.argv[1], {str(copy)!r})\nsys.exit(3)\n")
    with pytest.raises(NotSupported):
        driver.layer_forward_backward(_layer_case())
    with safe_open(str(copy), "np") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta == {"format": "reflora-layer-case/1", "method": "layer_forward_backward", "layout": "linear", "r": 2,
                    "lora_alpha": 8.0, "use_rslora": True, "lora_dropout": 0.25, "bias_trainable": True,
                    "dtype": "float64", "dora_norm": "detached", "seed": 0, "slices": None}  # fmt: skip
    assert sorted(tensors) == ["bias", "dy", "keep_mask", "lora_A", "lora_B", "weight", "x"]
    assert all(t.dtype == np.float64 for t in tensors.values())
    q = _layer_case(lora_A={"q": np.ones((2, 4)), "v": np.ones((2, 4))}, lora_B={"q": np.ones((1, 2)),
                    "v": np.ones((1, 2))}, dy=np.ones((2, 3, 3)), weight=np.ones((3, 4)), bias=None, keep_mask=None)  # fmt: skip
    with pytest.raises(NotSupported):
        driver.layer_merge(q)
    with safe_open(str(copy), "np") as f:
        assert json.loads(f.metadata()["method"]) == "layer_merge" and json.loads(f.metadata()["slices"]) == ["q", "v"]
        assert {"lora_A.q", "lora_B.v"} <= set(f.keys()) and "bias" not in f.keys()


def test_a_layer_command_result_is_read_back(tmp_path):
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from safetensors.numpy import save_file
        save_file({"y": np.zeros((2, 3, 5), np.float32), "dx": np.zeros((2, 3, 4))}, sys.argv[2],
                  metadata={"trainable": json.dumps(["lora_A", "lora_B"])})
    """)
    out = _layer_driver(tmp_path, script).layer_forward_backward(_layer_case())
    assert out["y"].dtype == np.float64 and out["y"].shape == (2, 3, 5)
    assert list(out["trainable"]) == ["lora_A", "lora_B"]


def test_a_layer_command_crash_hang_garbage_and_exit_3(tmp_path):
    case = _layer_case()
    cases = {
        "import os\nos.abort()\n": ("raised", "exited with status 134"),  # the shell's 128 + SIGABRT
        "import sys\nprint('boom', file=sys.stderr)\nsys.exit(1)\n": ("raised", "exited with status 1"),
        "pass\n": ("raised", "wrote no"),
        "import sys\nopen(sys.argv[2], 'wb').write(b'nonsense')\n": ("raised", "not a readable safetensors file"),
        "import sys, numpy as np\nfrom safetensors.numpy import save_file\n"
        "save_file({'y': np.zeros(2, np.int64)}, sys.argv[2])\n": ("raised", "y is not a float tensor"),
        "import sys, numpy as np\nfrom safetensors.numpy import save_file\n"
        "save_file({'y': np.zeros(2)}, sys.argv[2], metadata={'trainable': 'lora_A'})\n": ("raised", "'trainable'"),
    }
    for script, (kind, words) in cases.items():
        with pytest.raises(CandidateError) as info:
            _layer_driver(tmp_path, script).layer_forward_backward(case)
        assert info.value.kind == kind and words in info.value.message, (script, info.value)
    with pytest.raises(CandidateError) as info:
        _layer_driver(tmp_path, "import sys\nprint('boom', file=sys.stderr)\nsys.exit(1)\n").layer_merge(case)
    assert "boom" in info.value.detail  # the tail of stderr
    start = time.perf_counter()
    with pytest.raises(CandidateError) as info:
        _layer_driver(tmp_path, "import time\ntime.sleep(60)\n", timeout=1.0).layer_forward_backward(case)
    assert info.value.kind == "hung" and "ran longer than 1 s" in info.value.message
    assert time.perf_counter() - start < 10
    with pytest.raises(NotSupported, match="no DoRA here"):
        _layer_driver(tmp_path, "import sys\nprint('no DoRA here', file=sys.stderr)\nsys.exit(3)\n").layer_merge(case)


def test_a_hanging_layer_command_is_an_error_and_the_run_goes_on(tmp_path):
    prog = tmp_path / "slow.py"
    prog.write_text("import sys, time\ntime.sleep(60)\n")
    report = tmp_path / "r.json"
    result = conform_cli(tmp_path, "--candidate-cmd", f"{sys.executable} {prog} {{case}} {{out}}", "--timeout",
                         "1", "-k", "layer.forward_backward or layer.merge.linear", "--max-examples", "1",
                         "--report-json", str(report), timeout=120)  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    tests = json.loads(report.read_text())["tests"]  # a candidate that breaks fails the feature, as a driver's
    assert {t["feature"]: t["outcome"] for t in tests} == dict.fromkeys(
        ("layer.forward_backward.linear", "layer.forward_backward.conv1d", "layer.merge.linear"), "failed"
    )
    assert all("the candidate hung" in t["message"] and "ran longer than 1 s" in t["message"] for t in tests)
    assert all(t["examples"] == 1 for t in tests)  # not retried nor shrunk


def test_layer_capabilities_are_validated_naming_the_field(tmp_path):
    from conformance.consumers.command_layer import capabilities_from_declaration

    default = capabilities_from_declaration({})
    assert default.layer_layouts == {"linear", "conv1d"} and default.merge and default.unmerge
    assert not default.rslora and default.dtypes == {"float64"} and not default.model_level
    declared = capabilities_from_declaration({"rslora": True, "dtypes": ["float32"], "notes": {"x": "y"}})
    assert declared.rslora and declared.dtypes == {"float32"} and declared.merge and declared.notes["x"] == "y"
    for data, words in (({"rslroa": True}, "unknown capability 'rslroa'"), ({"rslora": 1}, "rslora must be true"),
                        ({"dtypes": ["float8"]}, "dtypes has 'float8'"), ({"layer_layouts": []}, "layer_layouts"),
                        ({"bias_modes": "all"}, "bias_modes must be a list"),
                        ({"model_level": True}, "model_level is not a capability of a command's layer level"),
                        ([], "expected a JSON object")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)):
            capabilities_from_declaration(data)
    bad = tmp_path / "caps.json"
    bad.write_text('{"merge": "yes"}')
    rc = conform_cli(tmp_path, "--candidate-cmd", f"node x.js {LAYER_ARGS}", "--cmd-capabilities", str(bad))
    assert rc.returncode == 2 and "merge must be true or false" in rc.stderr and "Traceback" not in rc.stderr
    bad.write_text("{not json")
    rc = conform_cli(tmp_path, "--candidate-cmd", f"node x.js {LAYER_ARGS}", "--cmd-capabilities", str(bad))
    assert rc.returncode == 2 and "not valid JSON" in rc.stderr


def test_the_template_fields_pick_the_level(capsys):
    from conformance.consumers.command_layer import template_level

    assert template_level("prog --case {case} --out {out}") == "layer"
    assert template_level("prog --base {base} --input {input} --out {out}") == "file"
    assert main(["conform", "--candidate-cmd", "prog {case} {input} {out}"]) == 2
    err = capsys.readouterr().err
    assert "{case}" in err and "{input}" in err
    assert main(["conform", "--candidate-cmd", "prog --case {case}"]) == 2
    assert "{out}" in capsys.readouterr().err
    assert main(["conform", "--candidate-cmd", "prog {case} {out}", "--cmd-merge"]) == 2
    assert "--cmd-merge" in capsys.readouterr().err
    assert main(["conform", "--candidate-cmd", "prog {input} {out}", "--cmd-capabilities", "c.json"]) == 2
    assert "layer-level" in capsys.readouterr().err
