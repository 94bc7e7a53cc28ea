"""Driver for Keras 3.15 (``Dense.enable_lora``) and keras-hub 0.32 (``GPT2Backbone.enable_lora``), on Keras's
torch backend (``KERAS_BACKEND=torch``, set by the ``keras`` venv): layer level and GPT-2 model level.

Mapping (keras/src/layers/core/dense.py, einsum_dense.py; keras_hub/src/models/backbone.py, gpt2/):

* ``Dense(out, use_bias, dtype)``: ``kernel`` is (in, out) (the case's "conv1d" layout). ``enable_lora(rank,
  lora_alpha)`` adds ``lora_kernel_a`` (in, r) = Aᵀ and ``lora_kernel_b`` (r, out) = Bᵀ and uses the kernel
  ``W + (lora_alpha / rank) · lora_kernel_a @ lora_kernel_b``: PEFT's alpha / r scaling (``lora_alpha`` defaults
  to ``rank``). The LoRA kernels are always created as float32 (dense.py: "LoRA weights should be float32"),
  whatever the layer's dtype.
* no LoRA dropout in Keras: not supported.
* trainable: what the library leaves trainable (``layer.trainable_weights``). ``enable_lora`` freezes the kernel
  only, so the bias stays trainable; the driver reports that as it is.
* gradients: torch autograd through the layer (Keras variables are torch Parameters on this backend).
* model level: keras-hub's ``GPT2Backbone`` (built from the config, ``dropout=0``), loaded with keras-hub's own
  transformers converter (``convert_gpt2.convert_weights`` on a ``SafetensorLoader`` over the case's HF tensors
  written to a temporary folder), logits by ``GPT2CausalLM(backbone, preprocessor=None)``, then
  ``backbone.enable_lora(rank, target_layer_names)``. That takes no alpha (scaling 1, so only ``lora_alpha == r``),
  and LoRA on its multi-head ``EinsumDense`` q/k/v kernels (hidden, heads, head_dim) factors per head
  (``lora_kernel_a`` (hidden, heads, r), ``lora_kernel_b`` (r, head_dim): ΔW_h = A_h B with B shared by the
  heads), which is not PEFT's or the paper's rank-r update of the (hidden, C) matrix unless there is one head.
  So c_attn (keras-hub's ``query`` / ``key`` / ``value``) is not driven. GPT-2 module -> keras-hub layer:
  attn.c_proj -> ``attention_output`` (kernel (heads, head_dim, hidden): ``lora_kernel_a`` (heads, head_dim, r)
  is Aᵀ reshaped, an ordinary rank-r update), mlp.c_fc -> ``feedforward_intermediate_dense``, mlp.c_proj ->
  ``feedforward_output_dense``; every block gets the same layers.
* layout "linear" (weight (out, in)): Keras's own ``EinsumDense("...i,oi->...o")``, whose kernel is (out, in).
  Its ``enable_lora`` factors the kernel the same way (``lora_kernel_a`` = kernel.shape[:-1] + (r,) = (out, r),
  ``lora_kernel_b`` (r, in), kernel ``W + (lora_alpha / rank) · a @ b``), so there ``lora_kernel_a`` = B and
  ``lora_kernel_b`` = A (the gradients are mapped back by name).
* init (``layer_init``): ``enable_lora``'s own initializers (``he_uniform`` on ``lora_kernel_a``, zeros on
  ``lora_kernel_b``): the law ``he_uniform`` on Dense, ``he_uniform_b`` (B random, A = 0) on the EinsumDense.
* LoRA on ``wte``: ``"token_embedding"`` among ``enable_lora``'s target names (``Embedding.enable_lora`` on keras-hub's
  ``ReversibleEmbedding``: ``lora_embeddings_a`` (V, r) = Aᵀ, ``lora_embeddings_b`` (r, C) = Bᵀ; its tied reverse
  call uses the adapted embeddings too).
* dtypes: float64, float32, bfloat16, float16 (on torch a float64 ``ops.matmul`` computes in float32).
* merge: Keras folds LoRA into the kernel when saving: ``save_own_variables(store)`` writes the merged kernel
  (``_get_kernel_with_merged_lora``); ``merged_y`` is the forward of a LoRA-free layer after
  ``load_own_variables(store)`` (what a saved-and-reloaded layer computes). There is no unmerge.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import (
    refuse_unsupported,
    refuse_unsupported_model,
    to_numpy,
    to_torch,
    torch_layer_results,
)
from conformance.protocol import Capabilities, LayerCase, LayerInitCase, ModelCase, NotSupported
from reflora.targets import EMBEDDING_KIND, EMBEDDING_MODULE

name = "keras"
INIT_LAWS = {"conv1d": "he_uniform", "linear": "he_uniform_b"}  # conformance.init_laws, per layer kind
capabilities = Capabilities(
    layer_layouts=frozenset({"conv1d", "linear"}),
    model_level=True,
    lora_alpha=True,
    model_lora_alpha=False,
    rslora=False,
    dropout_mask_injection=False,
    bias_modes=frozenset({"none", "all", "lora_only"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    target_modules_list=True,
    target_modules_regex=False,
    layers_to_transform=False,
    rank_alpha_pattern=False,
    position_ids=False,
    padding=True,
    merge=True,
    unmerge=False,
    adapter_files=False,
    layer_init_methods=frozenset(INIT_LAWS.values()),  # enable_lora's he_uniform / zeros, per layer kind
    embedding_lora=True,  # GPT2Backbone.enable_lora(rank, ["token_embedding", ...])
    notes={
        "layer_layouts": "conv1d: Dense (kernel (in, out)); linear: EinsumDense('...i,oi->...o') (kernel (out, in))",
        "model_lora_alpha": "GPT2Backbone.enable_lora(rank) passes no alpha: scaling 1 (lora_alpha == r) only",
        "lora_alpha": "Dense.enable_lora(rank, lora_alpha) scales by lora_alpha / rank; at model level "
        "GPT2Backbone.enable_lora(rank) passes no alpha, so only lora_alpha == r",
        "rslora": "lora_alpha / rank only",
        "dropout_mask_injection": "Keras LoRA has no dropout",
        "dtypes": "the LoRA kernels are always float32 (also in float64, bfloat16, float16 layers); on the torch "
        "backend keras.ops.matmul computes float64 in float32 (result_type maps float64 to float32)",
        "bias_modes": "reported as the library leaves it: enable_lora freezes the kernel only, the bias stays trainable",
        "per_slice_qkv": "Dense adapts a whole kernel; keras-hub's q/k/v are separate EinsumDense layers whose LoRA "
        "factors per head (ΔW_h = A_h B, B shared by the heads), not the reference's per-slice LoRA",
        "target_modules_list": "as keras-hub layer names, the same in every block",
        "target_modules_regex": "enable_lora takes layer names",
        "layers_to_transform": "enable_lora adapts every block",
        "rank_alpha_pattern": "one rank for every layer",
        "position_ids": "GPT2Backbone computes positions itself",
        "merge": "mapped: save_own_variables folds LoRA into the saved kernel (the only merge Keras has)",
        "unmerge": "no unmerge: load_own_variables of a merged kernel zeroes the LoRA kernels",
        "adapter_files": "keras-hub saves .lora.h5 files of its own, not PEFT's format",
        "target_modules_all_linear": "enable_lora(rank, target_layer_names) takes names; keras-hub's q/k/v LoRA is "
        "per head, so every projection cannot be targeted as LoRA",
        "exclude_modules": "enable_lora takes the names to adapt, no exclusion",
        "runtime_scaling": "no set_scale / scale_layer: lora_alpha / lora_rank is fixed by enable_lora",
        "embedding_lora": "mapped: GPT2Backbone.enable_lora(rank, [..., 'token_embedding']) (Embedding.enable_lora on "
        "the ReversibleEmbedding, whose tied reverse call uses the adapted embeddings too)",
        "trainable_tokens": "Keras has no trainable-token (selected embedding rows) API",
        "adapter_switching": "one LoRA per layer (enable_lora can be called once); no switching",
        "model_merge": "no merge / unmerge API: LoRA is folded into the kernel only when saving",
        "merge_and_unload": "keras-hub saves its own format, not HF's GPT-2 checkpoint",
        "dora": "Keras has no DoRA",
        "init_methods": "enable_lora's a_initializer / b_initializer (he_uniform / zeros) are not PEFT's inits; not "
        "driven at model level",
        "multi_adapter": "one LoRA per layer",
        "mixed_batch": "one LoRA per layer",
        "modules_to_save": "GPT2Backbone.enable_lora freezes every other layer; keras-hub has no modules_to_save "
        "(trainable copies of chosen modules)",
        "ensure_weight_tying": "no modules_to_save, so nothing to tie",
        "layer_init_methods": "enable_lora(rank, lora_alpha, a_initializer='he_uniform', b_initializer='zeros'): "
        "Dense (conv1d) is the he_uniform law, EinsumDense('...i,oi->...o') (linear) he_uniform_b (its "
        "lora_kernel_a is B); other initializers are Keras initializers, not the other laws",
        "layer_dora": "Keras has no DoRA (dense.py / einsum_dense.py: enable_lora only)",
        "layer_dora_merge": "Keras has no DoRA",
        "layer_dora_full_norm": "Keras has no DoRA",
        "layer_lora_bias": "enable_lora adds lora_kernel_a / lora_kernel_b only: no bias on B",
        "layer_multi_adapter": "enable_lora can be called once per layer ('lora is already enabled')",
        "layer_mixed_batch": "one LoRA per layer; call() takes no adapter names",
        "weighted_combinations": "no adapter combination API",
    },
)

KIND_TO_KERAS = {"attn.c_proj": "attention_output", "mlp.c_fc": "feedforward_intermediate_dense",
                 "mlp.c_proj": "feedforward_output_dense"}  # fmt: skip


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        raise NotSupported(f"{name}: the driver runs Keras on its torch backend (KERAS_BACKEND=torch)")
    return keras


def versions() -> dict[str, str]:
    from importlib.metadata import version

    keras = _keras()
    return {
        "candidate": f"keras {version('keras')}, keras-hub {version('keras-hub')}",
        "framework": f"keras backend {keras.backend.backend()} (torch {version('torch')})",
    }


def _assign(variable, value: np.ndarray) -> None:
    """Assign in the variable's own dtype (which for LoRA kernels is float32, whatever the case's dtype)."""
    variable.assign(np.asarray(value, dtype=np.float64).astype(variable.dtype))


def _plain_layer(case: LayerCase, lora: dict | None = None):
    """The case's base layer: ``Dense`` (conv1d layout, kernel (in, out)) or ``EinsumDense`` with a kernel (out, in)
    (linear layout), built, holding the case's weight and bias. ``lora``: constructor arguments (``lora_rank``,
    ``lora_alpha``), Keras's other way to add LoRA (``build`` then calls ``enable_lora``)."""
    keras = _keras()
    lora = lora or {}
    if case.layout == "conv1d":
        in_f, out_f = case.weight.shape
        layer = keras.layers.Dense(out_f, use_bias=case.bias is not None, dtype=case.dtype, **lora)
    else:
        out_f, in_f = case.weight.shape
        layer = keras.layers.EinsumDense("...i,oi->...o", output_shape=(out_f,),
                                         bias_axes="o" if case.bias is not None else None, dtype=case.dtype, **lora)  # fmt: skip
    layer.build((None,) * (case.x.ndim - 1) + (in_f,))  # the case's input rank (EinsumDense checks it)
    # Keras's own weights API (``kernel`` is a computed property once LoRA is on); it zeroes the LoRA kernels
    store = {"0": np.asarray(case.weight, dtype=np.float64).astype(case.dtype)}  # the case's layout
    if case.bias is not None:
        store["1"] = np.asarray(case.bias, dtype=np.float64).astype(case.dtype)
    layer.load_own_variables(store)
    return layer


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """[layer_init_methods] Keras's own LoRA init: ``enable_lora(r, lora_alpha)`` with its default initializers
    (``a_initializer="he_uniform"``, ``b_initializer="zeros"``) after ``keras.utils.set_random_seed(case.seed)``.
    He uniform on ``lora_kernel_a`` draws U(±√(6/fan_in)) with fan_in its first axis. Dense (conv1d layout):
    ``lora_kernel_a`` (in, r) = Aᵀ, so A ~ U(±√(6/in)), B = 0 (law he_uniform). EinsumDense('...i,oi->...o')
    (linear layout): ``lora_kernel_a`` (out, r) = B ~ U(±√(6/out)) and ``lora_kernel_b`` (r, in) = A = 0 (law
    he_uniform_b). Returns ``lora_A`` (r, in), ``lora_B`` (out, r), ``y`` (eval forward at init), ``weight`` (the
    base kernel, the case's layout). The constructor form is not used here: its ``load_own_variables`` of the base
    weights zeroes the LoRA kernels (dense.py), so the init could not be seen."""
    import torch

    keras = _keras()
    if case.init != INIT_LAWS.get(case.layout):
        raise NotSupported(f"{name}: init law {case.init!r} on the {case.layout} layout: "
                           f"{capabilities.notes['layer_init_methods']}")  # fmt: skip
    if case.use_dora or case.use_rslora:
        raise NotSupported(f"{name}: {capabilities.notes['dora' if case.use_dora else 'rslora']}")
    layer = _plain_layer(case)
    keras.utils.set_random_seed(case.seed)
    layer.enable_lora(case.r, lora_alpha=case.lora_alpha)
    a, b = to_numpy(layer.lora_kernel_a.value), to_numpy(layer.lora_kernel_b.value)
    lora_A, lora_B = (a.T, b.T) if case.layout == "conv1d" else (b, a)  # (r, in), (out, r)
    with torch.no_grad():
        y = layer(to_torch(case.x, case.dtype), training=False)
    # the base kernel: the variable enable_lora froze (public: the layer's non-trainable weights)
    (kernel,) = [v for v in layer.non_trainable_weights if v.path.split("/")[-1] == "kernel"]
    return {"lora_A": lora_A, "lora_B": lora_B, "y": to_numpy(y), "weight": to_numpy(kernel.value)}


def _lora_layer(case: LayerCase):
    """The case's layer with LoRA, holding the case's A and B. Both of Keras's APIs are checked, chosen by the
    case's seed: an even seed calls ``enable_lora(r, lora_alpha)`` on the built layer, an odd one passes
    ``lora_rank`` / ``lora_alpha`` to the constructor."""
    if case.seed % 2:
        layer = _plain_layer(case, {"lora_rank": case.r, "lora_alpha": case.lora_alpha})
        if not layer.lora_enabled:
            raise RuntimeError("keras did not enable LoRA from the constructor arguments")  # a driver bug
    else:
        layer = _plain_layer(case)
        layer.enable_lora(case.r, lora_alpha=case.lora_alpha)
    if case.layout == "conv1d":
        _assign(layer.lora_kernel_a, case.lora_A[None].T)  # (in, r)
        _assign(layer.lora_kernel_b, case.lora_B[None].T)  # (r, out)
    else:
        _assign(layer.lora_kernel_a, case.lora_B[None])  # (out, r): a @ b = B A
        _assign(layer.lora_kernel_b, case.lora_A[None])  # (r, in)
    return layer


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    layer = _lora_layer(case)
    x = to_torch(case.x, case.dtype, requires_grad=True)
    y = layer(x, training=False)
    trainable = {v.path.split("/")[-1]: v for v in layer.trainable_weights}
    rename = {"lora_kernel_a": "lora_A", "lora_kernel_b": "lora_B", "kernel": "weight", "bias": "bias"}
    if case.layout == "linear":
        rename.update(lora_kernel_a="lora_B", lora_kernel_b="lora_A")
    leaves = {rename.get(k, k): v.value for k, v in trainable.items()}
    out = torch_layer_results(y, x, case.dy, leaves)
    if case.layout == "conv1d":
        out["lora_A"], out["lora_B"] = out["lora_A"].T, out["lora_B"].T  # (r, in), (out, r)
    if "bias" in out and not case.bias_trainable:
        out.pop("bias")  # its gradient is not asked for; that it trains shows in ``trainable``
    out["trainable"] = np.array(sorted(leaves), dtype=str)
    return out


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    """``save_own_variables``'s merged kernel (the case's layout) and the forward of a LoRA-free layer that
    ``load_own_variables`` filled with it; no unmerge (capability unmerge=False)."""
    import torch

    refuse_unsupported(case, capabilities, name)
    store: dict = {}
    _lora_layer(case).save_own_variables(store)
    plain = _plain_layer(case)
    plain.load_own_variables(store)
    with torch.no_grad():
        merged_y = plain(to_torch(case.x, case.dtype), training=False)
    return {"merged_weight": to_numpy(torch.as_tensor(store["0"])), "merged_y": to_numpy(merged_y)}


# ---------------------------------------------------------------------------------------------
# model level: keras-hub GPT2Backbone + GPT2CausalLM
# ---------------------------------------------------------------------------------------------


def _targets(case: ModelCase) -> tuple[list[str], dict]:
    from reflora.targets import plan_lora

    refuse_unsupported_model(case, capabilities, name)
    lora = case.lora
    if isinstance(lora.target_modules, str):
        raise NotSupported(f"{name}: {capabilities.notes['target_modules_regex']}")
    if lora.lora_alpha != lora.r:
        raise NotSupported(f"{name}: GPT2Backbone.enable_lora(rank) takes no alpha: scaling 1 (lora_alpha == r) only")
    if lora.bias != "none":  # bias_modes holds for the layer level (Dense returns its bias gradient)
        raise NotSupported(f"{name}: at model level GPT2Backbone.enable_lora has one fixed behaviour (the adapted "
                           "layers' biases stay trainable), not PEFT's bias modes")  # fmt: skip
    if case.config.n_inner is not None and case.config.n_inner != 4 * case.config.n_embd:
        raise NotSupported(f"{name}: keras-hub's GPT-2 converter uses intermediate_dim = 4·n_embd")
    plan = plan_lora(case.config, lora)
    kinds_by_layer: dict[int, set[str]] = {}
    for module in plan.values():
        if module.kind != EMBEDDING_KIND:  # LoRA on wte: keras-hub's "token_embedding" (ReversibleEmbedding)
            kinds_by_layer.setdefault(module.layer, set()).add(module.kind)
    kinds = set().union(*kinds_by_layer.values())
    blocks = len(kinds_by_layer) in ((0, case.config.n_layer) if EMBEDDING_MODULE in plan else (case.config.n_layer,))
    if any(k != kinds for k in kinds_by_layer.values()) or not blocks:
        raise NotSupported(f"{name}: {capabilities.notes['layers_to_transform']}")
    if "attn.c_attn" in kinds:
        raise NotSupported(f"{name}: c_attn: {capabilities.notes['per_slice_qkv']}")
    names = [KIND_TO_KERAS[k] for k in sorted(kinds)]
    return names + (["token_embedding"] if EMBEDDING_MODULE in plan else []), plan


def _build_model(case: ModelCase, folder: Path):
    import json

    from keras_hub.models import GPT2Backbone, GPT2CausalLM
    from keras_hub.src.utils.transformers import convert_gpt2
    from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader
    from safetensors.numpy import save_file

    keras = _keras()
    target_names, plan = _targets(case)
    config = case.config
    hf_config = {**config.to_dict(), "model_type": "gpt2", "resid_pdrop": 0.0}
    backbone = GPT2Backbone(**{**convert_gpt2.convert_backbone_config(hf_config)}, dtype=case.dtype)
    # keras-hub's own HF -> Keras mapping, reading the case's tensors as HF would have saved them
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in case.params.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(hf_config))
    with SafetensorLoader(str(folder)) as loader:
        convert_gpt2.convert_weights(backbone, loader, hf_config)
    backbone.enable_lora(case.lora.r, target_layer_names=target_names)
    live = {}  # reflora key -> (keras variable, to-keras function, from-keras function)
    c, r, heads = config.n_embd, case.lora.r, config.n_head
    for module in plan.values():
        if module.kind == EMBEDDING_KIND:  # Embedding.enable_lora: lora_embeddings_a (V, r) = Aᵀ, _b (r, C) = Bᵀ
            (branch,) = module.branches
            layer = backbone.token_embedding
            _assign(layer.lora_embeddings_a, case.adapter[branch.a_key].T)
            _assign(layer.lora_embeddings_b, case.adapter[branch.b_key].T)
            live[branch.a_key] = (layer.lora_embeddings_a, lambda g: g.T)
            live[branch.b_key] = (layer.lora_embeddings_b, lambda g: g.T)
            continue
        block = backbone.transformer_layers[module.layer]
        for branch in module.branches:
            if module.kind == "attn.c_proj":
                layer = block._self_attention_layer._output_dense
                a_to = lambda A: A.T.reshape(heads, c // heads, r)  # noqa: E731  (r, C) -> (heads, head_dim, r)
                a_from = lambda g: g.reshape(c, r).T  # noqa: E731
            else:
                layer = getattr(block, "_feedforward_intermediate_dense" if module.kind == "mlp.c_fc"
                                else "_feedforward_output_dense")  # fmt: skip
                a_to = lambda A: A.T  # noqa: E731
                a_from = lambda g: g.T  # noqa: E731
            _assign(layer.lora_kernel_a, a_to(case.adapter[branch.a_key]))
            _assign(layer.lora_kernel_b, case.adapter[branch.b_key].T)  # (r, out)
            live[branch.a_key] = (layer.lora_kernel_a, a_from)
            live[branch.b_key] = (layer.lora_kernel_b, lambda g: g.T)
    del keras
    return GPT2CausalLM(backbone=backbone, preprocessor=None), backbone, live


def model_forward_backward(case: ModelCase) -> dict:
    import tempfile

    import torch

    from conformance.drivers.peft_bridge import hf_causal_lm_loss

    with tempfile.TemporaryDirectory() as tmp:
        causal_lm, backbone, live = _build_model(case, Path(tmp))
    ids = torch.from_numpy(np.asarray(case.input_ids, dtype=np.int32))
    mask = np.ones_like(case.input_ids) if case.attention_mask is None else case.attention_mask
    logits = causal_lm({"token_ids": ids, "padding_mask": torch.from_numpy(np.asarray(mask, dtype=np.int32))},
                       training=False)  # fmt: skip
    out: dict = {"logits": to_numpy(logits), "loss": None, "grads": {}, "trainable": {}}
    if case.labels is not None:
        loss = hf_causal_lm_loss(logits, torch.from_numpy(np.asarray(case.labels, dtype=np.int64)))
        out["loss"] = np.asarray(loss.item())
        objective = loss
    else:
        objective = (logits * to_torch(case.dlogits, case.dtype)).sum()
    trainable = {v.path: v for v in backbone.trainable_weights}
    grads = torch.autograd.grad(objective, [v.value for v in trainable.values()], allow_unused=True)
    grad_of = {id(v): g for v, g in zip(trainable.values(), grads)}
    mapped = set()
    for key, (variable, from_keras) in live.items():
        grad = grad_of.get(id(variable))
        if grad is None and variable.path not in trainable:
            continue
        out["grads"][key] = from_keras(to_numpy(grad if grad is not None else torch.zeros_like(variable.value)))
        out["trainable"][key] = int(np.prod(variable.shape))
        mapped.add(variable.path)
    for path in set(trainable) - mapped:  # what else the library trains, under its own name ("/" would nest)
        out["trainable"]["keras:" + path.replace("/", ".")] = int(np.prod(trainable[path].shape))
    return out


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['adapter_files']}")
