"""Loading a candidate driver and calling it, in a worker process (default) or in this process.

Isolation ("subprocess", the default): the driver lives in a worker process (``python -m conformance.worker``)
that imports it once. Each call sends the method name and the case's *spec* (JSON); the worker rebuilds the case
from the spec itself, calls the driver and sends the results back as safetensors bytes plus a JSON header. No
pickle crosses the pipe. A candidate that raises fails that one check; one that crashes the process or does not
answer within ``timeout`` seconds fails that check with a clear message, and the worker is restarted for the
next one, so the rest of the run goes on. The worker's stdout and stderr go to a log file whose tail is shown
on a crash.

Isolation "none" calls the driver in this process: faster to start, for reference-based drivers and
debugging (a crash or hang then takes the run down with it).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from conformance.protocol import Capabilities, NotSupported

SHIPPED_DRIVER_PACKAGE = "conformance.drivers"
STARTUP_TIMEOUT = 300.0  # importing torch + a library can take a while on a cold, busy machine


class CandidateError(Exception):
    """The candidate did not produce a result: it raised, crashed, hung or returned something unusable."""

    def __init__(self, kind: str, message: str, detail: str = ""):
        super().__init__(f"candidate {kind}: {message}")
        self.kind, self.message, self.detail = kind, message, detail


class DriverLoadError(Exception):
    """The candidate named by --candidate cannot be found or imported."""


# ----------------------------------------------------------------------------------------------
# finding a driver
# ----------------------------------------------------------------------------------------------


def shipped_drivers() -> list[str]:
    """Names usable as ``--candidate NAME``: the modules of ``conformance.drivers`` (``*_bridge`` are helpers)."""
    package = importlib.import_module(SHIPPED_DRIVER_PACKAGE)
    return sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_") and not m.name.endswith("_bridge")
    )


def shipped_name(candidate: str) -> str:
    """A shipped driver's module name for ``candidate``, which may be a library's own name (``adapters`` ->
    ``adapters_hub``, see ``conformance.envs.ALIASES``); any other name is returned as is."""
    from conformance.envs import ALIASES

    return ALIASES.get(candidate, candidate)


def load_driver(candidate: str):
    """The driver object for ``NAME`` (a shipped driver or its alias) or ``package.module:object`` (see
    conformance/protocol.py)."""
    if ":" not in candidate:
        candidate = shipped_name(candidate)
    if ":" in candidate:
        module_name, _, attr = candidate.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DriverLoadError(f"cannot import {module_name!r} for --candidate {candidate}: {exc}") from exc
        obj: Any = module
        for part in attr.split(".") if attr else []:  # "package.module:" is the module itself
            if not hasattr(obj, part):
                raise DriverLoadError(f"--candidate {candidate}: module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
    else:
        names = shipped_drivers()
        if candidate not in names:
            raise DriverLoadError(
                f"--candidate {candidate!r} is not a shipped driver (shipped: {', '.join(names)}); "
                "a driver of your own is named package.module:object"
            )
        try:
            module = importlib.import_module(f"{SHIPPED_DRIVER_PACKAGE}.{candidate}")
        except ImportError as exc:
            raise DriverLoadError(f"the {candidate} driver cannot be imported: {exc}") from exc
        obj = getattr(module, "driver", module)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "capabilities")):
        obj = obj()
    for attr in ("name", "capabilities", "versions"):
        if not hasattr(obj, attr):
            raise DriverLoadError(f"--candidate {candidate}: {obj!r} is not a driver (it has no {attr!r})")
    if not isinstance(obj.capabilities, Capabilities):
        raise DriverLoadError(f"--candidate {candidate}: capabilities must be a conformance.protocol.Capabilities")
    return obj


def capabilities_to_json(caps: Capabilities) -> dict[str, Any]:
    out = {}
    for f in fields(caps):
        value = getattr(caps, f.name)
        out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


def capabilities_from_json(data: dict[str, Any]) -> Capabilities:
    kwargs = {}
    for f in fields(Capabilities):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = frozenset(value) if isinstance(value, list) else value
    return Capabilities(**kwargs)


def driver_info(driver, candidate: str) -> dict[str, Any]:
    """What the suite needs to know about a loaded driver, as JSON."""
    deviations = getattr(driver, "deviations", None)
    if deviations is None and ":" not in candidate:
        default = Path(__file__).parent / "deviations" / f"{shipped_name(candidate)}.json"
        deviations = default if default.is_file() else None
    return {
        "name": str(driver.name),
        "capabilities": capabilities_to_json(driver.capabilities),
        "versions": {str(k): str(v) for k, v in dict(driver.versions()).items()},
        "deviations": None if deviations is None else str(deviations),
    }


# ----------------------------------------------------------------------------------------------
# results on the wire: nested dicts of arrays -> (JSON meta, flat tensors)
# ----------------------------------------------------------------------------------------------


def encode_results(results: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Flatten a driver's result: numeric arrays become tensors named by their path (``grads/<key>``), strings,
    lists and numbers go into the JSON meta. Anything else is an error naming the entry."""
    meta: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            meta.setdefault("__dicts__", []).append(path)
            for key, item in value.items():
                walk(item, f"{path}/{key}" if path else str(key))
            return
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor slipped through
            value = value.detach().cpu().double().numpy()
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            array = value.astype(np.float64) if value.dtype.kind == "f" else value
            tensors[path] = np.array(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "USO":
            meta[path] = [str(v) for v in value.ravel()]
        elif isinstance(value, (np.floating, np.integer)):
            tensors[path] = np.asarray(value, dtype=np.float64 if isinstance(value, np.floating) else np.int64)
        elif isinstance(value, (bool, int, float, str, list, tuple)) or value is None:
            meta[path] = list(value) if isinstance(value, tuple) else value
        else:
            raise CandidateError("returned an unusable result", f"{path or 'result'} is a {type(value).__name__}")

    walk(results, "")
    return meta, tensors


def decode_results(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    dict_paths = set(meta.get("__dicts__", []))
    if "" not in dict_paths:  # the result itself was a single array or value
        return tensors.get("", meta.get(""))
    root: dict[str, Any] = {}
    entries = {**{k: v for k, v in meta.items() if k != "__dicts__"}, **tensors}
    for path in sorted(dict_paths - {""}, key=lambda p: p.count("/")):
        _place(root, path, {})
    for path, value in entries.items():
        _place(root, path, value)
    return root


def _place(root: dict, path: str, value: Any) -> None:
    parts = path.split("/")
    node = root
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def serialize(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    body = save(tensors) if tensors else b""
    head = json.dumps(meta).encode()
    return struct.pack("<Q", len(head)) + head + body


def deserialize(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return meta, (load(body) if body else {})


# ----------------------------------------------------------------------------------------------
# calling a driver method for a spec (shared by the worker and the in-process runner)
# ----------------------------------------------------------------------------------------------

METHODS = ("layer_forward_backward", "layer_merge", "model_forward_backward", "save_adapter",
           "load_adapter_logits", "model_switch_adapters",
           # optional, conformance/advanced.py
           "model_adapters", "model_merge", "merge_and_unload", "init_adapter", "weighted_adapter")  # fmt: skip


def call_driver(driver, method: str, spec: dict[str, Any], folder: str | None) -> Any:
    """Rebuild the case from ``spec`` and call ``driver.<method>``. Raises NotSupported or the driver's error."""
    from conformance.cases import build_case

    if method not in METHODS:
        raise ValueError(f"unknown driver method {method!r}")
    function = getattr(driver, method, None)
    if function is None:
        raise NotSupported(f"the driver has no {method}()")
    case = build_case(spec)
    if method in ("save_adapter", "load_adapter_logits", "merge_and_unload"):
        return function(case, Path(folder))
    return function(case)


class InProcessRunner:
    """Calls the driver in this process (isolation "none")."""

    isolation = "none"

    def __init__(self, candidate: str, timeout: float = 0.0):
        self.candidate = candidate
        self.driver = load_driver(candidate)
        self.info = driver_info(self.driver, candidate)

    def call(self, method: str, spec: dict[str, Any], folder: str | None = None) -> Any:
        try:
            result = call_driver(self.driver, method, spec, folder)
        except NotSupported:
            raise
        except Exception as exc:
            raise CandidateError("raised", f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc
        return decode_results(*encode_results(result))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# the worker process
# ----------------------------------------------------------------------------------------------


def write_frame(fd: int, payload: bytes) -> None:
    data = struct.pack("<Q", len(payload)) + payload
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_frame(fd: int, timeout: float | None) -> bytes | None:
    """One frame, or None at end of file; raises TimeoutError if nothing complete arrives in time."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def read_exactly(n: int) -> bytes | None:
        chunks, remaining = [], n
        while remaining:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    head = read_exactly(8)
    if head is None:
        return None
    (n,) = struct.unpack("<Q", head)
    return read_exactly(n) if n else b""


class SubprocessRunner:
    """Calls the driver in a worker process, restarted after a crash or a hang (isolation "subprocess")."""

    isolation = "subprocess"

    def __init__(self, candidate: str, timeout: float = 60.0):
        self.candidate, self.timeout = candidate, timeout
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="reflora-conform-worker-", suffix=".log", delete=False)
        self.info = self._start()

    def _start(self) -> dict[str, Any]:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.log.seek(0)
        self.log.truncate()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "conformance.worker", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self.to_child, self.from_child = to_child_w, from_child_r
        write_frame(self.to_child, json.dumps({"candidate": self.candidate, "sys_path": sys.path}).encode())
        reply = self._receive(STARTUP_TIMEOUT, "loading the driver")
        meta, _ = deserialize(reply)
        if meta.get("status") != "ok":
            self._stop()
            raise DriverLoadError(meta.get("message", "the worker could not load the driver"))
        return meta["info"]

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _receive(self, timeout: float, doing: str) -> bytes:
        try:
            reply = read_frame(self.from_child, timeout)
        except TimeoutError:
            self._stop()
            raise CandidateError(
                "hung", f"no answer within {timeout:g} s while {doing}; the worker was killed"
            ) from None
        if reply is None:
            code = self.process.wait(timeout=10) if self.process else None
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            tail = self._log_tail()
            self._stop()
            raise CandidateError("crashed", f"the worker process died ({how}) while {doing}", tail)
        return reply

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for fd in ("to_child", "from_child"):
            if getattr(self, fd, None) is not None:
                try:
                    os.close(getattr(self, fd))
                except OSError:
                    pass
                setattr(self, fd, None)
        self.process = None

    def call(self, method: str, spec: dict[str, Any], folder: str | None = None) -> Any:
        if self.process is None:
            self._start()
        request = {"method": method, "spec": spec, "folder": folder}
        try:
            write_frame(self.to_child, json.dumps(request).encode())
        except OSError as exc:
            tail = self._log_tail()
            self._stop()
            raise CandidateError("crashed", f"the worker process is gone ({exc})", tail) from None
        meta, tensors = deserialize(self._receive(self.timeout, f"running {method}"))
        status = meta.pop("__status__")
        if status == "not_supported":
            raise NotSupported(meta["message"])
        if status != "ok":
            raise CandidateError(status, meta["message"], meta.get("detail", ""))
        return decode_results(meta, tensors)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                write_frame(self.to_child, b"")
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._stop()
        Path(self.log.name).unlink(missing_ok=True)


def make_runner(candidate: str, isolation: str = "subprocess", timeout: float = 60.0):
    if isolation == "none":
        return InProcessRunner(candidate)
    if isolation == "subprocess":
        return SubprocessRunner(candidate, timeout)
    raise ValueError(f"isolation must be 'subprocess' or 'none', got {isolation!r}")
