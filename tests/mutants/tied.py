"""Faulty candidates for the tied-embedding features (tests/test_lora_embedding.py): each is the reference with one
bug, and ``MUST_FAIL`` names the features that must catch it."""

from __future__ import annotations

import dataclasses

from conformance.drivers.reference import ReferenceDriver
from reflora.targets import EMBEDDING_MODULE, plan_lora

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
