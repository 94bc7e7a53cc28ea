"""The advanced features (docs/advanced-semantics.md: merge, DoRA, inits, several adapters, weighted combinations)
have teeth: each mutant of tests/mutants/advanced.py fails the features its bug touches and passes the others.
Plus the KS test itself, and PEFT's deviation D9 (found by the suite) as a minimal reproduction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mutants import advanced as mutants

import conformance
from conformance.compare import ks_pvalue, normal_cdf, uniform_cdf

pytest_plugins = ["pytester"]
CONFORMANCE_DIR = str(Path(conformance.__file__).parent)


def run_advanced(pytester, candidate: str, features: set[str]) -> tuple[dict, object]:
    report = pytester.path / "report.json"
    selection = " or ".join(f"[{f}]" for f in sorted(features))
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR + "/test_advanced.py", "-p", "no:cacheprovider", "-q", "--candidate", candidate,
        "--profile", "ci", "--max-examples", "4", "--isolation", "none", "-k", selection,
        "--report-json", str(report),
    )  # fmt: skip
    return json.loads(report.read_text()), result


@pytest.mark.parametrize("mutant", mutants.ADVANCED_MUTANTS, ids=lambda m: m.__name__)
def test_advanced_features_catch_the_mutant(pytester, monkeypatch, mutant):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report, result = run_advanced(pytester, f"mutants.advanced:{mutant.__name__}", mutant.MUST_FAIL | mutant.MUST_PASS)
    results = {f["id"]: f["result"] for f in report["features"]}
    missed = sorted(f for f in mutant.MUST_FAIL if results.get(f) != "fail")
    assert not missed, f"{mutant.__name__} ({mutant.BUG}) was not caught by {missed}: {results}"
    wrongly = sorted(f for f in mutant.MUST_PASS if results.get(f) != "pass")
    assert not wrongly, f"{mutant.__name__}: features its bug does not touch did not pass: {wrongly}: {results}"
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    failing = [t for t in report["tests"] if t["outcome"] == "failed"]
    assert all("reflora conform --candidate mutants.advanced:" in t["message"] for t in failing)


def test_ks_pvalue_matches_the_tabulated_critical_values_and_false_alarm_rate():
    """Kolmogorov's asymptotic critical values: D·√n = 1.358 at p = 0.05, 1.949 at p = 0.001 (n large)."""
    n = 10_000
    for critical, p in ((1.358, 0.05), (1.949, 0.001)):
        d = critical / (np.sqrt(n) + 0.12 + 0.11 / np.sqrt(n))
        x = np.linspace(-1, 1, n)
        x = x + 2 * d  # a shift of the empirical CDF by exactly D (the uniform law's CDF has slope 1/2)
        got = ks_pvalue(np.clip(x, -1, 1), uniform_cdf)
        assert abs(got[0] - d) < 2.0 / n and abs(got[1] - p) / p < 0.15, (
            critical,
            got,
        )  # D is matched to 1/n: p to ~5%
    rng = np.random.default_rng(0)
    pvalues = np.array([ks_pvalue(rng.standard_normal(200), normal_cdf)[1] for _ in range(2000)])
    assert 0.035 < np.mean(pvalues < 0.05) < 0.065  # the false-alarm rate is the stated level
    # the smallest wrong gaussian law the suite must reject: std 1/√r for 1/r at r = 2, with its fewest values
    assert ks_pvalue(np.sqrt(2) * rng.standard_normal(448), normal_cdf)[1] < 1e-4


@pytest.mark.torch
def test_documented_peft_deviation_safe_merge_leaves_the_model_half_merged():
    """D9 in docs/advanced-semantics.md: PEFT's safe merge refuses, but after merging the modules before the bad one."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    if peft.__version__ != "0.21.2":
        pytest.skip("checked against PEFT 0.21.2")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg).eval(), config)
    block = model.base_model.model.transformer.h[0]
    before = block.attn.c_attn.base_layer.weight.detach().clone()
    with torch.no_grad():
        block.mlp.c_fc.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert block.attn.c_attn.merged  # c_attn (before c_fc) was merged and stays merged
    assert (block.attn.c_attn.base_layer.weight - before).abs().max().item() > 0.1


def test_merge_only_driver_without_unmerged_is_checked_and_a_wrong_merged_weight_fails():
    """Capabilities.unmerge=False at model level: model_merge may leave out "unmerged" (the unmerge is not compared,
    everything else is), where a driver declaring unmerge (the default) must return it; a wrong merged weight fails."""
    import dataclasses

    from conformance.checks import run_check
    from conformance.drivers.reference import ReferenceDriver
    from conformance.loader import call_driver

    class MergeOnly(ReferenceDriver):
        capabilities = dataclasses.replace(ReferenceDriver.capabilities, unmerge=False)
        shift = 0.0

        def model_merge(self, case):
            out = super().model_merge(case)
            del out["unmerged"]
            key = sorted(out["merged"])[0]
            out["merged"][key] = out["merged"][key] + self.shift
            return out

    spec = {"feature": "model.merge.lora", "dtype": "float64", "seed": 1, "batch": 2, "seq_len": 3, "labels": True,
            "gpt2": {"n_embd": 8, "n_head": 2, "n_layer": 2, "n_positions": 16, "vocab_size": 23},
            "adapters": {"a0": {"r": 2, "lora_alpha": 4.0, "target_modules": ["c_attn", "c_fc"]}}, "active": ["a0"]}  # fmt: skip
    driver = MergeOnly()

    def call(method, spec, folder=None):
        return call_driver(driver, method, spec, folder)

    result = run_check(spec, call, driver.capabilities)
    assert result.passed, [c for c in result.comparisons if not c.passed]
    names = {c.name for c in result.comparisons}
    assert "logits" in names and "merged_logits" in names and not any(n.startswith("unmerged/") for n in names)
    assert any(n.startswith("merged/") for n in names)
    assert not run_check(spec, call).passed  # unmerge declared (the default): "unmerged" is missing
    driver.shift = 1e-6
    wrong = run_check(spec, call, driver.capabilities)
    assert not wrong.passed and all(c.name.startswith("merged/") for c in wrong.comparisons if not c.passed)
