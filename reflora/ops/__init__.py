"""The ops of GPT-2 with LoRA, one concern per file, each a ``<op>_forward`` / ``<op>_backward`` pair.

Conventions (after llm.c): ``forward(inputs, params, ...) -> (out, cache)``; ``backward(dout, cache, ...)``
returns the gradients of its inputs and params. Shapes: N rows (N = B·T), C channels.
"""

from reflora.ops.attention import attention_backward, attention_forward, attention_visibility
from reflora.ops.crossentropy import cross_entropy_backward, cross_entropy_forward
from reflora.ops.embedding import embedding_backward, embedding_forward
from reflora.ops.gelu import gelu_backward, gelu_forward
from reflora.ops.layernorm import layernorm_backward, layernorm_forward
from reflora.ops.lora_linear import LoraBranchWeights, lora_linear_backward, lora_linear_forward

__all__ = [
    "LoraBranchWeights",
    "attention_backward",
    "attention_forward",
    "attention_visibility",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_backward",
    "gelu_forward",
    "layernorm_backward",
    "layernorm_forward",
    "lora_linear_backward",
    "lora_linear_forward",
]
