"""The mutants: the reference driver with one bug each.

Each class says what it breaks (``BUG``), which features the suite must fail (``MUST_FAIL``) and which it must
still pass (``MUST_PASS``: the bug is specific, the suite is not just failing everything). Model-level bugs are
put into reflora's own ops for the duration of a call (``unittest.mock.patch``), so the mutant is reflora with
that one line wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from unittest import mock

import numpy as np

from conformance import expectations
from conformance.drivers.reference import ReferenceDriver
from reflora.config import LoraConfig
from reflora.ops import lora_linear_backward, lora_linear_forward
from reflora.targets import plan_lora

LAYER_FB = {"layer.forward_backward.linear", "layer.forward_backward.conv1d"}


class Mutant(ReferenceDriver):
    """The reference driver, with ``patches()`` applied around every call and optional buggy layer ops."""

    BUG = ""
    MUST_FAIL: frozenset[str] = frozenset()
    MUST_PASS: frozenset[str] = frozenset()
    forward_op = staticmethod(lora_linear_forward)
    backward_op = staticmethod(lora_linear_backward)

    @property
    def name(self) -> str:
        return f"mutant-{type(self).__name__}"

    def patches(self) -> list[tuple[str, object]]:
        """(target, replacement) pairs patched while the driver runs."""
        ops = []
        if self.forward_op is not lora_linear_forward:
            ops.append(("reflora.layer.lora_linear_forward", self.forward_op))
        if self.backward_op is not lora_linear_backward:
            ops.append(("reflora.layer.lora_linear_backward", self.backward_op))
        return ops

    @contextlib.contextmanager
    def bugged(self):
        with contextlib.ExitStack() as stack:
            for target, replacement in self.patches():
                stack.enter_context(mock.patch(target, replacement))
            yield

    def layer_forward_backward(self, case):
        with self.bugged():
            out = expectations.layer_forward_backward(case, self._dtype(case), self.forward_op, self.backward_op)
        out["trainable"] = np.array(out["trainable"])
        return out

    def layer_merge(self, case):
        with self.bugged():
            return super().layer_merge(case)

    def model_forward_backward(self, case):
        with self.bugged():
            return super().model_forward_backward(case)

    def load_adapter_logits(self, case, folder):
        with self.bugged():
            return super().load_adapter_logits(case, folder)

    def model_switch_adapters(self, case):
        with self.bugged():
            return super().model_switch_adapters(case)


# ---------------------------------------------------------------------------------------------- scaling


class ScalingMissing(Mutant):
    BUG = "the LoRA delta is not scaled (s = 1 instead of alpha/r)"
    MUST_FAIL = frozenset(LAYER_FB | {"model.forward_backward", "model.rslora", "layer.merge.linear"})
    MUST_PASS = frozenset({"model.adapter_save"})

    def patches(self):
        return [("reflora.config.LoraConfig.scaling", lambda self, r, alpha: 1.0)]


class RsloraIgnored(Mutant):
    BUG = "alpha/r where rsLoRA (alpha/sqrt(r)) was asked"
    MUST_FAIL = frozenset({"layer.rslora.linear", "layer.rslora.conv1d", "model.rslora"})
    MUST_PASS = frozenset(LAYER_FB | {"model.forward_backward"})

    def patches(self):
        return [("reflora.config.LoraConfig.scaling", lambda self, r, alpha: alpha / r)]


# ---------------------------------------------------------------------------------------------- transposed delta


class Conv1dDeltaTransposed(Mutant):
    """Swaps roles, A' = Bᵀ and B' = Aᵀ, so that the op computes s·x·B·A: the transposed Conv1D delta."""

    BUG = "the Conv1D delta is transposed: y += s·x·(BA) instead of s·x·(BA)ᵀ (crashes on non-square layers)"
    MUST_FAIL = frozenset({"layer.forward_backward.conv1d", "model.forward_backward"})
    MUST_PASS = frozenset({"layer.forward_backward.linear"})
    square_only = False

    def _transposed(self, in_f: int, out_f: int) -> bool:
        return in_f == out_f or not self.square_only

    def layer_forward_backward(self, case):
        if case.layout != "conv1d" or not self._transposed(case.x.shape[-1], case.dy.shape[-1]):
            return super().layer_forward_backward(case)
        swapped = dataclasses.replace(case, lora_A={k: v.T for k, v in case.lora_B.items()},
                                      lora_B={k: v.T for k, v in case.lora_A.items()})  # fmt: skip
        out = super().layer_forward_backward(swapped)
        for k in case.lora_A:
            suffix = expectations.result_suffix(k)
            out[f"lora_A{suffix}"], out[f"lora_B{suffix}"] = out[f"lora_B{suffix}"].T, out[f"lora_A{suffix}"].T
        return out

    def model_forward_backward(self, case):
        plan = plan_lora(case.config, case.lora)
        swap = {}
        for module in plan.values():
            if self._transposed(module.in_features, module.out_features):
                for branch in module.branches:
                    swap[branch.a_key], swap[branch.b_key] = branch.b_key, branch.a_key
        adapter = {k: case.adapter[swap[k]].T if k in swap else v for k, v in case.adapter.items()}
        out = super().model_forward_backward(dataclasses.replace(case, adapter=adapter))
        out["grads"] = {k: out["grads"][swap[k]].T if k in swap else v for k, v in out["grads"].items()}
        return out


class Conv1dDeltaTransposedSquare(Conv1dDeltaTransposed):
    BUG = "the Conv1D delta is transposed on square layers only (runs without a shape error: attn.c_proj)"
    MUST_FAIL = frozenset({"model.forward_backward"})
    MUST_PASS = frozenset(LAYER_FB)
    square_only = True


# ---------------------------------------------------------------------------------------------- dropout


def _output_mask(keep_mask, out_features: int):
    reps = math.ceil(out_features / keep_mask.shape[1])
    return np.tile(keep_mask, (1, reps))[:, :out_features]


def forward_dropout_on_output(x, weight, bias, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d"):
    y, cache = lora_linear_forward(x, weight, bias, branches, None, 0.0, layout)
    if keep_mask is None or not branches:
        return y, cache
    base, _ = lora_linear_forward(x, weight, bias, (), None, 0.0, layout)
    return base + (y - base) * _output_mask(keep_mask, y.shape[1]) / (1.0 - dropout_p), cache


def backward_dropout_on_output(dy, cache, weight, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d", **kw):
    return lora_linear_backward(dy, cache, weight, branches, None, 0.0, layout, **kw)


class DropoutOnOutput(Mutant):
    BUG = "LoRA dropout applied to the branch's output instead of its input"
    MUST_FAIL = frozenset({"layer.dropout.linear", "layer.dropout.conv1d", "model.dropout"})
    MUST_PASS = frozenset(LAYER_FB | {"model.forward_backward"})
    forward_op = staticmethod(forward_dropout_on_output)
    backward_op = staticmethod(backward_dropout_on_output)


def forward_dropout_on_base(x, weight, bias, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d"):
    if keep_mask is None:
        return lora_linear_forward(x, weight, bias, branches, None, 0.0, layout)
    x_drop = x * keep_mask / (1.0 - dropout_p)
    return lora_linear_forward(x_drop, weight, bias, branches, None, 0.0, layout)


def backward_dropout_on_base(dy, cache, weight, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d", **kw):
    dx, dw, db, grads = lora_linear_backward(dy, cache, weight, branches, None, 0.0, layout, **kw)
    if dx is not None and keep_mask is not None:
        dx = dx * keep_mask / (1.0 - dropout_p)
    return dx, dw, db, grads


class DropoutOnBasePath(Mutant):
    BUG = "LoRA dropout applied to the layer input, so the frozen base path is dropped too"
    MUST_FAIL = frozenset({"layer.dropout.linear", "layer.dropout.conv1d", "model.dropout"})
    MUST_PASS = frozenset(LAYER_FB | {"model.forward_backward"})
    forward_op = staticmethod(forward_dropout_on_base)
    backward_op = staticmethod(backward_dropout_on_base)


def forward_no_rescale(x, weight, bias, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d"):
    return lora_linear_forward(x, weight, bias, branches, keep_mask, 0.0, layout)


def backward_no_rescale(dy, cache, weight, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d", **kw):
    return lora_linear_backward(dy, cache, weight, branches, keep_mask, 0.0, layout, **kw)


class DropoutWithoutRescale(Mutant):
    BUG = "LoRA dropout without the 1/(1 − p) rescaling of kept values"
    MUST_FAIL = frozenset({"layer.dropout.linear", "layer.dropout.conv1d", "model.dropout"})
    MUST_PASS = frozenset(LAYER_FB | {"model.forward_backward"})
    forward_op = staticmethod(forward_no_rescale)
    backward_op = staticmethod(backward_no_rescale)


# ---------------------------------------------------------------------------------------------- trainable set


class WrongBiasTrainable(Mutant):
    BUG = "bias 'lora_only' trains every bias (as 'all'), and a layer's bias trains even with bias 'none'"
    MUST_FAIL = frozenset({"model.bias.lora_only", "layer.forward_backward.linear"})
    MUST_PASS = frozenset({"model.bias.all", "model.forward_backward"})

    def layer_forward_backward(self, case):
        return super().layer_forward_backward(dataclasses.replace(case, bias_trainable=case.bias is not None))

    def model_forward_backward(self, case):
        from reflora.model import trainable_keys

        def all_biases(config, lora):
            if lora is not None and lora.bias == "lora_only":
                lora = dataclasses.replace(lora, bias="all")
            return trainable_keys(config, lora)

        with mock.patch("conformance.expectations.trainable_keys", all_biases):
            return super().model_forward_backward(case)


# ---------------------------------------------------------------------------------------------- gradients


def backward_da_unscaled(dy, cache, weight, branches=(), keep_mask=None, dropout_p=0.0, layout="conv1d", **kw):
    dx, dw, db, grads = lora_linear_backward(dy, cache, weight, branches, keep_mask, dropout_p, layout, **kw)
    return dx, dw, db, [(dA / br.scaling, dB) for br, (dA, dB) in zip(branches, grads, strict=True)]


class WrongGradientA(Mutant):
    BUG = "the gradient of A misses the scaling (every other output and gradient is right)"
    MUST_FAIL = frozenset(LAYER_FB | {"model.forward_backward"})
    MUST_PASS = frozenset({"layer.merge.linear", "model.adapter_load"})
    backward_op = staticmethod(backward_da_unscaled)


# ---------------------------------------------------------------------------------------------- merge


class MergeWithoutScaling(Mutant):
    BUG = "merge adds B·A without the scaling"
    MUST_FAIL = frozenset({"layer.merge.linear", "layer.merge.conv1d"})
    MUST_PASS = frozenset(LAYER_FB)

    def layer_merge(self, case):
        with mock.patch("reflora.config.LoraConfig.scaling", lambda self, r, alpha: 1.0):
            return super().layer_merge(case)


class UnmergeDoesNotRestore(Mutant):
    BUG = "unmerge leaves the merged weight in place"
    MUST_FAIL = frozenset({"layer.unmerge.linear", "layer.unmerge.conv1d"})
    MUST_PASS = frozenset(LAYER_FB)

    def layer_merge(self, case):
        out = super().layer_merge(case)
        out["unmerged_weight"] = out["merged_weight"].copy()
        return out


# ---------------------------------------------------------------------------------------------- per-slice, targets

_NEXT_SLICE = {"q": "k", "k": "v", "v": "q"}


class QkvWrongSlice(Mutant):
    BUG = "per-slice LoRA lands on the next slice (q's adapter on k's outputs, k's on v's, v's on q's)"
    MUST_FAIL = frozenset({"layer.qkv_slices.linear", "layer.qkv_slices.conv1d", "model.qkv_slices"})
    MUST_PASS = frozenset(LAYER_FB | {"model.forward_backward"})

    def layer_forward_backward(self, case):
        if not case.qkv_slices:
            return super().layer_forward_backward(case)
        moved = dataclasses.replace(case, lora_A={_NEXT_SLICE[k]: v for k, v in case.lora_A.items()},
                                    lora_B={_NEXT_SLICE[k]: v for k, v in case.lora_B.items()})  # fmt: skip
        out = super().layer_forward_backward(moved)
        back = {f".{_NEXT_SLICE[s]}": f".{s}" for s in case.lora_A}
        renamed = {}
        for key, value in out.items():
            head, dot, tail = key.partition(".")
            renamed[head + back.get(dot + tail, dot + tail) if dot else key] = value
        renamed["trainable"] = np.array([t.split(".")[0] + back.get("." + t.split(".")[1], "") if "." in t else t
                                         for t in out["trainable"]])  # fmt: skip
        return renamed

    def model_forward_backward(self, case):
        if case.lora.qkv_slices is None:
            return super().model_forward_backward(case)
        moved_slices = tuple(_NEXT_SLICE[s] for s in case.lora.qkv_slices)

        def rename(key: str, table: dict) -> str:
            for s, t in table.items():
                key = key.replace(f".lora_A.{s}.", f".lora_A.@{t}.").replace(f".lora_B.{s}.", f".lora_B.@{t}.")
            return key.replace("@", "")

        forward = {s: _NEXT_SLICE[s] for s in case.lora.qkv_slices}
        backward = {t: s for s, t in forward.items()}
        lora = dataclasses.replace(case.lora, qkv_slices=moved_slices)
        adapter = {rename(k, forward): v for k, v in case.adapter.items()}
        out = super().model_forward_backward(dataclasses.replace(case, lora=lora, adapter=adapter))
        out["grads"] = {rename(k, backward): v for k, v in out["grads"].items()}
        out["trainable"] = {rename(k, backward): v for k, v in out["trainable"].items()}
        return out


class TargetsMissMlpCProj(Mutant):
    BUG = "target matching misses mlp.c_proj ('c_proj' only matches attn.c_proj)"
    MUST_FAIL = frozenset({"model.forward_backward"})
    MUST_PASS = frozenset(LAYER_FB)

    def model_forward_backward(self, case):
        targets = case.lora.target_modules
        if targets is None or isinstance(targets, str):
            return super().model_forward_backward(case)
        kept = [("attn.c_proj" if t == "c_proj" else t) for t in targets if t != "mlp.c_proj"]
        if not kept:
            raise ValueError("target_modules matched no module")
        lora = dataclasses.replace(case.lora, target_modules=tuple(kept))
        keys = set(reference_adapter_keys(case.config, lora))
        adapter = {k: v for k, v in case.adapter.items() if k in keys}
        return super().model_forward_backward(dataclasses.replace(case, lora=lora, adapter=adapter))


def reference_adapter_keys(config, lora: LoraConfig) -> list[str]:
    from reflora.targets import adapter_shapes

    return list(adapter_shapes(plan_lora(config, lora)))


# ---------------------------------------------------------------------------------------------- robustness


class RaisesOnMerge(Mutant):
    BUG = "layer_merge raises"
    MUST_FAIL = frozenset({"layer.merge.linear", "layer.merge.conv1d"})
    MUST_PASS = frozenset(LAYER_FB | {"model.forward_backward"})

    def layer_merge(self, case):
        raise RuntimeError("merge is broken in this build")


class CrashesOnSwitch(Mutant):
    BUG = "the process dies (SIGABRT) when switching adapters"
    MUST_FAIL = frozenset({"model.adapter_switch"})
    MUST_PASS = frozenset({"model.adapter_save", "model.adapter_load", "layer.merge.linear"})

    def model_switch_adapters(self, case):
        os.abort()


class HangsOnRslora(Mutant):
    BUG = "the rsLoRA layer never returns"
    MUST_FAIL = frozenset({"layer.rslora.linear"})
    MUST_PASS = frozenset({"layer.dropout.linear", "layer.forward_backward.linear"})

    def layer_forward_backward(self, case):
        if case.use_rslora:
            time.sleep(3600)
        return super().layer_forward_backward(case)


VALUE_MUTANTS = [ScalingMissing, RsloraIgnored, Conv1dDeltaTransposed, Conv1dDeltaTransposedSquare, DropoutOnOutput,
                 DropoutOnBasePath, DropoutWithoutRescale, WrongBiasTrainable, WrongGradientA, MergeWithoutScaling,
                 UnmergeDoesNotRestore, QkvWrongSlice, TargetsMissMlpCProj]  # fmt: skip
ROBUSTNESS_MUTANTS = [RaisesOnMerge, CrashesOnSwitch, HangsOnRslora]
