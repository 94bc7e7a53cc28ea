"""PEFT's ``PeftModel.from_pretrained(model, folder)`` (+ ``load_adapter(folder/<name>, name)`` for the
subfolder layout, ``set_adapter``), then ``merge_and_unload()``: merged logits and merged weights."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from conformance.consumers import torch_common
from conformance.files import FILE_FEATURE_IDS


class PeftFromPretrained:
    name = "peft_from_pretrained"
    file_features = frozenset(FILE_FEATURE_IDS)
    notes: ClassVar[dict[str, str]] = {}

    def versions(self) -> dict[str, str]:
        return {"candidate": torch_common.versions()["peft"], **torch_common.versions()}

    def consume(self, base: Path, adapter: Path, input: Path, out_dir: Path) -> dict:
        """logits (and ``logits.<name>``), then merge_and_unload of the default adapter: ``merged_logits`` and
        ``merged.<module>.weight`` (HF's Conv1D layout (in, out)) for every LoRA module."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(torch_common.load_base(base), str(adapter)).eval()
        ids, mask = torch_common.inputs(input)
        others = torch_common.subfolders(adapter)
        for name in others:
            model.load_adapter(str(Path(adapter) / name), adapter_name=name)
        out = {"logits": torch_common.logits(model, ids, mask)}
        for name in others:
            model.set_adapter(name)
            out[f"logits.{name}"] = torch_common.logits(model, ids, mask)
        model.set_adapter("default")
        lora_modules = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")]
        merged = model.merge_and_unload()
        out["merged_logits"] = torch_common.logits(merged, ids, mask)
        state = merged.state_dict()
        for module in lora_modules:
            out[f"merged.{module}.weight"] = state[f"{module}.weight"].double().numpy()
        return out


consumer = PeftFromPretrained()
