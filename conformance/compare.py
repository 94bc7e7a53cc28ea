"""The comparisons a check records: tensors against the reference under the tolerance policy, key sets exactly,
and samples against a law (Kolmogorov–Smirnov). Each appends ``conformance.tolerance.Comparison``s to
``result.comparisons`` (``result``: a ``conformance.checks.CheckResult``, or anything with that list).

* ``compare_tensors``: every array of a nested expectation against the candidate's result at the same path,
  with the bound from plain float32 evaluations (``conformance.tolerance.compare``);
* ``compare_set``: a set of names (trainable tensors, keys) must match exactly;
* ``compare_ks``: pooled samples must follow a law (``ks_pvalue``, at ``KS_ALPHA``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from conformance.tolerance import compare, exact

# per KS check. ~30 KS checks in a ci run: a correct library fails one with probability ~0.3%; the ci draws
# (seeds included) are derandomized, so a ci run's outcome is fixed. With r >= 2 and n >= 448 values, a wrong
# law (std 1/√r for 1/r, U(±1/in) for U(±1/√in)) gives p < 1e-20.
KS_ALPHA = 1e-4
KS_MIN_SAMPLES = 35  # Stephens' correction is accurate to a few % from here on


def compare_tensors(result: Any, actual: Any, expected: dict, plains: list, dtype: str, prefix: str = "") -> None:
    """Compare every array of ``expected`` (nested dicts allowed) with ``actual`` at the same path; ``plains``
    holds plain float32 evaluations with the structure of ``expected``."""
    if not isinstance(actual, dict):
        result.comparisons.append(
            exact(prefix or "result", False, f"expected a dict of results, got {type(actual).__name__}")
        )
        return
    for key, value in expected.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            compare_tensors(result, actual.get(key, {}), value, [p[key] for p in plains], dtype, f"{name}/")
        else:
            result.comparisons.append(compare(name, actual.get(key), value, [p[key] for p in plains], dtype))


def compare_set(result: Any, name: str, actual, expected) -> None:
    """``actual`` (any iterable of names, None for none) must be exactly the set ``expected``."""
    actual, expected = sorted(map(str, actual or [])), sorted(expected)
    extra = [k for k in actual if k not in expected]
    missing = [k for k in expected if k not in actual]
    problem = (
        f"extra {extra[:4]}{'...' if len(extra) > 4 else ''}, missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
    )
    result.comparisons.append(exact(name, not extra and not missing, problem))


def ks_pvalue(samples: np.ndarray, cdf) -> tuple[float, float]:
    """One-sample Kolmogorov–Smirnov test: ``(D, p)`` with Kolmogorov's asymptotic p-value and Stephens'
    small-sample correction λ = (√n + 0.12 + 0.11/√n)·D (accurate to a few % for n ≥ 35)."""
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    n = x.size
    f = cdf(x)
    d = float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    k = np.arange(1, 101)
    p = float(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam**2)))
    return d, min(max(p, 0.0), 1.0)


def uniform_cdf(x):
    """The CDF of U(−1, 1)."""
    return np.clip((x + 1) / 2, 0.0, 1.0)


def normal_cdf(x):
    """The CDF of N(0, 1)."""
    return 0.5 * (1 + np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2)).astype(np.float64))


def compare_ks(result: Any, name: str, samples: list[np.ndarray], cdf, law: str) -> None:
    """The pooled ``samples`` follow ``cdf`` (named ``law``): a KS test at ``KS_ALPHA``; fewer than
    ``KS_MIN_SAMPLES`` values fail."""
    pooled = np.concatenate([s.ravel() for s in samples]) if samples else np.zeros(0)
    if pooled.size < KS_MIN_SAMPLES:
        result.comparisons.append(exact(f"KS {name}", False, f"only {pooled.size} values"))
        return
    d, p = ks_pvalue(pooled, cdf)
    result.comparisons.append(exact(f"KS {name} ~ {law} (n={pooled.size}, D={d:.3f}, p={p:.1e})", p >= KS_ALPHA,
                                    f"rejected at α={KS_ALPHA}: D={d:.4f}, p={p:.2e}, n={pooled.size}"))  # fmt: skip
