"""llama.cpp through llama-cpp-python: the GGUF conversion of the base and of the adapter, then the logits.

What a user does to run a PEFT adapter in llama.cpp, on the case's files (conformance.files):

1. ``convert_hf_to_gguf.py <base> --outtype f32`` (llama.cpp's converter, vendored in llama-cpp-python's sdist);
2. ``convert_lora_to_gguf.py --base <base> --outtype f32 <adapter>`` (the same; it reads ``lora_alpha`` from
   adapter_config.json and nothing else of it: llama.cpp applies a LoRA tensor pair as
   ``W x + (alpha / r_t) · B (A x)`` with r_t the rank of that tensor pair, ``llama_adapter_lora_weight::get_scale``);
3. ``llama_cpp.Llama(model_path=base.gguf, lora_path=adapter.gguf, logits_all=True)``, each batch row evaluated
   alone, the logits of every position;
4. merge: ``llama-export-lora -m base.gguf --lora adapter.gguf -o merged.gguf`` when the ``llama`` venv has it
   (llama-cpp-python's wheel ships no tools; conformance.envs builds this one from the kept build tree).

Steps 1-4 run in the ``llama`` venv (conformance.envs; ``python -m conformance.envs build llama``, about 15 minutes
on 2 cores; built only on request, never by ``envs build all``, ``reflora matrix`` or CI). Without it the consumer
is not run at all: ``not_ready`` says why (``NOT_BUILT``), ``reflora conform --consumer llama_cpp`` exits with that
error and ``reflora matrix`` skips the consumer, keeping its stored report; a venv whose llama-export-lora did not
build is refused the same way whenever ``file.merge.logits`` is selected (``MERGE_NOT_BUILT``). It runs as one
process of that venv's python per case (this module runs wherever reflora does):
conformance/consumers/llama_cpp_runner.py, which says exactly what is run
and the two translations it makes (reflora's GPT-2 folder has no tokenizer and no ``n_ctx``). Everything is float32
(f32 GGUF files, llama.cpp's CPU backend computes in float32, but GELU through an fp16 table: docs/findings.md),
so the comparison is the suite's float32 policy, as for the other consumers. This module only writes the job, runs the venv's python and reads the results back.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conformance.files import FILE_FEATURE_IDS
from conformance.protocol import CandidateError

RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
GROUP = "llama"
TIMEOUT = 900.0  # seconds per case: three converter/llama.cpp steps, each importing torch in a cold venv

NOT_SUPPORTED = {
    "file.load.lora_bias": "convert_lora_to_gguf.py (llama.cpp, vendored in llama-cpp-python 0.3.36) refuses the "
    "file: it exits with \"Unexpected name '...lora_B.bias': Not a lora_A or lora_B tensor\"; a GGUF LoRA adapter "
    "holds only <tensor>.lora_a / .lora_b pairs, and llama.cpp's llama_adapter_lora_weight has no bias",
    "file.load.dora": "convert_lora_to_gguf.py exits with \"Unexpected name '...lora_magnitude_vector': Not a "
    'lora_A or lora_B tensor": llama.cpp has no DoRA (llama_adapter_lora_weight holds a and b only)',
    "file.merge.dora": "no DoRA in llama.cpp: convert_lora_to_gguf.py refuses lora_magnitude_vector, and "
    "llama-export-lora merges only W + (alpha / r) B A",
    "file.load.padding": "llama.cpp takes no attention mask: llama_decode's llama_batch carries token, pos, "
    "seq_id and logits flags only (a padded row is sent without its pad tokens instead, which is not what the "
    "feature checks)",
}
NOT_BUILT = ("the llama venv is not built: run `python -m conformance.envs build llama` first (llama-cpp-python "
             "from source, about 15 minutes on 2 cores; built only on request, never by `envs build all`, "
             "`reflora matrix` or CI)")  # fmt: skip
MERGE_NOT_BUILT = ("file.merge.logits needs llama-export-lora, which the llama venv's build did not produce "
                   "(llama-cpp-python's wheel ships no tools; conformance.envs builds it from the kept build tree and "
                   "recorded it as failed): rebuild with `python -m conformance.envs build llama --rebuild`, or leave "
                   "the feature out (-k)")  # fmt: skip
MERGE_FEATURE = "file.merge.logits"


def env_folder() -> Path:
    from conformance.envs import env_root

    return env_root() / GROUP


def marker() -> dict | None:
    """The ``llama`` venv's marker (conformance.envs) when it is built with this group's pinned sdist, else None.
    The fingerprint is not required: the runner needs only the venv's own packages, not reflora inside it."""
    from conformance.envs import GROUPS, read_marker, venv_python

    folder = env_folder()
    found = read_marker(folder)
    if not found or found.get("sdist") != GROUPS[GROUP].sdist or not venv_python(folder).exists():
        return None
    return found


def available() -> bool:
    """Whether the ``llama`` venv is built (the tests skip without it)."""
    return marker() is not None


def export_lora() -> str | None:
    """The venv's llama-export-lora binary, when it was built."""
    found = (marker() or {}).get("extra_builds", {}).get("llama-export-lora")
    return found if found and Path(found).is_file() else None


class LlamaCpp:
    name = "llama_cpp"
    file_features = frozenset(f for f in FILE_FEATURE_IDS if f not in NOT_SUPPORTED)

    def __init__(self):
        self.last_status: dict = {}
        self.notes: dict[str, str] = {
            **NOT_SUPPORTED,
            "base_translation": "the base folder is converted with a stand-in vocabulary (it has no tokenizer; the "
            "case feeds token ids) and n_ctx = n_positions in a copy of config.json (the vendored GPT2Model reads "
            "n_ctx, which transformers 5 does not write); the adapter folder goes to convert_lora_to_gguf.py as it is",
        }

    def not_ready(self, features=FILE_FEATURE_IDS) -> str | None:
        """Why the consumer cannot run ``features`` on this machine (None: it can): the ``llama`` venv is not built
        (``NOT_BUILT``), or ``file.merge.logits`` is among them and llama-export-lora did not build
        (``MERGE_NOT_BUILT``). ``reflora conform --consumer`` exits with it, ``reflora matrix`` skips the consumer."""
        if not available():
            return NOT_BUILT
        if MERGE_FEATURE in features and export_lora() is None:
            return MERGE_NOT_BUILT
        return None

    def versions(self) -> dict[str, str]:
        """llama-cpp-python's version (the candidate, the group's pinned sdist), the vendored gguf-py's, torch's."""
        import tomllib

        from conformance.envs import GROUPS, sdist_folder

        pinned = GROUPS[GROUP].sdist.split("==")[1]
        freeze = dict(line.split("==", 1) for line in (marker() or {}).get("freeze", []) if "==" in line)
        source = sdist_folder(env_folder()) if available() else None
        gguf = "?"
        if source is not None and (source / "vendor/llama.cpp/gguf-py/pyproject.toml").is_file():
            gguf = tomllib.loads((source / "vendor/llama.cpp/gguf-py/pyproject.toml").read_text())["project"]["version"]
        return {"candidate": f"llama-cpp-python {pinned}",
                "converter": f"llama.cpp convert_hf_to_gguf.py / convert_lora_to_gguf.py vendored in "
                             f"llama-cpp-python {pinned}, gguf {gguf}",
                "framework": f"llama.cpp CPU backend (ggml); converters on torch {freeze.get('torch', '?')}"}  # fmt: skip

    def consume(self, base: Path, adapter: Path, input: Path, out_dir: Path) -> dict:
        """Run llama_cpp_runner.py in the ``llama`` venv on the case; the results it wrote (float64).

        A step that llama.cpp refuses (a converter exiting, ``Llama`` not loading the converted adapter) leaves
        its result out, so the check reports it missing: a failure of the consumer on valid files. The runner's
        status (every step, llama.cpp's message) is kept in ``self.last_status`` and ``<out_dir>/status.json``.
        """
        from conformance.consumers.torch_common import subfolders
        from conformance.envs import GROUPS, env_variables, sdist_folder, venv_python
        from reflora.checkpoint import read_safetensors

        if not available():  # not a property of llama.cpp: an error, never a "not supported" cell
            raise CandidateError("not run", NOT_BUILT)
        folder = env_folder()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        adapters = {"default": str(adapter), **{n: str(Path(adapter) / n) for n in subfolders(adapter)}}
        job = {"llama_cpp": str(sdist_folder(folder) / "vendor" / "llama.cpp"), "base": str(base),
               "adapters": adapters, "input": str(input), "out": str(out_dir / "out.safetensors"),
               "status": str(out_dir / "status.json"), "work": str(out_dir / "work"),
               "export_lora": export_lora(), "threads": 1}  # fmt: skip
        (out_dir / "job.json").write_text(json.dumps(job, indent=1) + "\n")
        cmd = [str(venv_python(folder)), str(RUNNER), str(out_dir / "job.json")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                                  env=env_variables(GROUPS[GROUP], folder))  # fmt: skip
        except subprocess.TimeoutExpired:
            raise CandidateError("timeout", f"{' '.join(cmd)} ran longer than {TIMEOUT:g} s") from None
        (out_dir / "stderr.txt").write_text(proc.stderr)
        try:
            self.last_status = json.loads((out_dir / "status.json").read_text())
        except (OSError, ValueError):
            self.last_status = {}
        if proc.returncode != 0:
            kind = "crashed" if proc.returncode < 0 else "raised"
            raise CandidateError(kind, f"{' '.join(cmd)} exited with status {proc.returncode}", proc.stderr[-3000:])
        steps = self.last_status.get("steps", [])
        if not steps or not steps[0]["ok"]:
            message = steps[0]["message"] if steps else proc.stderr[-3000:]
            raise CandidateError("raised", "convert_hf_to_gguf.py could not convert the base folder", message)
        out = out_dir / "out.safetensors"
        return {k: v.astype("float64") for k, v in read_safetensors(out).items()} if out.is_file() else {}


consumer = LlamaCpp()
