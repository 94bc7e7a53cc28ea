"""The golden fixtures: the committed corpus verifies, its numbers agree with transformers + PEFT, the format is
what docs/golden-format.md says, and bad input is refused with an error that names the problem.

Reproduce a failing random-spec example with the spec it prints:
``reflora golden generate --spec spec.json --out /tmp/case.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from reflora import golden
from reflora.cli import main as reflora_main
from reflora.config import ConfigError, LoraConfig
from reflora.golden import (
    FORMAT,
    GoldenError,
    corpus_fixtures,
    default_golden_dir,
    draw_case,
    fixture_layout,
    generate_case,
    generate_corpus,
    gradient_floor,
    load_fixture,
    load_spec,
    read_fixture,
    read_manifest,
    relative_error,
    serialize_fixture,
    unpack_fixture,
    verify_corpus,
    verify_fixture,
    write_case,
)
from reflora.init import draw_dropout_masks, init_gpt2_params, init_lora_adapter
from reflora.targets import plan_lora

GOLDEN = default_golden_dir()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "golden-format.md"
# The minimum-case-count tripwire: a corpus that loads fewer cases (0 above all) can never pass.
MIN_CASES = 39
PEFT_RTOL = {"float64": 1e-10, "float32": 1e-4}  # replay through transformers + PEFT, relative to max|stored|
SMALL_GPT2 = {"vocab_size": 11, "n_positions": 8, "n_embd": 6, "n_layer": 2, "n_head": 2}


def cli_main(argv: list[str]) -> int:
    """``reflora golden ...`` through its own ``register`` only, so that another subcommand's import problem
    cannot fail these tests (``test_cli_verify_is_green`` goes through the real ``reflora`` entry point)."""
    import argparse

    parser = argparse.ArgumentParser(prog="reflora")
    golden.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def committed_case_names() -> list[str]:
    return sorted(read_manifest(GOLDEN)["cases"])


def small_spec(**overrides) -> dict:
    spec = {"gpt2": SMALL_GPT2, "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]}, "seed": 3}
    return {**spec, **overrides}


def copy_corpus(tmp_path: Path) -> Path:
    target = tmp_path / "golden"
    shutil.copytree(GOLDEN, target)
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# the committed corpus
# ----------------------------------------------------------------------------------------------


def test_verify_committed_corpus():
    report = verify_corpus(GOLDEN)
    problems = report.problems + [f"{c.name}: {p}" for c in report.cases for p in c.problems]
    assert not problems, "\n".join(problems)
    assert report.ok
    assert len(report.cases) == report.expected_cases >= MIN_CASES
    assert 0 < report.total_bytes < 20 * 1024 * 1024
    assert all(c.n_tensors > 0 for c in report.cases)


def test_cli_verify_is_green(capsys):
    assert reflora_main(["golden", "verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: ok" in out and "rtol 1e-12" in out


def test_corpus_covers_every_feature():
    """Deleting a case that is the only one with a feature fails here, not silently."""
    specs = [load_spec(e["spec"]) for e in read_manifest(GOLDEN)["cases"].values()]
    seen: set[str] = set()
    for spec in specs:
        lora = spec["lora"]
        if lora is None:
            seen.add("no lora (full fine-tuning)")
        else:
            from reflora.golden import spec_configs

            config, parsed = spec_configs(spec)
            plan = plan_lora(config, parsed)
            seen.update(f"module {m.kind}" for m in plan.values())
            seen.add(f"module set {sorted({m.kind for m in plan.values()})}")
            seen.add("regex targets" if isinstance(lora["target_modules"], str) else "list targets")
            if lora["target_modules"] is None:
                seen.add("default targets")
            if isinstance(lora["layers_to_transform"], list):
                seen.add("layers_to_transform list")
            if isinstance(lora["layers_to_transform"], int):
                seen.add("layers_to_transform int")
            seen.update(k for k in ("rank_pattern", "alpha_pattern") if lora[k])
            seen.add(f"bias {lora['bias']}")
            if lora["use_rslora"]:
                seen.add("rslora")
            if lora["lora_dropout"] > 0 and spec["dropout"] == "train":
                seen.add("dropout masks")
            if lora["lora_dropout"] > 0 and spec["dropout"] == "eval":
                seen.add("dropout eval")
            if any(m.r == min(m.in_features, m.out_features) for m in plan.values()):
                seen.add("full rank")
            if spec["reflora_lora"]["qkv_slices"] is not None:
                seen.add(f"qkv {spec['reflora_lora']['qkv_slices']}")
        seen.add(f"padding {spec['padding']}")
        seen.add(f"position_ids {spec['position_ids']}")
        seen.add(f"objective {spec['objective']}")
        seen.add(f"dtype {spec['dtype']}")
        if spec["ignore_label_fraction"] > 0:
            seen.add("ignored labels")
        if spec["padding"] != "none" and not spec["ignore_padding_labels"]:
            seen.add("padding labels counted")
        if spec["seq_len"] == 1:
            seen.add("T=1")
        if spec["batch_size"] == 1:
            seen.add("B=1")
        if spec["train_base"] and lora is not None:
            seen.add("lora + train_base")
    required = {f"module {k}" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {
        "module set ['attn.c_proj', 'mlp.c_proj']", "module set ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']",
        "no lora (full fine-tuning)", "regex targets", "list targets", "default targets", "layers_to_transform list",
        "layers_to_transform int", "rank_pattern", "alpha_pattern", "bias none", "bias all", "bias lora_only", "rslora",
        "dropout masks", "dropout eval", "full rank", "qkv ['q', 'v']", "qkv ['q', 'k', 'v']", "qkv ['k']",
        "padding none", "padding left", "padding right", "padding random", "position_ids default",
        "position_ids from_mask", "position_ids random", "objective loss", "objective dlogits", "dtype float64",
        "dtype float32", "ignored labels", "padding labels counted", "T=1", "B=1", "lora + train_base",
    }  # fmt: skip
    assert not required - seen, f"features no committed case covers: {sorted(required - seen)}"


def test_every_lora_B_is_nonzero():
    for name, path in corpus_fixtures(GOLDEN).items():
        case = load_fixture(path)
        for key, value in (case.adapter or {}).items():
            if ".lora_B." in key:
                assert np.all(value != 0), f"{name}: {key} has zeros (B must never be zero in a fixture)"


@pytest.mark.torch
def test_specs_are_accepted_by_transformers_and_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    for entry in read_manifest(GOLDEN)["cases"].values():
        transformers.GPT2Config(**entry["spec"]["gpt2"])
        if entry["spec"]["lora"] is not None:
            peft.LoraConfig(**entry["spec"]["lora"])  # raises on a field PEFT does not know


def test_inputs_follow_the_documented_derivation():
    """Re-derive every input of a rich case from the seed exactly as docs/golden-format.md lists the draws."""
    spec, stored = read_fixture(GOLDEN / "fixtures" / "kitchen_sink.safetensors")
    from reflora.golden import spec_configs

    config, lora = spec_configs(spec)
    b, t = spec["batch_size"], spec["seq_len"]
    rng = np.random.Generator(np.random.PCG64(spec["seed"]))
    params = init_gpt2_params(config, rng)
    plan = plan_lora(config, lora)
    adapter = init_lora_adapter(plan, rng, init="test")
    ids = rng.integers(0, config.vocab_size, size=(b, t))
    n_pad = rng.integers(1, t, size=b)
    mask = (np.arange(t)[None, :] >= n_pad[:, None]).astype(np.int64)  # left padding
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    labels = np.where(mask == 1, ids, -100)
    labels[rng.random((b, t)) < spec["ignore_label_fraction"]] = -100
    masks = draw_dropout_masks(plan, lora.lora_dropout, b, t, rng)
    expected = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
    expected.update({f"base/{k}": v for k, v in params.items()})
    expected.update({f"adapter/{k}": v for k, v in adapter.items()})
    expected.update({f"dropout/{k}": v for k, v in masks.items()})
    inputs = {k: v for k, v in stored.items() if not (k in ("logits", "loss") or k.startswith("grad/"))}
    assert sorted(inputs) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(inputs[key], value, err_msg=key)


# ----------------------------------------------------------------------------------------------
# independent check: replay through transformers + PEFT (torch autograd, float64)
# ----------------------------------------------------------------------------------------------


def block_equivalent(case):
    """Per-slice q/k/v LoRA written as PEFT's full-matrix LoRA: on a module with k slices of rank r,
    A = [A_q; A_k; ...] (k·r, in) and B (3C, k·r) block-structured (B_s in its slice's rows and its own r
    columns, zero elsewhere), rank k·r and alpha chosen so the scaling is the same. Returns the PEFT-side
    config and adapter and, per per-slice key, (full key, row slice, column slice) of its gradient block."""
    plan = plan_lora(case.config, case.lora)
    adapter, blocks = dict(case.adapter), {}
    rank_pattern, alpha_pattern = {}, {}
    for name, module in plan.items():
        if case.lora.qkv_slices is None or module.kind != "attn.c_attn":
            continue
        r, k = module.r, len(module.branches)
        rank = k * r
        rank_pattern[re.escape(name)] = rank  # listed first: PEFT takes the first matching key
        alpha_pattern[re.escape(name)] = module.scaling * (math.sqrt(rank) if case.lora.use_rslora else rank)
        a_full, b_full = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
        A = np.zeros((rank, module.in_features))  # (k·r, in)
        B = np.zeros((module.out_features, rank))  # (3C, k·r)
        for j, branch in enumerate(module.branches):
            cols = slice(j * r, (j + 1) * r)
            rows = slice(branch.out_start, branch.out_stop)
            A[cols] = adapter.pop(branch.a_key)
            B[rows, cols] = adapter.pop(branch.b_key)
            blocks[branch.a_key] = (a_full, cols, slice(None))
            blocks[branch.b_key] = (b_full, rows, cols)
        adapter[a_full], adapter[b_full] = A, B
    peft_dict = case.lora.to_peft_dict()
    peft_dict["rank_pattern"] = {**rank_pattern, **peft_dict["rank_pattern"]}
    peft_dict["alpha_pattern"] = {**alpha_pattern, **peft_dict["alpha_pattern"]}
    return LoraConfig.from_dict(peft_dict), adapter, blocks


def replay_with_peft(case) -> dict[str, float]:
    """relative_error(PEFT, stored) for logits, loss and every stored gradient of a ``GoldenCase``."""
    from conformance.drivers.peft_bridge import run_peft

    lora, adapter, blocks = case.lora, case.adapter, {}
    if lora is not None and lora.qkv_slices is not None:
        lora, adapter, blocks = block_equivalent(case)
    if lora is not None and case.dropout_masks is None and lora.lora_dropout > 0:
        # eval mode: run_peft puts the model in train mode, where PEFT would draw its own dropout
        lora = dataclasses.replace(lora, lora_dropout=0.0)
    wrt = list(dict.fromkeys(blocks.get(k, (k,))[0] for k in case.wrt))
    ref = run_peft(
        case.config, case.params, lora, adapter, case.input_ids, labels=case.labels, dlogits=case.dlogits,
        attention_mask=case.attention_mask, position_ids=case.position_ids, dropout_masks=case.dropout_masks,
        wrt=wrt, dtype=case.spec["dtype"],
    )  # fmt: skip
    floor = gradient_floor(g.astype(np.float64) for g in case.grads.values())
    errors = {"logits": relative_error(ref["logits"], case.logits.astype(np.float64))}
    if case.loss is not None:
        errors["loss"] = relative_error(ref["loss"], case.loss.astype(np.float64))
    for key, stored in case.grads.items():
        if key in blocks:
            full, rows, cols = blocks[key]
            computed = ref[f"grad/{full}"][rows, cols]
        else:
            computed = ref[f"grad/{key}"]
        errors[key] = relative_error(computed, stored.astype(np.float64), floor)
    return errors


@pytest.mark.torch
@pytest.mark.parametrize("name", committed_case_names())
def test_committed_fixture_agrees_with_peft(name):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    case = load_fixture(GOLDEN / "fixtures" / f"{name}.safetensors")
    errors = replay_with_peft(case)
    assert len(errors) == 1 + (case.loss is not None) + len(case.wrt)
    rtol = PEFT_RTOL[case.spec["dtype"]]
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= rtol}
    assert not bad, f"{name}: transformers + PEFT disagree with the stored fixture (rtol {rtol:.0e}): {bad}"


@st.composite
def random_specs(draw) -> dict:
    """A small spec over every spec key; every draw is labelled."""
    n_head = draw(st.integers(1, 3), label="n_head")
    # n_embd >= 4: LayerNorm over 1 or 2 channels maps every input to its bias or to ±1, so the gradients below
    # it are 0 or pure cancellation and two correct implementations agree only to their conditioning
    n_embd = n_head * draw(st.integers(max(2, -(-4 // n_head)), 4), label="head_dim")
    seq_len = draw(st.integers(1, 6), label="seq_len")
    gpt2 = {"vocab_size": draw(st.integers(2, 17), label="vocab_size"), "n_embd": n_embd, "n_head": n_head,
            "n_positions": draw(st.integers(seq_len, 9), label="n_positions"),
            "n_layer": draw(st.integers(1, 2), label="n_layer"),
            "n_inner": draw(st.none() | st.integers(1, 9), label="n_inner")}  # fmt: skip
    spec = {"gpt2": gpt2, "seed": draw(st.integers(0, 2**32), label="seed"), "seq_len": seq_len,
            "batch_size": draw(st.integers(1, 3), label="batch_size"),
            "padding": draw(st.sampled_from(["none", "left", "right", "random"] if seq_len > 1 else ["none", "random"]),
                            label="padding"),
            "position_ids": draw(st.sampled_from(["default", "from_mask", "random"]), label="position_ids"),
            "ignore_padding_labels": draw(st.booleans(), label="ignore_padding_labels"),
            "ignore_label_fraction": draw(st.sampled_from([0.0, 0.3]), label="ignore_label_fraction"),
            "dropout": draw(st.sampled_from(["train", "eval"]), label="dropout"),
            "objective": "dlogits" if seq_len == 1 else draw(st.sampled_from(["loss", "dlogits"]), label="objective")}  # fmt: skip
    if draw(st.booleans(), label="no lora"):
        return {**spec, "lora": None}
    kinds = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    if draw(st.booleans(), label="regex targets"):
        chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4, unique=True), label="regex kinds")
        targets = r"transformer\.h\.\d+\.(" + "|".join(re.escape(k) for k in chosen) + ")"
        layers = None
    else:
        targets = draw(st.lists(st.sampled_from(["c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj"]),
                                min_size=1, max_size=3, unique=True), label="target_modules")  # fmt: skip
        layers = draw(st.none() | st.lists(st.integers(0, gpt2["n_layer"] - 1), min_size=1, unique=True),
                      label="layers_to_transform")  # fmt: skip
    lora = {"r": draw(st.integers(1, 4), label="r"), "lora_alpha": draw(st.sampled_from([1, 3, 7.5, 16]), label="lora_alpha"),
            "target_modules": targets, "layers_to_transform": layers,
            "use_rslora": draw(st.booleans(), label="use_rslora"),
            "bias": draw(st.sampled_from(["none", "all", "lora_only"]), label="bias"),
            "lora_dropout": draw(st.sampled_from([0.0, 0.0, 0.25]), label="lora_dropout"),
            "rank_pattern": draw(st.sampled_from([{}, {"c_fc": 3}, {"h.0.attn.c_attn": 2}]), label="rank_pattern"),
            "alpha_pattern": draw(st.sampled_from([{}, {"c_proj": 5}]), label="alpha_pattern")}  # fmt: skip
    slices = draw(st.none() | st.lists(st.sampled_from("qkv"), min_size=1, max_size=3, unique=True), label="qkv_slices")
    return {**spec, "lora": lora, "reflora_lora": {"qkv_slices": slices},
            "train_base": draw(st.booleans(), label="train_base")}  # fmt: skip


@pytest.mark.torch
@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=random_specs())
def test_random_spec_agrees_with_peft(spec):
    pytest.importorskip("peft")
    note(
        f"reproduce: echo '{json.dumps(spec)}' > spec.json && reflora golden generate --spec spec.json --out case.safetensors"
    )
    try:
        tensors, _ = generate_case(spec)
    except ConfigError as exc:
        assume("matches no module" not in str(exc) and "every label" not in str(exc))
        raise
    case = unpack_fixture(load_spec(spec), tensors)
    errors = replay_with_peft(case)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= PEFT_RTOL["float64"]}
    assert not bad, f"transformers + PEFT disagree with the regenerated case: {bad}"


# ----------------------------------------------------------------------------------------------
# the format
# ----------------------------------------------------------------------------------------------


def test_fixture_round_trip_and_metadata(tmp_path):
    spec = small_spec(padding="left", position_ids="from_mask", lora={**small_spec()["lora"], "lora_dropout": 0.2})
    tensors, metadata = generate_case(spec)
    path = tmp_path / "case.safetensors"
    digest = write_case(path, tensors, metadata)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        stored_metadata = handle.metadata()
    assert stored_metadata["format"] == FORMAT
    assert set(stored_metadata) == {"format", "spec", "reflora_version", "numpy_version"}
    assert json.loads(stored_metadata["spec"]) == load_spec(spec)  # every default filled in
    read_spec, read_tensors = read_fixture(path)
    assert read_spec == load_spec(spec) == load_spec(read_spec)
    assert list(read_tensors) == list(fixture_layout(read_spec))
    for name, value in tensors.items():
        np.testing.assert_array_equal(read_tensors[name], value, err_msg=name)
    assert read_tensors["loss"].shape == () and read_tensors["input_ids"].dtype == np.int64
    assert any(k.startswith("dropout/transformer.h.0.") for k in read_tensors)
    assert write_case(tmp_path / "again.safetensors", tensors, metadata) == digest  # canonical bytes
    report = verify_fixture(path)
    assert report.ok, report.problems


def test_serialization_is_standard_safetensors():
    from safetensors.numpy import load

    tensors = {"b": np.arange(6.0).reshape(2, 3), "a": np.asarray(2.5), "i": np.arange(3, dtype=np.int64),
               "f": np.ones((1, 2), dtype=np.float32)}  # fmt: skip
    loaded = load(serialize_fixture(tensors, {"format": FORMAT}))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)


def test_seq_len_1_is_a_dlogits_case():
    spec = load_spec(small_spec(seq_len=1, objective="dlogits"))
    layout = fixture_layout(spec)
    assert "dlogits" in layout and "loss" not in layout and "labels" not in layout
    with pytest.raises(ConfigError, match=r"spec\.seq_len=1.*objective"):
        load_spec(small_spec(seq_len=1))


def test_float32_variant(tmp_path):
    tensors, metadata = generate_case(small_spec(dtype="float32"))
    assert all(v.dtype in (np.float32, np.int64) for v in tensors.values())
    f64, _ = generate_case(small_spec())
    assert np.array_equal(tensors["base/transformer.wte.weight"], f64["base/transformer.wte.weight"].astype(np.float32))
    assert relative_error(tensors["logits"].astype(np.float64), f64["logits"]) < 1e-5
    path = tmp_path / "c_float32.safetensors"
    write_case(path, tensors, metadata)
    assert verify_fixture(path).ok


def test_docs_example_runs(monkeypatch):
    """Every python block of docs/golden-format.md runs as written, from the repository root."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert blocks, "docs/golden-format.md has no python example"
    monkeypatch.chdir(DOCS.parent.parent)
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {"__name__": "__docs__"})


def test_docs_name_every_spec_key():
    from reflora.golden import SPEC_DEFAULTS

    text = DOCS.read_text()
    for key in SPEC_DEFAULTS:
        assert f"`{key}`" in text, f"docs/golden-format.md does not document spec key {key!r}"
    assert "1e-12" in text and FORMAT in text


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the field, and nothing written
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (small_spec(bogus=1), "spec.bogus"),
        (small_spec(gpt2={**SMALL_GPT2, "n_embdd": 4}), "gpt2.n_embdd"),
        (small_spec(lora={"r": 2, "lora_alpah": 4}), "lora.lora_alpah"),
        (small_spec(padding="middle"), "spec.padding"),
        (small_spec(seq_len=99), "spec.seq_len"),
        (small_spec(batch_size=0), "spec.batch_size"),
        (small_spec(ignore_label_fraction=1.0), "spec.ignore_label_fraction"),
        (small_spec(reflora_lora={"r": 3}), "spec.reflora_lora.r"),
        (small_spec(lora=None, train_base=False), "spec.train_base"),
        (small_spec(lora=None, reflora_lora={"qkv_slices": ["q"]}), "spec.reflora_lora.qkv_slices"),
        ({"lora": None}, "spec.gpt2"),
        (small_spec(lora={"r": 2, "init_lora_weights": "gaussian"}), "spec.lora.init_lora_weights"),
        (small_spec(lora={"r": 2, "use_dora": True}), "use_dora"),
    ],
)
def test_bad_spec_names_the_field(spec, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_spec(spec)


# lora dicts that PEFT's LoraConfig rejects; reflora must reject them too, naming the field
PEFT_REJECTS = [
    ({"r": 2, "target_modules": "c_attn", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"r": 2, "target_modules": "c_attn", "layers_pattern": "h"}, "layers_pattern"),
    ({"r": 2, "target_modules": ["c_attn"], "layers_pattern": "h"}, "layers_pattern"),
    ({"r": 2, "lora_alpah": 4}, "lora_alpah"),
    ({"r": 2, "qkv_slices": ["q"]}, "qkv_slices"),
    ({"r": 2, "use_dora": True, "lora_bias": True}, "use_dora"),
]


@pytest.mark.parametrize(("lora", "field"), PEFT_REJECTS)
def test_spec_that_peft_rejects_is_rejected(lora, field, tmp_path, capsys):
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        with pytest.raises((ValueError, TypeError)):
            peft.LoraConfig(**lora)
    with pytest.raises(ConfigError, match=field):
        load_spec(small_spec(lora=lora))
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.safetensors"
    spec_path.write_text(json.dumps(small_spec(lora=lora)))
    with pytest.raises(SystemExit, match=field):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    assert list(tmp_path.iterdir()) == [spec_path]  # nothing written, no temporary file left


def test_unknown_spec_field_via_cli_writes_nothing(tmp_path):
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.safetensors"
    spec_path.write_text(json.dumps(small_spec(paddding="left")))
    with pytest.raises(SystemExit, match=r"spec\.paddding is not a golden spec field"):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    spec_path.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    assert not out.exists() and sorted(tmp_path.iterdir()) == [spec_path]


def test_undefined_loss_is_refused_before_writing(tmp_path):
    # one row of 2 tokens, right padding (always 1 pad here) and ignored padding labels: the only label the
    # causal shift keeps (position 1) is padding, so every label is ignored
    spec = small_spec(batch_size=1, seq_len=2, padding="right")
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.safetensors"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match="every label after the causal shift is ignored"):
        cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)])
    assert not out.exists()


def test_malformed_fixture_is_named(tmp_path):
    source = GOLDEN / "fixtures" / "target_c_attn.safetensors"
    data = source.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GoldenError, match=r"truncated\.safetensors: not a readable safetensors file"):
        read_fixture(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(GoldenError, match=r"garbage\.safetensors"):
        read_fixture(garbage)
    with pytest.raises(GoldenError, match="no such fixture file"):
        read_fixture(tmp_path / "absent.safetensors")
    spec, tensors = read_fixture(source)
    metadata = {"format": FORMAT, "spec": json.dumps(spec)}
    cases = {
        "__metadata__.format": ({**tensors}, {**metadata, "format": "reflora-golden/0"}),
        "missing": ({k: v for k, v in tensors.items() if k != "logits"}, metadata),
        "unexpected": ({**tensors, "extra": np.zeros(2)}, metadata),
        "tensor logits is float32": ({**tensors, "logits": tensors["logits"].astype(np.float32)}, metadata),
        "tensor input_ids has values outside": ({**tensors, "input_ids": tensors["input_ids"] + 1000}, metadata),
        "tensor grad/adapter/.* has non-finite": (
            {k: (v * np.nan if k.startswith("grad/adapter/") else v) for k, v in tensors.items()}, metadata),
        "__metadata__.spec is not a valid spec": (tensors, {**metadata, "spec": json.dumps({**spec, "seed": -1})}),
    }  # fmt: skip
    for message, (bad_tensors, bad_metadata) in cases.items():
        path = tmp_path / "bad.safetensors"
        path.write_bytes(serialize_fixture(bad_tensors, bad_metadata))
        with pytest.raises(GoldenError, match=message):
            read_fixture(path)
        report = verify_fixture(path)
        assert not report.ok and re.search(message, report.problems[0])
    assert cli_main(["golden", "verify", str(truncated)]) == 1


def test_drift_is_named_by_case_and_tensor(tmp_path, capsys):
    golden = copy_corpus(tmp_path)
    path = golden / "fixtures" / "rslora.safetensors"
    _, tensors = read_fixture(path)
    key = "grad/adapter/base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    tensors[key] = tensors[key] * (1 + 1e-9)  # a drift far above rtol 1e-12
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    path.write_bytes(serialize_fixture(tensors, metadata))
    before = snapshot(golden)
    report = verify_corpus(golden)
    assert not report.ok
    problems = {c.name: c.problems for c in report.cases if c.problems}
    assert list(problems) == ["rslora"]
    assert any("sha256" in p for p in problems["rslora"])
    assert any(key in p and "> rtol 1e-12" in p for p in problems["rslora"])
    assert cli_main(["golden", "verify", "--dir", str(golden)]) == 1
    out = capsys.readouterr().out
    assert "case rslora" in out and "sha256" in out and "verify: FAILED" in out
    assert snapshot(golden) == before  # verify writes nothing


def test_hash_mismatch_alone_fails(tmp_path):
    golden = copy_corpus(tmp_path)
    manifest = json.loads((golden / "manifest.json").read_text())
    manifest["cases"]["bias_all"]["sha256"] = "0" * 64
    (golden / "manifest.json").write_text(json.dumps(manifest))
    report = verify_corpus(golden)
    assert not report.ok
    failing = {c.name: c.problems for c in report.cases if not c.ok}
    assert list(failing) == ["bias_all"]
    assert "sha256 differs from the manifest" in failing["bias_all"][0]
    with pytest.raises(GoldenError, match=r"bias_all.*sha256"):
        corpus_fixtures(golden)


def test_missing_case_and_count_tripwire(tmp_path):
    golden = copy_corpus(tmp_path)
    (golden / "fixtures" / "padding_left.safetensors").unlink()
    report = verify_corpus(golden)
    assert not report.ok
    assert any("padding_left" in p and "missing" in p for c in report.cases for p in c.problems)
    assert any("bytes, the manifest says" in p for p in report.problems)  # the corpus is smaller than it says
    manifest = json.loads((golden / "manifest.json").read_text())
    for bad in ({**manifest, "case_count": manifest["case_count"] + 1}, {**manifest, "cases": {}, "case_count": 0}):
        (golden / "manifest.json").write_text(json.dumps(bad))
        report = verify_corpus(golden)
        assert not report.ok and report.problems and not report.cases


def test_corpus_out_of_date_with_cases_is_reported(tmp_path):
    golden = copy_corpus(tmp_path)
    spec = json.loads((golden / "cases" / "rslora.json").read_text())
    (golden / "cases" / "rslora.json").write_text(json.dumps({**spec, "seed": spec["seed"] + 1}))
    (golden / "cases" / "brand_new.json").write_text(json.dumps(small_spec()))
    problems = verify_corpus(golden).problems
    assert any("rslora" in p and "differs from the manifest" in p for p in problems)
    assert any("brand_new" in p and "not the manifest" in p for p in problems)


def test_generate_corpus_with_a_bad_case_writes_nothing(tmp_path):
    golden = copy_corpus(tmp_path)
    (golden / "cases" / "zz_bad.json").write_text(json.dumps(small_spec(lora={"r": 0})))
    before = snapshot(golden)
    with pytest.raises(ConfigError, match=r"zz_bad\.json.*lora\.r"):
        generate_corpus(golden)
    with pytest.raises(SystemExit, match=r"zz_bad\.json"):
        cli_main(["golden", "generate", "--dir", str(golden)])
    assert snapshot(golden) == before


def test_generate_corpus_round_trip(tmp_path):
    """generate into a fresh folder: the manifest lists the cases, stale fixtures are removed, and a float32
    case must be named *_float32."""
    golden = tmp_path / "golden"
    (golden / "cases").mkdir(parents=True)
    for name in ("target_c_attn", "kitchen_sink_float32"):
        shutil.copy(GOLDEN / "cases" / f"{name}.json", golden / "cases")
    (golden / "fixtures").mkdir()
    (golden / "fixtures" / "stale.safetensors").write_bytes(b"old")
    assert cli_main(["golden", "generate", "--dir", str(golden)]) == 0
    assert sorted(p.name for p in (golden / "fixtures").iterdir()) == [
        "kitchen_sink_float32.safetensors",
        "target_c_attn.safetensors",
    ]
    assert verify_corpus(golden).ok
    manifest = read_manifest(golden)
    assert manifest["case_count"] == 2
    assert manifest["cases"]["target_c_attn"]["provenance"]["command"] == "reflora golden generate"
    (golden / "cases" / "kitchen_sink_float32.json").rename(golden / "cases" / "sink.json")
    with pytest.raises(ConfigError, match="_float32"):
        generate_corpus(golden)


def test_custom_case_cli(tmp_path, capsys):
    spec_path, out = tmp_path / "case.json", tmp_path / "case.safetensors"
    spec_path.write_text(json.dumps(small_spec(train_base=True, padding="right")))
    assert cli_main(["golden", "generate", "--spec", str(spec_path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    spec, tensors = read_fixture(out)
    assert spec["train_base"] and "grad/base/transformer.wte.weight" in tensors
    assert cli_main(["golden", "verify", str(out)]) == 0
    with pytest.raises(SystemExit, match="--spec and --out go together"):
        cli_main(["golden", "generate", "--spec", str(spec_path)])


def test_draw_case_is_deterministic():
    spec = load_spec(small_spec(padding="random", ignore_label_fraction=0.3))
    first, second = draw_case(spec), draw_case(spec)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert np.all(first["attention_mask"][:, -1] == 1)
