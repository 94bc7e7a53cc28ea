"""The two transports that carry driver calls: a worker process (default) or this process.

Isolation ("subprocess", the default): the driver lives in a worker process (``python -m conformance.worker``)
that imports it once. Each call sends the method name and the case's *spec* (JSON, conformance.wire); the worker
rebuilds the case from the spec itself, calls the driver and sends the results back as safetensors bytes plus a
JSON header. A candidate that raises fails that one check; one that crashes the process or does not answer
within ``timeout`` seconds fails that check with a clear message, and the worker is restarted for the next one,
so the rest of the run goes on. The worker's stdout and stderr go to a log file whose tail is shown on a crash.

Isolation "none" calls the driver in this process: faster to start, for reference-based drivers and
debugging (a crash or hang then takes the run down with it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from conformance.loader import call_driver, driver_info, load_driver
from conformance.protocol import CandidateError, DriverLoadError, NotSupported
from conformance.wire import decode_results, deserialize, encode_results, read_frame, write_frame

STARTUP_TIMEOUT = 300.0  # importing torch + a library can take a while on a cold, busy machine
WORKER_MODULE = "conformance.worker"


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
            [sys.executable, "-m", WORKER_MODULE, str(to_child_r), str(from_child_w)],
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
