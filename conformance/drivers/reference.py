"""The ``reference`` driver: reflora itself, through the driver protocol. It must pass every test.

Layer and model results come from ``conformance.reference`` (reflora's ops and model) evaluated in the case's
dtype; adapter files go through ``reflora.save_adapter`` / ``reflora.load_adapter``. It is also the base class
of the deliberately wrong drivers in tests/mutants/, and a small worked example of a complete driver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance import reference
from conformance.protocol import Capabilities, LayerCase, ModelCase, NotSupported
from reflora import __version__, load_adapter, save_adapter
from reflora.targets import plan_lora, trainable_bias_keys


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
        position_ids=True,
        padding=True,
        merge=True,
        adapter_files=True,
        adapter_switching=True,
        notes={"dtypes": "NumPy has no bfloat16"},
    )

    def versions(self) -> dict[str, str]:
        return {"candidate": f"reflora {__version__}", "framework": f"numpy {np.__version__}"}

    @staticmethod
    def _dtype(case) -> str:
        if case.dtype not in reference.NUMPY_DTYPES:
            raise NotSupported(f"dtype {case.dtype}: NumPy has no such dtype")
        return case.dtype

    def layer_forward_backward(self, case: LayerCase) -> dict:
        out = reference.layer_forward_backward(case, self._dtype(case))
        out["trainable"] = np.array(out["trainable"])
        return out

    def layer_merge(self, case: LayerCase) -> dict:
        return reference.layer_merge(case, self._dtype(case))

    def model_forward_backward(self, case: ModelCase) -> dict:
        return reference.model_forward_backward(case, self._dtype(case))

    def save_adapter(self, case: ModelCase, folder: Path) -> None:
        dtype = reference.NUMPY_DTYPES[self._dtype(case)]
        plan = plan_lora(case.config, case.lora)
        biases = {k: case.params[k].astype(dtype) for k in trainable_bias_keys(case.config, case.lora, plan)}
        adapter = {k: v.astype(dtype) for k, v in case.adapter.items()}
        save_adapter(folder, adapter, case.lora, case.config, biases=biases or None)

    def load_adapter_logits(self, case: ModelCase, folder: Path) -> np.ndarray:
        adapter, lora, biases = load_adapter(folder, case.config)
        params = {**case.params, **biases}
        return reference.eval_logits(case, self._dtype(case), params=params, adapter=adapter, lora=lora)

    def model_switch_adapters(self, case: ModelCase) -> dict:
        return reference.adapter_switch_logits(case, self._dtype(case))


driver = ReferenceDriver()
