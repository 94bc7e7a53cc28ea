"""``reflora merge BASE ADAPTER... --out FOLDER``: merge PEFT adapter folders into a plain GPT-2 folder
(``reflora.merge.merge_and_unload``)."""

from __future__ import annotations

import sys

import numpy as np

from reflora.checkpoint import CheckpointError, load_adapter, load_gpt2, save_gpt2
from reflora.config import ConfigError
from reflora.lora_init import residual_base
from reflora.merge import MergeError, merge_and_unload
from reflora.tools.errors import output_folder


def register(subparsers) -> None:
    """``reflora merge``: merge_and_unload PEFT adapter folders into a GPT-2 folder."""
    parser = subparsers.add_parser(
        "merge",
        help="merge LoRA/DoRA adapters into a plain GPT-2 checkpoint (merge_and_unload)",
        description="Load a GPT-2 folder and PEFT adapter folders, add the adapters' deltas to the weights, and "
        "write a plain GPT-2 folder that transformers loads. Adapter tensors are cast to the base's dtype. A "
        "PiSSA/OLoRA adapter is applied to the residual of the base, as PEFT does when it loads one.",
    )
    parser.add_argument("base", help="GPT-2 folder (model.safetensors + config.json)")
    parser.add_argument(
        "adapters", nargs="+", help="PEFT adapter folders (adapter_model.safetensors + adapter_config.json)"
    )
    parser.add_argument("--out", required=True, type=output_folder,
                        help="folder to write model.safetensors + config.json to (a new path or a folder)")  # fmt: skip
    parser.add_argument("--safe", action="store_true", help="refuse a merge that produces NaN or infinite weights")
    parser.set_defaults(func=_run_merge)


def _run_merge(args) -> int:
    try:
        params, config = load_gpt2(args.base)
        loaded = [load_adapter(folder, config) for folder in args.adapters]
        if len(loaded) > 1 and any(lora.init_lora_weights in ("pissa", "olora") for _, lora, _ in loaded):
            raise MergeError("a PiSSA/OLoRA adapter rewrites the base: merge it alone")
        if sum(bool(biases) for _, _, biases in loaded) > 1:
            raise MergeError("more than one adapter carries trained base biases (bias='all' or 'lora_only')")
        adapters = {}
        for index, (tensors, lora, biases) in enumerate(loaded):
            params = residual_base(params, config, lora)
            params.update({key: np.asarray(value, dtype=params[key].dtype) for key, value in biases.items()})
            dtype = params["transformer.wte.weight"].dtype
            adapters[f"adapter{index}"] = (lora, {key: value.astype(dtype) for key, value in tensors.items()})
        merged = merge_and_unload(params, config, adapters=adapters, safe=args.safe)
        save_gpt2(args.out, merged, config)
    except (CheckpointError, ConfigError, MergeError) as exc:
        print(f"reflora merge: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, OSError) else 2  # a write that failed, or a bad input
    print(f"merged {len(adapters)} adapter(s) into {args.out}")
    return 0
