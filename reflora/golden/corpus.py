"""The committed corpus, ``golden/``: its manifest, reading it, verifying it and generating it.

``cases/<name>.json`` (specs, the source), ``fixtures/<name>.safetensors`` and ``manifest.json`` (every case's
filled spec, the sha256 of its file, provenance). ``generate_corpus`` rewrites it; ``verify_corpus`` regenerates
every case in memory and compares.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflora._version import __version__
from reflora.checkpoint import atomic_write_files
from reflora.config import ConfigError
from reflora.golden.derive import generate_case
from reflora.golden.files import GoldenError, serialize_fixture, sha256_file
from reflora.golden.spec import FORMAT, load_spec, stored_spec
from reflora.golden.verify import RTOL, CaseReport, verify_fixture

CORPUS_LIMIT_BYTES = 20 * 1024 * 1024
MANIFEST = "manifest.json"
CASES_DIR = "cases"
FIXTURES_DIR = "fixtures"
GENERATE_COMMAND = "reflora golden generate"
MANIFEST_FIELDS = frozenset({"format", "case_count", "total_bytes", "rtol", "cases"})
ENTRY_FIELDS = ("file", "sha256", "bytes", "spec", "provenance")


@dataclass
class CorpusReport:
    """The result of verifying the corpus: per-case reports plus corpus-level problems."""

    golden_dir: Path
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    expected_cases: int = 0
    total_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.cases) and len(self.cases) == self.expected_cases > 0


def default_golden_dir() -> Path:
    """``golden/`` next to the ``reflora`` package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parents[2] / "golden"


def read_manifest(golden_dir: str | Path) -> dict[str, Any]:
    path = Path(golden_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldenError(f"{path}: no manifest (run `{GENERATE_COMMAND}`)") from None
    except json.JSONDecodeError as exc:
        raise GoldenError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GoldenError(f"{path}: format is not {FORMAT!r}")
    cases = manifest.get("cases")
    if not isinstance(cases, dict) or not cases:
        raise GoldenError(f"{path}: 'cases' must be a non-empty object")
    unknown = sorted(set(manifest) - MANIFEST_FIELDS)
    if unknown:  # as strict as the spec: a misspelt or newer field is refused, not ignored
        raise GoldenError(f"{path}: unknown fields {unknown} (known: {sorted(MANIFEST_FIELDS)})")
    if manifest.get("case_count") != len(cases):
        raise GoldenError(f"{path}: case_count is {manifest.get('case_count')!r}, but {len(cases)} cases are listed")
    root = Path(golden_dir).resolve()
    for name, entry in cases.items():
        if not isinstance(entry, dict):
            raise GoldenError(f"{path}: case {name!r} must be a JSON object")
        for key in ENTRY_FIELDS:
            if key not in entry:
                raise GoldenError(f"{path}: case {name!r} lacks {key!r}")
        unknown = sorted(set(entry) - set(ENTRY_FIELDS))
        if unknown:
            raise GoldenError(f"{path}: case {name!r} has unknown fields {unknown} (known: {list(ENTRY_FIELDS)})")
        file = entry["file"]
        inside = isinstance(file, str) and file and not Path(file).is_absolute()
        if not inside or not (root / file).resolve().is_relative_to(root):
            raise GoldenError(
                f"{path}: case {name!r}: file {file!r} must be a relative path inside {root} (it leaves the corpus folder)"
            )
        if not isinstance(entry["sha256"], str) or len(entry["sha256"]) != 64:
            raise GoldenError(f"{path}: case {name!r}: sha256 must be 64 hex digits")
    return manifest


def corpus_fixtures(golden_dir: str | Path | None = None) -> dict[str, Path]:
    """Case name -> fixture path for every case in the manifest (for replays such as the conformance suite).
    Each file must exist and match its manifest sha256."""
    golden_dir = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    manifest = read_manifest(golden_dir)
    paths = {}
    for name, entry in manifest["cases"].items():
        path = golden_dir / entry["file"]
        if not path.is_file():
            raise GoldenError(f"{path}: case {name!r} of the manifest is missing")
        if sha256_file(path) != entry["sha256"]:
            raise GoldenError(f"{path}: case {name!r}: sha256 differs from the manifest")
        paths[name] = path
    return paths


def read_case_specs(golden_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Filled spec of every ``cases/<name>.json``, by name; a bad spec is a ``ConfigError`` naming its file."""
    folder = Path(golden_dir) / CASES_DIR
    files = sorted(folder.glob("*.json"))
    if not files:
        raise GoldenError(f"{folder}: no case specs (*.json)")
    specs = {}
    for file in files:
        try:
            spec = load_spec(file)
        except ConfigError as exc:  # name the file once (read_json's messages already start with it)
            raise ConfigError(str(exc) if str(exc).startswith(str(file)) else f"{file}: {exc}") from None
        name = file.stem
        if (spec["dtype"] == "float32") != name.endswith("_float32"):
            raise ConfigError(f"{file}: a case name ends in '_float32' exactly when its spec.dtype is 'float32'")
        specs[name] = spec
    return specs


def verify_corpus(
    golden_dir: str | Path | None = None, progress: Callable[[CaseReport], None] | None = None
) -> CorpusReport:
    """Check the corpus against its manifest and regenerate every case in memory.

    Corpus level: the manifest is readable and lists ``case_count > 0`` cases; ``cases/*.json`` holds exactly
    those cases with the same (filled) specs; ``fixtures/`` holds exactly their files; the total size is what
    the manifest says and under 20 MB. Case level: ``verify_fixture``. ``progress`` is called after each case.
    """
    golden_dir = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    report = CorpusReport(golden_dir=golden_dir)
    start = time.perf_counter()
    try:
        manifest = read_manifest(golden_dir)
    except GoldenError as exc:
        report.problems.append(str(exc))
        return report
    entries = manifest["cases"]
    report.expected_cases = manifest["case_count"]
    try:
        specs = read_case_specs(golden_dir)
        for name in sorted(set(specs) ^ set(entries)):
            where = "cases/ but not the manifest" if name in specs else "the manifest but not cases/"
            report.problems.append(f"case {name}: in {where} (run `{GENERATE_COMMAND}`)")
        for name in sorted(set(specs) & set(entries)):
            if load_spec(entries[name]["spec"]) != specs[name]:
                report.problems.append(
                    f"case {name}: cases/{name}.json differs from the manifest (run `{GENERATE_COMMAND}`)"
                )
    except (GoldenError, ConfigError) as exc:
        report.problems.append(str(exc))
    listed = {(golden_dir / e["file"]).resolve() for e in entries.values()}
    for orphan in sorted((golden_dir / FIXTURES_DIR).glob("*.safetensors")):
        if orphan.resolve() not in listed:
            report.problems.append(f"{orphan}: a fixture that the manifest does not list")
    for name, entry in entries.items():
        path = golden_dir / entry["file"]
        if not path.is_file():
            case = CaseReport(name=name, path=path, problems=[f"file: {path} is missing (listed in the manifest)"])
        else:
            case = verify_fixture(path, name=name, spec=entry["spec"], sha256=entry["sha256"])
            if case.size_bytes != entry["bytes"]:
                case.problems.append(f"file: {case.size_bytes} bytes, the manifest says {entry['bytes']}")
        report.cases.append(case)
        report.total_bytes += case.size_bytes
        if progress is not None:
            progress(case)
    if report.total_bytes != manifest.get("total_bytes"):
        report.problems.append(f"corpus: {report.total_bytes} bytes, the manifest says {manifest.get('total_bytes')}")
    if report.total_bytes > CORPUS_LIMIT_BYTES:
        report.problems.append(f"corpus: {report.total_bytes} bytes exceeds the {CORPUS_LIMIT_BYTES} byte limit")
    report.seconds = time.perf_counter() - start
    return report


def generate_corpus(
    golden_dir: str | Path | None = None, progress: Callable[[str], None] | None = None, force: bool = False
) -> dict[str, Any]:
    """Rewrite ``fixtures/`` and ``manifest.json`` from ``cases/*.json``; returns the manifest.

    A fixture that already verifies against its spec (``verify_fixture``: same spec, inputs bit-exact, outputs
    within ``RTOL``) is kept byte for byte, so re-associated reference ops or a new case never change the
    sha256 of the others; ``force`` rewrites every fixture from a fresh regeneration.

    Every spec is validated and every case generated in memory before anything is written, so a bad spec
    writes nothing. The fixtures and the manifest are then written as one unit (``atomic_write_files``:
    temporary files first, renamed only once all are complete), so an interrupted run leaves the old corpus
    or the new one, never a mix; stale fixtures are removed last. ``progress`` is called with each case name
    once it is generated.
    """
    golden_dir = Path(golden_dir) if golden_dir is not None else default_golden_dir()
    specs = read_case_specs(golden_dir)
    serialized = {}
    for name, spec in specs.items():
        existing = golden_dir / FIXTURES_DIR / f"{name}.safetensors"
        if not force and existing.is_file() and verify_fixture(existing, name=name, spec=spec).ok:
            serialized[name] = existing.read_bytes()  # still right: keep its bytes (and sha256) unchanged
        else:
            tensors, metadata = generate_case(spec)
            serialized[name] = serialize_fixture(tensors, metadata)
        if progress is not None:
            progress(name)
    total = sum(len(data) for data in serialized.values())
    if total > CORPUS_LIMIT_BYTES:
        raise GoldenError(f"the corpus would be {total} bytes, over the {CORPUS_LIMIT_BYTES} byte limit: shrink cases")
    provenance = {"generator": f"reflora {__version__}", "numpy": np.__version__, "command": GENERATE_COMMAND}
    cases, files = {}, {}
    for name, data in serialized.items():
        relative = f"{FIXTURES_DIR}/{name}.safetensors"
        files[golden_dir / relative] = data
        cases[name] = {"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "spec": stored_spec(specs[name]), "provenance": provenance}  # fmt: skip
    manifest = {"format": FORMAT, "case_count": len(cases), "total_bytes": total, "rtol": RTOL, "cases": cases}
    files[golden_dir / MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write_files(files)  # every fixture and the manifest as one unit: all replaced, or none
    for stale in (golden_dir / FIXTURES_DIR).glob("*.safetensors"):
        if stale.name.removesuffix(".safetensors") not in cases:
            stale.unlink()
    return manifest
