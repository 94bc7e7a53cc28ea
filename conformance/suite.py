"""A conformance run: the candidate, its runner, the profile, the known deviations, and what each test found.

The pytest plugin makes one ``Suite`` per session (``--candidate``); the tests in ``conformance/test_*.py``
call ``suite.run_feature``. Each test records its examples, its worst comparison and its first failure, which
``conformance.report`` turns into the table and the JSON report.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from conformance.checks import CheckResult, run_check
from conformance.deviations import Deviation, load_deviations, match
from conformance.features import FEATURES, Feature, missing_capability
from conformance.loader import capabilities_from_json
from conformance.profiles import PROFILES
from conformance.protocol import NotSupported
from conformance.runner import make_runner
from conformance.strategies import draw_advanced_spec, draw_layer_spec, draw_model_spec
from conformance.tolerance import Comparison, IllConditioned

NOT_SUPPORTED = "not supported: "
MAX_REFUSED = 80  # draws a driver may refuse in a row, before any example ran, before the feature is not supported


class ConformanceFailure(AssertionError):
    """A candidate's result disagrees with the reference (hypothesis may shrink it)."""


class CandidateBroke(BaseException):
    """The candidate crashed or hung. A BaseException, so that hypothesis re-raises it at once instead of
    retrying (each retry would cost a worker restart or a full timeout); pytest reports it as a failure."""


@dataclass
class TestRecord:
    test_id: str
    feature: str
    nodeid: str = ""
    examples: int = 0  # every run of the check, after_failure included (the JSON report's "examples")
    after_failure: int = 0  # runs after the first failure: hypothesis's shrink attempts and its final replay
    discarded: int = 0  # ill-conditioned float32 draws, rejected before the candidate ran
    refused: int = 0  # draws the driver refused at run time (NotSupported), redrawn
    refusal: str | None = None  # the first refusal's message
    worst: Comparison | None = None
    worst_dtype: str | None = None
    failure: str | None = None  # the report of the first failing check
    outcome: str = "not run"  # passed, failed, known_deviation, not_supported, skipped, error
    reason: str | None = None  # not supported / skipped reason, or the deviation's reason
    deviation: Deviation | None = None
    duration: float = 0.0

    def add(self, result: CheckResult, candidate: str, prefix: str = "") -> None:
        if self.failure is not None:  # hypothesis's shrink attempts and final replay, after the first failure
            self.after_failure += 1
        self.examples += 1
        worst = result.worst()
        if worst is not None and (self.worst is None or worst.ratio > self.worst.ratio):
            self.worst, self.worst_dtype = worst, result.spec.get("dtype")
        if not result.passed and self.failure is None:
            self.failure = result.report(candidate, prefix)


@dataclass
class Suite:
    candidate: str
    profile: str = "ci"
    isolation: str = "subprocess"
    timeout: float = 60.0
    max_examples: int | None = None
    deviations_path: str | None = None
    golden_dir: str | None = None
    fresh_process: bool = False  # a fresh candidate worker per feature (Suite.isolate)
    feature_seed: int | None = None  # the seed of the shuffled feature order; None: the fixed order
    records: dict[str, TestRecord] = field(default_factory=dict)
    fixture_sha256: dict[str, str] = field(default_factory=dict)  # fixture path -> the manifest's sha256
    started: float = field(default_factory=time.time)

    def start(self) -> None:
        """Load the driver (in the worker, by default) and the deviations; raises DriverLoadError/DeviationsError."""
        # the manifest is read (and checked: reflora.golden.read_manifest) first; GoldenError if malformed
        self.fixture_sha256 = {str(path): sha for _, path, sha in golden_manifest(self.golden_dir)}
        self.runner = make_runner(self.candidate, self.isolation, self.timeout)
        self.info = self.runner.info
        self.capabilities = capabilities_from_json(self.info["capabilities"])
        self.deviations_path = self.deviations_path or self.info.get("deviations")
        self.deviations = load_deviations(self.deviations_path)

    @property
    def replay_prefix(self) -> str:
        """What a replay command needs before ``reflora conform`` (``replay_prefix``), from the loaded driver."""
        info = getattr(self, "info", None) or {}
        return replay_prefix(self.candidate, info.get("import_root"))

    def isolate(self, feature_id: str) -> None:
        """``--fresh-process``: before the first driver call of a feature other than the one the current worker
        served, end the worker and start a fresh one, so that no feature sees the state another feature left in
        the candidate's process (the first feature gets the worker ``start`` made, which ran only versions() and
        capabilities). The golden replays are one feature (``golden.replay``): they share a worker."""
        served = self.__dict__.get("_served")
        if self.fresh_process and served is not None and served != feature_id:
            self.runner.close()
            self.runner = make_runner(self.candidate, self.isolation, self.timeout)
        self._served = feature_id

    def close(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()

    def settings_summary(self) -> dict[str, Any]:
        profile = PROFILES[self.profile]
        from conformance import tolerance

        return {
            "profile": self.profile,
            "examples": {"layer": profile.examples("layer", self.max_examples),
                         "model": profile.examples("model", self.max_examples)},
            "derandomize": profile.derandomize,
            "shrink": profile.shrink,
            "isolation": self.isolation,
            "fresh_process": self.fresh_process,
            "feature_seed": self.feature_seed,
            "timeout_s": self.timeout,
            "deviations_file": self.deviations_path,
            "golden_dir": self.golden_dir,
            "tolerance": {"factor": dict(tolerance.FACTOR), "floor": tolerance.FLOOR,
                          "plain_samples": tolerance.PLAIN_SAMPLES},
        }  # fmt: skip

    def record(self, test_id: str, feature: str, nodeid: str = "") -> TestRecord:
        if test_id not in self.records:
            self.records[test_id] = TestRecord(test_id, feature, nodeid)
        return self.records[test_id]

    def records_by_nodeid(self) -> dict[str, TestRecord]:
        return {r.nodeid: r for r in self.records.values()}

    def deviation_for(self, test_id: str) -> Deviation | None:
        return match(self.deviations, test_id)

    # ------------------------------------------------------------------ running

    def require(self, needs) -> None:
        reason = missing_capability(self.capabilities, tuple(needs))
        if reason is not None:
            pytest.skip(NOT_SUPPORTED + reason)

    def check(self, spec: dict[str, Any], record: TestRecord, redraw_refused: bool = True) -> None:
        """Run one drawn case. A case the driver refuses (NotSupported) is redrawn in a property test, and makes
        the test not supported where there is nothing to redraw (``redraw_refused=False``: a golden fixture)."""
        self.isolate(record.feature)
        try:
            result = run_check(spec, self.runner.call, self.capabilities)
        except NotSupported as exc:  # the driver refused this case at run time
            if not redraw_refused:
                pytest.skip(f"{NOT_SUPPORTED}the driver says: {exc}")
            # a property test draws another case: a driver that declares a capability but cannot express every
            # draw of it (e.g. some target lists) is checked on the draws it can express
            record.refused += 1
            record.refusal = record.refusal or str(exc)
            if record.refused >= MAX_REFUSED and not record.examples:  # do not spend hypothesis's whole budget
                pytest.skip(f"{NOT_SUPPORTED}the driver says: {record.refusal} (it refused all {record.refused} draws)")
            reject()
            return
        except IllConditioned:
            record.discarded += 1
            reject()  # an ill-conditioned float32 draw (see conformance.tolerance): draw another
            return
        record.add(result, self.candidate, self.replay_prefix)
        if result.broke:
            raise CandidateBroke(result.report(self.candidate, self.replay_prefix))
        if not result.passed:
            raise ConformanceFailure(result.report(self.candidate, self.replay_prefix))

    def run_feature(self, feature: Feature, record: TestRecord) -> None:
        """Check the capabilities, then run the feature's property test with the profile's settings."""
        if feature.level == "advanced":
            run_advanced_feature(self, feature, record)
            return
        self.require(feature.needs)
        draw = draw_layer_spec if feature.level == "layer" else draw_model_spec
        capabilities = self.capabilities

        def property_test(data):
            self.check(draw(data, feature, capabilities), record, redraw_refused=True)

        # derandomize seeds from the function's name and source: give each feature its own name (and keep the
        # source of property_test as it is: a changed text draws other cases)
        run_property(property_test, feature, PROFILES[self.profile].settings(feature.level, self.max_examples), record)

    def run_golden(self, fixture: Path, record: TestRecord) -> None:
        from reflora.golden import read_fixture

        problem = fixture_problem(fixture, self.fixture_sha256.get(str(fixture)))
        if problem is not None:
            pytest.skip(problem)
        golden_spec, _ = read_fixture(fixture)
        self.require(golden_needs(golden_spec))
        spec = {"feature": "golden.replay", "fixture": str(fixture), "dtype": golden_spec["dtype"]}
        self.check(spec, record, redraw_refused=False)


def replay_prefix(candidate: str, import_root: str | None) -> str:
    """``cd <folder> && PYTHONPATH=<root> `` for a driver of the user's own (``package.module:object``): the
    replay line a failure prints must find the same module (``import_root``: the folder it was imported from)
    and the same relative paths. Empty for shipped drivers and for modules installed in site-packages."""
    if ":" not in candidate:
        return ""
    import os
    import shlex

    prefix = f"cd {shlex.quote(os.getcwd())} && "
    if import_root and Path(import_root).name not in ("site-packages", "dist-packages"):
        prefix += f"PYTHONPATH={shlex.quote(import_root)} "
    from conformance.consumers.command_layer import LAYER_CANDIDATE, replay_environment

    return prefix + (replay_environment() if candidate == LAYER_CANDIDATE else "")  # a command's template


def run_advanced_feature(suite: Suite, feature: Feature, record: TestRecord) -> None:
    """An advanced feature's property test (docs/advanced-semantics.md): as ``Suite.run_feature``, with the
    model level's settings and ``conformance.strategies.draw_advanced_spec``. Refused cases are redrawn (a
    library whose GPT-2 adapts only some module kinds is checked on the draws it can express)."""
    suite.require(feature.needs)
    draw_spec = draw_advanced_spec

    # the ci profile derandomizes from the property's name and *source* (hypothesis's function_digest): this
    # function's text is the one its draws have always been seeded from; keep it as it is
    def property_test(data):
        suite.check(draw_spec(data, feature), record)

    run_property(property_test, feature, PROFILES[suite.profile].settings("model", suite.max_examples), record)


def run_property(property_test, feature: Feature, settings, record: TestRecord) -> None:
    """Run a feature's property test under ``settings``. Its seeds derandomize from the function's name and
    source, so each feature gets its own name. A feature whose every draw the driver refused is not supported
    (with the driver's reason); one with some refused draws records how many (the JSON report's test entry)."""
    property_test.__name__ = property_test.__qualname__ = f"check_{feature.id.replace('.', '_')}"
    property_test.__module__ = f"conformance.features.{zlib.crc32(feature.id.encode())}"
    try:
        settings(given(st.data())(property_test))()
    except Unsatisfiable:
        if record.examples or not record.refused:
            raise
        pytest.skip(f"{NOT_SUPPORTED}the driver says: {record.refusal} (it refused all {record.refused} draws)")
    if record.refused:
        record.reason = f"the driver refused {record.refused} of the drawn cases: {record.refusal}"


def golden_needs(spec: dict[str, Any]) -> list[str]:
    """The capabilities a golden fixture needs; skips fixtures outside the LoRA driver protocol."""
    lora = spec.get("lora")
    if lora is None or spec.get("train_base"):
        pytest.skip("full fine-tuning fixture: outside the LoRA driver protocol")
    if lora.get("use_dora") or lora.get("lora_bias"):
        pytest.skip(NOT_SUPPORTED + "DoRA / lora_bias fixtures: the driver protocol has no such capability yet")
    if spec.get("adapters") or spec.get("adapter_names") is not None or spec.get("adapter_init", "test") != "test":
        pytest.skip(
            NOT_SUPPORTED + "several-adapter / mixed-batch / PiSSA-OLoRA fixtures: no such protocol capability yet"
        )
    targets = lora.get("target_modules")
    if isinstance(targets, str):
        selection = "target_modules_all_linear" if targets.lower() == "all-linear" else "target_modules_regex"
    else:
        selection = "target_modules_list"
    needs = ["model_level", selection, f"dtype:{spec['dtype']}"]
    if isinstance(targets, list) and any(t == "wte" or t.endswith(".wte") for t in targets):
        needs.append("embedding_lora")  # PEFT suffix matching: "wte" or "transformer.wte"
    if lora.get("exclude_modules"):
        needs.append("exclude_modules")
    if lora.get("trainable_token_indices"):
        needs.append("trainable_tokens")
    if lora.get("use_rslora"):
        needs.append("rslora")
    if lora.get("lora_dropout", 0) > 0 and spec.get("dropout") == "train":
        needs.append("dropout_mask_injection")
    if lora.get("bias", "none") != "none":
        needs.append(f"bias:{lora['bias']}")
    if lora.get("layers_to_transform") is not None:
        needs.append("layers_to_transform")
    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        needs.append("rank_alpha_pattern")
    if (spec.get("reflora_lora") or {}).get("qkv_slices"):
        needs.append("per_slice_qkv")
    if spec.get("padding", "none") != "none":
        needs.append("padding")
    if spec.get("position_ids", "default") != "default":
        needs.append("position_ids")
    if spec.get("scale_ops"):
        needs.append("runtime_scaling")
    if lora.get("modules_to_save"):
        needs.append("modules_to_save")
    if lora.get("ensure_weight_tying"):
        needs.append("ensure_weight_tying")
    return needs


def golden_fixtures(golden_dir: str | Path | None) -> list[tuple[str, Path]]:
    """(name, file) of every fixture in ``golden_dir/manifest.json``, in manifest order; [] without a manifest.
    A malformed manifest (``reflora.golden.read_manifest``: unknown fields, a file leaving the folder) raises
    ``GoldenError``."""
    return [(name, path) for name, path, _ in golden_manifest(golden_dir)]


def golden_manifest(golden_dir: str | Path | None) -> list[tuple[str, Path, str]]:
    """(name, file, sha256 the manifest records) of every fixture of ``golden_dir``; [] without a manifest."""
    if golden_dir is None or not (Path(golden_dir) / "manifest.json").is_file():
        return []
    from reflora.golden import read_manifest

    cases = read_manifest(golden_dir)["cases"]
    return [(name, Path(golden_dir) / entry["file"], entry["sha256"]) for name, entry in cases.items()]


FIXTURE_CORRUPTED = "fixture corrupted: "


def fixture_problem(path: Path, sha256: str | None) -> str | None:
    """Why a golden fixture cannot be trusted (missing, or not the bytes its manifest's sha256 names), or None.
    Checked before each replay: a damaged fixture is the corpus's fault, not the candidate's."""
    from reflora.golden import sha256_file

    if not path.is_file():
        return f"{FIXTURE_CORRUPTED}{path} is missing (listed in the manifest)"
    if sha256 is not None and sha256_file(path) != sha256:
        return (f"{FIXTURE_CORRUPTED}{path}: its sha256 differs from the manifest's, so it was not replayed "
                "(the candidate is not blamed; re-fetch the corpus, `reflora golden verify --dir DIR` says more)")  # fmt: skip
    return None


def feature_of(test_id: str) -> Feature:
    return FEATURES["golden.replay" if test_id.startswith("golden.replay") else test_id]
