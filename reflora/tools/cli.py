"""The ``reflora`` console script (also ``python -m reflora.tools``). Each subcommand is one module of
``reflora.tools`` with a ``register(subparsers)``:

* ``reflora inspect``: parameter counts and LoRA tensor shapes from shapes alone (``reflora.tools.inspect``)
* ``reflora golden``: generate and verify golden fixtures (``reflora.tools.golden``, over ``reflora.golden``)
* ``reflora merge``: merge adapters into a GPT-2 checkpoint (``reflora.tools.merge``, over ``reflora.merge``)
* ``reflora conform``: run the conformance suite against a candidate library (``reflora.tools.conform``)
* ``reflora matrix``: the conformance matrix of every candidate (``reflora.tools.matrix``)
* ``reflora bench``: time a LoRA training step against PyTorch (``reflora.tools.bench``)
* ``reflora train``: training with the reference (``reflora.tools.train``)
* ``reflora experiment``: the why-LoRA experiment (``reflora.tools.experiment``)
* ``reflora trajectory``: the golden trajectories (``reflora.tools.trajectory``, over ``reflora.golden.trajectory``)
* ``reflora driver new``: a commented conformance driver skeleton (``reflora.tools.driver``)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reflora._version import __version__
from reflora.tools.errors import guarded

# subcommand -> module with ``register(subparsers)``; each module's parser sets ``func``.
SUBCOMMANDS = {
    "inspect": "reflora.tools.inspect",
    "golden": "reflora.tools.golden",
    "merge": "reflora.tools.merge",
    "conform": "reflora.tools.conform",
    "matrix": "reflora.tools.matrix",
    "bench": "reflora.tools.bench",
    "train": "reflora.tools.train",
    "experiment": "reflora.tools.experiment",
    "trajectory": "reflora.tools.trajectory",
    "driver": "reflora.tools.driver",
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
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("reflora: interrupted", file=sys.stderr)
        return 130
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return guarded(f"reflora {args.command}", args.func, args)  # one line, never a traceback (reflora.tools.errors)


if __name__ == "__main__":
    sys.exit(main())
