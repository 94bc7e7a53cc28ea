"""The ops of GPT-2 with LoRA, one concern per file, each a ``<op>_forward`` / ``<op>_backward`` pair.

Read them in this order: ``linear`` (the base layer, and the Conv1D/Linear weight layouts), ``lora_linear``
(LoRA's delta and the layer with LoRA branches), ``dora_linear`` (DoRA's delta), ``embedding``, ``lora_embedding`` (LoRA on ``wte``),
``layernorm``, ``attention``, ``gelu``, ``crossentropy``. Each module's docstring states the forward and
derives the backward; docs/ops.md has the full derivations.

Conventions (after llm.c), the same in every op:

* ``<op>_forward(inputs, params, options..., layout) -> (out, cache)``: the cache holds what the backward
  needs (for ``lora_delta_forward``, the δ of one branch, ``out`` is that δ).
* ``<op>_backward(dout, cache, params, options..., layout, *, norm_gradient=..., want_...=...)``: the params it
  needs again come in the forward's order; every ``want_*`` flag (and DoRA's ``norm_gradient``) is keyword-only.
* It returns one gradient per differentiable array argument of the forward, in the forward's order, ``None``
  where a ``want_*`` flag left it out; an argument that bundles weights (a branch, the branches, the
  adapters) gets one item shaped like it (``(dA, dB)``, a list of those, ``LayerAdapterGrads``); with a single
  gradient (embedding, gelu, attention, cross-entropy) it is returned alone. So ``linear_backward`` returns
  (dx, dweight, dbias), ``lora_linear_backward`` (dx, dweight, dbias, [(dA, dB) per branch]),
  ``dora_linear_backward`` (dx, dweight, dbias, dA, dB, dm), ``layernorm_backward`` (dx, dweight, dbias).

Shapes: N rows (N = B·T), C channels; weights as GPT-2 stores them (Conv1D (in, out)) unless
``layout="linear"``.
"""

from reflora.ops.attention import attention_backward, attention_forward, attention_visibility
from reflora.ops.crossentropy import cross_entropy_backward, cross_entropy_forward
from reflora.ops.embedding import embedding_backward, embedding_forward
from reflora.ops.gelu import gelu_backward, gelu_forward
from reflora.ops.layernorm import layernorm_backward, layernorm_forward
from reflora.ops.lora_embedding import lora_embedding_backward, lora_embedding_forward
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
    "lora_embedding_backward",
    "lora_embedding_forward",
    "lora_linear_backward",
    "lora_linear_forward",
]
