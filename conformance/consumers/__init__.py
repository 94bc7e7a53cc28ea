"""Adapter-file consumers (conformance.files): programs that load a HF GPT-2 folder and a PEFT adapter folder.

``NAME`` -> the module ``conformance.consumers.NAME``, whose ``consumer`` attribute is the consumer;
``command.CommandConsumer(template)`` runs any program (``reflora conform --candidate-cmd``).
"""

from __future__ import annotations

import importlib

SHIPPED = ("transformers_load_adapter", "peft_from_pretrained", "mlx_lm_fuse", "llama_cpp")


def load_consumer(name: str):
    """The shipped consumer ``name`` (one of ``SHIPPED``)."""
    if name not in SHIPPED:
        raise ValueError(f"unknown consumer {name!r}; shipped: {', '.join(SHIPPED)}")
    return importlib.import_module(f"conformance.consumers.{name}").consumer
