"""Driver for Apple's mlx-lm 0.32.2 on MLX 0.32.4 (the CPU build on Linux): layer level and GPT-2 model level.

Mapping (mlx_lm/tuner/lora.py, mlx_lm/tuner/utils.py, mlx_lm/models/gpt2.py):

* ``LoRALinear.from_base(nn.Linear, r, dropout, scale)``: ``y = linear(x) + (scale · (dropout(x) @ lora_a) @ lora_b)``
  with ``lora_a`` (in, r) = Aᵀ and ``lora_b`` (r, out) = Bᵀ; the base ``nn.Linear`` stores weight (out, in).
* ``scale`` is an *absolute* multiplier (mlx-lm's LoRA config takes ``scale``, and refuses ``alpha``): the driver
  passes the reference's ``lora_alpha / r``. rsLoRA has no switch of its own (it would be another number passed
  the same way), so it is not claimed.
* LoRA dropout: ``LoRALinear.dropout`` (``nn.Dropout``) acts on the input x; the driver puts a module computing
  ``x ⊙ M / (1 − p)`` with the reference's mask in its place (frozen, so it is not a trainable parameter).
* trainable: mlx-lm's fine-tuning recipe, ``model.freeze()`` then ``linear_to_lora_layers`` (the LoRA tensors are
  what ``trainable_parameters()`` then holds); gradients by ``mx.grad`` / ``nn.value_and_grad``.
* model level: mlx-lm's own ``gpt2.Model``, loaded from HF-named tensors with its own ``sanitize`` (which
  transposes the Conv1D weights) and ``load_weights``; ``linear_to_lora_layers(model, num_layers, {"rank",
  "scale", "dropout", "keys"})`` with keys ``attn.c_attn`` / ``attn.c_proj`` / ``mlp.c_fc`` / ``mlp.c_proj``
  applied to the last ``num_layers`` blocks. Its GPT-2 takes neither an attention mask nor position ids.
  The loss is HF's shifted cross-entropy (ignore -100, mean), written here in MLX ops.
* merge: ``LoRALinear.fuse()`` returns a new fused ``nn.Linear``; there is no unmerge (no unfuse in mlx_lm).
  DoRA merge: ``DoRALinear.fuse()`` (``layer.dora_merge.linear``). Model level (``model_merge``): what mlx_lm.fuse
  does, ``fuse()`` on every LoRA / DoRA layer and ``model.update_modules``; no "unmerged" (unmerge=False).
* init (``layer_init``, ``init_adapter``): mlx-lm has one, ``LoRALinear.__init__``'s lora_a ~ U(±1/√in) from MLX's
  generator (``mx.random.seed(case.seed)``), lora_b = 0: the ``kaiming_uniform`` law, PEFT's ``init_lora_weights=True``;
  ``DoRALinear.set_linear`` sets m = ‖W‖ per row (in float32).
* advanced model level: ``model_adapters`` for one adapter, DoRA through ``linear_to_lora_layers(..., use_dora=True)``
  (one LoRA layer per Linear: several adapters are not expressible); LoRA on ``wte`` through the key ``"model.wte"``
  (``LoRAEmbedding``, whose ``as_linear`` also adapts GPT-2's tied output layer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import is_all_linear, refuse_unsupported, refuse_unsupported_model, scaling_of
from conformance.protocol import (
    CAPABILITY_NAMES,
    AdaptersCase,
    Capabilities,
    LayerCase,
    LayerInitCase,
    ModelCase,
    NotSupported,
)
from reflora.targets import EMBEDDING_KIND

name = "mlx-lm"
capabilities = Capabilities(
    layer_layouts=frozenset({"linear"}),
    model_level=True,
    lora_alpha=True,
    rslora=False,
    dropout_mask_injection=True,
    bias_modes=frozenset({"none"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    target_modules_list=True,
    target_modules_regex=False,
    layers_to_transform=True,
    rank_alpha_pattern=False,
    position_ids=False,
    padding=False,
    merge=True,
    unmerge=False,
    layer_dora=True,  # DoRALinear (tuner/dora.py; its norm is stop_gradient-ed)
    layer_dora_merge=True,  # DoRALinear.fuse(): m ⊙ V/‖V‖ (no unfuse)
    layer_init_methods=frozenset({"kaiming_uniform"}),  # LoRALinear.__init__: lora_a ~ U(±1/√in), lora_b = 0
    dora=True,  # model level: linear_to_lora_layers(..., use_dora=True) (model_adapters, init_adapter, model_merge)
    model_merge=True,  # fuse() of every LoRA / DoRA layer (mlx_lm/fuse.py); no unfuse (unmerge=False)
    init_methods=frozenset({"true"}),  # LoRALinear.__init__: lora_a ~ U(±1/√in), lora_b = 0: PEFT's True law
    embedding_lora=True,  # LoRAEmbedding on wte (keys "model.wte"); mlx-lm's tied head uses its as_linear
    adapter_files=False,
    notes={
        "lora_alpha": "mapped: mlx-lm's scale is an absolute multiplier, the driver passes lora_alpha / r",
        "rslora": "no rsLoRA switch: scale is one absolute number",
        "layer_layouts": "nn.Linear stores weight (out, in) only",
        "per_slice_qkv": "LoRALinear adapts a whole matrix",
        "bias_modes": "mlx-lm's LoRA fine-tuning trains only lora_a / lora_b",
        "target_modules_list": "as linear_to_lora_layers keys (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), "
        "the same keys in every adapted block",
        "target_modules_regex": "keys are module paths inside a block, not patterns",
        "layers_to_transform": "as linear_to_lora_layers' num_layers, which adapts the last N blocks: a "
        "layers_to_transform that is not the last N blocks is refused (redrawn)",
        "rank_alpha_pattern": "one rank and scale for every layer",
        "position_ids": "mlx-lm's GPT-2 computes arange(T) positions itself",
        "padding": "mlx-lm's GPT-2 takes no attention mask (causal only)",
        "unmerge": "LoRALinear.fuse() returns a fused copy; there is no unmerge",
        "adapter_files": "mlx-lm saves adapters.safetensors with its own names (lora_a (in, r)), not PEFT's format",
        "target_modules_all_linear": "as linear_to_lora_layers without keys: mlx-lm's own default, every Linear "
        "of a block",
        "exclude_modules": "linear_to_lora_layers takes the keys to adapt, no exclusion",
        "runtime_scaling": "no set_scale / scale_layer: LoRALinear.scale is one number set at conversion",
        "layer_dora_full_norm": "DoRALinear stop_gradient-s the norm of the adapted weight (tuner/dora.py)",
        "layer_lora_bias": "LoRALinear has lora_a / lora_b matrices only: no bias on B",
        "embedding_lora": "mapped: linear_to_lora_layers keys + 'model.wte' (LoRAEmbedding; its as_linear adapts the "
        "tied head too)",
        "trainable_tokens": "mlx-lm has no trainable-token (selected embedding rows) fine-tuning",
        "adapter_switching": "one adapter per model (load_adapters replaces the layers); no switching",
        "model_merge": "mapped: fuse() of every LoRA / DoRA layer, as mlx_lm/fuse.py does; no unfuse / unmerge "
        '(unmerge=False: no "unmerged"), no safe merge, and one adapter per layer (two active adapters refused)',
        "merge_and_unload": "mlx_lm.fuse saves mlx-lm's own weight names and layout, not HF's GPT-2 checkpoint",
        "dora": "mapped: linear_to_lora_layers(model, num_layers, config, use_dora=True) (DoRALinear)",
        "init_methods": "one init, LoRALinear.__init__'s lora_a ~ U(±1/√in), lora_b = 0 (PEFT's True law); no "
        "gaussian, False (B random), PiSSA, OLoRA or orthogonal init in mlx_lm/tuner",
        "multi_adapter": "one adapter per layer: LoRALinear holds one lora_a / lora_b, and LoRALinear.from_base "
        "cannot wrap a LoRALinear (it reads linear.weight, which a LoRALinear lacks)",
        "mixed_batch": "one adapter per layer (LoRALinear.__call__(x) takes no adapter names)",
        "layer_init_methods": "LoRALinear / DoRALinear have one init (__init__: lora_a ~ U(±1/√in), lora_b = 0, the "
        "kaiming_uniform law) and no init argument",
        "layer_multi_adapter": "LoRALinear holds one lora_a / lora_b; LoRALinear.from_base cannot wrap a LoRALinear",
        "layer_mixed_batch": "LoRALinear.__call__(x) takes no adapter names: one adapter per layer",
        "layer_dora_merge": "mapped: DoRALinear.fuse() returns nn.Linear with m ⊙ V/‖V‖ (no unfuse)",
        "weighted_combinations": "no adapter combination API",
        "modules_to_save": "mlx-lm's fine_tune_type is lora, dora or full (tuner/utils.py): no trainable copies of "
        "chosen modules next to LoRA",
        "ensure_weight_tying": "no modules_to_save, so nothing to tie",
    },
)

if "target_modules_all_linear" in CAPABILITY_NAMES:  # a field of issue 13's targets, set when the protocol has it
    capabilities = dataclasses.replace(capabilities, target_modules_all_linear=True)

MLX_DTYPES = ("float64", "float32", "bfloat16", "float16")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"candidate": f"mlx-lm {version('mlx-lm')}", "framework": f"mlx {version('mlx')}"}


def _mx(array: np.ndarray, dtype: str):
    import mlx.core as mx

    # the dtype goes to mx.array itself: without it, float64 NumPy data is first rounded to float32
    return mx.array(np.asarray(array, dtype=np.float64), dtype=getattr(mx, dtype))


def _np(array) -> np.ndarray:
    import mlx.core as mx

    if array.dtype == mx.bfloat16:  # NumPy has no bfloat16: widen exactly first
        array = array.astype(mx.float32)
    return np.array(array).astype(np.float64)


def _mask_dropout(mask: np.ndarray, p: float, dtype: str):
    """An mlx module computing ``x ⊙ M / (1 − p)``: what ``nn.Dropout`` computes for the mask it draws."""
    import mlx.nn as nn

    class MaskDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.keep = _mx(mask, dtype)

        def __call__(self, x):
            return x * self.keep.astype(x.dtype) * (1.0 / (1.0 - p))

    module = MaskDropout()
    module.freeze()
    return module


# ---------------------------------------------------------------------------------------------
# layer level
# ---------------------------------------------------------------------------------------------


def _frozen_linear(case):
    """The case's base layer as a frozen ``mlx.nn.Linear``: weight (out, in), bias (out,) if the case has one."""
    import mlx.nn as nn

    out_f, in_f = case.weight.shape
    linear = nn.Linear(in_f, out_f, bias=case.bias is not None)
    linear.weight = _mx(case.weight, case.dtype)  # (out, in)
    if case.bias is not None:
        linear.bias = _mx(case.bias, case.dtype)
    linear.freeze()
    return linear


def _build_layer(case: LayerCase):
    from mlx_lm.tuner.lora import LoRALinear

    linear = _frozen_linear(case)  # mlx-lm freezes the model before converting layers to LoRA
    layer = LoRALinear.from_base(linear, r=case.r, dropout=case.lora_dropout, scale=scaling_of(case))
    layer.lora_a = _mx(case.lora_A[None].T, case.dtype)  # (in, r)
    layer.lora_b = _mx(case.lora_B[None].T, case.dtype)  # (r, out)
    return layer


def _run_layer(case: LayerCase, layer):
    """Forward and vector-Jacobian product of Σ dy ⊙ y on the layer (train mode with the case's keep-mask in its
    dropout, or eval mode): ``(y, dx, {parameter path: gradient})`` for its trainable parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if case.keep_mask is not None and case.lora_dropout > 0:
        layer.dropout = _mask_dropout(case.keep_mask, case.lora_dropout, case.dtype)
        layer.train()
    else:
        layer.eval()
    x, dy = _mx(case.x, case.dtype), _mx(case.dy, case.dtype)

    def objective(trainable, x):
        layer.update(trainable)
        return (layer(x) * dy).sum()

    trainable = layer.trainable_parameters()
    y = layer(x)
    grads, dx = mx.grad(objective, argnums=(0, 1))(trainable, x)
    flat = dict(tree_flatten(grads))
    return y, dx, flat


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    if case.magnitude is not None:  # layer.dora.*: the library's own DoRA layer, the case's magnitude loaded
        out = dora_forward_backward(case, case.magnitude)
        del out["magnitude_init"]
        return out
    layer = _build_layer(case)
    y, dx, flat = _run_layer(case, layer)
    out = {"y": _np(y), "dx": _np(dx)}
    if "lora_a" in flat:
        out["lora_A"] = _np(flat["lora_a"]).T  # (r, in)
    if "lora_b" in flat:
        out["lora_B"] = _np(flat["lora_b"]).T  # (out, r)
    if "linear.bias" in flat:
        out["bias"] = _np(flat["linear.bias"])
    rename = {"lora_a": "lora_A", "lora_b": "lora_B", "linear.weight": "weight", "linear.bias": "bias"}
    out["trainable"] = np.array(sorted(rename.get(k, k) for k in flat), dtype=str)
    return out


def _build_dora_layer(case: LayerCase, magnitude: np.ndarray | None):
    """``DoRALinear.from_base`` on the case's layer; ``m`` (out,) as given, else mlx-lm's own initialisation
    (``set_linear``: the row norms of W, computed in float32)."""
    from mlx_lm.tuner.dora import DoRALinear

    linear = _frozen_linear(case)
    layer = DoRALinear.from_base(linear, r=case.r, dropout=case.lora_dropout, scale=scaling_of(case))
    layer.lora_a = _mx(case.lora_A[None].T, case.dtype)  # (in, r)
    layer.lora_b = _mx(case.lora_B[None].T, case.dtype)  # (r, out)
    if magnitude is not None:
        layer.m = _mx(magnitude, case.dtype)
    return layer


def dora_forward_backward(case: LayerCase, magnitude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``DoRALinear`` (mlx_lm/tuner/dora.py) on the case: ``y``, ``dx``, ``lora_A``, ``lora_B``, ``magnitude``
    (the gradients of Σ dy ⊙ y) and ``magnitude_init`` (the magnitude used). Its norm is ``stop_gradient``-ed:
    the detached-norm convention."""
    refuse_unsupported(case, capabilities, name)
    layer = _build_dora_layer(case, magnitude)
    used = _np(layer.m)
    y, dx, flat = _run_layer(case, layer)
    out = {"y": _np(y), "dx": _np(dx), "magnitude_init": used}
    rename = {"lora_a": "lora_A", "lora_b": "lora_B", "m": "magnitude", "linear.bias": "bias"}
    for key, grad in flat.items():
        out[rename.get(key, key)] = _np(grad).T if key in ("lora_a", "lora_b") else _np(grad)
    out["trainable"] = np.array(sorted(rename.get(k, k) for k in flat), dtype=str)
    return out


def dora_merge(case: LayerCase, magnitude: np.ndarray) -> dict[str, np.ndarray]:
    """``DoRALinear.fuse()``: ``merged_weight`` (out, in) = m ⊙ V / ‖V‖ and ``merged_y``; no unmerge."""
    fused = _build_dora_layer(case, magnitude).fuse()
    return {"merged_weight": _np(fused.weight), "merged_y": _np(fused(_mx(case.x, case.dtype)))}


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``fuse()``'s fused layer: ``merged_weight`` (out, in) and ``merged_y``; no unmerge (capability unmerge=False).
    [layer_dora_merge] With ``case.magnitude``: ``DoRALinear.fuse()`` (``dora_merge``), W' = m ⊙ V/‖V‖_row."""
    refuse_unsupported(case, capabilities, name)
    if case.magnitude is not None:  # layer.dora_merge.*
        return dora_merge(case, case.magnitude)
    fused = _build_layer(case).fuse()
    return {"merged_weight": _np(fused.weight), "merged_y": _np(fused(_mx(case.x, case.dtype)))}


INIT_LAW = "kaiming_uniform"  # conformance.init_laws: LoRALinear.__init__'s lora_a ~ U(±1/√in), lora_b = 0


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """[layer_init_methods: kaiming_uniform] mlx-lm's own init on the case's ``nn.Linear`` (weight (out, in)):
    ``LoRALinear.from_base`` (or ``DoRALinear.from_base`` with ``use_dora``) after ``mx.random.seed(case.seed)``.
    ``LoRALinear.__init__`` draws ``lora_a`` (in, r) ~ U(±1/√in) (float32, MLX's generator) and sets ``lora_b``
    (r, out) = 0; ``DoRALinear.set_linear`` sets m = ‖W‖ per output row (computed in float32). Returns
    ``lora_A`` (r, in), ``lora_B`` (out, r), ``y`` (eval forward at init), ``weight`` (out, in), ``magnitude``."""
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    if case.layout not in capabilities.layer_layouts:
        raise NotSupported(f"{name}: layout {case.layout!r}: {capabilities.notes['layer_layouts']}")
    if case.init != INIT_LAW:
        raise NotSupported(f"{name}: init law {case.init!r}: {capabilities.notes['layer_init_methods']}")
    if case.use_rslora:
        raise NotSupported(f"{name}: {capabilities.notes['rslora']}")
    linear = _frozen_linear(case)
    mx.random.seed(case.seed)
    kind = DoRALinear if case.use_dora else LoRALinear
    layer = kind.from_base(linear, r=case.r, dropout=0.0, scale=case.scaling)
    layer.eval()
    out = {"lora_A": _np(layer.lora_a).T, "lora_B": _np(layer.lora_b).T, "y": _np(layer(_mx(case.x, case.dtype))),
           "weight": _np(layer.linear.weight)}  # fmt: skip
    if case.use_dora:
        out["magnitude"] = _np(layer.m)
    return out


# ---------------------------------------------------------------------------------------------
# model level: mlx-lm's gpt2.Model
# ---------------------------------------------------------------------------------------------


def _lora_keys(case: ModelCase) -> tuple[list[str] | None, int, dict]:
    """The ``keys`` (None: every Linear, for all-linear) and ``num_layers`` of linear_to_lora_layers for the case,
    and reflora's plan; NotSupported when mlx-lm cannot express it."""
    from reflora.targets import plan_lora

    refuse_unsupported_model(case, capabilities, name)
    lora = case.lora
    if isinstance(lora.target_modules, str) and not is_all_linear(lora.target_modules):
        raise NotSupported(f"{name}: {capabilities.notes['target_modules_regex']}")
    if lora.qkv_slices is not None:
        raise NotSupported(f"{name}: {capabilities.notes['per_slice_qkv']}")
    if case.config.n_inner is not None and case.config.n_inner != 4 * case.config.n_embd:
        raise NotSupported(f"{name}: mlx-lm's GPT-2 MLP is always 4·n_embd wide (n_inner is ignored)")
    plan = plan_lora(case.config, lora)
    embedding = any(module.kind == EMBEDDING_KIND for module in plan.values())  # LoRA on wte: LoRAEmbedding
    if embedding and case.dropout_masks and lora.lora_dropout > 0:
        raise NotSupported(f"{name}: LoRAEmbedding drops out its LoRA output (and the tied head's input), PEFT's "
                           "Embedding LoRA has no dropout: a dropout case with wte is not expressible")  # fmt: skip
    kinds_by_layer: dict[int, set[str]] = {}
    for module in plan.values():
        if module.kind != EMBEDDING_KIND:
            kinds_by_layer.setdefault(module.layer, set()).add(module.kind)
    kinds = set().union(*kinds_by_layer.values())
    if any(k != kinds for k in kinds_by_layer.values()):
        raise NotSupported(f"{name}: {capabilities.notes['target_modules_list']}")
    num_layers = len(kinds_by_layer)
    if set(kinds_by_layer) != set(range(case.config.n_layer - num_layers, case.config.n_layer)):
        raise NotSupported(f"{name}: layers {sorted(kinds_by_layer)}: {capabilities.notes['layers_to_transform']}")
    if is_all_linear(lora.target_modules):
        return None, num_layers, plan  # no keys: linear_to_lora_layers adapts every Linear of the block itself
    # "model.wte": linear_to_lora_layers's second pass matches keys against the model's own module paths
    return sorted(kinds) + (["model.wte"] if embedding else []), num_layers, plan


def _build_model(case: ModelCase, use_dora: bool = False, own_init: bool = False):
    """mlx-lm's ``gpt2.Model`` with the case's base weights and ``linear_to_lora_layers(..., use_dora)``.

    The LoRA tensors are the case's (``lora_a`` (in, r) = Aᵀ, ``lora_b`` (r, out) = Bᵀ, DoRA's ``m`` (out,) the
    magnitude), or with ``own_init`` what mlx-lm's own initialisation drew (``LoRALinear.__init__``: lora_a ~
    U(±1/√in), lora_b = 0; ``DoRALinear.set_linear``: m = ‖W‖ per output row). Returns the model, ``live``
    (mlx parameter path -> reflora adapter key) and ``layers`` (reflora module name -> the LoRA layer)."""
    import mlx.core as mx
    from mlx_lm.models.gpt2 import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys, num_layers, plan = _lora_keys(case)
    config = case.config
    args = ModelArgs(model_type="gpt2", n_ctx=config.n_positions, n_embd=config.n_embd, n_head=config.n_head,
                     n_layer=config.n_layer, n_positions=config.n_positions,
                     layer_norm_epsilon=config.layer_norm_epsilon, vocab_size=config.vocab_size)  # fmt: skip
    model = Model(args)
    # mlx-lm's own loading path: HF names without "transformer.", then sanitize (transposes Conv1D weights)
    hf = {key.removeprefix("transformer."): _mx(value, case.dtype) for key, value in case.params.items()}
    model.load_weights(list(model.sanitize(hf).items()), strict=True)
    model.freeze()
    scale = case.lora.lora_alpha / case.lora.r
    config = {"rank": case.lora.r, "scale": scale, "dropout": case.lora.lora_dropout}
    if keys is not None:
        config["keys"] = keys
    if own_init:
        mx.random.seed(case.seed)  # mlx-lm draws lora_a from MLX's global generator
    linear_to_lora_layers(model, num_layers, config, use_dora=use_dora)
    blocks = model.model.h
    live, layers = {}, {}  # mlx parameter path -> reflora key; reflora module -> LoRA layer
    for module_name, module in plan.items():
        if module.kind == EMBEDDING_KIND:  # LoRAEmbedding: lora_a (V, r) = Aᵀ, lora_b (r, C) = Bᵀ
            lora_layer, path = model.model.wte, "model.wte"
        else:
            owner, attr = module.kind.split(".")
            lora_layer, path = (
                getattr(getattr(blocks[module.layer], owner), attr),
                f"model.h.{module.layer}.{module.kind}",
            )
        layers[module_name] = lora_layer
        branch = module.branches[0]
        live[f"{path}.lora_a"] = branch.a_key
        live[f"{path}.lora_b"] = branch.b_key
        if use_dora:
            live[f"{path}.m"] = module.magnitude_key
        if own_init:
            continue
        lora_layer.lora_a = _mx(case.adapter[branch.a_key].T, case.dtype)  # (in, r)
        lora_layer.lora_b = _mx(case.adapter[branch.b_key].T, case.dtype)  # (r, out)
        if use_dora:
            lora_layer.m = _mx(case.adapter[module.magnitude_key], case.dtype)  # (out,)
        if case.dropout_masks and case.lora.lora_dropout > 0 and module.kind != EMBEDDING_KIND:
            lora_layer.dropout = _mask_dropout(case.dropout_masks[module_name], case.lora.lora_dropout, case.dtype)
    mx.eval(model.parameters())
    return model, live, layers


def _hf_causal_lm_loss(logits, labels):
    """HF's shifted causal cross-entropy: predict token t+1 from position t, ignore -100, mean over the rest."""
    import mlx.core as mx
    import mlx.nn as nn

    shifted, targets = logits[:, :-1, :], labels[:, 1:]
    counted = targets != -100
    per_token = nn.losses.cross_entropy(shifted, mx.where(counted, targets, 0), reduction="none")
    return (per_token * counted).sum() / counted.sum()


def _run_model(case: ModelCase, model, live: dict[str, str]) -> dict:
    """Forward (train mode when the case has keep-masks, else eval), HF's loss on ``case.labels`` or Σ dlogits ⊙
    logits, and ``nn.value_and_grad`` over the model's trainable parameters: ``{"logits", "loss", "grads":
    {reflora key: array in reflora's layout}, "trainable": {key: numel}}`` (a parameter mlx-lm trains that is not
    a LoRA tensor is reported under its mlx path)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model.train(bool(case.dropout_masks) and case.lora.lora_dropout > 0)
    ids = mx.array(np.asarray(case.input_ids, dtype=np.int32))
    if case.labels is not None:
        labels = mx.array(np.asarray(case.labels, dtype=np.int32))

        def objective(model):
            logits = model(ids)
            return _hf_causal_lm_loss(logits, labels), logits
    else:
        dlogits = _mx(case.dlogits, case.dtype)

        def objective(model):
            logits = model(ids)
            return (logits * dlogits).sum(), logits

    (value, logits), grads = nn.value_and_grad(model, objective)(model)
    out = {"logits": _np(logits), "loss": _np(value) if case.labels is not None else None, "grads": {}, "trainable": {}}
    for path, grad in tree_flatten(grads):
        key = live.get(path)
        if key is None:  # something else the library trains: reported under its own name
            out["trainable"][path] = int(grad.size)
            continue
        out["grads"][key] = _np(grad).T  # lora_a (in, r) -> A (r, in); lora_b -> B; m (out,) unchanged
        out["trainable"][key] = int(grad.size)
    return out


def model_forward_backward(case: ModelCase) -> dict:
    model, live, _ = _build_model(case)
    return _run_model(case, model, live)


# ---------------------------------------------------------------------------------------------
# advanced model level (docs/advanced-semantics.md): DoRA (model_adapters), init (init_adapter)
# ---------------------------------------------------------------------------------------------


def _one_adapter_case(case: AdaptersCase) -> tuple[str, ModelCase]:
    """The one adapter of an ``AdaptersCase``, active on every row, as a ``ModelCase``; NotSupported for several
    adapters, a disabled set or one adapter per row (mlx-lm holds one LoRA layer per Linear)."""
    if len(case.adapters) != 1:
        raise NotSupported(f"{name}: {len(case.adapters)} adapters: {capabilities.notes['multi_adapter']}")
    ((adapter_name, (lora, tensors)),) = case.adapters.items()
    if case.adapter_names is not None:
        raise NotSupported(f"{name}: {capabilities.notes['mixed_batch']}")
    if case.active is not None and list(case.active) != [adapter_name]:
        raise NotSupported(f"{name}: active {case.active}: {capabilities.notes['multi_adapter']}")
    masks = (case.dropout_masks or {}).get(adapter_name)
    model_case = ModelCase(config=case.config, lora=lora, params=case.params, adapter=tensors,
                           input_ids=case.input_ids, labels=case.labels, dropout_masks=masks, dtype=case.dtype,
                           seed=case.seed)  # fmt: skip
    return adapter_name, model_case


def model_adapters(case: AdaptersCase) -> dict:
    """[dora] One adapter (LoRA, or DoRA through ``linear_to_lora_layers(..., use_dora=True)``, i.e.
    ``DoRALinear``: y = (m / sg(‖W + s·BA‖)) ⊙ (x Wᵀ + s·(drop(x) A^T) B^T) + b), its tensors copied in:
    ``{"logits", "loss", "grads": {"<adapter>:<PEFT file key>": gradient}}`` (reflora.qualified_key)."""
    from reflora.adapters import qualified_key

    adapter_name, model_case = _one_adapter_case(case)
    model, live, _ = _build_model(model_case, use_dora=model_case.lora.use_dora)
    out = _run_model(model_case, model, live)
    grads = {qualified_key(adapter_name, key): grad for key, grad in out["grads"].items()}
    return {"logits": out["logits"], "loss": out["loss"], "grads": grads}


def init_adapter(case: AdaptersCase) -> dict:
    """[init_methods: true; dora] mlx-lm's own initialisation of ``case.init_lora`` (``init_lora_weights=True``
    only: ``LoRALinear.__init__`` draws lora_a (in, r) ~ U(±1/√in) from MLX's generator, seeded with
    ``case.seed``, and sets lora_b = 0; with ``use_dora``, ``DoRALinear.set_linear`` sets m = ‖W‖ per output
    row). Returns ``{"adapter": {PEFT file key: A (r, in), B (out, r), magnitude (out,)}, "params": {HF key:
    weight (in, out)}, "logits"}`` (eval, at init)."""
    import mlx.core as mx

    from reflora.targets import plan_lora

    lora = case.init_lora
    if lora is None or lora.init_lora_weights is not True:
        raise NotSupported(f"{name}: init_lora_weights={getattr(lora, 'init_lora_weights', None)!r}: "
                           f"{capabilities.notes['init_methods']}")  # fmt: skip
    model_case = ModelCase(config=case.config, lora=lora, params=case.params, adapter={},
                           input_ids=case.input_ids, labels=None, dtype=case.dtype, seed=case.seed)  # fmt: skip
    model, _, layers = _build_model(model_case, use_dora=lora.use_dora, own_init=True)
    model.eval()
    adapter, params = {}, {}
    for module_name, module in plan_lora(case.config, lora).items():
        layer = layers[module_name]
        branch = module.branches[0]
        adapter[branch.a_key] = _np(layer.lora_a).T  # (r, in)
        adapter[branch.b_key] = _np(layer.lora_b).T  # (out, r)
        if lora.use_dora:
            adapter[module.magnitude_key] = _np(layer.m)  # (out,)
        params[f"{module_name}.weight"] = _np(layer.linear.weight).T  # HF Conv1D layout (in, out)
    logits = model(mx.array(np.asarray(case.input_ids, dtype=np.int32)))
    return {"adapter": adapter, "params": params, "logits": _np(logits)}


def model_merge(case: AdaptersCase) -> dict:
    """[model_merge; dora] mlx_lm.fuse's merge: GPT-2 with the one adapter (``linear_to_lora_layers``, DoRA with
    ``use_dora``), ``"logits"`` (eval), then every layer that has ``fuse()`` replaced by its fused copy
    (``model.update_modules``): ``"merged_logits"`` and ``"merged"`` (HF key -> the fused weight in HF's Conv1D
    layout (in, out), wte (V, C) as it is, and the bias). No unfuse: no ``"unmerged"`` (unmerge=False). No safe
    merge and one LoRA layer per Linear: ``case.safe`` and two active adapters are refused."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from conformance.protocol import targeted_keys

    if case.safe:
        raise NotSupported(f"{name}: fuse() has no safe merge (no check for non-finite adapters before merging)")
    _, model_case = _one_adapter_case(case)
    model_case = dataclasses.replace(model_case, dropout_masks=None)  # eval: the merge is checked without dropout
    model, _, _ = _build_model(model_case, use_dora=model_case.lora.use_dora)
    model.eval()
    ids = mx.array(np.asarray(case.input_ids, dtype=np.int32))
    logits = _np(model(ids))
    fused = [(path, module.fuse()) for path, module in model.named_modules() if hasattr(module, "fuse")]
    model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())
    merged_logits = _np(model(ids))
    weights = dict(tree_flatten(model.parameters()))
    merged = {}
    for key in targeted_keys(case):
        value = _np(weights[key.replace("transformer.", "model.", 1)])
        conv1d = key.endswith(".weight") and ".h." in key  # nn.Linear (out, in) -> HF Conv1D (in, out)
        merged[key] = value.T if conv1d else value
    return {"logits": logits, "merged_logits": merged_logits, "merged": merged}


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")
