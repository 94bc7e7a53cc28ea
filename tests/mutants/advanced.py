"""Mutants for the advanced features (docs/advanced-semantics.md): the reference driver with one bug each in merge,
DoRA, inits, several adapters or weighted combinations. Same contract as tests/mutants/catalog.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from conformance.drivers.reference import ReferenceDriver
from conformance.expectations import module_deltas
from reflora.model import gpt2_forward, gpt2_loss_and_grads
from reflora.targets import plan_lora
from reflora.weighted import DARE_TYPES, FACTOR_TYPES, add_weighted_adapter


class AdvancedMutant(ReferenceDriver):
    BUG = ""
    MUST_FAIL: frozenset[str] = frozenset()
    MUST_PASS: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return f"mutant-{type(self).__name__}"


class DoraNormNotDetached(AdvancedMutant):
    BUG = "DoRA's gradient flows through the norm ‖W + sBA‖ (the paper and PEFT detach it)"
    MUST_FAIL = frozenset({"model.dora", "model.dora.dropout"})
    MUST_PASS = frozenset({"model.adapters.active", "model.dora.init"})

    def model_adapters(self, case):
        kwargs = dict(adapters=case.adapters, active=case.active, adapter_names=case.adapter_names,
                      dropout_masks=case.dropout_masks, dora_norm_gradient="full")  # fmt: skip
        loss, logits, grads = gpt2_loss_and_grads(case.params, case.config, case.input_ids, case.labels,
                                                  wrt=case.wrt, **kwargs)  # fmt: skip
        return {"logits": logits, "loss": np.asarray(loss), "grads": grads}


class DoraMagnitudeColumnNorms(AdvancedMutant):
    BUG = "DoRA's magnitude at init is the norm over the output dimension (columns of Wt), not per output row"
    MUST_FAIL = frozenset({"model.dora.init"})
    MUST_PASS = frozenset({"model.init.true", "model.dora"})

    def init_adapter(self, case):
        out = super().init_adapter(case)
        if not case.init_lora.use_dora:
            return out
        for name, module in plan_lora(case.config, case.init_lora).items():
            weight = case.params[f"{name}.weight"]  # (in, out): the Conv1D layout
            wrong = np.linalg.norm(weight, axis=1)  # (in,): a norm per input unit
            out["adapter"][module.magnitude_key] = np.resize(wrong, module.out_features)
        return out


class ModelMergeWithoutScaling(AdvancedMutant):
    BUG = "the model-level merge adds B A instead of s·B A"
    MUST_FAIL = frozenset({"model.merge.lora"})
    MUST_PASS = frozenset({"model.merge.safe", "model.adapters.active"})

    def model_merge(self, case):
        if case.safe:
            return super().model_merge(case)
        unscaled = {}
        for name, (lora, tensors) in case.adapters.items():
            r = lora.r
            alpha = math.sqrt(r) if lora.use_rslora else r  # s = 1
            unscaled[name] = (dataclasses.replace(lora, lora_alpha=alpha), tensors)
        wrong = super().model_merge(dataclasses.replace(case, adapters=unscaled))
        right = super().model_merge(case)
        return {**right, "merged": wrong["merged"], "merged_logits": wrong["merged_logits"]}


class DisableKeepsAdapters(AdvancedMutant):
    BUG = "disabling every adapter still applies them"
    MUST_FAIL = frozenset({"model.adapters.disabled"})
    MUST_PASS = frozenset({"model.adapters.active", "model.adapters.mixed_batch"})

    def model_adapters(self, case):
        if case.active == []:
            case = dataclasses.replace(case, active=None)
        return super().model_adapters(case)


class MixedBatchShifted(AdvancedMutant):
    BUG = "in a mixed batch, row i uses the adapter named for row i+1"
    MUST_FAIL = frozenset({"model.adapters.mixed_batch"})
    MUST_PASS = frozenset({"model.adapters.active", "model.adapters.disabled"})

    def model_adapters(self, case):
        if case.adapter_names is not None:
            names = list(case.adapter_names)
            case = dataclasses.replace(case, adapter_names=names[1:] + names[:1])
        return super().model_adapters(case)


class CatScalingTwice(AdvancedMutant):
    BUG = "the 'cat' combination's new adapter has scaling 2 (lora_alpha = 2·r_new)"
    MUST_FAIL = frozenset({"model.weighted.cat"})
    MUST_PASS = frozenset({"model.weighted.linear", "model.weighted.svd"})

    def weighted_adapter(self, case):
        out = super().weighted_adapter(case)
        if case.combination["combination_type"] != "cat":
            return out
        out["deltas"] = {k: 2 * v for k, v in out["deltas"].items()}
        lora, tensors = add_weighted_adapter(case.config, case.adapters, **_combination(case))
        doubled = {k: 2 * v if ".lora_B." in k else v for k, v in tensors.items()}
        out["logits"] = gpt2_forward(case.params, case.config, case.input_ids, adapter=doubled, lora=lora)[0]
        return out


def _combination(case) -> dict:
    c = case.combination
    return {"names": c["names"], "weights": c["weights"], "combination_type": c["combination_type"],
            "svd_rank": c["svd_rank"]}  # fmt: skip


class GaussianStdRootR(AdvancedMutant):
    BUG = "init_lora_weights='gaussian' draws A with std 1/√r instead of 1/r"
    MUST_FAIL = frozenset({"model.init.gaussian"})
    MUST_PASS = frozenset({"model.init.true", "model.init.false"})

    def init_adapter(self, case):
        out = super().init_adapter(case)
        if case.init_lora.init_lora_weights == "gaussian":
            rng = np.random.default_rng(case.seed)
            for module in plan_lora(case.config, case.init_lora).values():
                key = module.branches[0].a_key
                out["adapter"][key] = rng.normal(0.0, 1.0 / math.sqrt(module.r), out["adapter"][key].shape)
        return out


class PruningIgnoresDensity(AdvancedMutant):
    BUG = "'ties' and 'magnitude_prune' prune nothing (density taken as 1)"
    MUST_FAIL = frozenset({"model.weighted.ties", "model.weighted.magnitude_prune"})
    MUST_PASS = frozenset({"model.weighted.linear", "model.weighted.cat"})

    def weighted_adapter(self, case):
        if case.combination.get("density") is not None:
            case = dataclasses.replace(case, combination={**case.combination, "density": 1.0})
        return super().weighted_adapter(case)


class OrthogonalFullRank(AdvancedMutant):
    BUG = "init_lora_weights='orthogonal' uses the whole Q for both A and B (B A ≠ 0, full rank)"
    MUST_FAIL = frozenset({"model.init.orthogonal"})
    MUST_PASS = frozenset({"model.init.true"})

    def init_adapter(self, case):
        out = super().init_adapter(case)
        if case.init_lora.init_lora_weights == "orthogonal":
            rng = np.random.default_rng(case.seed)
            for module in plan_lora(case.config, case.init_lora).values():
                q, _ = np.linalg.qr(rng.standard_normal((module.r, module.r)))
                a_key, b_key = module.branches[0].a_key, module.branches[0].b_key
                out["adapter"][a_key] = (rng.standard_normal((module.in_features, module.r)) @ q).T / 10
                out["adapter"][b_key] = rng.standard_normal((module.r, module.out_features)).T @ q / 10
        return out


class PissaNiterKeepsBase(AdvancedMutant):
    BUG = "init_lora_weights='pissa_niter_K' leaves the base weights unchanged (no residual)"
    MUST_FAIL = frozenset({"model.init.pissa_niter"})
    MUST_PASS = frozenset({"model.init.pissa"})

    def init_adapter(self, case):
        out = super().init_adapter(case)
        if str(case.init_lora.init_lora_weights).startswith("pissa_niter_"):
            out["params"] = {k: np.asarray(case.params[k]) for k in out["params"]}
        return out


class DareWithoutRescale(AdvancedMutant):
    BUG = "DARE drops the masked entries but does not rescale the kept ones by 1/density"
    MUST_FAIL = frozenset({"model.weighted.dare_linear", "model.weighted.dare_ties", "model.weighted.dare_linear_svd",
                           "model.weighted.dare_ties_svd"})  # fmt: skip
    MUST_PASS = frozenset({"model.weighted.ties", "model.weighted.magnitude_prune_svd"})

    def weighted_adapter(self, case):
        c = case.combination
        if c["combination_type"] not in DARE_TYPES or not case.keep_masks:
            return super().weighted_adapter(case)
        lora, tensors = add_weighted_adapter(case.config, case.adapters, **_combination(case), density=c["density"],
                                             majority_sign_method=c["majority_sign_method"],
                                             keep_masks=case.keep_masks)  # fmt: skip
        # without the 1/density, every pruned task tensor is density times smaller: both factors (dare_linear,
        # dare_ties: the disjoint mean is linear in a positive scale) or the ΔW_i (the _svd forms)
        both = c["combination_type"] in FACTOR_TYPES
        d = c["density"]
        tensors = {k: v * d if ".lora_B." in k or (both and ".lora_A." in k) else v for k, v in tensors.items()}
        out = module_deltas(case.config, lora, tensors)
        out.pop("bias_deltas")
        out["logits"] = gpt2_forward(case.params, case.config, case.input_ids, adapter=tensors, lora=lora)[0]
        return out


class MergeIgnoresTrainableTokens(AdvancedMutant):
    BUG = "the model-level merge leaves wte's trainable-token rows as they were (only the LoRA deltas merged)"
    MUST_FAIL = frozenset({"model.merge.trainable_tokens", "model.merge.trainable_tokens_mixed"})
    MUST_PASS = frozenset({"model.merge.lora", "model.adapters.trainable_tokens"})

    def model_merge(self, case):
        right = super().model_merge(case)
        if case.safe or not any(lora.trainable_token_indices for lora, _ in case.adapters.values()):
            return right
        merged = dict(right["merged"])
        merged["transformer.wte.weight"] = case.params["transformer.wte.weight"]
        params = {**case.params, **{k: v for k, v in merged.items() if k in case.params}}
        logits = gpt2_forward(params, case.config, case.input_ids)[0]
        return {**right, "merged": merged, "merged_logits": logits}


ADVANCED_MUTANTS = [DoraNormNotDetached, DoraMagnitudeColumnNorms, ModelMergeWithoutScaling, DisableKeepsAdapters,
                    MixedBatchShifted, CatScalingTwice, GaussianStdRootR, PruningIgnoresDensity,
                    OrthogonalFullRank, PissaNiterKeepsBase, DareWithoutRescale, MergeIgnoresTrainableTokens]  # fmt: skip
