"""Verifying one fixture: regenerate it in memory from its spec and compare, inputs bit-exact, outputs to ``RTOL``."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflora.golden.derive import generate_case
from reflora.golden.files import read_fixture, sha256_file
from reflora.golden.spec import is_output, load_spec

# Regenerated outputs (logits, loss, grad/...) must satisfy max|new − stored| ≤ rtol · max|stored| per tensor.
# float64: the reference's ops may be re-associated (fused, reordered) between versions, which moves results by
# a few ulps of the largest magnitude (one such round: 6.5e-15 relative on the corpus; reflora vs torch autograd:
# < 2e-14); a real change of the math moves them by 1e-8 or far more. 1e-12 is 50x above the first, 1e4x below.
# float32 (variants named *_float32, for checking float32 plumbing; precision is the float64 cases' job): one
# round of op re-association moved results by up to 1e-6 relative (epsilon 1.2e-7); 1e-4 leaves ~100x.
RTOL = {"float64": 1e-12, "float32": 1e-4}
# A gradient is measured against max(max|stored|, ZERO_GRADIENT_FLOOR · the case's largest |gradient|).
ZERO_GRADIENT_FLOOR = 1e-6


def relative_error(new: np.ndarray, stored: np.ndarray, floor: float = 0.0) -> float:
    """``max|new − stored| / max(max|stored|, floor)``: 0 when they are equal, inf when the scale is 0 and they
    differ. ``floor`` is ``gradient_floor`` for gradients, 0 otherwise."""
    diff = float(np.max(np.abs(new - stored), initial=0.0))
    scale = max(float(np.max(np.abs(stored), initial=0.0)), floor)
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def gradient_floor(grads: Iterable[np.ndarray]) -> float:
    """``ZERO_GRADIENT_FLOOR`` times the largest |entry| of a case's gradients: the smallest scale a gradient is
    measured against, so that one that is exactly 0 in exact arithmetic (the q/k slices at T = 1, where softmax
    sees a single key; LayerNorm weights when n_embd = 1) is compared to rounding noise at the case's scale."""
    return ZERO_GRADIENT_FLOOR * max((float(np.max(np.abs(g), initial=0.0)) for g in grads), default=0.0)


@dataclass
class CaseReport:
    """The result of verifying one fixture: ``problems`` is empty when it conforms."""

    name: str
    path: Path
    dtype: str = "float64"
    problems: list[str] = field(default_factory=list)  # each names the tensor or field
    worst_error: float = 0.0  # the largest relative_error over output tensors
    worst_tensor: str = ""
    n_tensors: int = 0
    size_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def compare_tensors(
    stored: Mapping[str, np.ndarray],
    fresh: Mapping[str, np.ndarray],
    rtol: float,
    report: CaseReport,
    spec: Mapping[str, Any] | None = None,
) -> None:
    """Inputs must be bit-identical; outputs must satisfy ``relative_error ≤ rtol``. Adds to ``report``."""
    for name in [k for k in stored if k not in fresh] + [k for k in fresh if k not in stored]:
        report.problems.append(f"tensor {name}: present in only one of the stored file and the regeneration")
    floor = gradient_floor(v.astype(np.float64) for k, v in stored.items() if k.startswith("grad/"))
    for name in (k for k in fresh if k in stored):
        new, old = fresh[name], stored[name]
        if new.shape != old.shape or new.dtype != old.dtype:
            report.problems.append(
                f"tensor {name}: regenerated as {new.dtype}{list(new.shape)}, stored {old.dtype}{list(old.shape)}"
            )
            continue
        if not is_output(name, spec):
            if not np.array_equal(new, old):
                report.problems.append(f"tensor {name}: input drifted (inputs must be bit-identical; numpy's "
                                       "random streams or the derivation order changed)")  # fmt: skip
            continue
        error = relative_error(
            new.astype(np.float64), old.astype(np.float64), floor if name.startswith("grad/") else 0.0
        )
        if error > report.worst_error or not report.worst_tensor:
            report.worst_error, report.worst_tensor = error, name
        if not error <= rtol:
            report.problems.append(f"tensor {name}: relative error {error:.3e} > rtol {rtol:.0e}")


def verify_fixture(
    path: str | Path, *, name: str | None = None, spec: Mapping[str, Any] | None = None, sha256: str | None = None
) -> CaseReport:
    """Read a fixture, check its sha256 and spec against the expected ones (when given), regenerate the case
    in memory from the spec and compare every tensor. Never raises for a bad file: the report says why."""
    path = Path(path)
    report = CaseReport(name=name or path.name.removesuffix(".safetensors"), path=path)
    start = time.perf_counter()
    try:
        if path.is_file():
            report.size_bytes = path.stat().st_size
        if sha256 is not None and path.is_file() and sha256_file(path) != sha256:
            report.problems.append("file: sha256 differs from the manifest (the file changed after generation)")
        file_spec, stored = read_fixture(path)
        report.dtype, report.n_tensors = file_spec["dtype"], len(stored)
        if spec is not None and load_spec(spec) != file_spec:
            report.problems.append("spec: the file's __metadata__.spec differs from the manifest's spec")
        fresh, _ = generate_case(file_spec)
        compare_tensors(stored, fresh, RTOL[file_spec["dtype"]], report, file_spec)
    except ValueError as exc:  # GoldenError, ConfigError, the model's InputError
        report.problems.append(f"file: {exc}")
    report.seconds = time.perf_counter() - start
    return report
