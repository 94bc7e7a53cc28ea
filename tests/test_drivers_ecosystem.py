"""The drivers of the other LoRA libraries, checked against reflora's layer ops on fixed seeded cases.

Each driver (conformance/drivers/<name>.py) is run on a handful of named ``LayerCase`` scenarios built from
seeded random NumPy arrays (non-square, B ≠ 0), and its results are compared with
``reflora.ops.lora_linear_forward`` / ``lora_linear_backward`` at the dtype's tolerance. This checks the
*drivers* (layouts, slice stacking, scaling mapping, mask injection, capability declarations); the
property-based suite in conformance/ is what rates the libraries.

* A library that is not importable here skips its tests: the default venv has only torch, transformers and PEFT.
  Run them inside the candidate venvs: ``python -m conformance.envs run torch -- python -m pytest
  tests/test_drivers_ecosystem.py -q`` (groups: torch, adapters, mlx, jax, keras).
* A scenario the driver refuses (``NotSupported``) must be one whose capability it declares missing; then it
  is skipped. A driver that refuses what it claims, or claims what it cannot run, fails.
* Known deviations of a library (docs/findings.md) are strict xfails: when the library is fixed, they fail.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import replace

import numpy as np
import pytest

from conformance.protocol import LayerCase, NotSupported
from reflora.ops import LoraBranchWeights, lora_linear_backward, lora_linear_forward

# driver module -> the library module it needs
DRIVERS = {
    "loralib": "loralib",
    "lora_pytorch": "lora_pytorch",
    "torchtune": "torchtune",
    "litgpt": "litgpt",
    "adapters_hub": "adapters",
    "mlx_lm": "mlx_lm",
    "flax_nnx": "flax.nnx",
    "keras": "keras",
}
TOLERANCE = {"float64": 1e-11, "float32": 2e-5, "bfloat16": 3e-2}  # max |error| / max(1, max |reference|)


def known_deviation(driver_name: str, case) -> tuple[set[str], float | None, str]:
    """The documented deviations of a library on a case (docs/findings.md): (the results that deviate, a bound
    on their relative error or None, why). Those results must deviate (within the bound) and every other
    result must match: when a library is fixed, its test fails and the entry goes."""
    if driver_name == "lora_pytorch":
        return {"dx"}, None, "LoRA.forward runs the frozen base module under no_grad: dx lacks the dy·W path"
    if driver_name == "litgpt" and getattr(case, "bias_trainable", False):
        return {"bias", "trainable"}, None, "mark_only_lora_as_trainable(bias='lora_only') leaves linear.bias frozen"
    if driver_name == "keras":
        keys, reason = set(), []
        if case.bias is not None and not case.bias_trainable:
            keys.add("trainable")
            reason.append("Dense.enable_lora leaves the bias trainable")
        if case.dtype == "float64":
            keys |= {"y", "dx", "lora_A", "lora_B"}
            reason.append("the LoRA kernels are float32 in a float64 layer")
        return keys, 1e-6, "; ".join(reason)
    return set(), None, ""


def driver_module(name: str):
    pytest.importorskip(DRIVERS[name])
    return importlib.import_module(f"conformance.drivers.{name}")


# ---------------------------------------------------------------------------------------------
# cases and the reference
# ---------------------------------------------------------------------------------------------


def make_case(
    seed: int = 0,
    layout: str = "linear",
    dtype: str = "float64",
    r: int = 3,
    lora_alpha: float = 5.0,
    use_rslora: bool = False,
    slices: tuple[str, ...] | None = None,
    lora_dropout: float = 0.0,
    with_mask: bool = False,
    bias: bool = True,
    bias_trainable: bool = False,
    in_features: int = 7,
    out_features: int = 9,
) -> LayerCase:
    """Seeded random tensors; values are exact in bfloat16 so every dtype starts from the same numbers."""
    rng = np.random.default_rng(seed)
    batch, seq = 2, 3

    def draw(*shape):
        return _round_to_bfloat16(rng.standard_normal(shape) * 0.5)

    weight = draw(out_features, in_features) if layout == "linear" else draw(in_features, out_features)
    if slices is None:
        lora_A, lora_B = {None: draw(r, in_features)}, {None: draw(out_features, r)}
    else:
        lora_A = {s: draw(r, in_features) for s in slices}
        lora_B = {s: draw(out_features // 3, r) for s in slices}
    keep = (rng.random((batch, seq, in_features)) > lora_dropout).astype(np.float64) if with_mask else None
    return LayerCase(
        layout=layout,
        x=draw(batch, seq, in_features),
        weight=weight,
        bias=draw(out_features) if bias else None,
        lora_A=lora_A,
        lora_B=lora_B,
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        lora_dropout=lora_dropout,
        keep_mask=keep,
        bias_trainable=bias_trainable,
        dy=draw(batch, seq, out_features),
        dtype=dtype,
        seed=seed,
    )


def _round_to_bfloat16(a: np.ndarray) -> np.ndarray:
    bits = np.asarray(a, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)


def reference(case: LayerCase) -> dict[str, np.ndarray]:
    """reflora's forward and backward of the case, float64, in result names."""
    scaling = case.lora_alpha / (math.sqrt(case.r) if case.use_rslora else case.r)
    out_features = case.weight.shape[0] if case.layout == "linear" else case.weight.shape[1]
    branches, names = [], []
    for s in case.lora_A:
        start = 0 if s is None else "qkv".index(s) * out_features // 3
        stop = out_features if s is None else start + out_features // 3
        branches.append(LoraBranchWeights(case.lora_A[s], case.lora_B[s], scaling, start, stop))
        names.append(("lora_A", "lora_B") if s is None else (f"lora_A.{s}", f"lora_B.{s}"))
    n = case.x.shape[0] * case.x.shape[1]
    x = case.x.reshape(n, -1)
    mask = None if case.keep_mask is None else case.keep_mask.reshape(n, -1)
    p = case.lora_dropout if mask is not None else 0.0
    y, cache = lora_linear_forward(x, case.weight, case.bias, tuple(branches), mask, p, case.layout)
    dy = case.dy.reshape(n, -1)
    dx, _, dbias, grads = lora_linear_backward(
        dy, cache, case.weight, tuple(branches), mask, p, case.layout, want_dbias=case.bias is not None
    )
    out = {"y": y.reshape(case.dy.shape), "dx": dx.reshape(case.x.shape)}
    for (a_name, b_name), (dA, dB) in zip(names, grads):
        out[a_name], out[b_name] = dA, dB
    if case.bias_trainable:
        out["bias"] = dbias
    return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


# ---------------------------------------------------------------------------------------------
# scenarios: name -> (capability the scenario needs, LayerCase keyword arguments)
# ---------------------------------------------------------------------------------------------

SCENARIOS = {
    "plain": ("", dict()),
    "alpha_is_r": ("", dict(lora_alpha=3.0)),
    "conv1d": ("layer_layouts", dict(layout="conv1d", lora_alpha=3.0)),
    "conv1d_alpha": ("layer_layouts", dict(layout="conv1d")),
    "rslora": ("rslora", dict(use_rslora=True)),
    "dropout_mask": ("dropout_mask_injection", dict(lora_dropout=0.3, with_mask=True)),
    "dropout_eval": ("", dict(lora_dropout=0.3, with_mask=False)),
    "bias_trainable": ("bias_modes", dict(bias_trainable=True)),
    "no_bias": ("", dict(bias=False)),
    "qkv_slices": ("per_slice_qkv", dict(slices=("q", "v"), out_features=12)),
    "qkv_all_slices": ("per_slice_qkv", dict(slices=("q", "k", "v"), out_features=12)),
    "float32": ("dtypes", dict(dtype="float32")),
    "bfloat16": ("dtypes", dict(dtype="bfloat16")),
}


def _declared(caps, case: LayerCase) -> bool:
    """Whether the driver's declared capabilities cover this case."""
    if case.layout not in caps.layer_layouts or case.dtype not in caps.dtypes:
        return False
    if case.qkv_slices is not None and not caps.per_slice_qkv:
        return False
    if case.use_rslora and not caps.rslora:
        return False
    scaling = case.lora_alpha / (math.sqrt(case.r) if case.use_rslora else case.r)
    if not caps.lora_alpha and scaling != 1.0:
        return False
    if case.keep_mask is not None and not caps.dropout_mask_injection:
        return False
    return not (case.bias_trainable and not ({"all", "lora_only"} & caps.bias_modes))


def _scenario_case(driver, scenario: str) -> LayerCase:
    _, kwargs = SCENARIOS[scenario]
    kwargs = dict(kwargs)
    caps = driver.capabilities
    # Scenarios other than the layout ones run in a layout the driver has, so they test what they name.
    if "layout" not in kwargs and caps.layer_layouts and "linear" not in caps.layer_layouts:
        kwargs["layout"] = sorted(caps.layer_layouts)[0]
    if "lora_alpha" not in kwargs and not caps.lora_alpha and not kwargs.get("use_rslora"):
        kwargs["lora_alpha"] = 3.0  # scaling 1 (r = 3): the only one such a library can express
    return make_case(seed=len(scenario), **kwargs)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("driver_name", list(DRIVERS))
def test_layer_forward_backward_matches_reference(driver_name, scenario):
    driver = driver_module(driver_name)
    case = _scenario_case(driver, scenario)
    declared = _declared(driver.capabilities, case)
    try:
        got = driver.layer_forward_backward(case)
    except NotSupported as exc:
        assert not declared, f"{driver_name} refused a case its capabilities declare: {exc}"
        pytest.skip(f"not supported: {exc}")
    assert declared, f"{driver_name} ran a case its capabilities say it cannot (it must raise NotSupported)"
    want = reference(case)
    tolerance = TOLERANCE[case.dtype]
    expected_trainable = {k for k in want if k.startswith("lora_")} | ({"bias"} if case.bias_trainable else set())
    deviating = {key for key in want if key not in got or not relative_error(got[key], want[key]) <= tolerance}
    if set(got["trainable"]) != expected_trainable:
        deviating.add("trainable")
    documented, bound, reason = known_deviation(driver_name, case)
    if driver_name == "keras":  # float32 LoRA kernels: y and dx show it or not depending on the sizes drawn
        documented -= {"y", "dx"} - deviating
    errors = {key: relative_error(got[key], want[key]) for key in deviating & set(want) & set(got)}
    assert deviating == documented, (
        f"{driver_name} {scenario}: results off (tolerance {tolerance}): {sorted(deviating)} with errors {errors}, "
        f"trainable={sorted(got['trainable'])}; documented deviations: {sorted(documented)} {reason}"
    )
    if bound is not None:
        assert all(err <= bound for err in errors.values()), f"{reason}: errors {errors} exceed {bound}"


@pytest.mark.parametrize("driver_name", list(DRIVERS))
def test_layer_merge_matches_reference(driver_name):
    driver = driver_module(driver_name)
    case = _scenario_case(driver, "plain")
    case = replace(case, lora_alpha=float(case.r)) if not driver.capabilities.lora_alpha else case
    try:
        got = driver.layer_merge(case)
    except NotSupported as exc:
        assert not driver.capabilities.merge, f"{driver_name} declares merge but refused: {exc}"
        pytest.skip(f"not supported: {exc}")
    assert driver.capabilities.merge, f"{driver_name} merged although its capabilities say merge=False"
    scaling = case.lora_alpha / case.r
    delta = scaling * case.lora_B[None] @ case.lora_A[None]  # (out, in)
    merged = case.weight + (delta if case.layout == "linear" else delta.T)
    want = reference(case)
    tolerance = TOLERANCE[case.dtype]
    if driver_name == "keras" and case.dtype == "float64":  # the LoRA kernels are float32 (docs/findings.md)
        tolerance = 1e-6
    assert relative_error(got["merged_weight"], merged) <= tolerance
    assert relative_error(got["merged_y"], want["y"]) <= tolerance
    if driver.capabilities.unmerge:
        assert relative_error(got["unmerged_weight"], case.weight) <= tolerance
    else:  # merge-only libraries (torchtune, litgpt, mlx-lm, lora-pytorch) report no unmerged weight
        assert "unmerged_weight" not in got


@pytest.mark.parametrize("driver_name", list(DRIVERS))
def test_driver_declares_itself(driver_name):
    driver = driver_module(driver_name)
    assert isinstance(driver.name, str) and driver.name
    caps = driver.capabilities
    assert caps.layer_layouts or caps.model_level
    for capability in ("rslora", "per_slice_qkv", "dropout_mask_injection", "merge", "model_level", "lora_alpha"):
        if not getattr(caps, capability):
            assert capability in caps.notes, f"{driver_name}: missing capability {capability!r} has no note"
    if caps.merge and not caps.unmerge:
        assert "unmerge" in caps.notes, f"{driver_name}: missing capability 'unmerge' has no note"
    assert "candidate" in driver.versions()


# ---------------------------------------------------------------------------------------------
# model level: GPT-2 + LoRA through the library, against reflora.gpt2_loss_and_grads
# ---------------------------------------------------------------------------------------------

MODEL_DRIVERS = ["adapters_hub", "mlx_lm", "keras"]
MODEL_TOLERANCE = {"float64": 1e-10, "float32": 5e-5}

# name -> (LoraConfig keyword arguments, case options)
MODEL_SCENARIOS = {
    "qv_slices_mlp": (dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], qkv_slices=["q", "v"]), {}),
    "full_matrix_all": (dict(target_modules=["c_attn", "c_proj", "c_fc"]), {}),
    "mlp_only": (dict(target_modules=["c_fc", "mlp.c_proj"]), {}),
    "last_layer_dropout": (
        dict(target_modules=["c_fc"], layers_to_transform=[1], lora_dropout=0.25),
        {"dropout": True},
    ),
    "padding": (dict(target_modules=["c_fc"]), {"padding": True}),
    "float32": (dict(target_modules=["c_fc", "mlp.c_proj"]), {"dtype": "float32"}),
    # scaling 1 (lora_alpha == r): what keras-hub's GPT2Backbone.enable_lora(rank) can express
    "scaling_one_c_proj_c_fc": (dict(target_modules=["c_proj", "c_fc"], lora_alpha=2.0), {}),
    "scaling_one_float32": (dict(target_modules=["c_proj", "c_fc"], lora_alpha=2.0), {"dtype": "float32"}),
}


def make_model_case(lora_kwargs: dict, dropout: bool = False, padding: bool = False, dtype: str = "float64"):
    from conformance.protocol import ModelCase
    from reflora import GPT2Config, LoraConfig, draw_dropout_masks, init_gpt2_params, init_lora_adapter, plan_lora

    config = GPT2Config(vocab_size=29, n_positions=12, n_embd=12, n_layer=2, n_head=2)
    lora = LoraConfig(**{"r": 2, "lora_alpha": 5.0, **lora_kwargs})
    rng = np.random.default_rng(7)
    plan = plan_lora(config, lora)
    batch, seq = 2, 5
    attention_mask = None
    labels = rng.integers(0, config.vocab_size, (batch, seq))
    if padding:  # right padding on the second row, labels ignored there
        attention_mask = np.ones((batch, seq), dtype=np.int64)
        attention_mask[1, 3:] = 0
        labels[1, 3:] = -100
    masks = draw_dropout_masks(plan, lora.lora_dropout, batch, seq, rng) if dropout else None
    return ModelCase(
        config=config,
        lora=lora,
        params=init_gpt2_params(config, rng),
        adapter=init_lora_adapter(plan, rng, init="test"),
        input_ids=rng.integers(0, config.vocab_size, (batch, seq)),
        labels=labels,
        attention_mask=attention_mask,
        dropout_masks=masks,
        dtype=dtype,
    )


def model_reference(case) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    from reflora import gpt2_loss_and_grads

    extra = {}
    if case.attention_mask is not None:
        extra["attention_mask"] = case.attention_mask
    if case.dropout_masks is not None:
        extra["dropout_masks"] = case.dropout_masks
    loss, logits, grads = gpt2_loss_and_grads(
        case.params, case.config, case.input_ids, case.labels, adapter=case.adapter, lora=case.lora, **extra
    )
    return float(loss), logits, grads


@pytest.mark.parametrize("scenario", list(MODEL_SCENARIOS))
@pytest.mark.parametrize("driver_name", MODEL_DRIVERS)
def test_model_forward_backward_matches_reference(driver_name, scenario):
    driver = driver_module(driver_name)
    lora_kwargs, options = MODEL_SCENARIOS[scenario]
    case = make_model_case(lora_kwargs, **options)
    try:
        got = driver.model_forward_backward(case)
    except NotSupported as exc:
        pytest.skip(f"not supported: {exc}")
    loss, logits, grads = model_reference(case)
    tolerance = MODEL_TOLERANCE[case.dtype]
    if case.attention_mask is not None:  # padded positions' logits are not compared (their masking differs)
        keep = case.attention_mask.astype(bool)
        logits, got_logits = logits[keep], got["logits"][keep]
    else:
        got_logits = got["logits"]
    errors = {"logits": relative_error(got_logits, logits), "loss": relative_error(got["loss"], loss)}
    errors.update({key: relative_error(got["grads"][key], grads[key]) for key in grads if key in got["grads"]})
    missing = sorted(set(grads) - set(got["grads"]))
    assert not missing, f"{driver_name} returned no gradient for {missing}"
    deviating = {"numerics"} if any(not err <= tolerance for err in errors.values()) else set()
    if set(got["trainable"]) != set(grads):
        deviating.add("trainable")
    documented, bound, reason = known_model_deviation(driver_name, case)
    assert deviating == documented, (
        f"{driver_name} {scenario}: deviations {sorted(deviating)} (tolerance {tolerance}; errors {errors}; "
        f"trainable beyond the reference's: {sorted(set(got['trainable']) - set(grads))}); "
        f"documented: {sorted(documented)} {reason}"
    )
    if bound is not None:
        assert max(errors.values()) <= bound, f"{reason}: errors {errors} exceed {bound}"


def known_model_deviation(driver_name: str, case) -> tuple[set[str], float | None, str]:
    """Documented model-level deviations (docs/findings.md): ({"numerics", "trainable"} subset, bound, why)."""
    if driver_name == "mlx_lm" and case.dtype == "float64":
        return {"numerics"}, 1e-6, "MLX's CPU softmax / layer_norm / SDPA are float32-accurate on float64 arrays"
    if driver_name == "keras":
        keys, reason = {"trainable"}, ["GPT2Backbone.enable_lora also trains the adapted layers' biases"]
        if case.dtype == "float64":
            keys.add("numerics")
            reason.append("the LoRA kernels are float32 in a float64 model")
        return keys, 1e-6, "; ".join(reason)
    return set(), None, ""


# ---------------------------------------------------------------------------------------------
# conformance/envs.py: the per-group venvs (no venv is built here)
# ---------------------------------------------------------------------------------------------


def test_every_candidate_has_a_group_and_a_driver():
    from pathlib import Path

    from conformance import envs

    drivers = Path(envs.__file__).parent / "drivers"
    for candidate, group in envs.CANDIDATES.items():
        assert group in envs.GROUPS, candidate
        assert (drivers / f"{candidate}.py").is_file(), candidate
    for alias, candidate in envs.ALIASES.items():
        assert candidate in envs.CANDIDATES, alias
    for group in envs.GROUPS.values():  # never a bare torch: it is pinned wherever it is asked for
        assert all(r == envs.TORCH_PIN for r in group.requirements if r.split("=")[0].split("[")[0] == "torch")


def test_run_isolated_reruns_conform_in_the_candidate_group(monkeypatch):
    from conformance import envs

    calls = []
    monkeypatch.setattr(envs, "run_in_env", lambda group, command: calls.append((group, command)) or 7)
    argv = ["--candidate", "adapters", "--isolated", "--max-examples", "3", "--candidate=x"]
    assert envs.run_isolated("adapters", argv) == 7
    assert calls == [("adapters", ["reflora", "conform", "--candidate", "adapters_hub", "--max-examples", "3"])]
    with pytest.raises(envs.EnvError, match="no isolated environment for candidate 'nope'"):
        envs.run_isolated("nope", [])


def test_env_folder_fingerprint_and_staleness(tmp_path, monkeypatch):
    import json

    from conformance import envs

    monkeypatch.setenv(envs.ENV_DIR_VARIABLE, str(tmp_path))
    assert envs.env_root() == tmp_path
    group = envs.GROUPS["jax"]
    folder = tmp_path / group.name
    assert not envs.is_current(group, folder)  # nothing there
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("")
    (folder / envs.MARKER).write_text(json.dumps({"fingerprint": envs.fingerprint(group)}))
    assert envs.is_current(group, folder)
    changed = replace(group, requirements=(*group.requirements, "extra==1"))
    assert envs.fingerprint(changed) != envs.fingerprint(group)
    assert not envs.is_current(changed, folder)  # a changed request rebuilds
    assert [row["state"] for row in envs.describe() if row["group"] == "jax"] == ["current"]
    with pytest.raises(envs.EnvError, match="unknown environment group"):
        envs.ensure_env("nope")


# ---------------------------------------------------------------------------------------------
# torchtune's DoRALinear (outside the protocol): forward against the DoRA paper's closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_torchtune_dora_forward_against_closed_form(bias):
    driver = driver_module("torchtune")
    case = make_case(seed=11, bias=bias)
    out_f = case.weight.shape[0]
    magnitude = np.linspace(0.5, 2.0, out_f)  # a trained magnitude, not the norm it starts at
    got = driver.dora_forward_backward(case, magnitude=magnitude)
    scaling = case.lora_alpha / case.r
    V = case.weight + scaling * case.lora_B[None] @ case.lora_A[None]  # (out, in)
    c = magnitude / np.linalg.norm(V, axis=1)  # m / ||V|| per output row
    y = case.x @ (c[:, None] * V).T + (case.bias if bias else 0.0)  # y = x (m V/||V||)ᵀ + b
    if bias:  # documented (docs/findings.md): torchtune rescales the bias by m/||V|| too
        assert relative_error(got["y"], y) > 1e-3
        assert relative_error(got["y"], y + (c - 1) * case.bias) <= TOLERANCE["float64"]
    else:
        assert relative_error(got["y"], y) <= TOLERANCE["float64"]
    assert set(got["trainable"]) == {"lora_A", "lora_B", "magnitude"}


@pytest.mark.parametrize("bias", [False, True])
def test_mlx_dora_forward_and_fuse_against_closed_form(bias):
    """mlx-lm's DoRALinear: y = x (m V/‖V‖)ᵀ + b (the bias not rescaled), and fuse() gives m V/‖V‖."""
    driver = driver_module("mlx_lm")
    case = make_case(seed=11, bias=bias)
    magnitude = np.linspace(0.5, 2.0, case.weight.shape[0])
    got = driver.dora_forward_backward(case, magnitude=magnitude)
    V = case.weight + case.lora_alpha / case.r * case.lora_B[None] @ case.lora_A[None]  # (out, in)
    merged = (magnitude / np.linalg.norm(V, axis=1))[:, None] * V
    y = case.x @ merged.T + (case.bias if bias else 0.0)
    assert relative_error(got["y"], y) <= TOLERANCE["float64"]
    assert set(got["trainable"]) == {"lora_A", "lora_B", "magnitude"}
    fused = driver.dora_merge(case, magnitude)
    assert relative_error(fused["merged_weight"], merged) <= TOLERANCE["float64"]


def test_adapters_dora_drops_the_scaling_and_never_unmerges():
    """Pinned (docs/findings.md, adapters DoRA 3-5): the norm and the merge use W + B A without s = alpha/r, and
    reset_adapter leaves a DoRA merge in place. Fails when adapters fixes it."""
    driver = driver_module("adapters_hub")
    case = make_case(seed=11, bias=False)
    magnitude = np.linspace(0.5, 2.0, case.weight.shape[0])
    s = case.lora_alpha / case.r
    assert s != 1.0
    BA = case.lora_B[None] @ case.lora_A[None]
    V, U = case.weight + s * BA, case.weight + BA
    got = driver.dora_forward_backward(case, magnitude=magnitude)
    as_computed = (magnitude / np.linalg.norm(U, axis=1)) * (case.x @ V.T)  # the norm of W + B A, no s
    assert relative_error(got["y"], as_computed) <= TOLERANCE["float64"]
    merged = driver.dora_merge(case, magnitude)
    assert relative_error(merged["merged_weight"], (magnitude / np.linalg.norm(U, axis=1))[:, None] * U) <= 1e-12
    assert relative_error(merged["unmerged_weight"], merged["merged_weight"]) <= 1e-15  # reset did nothing


def test_keras_dense_constructor_drops_lora_alpha():
    """Pinned (docs/findings.md, keras 4): Dense(lora_rank=r, lora_alpha=a) scales by 1 after build."""
    driver = driver_module("keras")
    keras = driver._keras()
    layer = keras.layers.Dense(4, lora_rank=2, lora_alpha=8)
    layer.build((None, 3))
    assert layer.lora_alpha == 2
    einsum = keras.layers.EinsumDense("ab,bc->ac", 4, lora_rank=2, lora_alpha=8)
    einsum.build((None, 3))
    assert einsum.lora_alpha == 8


# ---------------------------------------------------------------------------------------------
# adapters (AdapterHub): the issue-15.1 layer paths (its inits, several adapters, DoRA merge / init, float16)
# ---------------------------------------------------------------------------------------------


def _adapters_init_case(law: str, layout: str = "linear", use_dora: bool = False, seed: int = 3):
    """A ``LayerInitCase`` (cases.build_layer_init_case): in 200, out 170, r 4, alpha 3, a bias, float64."""
    from conformance.cases import build_layer_init_case

    spec = {"layout": layout, "dtype": "float64", "init": law, "use_dora": use_dora, "in_features": 200,
            "out_features": 170, "r": 4, "use_rslora": False, "lora_alpha": 3.0, "has_bias": True, "batch": 2,
            "seq_len": 3, "seed": seed}  # fmt: skip
    return build_layer_init_case(spec)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("law", ["kaiming_uniform", "normal_002", "vera_he_uniform"])
def test_adapters_layer_init_follows_its_law(law, layout):
    """LoRAConfig(init_weights=...) draws A (r, in) and B (out, r) from the law of conformance.init_laws (KS,
    α = 1e-3; the other laws' A is rejected), B = 0 where the law says, W is left alone, and y is reflora's
    forward with the drawn A and B (expectations.layer_init_expectation)."""
    from conformance import init_laws
    from conformance.compare import ks_pvalue, normal_cdf, uniform_cdf
    from conformance.expectations import layer_init_expectation

    driver = driver_module("adapters_hub")
    case = _adapters_init_case(law, layout)
    got = driver.layer_init(case)
    in_f, out_f, cdfs = 200, 170, {"uniform": uniform_cdf, "normal": normal_cdf}
    for result, entries in (("lora_A", init_laws.law(law).a), ("lora_B", init_laws.law(law).b)):
        assert got[result].shape == ((case.r, in_f) if result == "lora_A" else (out_f, case.r))
        if entries is None:
            assert np.all(got[result] == 0), f"{law}: {result} is not zero"
            continue
        scale = entries.scale(case.r, in_f, out_f)
        assert ks_pvalue(got[result] / scale, cdfs[entries.family])[1] > 1e-3, f"{law}: {result} is not {entries.text}"
    for other in ("kaiming_uniform", "normal_002", "vera_he_uniform"):
        entries = init_laws.law(other).a
        if other != law:
            scale = entries.scale(case.r, in_f, out_f)
            assert ks_pvalue(got["lora_A"] / scale, cdfs[entries.family])[1] < 1e-3, f"{law}'s A passes as {other}'s"
    want = layer_init_expectation(case, got["lora_A"], got["lora_B"], "float64")
    assert relative_error(got["y"], want["y"]) <= TOLERANCE["float64"]
    assert np.array_equal(got["weight"], case.weight)


def test_adapters_dora_init_is_the_row_norm_and_raises_on_conv1d():
    """DoRA at init (linear layout): m = ‖W‖ per output row and y = x Wᵀ + b. On the conv1d layout add_adapter
    raises (docs/findings.md, adapters DoRA item 1; deviation layer.dora_init.conv1d): fails when fixed."""
    driver = driver_module("adapters_hub")
    case = _adapters_init_case("kaiming_uniform", "linear", use_dora=True)
    got = driver.layer_init(case)
    assert relative_error(got["magnitude"], np.linalg.norm(case.weight, axis=1)) <= TOLERANCE["float64"]
    assert relative_error(got["y"], case.x @ case.weight.T + case.bias) <= TOLERANCE["float64"]
    with pytest.raises(RuntimeError, match="must match the size"):
        driver.layer_init(_adapters_init_case("kaiming_uniform", "conv1d", use_dora=True))


def _adapters_multi_case(layout: str, active=None, adapter_names=None, dtype: str = "float64"):
    """A ``LayerAdaptersCase`` (cases.build_layer_adapters_case) with adapters a0 (r 2, s 1.5), a1 (r 3, s 1/3),
    a2 (r 1, s 8) on a 5 -> 7 layer with a bias."""
    from conformance.cases import build_layer_adapters_case

    adapters = {"a0": {"r": 2, "lora_alpha": 3.0, "use_rslora": False},
                "a1": {"r": 3, "lora_alpha": 1.0, "use_rslora": False},
                "a2": {"r": 1, "lora_alpha": 8.0, "use_rslora": False}}  # fmt: skip
    spec = {"layout": layout, "dtype": dtype, "in_features": 5, "out_features": 7, "has_bias": True,
            "adapters": adapters, "active": active, "adapter_names": adapter_names,
            "batch": len(adapter_names) if adapter_names else 2, "seq_len": 3, "seed": 5}  # fmt: skip
    return build_layer_adapters_case(spec)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize(
    "active, adapter_names",
    [(["a1", "a0"], None), (["a2", "a0", "a1"], None), (["a1"], None), ([], None),
     (None, ["a1", "a0", "a1", "a2"]), (None, ["a2", "a2", "a2"])],
)  # fmt: skip
def test_adapters_layer_adapters_sum_and_rows(layout, active, adapter_names):
    """layer_adapters (Average with weights n, unnormalised; MultiTask per row) against reflora's several-adapter
    layer (expectations.layer_adapters_forward_backward): y, dx and every acting adapter's dA, dB."""
    from conformance.expectations import layer_adapters_forward_backward

    driver = driver_module("adapters_hub")
    case = _adapters_multi_case(layout, active, adapter_names)
    got = driver.layer_adapters(case)
    want = layer_adapters_forward_backward(case, "float64")
    assert set(got["grads"]) == set(want["grads"])
    for key in ("y", "dx"):
        assert relative_error(got[key], want[key]) <= TOLERANCE["float64"], key
    for key in want["grads"]:
        assert relative_error(got["grads"][key], want["grads"][key]) <= TOLERANCE["float64"], key


def test_adapters_layer_adapters_refuses_a_base_row():
    """A row with no adapter ("__base__") has no MultiTask expression: NotSupported with the declared note."""
    driver = driver_module("adapters_hub")
    with pytest.raises(NotSupported, match="__base__"):
        driver.layer_adapters(_adapters_multi_case("linear", adapter_names=["a0", "__base__", "a1"]))


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_adapters_layer_merge_with_magnitude_is_the_dora_merge(layout):
    """layer_merge with case.magnitude runs merge_adapter / reset_adapter on the DoRA module: on the linear layout
    the merged weight is m ⊙ (W + B A)/‖W + B A‖ (no s) and reset leaves it merged; on conv1d add_adapter raises
    (docs/findings.md, adapters DoRA items 1, 2, 4). Fails when adapters fixes them."""
    driver = driver_module("adapters_hub")
    case = make_case(seed=12, layout=layout, bias=False)
    case = replace(case, magnitude=np.linspace(0.5, 2.0, 9))
    if layout == "conv1d":
        with pytest.raises(RuntimeError, match="must match the size"):
            driver.layer_merge(case)
        return
    U = case.weight + case.lora_B[None] @ case.lora_A[None]  # W + B A, without s = alpha/r
    got = driver.layer_merge(case)
    assert relative_error(got["merged_weight"], (case.magnitude / np.linalg.norm(U, axis=1))[:, None] * U) <= 1e-12
    assert relative_error(got["unmerged_weight"], got["merged_weight"]) <= 1e-15


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_adapters_half_precision_forward_backward(dtype):
    """layer_forward_backward with the layer cast to float16 / bfloat16 (values exact in both): within the
    dtype's rounding of reflora's float64 result (2^-11 / 2^-8 unit roundoff, a factor 16 for the sums)."""
    driver = driver_module("adapters_hub")
    case = make_case(seed=13, layout="conv1d", dtype=dtype)
    got, want = driver.layer_forward_backward(case), reference(case)
    bound = 16 * (2.0**-11 if dtype == "float16" else 2.0**-8)
    for key in ("y", "dx", "lora_A", "lora_B"):
        assert relative_error(got[key], want[key]) <= bound, key


# ---------------------------------------------------------------------------------------------
# loralib, torchtune, litgpt, lora-pytorch: the issue-15.1 layer paths (inits, DoRA merge / init, float16)
# ---------------------------------------------------------------------------------------------

TORCH_LAYER_DRIVERS = ["loralib", "torchtune", "litgpt", "lora_pytorch"]
TORCH_INIT_LAWS = ("kaiming_uniform", "kaiming_uniform_transposed")  # the two laws these libraries use


def _torch_init_case(driver, layout: str = "linear", use_dora: bool = False, seed: int = 4, dtype: str = "float64"):
    """A ``LayerInitCase`` (cases.build_layer_init_case): in 150, out 130, r 4 (alpha 4 for a library with no
    alpha, else 10), a bias."""
    from conformance.cases import build_layer_init_case

    law = sorted(driver.capabilities.layer_init_methods)[0]
    alpha = 10.0 if driver.capabilities.lora_alpha else 4.0
    spec = {"layout": layout, "dtype": dtype, "init": law, "use_dora": use_dora, "in_features": 150,
            "out_features": 130, "r": 4, "use_rslora": False, "lora_alpha": alpha, "has_bias": True, "batch": 2,
            "seq_len": 3, "seed": seed}  # fmt: skip
    return build_layer_init_case(spec)


@pytest.mark.parametrize("seed", [4, 5])  # loralib: Linear (even seeds) and MergedLinear (odd seeds)
@pytest.mark.parametrize("driver_name", TORCH_LAYER_DRIVERS)
def test_torch_layer_init_follows_its_law(driver_name, seed):
    """layer_init draws A (r, in) from the declared law (KS, α = 1e-3) and not from the other torch law, B = 0,
    W unchanged, y = x Wᵀ + b (expectations.layer_init_expectation), in every declared layout; the same seed
    draws the same A, another seed another A."""
    from conformance import init_laws
    from conformance.compare import ks_pvalue, uniform_cdf
    from conformance.expectations import layer_init_expectation

    driver = driver_module(driver_name)
    (law,) = driver.capabilities.layer_init_methods
    for layout in sorted(driver.capabilities.layer_layouts):
        case = _torch_init_case(driver, layout, seed=seed)
        got = driver.layer_init(case)
        assert got["lora_A"].shape == (4, 150) and got["lora_B"].shape == (130, 4)
        assert np.all(got["lora_B"] == 0), f"{driver_name}: B is not zero at init"
        for other in TORCH_INIT_LAWS:
            scale = init_laws.law(other).a.scale(4, 150, 130)
            p = ks_pvalue(got["lora_A"] / scale, uniform_cdf)[1]
            assert (p > 1e-3) if other == law else (p < 1e-3), f"{driver_name} {layout}: A against {other}: p={p}"
        want = layer_init_expectation(case, got["lora_A"], got["lora_B"], "float64")
        assert relative_error(got["y"], want["y"]) <= TOLERANCE["float64"]
        assert np.array_equal(got["weight"], case.weight)
        assert np.array_equal(driver.layer_init(case)["lora_A"], got["lora_A"])  # seeded
        assert not np.array_equal(driver.layer_init(replace(case, seed=seed + 2))["lora_A"], got["lora_A"])


@pytest.mark.parametrize("driver_name", TORCH_LAYER_DRIVERS)
def test_torch_layer_init_refuses_what_it_lacks(driver_name):
    """A law the library lacks, DoRA where it has none, or a layout it lacks: NotSupported, never another init."""
    driver = driver_module(driver_name)
    case = _torch_init_case(driver)
    with pytest.raises(NotSupported, match="init law 'gaussian'"):
        driver.layer_init(replace(case, init="gaussian"))
    if not driver.capabilities.layer_dora:
        with pytest.raises(NotSupported, match="DoRA"):
            driver.layer_init(replace(case, use_dora=True))
    if "conv1d" not in driver.capabilities.layer_layouts:
        with pytest.raises(NotSupported, match="layout"):
            driver.layer_init(replace(case, layout="conv1d", weight=case.weight.T.copy()))


def test_torchtune_dora_init_and_dora_merge():
    """DoRALinear at init: initialize_dora_magnitude gives m = ‖W‖ per row and y = x Wᵀ + b. layer_merge with
    case.magnitude: get_merged_lora_ckpt merges W' = m ⊙ V/‖V‖_row (V = W + s·B A) and the merged nn.Linear gives
    x W'ᵀ + b (the bias not rescaled, unlike DoRALinear.forward: docs/findings.md); no unmerged_weight."""
    driver = driver_module("torchtune")
    case = _torch_init_case(driver, use_dora=True)
    got = driver.layer_init(case)
    assert relative_error(got["magnitude"], np.linalg.norm(case.weight, axis=1)) <= TOLERANCE["float64"]
    assert relative_error(got["y"], case.x @ case.weight.T + case.bias) <= TOLERANCE["float64"]
    merge_case = replace(make_case(seed=12), magnitude=np.linspace(0.5, 2.0, 9))
    V = merge_case.weight + merge_case.scaling * merge_case.lora_B[None] @ merge_case.lora_A[None]  # (out, in)
    merged_weight = (merge_case.magnitude / np.linalg.norm(V, axis=1))[:, None] * V
    merged = driver.layer_merge(merge_case)
    assert relative_error(merged["merged_weight"], merged_weight) <= TOLERANCE["float64"]
    assert relative_error(merged["merged_y"], merge_case.x @ merged_weight.T + merge_case.bias) <= TOLERANCE["float64"]
    assert "unmerged_weight" not in merged


@pytest.mark.parametrize("driver_name", TORCH_LAYER_DRIVERS)
def test_torch_float16_forward_backward(driver_name):
    """layer_forward_backward in float16 (values exact in float16) within 16 unit roundoffs (2^-11) of reflora's
    float64 result; lora-pytorch's dx is its documented deviation (the base path is missing) in float16 too."""
    driver = driver_module(driver_name)
    case = _scenario_case(driver, "float32")
    case = replace(case, dtype="float16", seed=7)
    got, want = driver.layer_forward_backward(case), reference(case)
    documented, _, _ = known_deviation(driver_name, case)
    for key in ("y", "dx", "lora_A", "lora_B"):
        error = relative_error(got[key], want[key])
        assert (error > 16 * 2.0**-11) if key in documented else (error <= 16 * 2.0**-11), (key, error)


@pytest.mark.parametrize("seed", [4, 5, 6, 7])
def test_lora_pytorch_merge_copy_and_in_place(seed):
    """merge_lora as a copy (seeds 0, 1 mod 4) and in place (2, 3 mod 4), on the wrapped layer (even seeds) and on
    a model holding it (odd seeds): each gives W + B A and its forward."""
    driver = driver_module("lora_pytorch")
    case = make_case(seed=seed, lora_alpha=3.0)  # r 3: scaling 1, all lora-pytorch can express
    got = driver.layer_merge(case)
    merged = case.weight + case.lora_B[None] @ case.lora_A[None]
    assert relative_error(got["merged_weight"], merged) <= TOLERANCE["float64"]
    assert relative_error(got["merged_y"], reference(case)["y"]) <= TOLERANCE["float64"]


@pytest.mark.parametrize("seed", [4, 5])
def test_lora_pytorch_from_module_on_a_model(seed):
    """from_module on the nn.Linear (even seeds) and on an nn.Sequential holding it (odd seeds): the same y and
    LoRA gradients, dx with the documented missing base path, and the root's parameters() are A and B only."""
    driver = driver_module("lora_pytorch")
    case = make_case(seed=seed, lora_alpha=3.0)
    got, want = driver.layer_forward_backward(case), reference(case)
    for key in ("y", "lora_A", "lora_B"):
        assert relative_error(got[key], want[key]) <= TOLERANCE["float64"], key
    assert relative_error(got["dx"], want["dx"]) > 1e-3  # docs/findings.md: dx lacks dy·W
    assert set(got["trainable"]) == {"lora_A", "lora_B"}


@pytest.mark.parametrize("slices", [("q", "v"), ("k",), ("q", "k", "v")])
@pytest.mark.parametrize("driver_name, layout", [("loralib", "linear"), ("loralib", "conv1d"), ("litgpt", "linear")])
def test_per_slice_merge(driver_name, layout, slices):
    """Per-slice merge (the suite draws it in layer.merge_qkv_slices.*; here every slice subset): loralib
    MergedLinear's .eval() / .train() and litgpt LoRAQKVLinear.merge() put s·B_q A_q ... in the slice's output
    rows (linear) or columns (conv1d) only; loralib's unmerge restores W."""
    driver = driver_module(driver_name)
    case = make_case(seed=21, layout=layout, slices=slices, out_features=12)
    delta = np.zeros((12, 7))  # (out, in)
    for s in slices:
        start = "qkv".index(s) * 4
        delta[start : start + 4] = case.scaling * case.lora_B[s] @ case.lora_A[s]
    merged = case.weight + (delta if layout == "linear" else delta.T)
    got = driver.layer_merge(case)
    assert relative_error(got["merged_weight"], merged) <= TOLERANCE["float64"]
    assert relative_error(got["merged_y"], reference(case)["y"]) <= TOLERANCE["float64"]
    if driver.capabilities.unmerge:
        assert relative_error(got["unmerged_weight"], case.weight) <= TOLERANCE["float64"]


def test_torchtune_qat_from_lora_linear_drops_the_bias():
    """Pinned (docs/findings.md, torchtune: QATLoRALinear drops the bias): from_lora_linear builds its
    ValueError("Bias is not supported in QAT + LoRA yet") without raising it, and the QAT layer has no bias. With
    no fake quantizers its output is the LoRA layer's minus b. Fails when torchtune raises or keeps the bias."""
    pytest.importorskip("torchtune")
    import torch
    from torchtune.modules.peft import LoRALinear, QATLoRALinear

    torch.manual_seed(0)
    lora = LoRALinear(7, 9, rank=3, alpha=6, use_bias=True).double()
    torch.nn.init.normal_(lora.lora_b.weight)
    torch.nn.init.normal_(lora.bias)
    qat = QATLoRALinear.from_lora_linear(lora).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():
        assert qat.bias is None
        assert torch.allclose(qat(x), lora(x) - lora.bias, rtol=0, atol=1e-12)


_ADAPTERS_GPT2 = {"seed": 7, "dtype": "float64", "batch": 3, "seq_len": 4, "labels": True,
                  "gpt2": {"vocab_size": 23, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}}  # fmt: skip
_MLP = ["c_fc", "mlp.c_proj"]
# advanced specs adapters' GPT-2 can express (MLP targets; the suite's own draws also target attn.c_proj)
ADAPTERS_ADVANCED_SPECS = {
    "merge_one": {"feature": "model.merge.lora", "active": ["a0"],
                  "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": _MLP}}},
    "unload_one": {"feature": "model.merge.unload", "active": ["a0"], "labels": False,
                   "adapters": {"a0": {"r": 3, "lora_alpha": 1.0, "target_modules": ["c_fc"]}}},
    "merge_slices_layer": {"feature": "model.merge.lora", "active": ["a0"],
                           "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_attn"],
                                               "qkv_slices": ["k"], "layers_to_transform": [1]}}},
    "unload_slices": {"feature": "model.merge.unload", "active": ["a0"], "labels": False,
                      "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_attn", "mlp.c_proj"],
                                          "qkv_slices": ["q", "k", "v"]}}},
    "active_slices": {"feature": "model.adapters.active", "active": ["a0"],
                      "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_attn", "c_fc"],
                                          "qkv_slices": ["q", "v"]}}},
    "active_two": {"feature": "model.adapters.active", "active": ["a1", "a0"],
                   "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": _MLP},
                                "a1": {"r": 3, "lora_alpha": 1.0, "target_modules": _MLP}}},
    "active_dropout": {"feature": "model.adapters.active", "active": ["a0", "a1"], "dropout": True,
                       "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": _MLP, "lora_dropout": 0.25},
                                    "a1": {"r": 3, "lora_alpha": 1.0, "target_modules": _MLP, "lora_dropout": 0.5}}},
    "disabled": {"feature": "model.adapters.disabled", "active": [],
                 "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": _MLP},
                              "a1": {"r": 1, "lora_alpha": 2.0, "target_modules": ["c_fc"]}}},
    "mixed_batch": {"feature": "model.adapters.mixed_batch", "batch": 4, "adapter_names": ["a1", "a0", "a0", "a1"],
                    "adapters": {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": _MLP},
                                 "a1": {"r": 1, "lora_alpha": 2.0, "target_modules": _MLP}}},
}  # fmt: skip


@pytest.mark.parametrize("scenario", sorted(ADAPTERS_ADVANCED_SPECS))
def test_adapters_advanced_paths_pass_the_suite_check(scenario):
    """model_merge / model_adapters on specs adapters' GPT-2 can express, through the suite's own check
    (conformance.checks.run_check, in process): merge_adapter / reset_adapter, Average (the sum), no active
    setup, MultiTask with task_ids, per-adapter dropout masks, loss and gradients."""
    pytest.importorskip("adapters")
    from conformance.checks import run_check
    from conformance.runner import make_runner

    runner = make_runner("adapters_hub", "none", 120)
    result = run_check({**_ADAPTERS_GPT2, **ADAPTERS_ADVANCED_SPECS[scenario]}, runner.call)
    assert result.passed, result.report("adapters_hub")


def test_adapters_advanced_refusals_name_what_adapters_lacks():
    """What adapters' GPT-2 cannot express is NotSupported with the declared note: attn.c_proj, a safe merge,
    two adapters merged on one module, a '__base__' row, DoRA (add_adapter raises on Conv1D)."""
    driver = driver_module("adapters_hub")
    from conformance.cases import build_advanced_case

    def case(**fields):
        return build_advanced_case({**_ADAPTERS_GPT2, **fields})

    one = {"a0": {"r": 2, "lora_alpha": 3.0, "target_modules": ["attn.c_proj"]}}
    two = {n: {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_fc"]} for n in ("a0", "a1")}
    with pytest.raises(NotSupported, match=r"attn\.c_proj is never adapted"):
        driver.model_merge(case(feature="model.merge.lora", adapters=one, active=["a0"]))
    with pytest.raises(NotSupported, match="no safe merge"):
        driver.model_merge(case(feature="model.merge.safe", adapters=two, active=["a0"], poison="nan", labels=False))
    with pytest.raises(NotSupported, match="one merged adapter at a time"):
        driver.model_merge(case(feature="model.merge.lora", adapters=two, active=["a0", "a1"]))
    with pytest.raises(NotSupported, match="__base__"):
        driver.model_adapters(case(feature="model.adapters.mixed_batch", adapters=two, batch=4,
                                   adapter_names=["a0", "__base__", "a1", "a1"]))  # fmt: skip
    dora = {"d": {"r": 2, "lora_alpha": 3.0, "target_modules": ["c_fc"], "use_dora": True}}
    with pytest.raises(NotSupported, match="DoRA"):
        driver.model_adapters(case(feature="model.dora", adapters=dora, active=["d"]))


def test_adapters_delete_after_merge_raises():
    """Pinned (docs/findings.md, 'adapters: delete_adapter of a merged, active LoRA raises'): KeyError in
    reset_adapter (the driver's merge_and_unload deletes the adapter while none is active). Fails when fixed."""
    pytest.importorskip("adapters")
    import adapters
    import torch
    from adapters import LoRAConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=23, n_positions=16))
    adapters.init(model)
    model.add_adapter("a", config=LoRAConfig(r=2, alpha=4, selfattn_lora=False, intermediate_lora=True))
    model.set_active_adapters("a")  # as train_adapter("a") leaves it
    model.merge_adapter("a")
    with pytest.raises(KeyError):
        model.delete_adapter("a")


def test_adapters_dora_is_the_full_norm_form_when_alpha_is_r():
    """adapters' one DoRA differentiates its norm: with alpha == r and no bias (where items 3 and 5 of
    docs/findings.md vanish) it is reflora's full-norm DoRA to 1e-12, and not the detached one (declared as
    layer_dora_full_norm; both layer.dora.* and layer.dora_full_norm.* are known deviations for alpha != r)."""
    from conformance.expectations import layer_adapted_forward_backward

    driver = driver_module("adapters_hub")
    case = replace(make_case(seed=11, bias=False, r=3, lora_alpha=3.0), magnitude=np.linspace(0.5, 2.0, 9))
    got = driver.layer_forward_backward(replace(case, dora_norm="full"))
    full = layer_adapted_forward_backward(case, "float64", norm_gradient="full")
    detached = layer_adapted_forward_backward(case, "float64", norm_gradient="detached")
    for key in ("y", "dx", "lora_A", "lora_B", "magnitude"):
        assert relative_error(got[key], full[key]) <= 1e-12, key
    assert relative_error(got["lora_B"], detached["lora_B"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# mlx-lm, keras, flax nnx: layer_init, DoRA merge / dropout / zero rows, model-level DoRA and init (helper E)
# ---------------------------------------------------------------------------------------------


def _init_case(layout: str, init: str, dtype: str = "float32", use_dora: bool = False, seed: int = 3,
               lora_alpha: float = 6.0):  # fmt: skip
    """A ``LayerInitCase`` large enough to see a law (in 160, out 200, r 4)."""
    from conformance.protocol import LayerInitCase

    rng = np.random.default_rng(seed)
    in_f, out_f = 160, 200
    weight = rng.standard_normal((out_f, in_f) if layout == "linear" else (in_f, out_f)) * 0.1
    return LayerInitCase(layout=layout, x=rng.standard_normal((2, 3, in_f)), weight=weight,
                         bias=rng.standard_normal(out_f), r=4, lora_alpha=lora_alpha, use_rslora=False, init=init,
                         use_dora=use_dora, dtype=dtype, seed=seed)  # fmt: skip


def _base_y(case) -> np.ndarray:
    w = case.weight if case.layout == "conv1d" else case.weight.T  # (in, out)
    return case.x @ w + case.bias


def _assert_uniform(values: np.ndarray, bound: float) -> None:
    """Entries within U(±bound), spread over it (max |v| above 0.95·bound, mean |v| near bound/2)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    assert v.max() <= bound * (1 + 1e-6) and v.max() > 0.95 * bound, (v.max(), bound)
    assert abs(v.mean() / bound - 0.5) < 0.05, v.mean() / bound


@pytest.mark.parametrize(("driver_name", "layout", "law"), [
    ("mlx_lm", "linear", "kaiming_uniform"), ("flax_nnx", "linear", "he_uniform"),
    ("flax_nnx", "conv1d", "he_uniform"), ("keras", "conv1d", "he_uniform"), ("keras", "linear", "he_uniform_b"),
])  # fmt: skip
def test_layer_init_follows_the_declared_law(driver_name, layout, law):
    """layer_init: the library's own init has the law the driver declares (conformance.init_laws), B or A is
    exactly 0, y is the base's, the weight unchanged; another law is refused."""
    from conformance.init_laws import law as init_law

    driver = driver_module(driver_name)
    assert law in driver.capabilities.layer_init_methods
    alpha = 4.0 if not driver.capabilities.lora_alpha else 6.0  # flax: scaling 1 only
    case = _init_case(layout, law, lora_alpha=alpha)
    got = driver.layer_init(case)
    the_law = init_law(law)
    for name, entries in (("lora_A", the_law.a), ("lora_B", the_law.b)):
        if entries is None:
            assert not np.any(got[name]), f"{name} should be 0"
        else:
            _assert_uniform(got[name], entries.scale(case.r, 160, 200))
    assert relative_error(got["y"], _base_y(case)) <= TOLERANCE["float32"]
    assert relative_error(got["weight"], case.weight) <= TOLERANCE["float32"]  # the base, rounded once
    with pytest.raises(NotSupported):
        driver.layer_init(replace(case, init="gaussian"))


def test_mlx_dora_init_magnitude_is_the_float32_row_norm():
    """Pinned (docs/findings.md, mlx 2): DoRALinear.set_linear computes m = ‖W‖ in float32, also for a float64 W."""
    driver = driver_module("mlx_lm")
    case = _init_case("linear", "kaiming_uniform", dtype="float64", use_dora=True)
    got = driver.layer_init(case)
    exact = np.linalg.norm(case.weight, axis=1)
    error = relative_error(got["magnitude"], exact)
    assert 1e-12 < error < 1e-6, error
    assert relative_error(got["magnitude"], np.linalg.norm(case.weight.astype(np.float32), axis=1)) <= 1e-6


def _mlx_dora_case(**kwargs):
    case = make_case(seed=11, **kwargs)
    return replace(case, magnitude=np.linspace(0.5, 2.0, case.weight.shape[0]))


def test_mlx_dora_dropout_rescales_the_undropped_base_output():
    """Pinned (docs/findings.md, mlx 3): with LoRA dropout DoRALinear computes c ⊙ (x Wᵀ + s·x_d Aᵀ Bᵀ) + b, not
    PEFT's x Wᵀ + b + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s·x_d Aᵀ Bᵀ (c = m/‖W + s·BA‖, x_d the dropped input)."""
    driver = driver_module("mlx_lm")
    case = _mlx_dora_case(lora_dropout=0.5, with_mask=True)
    got = driver.dora_forward_backward(case, case.magnitude)
    s = case.lora_alpha / case.r
    V = case.weight + s * case.lora_B[None] @ case.lora_A[None]
    c = case.magnitude / np.linalg.norm(V, axis=1)
    xd = case.x * case.keep_mask / (1 - case.lora_dropout)
    delta = s * xd @ case.lora_A[None].T @ case.lora_B[None].T
    mlx_form = c * (case.x @ case.weight.T + delta) + case.bias
    peft_form = case.x @ case.weight.T + case.bias + (c - 1) * (xd @ case.weight.T) + c * delta
    assert relative_error(got["y"], mlx_form) <= TOLERANCE["float64"]
    assert relative_error(got["y"], peft_form) > 1e-2


def test_mlx_dora_zero_norm_row_is_nan_and_fuse_is_layer_dora_merge():
    """Pinned (docs/findings.md, mlx 4): a row of zero norm (W row and B row 0) gives NaN in that output row
    only; and layer_merge with a magnitude is DoRALinear.fuse() (layer.dora_merge.linear): m ⊙ V/‖V‖."""
    driver = driver_module("mlx_lm")
    case = _mlx_dora_case(bias=False)
    weight, lora_B = case.weight.copy(), case.lora_B[None].copy()
    weight[2], lora_B[2] = 0.0, 0.0
    got = driver.dora_forward_backward(replace(case, weight=weight, lora_B={None: lora_B}), case.magnitude)
    assert np.isnan(got["y"][..., 2]).all() and not np.isnan(np.delete(got["y"], 2, axis=-1)).any()
    merged = driver.layer_merge(case)
    V = case.weight + case.lora_alpha / case.r * case.lora_B[None] @ case.lora_A[None]
    want = (case.magnitude / np.linalg.norm(V, axis=1))[:, None] * V
    assert relative_error(merged["merged_weight"], want) <= TOLERANCE["float64"]
    assert "unmerged_weight" not in merged


def _advanced_spec(feature: str, dtype: str, **fields) -> dict:
    gpt2 = {"n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 16, "vocab_size": 23}
    return {"feature": feature, "dtype": dtype, "gpt2": gpt2, "batch": 2, "seq_len": 4, "seed": 3, **fields}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("feature", ["model.dora", "model.init.true", "model.dora.init"])
def test_mlx_model_dora_and_init_pass_in_float32(feature, dtype):
    """model_adapters (DoRA) and init_adapter through mlx-lm's gpt2.Model pass the suite's own check in float32;
    in float64 only the MLX kernels' float32 accuracy shows (docs/findings.md, mlx): every error below 1e-6."""
    driver_module("mlx_lm")
    from conformance.checks import run_check
    from conformance.drivers import mlx_lm
    from conformance.loader import call_driver

    if feature == "model.dora":
        lora = {"r": 3, "lora_alpha": 2.0, "target_modules": ["c_attn", "mlp.c_proj"], "use_dora": True}
        spec = _advanced_spec(feature, dtype, adapters={"d": lora}, active=["d"], dropout=False, labels=True)
    else:
        lora = {"r": 4, "lora_alpha": 3.0, "target_modules": ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"],
                "init_lora_weights": True, "use_dora": feature == "model.dora.init"}  # fmt: skip
        spec = _advanced_spec(feature, dtype, adapters={}, init=lora, labels=False)
    result = run_check(spec, lambda method, spec, folder=None: call_driver(mlx_lm, method, spec, folder))
    assert result.error is None
    if dtype == "float32":
        assert result.passed, [c for c in result.comparisons if not c.passed]
    else:
        assert all(c.passed or c.error < 1e-6 for c in result.comparisons), result.comparisons


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("feature", ["model.merge.lora", "model.merge.dora"])
def test_mlx_model_merge_fuses_and_passes_without_unmerged(feature, dtype):
    """model_merge: mlx_lm.fuse's fuse() on every LoRA / DoRA layer of mlx-lm's gpt2.Model, checked with the
    driver's capabilities (unmerge=False: no "unmerged"): passes in float32; in float64 only the MLX kernels'
    float32 accuracy shows in the logits (docs/findings.md, mlx), the fused weights match to 1e-12."""
    driver_module("mlx_lm")
    from conformance.checks import run_check
    from conformance.drivers import mlx_lm
    from conformance.loader import call_driver

    lora = {"r": 3, "lora_alpha": 2.0, "target_modules": ["c_attn", "mlp.c_proj"], "use_dora": "dora" in feature}
    spec = _advanced_spec(feature, dtype, adapters={"a": lora}, active=["a"], dropout=False, labels=True)
    result = run_check(spec, lambda method, spec, folder=None: call_driver(mlx_lm, method, spec, folder),
                       mlx_lm.capabilities)  # fmt: skip
    assert result.error is None and "unmerged" not in result.actual
    assert sorted(result.actual["merged"]) == sorted(result.expected["merged"])
    if dtype == "float32":
        assert result.passed, [c for c in result.comparisons if not c.passed]
    else:
        assert all(c.passed or c.error < 1e-6 for c in result.comparisons), result.comparisons
        assert all(c.passed for c in result.comparisons if c.name.startswith("merged/")), result.comparisons


def test_mlx_model_merge_refuses_two_adapters_and_safe_merge():
    """One LoRA layer per Linear: two active adapters are refused; fuse() has no safe merge: case.safe refused."""
    driver_module("mlx_lm")
    from conformance.drivers import mlx_lm
    from conformance.loader import call_driver

    lora = {"r": 2, "lora_alpha": 4.0, "target_modules": ["c_attn"]}
    two = _advanced_spec("model.merge.lora", "float32", adapters={"a": lora, "b": lora}, active=["a", "b"], labels=True)
    with pytest.raises(NotSupported, match="2 adapters"):
        call_driver(mlx_lm, "model_merge", two, None)
    safe = _advanced_spec(
        "model.merge.safe", "float32", adapters={"a0": lora}, active=["a0"], poison="nan", labels=True
    )
    with pytest.raises(NotSupported, match="safe merge"):
        call_driver(mlx_lm, "model_merge", safe, None)


def test_keras_float64_matmul_runs_in_float32():
    """Pinned (docs/findings.md, keras 5): on the torch backend keras.ops.matmul of two float64 tensors computes
    and returns float32 (result_type maps float64 to float32), so a float64 Dense is float32-accurate even without
    LoRA (keras-team/keras#23704). Fails when Keras keeps float64."""
    driver = driver_module("keras")
    keras = driver._keras()
    import torch

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 7)), rng.standard_normal((7, 9))
    assert keras.backend.result_type("float64", "float64") == "float32"
    got = keras.ops.convert_to_numpy(keras.ops.matmul(torch.from_numpy(x), torch.from_numpy(w)))
    assert got.dtype == np.float32 and 1e-9 < relative_error(got, x @ w) < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_flax_conv1d_runs_both_lora_apis(seed):
    """flax nnx, conv1d layout: nnx.LoRALinear (even seeds) and nnx.LoRA(base_module=nnx.Linear) (odd seeds)
    both give the reference's y, dx, dA, dB (scaling 1)."""
    driver = driver_module("flax_nnx")
    case = replace(make_case(seed=seed, layout="conv1d", lora_alpha=3.0), seed=seed)
    layer, _, _, _ = driver._lora_layer(case)
    from flax import nnx

    assert isinstance(layer, nnx.LoRALinear if seed % 2 == 0 else nnx.LoRA)
    got, want = driver.layer_forward_backward(case), reference(case)
    for key in ("y", "dx", "lora_A", "lora_B"):
        assert relative_error(got[key], want[key]) <= TOLERANCE["float64"], key


@pytest.mark.parametrize("targets", [["wte"], ["wte", "c_fc"]])
def test_mlx_embedding_lora_adapts_the_tied_head_too(targets):
    """Pinned (docs/findings.md, mlx 5): with LoRA on wte, mlx-lm's logits are those of reflora's *merged* model
    (the tied head on W + ΔW, LoRAEmbedding.as_linear), not PEFT's (the tied head keeps W)."""
    driver = driver_module("mlx_lm")
    import reflora as rf
    from conformance.cases import build_model_case

    gpt2 = {"n_embd": 12, "n_head": 3, "n_inner": None, "n_layer": 1, "n_positions": 11, "vocab_size": 31}
    lora = {"bias": "none", "lora_alpha": 1, "lora_dropout": 0.0, "r": 6, "target_modules": targets,
            "use_rslora": False}  # fmt: skip
    spec = {"batch": 2, "dtype": "float64", "feature": "model.embedding.lora", "gpt2": gpt2, "lora": lora,
            "objective": "dlogits", "seed": 164890, "seq_len": 3}  # fmt: skip
    case = build_model_case(spec)
    got = driver.model_forward_backward(case)["logits"]
    merged = rf.merge_and_unload(case.params, case.config, case.lora, case.adapter)
    tied = rf.gpt2_forward(merged, case.config, case.input_ids)[0]
    peft = rf.gpt2_forward(case.params, case.config, case.input_ids, adapter=case.adapter, lora=case.lora)[0]
    assert relative_error(got, tied) < 1e-6  # the MLX kernels' float32 accuracy (docs/findings.md, mlx)
    assert relative_error(got, peft) > 1e-2


@pytest.mark.parametrize("targets", [["wte"], ["wte", "c_fc"]])
def test_keras_embedding_lora_adapts_the_tied_head_too(targets):
    """Pinned (docs/findings.md, keras 6): LoRA on keras-hub's token_embedding gives the logits of reflora's
    *merged* model (the reversed, tied embedding is W + ΔW), not PEFT's (the tied head keeps W)."""
    driver = driver_module("keras")
    import reflora as rf
    from conformance.cases import build_model_case

    gpt2 = {"n_embd": 8, "n_head": 1, "n_inner": None, "n_layer": 1, "n_positions": 9, "vocab_size": 11}
    lora = {"bias": "none", "lora_alpha": 6, "lora_dropout": 0.0, "r": 6, "target_modules": targets,
            "use_rslora": False}  # fmt: skip
    spec = {"batch": 2, "dtype": "float64", "feature": "model.embedding.lora", "gpt2": gpt2, "ignored_labels": 0,
            "lora": lora, "objective": "loss", "seed": 320262, "seq_len": 2}  # fmt: skip
    case = build_model_case(spec)
    got = driver.model_forward_backward(case)["logits"]
    merged = rf.merge_and_unload(case.params, case.config, case.lora, case.adapter)
    tied = rf.gpt2_forward(merged, case.config, case.input_ids)[0]
    peft = rf.gpt2_forward(case.params, case.config, case.input_ids, adapter=case.adapter, lora=case.lora)[0]
    assert relative_error(got, tied) < 1e-6  # float32 LoRA kernels (docs/findings.md, keras 1)
    assert relative_error(got, peft) > 1e-2


@pytest.mark.parametrize("driver_name", list(DRIVERS))
def test_merge_qkv_slices_is_opt_in_and_noted(driver_name):
    """merge_qkv_slices (layer.merge_qkv_slices.* / layer.unmerge_qkv_slices.*) is declared only with merge and
    per_slice_qkv, with a note saying how the library merges per slice; loralib, litgpt and adapters declare it."""
    caps = driver_module(driver_name).capabilities
    assert caps.merge_qkv_slices == (driver_name in ("loralib", "litgpt", "adapters_hub"))
    if caps.merge_qkv_slices:
        assert caps.merge and caps.per_slice_qkv and "merge_qkv_slices" in caps.notes
