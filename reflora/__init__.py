"""reflora: an autograd-free reference for GPT-2 with LoRA, written on array namespaces.

Read the spec in this order (each formula is written once, with its derivation in the docstring):

1. ``config.py``: ``GPT2Config``, ``LoraConfig`` with PEFT's fields; the scaling α/r (α/√r under rsLoRA).
2. ``targets.py``: which modules a LoRA config targets, and every tensor's key and shape.
3. ``ops/`` (conventions in ``ops/__init__.py``): ``linear.py`` (the base layer, the Conv1D/Linear layouts),
   ``lora_linear.py`` (LoRA's delta s·((x_d Aᵀ) Bᵀ + b_B) and the LoRA layer), ``dora_linear.py`` (DoRA),
   then ``embedding.py``, ``layernorm.py``, ``attention.py``, ``gelu.py``, ``crossentropy.py``.
4. ``layer.py``: the adapted layer, base + Σ_a R_a ⊙ δ_a over several adapters; ``adapters.py``: their names.
5. ``validate.py`` (every input check), ``dispatch.py`` (the adapters on each module), then ``model.py``: the
   graph, ``gpt2_forward`` / ``gpt2_backward`` (docs/ops.md derives it).
6. ``merge.py`` (merge, unmerge), ``lora_init.py`` (PEFT's initialisations), ``init.py`` (seeded weights,
   dropout masks), ``weighted.py`` (``add_weighted_adapter``).
7. ``checkpoint.py`` (safetensors, PEFT's file layout), ``optim.py`` (AdamW, SGD), ``backend.py`` (NumPy, CuPy,
   any array-API namespace).

Public API (stable):

* configs: ``GPT2Config``, ``LoraConfig``, ``ConfigError``
* targets: ``plan_lora``, ``adapter_shapes``, ``base_shapes``, ``trainable_bias_keys``
* model: ``gpt2_forward``, ``gpt2_backward``, ``gpt2_loss_and_grads``, ``trainable_keys``, ``InputError``
* weights: ``init_gpt2_params``, ``init_lora_adapter``, ``draw_dropout_masks``
* files: ``load_gpt2``, ``save_gpt2``, ``load_adapter``, ``save_adapter``, ``CheckpointError``
* ops: ``reflora.ops`` (every ``<op>_forward`` / ``<op>_backward`` pair)
* advanced LoRA (docs/advanced-semantics.md): ``merge_adapter``, ``merge_adapters``, ``unmerge_adapter``,
  ``unmerge_adapters``, ``merge_and_unload``, ``MergeRecord``, ``MergeError`` (reflora.merge);
  ``init_adapter``, ``init_lora_module``, ``residual_base`` (reflora.lora_init); ``add_weighted_adapter``
  (reflora.weighted); ``qualified_key``, ``BASE_ADAPTER`` (reflora.adapters), ``adapter_trainable_keys``
  (reflora.model); DoRA is ``LoraConfig(use_dora=True)``
"""

from reflora._version import __version__
from reflora.adapters import BASE_ADAPTER, qualified_key
from reflora.checkpoint import CheckpointError, load_adapter, load_gpt2, save_adapter, save_gpt2
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.init import draw_dropout_masks, init_gpt2_params, init_lora_adapter
from reflora.lora_init import init_adapter, init_lora_module, residual_base
from reflora.merge import (
    MergeError,
    MergeRecord,
    merge_adapter,
    merge_adapters,
    merge_and_unload,
    unmerge_adapter,
    unmerge_adapters,
)
from reflora.model import (
    InputError,
    adapter_trainable_keys,
    gpt2_backward,
    gpt2_forward,
    gpt2_loss_and_grads,
    trainable_keys,
)
from reflora.targets import adapter_shapes, base_shapes, plan_lora, trainable_bias_keys
from reflora.weighted import add_weighted_adapter

__all__ = [
    "BASE_ADAPTER",
    "CheckpointError",
    "ConfigError",
    "GPT2Config",
    "InputError",
    "LoraConfig",
    "MergeError",
    "MergeRecord",
    "__version__",
    "adapter_shapes",
    "adapter_trainable_keys",
    "add_weighted_adapter",
    "base_shapes",
    "draw_dropout_masks",
    "gpt2_backward",
    "gpt2_forward",
    "gpt2_loss_and_grads",
    "init_adapter",
    "init_gpt2_params",
    "init_lora_adapter",
    "init_lora_module",
    "load_adapter",
    "load_gpt2",
    "merge_adapter",
    "merge_adapters",
    "merge_and_unload",
    "plan_lora",
    "qualified_key",
    "residual_base",
    "save_adapter",
    "save_gpt2",
    "trainable_bias_keys",
    "trainable_keys",
    "unmerge_adapter",
    "unmerge_adapters",
]
