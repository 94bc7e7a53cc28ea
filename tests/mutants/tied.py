"""Faulty candidates for the tied-embedding features (tests/test_lora_embedding.py): each is the reference with one
bug, and ``MUST_FAIL`` names the features that must catch it."""

from __future__ import annotations

import dataclasses

from conformance.drivers.reference import ReferenceDriver
from reflora.targets import EMBEDDING_MODULE, HEAD_MODULE, SAVED_SUFFIX, plan_lora

WTE_B = "base_model.model.transformer.wte.lora_embedding_B"


class WteScalingMissing(ReferenceDriver):
    """LoRA on wte without its scaling s (B used as if s = 1); the Conv1Ds keep theirs."""

    name = "wte_scaling_missing"
    MUST_FAIL = ("model.embedding.lora",)

    def model_forward_backward(self, case):
        if WTE_B not in case.adapter:
            return super().model_forward_backward(case)
        s = plan_lora(case.config, case.lora)[EMBEDDING_MODULE].scaling
        adapter = {**case.adapter, WTE_B: case.adapter[WTE_B] / s}
        out = super().model_forward_backward(dataclasses.replace(case, adapter=adapter))
        out["grads"][WTE_B] = out["grads"][WTE_B] / s  # d/dB of s·(B/s): what a candidate without s reports
        return out


class TokensHeadUntied(ReferenceDriver):
    """trainable_token_indices in the lookup only: the head keeps the base rows (as modules_to_save=["wte"] does)."""

    name = "tokens_head_untied"
    MUST_FAIL = ("model.embedding.trainable_tokens",)

    def model_forward_backward(self, case):
        import numpy as np

        import reflora as rf

        out = super().model_forward_backward(case)
        if case.lora.trainable_token_indices is None:
            return out
        (tokens,) = [m for m in plan_lora(case.config, case.lora).values() if m.tokens_key is not None]
        _, cache = rf.gpt2_forward(case.params, case.config, case.input_ids, adapter=case.adapter, lora=case.lora,
                                   attention_mask=case.attention_mask, position_ids=case.position_ids,
                                   dropout_masks=case.dropout_masks)  # fmt: skip
        idx = np.asarray(tokens.token_indices)
        shift = cache["hf"] @ (case.params["transformer.wte.weight"][idx] - case.adapter[tokens.tokens_key]).T
        logits = np.array(out["logits"], dtype=np.float64)
        logits[..., idx] += shift.reshape(*logits.shape[:-1], len(idx))  # the head's columns of the new rows use W
        out["logits"] = logits.astype(np.asarray(out["logits"]).dtype)
        return out


class WteCopyTiesHead(ReferenceDriver):
    """modules_to_save=["wte"] read as tied: the head uses wte's trainable copy too (PEFT keeps it on the frozen W;
    only 'lm_head' + ensure_weight_tying ties)."""

    name = "wte_copy_ties_head"
    MUST_FAIL = ("model.modules_to_save.wte",)

    def model_forward_backward(self, case):
        lora = case.lora
        if lora.modules_to_save is None or HEAD_MODULE + SAVED_SUFFIX in plan_lora(case.config, lora):
            return super().model_forward_backward(case)
        if EMBEDDING_MODULE + SAVED_SUFFIX not in plan_lora(case.config, lora):
            return super().model_forward_backward(case)
        tied = dataclasses.replace(lora, modules_to_save=(*lora.modules_to_save, "lm_head"), ensure_weight_tying=True)
        return super().model_forward_backward(dataclasses.replace(case, lora=tied))


class HeadCopyIgnored(ReferenceDriver):
    """modules_to_save=["lm_head"] trains a copy of the head that the forward never uses (the head keeps W)."""

    name = "head_copy_ignored"
    MUST_FAIL = ("model.modules_to_save.lm_head",)

    def model_forward_backward(self, case):
        import numpy as np

        out = super().model_forward_backward(case)
        key = "base_model.model.lm_head.weight"
        if key not in case.adapter:
            return out
        plain = dataclasses.replace(case, adapter={**case.adapter, key: case.params["transformer.wte.weight"]})
        wrong = super().model_forward_backward(plain)  # the head computes with W
        wrong["grads"][key] = np.zeros_like(np.asarray(out["grads"][key]))  # unused: no gradient
        return wrong
