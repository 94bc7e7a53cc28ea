"""The suite's features: one row of the report each, one pytest test each (golden fixtures: one test per file).

A feature names what it checks, at which level, with which driver method, and which capabilities it needs.
A candidate that lacks one of them gets "not supported" with the reason from its ``Capabilities.notes``.

Feature ids are stable: deviation lists name them (at a dot boundary, conformance.deviations.covers), and
``reflora matrix`` joins reports on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from conformance.init_laws import ANY_LAW, LAW_NAMES
from conformance.protocol import Capabilities


@dataclass(frozen=True)
class Feature:
    id: str  # e.g. "layer.dropout.conv1d"
    level: str  # "layer", "model", "advanced" (model level, with an AdaptersCase) or "golden"
    method: str  # the driver method the check calls
    needs: tuple[str, ...]  # capability requirements, see ``missing_capability``
    variant: str  # what the strategy draws; see conformance.strategies
    layout: str | None = None  # layer level: "linear" or "conv1d"
    title: str = ""


# layer level, method layer_merge
MERGE_VARIANTS = ("merge", "unmerge", "merge_square", "unmerge_square", "dora_merge", "dora_unmerge")
MERGE_VARIANTS += ("merge_qkv_slices", "unmerge_qkv_slices")
UNMERGE_VARIANTS = ("unmerge", "unmerge_square", "dora_unmerge", "unmerge_qkv_slices")  # unmerged_weight only
HALF_VARIANTS = ("bfloat16", "float16")  # layer.forward_backward with the dtype forced
ADAPTERS_VARIANTS = ("adapters_active", "adapters_disabled", "adapters_mixed_batch")  # method layer_adapters


# per-slice merge: merge_qkv_slices is opt-in, so a driver with merge and per_slice_qkv whose layer_merge ignores
# case.qkv_slices is not asked (docs/conformance.md, "What is checked")
_QKV_MERGE = ("per_slice_qkv", "merge_qkv_slices")


def _layer_features() -> list[Feature]:
    out = []
    variants = [
        ("forward_backward", "forward, backward (dx, dA, dB), alpha/r scaling, several r", ()),
        ("rslora", "rsLoRA scaling alpha/sqrt(r)", ("rslora",)),
        ("dropout", "LoRA dropout with the injected keep-mask; eval mode without", ("dropout_mask_injection",)),
        ("bias", "trainable bias ('all' / 'lora_only'): its gradient and the trainable set", ("bias:trainable",)),
        ("qkv_slices", "per-slice LoRA on a fused q/k/v projection", ("per_slice_qkv",)),
        ("merge", "merge W + s·BA, forward after merge", ("merge",)),
        ("unmerge", "unmerge after merge restores W", ("merge", "unmerge")),
        # square weights (in == out): a transposed delta runs without a shape error and must show by value
        ("merge_square", "merge W + s·BA on a square weight (in == out), forward after merge", ("merge",)),
        ("unmerge_square", "unmerge after merge restores a square weight (in == out)", ("merge", "unmerge")),
        ("lora_bias", "lora_bias: branch s·(BAx + b_B); y, dx, dA, dB, d b_B", ("layer_lora_bias",)),
        ("dora", "DoRA, detached norm (PEFT's): y, dx, dA, dB, d magnitude", ("layer_dora",)),
        ("dora_full_norm", "DoRA, full-norm gradient (alternative): y, dx, dA, dB, dm", ("layer_dora_full_norm",)),
        # per-slice q/k/v branches merged into the fused weight: each slice's delta lands in its own output rows
        ("merge_qkv_slices", "merge per-slice q/k/v LoRA into the fused weight", ("merge", *_QKV_MERGE)),
        ("unmerge_qkv_slices", "unmerge restores the fused q/k/v weight", ("merge", "unmerge", *_QKV_MERGE)),
    ]
    for layout in ("linear", "conv1d"):
        for variant, title, variant_needs in variants:
            method = "layer_merge" if variant in MERGE_VARIANTS else "layer_forward_backward"
            needs = (f"layout:{layout}", *variant_needs)
            out.append(
                Feature(f"layer.{variant}.{layout}", "layer", method, needs, variant, layout, f"{layout}: {title}")
            )
    return out


def _layer_features_15() -> list[Feature]:
    """Issue 15.1's layer features (docs/conformance.md, "Layer level"): DoRA merge / unmerge (``layer_merge``
    with a magnitude), the library's own inits (``layer_init``, one feature per law of conformance.init_laws),
    DoRA at init, several adapters on one layer (``layer_adapters``) and the half-precision forward_backward."""
    variants = [
        ("dora_merge", "layer_merge", "DoRA merge: W' = m ⊙ V/‖V‖_row, V = W + s·BA; forward after merge",
         ("merge", "layer_dora", "layer_dora_merge")),
        ("dora_unmerge", "layer_merge", "DoRA unmerge after merge restores W",
         ("merge", "unmerge", "layer_dora", "layer_dora_merge")),
        *[(f"init:{name}", "layer_init", f"the library's init for law {name} (conformance.init_laws): KS tests of "
           "A and B, B = 0 where the law says, y = base where it holds, W unchanged", (f"layer_init:{name}",))
          for name in LAW_NAMES],
        ("dora_init", "layer_init", "DoRA at init: magnitude = row norms of W, y = base (the first declared law)",
         ("layer_dora", f"layer_init:{ANY_LAW}")),
        ("adapters_active", "layer_adapters", "several adapters active together (any order): y, dx, every dA, dB",
         ("layer_multi_adapter",)),
        ("adapters_disabled", "layer_adapters", "every adapter disabled: exactly the base layer",
         ("layer_multi_adapter",)),
        ("adapters_mixed_batch", "layer_adapters", "one adapter per batch row (and base rows): y, dx, dA, dB",
         ("layer_multi_adapter", "layer_mixed_batch")),
        ("bfloat16", "layer_forward_backward", "forward_backward in bfloat16", ("dtype:bfloat16",)),
        ("float16", "layer_forward_backward", "forward_backward in float16", ("dtype:float16",)),
    ]  # fmt: skip
    out = []
    for layout in ("linear", "conv1d"):
        for variant, method, title, variant_needs in variants:
            fid = "layer." + variant.replace(":", ".").replace("adapters_", "adapters.") + f".{layout}"
            needs = (f"layout:{layout}", *variant_needs)
            out.append(Feature(fid, "layer", method, needs, variant, layout, f"{layout}: {title}"))
    return out


_MODEL = ("model_level", "target_modules_list")
MODEL_FEATURES = [
    Feature("model.forward_backward", "model", "model_forward_backward", _MODEL, "plain",
            title="logits, loss or upstream gradient, every LoRA gradient, trainable set and count"),
    Feature("model.rslora", "model", "model_forward_backward", (*_MODEL, "rslora"), "rslora",
            title="rsLoRA scaling in every targeted module"),
    Feature("model.dropout", "model", "model_forward_backward", (*_MODEL, "dropout_mask_injection"), "dropout",
            title="LoRA dropout with injected keep-masks in every targeted module"),
    Feature("model.bias.all", "model", "model_forward_backward", (*_MODEL, "bias:all"), "bias:all",
            title="bias='all': every base bias trains (LayerNorms included)"),
    Feature("model.bias.lora_only", "model", "model_forward_backward", (*_MODEL, "bias:lora_only"), "bias:lora_only",
            title="bias='lora_only': only the targeted modules' biases train"),
    Feature("model.padding", "model", "model_forward_backward", (*_MODEL, "padding"), "padding",
            title="attention mask with left/right padding, padded labels ignored"),
    Feature("model.position_ids.with_mask", "model", "model_forward_backward", (*_MODEL, "position_ids"),
            "position_ids", title="explicit position_ids, with an explicit all-ones attention mask"),
    Feature("model.position_ids.without_mask", "model", "model_forward_backward", (*_MODEL, "position_ids"),
            "position_ids_no_mask", title="explicit position_ids and no attention mask"),
    Feature("model.targets.regex", "model", "model_forward_backward", (*_MODEL, "target_modules_regex"), "regex",
            title="target_modules as a fullmatch regex"),
    Feature("model.targets.layers", "model", "model_forward_backward", (*_MODEL, "layers_to_transform"), "layers",
            title="layers_to_transform"),
    Feature("model.targets.patterns", "model", "model_forward_backward", (*_MODEL, "rank_alpha_pattern"), "patterns",
            title="rank_pattern and alpha_pattern"),
    Feature("model.targets.patterns_overlap", "model", "model_forward_backward", (*_MODEL, "rank_alpha_pattern"),
            "patterns_overlap", title="pattern keys that overlap (first key in dict order wins, both orders), "
            "regex keys with anchors"),
    Feature("model.targets.all_linear", "model", "model_forward_backward", (*_MODEL, "target_modules_all_linear"),
            "all_linear", title="target_modules='all-linear': every Conv1D, lm_head left out"),
    Feature("model.targets.exclude", "model", "model_forward_backward", (*_MODEL, "exclude_modules"), "exclude",
            title="exclude_modules as a list (suffix) or a regex (fullmatch), checked before target_modules"),
    Feature("model.scaling.set_scale", "model", "model_forward_backward", (*_MODEL, "runtime_scaling"), "set_scale",
            title="set_scale(adapter, c) on every LoRA layer: scaling c·alpha/r (c·alpha/√r under rsLoRA)"),
    Feature("model.scaling.scale_layer", "model", "model_forward_backward", (*_MODEL, "runtime_scaling"),
            "scale_layer", title="scale_layer(c) / unscale_layer(c or None) sequences: multiply, divide, reset"),
    Feature("model.embedding.lora", "model", "model_forward_backward", (*_MODEL, "embedding_lora"), "embedding_lora",
            title="LoRA on wte: lora_embedding_A (r, V) / _B (C, r), alpha/r, no dropout; the tied head keeps W"),
    Feature("model.embedding.trainable_tokens", "model", "model_forward_backward", (*_MODEL, "trainable_tokens"),
            "trainable_tokens", title="trainable_token_indices (list or {'wte': [...]}): rows of wte replaced by "
            "trainable_tokens_delta in the lookup and the tied head"),
    Feature("model.modules_to_save.module", "model", "model_forward_backward", (*_MODEL, "modules_to_save"),
            "mts_module", title="modules_to_save of Conv1Ds / LayerNorms / wpe / ln_f: trainable copies replace them "
            "(suffix match), a saved module gets no LoRA"),
    Feature("model.modules_to_save.wte", "model", "model_forward_backward", (*_MODEL, "modules_to_save"), "mts_wte",
            title="modules_to_save=['wte']: the lookup uses the copy, the tied head keeps W (ensure_weight_tying "
            "changes nothing)"),
    Feature("model.modules_to_save.lm_head", "model", "model_forward_backward", (*_MODEL, "modules_to_save"),
            "mts_lm_head", title="modules_to_save=['lm_head'] (and 'wte'): the head uses its own (V, C) copy, the "
            "lookup keeps W"),
    Feature("model.modules_to_save.tied", "model", "model_forward_backward",
            (*_MODEL, "modules_to_save", "ensure_weight_tying"), "mts_tied",
            title="modules_to_save with 'lm_head' + ensure_weight_tying: one wte copy for lookup and head"),
    Feature("model.modules_to_save.files.save", "model", "save_adapter", (*_MODEL, "modules_to_save", "adapter_files"),
            "mts_files", title="modules_to_save adapter files written by the candidate, read by reflora "
            "(base_model.model.<module>.weight keys)"),
    Feature("model.modules_to_save.files.load", "model", "load_adapter_logits",
            (*_MODEL, "modules_to_save", "adapter_files"), "mts_files",
            title="modules_to_save adapter files written by reflora, read by the candidate"),
    Feature("model.modules_to_save.files.tied_save", "model", "save_adapter",
            (*_MODEL, "modules_to_save", "ensure_weight_tying", "adapter_files"), "mts_files_tied",
            title="tied modules_to_save files written by the candidate (the copy saved twice), read by reflora"),
    Feature("model.modules_to_save.files.tied_load", "model", "load_adapter_logits",
            (*_MODEL, "modules_to_save", "ensure_weight_tying", "adapter_files"), "mts_files_tied",
            title="tied modules_to_save files written by reflora, read by the candidate"),
    Feature("model.qkv_slices", "model", "model_forward_backward", (*_MODEL, "per_slice_qkv"), "qkv",
            title="per-slice q/k/v LoRA on c_attn"),
    Feature("model.adapter_save", "model", "save_adapter", (*_MODEL, "adapter_files"), "adapter_save",
            title="adapter files written by the candidate, read by reflora (float64 / float32 files)"),
    Feature("model.adapter_load", "model", "load_adapter_logits", (*_MODEL, "adapter_files"), "adapter_load",
            title="adapter files written by reflora, read by the candidate (float64 / float32 files)"),
    Feature("model.adapter_switch", "model", "model_switch_adapters", (*_MODEL, "adapter_switching"), "adapter_switch",
            title="two adapters: switch the active one and back"),
]  # fmt: skip
LAYER_FEATURES = _layer_features() + _layer_features_15()

# docs/advanced-semantics.md: cases are conformance.protocol.AdaptersCase (drawn by strategies.draw_advanced_spec,
# built by cases.build_advanced_case), checked by checks.check_advanced
_ADV = ("model_level", "target_modules_list")
ADVANCED_FEATURES = [
    Feature("model.merge.lora", "advanced", "model_merge", (*_ADV, "model_merge"), "merge_lora",
            title="merge one or two LoRA adapters into GPT-2: logits before/after, W + ΔW, unmerge restores W"),
    Feature("model.merge.lora_bias", "advanced", "model_merge", (*_ADV, "model_merge", "lora_bias"),
            "merge_lora_bias", title="merge with lora_bias: the base bias gains s·b_B"),
    Feature("model.merge.dora", "advanced", "model_merge", (*_ADV, "model_merge", "dora"), "merge_dora",
            title="merge a DoRA adapter: W' = m ⊙ V/‖V‖, unmerge restores W"),
    Feature("model.merge.safe", "advanced", "model_merge", (*_ADV, "model_merge"), "merge_safe",
            title="safe merge refuses an adapter holding a NaN or an infinity"),
    Feature("model.merge.safe_untouched", "advanced", "model_merge", (*_ADV, "model_merge"), "merge_safe_untouched",
            title="a refused safe merge leaves every weight as it was (the bad value in the last module)"),
    Feature("model.merge.unload", "advanced", "merge_and_unload", (*_ADV, "merge_and_unload"), "unload",
            title="merge_and_unload writes a plain GPT-2 checkpoint that loads with the same logits"),
    Feature("model.dora", "advanced", "model_adapters", (*_ADV, "dora"), "dora",
            title="DoRA: logits, loss, detached-norm gradients of A, B and the magnitude (eval mode)"),
    Feature("model.dora.dropout", "advanced", "model_adapters", (*_ADV, "dora", "dropout_mask_injection"),
            "dora_dropout", title="DoRA with injected LoRA dropout keep-masks (PEFT's dropout form)"),
    Feature("model.dora.zero_norm_row", "advanced", "model_adapters", (*_ADV, "dora"), "dora_zero_row",
            title="DoRA with a zero-norm row of W + sBA: that row's factor is 0, its output the bias, no NaN"),
    Feature("model.dora.init", "advanced", "init_adapter", (*_ADV, "dora", "init:true"), "dora_init",
            title="DoRA at init: magnitude = row norms of W, file key lora_magnitude_vector, output = base"),
    Feature("model.init.true", "advanced", "init_adapter", (*_ADV, "init:true"), "init_true",
            title="init_lora_weights=True: A ~ U(±1/√in) (KS test), B = 0, output = base"),
    Feature("model.init.gaussian", "advanced", "init_adapter", (*_ADV, "init:gaussian"), "init_gaussian",
            title="init_lora_weights='gaussian': A ~ N(0, 1/r²) (KS test), B = 0, output = base"),
    Feature("model.init.false", "advanced", "init_adapter", (*_ADV, "init:false"), "init_false",
            title="init_lora_weights=False: A ~ U(±1/√in), B ~ U(±1/√r) (KS tests)"),
    Feature("model.init.pissa", "advanced", "init_adapter", (*_ADV, "init:pissa"), "init_pissa",
            title="PiSSA: s·BA = top-r SVD part, residual base, output unchanged at init"),
    Feature("model.init.olora", "advanced", "init_adapter", (*_ADV, "init:olora"), "init_olora",
            title="OLoRA: s·BA = Q_r R_r of Wt, residual base, output unchanged at init"),
    Feature("model.init.orthogonal", "advanced", "init_adapter", (*_ADV, "init:orthogonal"), "init_orthogonal",
            title="init_lora_weights='orthogonal': B A = 0, rank r/2 each, 100‖A‖² ~ χ², output = base"),
    Feature("model.init.pissa_niter", "advanced", "init_adapter", (*_ADV, "init:pissa_niter"), "init_pissa_niter",
            title="pissa_niter_K: residual + s·BA = W, s·BA a rank-r projection of W, output unchanged"),
    Feature("model.adapters.active", "advanced", "model_adapters", (*_ADV, "multi_adapter"), "active",
            title="several active adapters (any order): deltas add up; loss and every adapter's gradients"),
    Feature("model.adapters.disabled", "advanced", "model_adapters", (*_ADV, "multi_adapter"), "disabled",
            title="every adapter disabled: exactly the base model (bias 'none')"),
    Feature("model.adapters.mixed_batch", "advanced", "model_adapters", (*_ADV, "multi_adapter", "mixed_batch"),
            "mixed_batch", title="one adapter per row (and base rows): each row = its adapter alone"),
    Feature("model.adapters.lora_bias", "advanced", "model_adapters", (*_ADV, "multi_adapter", "lora_bias"),
            "multi_lora_bias", title="lora_bias adapters active together: logits and b_B gradients"),
    Feature("model.adapters.dora_order", "advanced", "model_adapters", (*_ADV, "multi_adapter", "dora"),
            "dora_order", title="a LoRA and a DoRA adapter active together: every delta from the base, order-free"),
    Feature("model.weighted.cat", "advanced", "weighted_adapter", (*_ADV, "combination:cat"), "weighted_cat",
            title="add_weighted_adapter 'cat': ΔW = Σ w_i ΔW_i exactly, new scaling 1"),
    Feature("model.weighted.linear", "advanced", "weighted_adapter", (*_ADV, "combination:linear"),
            "weighted_linear", title="'linear': PEFT's formula with its cross terms (float32-exact coefficients)"),
    Feature("model.weighted.svd", "advanced", "weighted_adapter", (*_ADV, "combination:svd"), "weighted_svd",
            title="'svd': the best rank-k approximation of Σ w_i ΔW_i"),
    Feature("model.weighted.rslora", "advanced", "weighted_adapter", (*_ADV, "combination:cat", "rslora"),
            "weighted_rslora", title="sources with use_rslora: the new adapter's scaling is still 1"),
    Feature("model.weighted.lora_bias", "advanced", "weighted_adapter", (*_ADV, "combination:cat", "lora_bias"),
            "weighted_lora_bias", title="lora_bias sources: b_B = Σ w_i s_i b_i"),
    Feature("model.weighted.coefficients", "advanced", "weighted_adapter", (*_ADV, "combination:linear"),
            "weighted_coefficients", title="'linear' in float64 with any weights: coefficients in float64"),
    Feature("model.weighted.ties", "advanced", "weighted_adapter", (*_ADV, "combination:ties"), "weighted_ties",
            title="'ties': magnitude-pruned A_i, B_i, elected sign ('total'/'frequency'), disjoint mean"),
    Feature("model.weighted.magnitude_prune", "advanced", "weighted_adapter", (*_ADV, "combination:magnitude_prune"),
            "weighted_magnitude_prune", title="'magnitude_prune': Σ c_i (A_i, B_i pruned to density by |value|)"),
    Feature("model.weighted.ties_svd", "advanced", "weighted_adapter", (*_ADV, "combination:ties_svd"),
            "weighted_ties_svd", title="'ties_svd': ties on the s_i B_i A_i, then the best rank-k approximation"),
    Feature("model.weighted.magnitude_prune_svd", "advanced", "weighted_adapter",
            (*_ADV, "combination:magnitude_prune_svd"), "weighted_magnitude_prune_svd",
            title="'magnitude_prune_svd': pruned s_i B_i A_i summed with w_i, then rank-k SVD"),
    Feature("model.weighted.patterns", "advanced", "weighted_adapter",
            (*_ADV, "combination:cat", "combination:svd", "rank_alpha_pattern"), "weighted_patterns",
            title="'cat' / 'svd' of sources with rank_pattern and alpha_pattern: each module's own r and s"),
    Feature("model.weighted.dare_linear", "advanced", "weighted_adapter", (*_ADV, "combination:dare_linear"),
            "weighted_dare_linear", title="'dare_linear': A_i, B_i ⊙ injected keep-masks / density, summed with c_i"),
    Feature("model.weighted.dare_ties", "advanced", "weighted_adapter", (*_ADV, "combination:dare_ties"),
            "weighted_dare_ties", title="'dare_ties': random-pruned, rescaled A_i, B_i; elected sign, disjoint mean"),
    Feature("model.weighted.dare_linear_svd", "advanced", "weighted_adapter", (*_ADV, "combination:dare_linear_svd"),
            "weighted_dare_linear_svd", title="'dare_linear_svd': masked s_i B_i A_i / density summed, rank-k SVD"),
    Feature("model.weighted.dare_ties_svd", "advanced", "weighted_adapter", (*_ADV, "combination:dare_ties_svd"),
            "weighted_dare_ties_svd", title="'dare_ties_svd': dare_ties on the s_i B_i A_i, then rank-k SVD"),
    Feature("model.merge.dora_zero_row", "advanced", "model_merge", (*_ADV, "model_merge", "dora"),
            "merge_dora_zero_row", title="merge a DoRA adapter with a zero-norm row: merged row 0, no NaN, unmerge"),
    Feature("model.dora.init_zero_row", "advanced", "init_adapter", (*_ADV, "dora", "init:true"),
            "dora_init_zero_row", title="DoRA init on a zero row of W: magnitude 0 there, output = base, no NaN"),
    Feature("model.adapters.trainable_tokens", "advanced", "model_adapters",
            (*_ADV, "multi_adapter", "trainable_tokens"), "adapters_trainable_tokens",
            title="a trainable-tokens adapter active with a LoRA one: logits, loss, gradients (new rows included)"),
    Feature("model.adapters.trainable_tokens_mixed", "advanced", "model_adapters",
            (*_ADV, "multi_adapter", "mixed_batch", "trainable_tokens"), "adapters_trainable_tokens_mixed",
            title="a mixed batch (adapter_names) with a trainable-tokens adapter and a LoRA one: each row its own W'"),
    Feature("model.merge.trainable_tokens", "advanced", "model_merge", (*_ADV, "model_merge", "trainable_tokens"),
            "merge_trainable_tokens", title="merge trainable tokens: wte's rows become the new rows, unmerge restores"),
    Feature("model.merge.trainable_tokens_mixed", "advanced", "model_merge",
            (*_ADV, "model_merge", "trainable_tokens"), "merge_trainable_tokens_mixed",
            title="merge a trainable-tokens adapter together with a plain LoRA adapter"),
]  # fmt: skip
GOLDEN_FEATURE = Feature("golden.replay", "golden", "model_forward_backward", _MODEL, "golden",
                         title="the committed golden fixtures, as fixed regression points")  # fmt: skip
FEATURES = {f.id: f for f in [*LAYER_FEATURES, *MODEL_FEATURES, *ADVANCED_FEATURES, GOLDEN_FEATURE]}


def missing_capability(caps: Capabilities, needs: tuple[str, ...]) -> str | None:
    """``None`` if ``caps`` has every requirement, else the reason the first missing one is not supported.

    Requirements: a boolean capability name (``"rslora"``), ``"layout:<layout>"``, ``"bias:<mode>"`` (``"bias:
    trainable"``: any mode other than 'none'), ``"dtype:<dtype>"``, ``"init:<method>"``, ``"combination:<type>"``,
    ``"layer_init:<law>"`` (a law of conformance.init_laws in ``layer_init_methods``; ``"layer_init:*"``: any).
    """
    for need in needs:
        kind, _, value = need.partition(":")
        if kind == "layout":
            ok, note = value in caps.layer_layouts, "layer_layouts"
        elif kind == "bias":
            ok = bool(caps.bias_modes - {"none"}) if value == "trainable" else value in caps.bias_modes
            note = "bias_modes"
        elif kind == "dtype":
            ok, note = value in caps.dtypes, "dtypes"
        elif kind == "init":
            ok, note = value in caps.init_methods, "init_methods"
        elif kind == "layer_init":  # "layer_init:*": any law (conformance.init_laws.ANY_LAW)
            ok = bool(caps.layer_init_methods) if value == ANY_LAW else value in caps.layer_init_methods
            note = "layer_init_methods"
        elif kind == "combination":
            ok, note = value in caps.weighted_combinations, "weighted_combinations"
        else:
            ok, note = bool(getattr(caps, kind)), kind
        if not ok:
            reason = caps.notes.get(note) or caps.notes.get(need) or "the driver does not declare it"
            return f"{need}: {reason}"
    return None
