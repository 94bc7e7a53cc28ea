"""The file format: one safetensors file per case (format ``reflora-golden/1``), written canonically and read back
validated against its own spec.

    fixture file ──read_fixture──> (spec, tensors) ──unpack_fixture──> GoldenCase (what a replay needs)

docs/golden-format.md is the complete description of the format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from reflora.checkpoint import CheckpointError, atomic_write_bytes, safetensors_bytes
from reflora.config import ConfigError
from reflora.golden.derive import GoldenCase, unpack_fixture
from reflora.golden.spec import FORMAT, fixture_layout, load_spec
from reflora.ops.crossentropy import IGNORE_INDEX


class GoldenError(CheckpointError):
    """A fixture file or the corpus is missing, malformed, or disagrees with its spec or manifest."""


def serialize_fixture(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The canonical bytes of a fixture (``reflora.checkpoint.safetensors_bytes``): the same tensors and
    metadata always give the same bytes, so a regenerated corpus has the same sha256s."""
    return safetensors_bytes(tensors, metadata)


def write_case(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """Write a fixture atomically (temporary file + rename); returns the sha256 of the bytes written."""
    data = serialize_fixture(tensors, metadata)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_fixture_file(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """``(__metadata__, tensors)`` of a safetensors file, unchecked; ``GoldenError`` naming the file when it is
    missing or not safetensors."""
    if not path.is_file():
        raise GoldenError(f"{path}: no such fixture file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return handle.metadata() or {}, {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GoldenError(f"{path}: not a readable safetensors file ({exc})") from None


def read_fixture(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(filled spec, tensors)`` of a fixture file, validated: the format tag, the spec, exactly the tensors
    the spec implies with their shapes and dtypes, integer tensors in range, 0/1 masks, finite floats.

    Any problem is a ``GoldenError`` naming the file and the field or tensor.
    """
    path = Path(path)
    metadata, tensors = read_fixture_file(path)
    if metadata.get("format") != FORMAT:
        raise GoldenError(f"{path}: __metadata__.format is {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        spec = load_spec(json.loads(metadata.get("spec", "null")))
    except (json.JSONDecodeError, ConfigError) as exc:
        raise GoldenError(f"{path}: __metadata__.spec is not a valid spec ({exc})") from None
    layout = fixture_layout(spec)
    missing = [k for k in layout if k not in tensors]
    unexpected = [k for k in tensors if k not in layout]
    if missing or unexpected:
        raise GoldenError(f"{path}: tensors disagree with the spec: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, (shape, dtype) in layout.items():
        value = tensors[name]
        if tuple(value.shape) != shape or value.dtype != np.dtype(dtype):
            raise GoldenError(
                f"{path}: tensor {name} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
            )
    _check_values(path, spec, tensors)
    return spec, {name: tensors[name] for name in layout}


def _check_values(path: Path, spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    vocab, n_positions = spec["gpt2"]["vocab_size"], spec["gpt2"]["n_positions"]

    def fail(name: str, what: str) -> None:
        raise GoldenError(f"{path}: tensor {name} {what}")

    ids = tensors["input_ids"]
    if ids.min() < 0 or ids.max() >= vocab:
        fail("input_ids", f"has values outside [0, vocab_size={vocab})")
    if "labels" in tensors:
        labels = tensors["labels"]
        if np.any((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))):
            fail("labels", f"has values outside [0, vocab_size={vocab}) other than -100")
    if "position_ids" in tensors and (
        tensors["position_ids"].min() < 0 or tensors["position_ids"].max() >= n_positions
    ):
        fail("position_ids", f"has values outside [0, n_positions={n_positions})")
    for name, value in tensors.items():
        if (name == "attention_mask" or name.startswith("dropout/")) and not np.all((value == 0) | (value == 1)):
            fail(name, "must hold only 0 and 1")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            fail(name, "has non-finite values")


def load_fixture(path: str | Path) -> GoldenCase:
    """``unpack_fixture(*read_fixture(path))``: a validated fixture, ready to replay."""
    return unpack_fixture(*read_fixture(path))
