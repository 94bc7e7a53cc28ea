"""Faulty candidates for the draws' former blind spots (issue 13: tests/test_blind_spots.py). Each is the
reference driver with one bug that an earlier version of the draws could not see:

* ``LastMatchingKey``: the *last* matching rank_pattern / alpha_pattern key wins (PEFT: the first). Seen only by
  pattern keys that overlap (``model.targets.patterns_overlap``).
* ``NoScalingAdvanced``: the advanced methods ignore lora_alpha (scaling 1 for every adapter). Seen only when
  alpha ≠ r and alpha ≠ √r (the advanced draws, ``conformance.strategies._adapter_lora``).
* ``FirstModelInProcess``: the first model built in a process returns wrong logits (a stale cache, a lazy
  initialisation), every later one is right. Seen by whichever feature runs first in a shared worker; by every
  feature with ``--fresh-process``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from conformance.drivers.reference import ReferenceDriver


class LastMatchingKey(ReferenceDriver):
    BUG = "the last matching rank_pattern / alpha_pattern key wins instead of the first"

    @property
    def name(self) -> str:
        return "mutant-LastMatchingKey"

    def model_forward_backward(self, case):
        lora = case.lora  # reflora takes the first matching key in dict order: reversed, the last one wins
        lora = dataclasses.replace(lora, rank_pattern=dict(reversed(list(lora.rank_pattern.items()))),
                                   alpha_pattern=dict(reversed(list(lora.alpha_pattern.items()))))  # fmt: skip
        return super().model_forward_backward(dataclasses.replace(case, lora=lora))


def _unscaled(adapters):
    """Every adapter with lora_alpha = r (√r under rsLoRA): scaling 1, as if lora_alpha were ignored."""
    out = {}
    for name, (lora, tensors) in adapters.items():
        alpha = math.sqrt(lora.r) if lora.use_rslora else float(lora.r)
        out[name] = (dataclasses.replace(lora, lora_alpha=alpha, alpha_pattern={}), tensors)
    return out


class NoScalingAdvanced(ReferenceDriver):
    BUG = "the advanced methods (several adapters, DoRA, merge) use scaling 1: lora_alpha is ignored"

    @property
    def name(self) -> str:
        return "mutant-NoScalingAdvanced"

    def model_adapters(self, case):
        return super().model_adapters(dataclasses.replace(case, adapters=_unscaled(case.adapters)))

    def model_merge(self, case):
        return super().model_merge(dataclasses.replace(case, adapters=_unscaled(case.adapters)))


_BUILT = {"models": 0}  # models built in this process


class FirstModelInProcess(ReferenceDriver):
    BUG = "the first model built in a process returns logits off by 1e-3 (later models are right)"

    @property
    def name(self) -> str:
        return "mutant-FirstModelInProcess"

    @staticmethod
    def _first(out: dict) -> dict:
        _BUILT["models"] += 1
        if _BUILT["models"] == 1:
            out = {**out, "logits": np.asarray(out["logits"]) + 1e-3}
        return out

    def model_forward_backward(self, case):
        return self._first(super().model_forward_backward(case))

    def model_adapters(self, case):
        return self._first(super().model_adapters(case))
