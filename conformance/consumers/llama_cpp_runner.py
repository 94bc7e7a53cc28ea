"""The part of the llama.cpp consumer that runs *inside* the ``llama`` venv (conformance.envs): llama.cpp's own
converters, then llama-cpp-python. It imports no reflora module (it is run as a script by that venv's python:
``python llama_cpp_runner.py JOB.json``) and writes what it did to ``JOB["status"]`` (JSON) and the tensors to
``JOB["out"]`` (safetensors, float32).

The job (written by conformance.consumers.llama_cpp)::

    {"llama_cpp": ".../src/llama_cpp_python-<v>/vendor/llama.cpp",  # the sdist's vendored llama.cpp
     "base": "<HF GPT-2 folder>", "adapters": {"default": "<PEFT folder>", "<name>": "<PEFT folder>", ...},
     "input": "<input.safetensors>", "out": "<out.safetensors>", "status": "<status.json>", "work": "<folder>",
     "export_lora": "<path of llama-export-lora>" | null, "threads": 1}

Steps, each recorded in the status (``steps``: [{"step", "ok", "message"}]):

1. ``convert_hf_to_gguf.py <base> --outtype f32``: the vendored converter's own GPT2Model (tensor names, the
   Conv1D transposes, hyperparameters), run in this process through its ``main()``. reflora's GPT-2 folder has
   no tokenizer files (the case feeds token ids, never text) and llama.cpp needs a vocabulary in the GGUF, so when
   the folder has no tokenizer the converter's ``set_vocab`` is replaced by a stand-in: ``vocab_size`` tokens
   ``<t0>``..``<tV-1>`` (type NORMAL), tokenizer model "gpt2", pre-tokenizer "default", one merge. Nothing else
   of the converter is touched. A config.json without ``n_ctx`` (transformers >= 4 writes ``n_positions`` only)
   gets ``n_ctx = n_positions`` in a copy of the folder (GPT2Model.set_gguf_parameters reads ``hparams["n_ctx"]``).
2. ``convert_lora_to_gguf.py --base <base> --outtype f32 <adapter>`` for every adapter, unmodified (run with
   ``runpy`` as ``__main__``); a ``SystemExit`` is the converter refusing the folder (its ERROR log is the message).
3. ``llama_cpp.Llama(model_path=base.gguf, lora_path=<adapter>.gguf, logits_all=True, n_ctx=n_positions)``: for
   each batch row b alone (``reset()``, then ``eval(input_ids[b])``), the logits of every position,
   ``scores[:T]`` (T, V), stacked to (B, T, V): ``logits`` (the top-level adapter), ``logits.<name>``.
   ``Llama`` raising (llama.cpp refusing the adapter) is recorded with llama.cpp's log line.
4. With ``export_lora``: ``llama-export-lora -m base.gguf --lora default.gguf -o merged.gguf``, then
   ``merged_logits`` from ``Llama(merged.gguf)`` and ``merged.<HF key>`` read back with gguf's GGUFReader
   (GGUF names mapped to HF's, the (out, in) GGUF matrix transposed back to HF's Conv1D (in, out)).
"""

from __future__ import annotations

import contextlib
import json
import logging
import runpy
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

# GGUF tensor name (GPT-2, llama.cpp's tensor map) -> HF GPT2LMHeadModel module of the same block
GGUF_TO_HF = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


class Status:
    """The steps taken so far, written to the status file after each step (a crash leaves the last one)."""

    def __init__(self, path: Path):
        self.path, self.steps, self.extra = Path(path), [], {}

    def add(self, step: str, ok: bool, message: str = "") -> None:
        self.steps.append({"step": step, "ok": ok, "message": message[-4000:]})
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps({"steps": self.steps, **self.extra}, indent=1) + "\n")


class Capture(logging.Handler):
    """Keeps the converters' log records (their ERROR lines say why a folder was refused)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}:{record.name}:{record.getMessage()}")

    def errors(self) -> str:
        return "\n".join(line for line in self.lines if line.startswith(("ERROR", "CRITICAL")))


def prepared_base(base: Path, work: Path) -> Path:
    """``base``, or a copy of it whose config.json has ``n_ctx`` (= ``n_positions``) when it lacked one."""
    config = json.loads((base / "config.json").read_text())
    if "n_ctx" in config:
        return base
    copy = work / "base-for-gguf"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base, copy)
    config["n_ctx"] = config["n_positions"]
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


@contextlib.contextmanager
def stand_in_vocab(base: Path):
    """Replace the vendored GPT2Model.set_vocab by the stand-in vocabulary of the module docstring (step 1) while
    the base is converted, when ``base`` has no tokenizer files; restore it afterwards."""
    from conversion import gpt2  # the vendored converter's package (on sys.path)

    if any((base / name).is_file() for name in TOKENIZER_FILES):
        yield
        return
    import gguf

    original = gpt2.GPT2Model.set_vocab

    def set_vocab(self) -> None:
        n = int(self.hparams["vocab_size"])
        self.gguf_writer.add_tokenizer_model("gpt2")
        self.gguf_writer.add_tokenizer_pre("default")
        self.gguf_writer.add_token_list([f"<t{i}>" for i in range(n)])
        self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * n)
        self.gguf_writer.add_token_merges(["<t0> <t1>"])

    gpt2.GPT2Model.set_vocab = set_vocab
    try:
        yield
    finally:
        gpt2.GPT2Model.set_vocab = original


def run_script(main, argv: list[str], capture: Capture) -> tuple[bool, str]:
    """Run a converter's entry point with ``sys.argv = argv``; (ok, message) where a non-zero SystemExit or an
    exception is not ok and the message is the converter's ERROR log (or the traceback)."""
    saved = sys.argv
    sys.argv = argv
    capture.lines.clear()
    try:
        main()
        return True, ""
    except SystemExit as exc:
        if exc.code in (0, None):
            return True, ""
        return False, capture.errors() or f"{argv[0]} exited with status {exc.code}"
    except Exception:
        return False, (capture.errors() + "\n" + traceback.format_exc()).strip()
    finally:
        sys.argv = saved


def run_logits(model: Path, lora: Path | None, input: str, n_ctx: int, threads: int):
    """(B, T, V) float32: each row of ``input_ids`` evaluated alone by ``llama_cpp.Llama``, the logits of every
    position. Run in a child process of its own (``logits_in_child``): llama-cpp-python can crash (SIGSEGV)."""
    import llama_cpp
    import numpy as np
    from safetensors.numpy import load_file

    ids = load_file(input)["input_ids"].astype(np.int64)
    llm = llama_cpp.Llama(model_path=str(model), lora_path=None if lora is None else str(lora), logits_all=True,
                          n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                          type_k=0, type_v=0, seed=0, verbose=True)  # fmt: skip
    try:
        rows = []
        for row in ids:
            llm.reset()
            llm.eval([int(t) for t in row])
            rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        return np.stack(rows)
    finally:
        llm.close()


def logits_in_child(model: Path, lora: Path | None, input: str, n_ctx: int, threads: int, log: Path):
    """``run_logits`` in a fresh process of this venv's python (``runner --logits ...``), its stderr (llama.cpp's
    log) in ``log``. Returns (logits or None, message): the message names a crash or an exception, with the
    llama.cpp log lines that say "failed" or "error"."""
    import numpy as np

    out = log.with_suffix(".npy")
    cmd = [sys.executable, __file__, "--logits", str(model), "-" if lora is None else str(lora), input, str(out),
           str(n_ctx), str(threads)]  # fmt: skip
    with open(log, "w") as err:
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err).returncode
    text = log.read_text(errors="replace")
    said = [line for line in text.splitlines() if "failed" in line or "error" in line.lower()]
    if code == 0 and out.is_file():
        return np.load(out), ""
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return None, f"llama_cpp.Llama(model_path, lora_path={lora}) {how}; llama.cpp said: " + " | ".join(said[-6:])


def merged_weights(path: Path) -> dict:
    """``merged.<HF key>`` (HF Conv1D layout (in, out), float32) of the LoRA-able matrices in a GGUF file."""
    import numpy as np
    from gguf import GGUFReader

    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        parts = tensor.name.split(".")  # blk.<i>.<kind>.weight
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_TO_HF and parts[3] == "weight":
            matrix = np.array(tensor.data, dtype=np.float32)  # numpy shape = GGUF ne reversed = (out, in)
            out[f"merged.transformer.h.{parts[1]}.{GGUF_TO_HF[parts[2]]}.weight"] = np.ascontiguousarray(matrix.T)
    return out


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    status = Status(Path(job["status"]))
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    vendored = Path(job["llama_cpp"])
    sys.path.insert(0, str(vendored))
    sys.path.insert(1, str(vendored / "gguf-py"))
    capture = Capture()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger().addHandler(capture)

    import convert_hf_to_gguf  # the vendored converter (step 1)
    import numpy as np
    from safetensors.numpy import save_file

    base = Path(job["base"])
    config = json.loads((base / "config.json").read_text())
    n_ctx = int(config["n_positions"])
    source = prepared_base(base, work)
    base_gguf = work / "base.gguf"
    with stand_in_vocab(source):
        ok, message = run_script(convert_hf_to_gguf.main, ["convert_hf_to_gguf.py", str(source), "--outtype", "f32",
                                 "--outfile", str(base_gguf)], capture)  # fmt: skip
    status.add("convert_base", ok and base_gguf.is_file(), message)
    if not (ok and base_gguf.is_file()):
        return 0

    lora_script = str(vendored / "convert_lora_to_gguf.py")
    ggufs = {}
    for name, folder in job["adapters"].items():
        target = work / f"lora-{name}.gguf"
        ok, message = run_script(lambda: runpy.run_path(lora_script, run_name="__main__"),
                                 [lora_script, "--base", str(source), "--outtype", "f32", "--outfile", str(target),
                                  str(folder)], capture)  # fmt: skip
        ok = ok and target.is_file()
        status.add(f"convert_lora:{name}", ok, message)
        if ok:
            ggufs[name] = target
    if set(ggufs) != set(job["adapters"]):
        return 0

    import llama_cpp

    status.extra["llama_cpp_python"] = llama_cpp.__version__
    results = {}
    for i, (name, gguf_file) in enumerate(ggufs.items()):
        key = "logits" if i == 0 else f"logits.{name}"
        logits, message = logits_in_child(base_gguf, gguf_file, job["input"], n_ctx, job["threads"],
                                          work / f"llama-{name}.log")  # fmt: skip
        status.add(f"llama:{name}", logits is not None, message)
        if logits is not None:
            results[key] = logits
    export = job.get("export_lora")
    if export:
        merged = work / "merged.gguf"
        cmd = [export, "-m", str(base_gguf), "--lora", str(ggufs["default"]), "-o", str(merged),
               "-t", str(job["threads"])]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok = proc.returncode == 0 and merged.is_file()
        status.add("export_lora", ok, (proc.stdout + proc.stderr)[-3000:])
        if ok:
            logits, message = logits_in_child(merged, None, job["input"], n_ctx, job["threads"],
                                              work / "llama-merged.log")  # fmt: skip
            status.add("llama:merged", logits is not None, message)
            if logits is not None:
                results["merged_logits"] = logits
            results.update(merged_weights(merged))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in results.items()}, job["out"])
    status.extra["results"] = sorted(results)
    status.write()
    return 0


def logits_main(argv: list[str]) -> int:
    """``--logits MODEL LORA|- INPUT OUT.npy N_CTX THREADS``: run_logits, saved with numpy."""
    import numpy as np

    model, lora, input, out, n_ctx, threads = argv
    logits = run_logits(Path(model), None if lora == "-" else Path(lora), input, int(n_ctx), int(threads))
    np.save(out, logits)
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent  # on sys.path as the script's folder: its llama_cpp.py is not llama_cpp
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(logits_main(sys.argv[2:]) if sys.argv[1] == "--logits" else main(sys.argv[1]))
