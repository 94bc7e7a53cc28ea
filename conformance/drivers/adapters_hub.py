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
    refuse_unsupported_model,
    to_numpy,
    to_torch,
    torch_layer_results,
    trainable_names,
)
from conformance.protocol import Capabilities, LayerCase, ModelCase, NotSupported

name = "adapters"
ADAPTER = "reflora"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear", "conv1d"}),
    model_level=True,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=True,
    dtypes=frozenset({"float64", "float32", "bfloat16"}),
    target_modules_list=True,
    target_modules_regex=False,
    layers_to_transform=True,
    rank_alpha_pattern=False,
    position_ids=True,
    padding=True,
    merge=True,
    layer_dora=True,  # LoRAConfig(use_dora=True) on LoRALinearTorch (a known deviation: docs/findings.md)
    adapter_files=False,
    adapter_switching=True,
    notes={
        "rslora": "LoRA scales by alpha / r only",
        "layer_dora_full_norm": "one DoRA form only; it is checked as layer.dora (its norm is neither PEFT's nor detached: docs/findings.md)",
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
        "model_merge": "merge_adapter / reset_adapter exist and are checked at layer level (layer.merge.*, "
        "layer.unmerge.*); the advanced cases target full-matrix c_attn and attn.c_proj, which adapters cannot adapt",
        "merge_and_unload": "no merge_and_unload: merge_adapter merges in place and the adapter modules stay",
        "dora": "LoRAConfig(use_dora=True) raises in add_adapter on GPT-2's Conv1D (docs/findings.md, adapters DoRA 1); "
        "on the linear layout it is driven by dora_forward_backward / dora_merge",
        "init_methods": "init_weights='lora' is PEFT's True, but the advanced cases target c_attn / attn.c_proj (not "
        "adaptable); 'bert' is N(0, 0.02), not PEFT's 'gaussian'; no PiSSA / OLoRA",
        "multi_adapter": "several LoRAs compose as Stack (sequential: each LoRA reads the previous one's output), "
        "Parallel or Average (a weighted mean), not as a sum of deltas",
        "mixed_batch": "BatchSplit splits the batch into contiguous blocks; no adapter name per row",
        "weighted_combinations": "average_adapter's combine_strategy is 'linear' (a weighted average of A and of B), "
        "'lora_linear_only_negate_b' or 'lora_delta_w_svd': none is PEFT's cat / linear / svd",
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


def dora_merge(case: LayerCase, magnitude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``merge_adapter`` / ``reset_adapter`` with DoRA: ``merged_weight``, ``merged_y``, ``unmerged_weight``."""
    import torch

    refuse_unsupported(case, capabilities, name)
    layer, lora = _build_layer(case, dora=True)
    _load_magnitude(case, lora, magnitude)
    layer.eval()
    layer.merge_adapter(ADAPTER)
    with torch.no_grad():
        merged_weight = to_numpy(layer.weight)
        merged_y = to_numpy(layer(to_torch(case.x, case.dtype)))
    layer.reset_adapter()
    return {"merged_weight": merged_weight, "merged_y": merged_y, "unmerged_weight": to_numpy(layer.weight)}


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    import torch

    refuse_unsupported(case, capabilities, name)
    layer, _ = _build_layer(case)
    layer.eval()
    layer.merge_adapter(ADAPTER)
    with torch.no_grad():
        merged_weight = to_numpy(layer.weight)
        merged_y = to_numpy(layer(to_torch(case.x, case.dtype)))
    layer.reset_adapter()
    return {"merged_weight": merged_weight, "merged_y": merged_y, "unmerged_weight": to_numpy(layer.weight)}


# ---------------------------------------------------------------------------------------------
# model level: HF GPT-2 (transformers 4.57) + adapters.init + add_adapter(LoRAConfig)
# ---------------------------------------------------------------------------------------------

KIND_TO_ROLE = {"attn.c_attn": "selfattn_lora", "mlp.c_fc": "intermediate_lora", "mlp.c_proj": "output_lora"}


def adapters_lora_config(case: ModelCase):
    """reflora's LoraConfig as an AdapterHub ``LoRAConfig``, or NotSupported when it has no equivalent."""
    from adapters import LoRAConfig

    from reflora.targets import plan_lora

    refuse_unsupported_model(case, capabilities, name)
    lora = case.lora
    if isinstance(lora.target_modules, str):
        raise NotSupported(f"{name}: {capabilities.notes['target_modules_regex']}")
    plan = plan_lora(case.config, lora)
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
    leave_out = [i for i in range(case.config.n_layer) if i not in kinds_by_layer]
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


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")
