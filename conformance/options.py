"""Parsers of the suite's numeric options, shared by the pytest plugin and ``reflora conform`` (stdlib only:
the plugin is loaded by every pytest run where reflora is installed).

``--timeout 0`` (or a negative one) would make a correct candidate "hang" at its first call, and
``--max-examples 0`` would check nothing and pass: both are usage errors.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer >= 1 (``--max-examples``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of examples, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value}): 0 examples would check nothing")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``--timeout`` / ``--candidate-timeout``, in seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds > 0 (got {text}): a driver call cannot finish in no time"
        )
    return value


def feature_seed(text: str) -> int:
    """A whole number >= 0 (``--feature-seed``: the seed of the shuffled feature order)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (the seed a report printed), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value
