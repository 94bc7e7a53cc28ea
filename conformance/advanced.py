"""The advanced features' names where drivers written before the suite's layering import them (a thin alias).

Drivers written against docs/conformance.md import ``AdaptersCase``, ``COMBINED``, ``targeted_keys``... from
here; they keep working. New code imports from where each name lives:

* the case and the driver methods' signatures: conformance.protocol (``AdaptersCase``, ``COMBINED``,
  ``targeted_keys``, ``Driver.model_adapters`` / ``model_merge`` / ``merge_and_unload`` / ``init_adapter`` /
  ``weighted_adapter``);
* drawing a spec: conformance.strategies (``draw_advanced_spec``); rebuilding its case: conformance.cases
  (``build_advanced_case``, ``perturbed``);
* the reference's answers: conformance.expectations; the checks: conformance.checks (``check_advanced``);
  the KS test: conformance.compare (``ks_pvalue``, ``uniform_cdf``, ``normal_cdf``).
"""

from __future__ import annotations

from conformance.cases import MODEL_B_SCALE as B_SCALE
from conformance.cases import build_advanced_case, perturbed
from conformance.checks import PLAINS, check_advanced
from conformance.compare import KS_ALPHA, ks_pvalue, normal_cdf, uniform_cdf
from conformance.expectations import ADVANCED_EXPECTATIONS as EXPECTATIONS
from conformance.expectations import (
    NUMPY_DTYPES,
    adapters_forward_backward,
    init_expectation,
    merge_expectation,
    module_deltas,
    safe_merge_expectation,
    unloaded_params,
    weighted_expectation,
)
from conformance.protocol import COMBINED, AdaptersCase, targeted_keys
from conformance.strategies import ADAPTER_MODULES as MODULES
from conformance.strategies import draw_advanced_spec as draw_spec

__all__ = [
    "B_SCALE", "COMBINED", "EXPECTATIONS", "KS_ALPHA", "MODULES", "NUMPY_DTYPES", "PLAINS", "AdaptersCase",
    "adapters_forward_backward", "build_advanced_case", "check_advanced", "draw_spec", "init_expectation",
    "ks_pvalue", "merge_expectation", "module_deltas", "normal_cdf", "perturbed", "run_feature",
    "safe_merge_expectation", "targeted_keys", "uniform_cdf", "unloaded_params", "weighted_expectation",
]  # fmt: skip


def run_feature(suite, feature, record) -> None:
    """``suite.run_feature(feature, record)`` (conformance.suite.run_advanced_feature)."""
    suite.run_feature(feature, record)
