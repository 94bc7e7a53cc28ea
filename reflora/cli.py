"""The ``reflora`` console script. Each subcommand lives with the code it drives:

* ``reflora inspect``: parameter counts and LoRA tensor shapes from shapes alone (``reflora.inspect``)
* ``reflora golden``: generate and verify golden fixtures (``reflora.golden``)
* ``reflora merge``: merge adapters into a GPT-2 checkpoint (``reflora.merge``)
* ``reflora conform``: run the conformance suite against a candidate library (``conformance.cli``)
* ``reflora bench``: time a LoRA training step against PyTorch (``reflora.bench``)
* ``reflora train``, ``reflora experiment``, ``reflora trajectory``: training with the reference, the why-LoRA
  experiment and the golden trajectories (all registered by ``reflora.train``)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reflora._version import __version__

# subcommand -> module with ``register(subparsers)``; each module's parser sets ``func``.
SUBCOMMANDS = {
    "inspect": "reflora.inspect",
    "golden": "reflora.golden",
    "merge": "reflora.merge",
    "conform": "conformance.cli",
    "matrix": "conformance.matrix",
    "bench": "reflora.bench",
    "train": "reflora.train",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflora",
        description="reflora: the reference GPT-2 + LoRA, its golden fixtures, and a conformance suite for LoRA libraries.",
    )
    parser.add_argument("--version", action="version", version=f"reflora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that subcommand is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
