"""Layer-level mutants for the square merge, DoRA, lora_bias, DoRA merge, init-law and several-adapter features
(issue 15.1): the reference driver with one bug each.

Each class says what it breaks (``BUG``), which features the suite must fail (``MUST_FAIL``) and which it must
still pass (``MUST_PASS``), as in tests/mutants/catalog.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from conformance import expectations
from conformance.drivers.reference import ReferenceDriver
from reflora.merge import dora_delta_weight


def _square_conv1d(case) -> bool:
    return case.layout == "conv1d" and case.weight.shape[0] == case.weight.shape[1]


def _transposed_case(case):
    """The case with A' = Bᵀ (r, out) and B' = Aᵀ (in, r): on a square weight s·B'A' = (s·BA)ᵀ, so the merge
    adds the (out, in) delta to the (in, out) Conv1D weight without its transpose."""
    return dataclasses.replace(case, lora_A={k: v.T for k, v in case.lora_B.items()},
                               lora_B={k: v.T for k, v in case.lora_A.items()})  # fmt: skip


class MergeTransposedOnSquareConv1d(ReferenceDriver):
    """Merges W + s·BA into a Conv1D weight (in, out) without the transpose, only where in == out (no shape
    error there). Non-square layers and the Linear layout are right."""

    BUG = "the Conv1D merge delta is not transposed on square weights (in == out)"
    MUST_FAIL = frozenset({"layer.merge_square.conv1d"})
    MUST_PASS = frozenset({"layer.merge.conv1d", "layer.merge.linear", "layer.merge_square.linear"})

    @property
    def name(self) -> str:
        return f"mutant-{type(self).__name__}"

    def layer_merge(self, case):
        if not _square_conv1d(case):
            return super().layer_merge(case)
        return expectations.layer_merge(_transposed_case(case), self._dtype(case))


class UnmergeTransposedOnSquareConv1d(ReferenceDriver):
    """Merges right, but unmerges W' − (s·BA) without the transpose on square Conv1D weights: W is not restored."""

    BUG = "the Conv1D unmerge delta is not transposed on square weights (in == out)"
    MUST_FAIL = frozenset({"layer.unmerge_square.conv1d"})
    MUST_PASS = frozenset({"layer.unmerge.conv1d", "layer.merge_square.conv1d", "layer.unmerge_square.linear"})

    @property
    def name(self) -> str:
        return f"mutant-{type(self).__name__}"

    def layer_merge(self, case):
        out = super().layer_merge(case)
        if _square_conv1d(case):
            dtype = self._dtype(case)
            right = expectations.layer_merge(case, dtype)
            wrong = expectations.layer_merge(_transposed_case(case), dtype)
            delta = right["merged_weight"] - wrong["merged_weight"]  # (s·BA)ᵀ − s·BA, in the case's dtype
            out["unmerged_weight"] = np.asarray(out["unmerged_weight"]) + delta
        return out


class _AdaptedMutant(ReferenceDriver):
    @property
    def name(self) -> str:
        return f"mutant-{type(self).__name__}"


class DoraNormNotDetached(_AdaptedMutant):
    """DoRA with the weight norm differentiated (the full gradient) where the detached norm was asked."""

    BUG = "DoRA's norm ‖W + sBA‖ is not detached in the backward pass"
    MUST_FAIL = frozenset({"layer.dora.linear", "layer.dora.conv1d"})
    MUST_PASS = frozenset({"layer.dora_full_norm.linear", "layer.dora_full_norm.conv1d", "layer.lora_bias.linear"})

    def layer_forward_backward(self, case):
        if case.magnitude is None:
            return super().layer_forward_backward(case)
        out = expectations.layer_adapted_forward_backward(case, self._dtype(case), norm_gradient="full")
        out["trainable"] = np.array(out["trainable"])
        return out


class DoraNormAlwaysDetached(_AdaptedMutant):
    """Declares the full-norm gradient but always detaches the norm (PEFT's convention)."""

    BUG = "the full-norm DoRA gradient asked, the detached one returned"
    MUST_FAIL = frozenset({"layer.dora_full_norm.linear", "layer.dora_full_norm.conv1d"})
    MUST_PASS = frozenset({"layer.dora.linear", "layer.dora.conv1d"})

    def layer_forward_backward(self, case):
        if case.magnitude is None:
            return super().layer_forward_backward(case)
        out = expectations.layer_adapted_forward_backward(case, self._dtype(case), norm_gradient="detached")
        out["trainable"] = np.array(out["trainable"])
        return out


class LoraBiasUnscaled(_AdaptedMutant):
    """Adds b_B outside the scaling: s·BAx + b_B instead of s·(BAx + b_B)."""

    BUG = "lora_bias: the bias of B is not scaled by s"
    MUST_FAIL = frozenset({"layer.lora_bias.linear", "layer.lora_bias.conv1d"})
    MUST_PASS = frozenset({"layer.dora.linear", "layer.dora.conv1d"})

    def layer_forward_backward(self, case):
        if case.lora_bias_B is None:
            return super().layer_forward_backward(case)
        s = case.scaling
        out = expectations.layer_adapted_forward_backward(
            dataclasses.replace(case, lora_bias_B=case.lora_bias_B / s), self._dtype(case)
        )  # y gains s·(b_B / s) = b_B; d(b_B / s) = s·Σ dy, so the unscaled gradient Σ dy is that / s
        out["lora_B_bias"] = out["lora_B_bias"] / s
        out["trainable"] = np.array(out["trainable"])
        return out


class DoraMergeWithoutNorm(_AdaptedMutant):
    """Merges a DoRA layer as W' = m ⊙ V instead of m ⊙ V/‖V‖_row (the norm division forgotten); unmerging
    subtracts the same delta, so W comes back."""

    BUG = "DoRA merge: the weight is not divided by its row norm ‖W + sBA‖"
    MUST_FAIL = frozenset({"layer.dora_merge.linear", "layer.dora_merge.conv1d"})
    MUST_PASS = frozenset({"layer.dora_unmerge.linear", "layer.dora_unmerge.conv1d", "layer.dora_init.linear",
                           "layer.adapters.active.conv1d"})  # fmt: skip

    def layer_merge(self, case):
        if case.magnitude is None:
            return super().layer_merge(case)
        dtype = self._dtype(case)
        weight, bias = expectations.cast(case.weight, dtype), expectations.cast(case.bias, dtype)
        ((_, branch),) = expectations.layer_branches(case, dtype)
        ones = np.ones(case.magnitude.shape, dtype=weight.dtype)  # "norm" 1: the factor is m itself
        delta = dora_delta_weight(weight, branch, expectations.cast(case.magnitude, dtype), case.layout, norm=ones)
        merged = weight + delta
        x = expectations.cast(case.x, dtype)
        merged_y = x @ merged if case.layout == "conv1d" else x @ merged.T
        if bias is not None:
            merged_y = merged_y + bias
        return {"merged_weight": merged, "merged_y": merged_y, "unmerged_weight": merged - delta}


class InitWrongBound(_AdaptedMutant):
    """kaiming_uniform with the bound 1/in instead of 1/√in (A ~ U(±1/in)); B = 0 and y = base still hold, so
    only the KS test of A can show it."""

    BUG = "init law kaiming_uniform: A ~ U(±1/in), not U(±1/√in)"
    MUST_FAIL = frozenset({"layer.init.kaiming_uniform.linear", "layer.init.kaiming_uniform.conv1d"})
    MUST_PASS = frozenset({"layer.init.gaussian.linear", "layer.init.gaussian.conv1d", "layer.init.peft_false.linear",
                           "layer.dora_init.conv1d"})  # fmt: skip

    def layer_init(self, case):
        out = super().layer_init(case)
        if case.init == "kaiming_uniform":
            out["lora_A"] = out["lora_A"] / np.sqrt(case.x.shape[-1])
        return out


class InitGaussianStd(_AdaptedMutant):
    """'gaussian' with std 1/√r instead of 1/r (A ~ N(0, 1/r)); B = 0 and y = base still hold."""

    BUG = "init law gaussian: A ~ N(0, 1/r), not N(0, 1/r²)"
    MUST_FAIL = frozenset({"layer.init.gaussian.linear", "layer.init.gaussian.conv1d"})
    MUST_PASS = frozenset({"layer.init.kaiming_uniform.linear", "layer.init.kaiming_uniform.conv1d",
                           "layer.init.peft_false.conv1d"})  # fmt: skip

    def layer_init(self, case):
        out = super().layer_init(case)
        if case.init == "gaussian":
            out["lora_A"] = out["lora_A"] * np.sqrt(case.r)
        return out


class AdaptersSecondUnscaled(_AdaptedMutant):
    """Sums several active adapters, but the second one (in the active order) is added at scaling 1."""

    BUG = "several adapters: the second active adapter's scaling is dropped (s = 1)"
    MUST_FAIL = frozenset({"layer.adapters.active.linear", "layer.adapters.active.conv1d"})
    MUST_PASS = frozenset({"layer.adapters.disabled.linear", "layer.adapters.disabled.conv1d",
                           "layer.adapters.mixed_batch.linear", "layer.adapters.mixed_batch.conv1d"})  # fmt: skip

    def layer_adapters(self, case):
        if case.active and len(case.active) >= 2:
            second = case.active[1]
            a = case.adapters[second]
            one = float(np.sqrt(a["r"])) if a["use_rslora"] else float(a["r"])  # alpha/√r or alpha/r = 1
            case = dataclasses.replace(case, adapters={**case.adapters, second: {**a, "lora_alpha": one}})
        return super().layer_adapters(case)


LAYER_MUTANTS = [MergeTransposedOnSquareConv1d, UnmergeTransposedOnSquareConv1d]
ADAPTED_MUTANTS = [DoraNormNotDetached, DoraNormAlwaysDetached, LoraBiasUnscaled]
# issue 15.1, the layer protocol's new features (tests/test_layer_advanced.py runs them with NEW_15)
LAYER_15_MUTANTS = [DoraMergeWithoutNorm, InitWrongBound, InitGaussianStd, AdaptersSecondUnscaled]
