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
