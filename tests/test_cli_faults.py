"""Bad input and faults, tried through the command line as a user would (issue 14, classes 1, 2, 3 and 5 for
the commands that read and write files): every one gets the exit code the docs give, ONE line on stderr naming
the field or path, no traceback, and nothing (half-)written on disk.

Most cases run ``reflora.tools.cli.main(argv)`` in-process; signals (SIGTERM, SIGINT, SIGKILL) and a full disk
(``RLIMIT_FSIZE``: a write fails with EFBIG as it would with ENOSPC) run ``python -m reflora.tools`` in a
subprocess. Everything is tiny (a 3-case corpus, a 1-layer 8-wide GPT-2, a few steps).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reflora.checkpoint import remove_stale_temps, temp_owner
from reflora.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_CASES = ROOT / "golden" / "cases"
CASES = ("bias_all", "qkv_q_v", "batch_1_full_context")
TINY = ["--n-embd", "8", "--n-layer", "1", "--n-head", "2", "--seq-len", "8", "--batch-size", "2",
        "--eval-windows", "2", "--eval-every", "0", "--quiet"]  # fmt: skip
# a bench that takes a second even if it ran (it must not: its outputs are refused first)
TINY_BENCH = ["--impl", "reference", "--layers", "1", "--n-embd", "8", "--n-head", "2", "--vocab-size", "16",
              "--seq-len", "4", "--batch", "1", "--warmup", "0", "--repeats", "1", "--matmul-n", "8", "--no-float64",
              "--threads", "1", "--lora-targets", "c_attn", "--sweep-seq-len", "4", "--timeout", "60"]  # fmt: skip
TEMP = re.compile(r"^\.(?P<name>.+)\.reflora-tmp-(?P<pid>\d+)-")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """``reflora ARGV`` in-process: (exit code, stderr), as the console script would end."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse (code 2) or a command's SystemExit("reflora ...: error: ...") (code 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    return code, capsys.readouterr().err


def message_lines(err: str) -> list[str]:
    """stderr without argparse's usage lines (``usage: ...`` and its indented continuations)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]


def assert_one_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = message_lines(err)
    assert len(lines) == 1, f"expected one message line, got {lines}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones included) with its bytes (None for folders and special files)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(folder.rglob("*"))
    }


def hidden_temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file()]


def small_corpus(folder: Path) -> Path:
    """A corpus folder with a few of the committed case specs, generated."""
    (folder / "cases").mkdir(parents=True)
    for name in CASES:
        shutil.copy(GOLDEN_CASES / f"{name}.json", folder / "cases")
    assert main(["golden", "generate", "--dir", str(folder)]) == 0
    return folder


# A reflora run in a subprocess whose fsync takes 0.3 s (a slow disk), so a signal can land mid-write.
SLOW_DISK = (
    "import os, sys, time\n"
    "real = os.fsync\n"
    "os.fsync = lambda fd: (time.sleep(0.3), real(fd))[1]\n"
    "from reflora.tools.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def start_slow(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", SLOW_DISK, *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_temp(proc: subprocess.Popen, folder: Path, timeout: float = 60) -> Path:
    """Poll until a hidden temporary file appears under ``folder`` (the write is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = hidden_temps(folder)
        if temps:
            return temps[0]
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before writing a temporary file: {err[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no temporary file appeared")


def run_subprocess(argv: list[str], cwd: Path, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "reflora.tools", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, preexec_fn=preexec, timeout=300)  # fmt: skip


def file_size_limit(n_bytes: int):
    """A ``preexec_fn``: files larger than ``n_bytes`` cannot be written (EFBIG, like a full disk)."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    return limit


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "spec.json"
    shutil.copy(GOLDEN_CASES / "bias_all.json", path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny LoRA run of 2 steps: ``checkpoints/step-2/`` (base + adapter + optimizer) and ``adapter/``."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(out), "--steps", "2", *TINY]) == 0
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ----------------------------------------------------------------------------------------------
# class 1: where a command writes (a folder, under a file, a device or fifo, "", an existing file for a folder)
# ----------------------------------------------------------------------------------------------


def _bad_file_targets(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """label -> (the path given, what the message must name)."""
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_bytes(b"keep me")
    os.mkfifo(tmp_path / "a_fifo")
    return {
        "folder": (str(tmp_path / "a_folder"), "is a folder"),
        "under a file": (str(tmp_path / "a_file" / "x.out"), "is a file, not a folder"),
        "fifo": (str(tmp_path / "a_fifo"), "not a regular file"),
        "empty": ("", "empty path"),
    }


@pytest.mark.parametrize("target", ["folder", "under a file", "fifo", "empty"])
def test_golden_generate_out_refuses_what_is_not_a_file(tmp_path, capsys, monkeypatch, spec_file, target):
    monkeypatch.chdir(tmp_path)  # "" is the current folder
    path, named = _bad_file_targets(tmp_path)[target]
    before = snapshot(tmp_path)
    code, err = cli(["golden", "generate", "--spec", spec_file, "--out", path], capsys)
    assert code == 2
    assert_one_line(err, "--out", named)
    assert snapshot(tmp_path) == before
    assert (tmp_path / "a_fifo").is_fifo()


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("target", ["folder", "under a file", "fifo", "empty"])
def test_bench_outputs_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, flag, target):
    monkeypatch.chdir(tmp_path)
    path, named = _bad_file_targets(tmp_path)[target]
    before = snapshot(tmp_path)
    code, err = cli(["bench", flag, path, *TINY_BENCH], capsys)
    assert code == 2
    assert_one_line(err, flag, named)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["merge", "train", "experiment"])
@pytest.mark.parametrize("target", ["existing file", "under a file", "empty"])
def test_folder_outputs_refuse_a_file(tmp_path, capsys, monkeypatch, trained, command, target):
    monkeypatch.chdir(tmp_path)  # "" is the current folder
    (tmp_path / "a_file").write_bytes(b"keep me")
    path, named = {
        "existing file": (tmp_path / "a_file", "is not a folder"),
        "under a file": (tmp_path / "a_file" / "sub", "is a file, not a folder"),
        "empty": ("", "empty path"),
    }[target]
    argv = {
        "merge": ["merge", trained / "checkpoints" / "step-2", trained / "adapter", "--out", path],
        "train": ["train", "--steps", "1", *TINY, "--out", path],
        "experiment": ["experiment", "why-lora", "--quick", "--out", path],
    }[command]
    before = snapshot(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "--out", named)
    assert snapshot(tmp_path) == before


def test_golden_generate_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, spec_file):
    out = tmp_path / "out" / "case.safetensors"
    out.parent.mkdir()
    done = run_subprocess(["golden", "generate", "--spec", spec_file, "--out", out], tmp_path,
                          preexec=file_size_limit(20_000))  # the fixture is 54 kB  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert_one_line(done.stderr, str(out), "cannot write")
    assert list(out.parent.iterdir()) == []


def test_merge_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, trained):
    out = tmp_path / "merged"
    done = run_subprocess(["merge", trained / "checkpoints" / "step-2", trained / "adapter", "--out", out], tmp_path,
                          preexec=file_size_limit(4_000))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert_one_line(done.stderr, "model.safetensors", "cannot write")
    assert not out.exists() or list(out.iterdir()) == []


def test_trajectory_generate_write_failure_is_one_line(tmp_path, capsys):
    folder = tmp_path / "trajectories"
    (folder / "cases").mkdir(parents=True)
    source = sorted((ROOT / "golden" / "trajectories" / "cases").glob("*.json"))[0]
    shutil.copy(source, folder / "cases")
    (folder / "fixtures").write_text("a file where the fixtures folder goes")
    code, err = cli(["trajectory", "generate", "--dir", folder], capsys)
    assert code == 1
    assert_one_line(err, "fixtures")
    assert sorted(p.name for p in folder.iterdir()) == ["cases", "fixtures"]
    assert not hidden_temps(folder)


def test_experiment_from_bad_results_is_one_line(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_bytes(b"\xff\xfe not json")
    code, err = cli(["experiment", "why-lora", "--from-results", results, "--out", tmp_path / "page"], capsys)
    assert code == 2
    assert_one_line(err, str(results), "UTF-8")
    results.write_text('{"plan": {}}')
    code, err = cli(["experiment", "why-lora", "--from-results", results, "--out", tmp_path / "page"], capsys)
    assert code == 1
    assert_one_line(err, str(results), "not the results")


# ----------------------------------------------------------------------------------------------
# class 1: too large for memory, said up front
# ----------------------------------------------------------------------------------------------


def address_space_limit(n_bytes: int):
    """A ``preexec_fn``: at most ``n_bytes`` of address space, so that a run that does allocate (as before the
    up-front check) fails fast with MemoryError instead of swapping or meeting the OOM killer."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (n_bytes, n_bytes))

    return limit


def test_golden_generate_says_how_much_memory_a_huge_spec_needs(tmp_path):
    spec = tmp_path / "huge.json"
    spec.write_text(json.dumps({"gpt2": {"vocab_size": 16, "n_positions": 2**20, "n_embd": 8, "n_layer": 1,
                                         "n_head": 2}, "batch_size": 2**16, "seq_len": 2**20, "lora": {"r": 2}}))  # fmt: skip
    done = run_subprocess(["golden", "generate", "--spec", spec, "--out", tmp_path / "huge.safetensors"], tmp_path,
                          preexec=address_space_limit(8 * 2**30))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert_one_line(done.stderr, "needs about", "TiB", "available")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.json"]


def test_train_says_how_much_memory_a_huge_model_needs_before_allocating_it(tmp_path):
    done = run_subprocess(["train", "--out", tmp_path / "run", "--steps", "1", "--n-embd", str(2**20), "--n-layer",
                           "1", "--n-head", "4", "--quiet"], tmp_path, preexec=address_space_limit(8 * 2**30))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert_one_line(done.stderr, "needs about", "available")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# class 1: train on a corpus too short, a malformed trainer_state.json
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 10_000])
def test_train_on_a_corpus_too_short_names_it_and_the_size_it_needs(tmp_path, capsys, size):
    text = tmp_path / "text.txt"
    text.write_text("x" * size)
    code, err = cli(["train", "--text-file", text, "--out", tmp_path / "run", "--steps", "2", *TINY], capsys)
    assert code == 1
    line = assert_one_line(err, str(text), "split", "--seq-len 8", "needs at least 18,440 bytes")
    assert f"{size:,} bytes" in line
    assert not (tmp_path / "run").exists()


MALFORMED_STATES = {
    "not an object": ([1, 2], "must hold a JSON object"),
    "no settings": ({"drop": "settings"}, "settings must be an object"),
    "settings.train unknown key": ({"settings.train": {"steps": 2, "bogus": 1}}, "settings.train"),
    "settings.train bad value": ({"settings.train": {"steps": -3}}, "settings.train"),
    "step not an int": ({"step": "two"}, "step must be an integer"),
    "history not a list": ({"history": {"a": 1}}, "history must be a list"),
    "lora not an object": ({"lora": 7}, "lora must be an object"),
    "bad optimizer": ({"settings.optimizer": {"name": "adamw", "momentum": 3}}, "settings.optimizer"),
    "only unknown keys": ({"only": ["nope.weight"]}, "only names"),
    "not UTF-8": (b"\xff\xfe{}", "not UTF-8"),
    "not JSON": (b"{step: 2", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_STATES))
def test_resume_from_a_malformed_trainer_state_names_the_file_and_field(tmp_path, capsys, trained, case):
    out = copy_run(trained, tmp_path)
    path = out / "checkpoints" / "step-2" / "trainer_state.json"
    change, named = MALFORMED_STATES[case]
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, list):
        path.write_text(json.dumps(change))
    else:
        state = json.loads(path.read_text())
        for key, value in change.items():
            if key == "drop":
                del state[value]
            elif key.startswith("settings."):
                state["settings"][key.split(".", 1)[1]] = value
            else:
                state[key] = value
        path.write_text(json.dumps(state))
    before = snapshot(out)
    code, err = cli(["train", "--resume", "--out", out, "--steps", "4", "--quiet"], capsys)
    assert code == 1
    assert_one_line(err, "trainer_state.json", named)
    assert snapshot(out) == before


def test_resume_with_a_latest_pointing_outside_is_refused(tmp_path, capsys, trained):
    out = copy_run(trained, tmp_path)
    (out / "checkpoints" / "latest").write_text("../../elsewhere\n")
    code, err = cli(["train", "--resume", "--out", out, "--quiet"], capsys)
    assert code == 1
    assert_one_line(err, "latest", "not a checkpoint folder")


# ----------------------------------------------------------------------------------------------
# class 1 and 2: Ctrl-C, SIGTERM and SIGKILL during `golden generate`
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_golden_generate_leaves_the_old_corpus_and_no_temporary(tmp_path, signum):
    corpus = small_corpus(tmp_path / "golden")
    before = snapshot(corpus)
    proc = start_slow(["golden", "generate", "--dir", corpus, "--force"], tmp_path)
    wait_for_temp(proc, corpus)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert_one_line(err, "reflora golden", "terminated" if signum == signal.SIGTERM else "interrupted")
    assert hidden_temps(corpus) == []
    assert snapshot(corpus) == before  # the fixtures and the manifest are replaced together or not at all


def test_a_signal_during_golden_generate_spec_leaves_no_partial_file(tmp_path, spec_file):
    out = tmp_path / "out" / "case.safetensors"
    out.parent.mkdir()
    proc = start_slow(["golden", "generate", "--spec", spec_file, "--out", out], tmp_path)
    wait_for_temp(proc, out.parent)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert_one_line(err, "terminated")
    assert list(out.parent.iterdir()) == []


def test_sigkill_leftovers_are_recognisable_and_removed_by_the_next_run(tmp_path, capsys):
    corpus = small_corpus(tmp_path / "golden")
    proc = start_slow(["golden", "generate", "--dir", corpus, "--force"], tmp_path)
    wait_for_temp(proc, corpus)
    proc.kill()
    proc.communicate(timeout=60)
    leftovers = hidden_temps(corpus)
    assert leftovers, "SIGKILL left nothing (the test did not catch the write)"
    for path in leftovers:
        match = TEMP.match(path.name)
        assert match, f"{path.name} is not named .<name>.reflora-tmp-<pid>-..."
        assert int(match["pid"]) == proc.pid and temp_owner(path.name) == proc.pid
        assert (path.parent / match["name"]).exists()  # beside the file it was going to replace
    code, err = cli(["golden", "generate", "--dir", corpus], capsys)
    assert code == 0, err
    assert hidden_temps(corpus) == []
    code, err = cli(["golden", "verify", "--dir", corpus], capsys)
    assert code == 0, err


def test_a_live_process_temporaries_are_kept(tmp_path):
    mine = tmp_path / f".x.reflora-tmp-{os.getpid()}-abc"
    mine.write_bytes(b"in progress")
    other = tmp_path / ".x.something-else.tmp"
    other.write_bytes(b"not ours")
    assert remove_stale_temps(tmp_path) == []
    assert mine.exists() and other.exists()


# ----------------------------------------------------------------------------------------------
# class 3: silent wrong answers in train, inspect and merge
# ----------------------------------------------------------------------------------------------


def test_train_steps_zero_is_refused_not_read_as_200(tmp_path, capsys):
    code, err = cli(["train", "--out", tmp_path / "run", "--steps", "0", *TINY], capsys)
    assert code == 2
    assert_one_line(err, "--steps", ">= 1", "got 0")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "optimizer.safetensors", "model.safetensors"])
def test_resume_refuses_a_checkpoint_file_whose_sha256_changed(tmp_path, capsys, trained, file_name):
    out = copy_run(trained, tmp_path)
    path = out / "checkpoints" / "step-2" / file_name
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + np.asarray(1e-3, dtype=tensors[key].dtype)  # still valid safetensors, same shapes
    save_file(tensors, str(path), metadata={"format": "pt"})
    before = snapshot(out)
    code, err = cli(["train", "--resume", "--out", out, "--steps", "4", "--quiet"], capsys)
    assert code == 1
    assert_one_line(err, file_name, "sha256 differs")
    assert snapshot(out) == before


def test_resume_of_an_intact_checkpoint_still_works(tmp_path, capsys, trained):
    out = copy_run(trained, tmp_path)
    code, err = cli(["train", "--resume", "--out", out, "--steps", "3", "--quiet"], capsys)
    assert code == 0, err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"


def test_inspect_qkv_slices_without_a_c_attn_target_is_an_error(capsys):
    code, err = cli(["inspect", "--qkv-slices", "q", "--target-modules", "c_fc", "c_proj", "--n-layer", "2"], capsys)
    assert code == 1
    assert_one_line(err, "--qkv-slices", "c_attn")
    code, err = cli(["inspect", "--qkv-slices", "q", "--target-modules", "c_attn", "--n-layer", "2", "--json"], capsys)
    assert code == 0


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_merge_refuses_an_integer_adapter_tensor_naming_the_key(tmp_path, capsys, trained, dtype):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = np.ones(tensors[key].shape, dtype=dtype)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    code, err = cli(["merge", trained / "checkpoints" / "step-2", adapter, "--out", tmp_path / "merged"], capsys)
    assert code == 2
    assert_one_line(err, key, "floating-point")
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------------------------
# class 5: errors that name the right thing
# ----------------------------------------------------------------------------------------------


def test_out_of_range_layers_to_transform_is_named_as_such(capsys):
    code, err = cli(["inspect", "--layers-to-transform", "5", "--n-layer", "2"], capsys)
    assert code == 1
    line = assert_one_line(err, "layers_to_transform", "[5]", "n_layer is 2")
    assert "matches no module" not in line


def test_a_missing_base_folder_is_named(tmp_path, capsys, trained):
    missing = tmp_path / "no_such_base"
    code, err = cli(["merge", missing, trained / "adapter", "--out", tmp_path / "merged"], capsys)
    assert code == 2
    line = assert_one_line(err, str(missing), "no such")
    assert "config.json" not in line
    code, err = cli(["train", "--base", missing, "--out", tmp_path / "run", "--steps", "1", *TINY], capsys)
    assert code == 1
    assert_one_line(err, str(missing), "no such")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run").exists()


def test_a_missing_adapter_folder_is_named(tmp_path, capsys, trained):
    missing = tmp_path / "no_such_adapter"
    code, err = cli(["merge", trained / "checkpoints" / "step-2", missing, "--out", tmp_path / "merged"], capsys)
    assert code == 2
    assert_one_line(err, str(missing), "no such adapter folder")


def test_a_non_utf8_spec_file_is_named(tmp_path, capsys):
    spec = tmp_path / "latin1.json"
    spec.write_bytes('{"description": "caf\xe9"}'.encode("latin-1"))
    code, err = cli(["golden", "generate", "--spec", spec, "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 1
    assert_one_line(err, str(spec), "not UTF-8")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_non_utf8_case_spec_in_the_corpus_is_named_once(tmp_path, capsys):
    corpus = small_corpus(tmp_path / "golden")
    before = snapshot(corpus)
    bad = corpus / "cases" / "zz_latin1.json"
    bad.write_bytes(b'{"description": "caf\xe9"}')
    code, err = cli(["golden", "generate", "--dir", corpus], capsys)
    assert code == 1
    line = assert_one_line(err, str(bad), "not UTF-8")
    assert line.count(str(bad)) == 1
    bad.unlink()
    assert snapshot(corpus) == before
