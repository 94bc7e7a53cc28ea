"""Faulty candidates for the target and runtime-scaling features (tests/test_targets.py): each is the reference
with one bug, and ``MUST_FAIL`` names the features that must catch it."""

from __future__ import annotations

import dataclasses

from conformance.drivers.reference import ReferenceDriver


class LastKey(ReferenceDriver):
    """Takes the *last* matching rank_pattern / alpha_pattern key (PEFT: the first)."""

    name = "last_key"
    MUST_FAIL = ("model.targets.patterns_overlap",)

    def model_forward_backward(self, case):
        lora = case.lora
        lora = dataclasses.replace(
            lora,
            rank_pattern=dict(reversed(lora.rank_pattern.items())),
            alpha_pattern=dict(reversed(lora.alpha_pattern.items())),
        )
        return super().model_forward_backward(dataclasses.replace(case, lora=lora))


class NoScale(ReferenceDriver):
    """Ignores set_scale / scale_layer / unscale_layer."""

    name = "no_scale"
    MUST_FAIL = ("model.scaling.set_scale", "model.scaling.scale_layer")

    def model_forward_backward(self, case):
        return super().model_forward_backward(dataclasses.replace(case, scale_ops=()))


class NoExclude(ReferenceDriver):
    """Ignores exclude_modules."""

    name = "no_exclude"
    MUST_FAIL = ("model.targets.exclude",)

    def model_forward_backward(self, case):
        return super().model_forward_backward(
            dataclasses.replace(case, lora=dataclasses.replace(case.lora, exclude_modules=None))
        )


LAST_KEY, NO_SCALE, NO_EXCLUDE = LastKey(), NoScale(), NoExclude()
MUTANTS = {"LAST_KEY": LAST_KEY, "NO_SCALE": NO_SCALE, "NO_EXCLUDE": NO_EXCLUDE}
