"""Shared torch helpers of the transformers / PEFT consumers: load the base, run it, return float64 arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reflora.checkpoint import read_safetensors


def load_base(base: Path):
    """transformers.GPT2LMHeadModel.from_pretrained(base) in float32, eval mode (the consumer computes in float32
    whatever the file dtype, as a user loading a float16 file with torch_dtype=float32 would)."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel.from_pretrained(str(base), dtype=torch.float32).eval()


def inputs(path: Path):
    """(input_ids, attention_mask) as torch int64 tensors from the case's input file."""
    import torch

    data = read_safetensors(path)
    ids, mask = data["input_ids"].astype(np.int64), data["attention_mask"].astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def logits(model, ids, mask) -> np.ndarray:
    """Eval logits (B, T, V) as float64."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double().numpy()


def subfolders(adapter: Path) -> list[str]:
    """Names of the further adapters of PEFT's subfolder layout (``adapter/<name>/adapter_config.json``)."""
    return sorted(p.parent.name for p in Path(adapter).glob("*/adapter_config.json"))


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"transformers": f"transformers {transformers.__version__}", "peft": f"peft {peft.__version__}",
            "framework": f"torch {torch.__version__}"}  # fmt: skip
