"""Results on the wire between the suite and the worker process: frames on a pipe, and a driver's nested
result as a JSON header plus safetensors bytes. No pickle crosses the pipe.

A frame is an 8-byte little-endian length and that many bytes; an empty frame ends the worker.
``encode_results`` flattens a driver's result (nested dicts of arrays, strings, numbers) into ``(meta,
tensors)``; ``serialize`` turns that into one frame's payload; ``deserialize`` and ``decode_results`` undo it.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

import numpy as np

from conformance.protocol import CandidateError


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
