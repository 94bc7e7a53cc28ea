"""The llama.cpp consumer (conformance/consumers/llama_cpp.py): llama.cpp's GGUF converters and llama-cpp-python,
on files reflora wrote. Every test but the last needs the ``llama`` venv (``python -m conformance.envs build
llama``, a source build of about 15 minutes on 2 cores) and skips cleanly without it, so the default CI run does
not build it; the last ones check that, without the venv, the consumer is not run at all (``reflora conform`` exits
with the build command, ``reflora matrix`` skips it and keeps its stored report) and nothing is built.

Besides each feature's verdict, the tests pin the three causes found (docs/findings.md, "llama.cpp"): the
converter transposes PEFT's A and B of GPT-2's Conv1D modules (llama.cpp refuses the file and llama-cpp-python
crashes), ggml's fp16 GELU table (the floor under every logit), and the scalings the converter drops (rsLoRA,
alpha_pattern), the last two measured on a file whose transposition was undone by hand (``undo_transpose``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conformance.consumers import llama_cpp
from conformance.files import (
    FILE_FEATURE_IDS,
    FILE_FEATURES,
    check_file_case,
    consumer_deviations,
    draw_file_case,
    expected_results,
    run_file_feature,
    write_file_case,
)
from reflora.checkpoint import read_safetensors, safetensors_bytes

needs_env = pytest.mark.skipif(not llama_cpp.available(), reason="the llama venv is not built "
                               "(python -m conformance.envs build llama)")  # fmt: skip

KNOWN = ["file.load.c_attn", "file.load.all_targets", "file.load.rslora", "file.load.patterns", "file.load.layers",
         "file.load.several", "file.dtype.float32", "file.dtype.float16", "file.dtype.bfloat16", "file.merge.logits"]  # fmt: skip
NOT_SUPPORTED = ["file.load.lora_bias", "file.load.dora", "file.load.padding", "file.merge.dora"]


@needs_env
def test_every_file_feature_has_a_verdict():
    assert sorted(KNOWN + NOT_SUPPORTED) == sorted(FILE_FEATURE_IDS)
    consumer = llama_cpp.consumer
    assert set(KNOWN) <= consumer.file_features and not set(NOT_SUPPORTED) & consumer.file_features
    ids = {d.id for d in consumer_deviations(consumer)}
    assert ids == set(KNOWN)
    for feature in NOT_SUPPORTED:
        assert "llama" in consumer.notes[feature] or "converter" in consumer.notes[feature]


@needs_env
@pytest.mark.parametrize("feature", KNOWN)
def test_known_deviation(feature, tmp_path):
    consumer = llama_cpp.consumer
    outcome = run_file_feature(consumer, FILE_FEATURE_IDS[feature], tmp_path, examples=1,
                               deviations=consumer_deviations(consumer))  # fmt: skip
    assert outcome.outcome == "known_deviation", outcome.detail


@needs_env
@pytest.mark.parametrize("feature", NOT_SUPPORTED)
def test_not_supported(feature, tmp_path):
    outcome = run_file_feature(llama_cpp.consumer, FILE_FEATURE_IDS[feature], tmp_path, examples=1)
    assert outcome.outcome == "not_supported" and outcome.detail


def _case(variant: str, seed: int, tmp_path, undo: bool = False):
    feature = next(f for f in FILE_FEATURES if f.variant == variant)
    case = draw_file_case(variant, seed)
    paths = write_file_case(case, tmp_path / "case")
    if undo:
        undo_transpose(paths["adapter"])
    results = llama_cpp.consumer.consume(paths["base"], paths["adapter"], paths["input"], tmp_path / "out")
    return feature, case, results, llama_cpp.consumer.last_status


def undo_transpose(adapter) -> None:
    """Rewrite every adapter_model.safetensors under ``adapter`` with lora_A := B^T (r, out) and lora_B := A^T
    (in, r): convert_lora_to_gguf.py's Conv1D transposition then gives back llama.cpp's a = A, b = B. The
    workaround a user would need; the consumer itself never does it."""
    for file in adapter.rglob("adapter_model.safetensors"):
        tensors = read_safetensors(file)
        out = dict(tensors)
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                other = key.replace(".lora_A.", ".lora_B.")
                out[key], out[other] = np.ascontiguousarray(tensors[other].T), np.ascontiguousarray(tensors[key].T)
        file.write_bytes(safetensors_bytes(out, {"format": "pt"}))


def _error(case, feature, results, name="logits", fp16_gelu=False, monkeypatch=None) -> float:
    """Normwise error max|got - ref| / max|ref| of ``name`` against the float64 reference of ``case``, with
    GELU's input and output rounded to float16 (ggml's table) when ``fp16_gelu``; padded positions dropped."""
    if fp16_gelu:
        import reflora.model

        exact = reflora.model.gelu_forward

        def gelu16(x):
            y, cache = exact(np.asarray(x).astype(np.float16).astype(np.float64))
            return np.asarray(y).astype(np.float16).astype(np.float64), cache

        monkeypatch.setattr(reflora.model, "gelu_forward", gelu16)
    expected = expected_results(case, feature.merge)[name][0]
    if fp16_gelu:
        monkeypatch.undo()
    got = np.asarray(results[name], dtype=np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@needs_env
def test_the_converter_transposes_gpt2_lora_and_llama_cpp_python_crashes(tmp_path):
    """The converted c_attn pair is (B^T, A^T): llama.cpp refuses it, llama-cpp-python does not notice the NULL
    adapter and dies with SIGSEGV; no logits come back."""
    _, _, results, status = _case("plain", 3, tmp_path)
    steps = {s["step"]: s for s in status["steps"]}
    assert steps["convert_lora:default"]["ok"]
    llama = steps["llama:default"]
    assert not llama["ok"] and "signal 11" in llama["message"] and "incorrect shape" in llama["message"]
    assert "logits" not in results


@needs_env
def test_with_the_transposition_undone_only_the_fp16_gelu_floor_remains(tmp_path, monkeypatch):
    """alpha/r, every target kind, the merge: right once A and B are un-transposed; the logits are then
    ~1e-3 off the float32 reference and within 1e-5 of the reference with ggml's fp16 GELU; merged weights exact."""
    feature, case, results, _ = _case("merge", 1, tmp_path, undo=True)
    comparisons = {c.name: c for c in check_file_case(case, feature, results)}
    assert all(c.passed for n, c in comparisons.items() if n.startswith("merged.transformer"))
    assert not comparisons["logits"].passed
    for name in ("logits", "merged_logits"):
        assert 1e-4 < _error(case, feature, results, name) < 5e-3
        assert _error(case, feature, results, name, fp16_gelu=True, monkeypatch=monkeypatch) < 1e-5


@needs_env
@pytest.mark.parametrize("variant", ["rslora", "patterns"])
def test_the_converter_drops_rslora_and_alpha_pattern(variant, tmp_path, monkeypatch):
    """With the transposition undone: the logits are those of the adapter without use_rslora (alpha/r) or
    without alpha_pattern (one global lora_alpha; rank_pattern holds: the rank is each tensor pair's)."""
    feature, case, results, _ = _case(variant, 1, tmp_path, undo=True)
    assert _error(case, feature, results, fp16_gelu=True, monkeypatch=monkeypatch) > 1e-2
    lora, tensors = case.adapters["default"]
    dropped = dataclasses.replace(lora, use_rslora=False, alpha_pattern={})
    as_converted = dataclasses.replace(case, adapters={"default": (dropped, tensors)})
    assert _error(as_converted, feature, results, fp16_gelu=True, monkeypatch=monkeypatch) < 1e-5


@needs_env
@pytest.mark.parametrize("variant", ["lora_bias", "dora"])
def test_the_converter_refuses_lora_bias_and_dora(variant, tmp_path):
    """The reasons of the not-supported cells: convert_lora_to_gguf.py exits on lora_B.bias and on
    lora_magnitude_vector ("Unexpected name ... Not a lora_A or lora_B tensor")."""
    _, _, results, status = _case(variant, 1, tmp_path)
    step = {s["step"]: s for s in status["steps"]}["convert_lora:default"]
    key = "lora_B.bias" if variant == "lora_bias" else "lora_magnitude_vector"
    assert not step["ok"] and "Not a lora_A or lora_B tensor" in step["message"] and key in step["message"]
    assert results == {}


@needs_env
def test_the_base_needs_n_ctx_and_a_tokenizer(tmp_path):
    """The two translations of the runner, pinned: the vendored GPT2Model reads hparams["n_ctx"] (absent from a
    transformers 5 config.json), and the base GGUF gets the stand-in vocabulary of vocab_size tokens."""
    _, case, _, status = _case("plain", 3, tmp_path)
    assert status["steps"][0] == {"step": "convert_base", "ok": True, "message": ""}
    assert "n_ctx" not in json.loads((tmp_path / "case" / "base" / "config.json").read_text())
    from_gguf = (tmp_path / "out" / "work" / "base.gguf").read_bytes()
    assert b"tokenizer.ggml.tokens" in from_gguf and f"<t{case.config.vocab_size - 1}>".encode() in from_gguf


def test_without_the_venv_the_consumer_is_not_run_and_nothing_is_built(tmp_path, monkeypatch, capsys):
    """A machine without the llama venv (a fresh CI machine): nothing of llama.cpp is reported, nothing is built.
    ``reflora conform --consumer llama_cpp`` exits 2 naming the build command; ``reflora matrix`` skips the
    consumer with a printed line and keeps its stored report (rendered as before); ``consume`` raises "not run"
    (an error, never a "not supported" cell)."""
    from conformance.protocol import CandidateError
    from reflora.tools import matrix
    from reflora.tools.cli import main

    monkeypatch.setenv("REFLORA_ENV_DIR", str(tmp_path / "envs"))
    assert not llama_cpp.available()
    consumer = llama_cpp.LlamaCpp()
    assert consumer.not_ready() == llama_cpp.NOT_BUILT
    assert "python -m conformance.envs build llama" in llama_cpp.NOT_BUILT
    assert main(["conform", "--consumer", "llama_cpp", "--report-json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "llama_cpp cannot run on this machine" in err and "python -m conformance.envs build llama" in err
    assert not (tmp_path / "r.json").exists()
    paths = write_file_case(draw_file_case("plain", 1), tmp_path / "case")
    with pytest.raises(CandidateError, match="not run: the llama venv is not built"):
        consumer.consume(paths["base"], paths["adapter"], paths["input"], tmp_path / "out")

    assert matrix.skip_unready(matrix.all_consumers()) == {"llama_cpp": llama_cpp.NOT_BUILT}
    assert "consumer llama_cpp: not run, the llama venv is not built" in capsys.readouterr().err
    reports = tmp_path / "reports"
    stored = json.dumps({**_stored_report(), "created": "2026-01-01T00:00:00Z"})
    (reports / matrix.CONSUMERS_DIR).mkdir(parents=True)
    (reports / matrix.CONSUMERS_DIR / "llama_cpp.json").write_text(stored)
    code = matrix.main(["--consumers", "llama_cpp", "--no-image", "--docs-dir", str(tmp_path / "docs"),
                        "--reports-dir", str(reports)])  # fmt: skip
    assert code == 1  # named on the command line, not runnable here: no usable run
    assert (reports / matrix.CONSUMERS_DIR / "llama_cpp.json").read_text() == stored  # kept as it was
    page = (tmp_path / "docs" / matrix.MATRIX_FILE).read_text()
    assert "| llama_cpp | " in page and "2026-01-01T00:00:00Z" in page and "not run" not in page
    assert not (tmp_path / "envs").exists()


def _stored_report() -> dict:
    """A minimal llama_cpp ``reflora-consumer/1`` report (as a committed one)."""
    results = [{"feature": f, "title": f, "outcome": "known_deviation", "examples": 1, "worst_ratio": 0.0,
                "detail": "d", "reason": "r"} for f in KNOWN]  # fmt: skip
    return {"format": "reflora-consumer/1", "level": "file", "candidate": "llama_cpp",
            "versions": {"candidate": "llama-cpp-python 0.3.36"},
            "consumer": {"name": "llama_cpp", "versions": {"candidate": "llama-cpp-python 0.3.36"}, "notes": {}},
            "reflora": {"version": "0"}, "settings": {"examples": 3, "keyword": None}, "results": results,
            "deviations": [], "summary": {"runtime_s": 1.0}}  # fmt: skip


def test_a_venv_without_llama_export_lora_refuses_the_merge_feature_only(monkeypatch):
    """A llama venv whose optional llama-export-lora build failed: file.merge.logits is still declared (not turned
    into a "not supported" cell), and running it is refused with the rebuild command; the other features run."""
    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    monkeypatch.setattr(llama_cpp, "export_lora", lambda: None)
    consumer = llama_cpp.LlamaCpp()
    assert "file.merge.logits" in consumer.file_features
    assert consumer.not_ready() == llama_cpp.MERGE_NOT_BUILT and "build llama --rebuild" in llama_cpp.MERGE_NOT_BUILT
    assert consumer.not_ready(["file.load.c_attn", "file.merge.dora"]) is None


def test_notes_are_per_instance():
    one, two = llama_cpp.LlamaCpp(), llama_cpp.LlamaCpp()
    one.notes["x"] = "y"
    assert "x" not in two.notes and "notes" not in vars(llama_cpp.LlamaCpp)


def test_envs_build_all_leaves_llama_out(monkeypatch, capsys):
    """``python -m conformance.envs build all`` builds every group but llama (a 15-minute source build, built only
    when named)."""
    from conformance import envs

    built = []
    monkeypatch.setattr(envs, "ensure_env", lambda name, rebuild=False: built.append(name) or envs.env_root() / name)
    assert envs.main(["build", "all"]) == 0
    assert "llama" not in built and sorted(built) == sorted(g for g in envs.GROUPS if g != "llama")
    assert "llama: skipped (built only on request: python -m conformance.envs build llama)" in capsys.readouterr().out
    assert envs.GROUPS["llama"].on_request
