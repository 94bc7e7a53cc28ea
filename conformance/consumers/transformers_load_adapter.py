"""transformers' own adapter loading: ``model.load_adapter(folder, adapter_name=...)`` (PeftAdapterMixin),
``model.set_adapter(name)``; not PeftModel.from_pretrained. No merge path (PeftAdapterMixin has none).

transformers 5.24.0 refuses every PeftAdapterMixin method but ``load_adapter`` unless PEFT >= 0.22.0
(``MIN_PEFT_VERSION``), while the newest PEFT release is 0.21.2: ``set_adapter`` raises ``ValueError: The version
of PEFT you are using is not compatible`` (docs/findings.md). To check what the loading code does with the files, this consumer turns that one version gate off
(``transformers.integrations.peft.check_peft_version``) and records it in ``notes`` and its deviations file;
nothing else is patched.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from conformance.consumers import torch_common
from conformance.files import FILE_FEATURE_IDS


class TransformersLoadAdapter:
    name = "transformers_load_adapter"
    file_features = frozenset(f for f in FILE_FEATURE_IDS if not f.startswith("file.merge."))
    notes: ClassVar[dict[str, str]] = {f: "PeftAdapterMixin has no merge (no merge_adapter / merge_and_unload on the transformers model)"
             for f in FILE_FEATURE_IDS if f.startswith("file.merge.")}  # fmt: skip
    notes["version_gate"] = "transformers 5.24.0 demands peft >= 0.22.0 (unreleased); the gate is turned off"

    def versions(self) -> dict[str, str]:
        return {"candidate": torch_common.versions()["transformers"], **torch_common.versions()}

    def _ungate(self) -> None:
        import transformers.integrations.peft as hf_peft

        hf_peft.check_peft_version = lambda min_version=None: None  # see the module docstring

    def consume(self, base: Path, adapter: Path, input: Path, out_dir: Path) -> dict:
        """logits with the top-level adapter; ``logits.<name>`` with each subfolder adapter set alone."""
        self._ungate()
        model = torch_common.load_base(base)
        ids, mask = torch_common.inputs(input)
        model.load_adapter(str(adapter), adapter_name="default")
        others = torch_common.subfolders(adapter)
        for name in others:
            model.load_adapter(str(Path(adapter) / name), adapter_name=name)
        model.set_adapter("default")
        out = {"logits": torch_common.logits(model, ids, mask)}
        for name in others:
            model.set_adapter(name)
            out[f"logits.{name}"] = torch_common.logits(model, ids, mask)
        return out


consumer = TransformersLoadAdapter()
