"""Runtime scaling: PEFT 0.21's ``LoraLayer.set_scale`` / ``scale_layer`` / ``unscale_layer``, as a multiplier.

PEFT keeps, per layer and adapter, ``scaling[adapter]``, set at creation to ``s = LoraConfig.scaling(r, alpha)``
(``alpha / r``, or ``alpha / √r`` under rsLoRA, with the layer's own r and alpha from the patterns). The three
methods change it at run time, on one layer; calling them on every LoRA layer (what users and diffusers do)
changes every module's scaling by the same factor, so the reference describes the state as one multiplier ``m``
per adapter, starting at 1, with every module's scaling ``m · s``:

* ``set_scale(adapter, c)``: ``m = c`` (absolute: ``c · alpha / r``, or ``c · alpha / √r`` under rsLoRA; PEFT
  0.21.2 honours rsLoRA here, the bug of PEFT #2733 is fixed). An adapter the layer does not hold is ignored.
* ``scale_layer(c)``: ``m = m · c`` for every *active* adapter (``c == 1``: nothing).
* ``unscale_layer(c)``: ``m = m / c`` for every active adapter; ``unscale_layer(None)``: ``m = 1`` (reset).

Because ``s`` is linear in alpha, ``m · s(r, alpha) = s(r, m · alpha)``: ``scaled_lora`` applies ``m`` as alpha
times ``m`` (``lora_alpha`` and every ``alpha_pattern`` value), so ``LoraConfig.scaling`` stays the one formula.
PEFT's ``set_scale`` computes ``(c · alpha) / r``, the same float64 operations; ``scale_layer`` rounds once more.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from reflora.config import ConfigError, LoraConfig

SCALE_OPS = ("set_scale", "scale_layer", "unscale_layer")


def runtime_multiplier(
    ops: Iterable[Sequence], adapter: str = "default", active: Sequence[str] = ("default",)
) -> float:
    """The multiplier ``m`` of ``adapter`` after ``ops`` (in order), each ``("set_scale", name, c)``,
    ``("scale_layer", c)`` or ``("unscale_layer", c_or_None)``, starting from ``m = 1``."""
    m = 1.0
    for op in ops:
        kind, args = op[0], tuple(op[1:])
        if kind == "set_scale" and len(args) == 2:
            name, c = args
            _check_factor(kind, c)
            if name == adapter:
                m = float(c)
        elif kind == "scale_layer" and len(args) == 1:
            _check_factor(kind, args[0])
            if adapter in active:
                m = m * args[0]
        elif kind == "unscale_layer" and len(args) == 1:
            if args[0] is not None:
                _check_factor(kind, args[0])
                if args[0] == 0:
                    raise ConfigError("unscale_layer(0) divides the scaling by zero")
            if adapter in active:
                m = 1.0 if args[0] is None else m / args[0]
        else:
            raise ConfigError(f"a runtime scaling op must be one of {SCALE_OPS} with its arguments, got {list(op)!r}")
    return m


def scaled_lora(lora: LoraConfig, multiplier: float) -> LoraConfig:
    """``lora`` with every module's scaling times ``multiplier``: alpha (``lora_alpha`` and every
    ``alpha_pattern`` value, in the same key order) times ``multiplier``; r and everything else unchanged."""
    _check_factor("multiplier", multiplier)
    if multiplier == 1:
        return lora
    return dataclasses.replace(
        lora,
        lora_alpha=multiplier * lora.lora_alpha,
        alpha_pattern={k: multiplier * v for k, v in lora.alpha_pattern.items()},
    )


def _check_factor(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: the scale must be a finite number, got {value!r}")
