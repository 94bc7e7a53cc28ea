"""The worker process that runs a candidate driver (see conformance/transport.py for the protocol).

    python -m conformance.worker READ_FD WRITE_FD

First frame in: ``{"candidate": ..., "sys_path": [...]}``; replies ``{"status": "loaded"}`` once the driver is
imported and constructed, then ``{"status": "ok", "info": ...}`` (its versions() and capabilities), or an error.
Then one request per frame ``{"method", "spec", "folder"}``, one reply each; an empty frame ends the worker.
"""

from __future__ import annotations

import json
import sys
import traceback

from conformance.loader import call_driver, driver_info, load_driver
from conformance.protocol import CandidateError, DriverLoadError, NotSupported
from conformance.wire import encode_results, read_frame, serialize, write_frame


def main(argv: list[str]) -> int:
    read_fd, write_fd = int(argv[0]), int(argv[1])
    hello = json.loads(read_frame(read_fd, None) or b"{}")
    sys.path[:0] = [p for p in hello.get("sys_path", []) if p not in sys.path]
    try:
        driver = load_driver(hello["candidate"])
    except Exception as exc:
        message = str(exc) if isinstance(exc, DriverLoadError) else f"{type(exc).__name__}: {exc}"
        write_frame(write_fd, serialize({"status": "error", "message": message}, {}))
        return 1
    # loaded: the parent now waits for versions() and capabilities under the call timeout, not the startup one
    write_frame(write_fd, serialize({"status": "loaded"}, {}))
    try:
        info = driver_info(driver, hello["candidate"])
    except Exception as exc:
        message = f"versions() or capabilities failed: {type(exc).__name__}: {exc}"
        write_frame(write_fd, serialize({"status": "error", "message": message}, {}))
        return 1
    write_frame(write_fd, serialize({"status": "ok", "info": info}, {}))
    while True:
        frame = read_frame(read_fd, None)
        if not frame:
            return 0
        request = json.loads(frame)
        try:
            result = call_driver(driver, request["method"], request["spec"], request.get("folder"))
            meta, tensors = encode_results(result)
            meta["__status__"] = "ok"
        except NotSupported as exc:
            meta, tensors = {"__status__": "not_supported", "message": str(exc)}, {}
        except CandidateError as exc:
            meta, tensors = {"__status__": exc.kind, "message": exc.message, "detail": exc.detail}, {}
        except Exception as exc:
            meta = {"__status__": "raised", "message": f"{type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
            tensors = {}
        sys.stdout.flush()
        write_frame(write_fd, serialize(meta, tensors))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
