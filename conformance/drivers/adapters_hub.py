"""Driver for AdapterHub's ``adapters`` 1.3.0 (LoRA): layer level and model level on HF GPT-2.

It needs transformers ~=4.57.6, so it runs in its own venv: ``reflora conform --candidate adapters --isolated``
(see conformance/envs.py).

Mapping (adapters/methods/lora.py, adapters/configuration/adapter_config.py):

* ``LoRAConfig(r, alpha, dropout, selfattn_lora, intermediate_lora, output_lora, attn_matrices, leave_out)``;
  scaling ``alpha / r``. A LoRA module holds ``lora_A`` (r, in) and ``lora_B`` (out, r), PEFT's layout.
* GPT-2 (``adapters.init`` on ``GPT2LMHeadModel``): ``attn.c_attn`` becomes ``LoRAMergedLinear``, a per-slice
  q/k/v LoRA (``attn_matrices``) stacked like loralib's MergedLinear: ``lora_A`` (r·k, in) = [A_q; A_v],
  ``lora_B`` (k·C, r) = [B_q; B_v]. ``mlp.c_fc`` is ``intermediate_lora`` and ``mlp.c_proj`` ``output_lora``
  (``LoRALinear`` with ``fan_in_fan_out``). ``attn.c_proj`` is never adapted, and there is no full-matrix LoRA on
  ``c_attn``: those configs are not supported. ``layers_to_transform`` is ``leave_out`` (its complement).
* layer level: the same classes built directly (``LoRALinearTorch`` for a full matrix, with
  ``fan_in_fan_out=True`` for the conv1d layout; ``LoRAMergedLinear`` for per-slice q/k/v) on a
  ``ModelAdaptersConfig`` holding the adapter, activated as ``set_active_adapters`` does.
* LoRA dropout: each LoRA module's ``lora_dropout`` (``nn.Dropout`` when p > 0) acts on the layer input; the
  driver puts a module computing ``x ⊙ M / (1 − p)`` with the reference's mask in its place.
* trainable: ``model.train_adapter(name)`` (layer level: the LoRA parameters; adapters never trains a bias).
* merge: ``merge_adapter(name)`` / ``reset_adapter()``, the library's own pair.
* adapter switching: two named adapters (``add_adapter`` twice), ``set_active_adapters(name)`` between the
  forwards, AdapterHub's own switch.
* layer DoRA merge / unmerge (``layer_merge`` with ``case.magnitude``): ``merge_adapter`` / ``reset_adapter`` on
  a ``use_dora`` module (known deviations: docs/findings.md, "adapters (AdapterHub): DoRA").
* layer init (``layer_init``): ``LoRAConfig(init_weights=...)``, the library's own init, on ``LoRALinearTorch``:
  "lora" is the law ``kaiming_uniform`` (``kaiming_uniform_(a=√5)`` on A, B = 0: PEFT's True), "bert"
  ``normal_002`` (A, B ~ N(0, 0.02²)), "vera" ``vera_he_uniform`` (``kaiming_uniform_`` with a = 0 on A and B);
  the LoRA tensors are created in the case's dtype (``LoRAConfig(dtype=...)``) and the RNG seeded with
  ``torch.manual_seed(case.seed)`` (``init_weights_seed`` too; adapters' ``fix_seed`` ignores a seed of 0).
  "ia3" sets A = B = 1 (meant for ``composition_mode='scale'``): a constant, not a law.
* several adapters on one layer (``layer_adapters``): every adapter added to one ``LoRALinearTorch``. The active
  set is the composition block ``Average(*names, weights=[n] * n, normalize_weights=False)``: LoRALinear.mean
  computes ``mean_i(w_i · δ_i)`` (methods/lora.py), so ``w_i = n`` is the sum Σ δ_i (adapters has no plain-sum
  block: ``Stack`` chains LoRAs, each reading the previous one's output); one name is the name itself; ``[]`` is
  ``active_setup = None``. One adapter per batch row is ``MultiTask(*names)`` with ``task_ids`` in a
  ``ForwardContext`` (adapter_layer_base.compose_multi_task); a row with no adapter (``"__base__"``) has no
  expression there (refused).
* half precision: the layer ``.to(torch.float16 / torch.bfloat16)``.
* advanced level (an ``AdaptersCase``): every adapter added with ``model.add_adapter``; ``model_merge`` is
  ``model.merge_adapter`` / ``reset_adapter`` (one adapter: a layer holds one merged adapter; no safe merge),
  ``merge_and_unload`` is ``merge_adapter`` + ``delete_adapter`` + ``save_pretrained`` (one adapter, none active
  at the delete), ``model_adapters`` the same compositions as on one layer (``Average`` for the sum, ``None``
  disabled, ``MultiTask`` + ``task_ids`` per row) where every adapter has the same modules and none is on c_attn.
  The suite's advanced draws also target attn.c_proj and a full-matrix c_attn, which adapters' GPT-2 never adapts:
  those draws are refused (NotSupported) with that reason. DoRA on GPT-2 raises in ``add_adapter`` (Conv1D), no
  lora_bias, no init other than the layer-level laws, no PEFT-equal weighted combination (``notes``).
* adapter files: AdapterHub writes its own format (``pytorch_adapter.bin`` / safetensors with its own names and
  config), not PEFT's; not supported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import (
    keep_mask_dropout,
    lora_names,
    refuse_unsupported,
    refuse_unsupported_init,
    refuse_unsupported_model,
    to_numpy,
    to_torch,
    torch_layer_results,
    trainable_names,
)
from conformance.protocol import (
    AdaptersCase,
    Capabilities,
    LayerAdaptersCase,
    LayerCase,
    LayerInitCase,
    ModelCase,
    NotSupported,
    targeted_keys,
)

name = "adapters"
ADAPTER = "reflora"
# conformance.init_laws law -> LoRAConfig.init_weights (methods/lora.py LoRA.__init__)
INIT_WEIGHTS = {"kaiming_uniform": "lora", "normal_002": "bert", "vera_he_uniform": "vera"}
capabilities = Capabilities(
    layer_layouts=frozenset({"linear", "conv1d"}),
    model_level=True,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=True,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    target_modules_list=True,
    target_modules_regex=False,
    layers_to_transform=True,
    rank_alpha_pattern=False,
    position_ids=True,
    padding=True,
    merge=True,
    merge_qkv_slices=True,  # merge_adapter / reset_adapter on LoRAMergedLinear (per-slice q/k/v)
    layer_dora=True,  # LoRAConfig(use_dora=True) on LoRALinearTorch (a known deviation: docs/findings.md)
    layer_dora_full_norm=True,  # adapters' one DoRA differentiates its norm (exact when alpha = r, no bias)
    layer_dora_merge=True,  # merge_adapter / reset_adapter with DoRA (known deviations: docs/findings.md)
    layer_init_methods=frozenset(INIT_WEIGHTS),
    layer_multi_adapter=True,  # Average(weights=[n] * n, normalize_weights=False): the sum; [] = no active setup
    layer_mixed_batch=True,  # MultiTask + ForwardContext(task_ids=...): one adapter per row, no "__base__" row
    adapter_files=False,
    adapter_switching=True,
    model_merge=True,  # one adapter: model.merge_adapter / reset_adapter (model_merge below)
    merge_and_unload=True,  # one adapter: merge_adapter, delete_adapter, save_pretrained
    multi_adapter=True,  # model_adapters: Average (the sum), None (disabled); MLP-only targets, same modules each
    mixed_batch=True,  # model_adapters: MultiTask + task_ids; no "__base__" row
    notes={
        "merge_qkv_slices": "mapped: merge_adapter / reset_adapter on LoRAMergedLinear (attn_matrices = the case's "
        "slices): each slice's s·B A lands in its own output rows",
        "rslora": "LoRA scales by alpha / r only",
        "layer_lora_bias": "LoRA's lora_B is a parameter matrix: no bias on B",
        "bias_modes": "LoRA in adapters never trains a bias",
        "target_modules_list": "GPT-2 targets are c_attn as per-slice q/k/v (attn_matrices), mlp.c_fc "
        "(intermediate_lora) and mlp.c_proj (output_lora); full-matrix c_attn and attn.c_proj are not adaptable",
        "target_modules_regex": "LoRAConfig selects modules by role (selfattn/intermediate/output), not by name",
        "layers_to_transform": "as LoRAConfig.leave_out (every other layer)",
        "rank_alpha_pattern": "one r and alpha per adapter",
        "adapter_files": "AdapterHub saves its own format, not PEFT's adapter_model.safetensors",
        "target_modules_all_linear": "LoRAConfig selects modules by role and never adapts attn.c_proj: every Conv1D "
        "cannot be targeted",
        "exclude_modules": "LoRAConfig has leave_out (layer indices) only, no module exclusion",
        "runtime_scaling": "no set_scale / scale_layer: LoRA.scaling is fixed at alpha / r when the module is built",
        "embedding_lora": "adapters' LoRA (methods/lora.py) wraps linear layers only: no Embedding LoRA",
        "trainable_tokens": "no trainable-token (selected embedding rows) method in adapters",
        "model_merge": "model.merge_adapter(name) / reset_adapter() for one adapter; a LoRA layer holds one merged "
        "adapter at a time (merge_adapter raises 'LoRALayer already has a merged LoRA module'), and there is no safe "
        "merge (merge_adapter never checks the merged weights for NaN / inf); GPT-2's attn.c_proj and a full-matrix "
        "c_attn are not adaptable",
        "merge_and_unload": "no merge_and_unload: merge_adapter + delete_adapter + save_pretrained for one adapter "
        "(a LoRA layer holds one merged adapter); delete_adapter of a merged adapter that is active raises KeyError "
        "(docs/findings.md), and save_pretrained keeps every adapter left (.loras.<name>.lora_A/B)",
        "lora_bias": "LoRA's lora_B is a parameter matrix: no bias on B",
        "dora": "LoRAConfig(use_dora=True) raises in add_adapter on every GPT-2 module adapters adapts (Conv1D: the "
        "magnitude is the norm over the stored (in, out) weight's dim 1; docs/findings.md, adapters DoRA 1); its DoRA "
        "layer is checked at layer level (layer.dora*, layer.dora_merge / dora_unmerge / dora_init)",
        "modules_to_save": "no modules_to_save: an adapter holds only its method's tensors; train_adapter(..., "
        "train_embeddings=True) unfreezes the input embedding itself (get_input_embeddings().weight), not a trainable "
        "copy of a chosen module saved with the adapter",
        "ensure_weight_tying": "no modules_to_save, so no tied copy either",
        "layer_init_methods": "LoRAConfig.init_weights is 'lora', 'bert', 'vera' (laws kaiming_uniform, normal_002, "
        "vera_he_uniform) or 'ia3' (A = B = 1, a constant); no Gaussian N(0, 1/r²), no he_uniform with B = 0 and no "
        "nn.Linear reset of B (PEFT's False)",
        "layer_mixed_batch": "MultiTask routes every row to one of its adapters (compose_multi_task): a row with no "
        "adapter ('__base__') cannot be expressed",
        "init_methods": "init_weights='lora' is PEFT's True, but the advanced init cases target every module kind, "
        "attn.c_proj included, which adapters' GPT-2 never adapts (its laws are checked at layer level, "
        "layer.init.*); 'bert' is N(0, 0.02²) on A and B, not PEFT's 'gaussian'; no PiSSA / OLoRA / orthogonal",
        "multi_adapter": "several active adapters are Average(*names, weights=[n] * n, normalize_weights=False) (the "
        "sum of deltas; Stack chains LoRAs, Parallel repeats the batch); GPT-2's c_attn is LoRAMergedLinear, which "
        "takes one adapter only (its forward raises 'Cannot use ... with LoRA' for a composition), a composition "
        "skips modules where one adapter is absent, and attn.c_proj is never adapted",
        "mixed_batch": "MultiTask with task_ids (one adapter per row) routes every row to one of its adapters: a "
        "row without adapter ('__base__') cannot be expressed; GPT-2's c_attn (LoRAMergedLinear) takes no "
        "composition, and every adapter must be on the same modules",
        "weighted_combinations": "average_adapter's combine_strategy 'linear' gives A' = Σ w_i A_i, B' = Σ w_i B_i "
        "under the sources' own scaling (PEFT's linear: ±√|w_i s_i| on A, √|w_i s_i| on B, scaling 1), "
        "'lora_linear_only_negate_b' puts the sign on B (PEFT on A), and 'lora_delta_w_svd' is off for GPT-2 "
        "(GPT2ModelAdapterMixin.support_lora_delta_w_svd = False); no cat, ties, magnitude_prune or DARE",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "candidate": f"adapters {version('adapters')}",
        "framework": f"torch {version('torch')}",
        "transformers": version("transformers"),
    }


# ---------------------------------------------------------------------------------------------
# layer level
# ---------------------------------------------------------------------------------------------


def _build_layer(case: LayerCase, dora: bool = False):
    import torch
    from adapters import LoRAConfig
    from adapters.composition import parse_composition
    from adapters.configuration import ModelAdaptersConfig
    from adapters.methods.lora import LoRALinearTorch, LoRAMergedLinear
    from transformers import GPT2Config

    in_f, out_f = case.weight.shape if case.layout == "conv1d" else case.weight.shape[::-1]
    slices = [s for s in "qkv" if s in case.lora_A] if case.qkv_slices is not None else ["q", "k", "v"]
    config = LoRAConfig(r=case.r, alpha=case.lora_alpha, dropout=case.lora_dropout, attn_matrices=slices,
                        selfattn_lora=True, intermediate_lora=True, use_dora=dora)  # fmt: skip
    adapters_config = ModelAdaptersConfig()
    adapters_config.add(ADAPTER, config=config)
    adapters_config.active_setup = parse_composition(ADAPTER)  # what set_active_adapters stores
    common = dict(fan_in_fan_out=case.layout == "conv1d", bias=case.bias is not None)
    if case.qkv_slices is None:
        layer = LoRALinearTorch(in_f, out_f, "intermediate", GPT2Config(), adapters_config, **common)
    else:
        layer = LoRAMergedLinear(in_f, out_f, "selfattn", GPT2Config(), adapters_config, **common)
    if not layer.add_adapter(ADAPTER, layer_idx=0):
        raise RuntimeError("adapters did not add the LoRA module")  # a driver bug, not a library verdict
    layer = layer.to(to_torch(case.x, case.dtype).dtype)
    lora = layer.loras[ADAPTER]
    names = lora_names(case)
    with torch.no_grad():
        layer.weight.copy_(to_torch(case.weight, case.dtype))  # (in, out) under fan_in_fan_out
        if case.bias is not None:
            layer.bias.copy_(to_torch(case.bias, case.dtype))
        lora.lora_A.copy_(to_torch(np.concatenate([case.lora_A[s] for s, _, _ in names]), case.dtype))
        lora.lora_B.copy_(to_torch(np.concatenate([case.lora_B[s] for s, _, _ in names]), case.dtype))
    for p in layer.parameters():  # train_adapter's rule: only the adapter's LoRA tensors train
        p.requires_grad_(False)
    lora.lora_A.requires_grad_(True)
    lora.lora_B.requires_grad_(True)
    return layer, lora


def _forward(case: LayerCase, layer, lora):
    """The layer's forward on ``case.x`` (requiring its gradient): train mode with the case's keep-mask in LoRA's
    dropout, or eval mode. Returns ``(x, y)``."""
    if case.keep_mask is not None and case.lora_dropout > 0:
        lora.lora_dropout = keep_mask_dropout(case)
        layer.train()
    else:
        layer.eval()
    x = to_torch(case.x, case.dtype, requires_grad=True)
    return x, layer(x)


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    if case.magnitude is not None:  # layer.dora.*: the library's own DoRA layer, the case's magnitude loaded
        out = dora_forward_backward(case, case.magnitude)
        del out["magnitude_init"]
        return out
    layer, lora = _build_layer(case)
    x, y = _forward(case, layer, lora)
    out = torch_layer_results(y, x, case.dy, {"lora_A": lora.lora_A, "lora_B": lora.lora_B})
    if case.qkv_slices is not None:
        dA, dB = out.pop("lora_A"), out.pop("lora_B")
        width = dB.shape[0] // len(lora_names(case))
        for i, (_, a_name, b_name) in enumerate(lora_names(case)):
            out[a_name], out[b_name] = dA[i * case.r : (i + 1) * case.r], dB[i * width : (i + 1) * width]
    flags = {"lora_A": True, "lora_B": True, "weight": layer.weight.requires_grad,
             "bias": layer.bias is not None and layer.bias.requires_grad}  # fmt: skip
    out["trainable"] = trainable_names(case, flags)
    return out


def _load_magnitude(case: LayerCase, lora, magnitude: np.ndarray | None) -> np.ndarray:
    """Put ``magnitude`` (out,) into the DoRA module's ``m`` (an ``nn.Linear(1, out)``), or keep the library's own
    initialisation (None: the row norms of the weight *as stored*); returns the value used."""
    import torch

    if magnitude is not None:
        with torch.no_grad():
            lora.m.weight.copy_(to_torch(magnitude[:, None], case.dtype))
    return to_numpy(lora.m.weight)[:, 0]


def dora_forward_backward(case: LayerCase, magnitude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``LoRAConfig(use_dora=True)`` on ``LoRALinearTorch`` (adapters/methods/lora.py): ``y``, ``dx``, ``lora_A``,
    ``lora_B``, ``magnitude`` (the gradient of ``m``), ``magnitude_init`` and ``trainable``. adapters' DoRA
    normalises by ``‖W + B A‖`` (no scaling, not detached) and rescales the bias with the rest of the output."""
    refuse_unsupported(case, capabilities, name)
    if case.qkv_slices is not None:
        raise NotSupported(f"{name}: DoRA on per-slice q/k/v (LoRAMergedLinear) is not driven")
    layer, lora = _build_layer(case, dora=True)
    used = _load_magnitude(case, lora, magnitude)
    lora.m.weight.requires_grad_(True)  # train_adapter's rule: the magnitude trains with A and B
    x, y = _forward(case, layer, lora)
    out = torch_layer_results(y, x, case.dy, {"lora_A": lora.lora_A, "lora_B": lora.lora_B, "magnitude": lora.m.weight})
    out["magnitude"] = out["magnitude"][:, 0]
    out["magnitude_init"] = used
    out["trainable"] = np.array(["lora_A", "lora_B", "magnitude"], dtype=str)
    return out


def _merge_and_reset(case, layer) -> dict[str, np.ndarray]:
    """``merge_adapter`` then ``reset_adapter`` on a built layer: ``merged_weight`` (the case's layout),
    ``merged_y`` (B, T, out, eval), ``unmerged_weight``."""
    import torch

    layer.eval()
    layer.merge_adapter(ADAPTER)
    with torch.no_grad():
        merged_weight = to_numpy(layer.weight)
        merged_y = to_numpy(layer(to_torch(case.x, case.dtype)))
    layer.reset_adapter()
    return {"merged_weight": merged_weight, "merged_y": merged_y, "unmerged_weight": to_numpy(layer.weight)}


def dora_merge(case: LayerCase, magnitude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``merge_adapter`` / ``reset_adapter`` with DoRA: ``merged_weight``, ``merged_y``, ``unmerged_weight``."""

    refuse_unsupported(case, capabilities, name)
    layer, lora = _build_layer(case, dora=True)
    _load_magnitude(case, lora, magnitude)
    return _merge_and_reset(case, layer)


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``merge_adapter`` then ``reset_adapter``: ``merged_weight`` (the case's layout), ``merged_y`` (B, T, out),
    ``unmerged_weight``. With ``case.magnitude`` (layer.dora_merge.* / layer.dora_unmerge.*): the DoRA module's
    pair (``dora_merge``)."""

    refuse_unsupported(case, capabilities, name)
    if case.magnitude is not None:  # DoRA-merge draws hold no q/k/v slices
        return dora_merge(case, case.magnitude)
    layer, _ = _build_layer(case)
    return _merge_and_reset(case, layer)


def _empty_layer(layout: str, weight: np.ndarray, bias: np.ndarray | None, dtype: str, adapters_config):
    """A ``LoRALinearTorch`` (``fan_in_fan_out`` for the conv1d layout) in ``dtype`` holding ``weight`` (the
    layout's shape: (out, in) linear, (in, out) conv1d) and ``bias`` (out,), no adapter yet, every base tensor
    frozen (``train_adapter``'s rule)."""
    import torch
    from adapters.methods.lora import LoRALinearTorch
    from transformers import GPT2Config

    in_f, out_f = weight.shape if layout == "conv1d" else weight.shape[::-1]
    layer = LoRALinearTorch(in_f, out_f, "intermediate", GPT2Config(), adapters_config,
                            fan_in_fan_out=layout == "conv1d", bias=bias is not None)  # fmt: skip
    layer = layer.to(to_torch(weight, dtype).dtype)
    with torch.no_grad():
        layer.weight.copy_(to_torch(weight, dtype))
        if bias is not None:
            layer.bias.copy_(to_torch(bias, dtype))
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """``LoRAConfig(init_weights=INIT_WEIGHTS[case.init], init_weights_seed=case.seed, use_dora=case.use_dora,
    dtype=case.dtype)`` added to a ``LoRALinearTorch`` holding the case's weight: the library's own A (r, in),
    B (out, r) (and DoRA magnitude (out,): ``‖w_o‖`` over dim 1 of the weight as stored), the eval forward ``y``
    (B, T, out) at init and the weight after the init (the case's layout)."""
    import torch
    from adapters import LoRAConfig
    from adapters.composition import parse_composition
    from adapters.configuration import ModelAdaptersConfig

    refuse_unsupported_init(case, capabilities, name)
    config = LoRAConfig(r=case.r, alpha=case.lora_alpha, intermediate_lora=True, init_weights=INIT_WEIGHTS[case.init],
                        init_weights_seed=case.seed, use_dora=case.use_dora, dtype=case.dtype)  # fmt: skip
    adapters_config = ModelAdaptersConfig()
    adapters_config.add(ADAPTER, config=config)
    adapters_config.active_setup = parse_composition(ADAPTER)
    layer = _empty_layer(case.layout, case.weight, case.bias, case.dtype, adapters_config)
    torch.manual_seed(case.seed)  # fix_seed(init_weights_seed) skips a seed of 0 (``if seed:``)
    if not layer.add_adapter(ADAPTER, layer_idx=0):
        raise RuntimeError("adapters did not add the LoRA module")  # a driver bug, not a library verdict
    lora = layer.loras[ADAPTER]
    layer.eval()
    with torch.no_grad():
        out = {"lora_A": to_numpy(lora.lora_A), "lora_B": to_numpy(lora.lora_B),
               "y": to_numpy(layer(to_torch(case.x, case.dtype))), "weight": to_numpy(layer.weight)}  # fmt: skip
    if case.use_dora:
        out["magnitude"] = to_numpy(lora.m.weight)[:, 0]
    return out


def layer_adapters(case: LayerAdaptersCase) -> dict:
    """Every adapter of ``case.adapters`` added (in order) to one ``LoRALinearTorch``, A and B copied in; the
    active set as adapters' composition (``Average(*names, weights=[n] * n, normalize_weights=False)`` = Σ δ_i,
    one name alone, or no active setup for ``[]``) or, per row, ``MultiTask`` with ``task_ids``. Returns ``y``
    (B, T, out), ``dx`` (B, T, in) and ``grads`` {"<name>.lora_A": (r, in), "<name>.lora_B": (out, r)} of every
    adapter that acts."""
    import contextlib

    import torch
    from adapters import LoRAConfig
    from adapters.composition import Average, MultiTask, parse_composition
    from adapters.configuration import ModelAdaptersConfig
    from adapters.context import ForwardContext

    from reflora.adapters import BASE_ADAPTER

    if case.layout not in capabilities.layer_layouts or case.dtype not in capabilities.dtypes:
        raise NotSupported(f"{name}: layout {case.layout!r} / dtype {case.dtype!r} is not supported")
    if any(a["use_rslora"] for a in case.adapters.values()):
        raise NotSupported(f"{name}: rsLoRA scaling is not supported ({capabilities.notes['rslora']})")
    adapters_config = ModelAdaptersConfig()
    for adapter_name, a in case.adapters.items():
        adapters_config.add(adapter_name, config=LoRAConfig(r=a["r"], alpha=a["lora_alpha"], intermediate_lora=True,
                                                            dtype=case.dtype))  # fmt: skip
    layer = _empty_layer(case.layout, case.weight, case.bias, case.dtype, adapters_config)
    for adapter_name, a in case.adapters.items():
        if not layer.add_adapter(adapter_name, layer_idx=0):
            raise RuntimeError(f"adapters did not add the LoRA module {adapter_name!r}")  # a driver bug
        lora = layer.loras[adapter_name]
        with torch.no_grad():
            lora.lora_A.copy_(to_torch(a["lora_A"], case.dtype))
            lora.lora_B.copy_(to_torch(a["lora_B"], case.dtype))
    context = contextlib.nullcontext()
    if case.adapter_names is not None:
        if BASE_ADAPTER in case.adapter_names:
            raise NotSupported(f"{name}: {capabilities.notes['layer_mixed_batch']}")
        acting = [n for n in case.adapters if n in case.adapter_names]
        adapters_config.active_setup = MultiTask(*acting)
        context = ForwardContext(layer, task_ids=list(case.adapter_names))
    else:
        acting = list(case.active or [])
        if len(acting) > 1:
            n = float(len(acting))
            adapters_config.active_setup = Average(*acting, weights=[n] * len(acting), normalize_weights=False)
        else:
            adapters_config.active_setup = parse_composition(acting[0]) if acting else None
    layer.eval()
    x = to_torch(case.x, case.dtype, requires_grad=True)
    with context:
        y = layer(x)
    leaves = {f"{n}.{t}": getattr(layer.loras[n], t) for n in acting for t in ("lora_A", "lora_B")}
    out = torch_layer_results(y, x, case.dy, leaves)
    return {"y": out["y"], "dx": out["dx"], "grads": {k: out[k] for k in leaves}}


# ---------------------------------------------------------------------------------------------
# model level: HF GPT-2 (transformers 4.57) + adapters.init + add_adapter(LoRAConfig)
# ---------------------------------------------------------------------------------------------

KIND_TO_ROLE = {"attn.c_attn": "selfattn_lora", "mlp.c_fc": "intermediate_lora", "mlp.c_proj": "output_lora"}


def adapters_lora_config(case: ModelCase):
    """reflora's LoraConfig as an AdapterHub ``LoRAConfig``, or NotSupported when it has no equivalent."""
    refuse_unsupported_model(case, capabilities, name)
    return role_config(case.config, case.lora)


def role_config(gpt2_config, lora):
    """``(LoRAConfig, plan)``: reflora's ``LoraConfig`` ``lora`` on ``gpt2_config`` as adapters' roles
    (selfattn_lora per slice, intermediate_lora, output_lora, leave_out), or NotSupported naming what adapters'
    GPT-2 cannot adapt (attn.c_proj, a full-matrix c_attn, different modules per layer, a regex)."""
    from adapters import LoRAConfig

    from reflora.targets import plan_lora

    if isinstance(lora.target_modules, str):
        raise NotSupported(f"{name}: {capabilities.notes['target_modules_regex']}")
    plan = plan_lora(gpt2_config, lora)
    kinds_by_layer: dict[int, set[str]] = {}
    for module in plan.values():
        kinds_by_layer.setdefault(module.layer, set()).add(module.kind)
    kinds = set().union(*kinds_by_layer.values())
    if "attn.c_proj" in kinds:
        raise NotSupported(f"{name}: attn.c_proj is never adapted ({capabilities.notes['target_modules_list']})")
    if "attn.c_attn" in kinds and lora.qkv_slices is None:
        raise NotSupported(f"{name}: c_attn LoRA is per q/k/v slice only, the case asks for a full-matrix c_attn")
    if any(layer_kinds != kinds for layer_kinds in kinds_by_layer.values()):
        raise NotSupported(f"{name}: every adapted layer gets the same modules (LoRAConfig roles)")
    leave_out = [i for i in range(gpt2_config.n_layer) if i not in kinds_by_layer]
    return LoRAConfig(
        r=lora.r,
        alpha=lora.lora_alpha,
        dropout=lora.lora_dropout,
        selfattn_lora="attn.c_attn" in kinds,
        intermediate_lora="mlp.c_fc" in kinds,
        output_lora="mlp.c_proj" in kinds,
        attn_matrices=list(lora.qkv_slices or ("q", "v")),
        leave_out=leave_out,
    ), plan


def _build_model(case: ModelCase):
    import adapters

    from conformance.drivers.peft_bridge import TORCH_DTYPES, build_hf_model

    config, plan = adapters_lora_config(case)
    model = build_hf_model(case.config, case.params, case.dtype)
    adapters.init(model)
    model.add_adapter(ADAPTER, config=config)
    model.train_adapter(ADAPTER)  # activates it, freezes everything else
    model.to(TORCH_DTYPES[case.dtype])  # the new LoRA tensors are created in float32
    live = _copy_adapter(model, plan, ADAPTER, case.adapter, case.config, case.dtype)
    modules = dict(model.named_modules())
    if case.dropout_masks and case.lora.lora_dropout > 0:
        from conformance.drivers.peft_bridge import MaskDropout

        for module_name, mask in case.dropout_masks.items():
            lora = modules[module_name].loras[ADAPTER]
            lora.lora_dropout = MaskDropout(to_torch(mask, case.dtype), case.lora.lora_dropout)
    return model, plan, live


def _copy_adapter(model, plan, adapter_name: str, tensors: dict, config, dtype: str) -> dict[str, tuple]:
    """Copy the reference tensors (reflora adapter key -> array) into the adapter ``adapter_name`` of ``model``;
    returns reflora key -> (live parameter, row slice of the stacked tensor)."""
    import torch

    modules = dict(model.named_modules())
    live: dict[str, tuple] = {}  # reflora adapter key -> (parameter, row slice of the stacked tensor)
    for module_name, module in plan.items():
        lora = modules[module_name].loras[adapter_name]
        width_b = module.out_features // 3 if module.kind == "attn.c_attn" else module.out_features
        for i, branch in enumerate(module.branches):
            live[branch.a_key] = (lora.lora_A, slice(i * module.r, (i + 1) * module.r))
            live[branch.b_key] = (lora.lora_B, slice(i * width_b, (i + 1) * width_b))
    with torch.no_grad():
        for key, (param, rows) in live.items():
            param[rows] = to_torch(tensors[key], dtype)
    return live


def _inputs(case: ModelCase) -> dict:
    import torch

    kwargs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
    if case.attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(case.attention_mask, dtype=np.int64))
    if case.position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(case.position_ids, dtype=np.int64))
    return kwargs


def model_switch_adapters(case: ModelCase) -> dict[str, np.ndarray]:
    """Two adapters on one GPT-2 (``add_adapter`` "reflora" and "second"), eval logits with
    ``set_active_adapters("reflora")``, then ``"second"``, then ``"reflora"`` again."""
    import dataclasses

    import torch

    from conformance.drivers.peft_bridge import TORCH_DTYPES

    model, _, _ = _build_model(case)
    second_case = dataclasses.replace(case, lora=case.second_lora, adapter=case.second_adapter)
    second_config, second_plan = adapters_lora_config(second_case)
    model.add_adapter("second", config=second_config)
    model.to(TORCH_DTYPES[case.dtype])
    _copy_adapter(model, second_plan, "second", case.second_adapter, case.config, case.dtype)
    model.eval()
    inputs = _inputs(case)
    with torch.no_grad():
        model.set_active_adapters(ADAPTER)
        first = to_numpy(model(**inputs).logits)
        model.set_active_adapters("second")
        second = to_numpy(model(**inputs).logits)
        model.set_active_adapters(ADAPTER)
        first_again = to_numpy(model(**inputs).logits)
    return {"first": first, "second": second, "first_again": first_again}


def model_forward_backward(case: ModelCase) -> dict:
    import torch

    from conformance.drivers.peft_bridge import hf_causal_lm_loss

    model, _, live = _build_model(case)
    # train mode only to apply the injected keep-masks (HF's own dropouts are configured to 0); else eval mode
    model.train(bool(case.dropout_masks) and case.lora.lora_dropout > 0)
    kwargs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
    if case.attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(case.attention_mask, dtype=np.int64))
    if case.position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(case.position_ids, dtype=np.int64))
    logits = model(**kwargs).logits
    out: dict = {"logits": to_numpy(logits), "loss": None}
    if case.labels is not None:
        loss = hf_causal_lm_loss(logits, torch.from_numpy(np.asarray(case.labels, dtype=np.int64)))
        out["loss"] = np.asarray(loss.item())
        objective = loss
    else:
        objective = (logits * to_torch(case.dlogits, case.dtype)).sum()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = dict(zip(trainable, torch.autograd.grad(objective, list(trainable.values()), allow_unused=True)))
    by_param = {id(p): n for n, p in trainable.items()}
    out["grads"] = {}
    out["trainable"] = {}
    mapped = set()
    for key, (param, rows) in live.items():
        param_name = by_param.get(id(param))
        if param_name is None:
            continue  # the library does not train it: no gradient, not in ``trainable``
        grad = grads[param_name]
        out["grads"][key] = to_numpy(torch.zeros_like(param[rows]) if grad is None else grad[rows])
        out["trainable"][key] = int(param[rows].numel())
        mapped.add(param_name)
    for param_name in set(trainable) - mapped:  # anything else it trains is reported under its own name
        out["trainable"][param_name] = int(trainable[param_name].numel())
    return out


# ---------------------------------------------------------------------------------------------
# advanced level (docs/advanced-semantics.md): several named adapters on GPT-2 (an AdaptersCase)
# ---------------------------------------------------------------------------------------------


def _advanced_model(case: AdaptersCase):
    """GPT-2 with ``case.params``, ``adapters.init``, every adapter of ``case.adapters`` added in order
    (``role_config``) with its tensors copied in. Returns ``(model, plans, live)``: plans maps adapter -> reflora
    plan, live maps ``"<adapter>:<file key>"`` (reflora.qualified_key) -> (parameter, row slice)."""
    import adapters

    from conformance.drivers.peft_bridge import TORCH_DTYPES, build_hf_model
    from reflora.adapters import qualified_key

    configs = {}
    for adapter_name, (lora, _) in case.adapters.items():
        if lora.use_dora:
            raise NotSupported(f"{name}: DoRA on GPT-2 ({capabilities.notes['dora']})")
        if lora.lora_bias:
            raise NotSupported(f"{name}: {capabilities.notes['lora_bias']}")
        if lora.use_rslora or lora.rank_pattern or lora.alpha_pattern or lora.bias != "none":
            raise NotSupported(f"{name}: rsLoRA, rank/alpha patterns and trained biases have no LoRAConfig field")
        configs[adapter_name] = role_config(case.config, lora)
    model = build_hf_model(case.config, case.params, case.dtype)
    adapters.init(model)
    for adapter_name, (config, _) in configs.items():
        model.add_adapter(adapter_name, config=config)
    model.to(TORCH_DTYPES[case.dtype])  # the new LoRA tensors are created in float32
    live = {}
    for adapter_name, (_, plan) in configs.items():
        copied = _copy_adapter(model, plan, adapter_name, case.adapters[adapter_name][1], case.config, case.dtype)
        live.update({qualified_key(adapter_name, key): value for key, value in copied.items()})
    return model, {n: plan for n, (_, plan) in configs.items()}, live


def _targeted(case: AdaptersCase, model) -> dict[str, np.ndarray]:
    """HF key -> weight (HF Conv1D layout (in, out): LoRALinear keeps the Conv1D's own tensor) or bias of every
    targeted module (``targeted_keys``)."""
    state = model.state_dict()
    return {key: to_numpy(state[key]) for key in targeted_keys(case)}


def model_merge(case: AdaptersCase) -> dict:
    """One adapter: eval ``logits`` with it active, ``model.merge_adapter(name)`` (``merged_logits``, ``merged``:
    the targeted weights and biases), then ``model.reset_adapter()`` (``unmerged``). adapters has no safe merge
    and a LoRA layer holds one merged adapter at a time: several adapters are refused."""
    import torch

    if case.safe:
        raise NotSupported(f"{name}: {capabilities.notes['model_merge']}")
    if len(case.adapters) != 1:
        raise NotSupported(f"{name}: {capabilities.notes['model_merge']}")
    model, _, _ = _advanced_model(case)
    (adapter_name,) = case.adapters
    model.set_active_adapters(adapter_name)
    model.eval()
    inputs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
    with torch.no_grad():
        logits = to_numpy(model(**inputs).logits)
        model.merge_adapter(adapter_name)
        merged_logits, merged = to_numpy(model(**inputs).logits), _targeted(case, model)
        model.reset_adapter()
        unmerged = _targeted(case, model)
    return {"logits": logits, "merged_logits": merged_logits, "merged": merged, "unmerged": unmerged}


def merge_and_unload(case: AdaptersCase, folder: Path) -> None:
    """One adapter: ``model.merge_adapter(name)``, ``model.delete_adapter(name)`` (the LoRA modules go, the merged
    weights stay), then ``save_pretrained(folder)``: HF's GPT-2 format. No adapter is active at the delete:
    deleting an active merged adapter raises KeyError (docs/findings.md)."""
    import torch

    if len(case.adapters) != 1:
        raise NotSupported(f"{name}: {capabilities.notes['model_merge']}")
    model, _, _ = _advanced_model(case)
    (adapter_name,) = case.adapters
    with torch.no_grad():
        model.merge_adapter(adapter_name)
        model.delete_adapter(adapter_name)
    model.save_pretrained(str(folder))


def model_adapters(case: AdaptersCase) -> dict:
    """Every adapter added; ``case.active`` as ``set_active_adapters`` of the adapter, of ``Average(*names,
    weights=[n] * n, normalize_weights=False)`` (Σ δ_i, see the module docstring) or of ``None`` (``[]``); or
    ``case.adapter_names`` as ``MultiTask(*names)`` with ``task_ids`` in the forward. The keep-masks go into each
    adapter's own LoRA dropout (train mode). Returns ``logits`` (B, T, V), ``loss`` and ``grads`` of ``case.wrt``
    (qualified keys). A composition of several adapters needs the same modules in each and no c_attn
    (LoRAMergedLinear takes one adapter)."""
    import torch
    from adapters.composition import Average, MultiTask

    from conformance.drivers.peft_bridge import MaskDropout, hf_causal_lm_loss
    from reflora.adapters import BASE_ADAPTER

    if case.adapter_names is not None and BASE_ADAPTER in case.adapter_names:
        raise NotSupported(f"{name}: {capabilities.notes['mixed_batch']}")
    model, plans, live = _advanced_model(case)
    if case.adapter_names is not None:
        acting = [n for n in case.adapters if n in case.adapter_names]
    else:
        acting = list(case.active or [])
    if len(acting) > 1:
        module_sets = {frozenset(plans[n]) for n in acting}
        if len(module_sets) > 1 or any(plans[n][m].kind == "attn.c_attn" for n in acting for m in plans[n]):
            note = "mixed_batch" if case.adapter_names is not None else "multi_adapter"
            raise NotSupported(f"{name}: {capabilities.notes[note]}")
    kwargs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
    if case.adapter_names is not None and len(acting) > 1:
        model.set_active_adapters(MultiTask(*acting))
        kwargs["task_ids"] = list(case.adapter_names)
    elif len(acting) > 1:
        n = float(len(acting))
        model.set_active_adapters(Average(*acting, weights=[n] * len(acting), normalize_weights=False))
    else:
        model.set_active_adapters(acting[0] if acting else None)
    modules = dict(model.named_modules())
    for adapter_name, masks in (case.dropout_masks or {}).items():
        p = case.adapters[adapter_name][0].lora_dropout
        for module_name, mask in masks.items():
            modules[module_name].loras[adapter_name].lora_dropout = MaskDropout(to_torch(mask, case.dtype), p)
    model.train(bool(case.dropout_masks))  # HF's own dropouts are 0 (build_hf_model): only LoRA's act
    logits = model(**kwargs).logits
    out: dict = {"logits": to_numpy(logits)}
    if case.labels is None:
        return out
    loss = hf_causal_lm_loss(logits, torch.from_numpy(np.asarray(case.labels, dtype=np.int64)))
    out["loss"] = np.asarray(loss.item())
    out["grads"] = {}
    if not case.wrt:  # every adapter disabled: nothing to differentiate
        return out
    params = list({id(live[k][0]): live[k][0] for k in case.wrt}.values())
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True)))
    for key in case.wrt:
        param, rows = live[key]
        grad = grads[id(param)]
        out["grads"][key] = to_numpy(torch.zeros_like(param[rows]) if grad is None else grad[rows])
    return out


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")
