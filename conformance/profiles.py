"""Hypothesis profiles of the suite: ``ci``, ``dev`` and ``thorough`` (``--profile``; default ``ci`` when the
``CI`` environment variable is set, else ``dev``).

* ``ci``: derandomized (the same cases on every run), a modest number of examples, no shrinking (a failing
  case is reported as drawn: its spec is a complete reproduction), no deadline. The whole suite against PEFT
  takes a few minutes on 2 cores.
* ``dev``: random cases, more of them, shrinking on: a failure is reduced to a small case.
* ``thorough``: many examples, for release checks.

State isolation (docs/conformance.md "State isolation"): ``dev`` and ``thorough`` run the features in an order
shuffled with a seed that the report prints (``--feature-seed N`` replays it); ``thorough`` also gives every
feature a fresh candidate worker process (``--fresh-process``). ``ci`` keeps the fixed order and one worker.

The settings are applied per test (never loaded globally), so the suite does not change the hypothesis profile
of anything else running in the same process. They are also registered with hypothesis under
``reflora-conformance-<name>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings


@dataclass(frozen=True)
class Profile:
    name: str
    layer_examples: int
    model_examples: int
    derandomize: bool
    shrink: bool
    shuffle: bool = False  # the feature order is shuffled with a printed seed (--feature-seed)
    fresh_process: bool = False  # a fresh candidate worker process per feature (--fresh-process)

    def examples(self, level: str, override: int | None = None) -> int:
        if override is not None:
            return override
        return self.layer_examples if level == "layer" else self.model_examples

    def settings(self, level: str, override: int | None = None) -> settings:
        phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if self.shrink else [])
        return settings(
            max_examples=self.examples(level, override),
            derandomize=self.derandomize,
            deadline=None,
            database=None,  # nothing written to disk; a failure prints its spec, which replays it
            phases=phases,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )


PROFILES = {
    "ci": Profile("ci", layer_examples=20, model_examples=6, derandomize=True, shrink=False),
    "dev": Profile("dev", layer_examples=50, model_examples=15, derandomize=False, shrink=True, shuffle=True),
    "thorough": Profile(
        "thorough",
        layer_examples=400,
        model_examples=80,
        derandomize=False,
        shrink=True,
        shuffle=True,
        fresh_process=True,
    ),
}

for _profile in PROFILES.values():
    settings.register_profile(f"reflora-conformance-{_profile.name}", _profile.settings("layer"))


def default_profile() -> str:
    return "ci" if os.environ.get("CI", "").lower() not in ("", "0", "false") else "dev"
