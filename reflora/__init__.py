"""reflora: an autograd-free reference for GPT-2 with LoRA, written on array namespaces.

Public API (stable):

* configs: ``GPT2Config``, ``LoraConfig``, ``ConfigError``
* targets: ``plan_lora``, ``adapter_shapes``, ``base_shapes``, ``trainable_bias_keys``
* model: ``gpt2_forward``, ``gpt2_backward``, ``gpt2_loss_and_grads``, ``trainable_keys``, ``InputError``
* weights: ``init_gpt2_params``, ``init_lora_adapter``, ``draw_dropout_masks``
* files: ``load_gpt2``, ``save_gpt2``, ``load_adapter``, ``save_adapter``, ``CheckpointError``
* ops: ``reflora.ops`` (every ``<op>_forward`` / ``<op>_backward`` pair)
"""

from reflora._version import __version__
from reflora.checkpoint import CheckpointError, load_adapter, load_gpt2, save_adapter, save_gpt2
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.init import draw_dropout_masks, init_gpt2_params, init_lora_adapter
from reflora.model import InputError, gpt2_backward, gpt2_forward, gpt2_loss_and_grads, trainable_keys
from reflora.targets import adapter_shapes, base_shapes, plan_lora, trainable_bias_keys

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GPT2Config",
    "InputError",
    "LoraConfig",
    "__version__",
    "adapter_shapes",
    "base_shapes",
    "draw_dropout_masks",
    "gpt2_backward",
    "gpt2_forward",
    "gpt2_loss_and_grads",
    "init_gpt2_params",
    "init_lora_adapter",
    "load_adapter",
    "load_gpt2",
    "plan_lora",
    "save_adapter",
    "save_gpt2",
    "trainable_bias_keys",
    "trainable_keys",
]
