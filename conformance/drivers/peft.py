"""The ``peft`` driver: Hugging Face PEFT's LoRA on torch, on the CPU.

* Layer level: PEFT's ``lora.Linear`` around an ``nn.Linear`` (linear layout) or around transformers'
  ``Conv1D`` (conv1d layout; PEFT sets ``fan_in_fan_out=True`` for it). The layer is wrapped in a one-module
  holder and adapted with PEFT's public ``inject_adapter_in_model``, so PEFT itself decides what trains (its
  ``bias`` modes included): the driver reports what PEFT marks ``requires_grad``.
  The same layer serves DoRA merge / unmerge (``layer_merge`` with a magnitude: PEFT's ``merge()`` /
  ``unmerge()``), PEFT's own inits (``layer_init``: ``init_lora_weights`` True / "gaussian" / False, torch seeded
  with the case's seed) and several adapters (``layer_adapters``: one ``inject_adapter_in_model`` per adapter
  name, ``set_adapter([...])``, ``enable_adapters(False)``, the forward's ``adapter_names=``), in float64,
  float32, bfloat16 and float16.
* Model level: transformers ``GPT2LMHeadModel`` + ``get_peft_model`` (see ``peft_bridge``), adapter files
  with ``save_pretrained`` / ``PeftModel.from_pretrained``, adapters switched with ``add_adapter`` /
  ``set_adapter``.
* Dropout: PEFT's ``lora_dropout['default']`` module (an ``nn.Dropout``) is replaced by one that applies the
  reference's keep-mask with the same 1/(1 − p) scaling ``nn.Dropout`` uses: the mask is injected, the math
  stays PEFT's (where the dropout sits and what it touches).
* Not supported: per-slice q/k/v LoRA (PEFT adapts a whole fused ``c_attn`` with one A and one B).
* Loss: HF's causal LM loss formula computed in the logits' dtype (``peft_bridge.hf_causal_lm_loss``);
  in bfloat16, as transformers does, in float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

try:
    import peft
    import torch
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the peft driver needs torch, transformers and peft ({exc}); install them with "
        "pip install 'reflora[peft]' -c constraints.txt"
    ) from exc

from conformance.drivers import peft_bridge as bridge
from conformance.protocol import (
    COMBINED,
    AdaptersCase,
    Capabilities,
    LayerAdaptersCase,
    LayerCase,
    LayerInitCase,
    ModelCase,
    NotSupported,
    targeted_keys,
)
from reflora.targets import plan_lora
from reflora.weighted import DARE_TYPES, mask_keys

PER_SLICE_NOTE = (
    "PEFT has no per-slice q/k/v LoRA: on a fused c_attn it adapts the whole (in, 3·n_embd) projection with one "
    "A and one B (loralib's MergedLinear(enable_lora=[...]) has no PEFT equivalent)"
)


class _Holder(torch.nn.Module):
    """A model with one module, ``layer``, for PEFT's injection at layer level."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


# the layer level also runs in float16 (layer.float16.*); torch runs float16 matmuls on the CPU
_DTYPES = {**bridge.TORCH_DTYPES, "float16": torch.float16}
# conformance.init_laws law -> PEFT's init_lora_weights (tuners/lora/layer.py, LoraLayer.reset_lora_parameters)
LAYER_INITS = {"kaiming_uniform": True, "gaussian": "gaussian", "peft_false": False}


def _t(array, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float64)).to(_DTYPES[dtype])


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy().copy()  # a copy: a float64 tensor would share memory


# layer-level parameter names (inside the holder) -> protocol result names
_LAYER_NAMES = {
    "layer.lora_A.default.weight": "lora_A",
    "layer.lora_B.default.weight": "lora_B",
    "layer.base_layer.bias": "bias",
    "layer.base_layer.weight": "weight",
    "layer.lora_B.default.bias": "lora_B_bias",  # lora_bias=True
    "layer.lora_magnitude_vector.default.weight": "magnitude",  # use_dora=True
}


class PeftDriver:
    name = "peft"
    capabilities = Capabilities(
        layer_layouts=frozenset({"linear", "conv1d"}),
        model_level=True,
        rslora=True,
        dropout_mask_injection=True,
        bias_modes=frozenset({"none", "all", "lora_only"}),
        per_slice_qkv=False,
        dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
        target_modules_list=True,
        target_modules_regex=True,
        layers_to_transform=True,
        rank_alpha_pattern=True,
        target_modules_all_linear=True,
        exclude_modules=True,
        runtime_scaling=True,
        embedding_lora=True,
        trainable_tokens=True,
        modules_to_save=True,
        ensure_weight_tying=True,
        position_ids=True,
        padding=True,
        merge=True,
        adapter_files=True,
        adapter_switching=True,
        model_merge=True,
        merge_and_unload=True,
        dora=True,
        lora_bias=True,
        layer_lora_bias=True,
        layer_dora=True,
        layer_dora_merge=True,
        layer_init_methods=frozenset(LAYER_INITS),
        layer_multi_adapter=True,
        layer_mixed_batch=True,
        init_methods=frozenset({"true", "gaussian", "false", "pissa", "olora", "orthogonal", "pissa_niter"}),
        multi_adapter=True,
        mixed_batch=True,
        weighted_combinations=frozenset(
            {"cat", "linear", "svd", "ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd", *DARE_TYPES}
        ),
        notes={
            "per_slice_qkv": PER_SLICE_NOTE,
            "layer_dora_full_norm": "PEFT's DoRA always detaches the weight norm (tuners/lora/dora.py, "
            "DoraLinearLayer.forward: weight_norm = weight_norm.detach(), as the DoRA paper §4.3 suggests)",
            "init_methods": "PiSSA and OLoRA run in float32 (PEFT refuses float64 for them)",
            "layer_init_methods": "PEFT's random inits are init_lora_weights=True (kaiming_uniform), 'gaussian' and "
            "False (peft_false) (LoraLayer.reset_lora_parameters); the other laws of conformance.init_laws are other "
            "libraries' inits (PEFT's LoRA has no he_uniform, BERT or VeRA-style init)",
            "dropout_mask_injection": "lora_dropout['default'] is replaced by x·mask/(1 − p), what nn.Dropout "
            "computes for that mask",
            "weighted_combinations": "DARE's keep-masks are injected: torch.bernoulli, which merge_utils."
            "random_pruning calls once per task tensor, returns the case's masks in PEFT's call order",
        },
    )

    def versions(self) -> dict[str, str]:
        return {
            "candidate": f"peft {peft.__version__}",
            "framework": f"torch {torch.__version__}",
            "transformers": transformers.__version__,
        }

    # ------------------------------------------------------------------ layer level

    @staticmethod
    def _base_layer(case: LayerCase | LayerInitCase | LayerAdaptersCase) -> torch.nn.Module:
        """The base layer with the case's weight and bias: ``nn.Linear`` (linear) or transformers' ``Conv1D``."""
        dtype = _DTYPES[case.dtype]
        in_f = case.x.shape[-1]
        out_f = case.weight.shape[0] if case.layout == "linear" else case.weight.shape[1]
        if case.layout == "linear":
            base = torch.nn.Linear(in_f, out_f, bias=case.bias is not None)
        else:
            if case.bias is None:
                raise NotSupported("transformers' Conv1D always has a bias")
            base = Conv1D(out_f, in_f)  # weight (in, out)
        base.to(dtype)  # before copying: float64 values must not pass through float32 parameters
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(case.weight))
            if case.bias is not None:
                base.bias.copy_(torch.from_numpy(case.bias))
        return base

    def _layer(self, case: LayerCase) -> _Holder:
        if case.qkv_slices:
            raise NotSupported(PER_SLICE_NOTE)
        if case.dora_norm != "detached":
            raise NotSupported("PEFT's DoRA always detaches the weight norm (lora/dora.py: weight_norm.detach())")
        dtype = _DTYPES[case.dtype]
        holder = _Holder(self._base_layer(case)).to(dtype)
        bias_mode = "lora_only" if case.bias_trainable else "none"
        config = PeftLoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.lora_dropout,
                                use_rslora=case.use_rslora, bias=bias_mode, target_modules=["layer"],
                                fan_in_fan_out=case.layout == "conv1d", lora_bias=case.lora_bias_B is not None,
                                use_dora=case.magnitude is not None)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holder = inject_adapter_in_model(config, holder)
        holder.to(dtype)
        layer = holder.layer
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.from_numpy(case.lora_A[None]))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(case.lora_B[None]))
            if case.lora_bias_B is not None:  # layer.lora_bias.*
                layer.lora_B["default"].bias.copy_(torch.from_numpy(case.lora_bias_B))
            if case.magnitude is not None:  # layer.dora.*: PEFT set m = ‖W + sBA‖ at injection; the case's m
                layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(case.magnitude))
        if case.keep_mask is not None:
            layer.lora_dropout["default"] = bridge.MaskDropout(_t(case.keep_mask, case.dtype), case.lora_dropout)
            holder.train()
        else:
            holder.eval()
        return holder

    def layer_forward_backward(self, case: LayerCase) -> dict:
        holder = self._layer(case)
        trainable = {name: p for name, p in holder.named_parameters() if p.requires_grad}
        x = _t(case.x, case.dtype).requires_grad_(True)
        y = holder.layer(x)
        grads = torch.autograd.grad((y * _t(case.dy, case.dtype)).sum(), [x, *trainable.values()], allow_unused=True)
        out = {"y": _np(y), "dx": _np(grads[0])}
        for name, grad in zip(trainable, grads[1:], strict=True):
            out[_LAYER_NAMES.get(name, name)] = _np(grad) if grad is not None else np.zeros(trainable[name].shape)
        out["trainable"] = np.array([_LAYER_NAMES.get(name, name) for name in trainable])
        return out

    def layer_merge(self, case: LayerCase) -> dict:
        holder = self._layer(case)
        layer = holder.layer
        with torch.no_grad():
            layer.merge()
            merged_weight = _np(layer.base_layer.weight)
            merged_y = _np(layer(_t(case.x, case.dtype)))
            layer.unmerge()
            unmerged_weight = _np(layer.base_layer.weight)
        return {"merged_weight": merged_weight, "merged_y": merged_y, "unmerged_weight": unmerged_weight}

    def layer_init(self, case: LayerInitCase) -> dict:
        """PEFT's own init (``init_lora_weights`` of the law, torch seeded with ``case.seed`` right before the
        injection that draws it); with ``use_dora`` PEFT also sets the magnitude at injection."""
        if case.init not in LAYER_INITS:
            raise NotSupported(f"init law {case.init!r}: {self.capabilities.notes['layer_init_methods']}")
        dtype = _DTYPES[case.dtype]
        holder = _Holder(self._base_layer(case)).to(dtype)
        config = PeftLoraConfig(r=case.r, lora_alpha=case.lora_alpha, use_rslora=case.use_rslora,
                                target_modules=["layer"], fan_in_fan_out=case.layout == "conv1d",
                                use_dora=case.use_dora, init_lora_weights=LAYER_INITS[case.init])  # fmt: skip
        torch.manual_seed(case.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holder = inject_adapter_in_model(config, holder)
        holder.to(dtype)
        holder.eval()
        layer = holder.layer
        with torch.no_grad():
            out = {"lora_A": _np(layer.lora_A["default"].weight), "lora_B": _np(layer.lora_B["default"].weight),
                   "y": _np(layer(_t(case.x, case.dtype))), "weight": _np(layer.base_layer.weight)}  # fmt: skip
            if case.use_dora:
                out["magnitude"] = _np(layer.lora_magnitude_vector["default"].weight)
        return out

    def layer_adapters(self, case: LayerAdaptersCase) -> dict:
        """Every adapter injected under its name (``inject_adapter_in_model(..., adapter_name=name)``, in dict
        order), A and B copied in; ``set_adapter(case.active)`` (a list: several active), ``enable_adapters(False)``
        for ``[]``, or the forward's ``adapter_names=`` (PEFT's mixed batch, ``"__base__"`` rows)."""
        dtype = _DTYPES[case.dtype]
        holder = _Holder(self._base_layer(case)).to(dtype)
        for name, a in case.adapters.items():
            config = PeftLoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], use_rslora=a["use_rslora"],
                                    target_modules=["layer"], fan_in_fan_out=case.layout == "conv1d")  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                holder = inject_adapter_in_model(config, holder, adapter_name=name)
        holder.to(dtype)
        holder.eval()
        layer = holder.layer
        with torch.no_grad():
            for name, a in case.adapters.items():
                layer.lora_A[name].weight.copy_(torch.from_numpy(a["lora_A"]))
                layer.lora_B[name].weight.copy_(torch.from_numpy(a["lora_B"]))
        kwargs = {}
        if case.adapter_names is not None:
            acting = [name for name in case.adapters if name in case.adapter_names]
            layer.set_adapter(acting)
            kwargs["adapter_names"] = list(case.adapter_names)
        elif case.active:
            acting = list(case.active)
            layer.set_adapter(acting)
        else:
            acting = []
            layer.enable_adapters(False)
        params = {}
        for name in acting:
            params[f"{name}.lora_A"], params[f"{name}.lora_B"] = layer.lora_A[name].weight, layer.lora_B[name].weight
        x = _t(case.x, case.dtype).requires_grad_(True)
        y = layer(x, **kwargs)
        grads = torch.autograd.grad((y * _t(case.dy, case.dtype)).sum(), [x, *params.values()], allow_unused=True)
        out = {"y": _np(y), "dx": _np(grads[0]), "grads": {}}
        # every acting adapter is in PEFT's forward (set_adapter / a row of adapter_names), so a None gradient means
        # PEFT dropped it: leave the key out and the check reports it missing (no zeros standing in)
        for key, grad in zip(params, grads[1:], strict=True):
            if grad is not None:
                out["grads"][key] = _np(grad)
        return out

    # ------------------------------------------------------------------ model level

    def _model(self, case: ModelCase):
        if case.lora.qkv_slices is not None:
            raise NotSupported(PER_SLICE_NOTE)
        model = bridge.build_peft_model(case.config, case.params, case.lora, case.adapter, case.dtype)
        if case.scale_ops:
            bridge.apply_scale_ops(model, case.scale_ops)
        if case.dropout_masks:
            bridge.inject_dropout_masks(model, case.dropout_masks, case.lora.lora_dropout, case.dtype)
        else:
            model.eval()
        return model

    def _inputs(self, case: ModelCase) -> dict:
        kwargs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
        if case.attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(np.asarray(case.attention_mask, dtype=np.int64))
        if case.position_ids is not None:
            kwargs["position_ids"] = torch.from_numpy(np.asarray(case.position_ids, dtype=np.int64))
        return kwargs

    def model_forward_backward(self, case: ModelCase) -> dict:
        model = self._model(case)
        trainable = bridge.trainable_parameters(model)
        logits = model(**self._inputs(case)).logits
        out: dict = {"logits": _np(logits)}
        if case.labels is not None:
            loss_logits = logits.float() if case.dtype == "bfloat16" else logits
            objective = bridge.hf_causal_lm_loss(loss_logits, torch.from_numpy(np.asarray(case.labels, dtype=np.int64)))
            out["loss"] = _np(objective)
        else:
            objective = (logits * _t(case.dlogits, case.dtype)).sum()
        grads = torch.autograd.grad(objective, list(trainable.values()), allow_unused=True)
        out["grads"] = {
            key: _np(g) if g is not None else np.zeros(tuple(p.shape))
            for (key, p), g in zip(trainable.items(), grads, strict=True)
        }
        out["trainable"] = {key: int(p.numel()) for key, p in trainable.items()}
        return out

    def save_adapter(self, case: ModelCase, folder: Path) -> None:
        model = self._model(case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no base model on the hub to record
            model.save_pretrained(str(folder))

    def load_adapter_logits(self, case: ModelCase, folder: Path) -> np.ndarray:
        base = bridge.build_hf_model(case.config, case.params, case.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, str(folder))
        model.eval()
        with torch.no_grad():
            return _np(model(**self._inputs(case)).logits)

    def model_switch_adapters(self, case: ModelCase) -> dict:
        model = self._model(case)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter("second", PeftLoraConfig(**case.second_lora.to_peft_dict()))
        named = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in case.second_adapter.items():
                head, _, tail = key.rpartition(".")
                named[f"{head}.second.{tail}"].copy_(torch.from_numpy(value))
        model.to(bridge.TORCH_DTYPES[case.dtype])
        inputs = self._inputs(case)
        with torch.no_grad():
            first = _np(model(**inputs).logits)
            model.set_adapter("second")
            second = _np(model(**inputs).logits)
            model.set_adapter("default")
            first_again = _np(model(**inputs).logits)
        return {"first": first, "second": second, "first_again": first_again}

    # ------------------------------------------------------------------ the advanced methods (conformance.protocol.Driver)

    def model_adapters(self, case: AdaptersCase) -> dict:
        result = bridge.run_peft_adapters(
            case.config, case.params, case.adapters, case.input_ids, active=case.active,
            adapter_names=case.adapter_names, labels=case.labels, dropout_masks=case.dropout_masks,
            wrt=case.wrt, dtype=case.dtype,
        )  # fmt: skip
        out = {k: v for k, v in result.items() if not k.startswith("grad/")}
        out["grads"] = {k.removeprefix("grad/"): v for k, v in result.items() if k.startswith("grad/")}
        return out

    def _adapters_model(self, case: AdaptersCase):
        model = bridge.build_peft_adapters(case.config, case.params, case.adapters, case.dtype)
        model.eval()
        model.base_model.set_adapter(list(case.adapters))
        return model

    def _targeted(self, case: AdaptersCase, model) -> dict[str, np.ndarray]:
        plans = {}
        for lora, _ in case.adapters.values():
            plans.update(plan_lora(case.config, lora))
        named = dict(model.named_parameters())
        return {key: _np(named[bridge.live_base_name(key, plans)]) for key in targeted_keys(case)}

    def model_merge(self, case: AdaptersCase) -> dict:
        model = self._adapters_model(case)
        names = list(case.adapters)
        inputs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
        with torch.no_grad():
            if case.safe:
                try:
                    model.base_model.merge_adapter(adapter_names=names, safe_merge=True)
                    refused = False
                except ValueError:
                    refused = True
                return {"refused": refused, "after": self._targeted(case, model)}
            logits = _np(model(**inputs).logits)
            model.base_model.merge_adapter(adapter_names=names)
            merged_logits, merged = _np(model(**inputs).logits), self._targeted(case, model)
            model.base_model.unmerge_adapter()
            unmerged = self._targeted(case, model)
        return {"logits": logits, "merged_logits": merged_logits, "merged": merged, "unmerged": unmerged}

    def merge_and_unload(self, case: AdaptersCase, folder: Path) -> None:
        model = self._adapters_model(case)
        with torch.no_grad():
            plain = model.merge_and_unload()
        plain.save_pretrained(str(folder))

    def init_adapter(self, case: AdaptersCase) -> dict:
        from peft import get_peft_model, get_peft_model_state_dict

        base = bridge.build_hf_model(case.config, case.params, case.dtype)
        torch.manual_seed(case.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, PeftLoraConfig(**case.init_lora.to_peft_dict()), autocast_adapter_dtype=False)
        model.eval()
        plan = plan_lora(case.config, case.init_lora)
        named = dict(model.named_parameters())
        with torch.no_grad():
            logits = _np(model(input_ids=torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))).logits)
        return {
            "adapter": {k: _np(v) for k, v in get_peft_model_state_dict(model).items()},
            "params": {f"{m}.weight": _np(named[bridge.live_base_name(f"{m}.weight", plan)]) for m in plan},
            "logits": logits,
        }

    def weighted_adapter(self, case: AdaptersCase) -> dict:
        model = bridge.build_peft_adapters(case.config, case.params, case.adapters, case.dtype)
        c = case.combination
        masks = _dare_masks_in_peft_order(model, case) if case.keep_masks else None
        with warnings.catch_warnings(), _injected_bernoulli(masks):
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(list(c["names"]), list(c["weights"]), COMBINED,
                                       combination_type=c["combination_type"], svd_rank=c["svd_rank"],
                                       density=c.get("density"),
                                       majority_sign_method=c.get("majority_sign_method", "total"))  # fmt: skip
        model.eval()
        model.base_model.set_adapter(COMBINED)
        deltas, bias_deltas = {}, {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if not hasattr(module, "lora_A") or COMBINED not in module.lora_A:
                    continue
                module_name = name.removeprefix(bridge.ADAPTER_PREFIX)
                delta = module.get_delta_weight(COMBINED)
                deltas[module_name] = _np(delta.T if module.fan_in_fan_out else delta)  # (out, in)
                if module.lora_B[COMBINED].bias is not None:
                    bias_deltas[module_name] = _np(module.lora_B[COMBINED].bias * module.scaling[COMBINED])
            inputs = {"input_ids": torch.from_numpy(np.asarray(case.input_ids, dtype=np.int64))}
            logits = _np(model(**inputs).logits)
        out = {"deltas": deltas, "logits": logits}
        if bias_deltas:
            out["bias_deltas"] = bias_deltas
        return out


def _dare_masks_in_peft_order(model, case: AdaptersCase) -> list[torch.Tensor]:
    """``case.keep_masks`` as the list of tensors PEFT's ``random_pruning`` draws, in its call order:
    ``add_weighted_adapter`` walks ``model.named_modules()`` (LoRA layers holding a source), and per module
    ``_generalized_task_arithmetic_weighted_adapter`` prunes the A_i of the sources present (in ``names``
    order) then their B_i, while ``_svd_generalized_task_arithmetic_weighted_adapter`` prunes each
    ``get_delta_weight`` ΔW_i, which for a Conv1D (``fan_in_fan_out``) or an Embedding is (in, out): the
    transpose of the reference's (out, in) mask."""
    c = case.combination
    names = list(c["names"])
    plans = {n: plan_lora(case.config, case.adapters[n][0]) for n in names}
    out = []
    for name, module in model.named_modules():
        if "lora_" in name or not hasattr(module, "lora_A"):
            continue
        module_name = name.removeprefix(bridge.ADAPTER_PREFIX)
        present = [n for n in names if n in module.lora_A or n in module.lora_embedding_A]
        if not present:
            continue
        keys = mask_keys(c["combination_type"], plans[present[0]][module_name])
        embedding = any(n in module.lora_embedding_A for n in present)
        transposed = len(keys) == 1 and (getattr(module, "fan_in_fan_out", False) or embedding)
        for key in keys:
            masks = case.keep_masks[key]
            if len(masks) != len(present):
                raise ValueError(f"keep_masks[{key!r}]: {len(masks)} masks, PEFT prunes {len(present)} sources")
            out += [torch.from_numpy(np.ascontiguousarray(m.T if transposed else m)) for m in masks]
    return out


class _injected_bernoulli:
    """While active, ``torch.bernoulli(p)`` returns the next of ``masks`` (None: torch's own), after checking
    that its shape is p's and that p is constant (PEFT's ``torch.full_like(tensor, density)``): a wrong order
    or layout fails loudly. On exit every mask must have been used."""

    def __init__(self, masks: list[torch.Tensor] | None):
        self.masks = None if masks is None else list(masks)

    def __enter__(self):
        if self.masks is None:
            return self
        self.original, self.used = torch.bernoulli, 0

        def bernoulli(p, *args, **kwargs):
            if self.used >= len(self.masks):
                raise AssertionError(f"PEFT drew mask {self.used + 1}, the case has {len(self.masks)}")
            mask = self.masks[self.used]
            if tuple(p.shape) != tuple(mask.shape):
                raise AssertionError(f"PEFT's mask {self.used} has shape {tuple(p.shape)}, the case's "
                                     f"{tuple(mask.shape)}: the call order or layout differs")  # fmt: skip
            if p.numel() and not bool((p == p.reshape(-1)[0]).all()):
                raise AssertionError("torch.bernoulli called with a non-constant probability: not PEFT's DARE")
            self.used += 1
            return mask.to(dtype=p.dtype, device=p.device)

        torch.bernoulli = bernoulli
        return self

    def __exit__(self, kind, value, traceback):
        if self.masks is None:
            return False
        torch.bernoulli = self.original
        if kind is None and self.used != len(self.masks):
            raise AssertionError(f"PEFT drew {self.used} DARE masks, the case has {len(self.masks)}")
        return False


driver = PeftDriver()
