"""The suite's features: one row of the report each, one pytest test each (golden fixtures: one test per file).

A feature names what it checks, at which level, with which driver method, and which capabilities it needs.
A candidate that lacks one of them gets "not supported" with the reason from its ``Capabilities.notes``.

Feature ids are stable: deviation lists match them by prefix, and ``reflora matrix`` joins reports on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from conformance.protocol import Capabilities


@dataclass(frozen=True)
class Feature:
    id: str  # e.g. "layer.dropout.conv1d"
    level: str  # "layer", "model" or "golden"
    method: str  # the driver method the check calls
    needs: tuple[str, ...]  # capability requirements, see ``missing_capability``
    variant: str  # what the strategy draws; see conformance.strategies
    layout: str | None = None  # layer level: "linear" or "conv1d"
    title: str = ""


def _layer_features() -> list[Feature]:
    out = []
    variants = [
        ("forward_backward", "forward, backward (dx, dA, dB), alpha/r scaling, several r", ()),
        ("rslora", "rsLoRA scaling alpha/sqrt(r)", ("rslora",)),
        ("dropout", "LoRA dropout with the injected keep-mask; eval mode without", ("dropout_mask_injection",)),
        ("bias", "trainable bias ('all' / 'lora_only'): its gradient and the trainable set", ("bias:trainable",)),
        ("qkv_slices", "per-slice LoRA on a fused q/k/v projection", ("per_slice_qkv",)),
        ("merge", "merge W + s·BA, forward after merge, unmerge restores W", ("merge",)),
    ]
    for layout in ("linear", "conv1d"):
        for variant, title, variant_needs in variants:
            method = "layer_merge" if variant == "merge" else "layer_forward_backward"
            needs = (f"layout:{layout}", *variant_needs)
            out.append(
                Feature(f"layer.{variant}.{layout}", "layer", method, needs, variant, layout, f"{layout}: {title}")
            )
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
    Feature("model.qkv_slices", "model", "model_forward_backward", (*_MODEL, "per_slice_qkv"), "qkv",
            title="per-slice q/k/v LoRA on c_attn"),
    Feature("model.adapter_save", "model", "save_adapter", (*_MODEL, "adapter_files"), "adapter_save",
            title="adapter files written by the candidate, read by reflora (float64 / float32 files)"),
    Feature("model.adapter_load", "model", "load_adapter_logits", (*_MODEL, "adapter_files"), "adapter_load",
            title="adapter files written by reflora, read by the candidate (float64 / float32 files)"),
    Feature("model.adapter_switch", "model", "model_switch_adapters", (*_MODEL, "adapter_switching"), "adapter_switch",
            title="two adapters: switch the active one and back"),
]  # fmt: skip
LAYER_FEATURES = _layer_features()
GOLDEN_FEATURE = Feature("golden.replay", "golden", "model_forward_backward", _MODEL, "golden",
                         title="the committed golden fixtures, as fixed regression points")  # fmt: skip
FEATURES = {f.id: f for f in [*LAYER_FEATURES, *MODEL_FEATURES, GOLDEN_FEATURE]}


def missing_capability(caps: Capabilities, needs: tuple[str, ...]) -> str | None:
    """``None`` if ``caps`` has every requirement, else the reason the first missing one is not supported.

    Requirements: a boolean capability name (``"rslora"``), ``"layout:<layout>"``, ``"bias:<mode>"`` (``"bias:
    trainable"``: any mode other than 'none'), ``"dtype:<dtype>"``.
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
        else:
            ok, note = bool(getattr(caps, kind)), kind
        if not ok:
            reason = caps.notes.get(note) or caps.notes.get(need) or "the driver does not declare it"
            return f"{need}: {reason}"
    return None
