"""The runner: the object the suite calls a candidate through, ``make_runner(candidate, isolation, timeout)``.

``runner.call(method, spec, folder=None)`` returns the driver's result (nested dicts of float64 arrays), or
raises ``NotSupported`` (the driver refused) or ``CandidateError`` (it raised, crashed, hung or returned
something unusable); ``runner.info`` describes the loaded driver (``conformance.loader.driver_info``);
``runner.close()`` ends it. The transports are in conformance.transport (a worker process, or this process),
finding and loading drivers in conformance.loader, the wire format in conformance.wire. This module also
re-exports the names the suite's users import from it.
"""

from __future__ import annotations

from conformance.loader import (
    METHODS,
    SHIPPED_DRIVER_PACKAGE,
    call_driver,
    capabilities_from_json,
    capabilities_to_json,
    driver_info,
    load_driver,
    shipped_drivers,
    shipped_name,
)
from conformance.protocol import CandidateError, DriverLoadError, NotSupported
from conformance.transport import STARTUP_TIMEOUT, InProcessRunner, SubprocessRunner
from conformance.wire import decode_results, deserialize, encode_results, serialize

__all__ = [
    "METHODS", "SHIPPED_DRIVER_PACKAGE", "STARTUP_TIMEOUT", "CandidateError", "DriverLoadError", "InProcessRunner",
    "NotSupported", "SubprocessRunner", "call_driver", "capabilities_from_json", "capabilities_to_json",
    "decode_results", "deserialize", "driver_info", "encode_results", "load_driver", "make_runner", "serialize",
    "shipped_drivers", "shipped_name",
]  # fmt: skip


def make_runner(candidate: str, isolation: str = "subprocess", timeout: float = 60.0):
    if isolation == "none":
        return InProcessRunner(candidate, timeout)
    if isolation == "subprocess":
        return SubprocessRunner(candidate, timeout)
    raise ValueError(f"isolation must be 'subprocess' or 'none', got {isolation!r}")
