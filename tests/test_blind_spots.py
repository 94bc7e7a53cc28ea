"""The draws leave no blind spot (issue 13): a faulty candidate for each former blind spot, each caught by the
suite (tests/mutants/blind_spots.py), and the state-isolation options (docs/conformance.md "State isolation").

Each run goes through the real plugin (pytester, in-process, ci profile, few examples, a few features), as
tests/test_conformance_mutants.py does. The square-only merge transpose is tests/test_layer_advanced.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import conformance
from conformance.features import FEATURES
from conformance.strategies import draw_advanced_spec

pytest_plugins = ["pytester"]
CONFORMANCE_DIR = str(Path(conformance.__file__).parent)
TESTS_DIR = str(Path(__file__).parent)


def run_suite(pytester, candidate: str, features: list[str], *extra: str) -> dict:
    report = pytester.path / "report.json"
    pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "-p", "no:cacheprovider", "-q", "--candidate", candidate, "--profile", "ci",
        "--max-examples", "3", "-k", " or ".join(f"[{f}]" for f in features), "--report-json", str(report), *extra,
    )  # fmt: skip
    return json.loads(report.read_text())


def results(report: dict) -> dict[str, str]:
    return {f["id"]: f["result"] for f in report["features"]}


# ------------------------------------------------------------------ (a) the last matching pattern key


def test_last_matching_pattern_key_is_caught(pytester, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    features = ["model.targets.patterns_overlap", "model.targets.patterns"]
    found = results(run_suite(pytester, "mutants.blind_spots:LastMatchingKey", features, "--isolation", "none"))
    assert found["model.targets.patterns_overlap"] == "fail", found
    # with one key per pattern the first matching key is the last one: the old draws could not see the bug
    assert found["model.targets.patterns"] == "pass", found


# ------------------------------------------------------------------ (b) scaling missing when alpha = r


@settings(max_examples=300, derandomize=True, database=None)
@given(st.data(), st.sampled_from([f.id for f in FEATURES.values() if f.level == "advanced"]))
def test_advanced_draws_never_have_scaling_one(data, feature_id):
    """Every adapter an advanced feature draws has α ≠ r and α ≠ √r (conformance.strategies._adapter_lora)."""
    spec = draw_advanced_spec(data, FEATURES[feature_id])
    for lora in [*spec["adapters"].values(), *([spec["init"]] if "init" in spec else [])]:
        assert lora["lora_alpha"] != lora["r"], (feature_id, lora)
        assert lora["lora_alpha"] != math.sqrt(lora["r"]), (feature_id, lora)  # rsLoRA: α/√r ≠ 1 either


ADVANCED_SCALED = ["model.adapters.active", "model.merge.lora", "model.dora", "model.dora.dropout"]


def test_missing_scaling_in_the_advanced_methods_is_caught(pytester, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    features = [*ADVANCED_SCALED, "model.adapters.disabled", "model.init.true"]
    found = results(run_suite(pytester, "mutants.blind_spots:NoScalingAdvanced", features, "--isolation", "none"))
    assert all(found[f] == "fail" for f in ADVANCED_SCALED), found
    assert found["model.adapters.disabled"] == found["model.init.true"] == "pass", found  # the bug is specific


# ------------------------------------------------------------------ (c) a bug only on the first model in a process

FIRST_MODEL_FEATURES = ["model.forward_backward", "model.adapters.active", "model.dora"]


def test_first_model_bug_is_seen_by_one_feature_in_a_shared_worker(pytester, monkeypatch):
    """Without --fresh-process the bug fails only whichever feature happens to run first."""
    monkeypatch.syspath_prepend(TESTS_DIR)
    report = run_suite(pytester, "mutants.blind_spots:FirstModelInProcess", FIRST_MODEL_FEATURES)
    outcomes = [t["outcome"] for t in report["tests"]]  # in the order they ran (the ci profile: fixed)
    assert outcomes == ["failed", "passed", "passed"], outcomes
    assert report["settings"]["fresh_process"] is False and report["settings"]["feature_seed"] is None


def test_first_model_bug_is_caught_by_every_feature_with_fresh_process(pytester, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    report = run_suite(pytester, "mutants.blind_spots:FirstModelInProcess", FIRST_MODEL_FEATURES, "--fresh-process")
    assert all(results(report)[f] == "fail" for f in FIRST_MODEL_FEATURES), results(report)
    assert report["settings"]["fresh_process"] is True


def test_feature_seed_shuffles_and_replays_the_order(pytester, monkeypatch):
    """A shuffled order is recorded (settings.feature_seed) and the same seed replays it, failure included."""
    monkeypatch.syspath_prepend(TESTS_DIR)
    features = ["model.forward_backward", "model.adapters.active", "model.dora", "model.dora.dropout"]
    orders = {}
    for seed in (1, 2, 1):
        report = run_suite(pytester, "mutants.blind_spots:FirstModelInProcess", features, "--feature-seed", str(seed))
        assert report["settings"]["feature_seed"] == seed
        ran = [t["id"] for t in report["tests"]]
        failed = [t["id"] for t in report["tests"] if t["outcome"] == "failed"]
        assert failed == ran[:1], (ran, failed)  # the first feature of the shuffled order sees the bug
        orders.setdefault(seed, []).append(ran)
    assert orders[1][0] == orders[1][1]  # replayed
    assert sorted(orders[1][0]) == sorted(orders[2][0]) == sorted(features)
    assert orders[1][0] != orders[2][0]


def test_fresh_process_needs_a_worker_process(pytester):
    result = pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "-p", "no:cacheprovider", "-q", "--candidate", "reference", "--isolation", "none",
        "--fresh-process", "-k", "[model.dora]",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--fresh-process needs --isolation subprocess" in "\n".join(result.errlines + result.outlines)


def test_thorough_shuffles_and_keeps_one_process_in_process(pytester):
    report = pytester.path / "report.json"
    pytester.runpytest_inprocess(
        CONFORMANCE_DIR, "-p", "no:cacheprovider", "-q", "--candidate", "reference", "--profile", "thorough",
        "--isolation", "none", "--max-examples", "1", "-k", "[model.dora]", "--report-json", str(report),
    )  # fmt: skip
    settings = json.loads(report.read_text())["settings"]
    assert settings["fresh_process"] is False and isinstance(settings["feature_seed"], int)


def test_profiles_state_isolation():
    from conformance.profiles import PROFILES

    assert not PROFILES["ci"].shuffle and not PROFILES["ci"].fresh_process
    assert PROFILES["dev"].shuffle and not PROFILES["dev"].fresh_process
    assert PROFILES["thorough"].shuffle and PROFILES["thorough"].fresh_process


# ------------------------------------------------------------------ DoRA with a row of zero norm


def _dora_layer(rng, n_in=5, n_out=4, r=2):
    weight = rng.normal(size=(n_in, n_out))  # Conv1D (in, out)
    A, B = rng.normal(size=(r, n_in)), rng.normal(size=(n_out, r))
    weight[:, 1] = 0.0  # output row 1 of Wt
    B[1, :] = 0.0  # and of B: V_1 = 0
    return weight, A, B, rng.uniform(0.5, 1.5, size=n_out)


@pytest.mark.parametrize("dropout", [False, True])
def test_dora_zero_norm_row_is_defined(dropout):
    """V_o = 0: c_o = 0, the row outputs its bias (W_o = 0), dm_o = 0, no NaN; the other rows are unchanged."""
    from reflora.ops.dora_linear import dora_delta_backward, dora_delta_forward

    rng = np.random.default_rng(0)
    weight, A, B, m = _dora_layer(rng)
    x = rng.normal(size=(3, 5))
    mask = (rng.random(size=x.shape) > 0.3).astype(float) if dropout else None
    p = 0.3 if dropout else 0.0
    delta, cache = dora_delta_forward(x, weight, A, B, m, 0.7, mask, p)
    assert np.isfinite(delta).all() and np.all(delta[:, 1] == 0.0)  # x Wt_1ᵀ = 0 and the DoRA term is 0
    g = rng.normal(size=delta.shape)
    for mode in ("detached", "full"):
        dx, dweight, dA, dB, dm = dora_delta_backward(g, cache, weight, A, B, 0.7, mask, p, norm_gradient=mode,
                                                      want_dweight=True)  # fmt: skip
        assert all(np.isfinite(t).all() for t in (dx, dweight, dA, dB, dm))
        assert dm[1] == 0.0 and np.all(dB[1] == 0.0)
    # the other rows: as if row 1 were not there
    keep = [0, 2, 3]
    delta_rest, _ = dora_delta_forward(x, weight[:, keep], A, B[keep], m[keep], 0.7, mask, p)
    np.testing.assert_allclose(delta[:, keep], delta_rest, rtol=1e-13, atol=1e-15)


def test_dora_zero_norm_row_merge_writes_a_zero_row():
    from reflora.merge import dora_delta_weight
    from reflora.ops.lora_linear import LoraBranchWeights

    weight, A, B, m = _dora_layer(np.random.default_rng(1))
    merged = weight + dora_delta_weight(weight, LoraBranchWeights(A, B, 0.7, 0, 4), m)
    assert np.isfinite(merged).all() and np.all(merged[:, 1] == 0.0)


def test_documented_peft_deviation_dora_zero_norm_row_is_nan():
    """docs/advanced-semantics.md D10 (PEFT 0.21.2): DoRA at init on a zero weight row gives NaN logits."""
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"documented for PEFT 0.21.2, found {peft.__version__}")
    import torch
    import transformers

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=None,
                                  eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        base.transformer.h[0].mlp.c_fc.weight[:, 0] = 0.0
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(base(ids).logits).all()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_fc"], use_dora=True))
    with torch.no_grad():
        assert model(ids).logits.isnan().any()


def test_dora_zero_norm_row_gradients_match_finite_differences():
    """The detached-norm gradients at a zero-norm row: finite differences of Σ g ⊙ δ with the factor c frozen
    (for A and B) and of the real δ(m) (for m: c_o = 0 whatever m_o, so dm_o = 0)."""
    from reflora.ops.dora_linear import dora_delta_backward, dora_delta_forward, dora_factor, dora_weight

    rng = np.random.default_rng(2)
    weight, A, B, m = _dora_layer(rng)
    x, s, h = rng.normal(size=(3, 5)), 0.7, 1e-6
    delta, cache = dora_delta_forward(x, weight, A, B, m, s)
    g = rng.normal(size=delta.shape)
    _, _, dA, dB, dm = dora_delta_backward(g, cache, weight, A, B, s)
    c = dora_factor(m, dora_weight(weight, A, B, s)[1])  # frozen

    def frozen(A_, B_):
        return float(np.sum(g * ((c - 1.0) * (x @ weight) + c * (s * (x @ A_.T) @ B_.T))))

    def loss_m(m_):
        return float(np.sum(g * dora_delta_forward(x, weight, A, B, m_, s)[0]))

    for value, grad, f in ((A, dA, lambda v: frozen(v, B)), (B, dB, lambda v: frozen(A, v)), (m, dm, loss_m)):
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += h
            down[i] -= h
            fd[i] = (f(up) - f(down)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
