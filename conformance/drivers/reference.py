"""The ``reference`` driver: reflora itself, through the driver protocol. It must pass every test.

Layer and model results come from ``conformance.expectations`` (reflora's ops and model) evaluated in the case's
dtype; adapter files go through ``reflora.save_adapter`` / ``reflora.load_adapter``. It is also the base class
of the deliberately wrong drivers in tests/mutants/, and a small worked example of a complete driver.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from conformance import expectations
from conformance.protocol import (
    AdaptersCase,
    Capabilities,
    LayerAdaptersCase,
    LayerCase,
    LayerInitCase,
    ModelCase,
    NotSupported,
    targeted_keys,
)
from reflora import __version__, load_adapter, save_adapter, save_gpt2
from reflora.lora_init import init_adapter, init_lora_module
from reflora.merge import MergeError, merge_adapters, unmerge_adapters
from reflora.model import gpt2_forward
from reflora.targets import plan_lora, trainable_bias_keys
from reflora.weighted import DARE_TYPES

# conformance.init_laws law -> reflora.lora_init's init (PEFT's init_lora_weights)
LAYER_INITS = {"kaiming_uniform": True, "gaussian": "gaussian", "peft_false": False}


class ReferenceDriver:
    name = "reference"
    capabilities = Capabilities(
        layer_layouts=frozenset({"linear", "conv1d"}),
        model_level=True,
        rslora=True,
        dropout_mask_injection=True,
        bias_modes=frozenset({"none", "all", "lora_only"}),
        per_slice_qkv=True,
        dtypes=frozenset({"float64", "float32"}),
        target_modules_list=True,
        target_modules_regex=True,
        layers_to_transform=True,
        rank_alpha_pattern=True,
        target_modules_all_linear=True,
        exclude_modules=True,
        runtime_scaling=True,
        embedding_lora=True,
        trainable_tokens=True,
        modules_to_save=True,
        ensure_weight_tying=True,
        position_ids=True,
        padding=True,
        merge=True,
        merge_qkv_slices=True,  # conformance.expectations.layer_merge: each slice's delta in its own rows
        adapter_files=True,
        adapter_switching=True,
        model_merge=True,
        merge_and_unload=True,
        dora=True,
        lora_bias=True,
        layer_lora_bias=True,
        layer_dora=True,
        layer_dora_full_norm=True,
        layer_dora_merge=True,
        layer_init_methods=frozenset(LAYER_INITS),
        layer_multi_adapter=True,
        layer_mixed_batch=True,
        init_methods=frozenset({"true", "gaussian", "false", "pissa", "olora", "orthogonal", "pissa_niter"}),
        multi_adapter=True,
        mixed_batch=True,
        weighted_combinations=frozenset(
            {"cat", "linear", "svd", "ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd", *DARE_TYPES}
        ),
        notes={
            "dtypes": "NumPy has no bfloat16; reflora's evaluations run in float64 / float32 only "
            "(conformance.expectations.NUMPY_DTYPES), so no float16",
            "layer_init_methods": "reflora.lora_init has PEFT's random inits only (True, 'gaussian', False): "
            "the other laws of conformance.init_laws are other libraries' inits",
        },
    )

    def versions(self) -> dict[str, str]:
        return {"candidate": f"reflora {__version__}", "framework": f"numpy {np.__version__}"}

    @staticmethod
    def _dtype(case) -> str:
        if case.dtype not in expectations.NUMPY_DTYPES:
            raise NotSupported(f"dtype {case.dtype}: NumPy has no such dtype")
        return case.dtype

    def layer_forward_backward(self, case: LayerCase) -> dict:
        if case.lora_bias_B is not None or case.magnitude is not None:  # layer_lora_bias / layer_dora
            out = expectations.layer_adapted_forward_backward(case, self._dtype(case))
        else:
            out = expectations.layer_forward_backward(case, self._dtype(case))
        out["trainable"] = np.array(out["trainable"])
        return out

    def layer_merge(self, case: LayerCase) -> dict:
        return expectations.layer_merge(case, self._dtype(case))

    def layer_init(self, case: LayerInitCase) -> dict:
        """reflora.lora_init.init_lora_module with the law's init, seeded with case.seed; y at init and the DoRA
        magnitude from conformance.expectations.layer_init_expectation (reflora's ops)."""
        if case.init not in LAYER_INITS:
            raise NotSupported(f"init law {case.init!r}: {self.capabilities.notes['layer_init_methods']}")
        dtype = self._dtype(case)
        weight = expectations.cast(case.weight, dtype)
        A, B, new_weight = init_lora_module(LAYER_INITS[case.init], weight, case.r, case.scaling,
                                            np.random.default_rng(case.seed), case.layout)  # fmt: skip
        out = expectations.layer_init_expectation(dataclasses.replace(case, weight=new_weight), A, B, dtype)
        return {"lora_A": A, "lora_B": B, **out}

    def layer_adapters(self, case: LayerAdaptersCase) -> dict:
        return expectations.layer_adapters_forward_backward(case, self._dtype(case))

    def model_forward_backward(self, case: ModelCase) -> dict:
        return expectations.model_forward_backward(case, self._dtype(case))

    def save_adapter(self, case: ModelCase, folder: Path) -> None:
        dtype = expectations.NUMPY_DTYPES[self._dtype(case)]
        plan = plan_lora(case.config, case.lora)
        biases = {k: case.params[k].astype(dtype) for k in trainable_bias_keys(case.config, case.lora, plan)}
        adapter = {k: v.astype(dtype) for k, v in case.adapter.items()}
        save_adapter(folder, adapter, case.lora, case.config, biases=biases or None)

    def load_adapter_logits(self, case: ModelCase, folder: Path) -> np.ndarray:
        adapter, lora, biases = load_adapter(folder, case.config)
        params = {**case.params, **biases}
        return expectations.eval_logits(case, self._dtype(case), params=params, adapter=adapter, lora=lora)

    def model_switch_adapters(self, case: ModelCase) -> dict:
        return expectations.adapter_switch_logits(case, self._dtype(case))

    # ------------------------------------------------------------------ the advanced methods (conformance.protocol.Driver)

    def model_adapters(self, case: AdaptersCase) -> dict:
        return expectations.adapters_forward_backward(case, self._dtype(case))

    def model_merge(self, case: AdaptersCase) -> dict:
        dtype = self._dtype(case)
        if not case.safe:
            return self._merge_round_trip(case, dtype)
        params, adapters = expectations.cast_tree(case.params, dtype), expectations.cast_tree(case.adapters, dtype)
        try:
            merge_adapters(params, case.config, adapters, safe=True)
            refused = False
        except MergeError:
            refused = True
        return {"refused": refused, "after": {k: params[k] for k in targeted_keys(case)}}

    def _merge_round_trip(self, case: AdaptersCase, dtype: str) -> dict:
        params, adapters = expectations.cast_tree(case.params, dtype), expectations.cast_tree(case.adapters, dtype)
        keys = targeted_keys(case)
        logits = gpt2_forward(params, case.config, case.input_ids, adapters=adapters)[0]
        merged, record = merge_adapters(params, case.config, adapters)
        unmerged = unmerge_adapters(merged, case.config, adapters, record)
        return {"logits": logits, "merged_logits": gpt2_forward(merged, case.config, case.input_ids)[0],
                "merged": {k: merged[k] for k in keys}, "unmerged": {k: unmerged[k] for k in keys}}  # fmt: skip

    def merge_and_unload(self, case: AdaptersCase, folder: Path) -> None:
        save_gpt2(folder, expectations.unloaded_params(case, self._dtype(case)), case.config)

    def init_adapter(self, case: AdaptersCase) -> dict:
        dtype = self._dtype(case)
        params = expectations.cast_tree(case.params, dtype)
        adapter, new_params = init_adapter(params, case.config, case.init_lora, np.random.default_rng(case.seed))
        plan = plan_lora(case.config, case.init_lora)
        logits = gpt2_forward(new_params, case.config, case.input_ids, adapter=adapter, lora=case.init_lora)[0]
        return {"adapter": adapter, "params": {f"{m}.weight": new_params[f"{m}.weight"] for m in plan},
                "logits": logits}  # fmt: skip

    def weighted_adapter(self, case: AdaptersCase) -> dict:
        return expectations.weighted_expectation(case, self._dtype(case))


driver = ReferenceDriver()
