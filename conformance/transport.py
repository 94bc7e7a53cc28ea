"""The two transports that carry driver calls: a worker process (default) or this process.

Isolation ("subprocess", the default): the driver lives in a worker process (``python -m conformance.worker``)
that imports it once. Each call sends the method name and the case's *spec* (JSON, conformance.wire); the worker
rebuilds the case from the spec itself, calls the driver and sends the results back as safetensors bytes plus a
JSON header. A candidate that raises fails that one check; one that crashes the process or does not answer
within ``timeout`` seconds fails that check with a clear message, and the worker is restarted for the next one,
so the rest of the run goes on. The worker's stdout and stderr go to a log file whose tail is shown on a crash.

Isolation "none" calls the driver in this process: faster to start, for reference-based drivers and
debugging. Its limits: the timeout is an alarm signal (``call_with_alarm``) that interrupts Python code, not a
call stuck in C code; a crash (a segfault, ``os._exit``) ends the whole run. The plugin writes the
``--report-json`` file before and after every test, so the tests run until then are on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from conformance.loader import call_driver, driver_info, load_driver
from conformance.protocol import CandidateError, DriverLoadError, NotSupported
from conformance.wire import decode_results, deserialize, encode_results, read_frame, write_frame

STARTUP_TIMEOUT = 300.0  # importing torch + a library can take a while on a cold, busy machine
WORKER_MODULE = "conformance.worker"


class CallTimedOut(BaseException):
    """Raised by the alarm in a driver call that ran past the timeout (isolation "none"). A BaseException, so
    that a driver's own ``except Exception`` does not swallow it."""


def call_with_alarm(timeout: float | None, function, *args):
    """``function(*args)``, interrupted with ``CallTimedOut`` after ``timeout`` seconds (SIGALRM).

    The limit of the in-process mode: the alarm is handled between Python bytecodes, so a call stuck inside C
    code (a deadlock, a long BLAS call) is interrupted only once it returns to Python. Without SIGALRM (Windows)
    or off the main thread, the call runs without a limit. An alarm set by someone else (pytest-timeout) is
    re-armed afterwards with its remaining time."""
    if not timeout or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return function(*args)
    running = True

    def on_alarm(signum, frame):
        if running:
            raise CallTimedOut

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = function(*args)
        running = False
        return result
    finally:
        running = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


class InProcessRunner:
    """Calls the driver in this process (isolation "none"). Every driver call, versions() and capabilities
    included, is under ``timeout`` (``call_with_alarm``: Python code only); a crash ends the process."""

    isolation = "none"

    def __init__(self, candidate: str, timeout: float = 0.0):
        self.candidate, self.timeout = candidate, timeout
        self.driver = load_driver(candidate)
        try:
            self.info = call_with_alarm(timeout, driver_info, self.driver, candidate)
        except CallTimedOut:
            raise CandidateError(
                "hung", f"no answer within {timeout:g} s while calling the driver's versions() and capabilities"
            ) from None
        except Exception as exc:
            raise DriverLoadError(f"versions() or capabilities failed: {type(exc).__name__}: {exc}") from None

    def call(self, method: str, spec: dict[str, Any], folder: str | None = None) -> Any:
        try:
            result = call_with_alarm(self.timeout, call_driver, self.driver, method, spec, folder)
        except NotSupported:
            raise
        except CallTimedOut:
            raise CandidateError(
                "hung",
                f"no answer within {self.timeout:g} s while running {method}; the call was interrupted "
                "(isolation none)",
                traceback.format_exc(),
            ) from None
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
        # importing a library (torch...) may take minutes on a cold machine: STARTUP_TIMEOUT; the driver's own
        # calls, versions() and capabilities included, have the call timeout
        meta, _ = deserialize(self._receive(STARTUP_TIMEOUT, "importing and constructing the driver"))
        if meta.get("status") == "loaded":
            meta, _ = deserialize(self._receive(self.timeout, "calling the driver's versions() and capabilities"))
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
