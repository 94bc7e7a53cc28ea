"""The names of several adapters on one model.

In ``gpt2_forward(..., adapters={name: (lora, tensors)})`` mode a gradient key is qualified with its adapter,
``"<name>:<PEFT file key>"`` (``qualified_key``), since two adapters share every file key. ``"__base__"``
(``BASE_ADAPTER``) is PEFT's name for "no adapter" in a mixed batch. How the adapters combine on a module is
reflora.layer.
"""

from __future__ import annotations

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
KEY_SEPARATOR = ":"


def qualified_key(adapter_name: str, file_key: str) -> str:
    """``"<adapter name>:<file key>"``: how a gradient key names a tensor of one of several adapters."""
    return f"{adapter_name}{KEY_SEPARATOR}{file_key}"


def split_key(key: str) -> tuple[str | None, str]:
    """``(adapter name, file key)`` of a qualified key; ``(None, key)`` for a plain one."""
    name, sep, rest = key.partition(KEY_SEPARATOR)
    return (name, rest) if sep else (None, key)


def check_adapter_name(name: object) -> str:
    """An adapter name is a non-empty string without ``":"`` and is not ``"__base__"``."""
    if not isinstance(name, str) or not name or KEY_SEPARATOR in name or name == BASE_ADAPTER:
        raise ValueError(
            f"adapter names must be non-empty strings without {KEY_SEPARATOR!r} and not {BASE_ADAPTER!r}, got {name!r}"
        )
    return name
