"""Every hypothesis strategy of the suite, in one module. Every draw is labelled.

A test draws a *spec*: a small JSON object (sizes, LoRA settings, dtype and a ``seed``) from which
``conformance.cases`` builds every array deterministically. The spec is what a failure prints and what
``--replay`` takes back, so a case is reproduced from its spec alone.

Rules that make a wrong candidate show (see docs/conformance.md):

* shapes are never square: in ≠ out, r ∉ {in, out}, vocab ≠ n_embd... so a transposed tensor cannot pass
  unnoticed. (GPT-2's own ``attn.c_proj`` is (C, C): there, and in every layer, the random, asymmetric values
  catch a transposed delta.)
* B is never zero (``init="test"``), the scaling is never 1 (alpha ≠ r, alpha ≠ √r), rsLoRA draws use r ≥ 2.
  (A candidate without ``Capabilities.lora_alpha`` gets alpha = r: scaling 1, the only one it has.)
* dtypes: float64 first, then float32, then bfloat16, each only where the candidate declares it.
* the simplest example (hypothesis tries it first) targets every GPT-2 module kind.

Levels: ``draw_layer_spec`` (one LoRA layer), ``draw_model_spec`` (GPT-2 + one adapter), ``draw_advanced_spec``
(GPT-2 with named adapters: merge, DoRA, inits, several adapters, weighted combinations; its GPT-2 shapes are
fixed, see there).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

from conformance.features import HALF_VARIANTS, Feature
from conformance.protocol import DTYPES, Capabilities
from reflora.adapters import BASE_ADAPTER
from reflora.weighted import FACTOR_TYPES, PRUNED_TYPES

MAX_SEED = 2**32 - 1
# target_modules spellings (PEFT suffix matching): "c_proj" matches attn.c_proj *and* mlp.c_proj.
TARGET_SPELLINGS = ("c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj", "mlp.c_fc", "attn.c_attn")
ALL_TARGETS = ("c_attn", "c_proj", "c_fc")  # every Conv1D kind of GPT-2
KIND_REGEX = {"attn.c_attn": r"attn\.c_attn", "attn.c_proj": r"attn\.c_proj", "mlp.c_fc": r"mlp\.c_fc",
              "mlp.c_proj": r"mlp\.c_proj"}  # fmt: skip
DROPOUT_PS = (0.1, 0.25, 0.5, 0.75)
MODEL_DTYPES = ("float64", "float32")
MODEL_MAX_ALPHA = 16  # with r = 1 a scaling of 16: larger ones saturate the attention softmaxes (see cases._scaled)
ADAPTER_MODULES = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")  # advanced level: every module kind, by full name


def dtypes_for(caps: Capabilities) -> list[str]:
    return [d for d in DTYPES if d in caps.dtypes]


def _dtype(data, caps: Capabilities, allowed: tuple[str, ...] = DTYPES) -> str:
    return data.draw(st.sampled_from([d for d in dtypes_for(caps) if d in allowed]), label="dtype")


def _alpha(data, r: int, rslora: bool, label: str = "lora_alpha", most: int = 48, scaled: bool = True) -> int:
    """An integer alpha whose scaling is not 1 (a missing scaling must show) for both alpha/r and alpha/√r.

    ``scaled=False`` (a candidate without ``Capabilities.lora_alpha``: its scaling is always 1): alpha == r, so
    that everything else is still checked; the scaling itself is then checked only for candidates that have it."""
    if not scaled:
        return r
    return data.draw(st.integers(1, most).filter(lambda a: a != r and not math.isclose(a, math.sqrt(r))), label=label)


def _rank(data, forbidden: set[int], low: int = 1, label: str = "r") -> int:
    return data.draw(st.integers(low, 6).filter(lambda r: r not in forbidden), label=label)


def _seed(data) -> int:
    return data.draw(st.integers(0, MAX_SEED), label="seed")


# ----------------------------------------------------------------------------------------------
# layer level
# ----------------------------------------------------------------------------------------------


def draw_layer_spec(data, feature: Feature, caps: Capabilities) -> dict[str, Any]:
    """A single LoRA layer for ``feature`` (variant: forward_backward, rslora, dropout, bias, qkv_slices, merge,
    unmerge, merge_square, unmerge_square).

    merge_square / unmerge_square draw in_features == out_features (r still differs from both): the random,
    asymmetric W, A, B values then catch a delta transposed only where the shapes would let it pass.

    Issue 15.1: dora_merge / dora_unmerge draw a merge case with a magnitude; bfloat16 / float16 a
    forward_backward case in that dtype; ``init:<law>`` / ``dora_init`` are ``draw_layer_init_spec``,
    ``adapters_*`` ``draw_layer_adapters_spec``."""
    variant = feature.variant
    if feature.method == "layer_init":
        return draw_layer_init_spec(data, feature, caps)
    if feature.method == "layer_adapters":
        return draw_layer_adapters_spec(data, feature, caps)
    # issue 15.1: float64 / float32 only
    adapted = variant in ("lora_bias", "dora", "dora_full_norm", "dora_merge", "dora_unmerge")
    dtypes = ("float64", "float32") if adapted else DTYPES
    if variant in HALF_VARIANTS:  # the dtype forced (the only draws of float16: protocol.EXTRA_DTYPES)
        spec: dict[str, Any] = {"feature": feature.id, "layout": feature.layout, "dtype": variant}
    else:
        spec = {"feature": feature.id, "layout": feature.layout, "dtype": _dtype(data, caps, dtypes)}
    if variant in ("qkv_slices", "merge_qkv_slices", "unmerge_qkv_slices"):
        width = data.draw(st.integers(2, 6), label="slice_width")  # each of q, k, v is `width` outputs
        out_f = 3 * width
        in_f = data.draw(st.integers(2, 12).filter(lambda n: n not in (width, out_f)), label="in_features")
        spec["qkv_slices"] = data.draw(
            st.lists(st.sampled_from(("q", "k", "v")), min_size=1, max_size=3, unique=True), label="qkv_slices"
        )
        forbidden = {in_f, out_f, width}
    elif variant in ("merge_square", "unmerge_square"):  # the one exception to "never square": in == out
        in_f = out_f = data.draw(st.integers(2, 12), label="in_features")
        spec["qkv_slices"] = None
        forbidden = {in_f}
    else:
        in_f = data.draw(st.integers(2, 12), label="in_features")
        out_f = data.draw(st.integers(2, 12).filter(lambda n: n != in_f), label="out_features")
        spec["qkv_slices"] = None
        forbidden = {in_f, out_f}
    rslora = variant == "rslora"
    r = _rank(data, forbidden, low=2 if rslora else 1)
    spec.update(
        in_features=in_f,
        out_features=out_f,
        r=r,
        lora_alpha=_alpha(data, r, rslora, scaled=caps.lora_alpha),
        use_rslora=rslora,
    )
    if variant == "dropout":
        spec["lora_dropout"] = data.draw(st.sampled_from(DROPOUT_PS), label="lora_dropout")
        # mostly train mode (the mask is injected); eval mode (no dropout at all) a quarter of the time
        spec["train_mode"] = data.draw(st.sampled_from(("train", "train", "train", "eval")), label="mode") == "train"
    else:
        spec["lora_dropout"], spec["train_mode"] = 0.0, False
    if variant == "bias":
        modes = [m for m in ("all", "lora_only") if m in caps.bias_modes]
        spec["bias"] = data.draw(st.sampled_from(modes), label="bias")
        spec["has_bias"] = True
    else:
        spec["bias"] = "none"
        # GPT-2's Conv1D always has a bias; an nn.Linear may not
        spec["has_bias"] = feature.layout == "conv1d" or data.draw(st.booleans().map(lambda b: not b), label="has_bias")
    spec["batch"] = data.draw(st.integers(1, 3), label="batch")
    spec["seq_len"] = data.draw(st.integers(1, 5), label="seq_len")
    spec["seed"] = _seed(data)
    if adapted:  # the keys exist only in these specs: cases.build_layer_case draws b_B or m
        spec["lora_bias" if variant == "lora_bias" else "dora"] = True
        if variant == "dora_full_norm":
            spec["dora_norm"] = "full"
    return spec


# layer.init.*: large enough for KS tests that tell the laws apart: A has r·in ≥ 3·160 = 480 entries, B out·r ≥ 480.
# r ≥ 3: a std of 1/√r where the law says 1/r (ratio √r) is then always caught (measured: 200 of 200 draws at
# r = 3, in = 160; at r = 2 only 23 %, and r = 1 hides it). in and out are at least 2× apart, in either order
# (the smaller in INIT_IN_FEATURES, the larger in [2·smaller, INIT_MAX_FEATURES]): a fan taken on the wrong axis
# (1/√out for 1/√in) is then off by √2 or more in scale, which the KS test catches (tests/test_layer_advanced.py)
INIT_IN_FEATURES = (160, 200)
INIT_MAX_FEATURES = 448
INIT_RANKS = (3, 8)


def draw_layer_init_spec(data, feature: Feature, caps: Capabilities) -> dict[str, Any]:
    """``layer.init.<law>.*`` and ``layer.dora_init.*`` (``cases.build_layer_init_case``): in and out at least 2×
    apart, either order (the smaller in ``INIT_IN_FEATURES``, the larger up to ``INIT_MAX_FEATURES``), r in
    ``INIT_RANKS``, alpha with a scaling ≠ 1, rsLoRA where declared, float64 or float32. ``dora_init`` uses the first declared law in sorted order (``sorted(layer_init_methods)``)."""
    variant = feature.variant
    law = sorted(caps.layer_init_methods)[0] if variant == "dora_init" else variant.partition(":")[2]
    spec: dict[str, Any] = {"feature": feature.id, "layout": feature.layout,
                            "dtype": _dtype(data, caps, ("float64", "float32")), "init": law,
                            "use_dora": variant == "dora_init"}  # fmt: skip
    small = data.draw(st.integers(*INIT_IN_FEATURES), label="smaller_features")
    large = data.draw(st.integers(2 * small, INIT_MAX_FEATURES), label="larger_features")
    in_f, out_f = (small, large) if data.draw(st.booleans(), label="in_is_smaller") else (large, small)
    r = data.draw(st.integers(*INIT_RANKS), label="r")
    rslora = caps.rslora and data.draw(st.booleans(), label="use_rslora")
    spec.update(in_features=in_f, out_features=out_f, r=r, use_rslora=rslora,
                lora_alpha=_alpha(data, r, rslora, scaled=caps.lora_alpha))  # fmt: skip
    spec["has_bias"] = feature.layout == "conv1d" or data.draw(st.booleans().map(lambda b: not b), label="has_bias")
    spec["batch"] = data.draw(st.integers(1, 3), label="batch")
    spec["seq_len"] = data.draw(st.integers(1, 5), label="seq_len")
    spec["seed"] = _seed(data)
    return spec


def draw_layer_adapters_spec(data, feature: Feature, caps: Capabilities) -> dict[str, Any]:
    """``layer.adapters.*`` (``cases.build_layer_adapters_case``): two or three adapters ``a0``, ``a1``, ``a2``
    on one non-square layer, each with its own r (≠ in, out), alpha (scaling ≠ 1) and rsLoRA where declared, the
    scalings all different (so that a candidate that gives one adapter another's scaling, or none, fails).
    ``adapters_active``: a permutation of two or more of them; ``adapters_disabled``: ``active = []``;
    ``adapters_mixed_batch``: batch 3 or 4, one name per row from the adapters and ``"__base__"``, at least one
    adapter named. float64 or float32."""
    from hypothesis import assume

    from reflora.config import LoraConfig

    variant = feature.variant
    spec: dict[str, Any] = {"feature": feature.id, "layout": feature.layout,
                            "dtype": _dtype(data, caps, ("float64", "float32"))}  # fmt: skip
    in_f = data.draw(st.integers(2, 12), label="in_features")
    out_f = data.draw(st.integers(2, 12).filter(lambda n: n != in_f), label="out_features")
    spec.update(in_features=in_f, out_features=out_f)
    spec["has_bias"] = feature.layout == "conv1d" or data.draw(st.booleans().map(lambda b: not b), label="has_bias")
    adapters: dict[str, dict[str, Any]] = {}
    for i in range(data.draw(st.integers(2, 3), label="n_adapters")):
        rslora = caps.rslora and data.draw(st.booleans(), label=f"a{i}.use_rslora")
        r = _rank(data, {in_f, out_f}, low=2 if rslora else 1, label=f"a{i}.r")
        alpha = _alpha(data, r, rslora, label=f"a{i}.lora_alpha", scaled=caps.lora_alpha)
        adapters[f"a{i}"] = {"r": r, "lora_alpha": alpha, "use_rslora": rslora}
    scalings = [LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], use_rslora=a["use_rslora"]).scaling(a["r"], a["lora_alpha"])
                for a in adapters.values()]  # fmt: skip
    if caps.lora_alpha:
        assume(len({round(s, 12) for s in scalings}) == len(scalings))
    spec["adapters"] = adapters
    names = list(adapters)
    if variant == "adapters_mixed_batch":
        spec["batch"] = data.draw(st.integers(3, 4), label="batch")
        rows = data.draw(st.lists(st.sampled_from([*names, BASE_ADAPTER]), min_size=spec["batch"],
                                  max_size=spec["batch"]), label="adapter_names")  # fmt: skip
        assume(any(n != BASE_ADAPTER for n in rows))
        spec["active"], spec["adapter_names"] = None, rows
    else:
        spec["batch"] = data.draw(st.integers(1, 3), label="batch")
        if variant == "adapters_disabled":
            spec["active"] = []
        else:
            order = data.draw(st.permutations(names), label="active order")
            spec["active"] = order[: data.draw(st.integers(2, len(order)), label="n_active")]
        spec["adapter_names"] = None
    spec["seq_len"] = data.draw(st.integers(1, 5), label="seq_len")
    spec["seed"] = _seed(data)
    return spec


# ----------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------


def _gpt2(data, n_layer_min: int = 1) -> dict[str, Any]:
    n_head = data.draw(st.integers(1, 3), label="n_head")
    # n_embd >= 6: a LayerNorm over very few channels is ill-conditioned (over 2 it outputs ±1 whatever its
    # input: its gradient is 0 + rounding noise), and its gradients then measure rounding, not LoRA (measured)
    low = math.ceil(6 / n_head)
    head_dim = data.draw(st.integers(low, max(4, low + 2)), label="head_dim")
    c = n_head * head_dim
    n_layer = data.draw(st.integers(n_layer_min, max(2, n_layer_min)), label="n_layer")
    vocab = data.draw(st.integers(11, 40).filter(lambda v: v not in (c, 3 * c, 4 * c)), label="vocab_size")
    n_inner = data.draw(st.one_of(st.none(), st.integers(2, 20).filter(lambda n: n not in (c, 3 * c, 4 * c))),
                        label="n_inner")  # fmt: skip
    n_positions = data.draw(st.integers(8, 16).filter(lambda p: p not in (c, vocab)), label="n_positions")
    return {"vocab_size": vocab, "n_positions": n_positions, "n_embd": c, "n_layer": n_layer, "n_head": n_head,
            "n_inner": n_inner}  # fmt: skip


def _dims(gpt2: dict[str, Any]) -> set[int]:
    c = gpt2["n_embd"]
    inner = gpt2["n_inner"] if gpt2["n_inner"] is not None else 4 * c
    return {c, 3 * c, inner}


def _targets(data, label: str = "target_modules", must: str | None = None) -> list[str]:
    """A PEFT target list; the simplest draw targets every kind."""
    drawn = data.draw(
        st.one_of(
            st.just(list(ALL_TARGETS)), st.lists(st.sampled_from(TARGET_SPELLINGS), min_size=1, max_size=3, unique=True)
        ),
        label=label,
    )
    if must is not None and not any(t == must or t.endswith("." + must) for t in drawn):
        drawn = [must, *drawn]
    return drawn


def _lora(
    data, gpt2: dict[str, Any], *, rslora: bool = False, label: str = "", must: str | None = None, scaled: bool = True
) -> dict:
    r = _rank(data, _dims(gpt2), low=2 if rslora else 1, label=f"{label}r")
    alpha = _alpha(data, r, rslora, label=f"{label}lora_alpha", most=MODEL_MAX_ALPHA, scaled=scaled)
    return {"r": r, "lora_alpha": alpha,
            "target_modules": _targets(data, f"{label}target_modules", must), "use_rslora": rslora}  # fmt: skip


# model.targets.patterns_overlap: groups of pattern keys that all match one module of layer 0 (regex keys and
# anchors included: PEFT matches re.match(rf"(.*\.)?({key})$", name), so "^transformer..." must match the whole
# name). Two or three keys of one group are drawn in the drawn order, so either one comes first.
OVERLAP_GROUPS = (
    ("c_proj", "mlp.c_proj", "h.0.mlp.c_proj", r"h\.\d+\.mlp\.c_(fc|proj)"),
    ("c_attn", "h.0.attn.c_attn", r"^transformer\.h\.0\..*", r"attn\.c_\w+"),
    ("c_fc", r"mlp\..*", "h.0.mlp.c_fc", r"transformer\.h\.0\.mlp\.c_fc"),
)
# model.targets.exclude: list spellings (equal name or "." + entry suffix) and regexes (fullmatch)
EXCLUDE_SPELLINGS = ("c_proj", "attn.c_proj", "mlp.c_fc", "c_attn", "h.0.mlp.c_proj", "transformer.h.1.attn.c_attn")
EXCLUDE_REGEXES = (r"transformer\.h\.0\..*", r".*\.attn\..*", r".*c_(fc|proj)", r".*\.h\.\d+\.mlp\.c_fc", r"c_attn")


def _draw_targets_advanced(data, variant: str, caps: Capabilities, gpt2: dict[str, Any], lora: dict) -> None:
    """Fill ``lora`` in place for the target features: ``patterns_overlap`` (rank_pattern and alpha_pattern with
    keys that overlap, drawn in either order), ``all_linear`` and ``exclude`` (drawn so that it excludes some but
    not all of the targeted modules)."""
    from hypothesis import assume

    from reflora.config import ConfigError, GPT2Config, LoraConfig
    from reflora.targets import plan_lora

    if variant == "patterns_overlap":
        lora["target_modules"] = list(ALL_TARGETS)
        free_ranks = [r for r in range(1, 7) if r not in _dims(gpt2)]  # at least 4 values
        value_draws = (
            ("rank_pattern", st.sampled_from(free_ranks)),
            ("alpha_pattern", st.integers(7, MODEL_MAX_ALPHA)),
        )
        for name, values in value_draws:  # pattern alphas > 6 ≥ every r ≥ √r: the scaling is never 1
            group = data.draw(st.sampled_from(OVERLAP_GROUPS), label=f"{name}_group")
            keys = data.draw(st.lists(st.sampled_from(group), min_size=2, max_size=3, unique=True),
                             label=f"{name}_keys (in order)")  # fmt: skip
            drawn = data.draw(st.lists(values, min_size=len(keys), max_size=len(keys), unique=True),
                              label=f"{name}_values")  # fmt: skip
            lora[name] = dict(zip(keys, drawn, strict=True))
        return
    if variant == "all_linear":
        lora["target_modules"] = data.draw(st.sampled_from(("all-linear", "ALL-Linear")), label="target_modules")
        return
    if caps.target_modules_all_linear and data.draw(st.booleans(), label="all-linear targets"):
        lora["target_modules"] = "all-linear"
    if data.draw(st.booleans(), label="exclude_modules as a regex"):
        lora["exclude_modules"] = data.draw(st.sampled_from(EXCLUDE_REGEXES), label="exclude_modules (regex)")
    else:
        lora["exclude_modules"] = data.draw(st.lists(st.sampled_from(EXCLUDE_SPELLINGS), min_size=1, max_size=2,
                                                     unique=True), label="exclude_modules")  # fmt: skip
    config = GPT2Config(**gpt2)
    fields = {k: v for k, v in lora.items() if k != "exclude_modules"}
    try:
        kept = len(plan_lora(config, LoraConfig(**fields, exclude_modules=lora["exclude_modules"])))
    except ConfigError:
        kept = 0  # every targeted module excluded (PEFT: "All modules were excluded")
    assume(0 < kept < len(plan_lora(config, LoraConfig(**fields))))


SCALE_FACTORS = (0.5, 2.5, 3.0, -1.5, 0.25)  # runtime scale factors: none is 0 or 1


def _draw_scale_ops(data, variant: str) -> list[list]:
    """Runtime scaling ops (reflora.scaling) whose final multiplier is neither 0 nor 1, so that a candidate
    that ignores them, or forgets one, fails. ``set_scale``: one to three ``set_scale`` calls (the last one wins;
    one may name an adapter the model lacks, which is ignored). ``scale_layer``: a ``set_scale`` or not, then
    ``scale_layer`` / ``unscale_layer(c)`` / ``unscale_layer(None)`` (reset) in any order."""
    from hypothesis import assume

    from reflora.scaling import runtime_multiplier

    factor = st.sampled_from(SCALE_FACTORS)
    if variant == "set_scale":
        op = st.tuples(st.sampled_from(("default", "default", "other")), factor).map(lambda t: ["set_scale", *t])
        ops = data.draw(st.lists(op, min_size=1, max_size=3), label="scale_ops")
    else:
        first = data.draw(
            st.one_of(st.just([]), factor.map(lambda c: [["set_scale", "default", c]])), label="set_scale"
        )
        op = st.one_of(factor.map(lambda c: ["scale_layer", c]), factor.map(lambda c: ["unscale_layer", c]),
                       st.just(["unscale_layer", None]))  # fmt: skip
        ops = first + data.draw(st.lists(op, min_size=1, max_size=3), label="scale_ops")
    m = runtime_multiplier(ops)
    assume(m != 1.0 and 0.1 <= abs(m) <= 8.0)  # |m| ≤ 8: larger scalings saturate the softmaxes (MODEL_MAX_ALPHA)
    return ops


def _draw_embedding_lora(data, caps: Capabilities, gpt2: dict[str, Any], lora: dict, spec: dict) -> None:
    """model.embedding.lora: ``wte`` alone or in front of drawn Conv1D targets; with the capabilities, a
    ``wte`` rank/alpha pattern (its scaling then differs from the Conv1Ds') and dropout in train mode (keep-masks
    for the Conv1Ds only: PEFT's Embedding LoRA has none)."""
    alone = data.draw(st.booleans(), label="wte alone")
    lora["target_modules"] = ["wte"] if alone else ["wte", *lora["target_modules"]]
    if caps.rank_alpha_pattern and data.draw(st.booleans(), label="wte patterns"):
        lora["rank_pattern"] = {"wte": _rank(data, _dims(gpt2) | {lora["r"]}, label="wte rank_pattern")}
        lora["alpha_pattern"] = {"wte": data.draw(st.integers(1, MODEL_MAX_ALPHA), label="wte alpha_pattern")}
    if caps.dropout_mask_injection and not alone and data.draw(st.booleans(), label="dropout (train mode)"):
        lora["lora_dropout"] = data.draw(st.sampled_from(DROPOUT_PS), label="lora_dropout")
        spec["dropout"] = "train"


# model.modules_to_save.*: entries as PEFT matches them (a module is saved when its name ends with an entry)
SAVED_MODULE_SPELLINGS = ("ln_f", "wpe", "ln_1", "h.0.ln_2", "mlp.c_fc", "attn.c_proj", "c_proj", "h.0.attn.c_attn",
                          "mlp.c_proj", "transformer.h.0.mlp.c_proj")  # fmt: skip
SAVED_HEAD_LISTS = (["lm_head"], ["lm_head", "wte"], ["wte", "lm_head"], ["transformer.wte", "lm_head"])


def _draw_modules_to_save(data, variant: str, caps: Capabilities, gpt2: dict[str, Any], lora: dict) -> None:
    """Fill ``lora`` in place for ``model.modules_to_save.*``. ``mts_module``: one or two Conv1D / LayerNorm /
    wpe / ln_f entries (a saved module loses its LoRA; drawn so that some module keeps LoRA). ``mts_wte``:
    ``wte`` (either spelling), perhaps with a module entry; ``ensure_weight_tying`` drawn when declared (PEFT:
    a no-op for ``wte``). ``mts_lm_head``: ``lm_head`` (perhaps with ``wte``, both untied; perhaps LoRA on wte
    with ``embedding_lora``). ``mts_tied``: a list with ``lm_head`` and ``ensure_weight_tying``. ``mts_files``
    draws one of the untied forms, ``mts_files_tied`` a tied one."""
    from hypothesis import assume

    from reflora.config import ConfigError, GPT2Config, LoraConfig
    from reflora.targets import plan_lora

    if variant in ("mts_files", "mts_files_tied"):
        kinds = ("mts_tied",) if variant == "mts_files_tied" else ("mts_module", "mts_wte", "mts_lm_head")
        variant = data.draw(st.sampled_from(kinds), label="modules_to_save form")
    modules = st.lists(st.sampled_from(SAVED_MODULE_SPELLINGS), min_size=1, max_size=2, unique=True)
    tie = False
    if variant == "mts_module":
        entries = data.draw(modules, label="modules_to_save")
    elif variant == "mts_wte":
        entries = [data.draw(st.sampled_from(("wte", "transformer.wte")), label="modules_to_save wte")]
        if data.draw(st.booleans(), label="with a module"):
            entries += data.draw(modules, label="modules_to_save")
        tie = caps.ensure_weight_tying and data.draw(st.booleans(), label="ensure_weight_tying")
    elif variant == "mts_lm_head":
        entries = data.draw(st.sampled_from((["lm_head"], ["lm_head", "wte"], ["wte", "lm_head"])),
                            label="modules_to_save")  # fmt: skip
        if caps.embedding_lora and entries == ["lm_head"] and data.draw(st.booleans(), label="LoRA on wte"):
            lora["target_modules"] = ["wte", *lora["target_modules"]]
    else:  # mts_tied
        entries = list(data.draw(st.sampled_from(SAVED_HEAD_LISTS), label="modules_to_save"))
        if data.draw(st.booleans(), label="with a module"):
            entries += data.draw(modules, label="modules_to_save module")
        tie = True
    lora["modules_to_save"] = list(dict.fromkeys(entries))
    if tie:
        lora["ensure_weight_tying"] = True
    try:
        plan_lora(GPT2Config(**gpt2), LoraConfig(**lora))
    except ConfigError:
        assume(False)  # e.g. every LoRA target saved, or an entry that wraps a LoRA layer


def draw_model_spec(data, feature: Feature, caps: Capabilities) -> dict[str, Any]:
    """GPT-2 + LoRA for ``feature``; see ``conformance.cases.build_model_case`` for how the arrays follow."""
    variant = feature.variant
    # bfloat16 only at layer level: a bfloat16 GPT-2's LoRA gradients are dominated by rounding (measured relative
    # errors up to ~0.7 for a correct candidate), so no bound there could tell a bug from rounding.
    spec: dict[str, Any] = {"feature": feature.id, "dtype": _dtype(data, caps, MODEL_DTYPES)}
    gpt2 = _gpt2(data, n_layer_min=2 if variant == "layers" else 1)
    rslora = variant == "rslora"
    if variant in ("adapter_save", "adapter_load", "set_scale", "scale_layer") and caps.rslora:
        rslora = data.draw(st.booleans(), label="use_rslora")
    scaled = caps.lora_alpha and caps.model_lora_alpha
    lora = _lora(data, gpt2, rslora=rslora, must="c_attn" if variant == "qkv" else None, scaled=scaled)
    lora.update(lora_dropout=0.0, bias="none")
    if variant == "dropout":
        lora["lora_dropout"] = data.draw(st.sampled_from(DROPOUT_PS), label="lora_dropout")
        spec["dropout"] = "train"  # eval mode (dropout off) is drawn at layer level and in the golden fixtures
    if variant.startswith("bias:"):
        lora["bias"] = variant.partition(":")[2]
    if variant == "regex":
        kinds = data.draw(st.lists(st.sampled_from(sorted(KIND_REGEX)), min_size=1, unique=True), label="regex_kinds")
        alternatives = "|".join(KIND_REGEX[k] for k in kinds)
        layers = data.draw(st.one_of(st.none(), st.lists(st.integers(0, gpt2["n_layer"] - 1), min_size=1, unique=True)),
                           label="regex_layers")  # fmt: skip
        layer_part = r".*" if layers is None else r"transformer\.h\.(" + "|".join(map(str, sorted(layers))) + r")"
        lora["target_modules"] = rf"{layer_part}\.({alternatives})"
    if variant == "layers":
        layers = data.draw(st.lists(st.integers(0, gpt2["n_layer"] - 1), min_size=1, max_size=gpt2["n_layer"] - 1,
                                    unique=True), label="layers_to_transform")  # fmt: skip
        as_int = len(layers) == 1 and data.draw(st.booleans(), label="layers_to_transform_as_int")
        lora["layers_to_transform"] = layers[0] if as_int else sorted(layers)
    if variant == "patterns":
        kinds = sorted(KIND_REGEX)
        rank_key = data.draw(st.sampled_from(["c_attn", "c_fc", "mlp.c_proj", "attn.c_proj", "h.0.attn.c_attn"]),
                             label="rank_pattern_key")  # fmt: skip
        alpha_key = data.draw(
            st.sampled_from(["c_proj", "c_attn", "h.0.mlp.c_fc", *kinds[:1]]), label="alpha_pattern_key"
        )
        rank_value = _rank(data, _dims(gpt2) | {lora["r"]}, label="rank_pattern_value")
        lora["rank_pattern"] = {rank_key: rank_value}
        alpha_value = data.draw(st.integers(1, MODEL_MAX_ALPHA).filter(lambda a: a not in (lora["r"], rank_value)),
                                label="alpha_pattern_value")  # fmt: skip
        lora["alpha_pattern"] = {alpha_key: alpha_value}
        lora["target_modules"] = list(ALL_TARGETS)
    if variant in ("patterns_overlap", "all_linear", "exclude"):
        _draw_targets_advanced(data, variant, caps, gpt2, lora)
    if variant in ("set_scale", "scale_layer"):
        spec["scale_ops"] = _draw_scale_ops(data, variant)
    if variant == "embedding_lora":
        _draw_embedding_lora(data, caps, gpt2, lora, spec)
    if variant == "trainable_tokens":
        ids = data.draw(st.lists(st.integers(0, gpt2["vocab_size"] - 1), min_size=1, max_size=4, unique=True),
                        label="trainable_token_indices")  # fmt: skip
        form = data.draw(st.sampled_from(("list", "wte", "transformer.wte")), label="trainable_token_indices form")
        lora["trainable_token_indices"] = ids if form == "list" else {form: ids}
    if variant.startswith("mts_"):
        _draw_modules_to_save(data, variant, caps, gpt2, lora)
    if variant == "qkv":
        lora["qkv_slices"] = data.draw(st.lists(st.sampled_from(("q", "k", "v")), min_size=1, max_size=3, unique=True),
                                       label="qkv_slices")  # fmt: skip
    if variant in ("adapter_save", "adapter_load"):
        modes = [m for m in ("none", "all", "lora_only") if m in caps.bias_modes]
        lora["bias"] = data.draw(st.sampled_from(modes), label="bias")
    if variant == "adapter_switch":
        spec["second_lora"] = {
            **_lora(data, gpt2, label="second_", scaled=scaled),
            "lora_dropout": 0.0,
            "bias": "none",
        }
    spec["gpt2"], spec["lora"] = gpt2, lora
    batch = data.draw(st.integers(1, 3), label="batch")
    seq_len = data.draw(st.integers(2, min(6, gpt2["n_positions"])), label="seq_len")
    spec["batch"], spec["seq_len"] = batch, seq_len
    backward = variant not in ("adapter_save", "adapter_load", "adapter_switch", "mts_files", "mts_files_tied")
    if backward:
        spec["objective"] = data.draw(st.sampled_from(("loss", "dlogits")), label="objective")
    if variant == "padding":
        spec["padding_side"] = data.draw(st.sampled_from(("left", "right")), label="padding_side")
        # with a loss, every row keeps two real tokens, so that a label survives the causal shift
        most = seq_len - 2 if spec["objective"] == "loss" else seq_len - 1
        spec["pad_lengths"] = data.draw(st.lists(st.integers(0, most), min_size=batch, max_size=batch),
                                        label="pad_lengths")  # fmt: skip
    if variant in ("position_ids", "position_ids_no_mask"):
        # "offset": consecutive positions from a per-row start; "random": any positions in [0, n_positions)
        spec["position_ids"] = data.draw(st.sampled_from(("offset", "random")), label="position_ids")
        spec["attention_mask"] = "ones" if variant == "position_ids" else "none"
    if backward and spec["objective"] == "loss":
        spec["ignored_labels"] = data.draw(st.integers(0, batch * (seq_len - 1) - 1), label="ignored_labels")
    spec["seed"] = _seed(data)
    return spec


# ----------------------------------------------------------------------------------------------
# advanced level (docs/advanced-semantics.md): merge, DoRA, inits, several adapters, weighted combinations
# ----------------------------------------------------------------------------------------------


def _adapter_lora(data, label: str, *, r=None, alpha=None, dyadic=False, **fields) -> dict[str, Any]:
    """A LoRA config dict; ``dyadic``: r and lora_alpha powers of two, so that s = α/r is exact in float32.

    A drawn lora_alpha is never r nor √r: neither α/r nor α/√r (rsLoRA) is then 1, so a candidate that drops
    the scaling fails (PEFT #2486 hid behind alpha = r). ``alpha`` given by the caller is used as is."""
    ranks, alphas = ((1, 2, 4), (1.0, 2.0, 4.0, 8.0)) if dyadic else ((1, 2, 3, 4), (1.0, 2.0, 3.0, 8.0))
    r = r if r is not None else data.draw(st.sampled_from(ranks), label=f"{label}.r")
    if alpha is None:
        alphas = tuple(a for a in alphas if a != r and a * a != r)  # scaling ≠ 1 for alpha/r and alpha/√r
        alpha = data.draw(st.sampled_from(alphas), label=f"{label}.lora_alpha")
    targets = fields.pop("target_modules", None) or data.draw(
        st.lists(st.sampled_from(ADAPTER_MODULES), min_size=1, max_size=4, unique=True), label=f"{label}.target_modules"
    )
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets), **fields}


def draw_advanced_spec(data, feature: Feature) -> dict[str, Any]:
    """An advanced feature's spec (GPT-2 with named adapters; ``conformance.cases.build_advanced_case``).

    Tiny GPT-2s of a fixed shape: vocab 23, 16 positions, n_embd 16 (two layers) or 8 (one), 2 heads. One
    exception to the no-square rule: with two layers n_embd = n_positions = 16, so ``wpe`` is square (it is
    never transposed by LoRA; its random values would still catch a transposed copy). Changing it would change
    every advanced case the ci profile draws, so it is kept until the fixtures are regenerated on purpose."""
    v = feature.variant
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    n_layer = 2 if v.startswith(("init", "dora_init")) else data.draw(st.integers(1, 2), label="n_layer")
    spec: dict[str, Any] = {
        "feature": feature.id, "seed": seed, "dtype": "float32" if v in ("init_pissa", "init_olora", "init_orthogonal", "init_pissa_niter") else "float64",
        "gpt2": {"vocab_size": 23, "n_positions": 16, "n_embd": 16 if n_layer == 2 else 8, "n_layer": n_layer,
                 "n_head": 2},
        "batch": data.draw(st.integers(2, 3), label="batch"), "seq_len": data.draw(st.integers(2, 5), label="seq_len"),
        "adapters": {}, "labels": True,
    }  # fmt: skip
    adapters = spec["adapters"]
    if v in ("merge_lora", "active"):
        for i in range(data.draw(st.integers(1, 3) if v == "active" else st.integers(1, 2), label="n_adapters")):
            adapters[f"a{i}"] = _adapter_lora(data, f"a{i}")
        names = list(adapters)
        spec["active"] = data.draw(st.permutations(names), label="active order") if v == "active" else names
    elif v in ("merge_lora_bias", "multi_lora_bias"):
        for i in range(2):
            adapters[f"a{i}"] = _adapter_lora(data, f"a{i}", lora_bias=True)
        spec["active"] = list(adapters)
    elif v in ("merge_dora", "dora", "dora_dropout"):
        extra = {"lora_dropout": 0.25} if v == "dora_dropout" else {}
        adapters["d"] = _adapter_lora(data, "d", use_dora=True, **extra)
        spec["active"] = ["d"]
        spec["dropout"] = v == "dora_dropout"
    elif v in ("merge_safe", "merge_safe_untouched"):  # untouched: the bad value in the last module merged
        adapters["a0"] = _adapter_lora(
            data, "a0", target_modules=list(ADAPTER_MODULES) if v == "merge_safe_untouched" else None
        )
        spec["active"] = ["a0"]
        spec["poison"] = data.draw(st.sampled_from(["nan", "inf", "-inf"]), label="poison")
        spec["labels"] = False
    elif v == "unload":
        for i in range(data.draw(st.integers(1, 2), label="n_adapters")):
            adapters[f"a{i}"] = _adapter_lora(data, f"a{i}")
        spec["active"] = list(adapters)
        spec["labels"] = False
    elif v == "disabled":
        for i in range(2):
            adapters[f"a{i}"] = _adapter_lora(data, f"a{i}")
        spec["active"] = []
    elif v == "mixed_batch":
        for i in range(2):
            adapters[f"a{i}"] = _adapter_lora(data, f"a{i}")
        choices = [*adapters, BASE_ADAPTER]
        spec["batch"] = 4
        spec["adapter_names"] = data.draw(st.lists(st.sampled_from(choices), min_size=4, max_size=4), label="rows")
    elif v == "dora_zero_row":  # a DoRA row of zero norm (PEFT #2049): conformance.cases.zero_norm_row
        adapters["d"] = _adapter_lora(data, "d", use_dora=True)
        spec["active"] = ["d"]
        spec["zero_norm_row"] = {"module": data.draw(st.integers(0, 7), label="zero-norm module"),
                                 "row": data.draw(st.integers(0, 63), label="zero-norm row")}  # fmt: skip
    elif v == "dora_order":  # the order of docs/advanced-semantics.md D5: the plain adapter first
        adapters["plain"] = _adapter_lora(data, "plain", target_modules=["c_attn"])
        adapters["dora"] = _adapter_lora(data, "dora", target_modules=["c_attn"], use_dora=True)
        spec["active"] = ["plain", "dora"]
    elif v in ("merge_trainable_tokens", "merge_trainable_tokens_mixed", "adapters_trainable_tokens"):
        # one adapter with trainable_token_indices (wte rows), plus a plain LoRA adapter (mixed, adapters)
        ids = data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=4, unique=True), label="token indices")
        adapters["t"] = _adapter_lora(data, "t", trainable_token_indices=ids)
        if v != "merge_trainable_tokens":
            adapters["p"] = _adapter_lora(data, "p")
        names = list(adapters)
        spec["active"] = data.draw(st.permutations(names), label="active order") if v.startswith("adapters") else names
    elif v == "adapters_trainable_tokens_mixed":
        # a mixed batch (adapter_names) with a trainable_token_indices adapter t and a plain LoRA adapter p: every
        # batch has a row of each (rows of p keep wte's own rows; PEFT 0.21.2 raises KeyError there, D13)
        ids = data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=4, unique=True), label="token indices")
        adapters["t"] = _adapter_lora(data, "t", trainable_token_indices=ids)
        adapters["p"] = _adapter_lora(data, "p")
        spec["batch"] = 4
        rest = data.draw(st.lists(st.sampled_from(["t", "p", BASE_ADAPTER]), min_size=2, max_size=2), label="rows")
        spec["adapter_names"] = data.draw(st.permutations(["t", "p", *rest]), label="row order")
    elif v == "merge_dora_zero_row":  # merge a DoRA adapter with a zero-norm row (PEFT #2049): cases.zero_norm_row
        adapters["d"] = _adapter_lora(data, "d", use_dora=True)
        spec["active"] = ["d"]
        spec["zero_norm_row"] = {"module": data.draw(st.integers(0, 7), label="zero-norm module"),
                                 "row": data.draw(st.integers(0, 63), label="zero-norm row")}  # fmt: skip
    elif v.startswith("init") or v in ("dora_init", "dora_init_zero_row"):
        init = {"init_true": True, "dora_init": True, "dora_init_zero_row": True, "init_gaussian": "gaussian",
                "init_false": False,
                "init_pissa": "pissa", "init_olora": "olora", "init_orthogonal": "orthogonal",
                "init_pissa_niter": "pissa_niter"}[v]  # fmt: skip
        if init == "pissa_niter":  # randomised PiSSA with K power iterations
            init = f"pissa_niter_{data.draw(st.sampled_from((0, 1, 2, 4)), label='pissa niter')}"
        ranks = (2, 4) if init == "orthogonal" else (2, 3, 4)  # orthogonal: even r (PEFT)
        r = data.draw(st.sampled_from(ranks), label="init.r")  # r = 1 would hide std 1/√r vs 1/r
        spec["init"] = _adapter_lora(data, "init", r=r, target_modules=list(ADAPTER_MODULES), init_lora_weights=init,
                             use_dora=v.startswith("dora_init"))  # fmt: skip
        spec["labels"] = False
        if v == "dora_init_zero_row":  # a zero row of W: DoRA's magnitude there is 0 (cases.zero_weight_row)
            spec["zero_weight_row"] = {"module": data.draw(st.integers(0, 7), label="zero-norm module"),
                                       "row": data.draw(st.integers(0, 63), label="zero-norm row")}  # fmt: skip
    elif v.startswith("weighted"):
        spec["labels"] = False
        kind = {"weighted_linear": "linear", "weighted_svd": "svd", "weighted_coefficients": "linear"}.get(v, "cat")
        kind = v.removeprefix("weighted_") if v.removeprefix("weighted_") in PRUNED_TYPES else kind
        if v == "weighted_patterns":  # sources with rank_pattern / alpha_pattern (PEFT #2512)
            kind = data.draw(st.sampled_from(("cat", "svd")), label="combination_type")
        dyadic = v in ("weighted_linear", "weighted_svd") or kind in PRUNED_TYPES
        extra = {"use_rslora": True} if v == "weighted_rslora" else {}
        extra.update({"lora_bias": True} if v == "weighted_lora_bias" else {})
        n = data.draw(st.integers(2, 3), label="n_sources")  # one source is always combined linearly (PEFT)
        r = data.draw(st.sampled_from((1, 2, 4)), label="shared r") if kind in FACTOR_TYPES else None
        alpha = 3.0 if v == "weighted_coefficients" else None
        for i in range(n):
            adapters[f"s{i}"] = _adapter_lora(data, f"s{i}", r=2 if alpha else r, alpha=alpha, dyadic=dyadic, **extra)
            if v == "weighted_patterns":
                _weighted_source_patterns(data, f"s{i}", adapters[f"s{i}"])
        weights = []
        for i, lora in enumerate(adapters.values()):
            if v == "weighted_patterns":  # float32-exact w: svd's coefficients are w (D6 cannot show)
                weights.append(data.draw(st.sampled_from((0.5, -0.75, 1.25, 2.0)), label=f"w{i}"))
            elif dyadic:  # w·s = ±c², so √|w·s| (linear) and w (svd) are exact in float32: D6 cannot show
                c = data.draw(st.sampled_from((0.5, 1.0, 1.5, 2.0)), label=f"w{i} root")
                sign = data.draw(st.sampled_from((1.0, -1.0)), label=f"w{i} sign")
                weights.append(sign * c * c * lora["r"] / lora["lora_alpha"])
            else:
                weights.append(data.draw(st.sampled_from((0.3, 0.8, -0.7, 1.0, 1.3)), label=f"w{i}"))
        svd_rank = data.draw(st.sampled_from((None, 1, 2)), label="svd_rank") if kind.endswith("svd") else None
        spec["combination"] = {"names": list(adapters), "weights": weights, "combination_type": kind,
                               "svd_rank": svd_rank}  # fmt: skip
        if kind in PRUNED_TYPES:  # density < 1 prunes; ≥ 1 keeps all (PEFT warns)
            spec["combination"]["density"] = data.draw(st.sampled_from((0.2, 0.5, 0.7, 1.0)), label="density")
            spec["combination"]["majority_sign_method"] = data.draw(st.sampled_from(("total", "frequency")),
                                                                    label="majority_sign_method")  # fmt: skip
    else:
        raise ValueError(f"unknown advanced variant {v!r}")
    return spec


# keys of a weighted source's patterns: one module (h.0...), a kind by full name, a bare kind (suffix match)
WEIGHTED_PATTERN_KEYS = ("h.0.attn.c_attn", "h.0.mlp.c_fc", "attn.c_proj", "mlp.c_proj", "c_fc", "c_attn")


def _weighted_source_patterns(data, label: str, lora: dict[str, Any]) -> None:
    """Give a weighted source (``lora``, in place) a one-key ``rank_pattern`` and a one-key ``alpha_pattern``
    whose values differ from ``r`` / ``lora_alpha``: per-module ranks and scalings that the combination must
    use (PEFT #2512 combined such sources with the adapter's global r)."""
    key = data.draw(st.sampled_from(WEIGHTED_PATTERN_KEYS), label=f"{label}.rank_pattern key")
    lora["rank_pattern"] = {key: data.draw(st.sampled_from([k for k in (1, 2, 3, 5) if k != lora["r"]]),
                                           label=f"{label}.rank_pattern value")}  # fmt: skip
    key = data.draw(st.sampled_from(WEIGHTED_PATTERN_KEYS), label=f"{label}.alpha_pattern key")
    lora["alpha_pattern"] = {key: data.draw(st.sampled_from([a for a in (1.0, 3.0, 6.0, 10.0) if a != lora["lora_alpha"]]),
                                            label=f"{label}.alpha_pattern value")}  # fmt: skip
