"""``reflora inspect``: what a LoRA config does to a GPT-2, computed from shapes alone (no weights).

For the seed article's example (``GPT2Config()``, r=8, alpha=16, ``target_modules=['c_attn', 'c_proj']``)
it prints 124,439,808 base parameters and 811,008 trainable ones: ``c_proj`` also matches ``mlp.c_proj``
(PEFT matches by name suffix), and ``c_attn``'s lora_B is (2304, 8), i.e. (out, r).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.targets import adapter_shapes, base_shapes, plan_lora, trainable_bias_keys


def inspect_lora(config: GPT2Config, lora: LoraConfig) -> dict[str, Any]:
    """Counts and shapes: ``base_params`` (tied head counted once), ``trainable_params`` (LoRA tensors plus the
    biases the ``bias`` mode trains), ``lora_params``, ``total_params`` (base + LoRA), ``trainable_fraction``
    (trainable / total), ``lora_tensors`` (PEFT key -> shape) and the targeted modules with r and scaling."""
    plan = plan_lora(config, lora)
    shapes = adapter_shapes(plan)
    base = base_shapes(config)
    base_params = sum(math.prod(s) for s in base.values())
    lora_params = sum(math.prod(s) for s in shapes.values())
    bias_params = sum(math.prod(base[k]) for k in trainable_bias_keys(config, lora, plan))
    total = base_params + lora_params
    trainable = lora_params + bias_params
    return {
        "gpt2": config.to_dict(),
        "lora": lora.to_dict(),
        "base_params": base_params,
        "lora_params": lora_params,
        "trainable_bias_params": bias_params,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "modules": {
            name: {
                "r": m.r,
                "lora_alpha": m.lora_alpha,
                "scaling": m.scaling,
                "in": m.in_features,
                "out": m.out_features,
            }
            for name, m in plan.items()
        },
        "lora_tensors": {key: list(shape) for key, shape in shapes.items()},
    }


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="count parameters and list LoRA tensor shapes for a GPT-2 + LoRA config (no weights needed)",
        description="Print the true parameter counts and PEFT tensor names/shapes for a LoRA config on GPT-2. "
        "Defaults: GPT-2 small and the seed article's config (r=8, alpha=16, target_modules c_attn c_proj).",
    )
    g = p.add_argument_group("LoRA (PEFT LoraConfig fields)")
    g.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    g.add_argument("--target-modules", nargs="+", default=["c_attn", "c_proj"], metavar="NAME",
                   help="module names matched by suffix, as PEFT does (default: c_attn c_proj); "
                   "a single value starting with 're:' is a regex matched with fullmatch")  # fmt: skip
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--bias", choices=["none", "all", "lora_only"], default="none", help="which base biases train")
    g.add_argument("--layers-to-transform", type=int, nargs="+", metavar="I", help="only these layer indices")
    g.add_argument("--qkv-slices", help="per-slice LoRA on c_attn, e.g. 'q,v' (loralib MergedLinear)")
    m = p.add_argument_group("GPT-2 (HF GPT2Config fields)")
    default = GPT2Config()
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
        m.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(default, field), dest=field,
                       help=f"(default {getattr(default, field)})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    targets: Any = args.target_modules
    if len(targets) == 1 and targets[0].startswith("re:"):
        targets = targets[0][3:]
    try:
        config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.n_positions, n_embd=args.n_embd,
                            n_layer=args.n_layer, n_head=args.n_head, n_inner=args.n_inner)  # fmt: skip
        lora = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=targets, use_rslora=args.use_rslora,
                          bias=args.bias, layers_to_transform=args.layers_to_transform,
                          qkv_slices=args.qkv_slices.split(",") if args.qkv_slices else None)  # fmt: skip
        if lora.qkv_slices is not None and not any(m.kind == "attn.c_attn" for m in plan_lora(config, lora).values()):
            raise ConfigError(f"--qkv-slices {args.qkv_slices} slices attn.c_attn, but --target-modules "
                              f"{' '.join(args.target_modules)} targets no c_attn (add c_attn, or drop --qkv-slices)")  # fmt: skip
        report = inspect_lora(config, lora)
    except ConfigError as exc:
        raise SystemExit(f"reflora inspect: error: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title="GPT-2 + LoRA parameters", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("base parameters (tied head counted once)", f"{report['base_params']:,}")
    summary.add_row("LoRA parameters", f"{report['lora_params']:,}")
    summary.add_row("trainable base biases", f"{report['trainable_bias_params']:,}")
    summary.add_row("trainable parameters", f"{report['trainable_params']:,}")
    summary.add_row("total parameters (base + LoRA)", f"{report['total_params']:,}")
    summary.add_row("trainable fraction", f"{report['trainable_fraction']:.4%}")
    console.print(summary)
    tensors = Table(title="LoRA tensors (PEFT adapter_model.safetensors keys)")
    tensors.add_column("key")
    tensors.add_column("shape", justify="right")
    for key, shape in report["lora_tensors"].items():
        tensors.add_row(key, str(tuple(shape)))
    console.print(tensors)
    return 0
