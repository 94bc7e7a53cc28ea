"""``reflora driver new``: the skeleton it writes runs as is, names every driver method and capability (so it
cannot go stale), and the command refuses bad names and existing files with one line, writing nothing."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from conformance.deviations import load_deviations
from conformance.loader import METHODS
from conformance.protocol import Capabilities, Driver, NotSupported

ROOT = Path(__file__).resolve().parents[1]


def reflora(*argv: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("CI", None)  # the profile is given explicitly where it matters
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "reflora.tools", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def driver_methods() -> set[str]:
    """Every method of the protocol (conformance.protocol.Driver), core and advanced, and every one the loader calls."""
    own = {n for n, v in vars(Driver).items() if callable(v) and not n.startswith("_")}
    return own | set(METHODS)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_skeleton_runs_as_is_and_everything_is_not_supported(tmp_path):
    made = reflora("driver", "new", "mylora", "--out", str(tmp_path / "drv"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "drv"
    assert sorted(p.name for p in folder.iterdir()) == ["mylora_deviations.json", "mylora_driver.py"]
    report = tmp_path / "report.json"
    run = reflora("conform", "--candidate", "mylora_driver:driver", "--profile", "ci", "--report-json",
                  str(report), cwd=folder, pythonpath=folder)  # fmt: skip
    # every feature is "not supported": nothing was checked, which the suite reports as exit 5 (never a silent pass)
    assert run.returncode == 5, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    data = json.loads(report.read_text())
    assert data["summary"]["checked"] == 0 and data["summary"]["unknown_failures"] == 0
    assert data["features"] and {f["result"] for f in data["features"]} == {"not_supported"}
    assert data["summary"]["features_not_supported"] == data["summary"]["features"]
    # its own deviations file was found by the absolute path the skeleton builds (not relative to the cwd)
    assert Path(data["deviations"]["file"]) == (folder / "mylora_deviations.json").resolve()


def test_the_skeleton_names_every_method_and_capability(tmp_path):
    assert reflora("driver", "new", "my_lib2", "--out", str(tmp_path), cwd=tmp_path).returncode == 0
    path = tmp_path / "my_lib2_driver.py"
    source = path.read_text()
    module = load_module(path)
    driver = module.driver
    cls = type(driver)
    for method in sorted(driver_methods()):
        assert callable(vars(cls).get(method)), f"the skeleton has no {method}()"
    # every Capabilities field is written out (and explained: a comment line right above it)
    call = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Capabilities"
    )
    written = [k.arg for k in call.keywords]
    assert sorted(written) == sorted(f.name for f in fields(Capabilities))
    lines = source.splitlines()
    for keyword in call.keywords:
        assert lines[keyword.lineno - 2].strip().startswith("#"), f"capability {keyword.arg} is not explained"
    # as generated it declares nothing beyond the defaults, so every feature is "not supported"
    assert {f.name: getattr(driver.capabilities, f.name) for f in fields(Capabilities) if f.name != "notes"} == {
        f.name: getattr(Capabilities(), f.name) for f in fields(Capabilities) if f.name != "notes"
    }
    # each method says it is not written yet
    with_folder = {"save_adapter", "load_adapter_logits", "merge_and_unload"}
    for method in sorted(driver_methods() - {"versions"}):
        arguments = (None, tmp_path) if method in with_folder else (None,)
        with pytest.raises(NotSupported):
            getattr(driver, method)(*arguments)
    assert set(driver.versions()) >= {"candidate", "framework"} and driver.name == "my_lib2"
    assert Path(driver.deviations).is_absolute() and load_deviations(driver.deviations) == []
    # the traps are in it
    for trap in ("logits.float()", "use_cache", "working directory", "re-export", "model.position_ids.without_mask"):
        assert trap in source, trap


def test_refuses_to_overwrite_and_writes_nothing(tmp_path):
    existing = tmp_path / "mylora_deviations.json"
    existing.write_text("mine")
    result = reflora("driver", "new", "mylora", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mylora_deviations.json" in lines[0] and "overwrite" in lines[0], result.stderr
    assert existing.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora_deviations.json"]  # no driver file either
    # and the driver file itself
    (tmp_path / "other_driver.py").write_text("keep")
    result = reflora("driver", "new", "other", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "other_driver.py" in result.stderr
    assert (tmp_path / "other_driver.py").read_text() == "keep" and not (tmp_path / "other_deviations.json").exists()


@pytest.mark.parametrize("name", ["my-lib", "1lib", "", "_private", "lib.sub", "lïb"])
def test_a_bad_name_is_one_line_and_writes_nothing(tmp_path, name):
    result = reflora("driver", "new", name, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reflora driver new: error: NAME"), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_on_a_file_is_one_line(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    result = reflora("driver", "new", "mylora", "--out", str(target), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "afile" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_candidate_re_exporting_a_shipped_driver_keeps_its_deviations(tmp_path):
    (tmp_path / "reexported.py").write_text("from conformance.drivers.reference import driver  # noqa: F401\n")
    report = tmp_path / "report.json"
    run = reflora("conform", "--candidate", "reexported:driver", "--profile", "ci", "--max-examples", "1",
                  "-k", "layer.forward_backward.linear",
                  "--report-json", str(report), cwd=tmp_path, pythonpath=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(report.read_text())
    assert Path(data["deviations"]["file"]).resolve() == (ROOT / "conformance" / "deviations" / "reference.json")


def test_the_documented_merge_driver_works(tmp_path):
    """docs/conformance.md's complete model-level merge driver, run as a reader would (needs torch + PEFT)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    text = (ROOT / "docs" / "conformance.md").read_text()
    after = text[text.index("A complete driver for both on transformers + PEFT") :]
    code = after[after.index("```python\n") + len("```python\n") :]
    (tmp_path / "peft_merge_driver.py").write_text(code[: code.index("```")])
    peft_deviations = json.loads((ROOT / "conformance" / "deviations" / "peft.json").read_text())["deviations"]
    d9 = [d for d in peft_deviations if d["id"] in ("model.merge.safe_untouched", "model.merge.dora_zero_row")]
    deviations = tmp_path / "peft_merge_deviations.json"
    deviations.write_text(json.dumps({"driver": "peft_merge", "deviations": d9}))
    report = tmp_path / "report.json"
    run = reflora("conform", "--candidate", "peft_merge_driver:driver", "--profile", "ci", "--max-examples", "2",
                  "-k", "model.merge", "--deviations", str(deviations), "--report-json", str(report),
                  cwd=tmp_path, pythonpath=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    results = {f["id"]: f["result"] for f in json.loads(report.read_text())["features"]}
    merge = {k: v for k, v in results.items() if k.startswith("model.merge")}
    assert merge == {"model.merge.lora": "pass", "model.merge.lora_bias": "pass", "model.merge.dora": "pass",
                     "model.merge.safe": "pass", "model.merge.safe_untouched": "known_deviation",
                     "model.merge.unload": "pass", "model.merge.dora_zero_row": "known_deviation",
                     "model.merge.trainable_tokens": "not_supported",
                     "model.merge.trainable_tokens_mixed": "not_supported"}  # fmt: skip
