"""Known deviations: what a candidate is expected to do differently from the reference, and why.

A driver ships a JSON file (``conformance/deviations/<driver>.json`` for shipped drivers, or the driver's
``deviations`` attribute, or ``--deviations PATH``)::

    {"driver": "peft",
     "deviations": [{"id": "model.position_ids.without_mask",
                     "reason": "transformers infers packed sequences from position_ids when no mask is given",
                     "issue": "https://github.com/..."}]}

``id`` names tests at a dot boundary (test ids are feature ids, ``golden.replay.<fixture>`` for fixtures;
``covers``): a test id equal to it, or one that continues it after a ``"."`` (``"layer.dora"`` covers
``layer.dora.linear`` and ``layer.dora.conv1d``, not ``layer.dora_merge.linear``; ``"layer.init.he_uniform"`` is
not ``layer.init.he_uniform_b.*``). An id that is itself a feature's id covers that feature's tests only
(``"model.dora"`` is not ``model.dora.init``; ``"golden.replay"`` covers every fixture). An id ending in ``"."``
is an explicit prefix: ``"model.dora."`` covers every ``model.dora.*`` (not ``model.dora`` itself). A failing
test a deviation covers is reported as a known deviation and does not fail the run. A deviation that covers no
test is flagged, and so is one whose tests all passed (it no longer reproduces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DeviationsError(ValueError):
    """The deviations file is missing or malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Deviation:
    id: str
    reason: str
    issue: str | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "reason": self.reason, "issue": self.issue}


def load_deviations(path: str | Path | None) -> list[Deviation]:
    if path is None:
        return []
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeviationsError(f"{path}: no such deviations file") from None
    except json.JSONDecodeError as exc:
        raise DeviationsError(f"{path}: not valid JSON ({exc})") from None
    entries = data.get("deviations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DeviationsError(f"{path}: expected an object with a 'deviations' list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise DeviationsError(f"{path}: deviations[{i}] needs a non-empty string 'id'")
        if not isinstance(entry.get("reason"), str) or not entry["reason"].strip():
            raise DeviationsError(f"{path}: deviations[{i}] ({entry['id']}) needs a 'reason'")
        unknown = set(entry) - {"id", "reason", "issue", "reproduction"}
        if unknown:
            raise DeviationsError(f"{path}: deviations[{i}] ({entry['id']}) has unknown fields {sorted(unknown)}")
        out.append(Deviation(entry["id"], entry["reason"].strip(), entry.get("issue")))
    return out


def _feature_ids() -> frozenset[str]:
    from conformance.features import FEATURES

    return frozenset(FEATURES)


def _feature_of(test_id: str) -> str:
    """The feature a test id belongs to: itself, ``golden.replay`` for ``golden.replay.<fixture>``."""
    return "golden.replay" if test_id.startswith("golden.replay.") else test_id


def covers(deviation_id: str, test_id: str) -> bool:
    """Whether a deviation id covers a test id (the rule in the module docstring): equal, or ``test_id``
    continues it after a ``"."`` unless ``deviation_id`` is another feature's own id, or ``deviation_id`` ends in
    ``"."`` (an explicit prefix) and ``test_id`` starts with it."""
    if deviation_id.endswith("."):
        return test_id.startswith(deviation_id)
    if test_id == deviation_id:
        return True
    if not test_id.startswith(deviation_id + "."):
        return False
    return deviation_id not in _feature_ids() or _feature_of(test_id) == deviation_id


def match(deviations: list[Deviation], test_id: str) -> Deviation | None:
    """The first deviation that covers ``test_id`` (``covers``)."""
    return next((d for d in deviations if covers(d.id, test_id)), None)


# The libraries each shipped driver is built on, beyond its own name: a failure of another candidate on the same
# stack that matches one of their known deviations gets a hint naming it (conformance.report)
STACKS = {"peft": ("peft", "transformers"), "adapters_hub": ("adapters", "transformers")}
SHIPPED_DEVIATIONS = Path(__file__).resolve().parent / "deviations"


def libraries_of(versions: dict[str, str]) -> set[str]:
    """The library names in a driver's ``versions()``: each value's first word ("peft 0.21.2" -> "peft") and
    every key naming a library ("transformers": "5.1")."""
    names = {str(v).split()[0].lower() for v in versions.values() if str(v).split()}
    names |= {str(k).lower() for k in versions if k not in ("candidate", "framework")}
    return names


def stack_hints(
    test_ids: list[str], candidate: str, versions: dict[str, str], own_path: str | Path | None
) -> dict[str, dict]:
    """For each failing test id, a known deviation of a shipped driver built on a library this candidate shares
    (from ``versions()``) that covers it (``covers``): ``{"driver", "id", "reason", "shared"}``. The candidate's
    own deviations file is skipped (its matches are known deviations already)."""
    if not test_ids:
        return {}
    libraries = libraries_of(versions)
    own = Path(own_path).resolve() if own_path else None
    hints: dict[str, dict] = {}
    files = []
    for file in sorted(SHIPPED_DEVIATIONS.glob("*.json")):
        shared = sorted(libraries & set(STACKS.get(file.stem, (file.stem,))))
        if shared and file.resolve() != own and file.stem != candidate:
            files.append((file, shared))
    for file, shared in sorted(files, key=lambda f: -len(f[1])):  # the driver sharing the most libraries first
        driver = file.stem
        try:
            deviations = load_deviations(file)
        except DeviationsError:
            continue
        for test_id in test_ids:
            deviation = match(deviations, test_id)
            if deviation is not None and test_id not in hints:
                hints[test_id] = {"driver": driver, "id": deviation.id, "reason": deviation.reason, "shared": shared}
    return hints
