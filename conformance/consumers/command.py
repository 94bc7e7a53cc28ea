"""A command candidate: any program, in any language, run once per case (``reflora conform --candidate-cmd``).

The template's fields are replaced by paths (shell-quoted): ``{base}`` (HF GPT-2 folder), ``{adapter}`` (PEFT
adapter folder), ``{input}`` (safetensors: ``input_ids`` (B, T) I64, ``attention_mask`` (B, T) I64) and
``{out}`` (the safetensors file the program writes: ``logits`` (B, T, V) F32 or F64, and optionally
``logits.<name>``, ``merged_logits``, ``merged.<HF key>``). docs/conformance.md, "Command candidates".

Isolation: the program runs in its own process for every case, under the timeout; a non-zero exit, a timeout, a
missing or unreadable output file or a non-float result is a ``CandidateError`` naming the case's command and
the tail of its stderr. Exit status 3 with a message on stderr means "not supported" (``NotSupported``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import numpy as np

from conformance.files import FILE_FEATURE_IDS, read_results
from conformance.protocol import CandidateError, NotSupported

NOT_SUPPORTED_EXIT = 3
FIELDS = ("base", "adapter", "input", "out")


class CommandConsumer:
    """``template``: a shell command with ``{base}``, ``{adapter}``, ``{input}``, ``{out}``; ``features``: the
    ``file.*`` ids it takes (default: every non-merge feature; ``merge`` adds the merge features)."""

    def __init__(self, template: str, timeout: float = 60.0, features=None, merge: bool = False):
        missing = [f for f in ("input", "out") if "{" + f + "}" not in template]
        if missing:
            raise ValueError(f"--candidate-cmd needs the fields {{input}} and {{out}}; {template!r} lacks "
                             + ", ".join("{" + m + "}" for m in missing))  # fmt: skip
        self.template, self.timeout = template, timeout
        self.name = f"cmd:{shlex.split(template)[0]}"
        default = {f for f in FILE_FEATURE_IDS if merge or not f.startswith("file.merge.")}
        self.file_features = frozenset(features or default)
        self.notes = {f: "the command declares no merge (pass merge=True)" for f in FILE_FEATURE_IDS
                      if f not in self.file_features}  # fmt: skip

    def versions(self) -> dict[str, str]:
        return {"candidate": self.name}

    def command(self, paths: dict[str, Path]) -> str:
        return self.template.format(**{k: shlex.quote(str(v)) for k, v in paths.items()})

    def consume(self, base: Path, adapter: Path, input: Path, out_dir: Path) -> dict:
        """Run the command on the case's files, read ``{out}`` back (float64)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        out = Path(out_dir) / "out.safetensors"
        cmd = self.command({"base": base, "adapter": adapter, "input": input, "out": out})
        tail = run_command(cmd, self.timeout)
        if not out.is_file():
            raise CandidateError("raised", f"{cmd} exited 0 but wrote no {out}", tail)
        try:
            results = read_results(out)
        except Exception as exc:
            raise CandidateError("raised", f"{out}: not a readable safetensors file ({exc})", tail) from None
        if "logits" not in results:
            raise CandidateError("raised", f"{out} has no 'logits' tensor (has {sorted(results)})", tail)
        bad = [k for k, v in results.items() if not np.issubdtype(v.dtype, np.floating)]
        if bad:
            raise CandidateError("raised", f"{out}: {bad[0]} is not a float tensor", tail)
        return results


def run_command(cmd: str, timeout: float) -> str:
    """Run ``cmd`` through the shell in its own process session under ``timeout`` seconds; the tail of its
    stderr. A timeout kills the whole session (a shell and what it started) and, like a non-zero exit, is a
    ``CandidateError``; exit status 3 is ``NotSupported`` (its stderr the reason). Shared by both levels of
    command candidates (this module's ``CommandConsumer``, conformance.consumers.command_layer)."""
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: a shell and what it started
        proc.communicate()
        raise CandidateError("timeout", f"{cmd} ran longer than {timeout:g} s") from None
    tail = stderr.decode(errors="replace")[-2000:]
    if proc.returncode == NOT_SUPPORTED_EXIT:
        raise NotSupported(tail.strip() or f"{cmd} exited {NOT_SUPPORTED_EXIT} (not supported)")
    if proc.returncode != 0:
        kind = "crashed" if proc.returncode < 0 else "raised"
        raise CandidateError(kind, f"{cmd} exited with status {proc.returncode}", tail)
    return tail
