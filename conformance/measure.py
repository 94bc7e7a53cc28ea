"""Measure the tolerance factors a candidate needs: the evidence behind ``conformance.tolerance.FACTOR``.

    python -m conformance.measure --candidate peft --examples 100 [--derandomize]

For every tensor of every drawn case it prints, per (dtype, level), the factor the candidate's error needed:
``error / max(measured · u_d / u_f32, FLOOR · u_d)`` (the bound divided by FACTOR), as median, 99th percentile
and maximum, with the worst tensor. A FACTOR comfortably above the maximum for a correct candidate (PEFT) keeps
false failures away; docs/conformance.md records the numbers. Features in ``--skip`` (known deviations) and
ill-conditioned float32 draws (discarded by the suite too) are left out.
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
from hypothesis import given, reject
from hypothesis import strategies as st

from conformance.checks import run_check
from conformance.features import FEATURES, missing_capability
from conformance.loader import capabilities_from_json
from conformance.profiles import PROFILES
from conformance.runner import make_runner
from conformance.strategies import draw_layer_spec, draw_model_spec
from conformance.tolerance import FACTOR, IllConditioned


def measure(candidate: str, examples: int, derandomize: bool, skip: list[str]) -> dict:
    runner = make_runner(candidate, "none")
    caps = capabilities_from_json(runner.info["capabilities"])
    needed: dict[tuple[str, str], list[tuple[float, str, str]]] = collections.defaultdict(list)
    failures = []
    profile = PROFILES["ci" if derandomize else "dev"]
    for feature in FEATURES.values():
        if feature.level in ("golden", "advanced") or feature.id in skip or missing_capability(caps, feature.needs):
            continue
        settings = profile.settings(feature.level, examples)
        settings(given(st.data())(_sampler(feature, caps, runner, needed, failures, candidate)))()
    runner.close()
    return {"needed": needed, "failures": failures}


def _sampler(feature, caps, runner, needed, failures, candidate):
    draw = draw_layer_spec if feature.level == "layer" else draw_model_spec

    def sample(data):
        spec = draw(data, feature, caps)
        try:
            result = run_check(spec, runner.call, caps)
        except IllConditioned:
            reject()
        for c in result.comparisons:
            if c.problem is None and c.bound > 0:
                needed[(spec["dtype"], feature.level)].append((c.ratio * FACTOR[spec["dtype"]], feature.id, c.name))
        if not result.passed:
            failures.append(result.report(candidate))

    sample.__name__ = f"measure_{feature.id.replace('.', '_')}"
    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--examples", type=int, default=30, help="examples per feature (default 30)")
    parser.add_argument("--derandomize", action="store_true", help="the ci profile's fixed draws")
    parser.add_argument("--skip", nargs="*", default=[], metavar="FEATURE", help="feature ids to leave out")
    args = parser.parse_args(argv)
    found = measure(args.candidate, args.examples, args.derandomize, args.skip)
    print(f"{'dtype':<10} {'level':<6} {'tensors':>8} {'median':>7} {'p99':>7} {'max':>7}  worst (feature, tensor)")
    for (dtype, level), values in sorted(found["needed"].items()):
        factors = np.array([v[0] for v in values])
        worst = max(values)
        print(f"{dtype:<10} {level:<6} {len(factors):>8} {np.median(factors):7.2f} {np.quantile(factors, 0.99):7.2f} "
              f"{factors.max():7.2f}  {worst[1]}, {worst[2]}  (FACTOR {FACTOR[dtype]:g})")  # fmt: skip
    print(f"{len(found['failures'])} failing cases")
    for report in found["failures"][:3]:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
