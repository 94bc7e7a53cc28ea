"""The layer level of a command candidate: a LoRA layer in any language, run once per case, behind the driver
protocol (``reflora conform --candidate-cmd 'prog --case {case} --out {out}'``; docs/conformance.md, "Command
candidates", "Layer level").

``CommandLayerDriver(template, capabilities, timeout)`` is an ordinary driver (conformance/protocol.py) with the
two layer methods ``layer_forward_backward`` and ``layer_merge``: for every call it writes the ``LayerCase`` to
``{case}`` (safetensors, float64 tensors, the scalars as JSON text in ``__metadata__``), runs the command
(``conformance.consumers.command.run_command``: own process session, timeout, exit 3 = not supported, any other
non-zero exit a candidate error with the tail of stderr) and reads ``{out}`` back (float tensors under the
protocol's result names, ``trainable`` as JSON text in ``__metadata__``). So every layer feature, check, report
and replay of the suite works unchanged.

The suite loads drivers by name in its worker processes, so the CLI passes the template, the capabilities file
and the command timeout in environment variables (``TEMPLATE_VARIABLE`` ...), and the candidate is
``LAYER_CANDIDATE``, whose factory ``from_environment`` reads them. ``replay_environment()`` gives them back as
shell assignments for the replay line a failure prints.
"""

from __future__ import annotations

import json
import os
import shlex
import string
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from conformance.consumers.command import run_command
from conformance.features import FEATURES
from conformance.protocol import (
    DTYPES,
    EXTRA_DTYPES,
    LAYOUTS,
    CandidateError,
    Capabilities,
    DriverLoadError,
    LayerCase,
)
from reflora.checkpoint import safetensors_bytes

CASE_FORMAT = "reflora-layer-case/1"
LAYER_FIELDS = ("case", "out")
FILE_FIELDS = ("base", "adapter", "input")
TEMPLATE_VARIABLE = "REFLORA_CANDIDATE_CMD"
CAPABILITIES_VARIABLE = "REFLORA_CMD_CAPABILITIES"
TIMEOUT_VARIABLE = "REFLORA_CMD_TIMEOUT"
LAYER_CANDIDATE = "conformance.consumers.command_layer:from_environment"
DEFAULT_TIMEOUT = 60.0

# the capabilities a command's layer can declare (--cmd-capabilities): those of layer_forward_backward and
# layer_merge. Sets are JSON lists of these values; the rest are JSON booleans; "notes" maps a name to a reason.
SET_VALUES = {"layer_layouts": LAYOUTS, "bias_modes": ("none", "all", "lora_only"), "dtypes": DTYPES + EXTRA_DTYPES}
METHODS = ("layer_forward_backward", "layer_merge")
# lora_alpha (alpha = r draws without it) and every boolean a layer feature of the two methods needs
BOOLEANS = ("lora_alpha", *sorted({need for f in FEATURES.values() if f.level == "layer" and f.method in METHODS
                                   for need in f.needs if ":" not in need}))  # fmt: skip
# with no capabilities file: both layouts, forward/backward, merge and unmerge, float64, no bias training
DEFAULT_CAPABILITIES = {"layer_layouts": list(LAYOUTS), "merge": True}
# the reason every other capability is "not supported" (a declaration's own notes come first)
NOT_SERVED = "a command candidate's layer level runs layer_forward_backward and layer_merge only"


def template_fields(template: str) -> set[str]:
    """The ``{field}`` names of a command template (``{{`` is a literal brace)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"--candidate-cmd {template!r} is not a valid template ({exc})") from None


def template_level(template: str) -> str:
    """``"layer"`` for a template with ``{case}``, ``"file"`` otherwise (``{base}``, ``{adapter}``, ``{input}``:
    the adapter-file level); both at once is a ``ValueError`` naming the fields. A template that does not parse
    goes by whether its text has ``{case}`` (its level then names the parse error)."""
    try:
        names = template_fields(template)
    except ValueError:
        return "layer" if "{case}" in template else "file"
    file_fields = sorted(names & set(FILE_FIELDS), key=FILE_FIELDS.index)
    if "case" in names and file_fields:
        raise ValueError(f"--candidate-cmd {template!r} mixes the layer level's {{case}} with the adapter-file "
                         "level's " + ", ".join("{" + f + "}" for f in file_fields) + "; give one level's fields")  # fmt: skip
    return "layer" if "case" in names else "file"


def capabilities_from_declaration(data: Any, where: str = "--cmd-capabilities") -> Capabilities:
    """``Capabilities`` from a JSON object of capability names (``DEFAULT_CAPABILITIES`` for those it omits);
    a ``ValueError`` naming the first bad field and what it should be."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of capability names, got {type(data).__name__}")
    known = {f.name for f in fields(Capabilities)}
    kwargs: dict[str, Any] = {**DEFAULT_CAPABILITIES}
    for name, value in data.items():
        if name not in known:
            raise ValueError(f"{where}: unknown capability {name!r} (a command's layer declares "
                             f"{', '.join([*SET_VALUES, *BOOLEANS, 'notes'])})")  # fmt: skip
        if name in SET_VALUES:
            allowed = SET_VALUES[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {name} must be a list of strings among {list(allowed)}, got {value!r}")
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"{where}: {name} has {bad[0]!r}, not one of {list(allowed)}")
            if name == "layer_layouts" and not value:
                raise ValueError(f"{where}: layer_layouts is empty: a command's layer needs a layout")
            kwargs[name] = value
        elif name in BOOLEANS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
            kwargs[name] = value
        elif name == "notes":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError(f"{where}: notes must map capability names to reasons (strings), got {value!r}")
            kwargs[name] = value
        else:
            raise ValueError(f"{where}: {name} is not a capability of a command's layer level (it serves "
                             "layer_forward_backward and layer_merge only; declare "
                             f"{', '.join([*SET_VALUES, *BOOLEANS, 'notes'])})")  # fmt: skip
    declared = set(SET_VALUES) | set(BOOLEANS) | {"notes"}
    served = {name: NOT_SERVED for name in known - declared}
    kwargs["notes"] = {**served, **kwargs.get("notes", {})}
    return Capabilities(**{k: frozenset(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def load_capabilities(path: str | Path) -> Capabilities:
    """The capabilities file of ``--cmd-capabilities`` (a JSON object); ``ValueError`` naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--cmd-capabilities {path}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--cmd-capabilities {path}: not valid JSON ({exc})") from None
    return capabilities_from_declaration(data, f"--cmd-capabilities {path}")


def case_file(case: LayerCase, method: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (float64) and the metadata (JSON text) of the ``{case}`` file for ``method``."""
    tensors = {"x": case.x, "weight": case.weight, "dy": case.dy}
    optional = {"bias": case.bias, "keep_mask": case.keep_mask, "lora_bias_B": case.lora_bias_B,
                "magnitude": case.magnitude}  # fmt: skip
    tensors.update({k: v for k, v in optional.items() if v is not None})
    for name in case.lora_A:
        suffix = "" if name is None else f".{name}"
        tensors[f"lora_A{suffix}"], tensors[f"lora_B{suffix}"] = case.lora_A[name], case.lora_B[name]
    metadata = {"format": CASE_FORMAT, "method": method, "layout": case.layout, "r": case.r,
                "lora_alpha": case.lora_alpha, "use_rslora": case.use_rslora, "lora_dropout": case.lora_dropout,
                "bias_trainable": case.bias_trainable, "dtype": case.dtype, "dora_norm": case.dora_norm,
                "seed": case.seed, "slices": case.qkv_slices and list(case.qkv_slices)}  # fmt: skip
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}
    return arrays, {k: json.dumps(v) for k, v in metadata.items()}


def read_out_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the ``__metadata__`` of a safetensors file; ``ValueError`` if it is not one."""
    from safetensors.numpy import load_file

    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        size = int.from_bytes(head, "little")
        if size > 100_000_000:
            raise ValueError(f"a header of {size} bytes")
        header = json.loads(handle.read(size).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("its __metadata__ is not a JSON object")
    return load_file(str(path)), metadata


class CommandLayerDriver:
    """A driver whose two layer methods run ``template`` (with ``{case}`` and ``{out}``) once per case."""

    def __init__(self, template: str, capabilities: Capabilities | None = None, timeout: float = DEFAULT_TIMEOUT):
        template_level(template)  # mixed levels: named
        names = template_fields(template)
        missing = [f for f in LAYER_FIELDS if f not in names]
        if missing:
            raise ValueError(f"a layer-level --candidate-cmd needs the fields {{case}} and {{out}}; {template!r} "
                             "lacks " + ", ".join("{" + m + "}" for m in missing))  # fmt: skip
        extra = sorted(names - set(LAYER_FIELDS))
        if extra:
            raise ValueError(f"--candidate-cmd {template!r}: unknown field {{{extra[0]}}} (the layer level has "
                             "{case} and {out})")  # fmt: skip
        self.template, self.timeout = template, timeout
        self.name = f"cmd:{shlex.split(template)[0]}"
        self.capabilities = capabilities or capabilities_from_declaration({})

    def versions(self) -> dict[str, str]:
        return {"candidate": self.name, "command": self.template}

    def layer_forward_backward(self, case: LayerCase) -> dict[str, Any]:
        return self._run("layer_forward_backward", case)

    def layer_merge(self, case: LayerCase) -> dict[str, Any]:
        return self._run("layer_merge", case)

    def _run(self, method: str, case: LayerCase) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="reflora-layer-") as folder:
            case_path, out = Path(folder) / "case.safetensors", Path(folder) / "out.safetensors"
            case_path.write_bytes(safetensors_bytes(*case_file(case, method)))
            cmd = self.template.format(case=shlex.quote(str(case_path)), out=shlex.quote(str(out)))
            try:
                tail = run_command(cmd, self.timeout)
            except CandidateError as exc:  # "hung": the suite neither retries nor shrinks it (a timeout each)
                raise CandidateError("hung" if exc.kind == "timeout" else exc.kind, exc.message, exc.detail) from None
            if not out.is_file():
                raise CandidateError("raised", f"{cmd} exited 0 but wrote no {out}", tail)
            try:
                tensors, metadata = read_out_file(out)
            except Exception as exc:
                raise CandidateError("raised", f"{out}: not a readable safetensors file ({exc})", tail) from None
        bad = [k for k, v in tensors.items() if not np.issubdtype(v.dtype, np.floating)]
        if bad:
            raise CandidateError("raised", f"{out}: {bad[0]} is not a float tensor ({tensors[bad[0]].dtype})", tail)
        results: dict[str, Any] = {k: v.astype(np.float64) for k, v in tensors.items()}
        if "trainable" in metadata:
            try:
                trainable = json.loads(metadata["trainable"])
            except json.JSONDecodeError as exc:
                raise CandidateError("raised", f"{out}: metadata 'trainable' is not JSON ({exc})", tail) from None
            if not isinstance(trainable, list) or not all(isinstance(t, str) for t in trainable):
                raise CandidateError("raised", f"{out}: metadata 'trainable' must be a JSON list of names, got "
                                     f"{metadata['trainable'][:200]!r}", tail)  # fmt: skip
            results["trainable"] = np.array(trainable, dtype=str)
        return results


def from_environment() -> CommandLayerDriver:
    """The driver ``reflora conform --candidate-cmd`` describes in the environment (``LAYER_CANDIDATE``)."""
    template = os.environ.get(TEMPLATE_VARIABLE)
    if not template:
        raise DriverLoadError(f"{LAYER_CANDIDATE} needs ${TEMPLATE_VARIABLE} (the command template); run "
                              "reflora conform --candidate-cmd TEMPLATE [--cmd-capabilities FILE]")  # fmt: skip
    try:
        caps_path = os.environ.get(CAPABILITIES_VARIABLE)
        capabilities = load_capabilities(caps_path) if caps_path else None
        timeout = float(os.environ.get(TIMEOUT_VARIABLE) or DEFAULT_TIMEOUT)
        return CommandLayerDriver(template, capabilities, timeout)
    except ValueError as exc:
        raise DriverLoadError(str(exc)) from None


def replay_environment() -> str:
    """The command candidate's variables as shell assignments (``VAR='...' ``) for a printed replay line."""
    variables = (TEMPLATE_VARIABLE, CAPABILITIES_VARIABLE, TIMEOUT_VARIABLE)
    return "".join(f"{v}={shlex.quote(os.environ[v])} " for v in variables if os.environ.get(v))
