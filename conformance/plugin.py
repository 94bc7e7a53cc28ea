"""The pytest plugin of the conformance suite (entry point ``reflora_conformance``).

    pytest conformance --candidate peft [--profile ci] [--report-json report.json] [--junitxml junit.xml]

It adds the suite's options, starts the candidate's driver for the session, prints every setting in the report
header, turns failures that a known deviation explains into "known deviation" (xfail), prints the table and
the score at the end and writes the JSON report. It does nothing unless conformance tests are collected; if they
are and no candidate is given, the run stops with a usage error (it never runs nothing and passes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import pytest

from conformance.options import feature_seed, positive_float, positive_int

# Only pytest is imported here: this plugin is loaded by every pytest run where reflora is installed, also
# without the "conform" extra (hypothesis, rich); the suite's modules are imported once a candidate is given.
SUITE = pytest.StashKey["Suite"]()
TEST_ID = pytest.StashKey[str]()


GOLDEN_DIR_VARIABLE = "REFLORA_GOLDEN_DIR"


def default_golden_dir() -> str | None:
    """The golden fixtures to replay when --golden-dir is not given, the first that has a manifest.json:
    ``$REFLORA_GOLDEN_DIR``; ``golden/`` of a source checkout (next to the ``conformance`` package); the copy an
    installed wheel carries, ``<prefix>/share/reflora/golden`` (pyproject.toml's data-files)."""
    import sysconfig

    candidates = [os.environ.get(GOLDEN_DIR_VARIABLE), Path(__file__).resolve().parent.parent / "golden",
                  Path(sysconfig.get_path("data")) / "share" / "reflora" / "golden"]  # fmt: skip
    for folder in candidates:
        if folder and (Path(folder) / "manifest.json").is_file():
            return str(folder)
    return None


def pytest_addoption(parser) -> None:
    group = parser.getgroup("reflora conformance", "reflora conformance suite (pytest conformance --candidate ...)")
    group.addoption(
        "--candidate",
        dest="conformance_candidate",
        metavar="NAME|MODULE:OBJECT",
        help="the LoRA library under test: a shipped driver name or package.module:object",
    )
    group.addoption(
        "--profile",
        dest="conformance_profile",
        choices=["ci", "dev", "thorough"],
        default=None,
        help="hypothesis profile (default: ci when $CI is set, else dev)",
    )
    group.addoption(
        "--max-examples",
        dest="conformance_max_examples",
        type=positive_int,
        default=None,
        metavar="N",
        help="examples per feature, overriding the profile",
    )
    group.addoption(
        "--isolation",
        dest="conformance_isolation",
        choices=["subprocess", "none"],
        default="subprocess",
        help="run the candidate in a worker process (default; survives crashes and hangs) or in-process (the "
        "timeout then interrupts Python code only; a crash or os._exit ends the run, and the --report-json "
        "file holds the tests run so far)",
    )
    group.addoption("--fresh-process", dest="conformance_fresh_process", action=argparse.BooleanOptionalAction,
                    default=None, help="run every feature in a fresh candidate worker process (default: on in the "
                    "thorough profile, off in ci and dev; needs --isolation subprocess)")  # fmt: skip
    group.addoption("--feature-seed", dest="conformance_feature_seed", type=feature_seed, default=None, metavar="N",
                    help="shuffle the feature order with this seed (the dev and thorough profiles shuffle with a "
                    "random seed the report prints; ci keeps the fixed order unless a seed is given)")  # fmt: skip
    group.addoption(
        "--candidate-timeout",
        dest="conformance_timeout",
        type=positive_float,
        default=120.0,
        metavar="S",
        help="seconds (> 0) one driver call, versions() and capabilities included, may take before the candidate "
        "counts as hung (default 120)",
    )
    group.addoption(
        "--deviations",
        dest="conformance_deviations",
        default=None,
        metavar="PATH",
        help="known-deviations JSON (default: the driver's own)",
    )
    group.addoption(
        "--report-json",
        dest="conformance_report_json",
        default=None,
        metavar="PATH",
        help="write the machine-readable report (schema in docs/conformance.md)",
    )
    group.addoption("--conformance-progress", dest="conformance_progress", action="store_true", default=False,
                    help="one line per feature as it finishes (result, examples, time) instead of pytest's dots; "
                    "reflora conform sets it")  # fmt: skip
    group.addoption("--golden-dir", dest="conformance_golden_dir", default=default_golden_dir(), metavar="DIR",
                    help="golden fixtures to replay (default: $REFLORA_GOLDEN_DIR, golden/ of a source checkout, or the "
                    "copy an installed wheel carries in <prefix>/share/reflora/golden)")  # fmt: skip


def pytest_configure(config) -> None:
    _CONFIG["config"] = config
    config.addinivalue_line("markers", "conformance: a test of the reflora conformance suite (needs --candidate)")
    candidate = config.getoption("conformance_candidate")
    if candidate and os.environ.get("REFLORA_CONFORM_SCRATCH"):  # run by `reflora conform`: no ./.hypothesis
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(os.environ["REFLORA_CONFORM_SCRATCH"])
    if candidate:
        from conformance.profiles import default_profile
        from conformance.suite import Suite

        config.stash[SUITE] = Suite(
            candidate=candidate,
            profile=config.getoption("conformance_profile") or default_profile(),
            isolation=config.getoption("conformance_isolation"),
            timeout=config.getoption("conformance_timeout"),
            max_examples=config.getoption("conformance_max_examples"),
            deviations_path=config.getoption("conformance_deviations"),
            golden_dir=config.getoption("conformance_golden_dir"),
        )
        _state_isolation(config, config.stash[SUITE])


def _state_isolation(config, suite) -> None:
    """Set ``suite.fresh_process`` and ``suite.feature_seed`` from the options and the profile (docs/conformance.md
    "State isolation"). An xdist worker takes the controller's seed (``pytest_configure_node``): every worker
    must collect the same order."""
    import random

    from conformance.profiles import PROFILES

    profile = PROFILES[suite.profile]
    fresh = config.getoption("conformance_fresh_process")  # None: the profile's (off under --isolation none)
    suite.fresh_process = profile.fresh_process and suite.isolation == "subprocess" if fresh is None else fresh
    if suite.fresh_process and suite.isolation != "subprocess":
        raise pytest.UsageError("reflora conformance: --fresh-process needs --isolation subprocess (a fresh process "
                                "per feature is a fresh candidate worker)")  # fmt: skip
    seed = config.getoption("conformance_feature_seed")
    if hasattr(config, "workerinput"):
        seed = config.workerinput.get("reflora_feature_seed", seed)
    elif seed is None and profile.shuffle:
        seed = random.SystemRandom().randrange(2**32)
    suite.feature_seed = seed


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist, on the controller: hand the feature seed to each worker, which shuffles the same way."""
    suite = node.config.stash.get(SUITE, None)
    if suite is not None:
        node.workerinput["reflora_feature_seed"] = suite.feature_seed


def pytest_collection_modifyitems(session, config, items) -> None:
    """With a feature seed: shuffle the conformance tests by feature (a feature's tests, e.g. the golden
    replays, stay together and in order), ``random.Random(seed).shuffle`` of the features in collection order.
    Other tests keep their places."""
    suite = config.stash.get(SUITE, None)
    if suite is None or suite.feature_seed is None:
        return
    import random

    from conformance.suite import feature_of

    places = [i for i, item in enumerate(items) if _test_id(item) is not None]
    groups: dict[str, list] = {}
    for i in places:
        groups.setdefault(feature_of(_test_id(items[i])).id, []).append(items[i])
    order = list(groups)
    random.Random(suite.feature_seed).shuffle(order)
    for i, item in zip(places, [item for feature in order for item in groups[feature]], strict=True):
        items[i] = item


def pytest_sessionstart(session) -> None:
    suite = session.config.stash.get(SUITE, None)
    if suite is None:
        return
    from conformance.deviations import DeviationsError
    from conformance.protocol import CandidateError, DriverLoadError
    from reflora.golden import GoldenError

    if xdist_role(session.config) == "controller":
        return  # the workers start the candidate, one each (see "pytest-xdist" below)
    try:
        suite.start()
    except (DriverLoadError, DeviationsError, CandidateError) as exc:
        raise pytest.UsageError(f"reflora conformance: {exc}") from None
    except GoldenError as exc:
        raise pytest.UsageError(f"reflora conformance: --golden-dir: {exc}") from None
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if session.config.getoption("conformance_progress") and terminal is not None:
        terminal.showfspath = False  # the per-feature lines replace the file names and dots
    try:
        _write_partial_report(session.config, None)
    except OSError as exc:
        path = session.config.getoption("conformance_report_json")
        raise pytest.UsageError(f"reflora conformance: --report-json {path}: cannot write it ({exc})") from None


def _write_partial_report(config, running: str | None) -> None:
    """The --report-json file as it stands (``"complete": false``; ``"running"``: the test in progress): written
    before and after every test, so that a run that dies (isolation none: a driver calling os._exit, a
    segfault; a killed process) leaves the tests run so far on disk. The last write, at the end, is complete."""
    suite = config.stash.get(SUITE, None)
    path = config.getoption("conformance_report_json")
    if suite is None or not path or not hasattr(suite, "info") or xdist_role(config) == "worker":
        return
    from conformance.report import build_report, write_json

    write_json(build_report(suite, complete=False, running=running), path)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    test_id = item.stash.get(TEST_ID, None)
    if test_id is not None:
        _write_partial_report(item.config, test_id)


def pytest_runtest_teardown(item, nextitem) -> None:
    if item.stash.get(TEST_ID, None) is not None:
        _write_partial_report(item.config, None)


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report, config):
    """With --conformance-progress a conformance test prints its own line (``pytest_runtest_logfinish``), so
    pytest's letter is left out; the category (for the summary counts) stays pytest's."""
    suite = config.stash.get(SUITE, None)
    if not config.getoption("conformance_progress") or suite is None:
        return None
    if report.nodeid not in suite.records_by_nodeid():
        return None
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), "", ""
    if report.when == "call" or not report.passed:
        return ("error" if report.when != "call" and report.failed else report.outcome), "", ""
    return "", "", ""


def pytest_runtest_logfinish(nodeid, location) -> None:
    config = _CONFIG.get("config")
    if config is None or not config.getoption("conformance_progress"):
        return
    suite = config.stash.get(SUITE, None)
    record = None if suite is None else suite.records_by_nodeid().get(nodeid)
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if record is None or terminal is None:
        return
    from conformance.report import examples_text, ratio_text

    done = sum(r.outcome != "not run" for r in suite.records.values())
    label = {"passed": "pass", "failed": "FAIL", "known_deviation": "known deviation", "not_supported": "not supported",
             "error": "ERROR"}.get(record.outcome, record.outcome)  # fmt: skip
    worst = f", worst {ratio_text(record.worst.ratio)}× bound" if record.worst is not None else ""
    examples = examples_text({"examples": record.examples, "after_failure": record.after_failure})
    line = f"[{done:>3}/{len(suite.records)}] {record.test_id:<40} {label}"
    if record.outcome not in ("not_supported", "skipped"):
        line += f" ({examples} examples{worst}, {record.duration:.1f} s)"
    terminal.write_line(line)


_CONFIG: dict = {}  # the session's config, for the hooks pytest calls without it


def pytest_unconfigure(config) -> None:
    _CONFIG.pop("config", None)
    suite = config.stash.get(SUITE, None)
    if suite is not None:
        suite.close()


def pytest_report_header(config) -> list[str]:
    suite = config.stash.get(SUITE, None)
    if suite is None or not hasattr(suite, "info"):
        return []
    import platform

    import numpy

    from reflora import __version__

    info, settings = suite.info, suite.settings_summary()
    caps = [k for k, v in info["capabilities"].items() if v and k != "notes"]
    return [
        f"reflora conformance: candidate {info['name']} (--candidate {suite.candidate})",
        "  versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; reflora {__version__}, numpy {numpy.__version__}, python {platform.python_version()}",
        "  settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "tolerance"),
        "  tolerance: " + ", ".join(f"{k}={v}" for k, v in settings["tolerance"].items()),
        f"  deviations: {len(suite.deviations)} known, from {suite.deviations_path}",
        "  capabilities: " + ", ".join(caps),
    ]


def _test_id(item) -> str | None:
    if item.get_closest_marker("conformance") is None:
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "feature" in params:
        return params["feature"].id
    if "golden_fixture" in params:
        fixture = params["golden_fixture"]
        return "golden.replay" if fixture is None else f"golden.replay.{fixture[0]}"
    return item.name


def pytest_collection_finish(session) -> None:
    """After -k / deselection: every conformance test left gets its id and record; none without a candidate."""
    config, items = session.config, session.items
    ids = {}
    for item in items:
        test_id = _test_id(item)
        if test_id is not None:
            item.stash[TEST_ID] = test_id
            ids[test_id] = item
    if not ids:
        return
    suite = config.stash.get(SUITE, None)
    if suite is None:
        from conformance.loader import shipped_drivers

        raise pytest.UsageError(
            "reflora conformance: no candidate given. Name one with --candidate NAME (shipped: "
            f"{', '.join(shipped_drivers())}) or --candidate package.module:object (your own driver)."
        )
    from conformance.suite import feature_of

    for test_id, item in ids.items():
        suite.record(test_id, feature_of(test_id).id, item.nodeid)


@pytest.fixture(scope="session")
def conformance_suite(request):
    suite = request.config.stash.get(SUITE, None)
    if suite is None:
        raise pytest.UsageError("reflora conformance: no candidate given (--candidate)")
    return suite


@pytest.fixture
def conformance_record(request, conformance_suite):
    test_id = request.node.stash[TEST_ID]
    return conformance_suite.records[test_id]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    suite = item.config.stash.get(SUITE, None)
    test_id = item.stash.get(TEST_ID, None)
    if suite is None or test_id is None:
        return report
    from conformance.suite import NOT_SUPPORTED, CandidateBroke, ConformanceFailure

    record = suite.records[test_id]
    if xdist_role(item.config) == "worker":
        report.reflora_record = _record_json(record)  # refreshed below (the same object): read on the controller
        if not suite.__dict__.get("_state_sent"):
            suite._state_sent = True
            report.reflora_state = json.dumps(_worker_state(suite))
    if call.excinfo is not None and isinstance(call.excinfo.value, (ConformanceFailure, CandidateBroke)):
        notes = getattr(call.excinfo.value, "__notes__", [])
        report.longrepr = "\n".join([str(call.excinfo.value), *notes])
    if report.when == "setup" and report.failed:
        record.outcome, record.reason = "error", str(report.longrepr)[-2000:]
    elif report.when == "setup" and report.skipped:
        record.outcome, record.reason = "skipped", _skip_reason(report)
    elif report.when == "call":
        record.duration = report.duration
        deviation = suite.deviation_for(test_id)
        record.deviation = deviation
        if report.failed:
            record.failure = str(report.longrepr)[-6000:]  # the check's report and hypothesis's labelled draws
            if deviation is not None:
                report.outcome = "skipped"
                report.wasxfail = f"known deviation {deviation.id}: {deviation.reason}"
                record.outcome, record.reason = "known_deviation", deviation.reason
            else:
                record.outcome = "failed"
        elif report.skipped:
            reason = _skip_reason(report)
            if reason.startswith(NOT_SUPPORTED):
                record.outcome, record.reason = "not_supported", reason[len(NOT_SUPPORTED) :]
            else:
                record.outcome, record.reason = "skipped", reason
        else:
            record.outcome = "passed"
    if hasattr(report, "reflora_record"):
        report.reflora_record = _record_json(record)
    return report


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    suite = config.stash.get(SUITE, None)
    if suite is None or not suite.records:
        return
    from conformance.report import build_report, render_text

    report = build_report(suite)
    terminalreporter.write_sep("=", "reflora conformance")
    terminalreporter.write(render_text(report, width=terminalreporter._tw.fullwidth))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    suite = session.config.stash.get(SUITE, None)
    if suite is None or not suite.records or xdist_role(session.config) == "worker":
        return  # a worker's records travel to the controller with its reports, which writes the one report
    from conformance.report import build_report, write_json

    report = build_report(suite)
    path = session.config.getoption("conformance_report_json")
    if path:
        try:
            write_json(report, path)
        except OSError as exc:
            import sys

            print(f"reflora conformance: --report-json {path}: cannot write it ({exc})", file=sys.stderr)
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
            return
    if exitstatus == 0 and report["summary"]["fixtures_corrupted"]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # not the candidate's fault, but nothing to pass on
    elif exitstatus == 0 and report["summary"]["checked"] == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED  # nothing was checked: never a silent pass


# ---------------------------------------------------------------------------------------------
# pytest-xdist (`reflora conform -n N`): every worker process loads the candidate in its own candidate worker
# and runs the features xdist hands it; the controller starts no candidate. Each conformance test report a worker
# sends carries its TestRecord (``reflora_record``), the first one also the worker's suite state (candidate
# info, deviations, the collected test ids in order: ``reflora_state``), as JSON strings (xdist serialises
# report attributes that are strings; nothing is unpickled). The controller puts them into its own Suite, so the
# progress lines, the table, the JSON report and the known-deviation outcomes are those of a serial run.
# ---------------------------------------------------------------------------------------------


def xdist_role(config) -> str | None:
    """The xdist role: "worker" in an xdist worker, "controller" in the process that distributes tests (-n N,
    N >= 1), else None (a serial run)."""
    if hasattr(config, "workerinput"):
        return "worker"
    if getattr(config.option, "dist", "no") != "no" and (getattr(config.option, "numprocesses", None) or
                                                          getattr(config.option, "tx", None)):  # fmt: skip
        return "controller"
    return None


def _record_json(record) -> str:
    """A TestRecord as JSON (its Comparison and Deviation as objects; NaN and infinities as JSON's extensions)."""
    return json.dumps(dataclasses.asdict(record))


def _record_from_json(text: str):
    """The inverse of ``_record_json``."""
    from conformance.deviations import Deviation
    from conformance.suite import TestRecord
    from conformance.tolerance import Comparison

    data = json.loads(text)
    if data["worst"] is not None:
        worst = data["worst"]
        for key in ("abs_index", "rel_index"):
            worst[key] = None if worst[key] is None else tuple(worst[key])
        data["worst"] = Comparison(**worst)
    if data["deviation"] is not None:
        data["deviation"] = Deviation(**data["deviation"])
    return TestRecord(**data)


def _worker_state(suite) -> dict:
    """What the controller needs of a worker's started Suite to report like a serial run."""
    return {"info": suite.info, "deviations": [d.to_json() for d in suite.deviations],
            "deviations_path": suite.deviations_path, "fixture_sha256": suite.fixture_sha256,
            "order": [(r.test_id, r.feature, r.nodeid) for r in suite.records.values()]}  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report) -> None:
    """On the xdist controller: take the worker's record (and, once, its suite state) before the terminal
    reporter (which asks ``pytest_report_teststatus``) sees the report."""
    config = _CONFIG.get("config")
    suite = None if config is None else config.stash.get(SUITE, None)
    if suite is None or xdist_role(config) != "controller" or not hasattr(report, "reflora_record"):
        return
    from conformance.deviations import Deviation
    from conformance.loader import capabilities_from_json
    from conformance.suite import TestRecord

    state = getattr(report, "reflora_state", None)
    if state is not None and not hasattr(suite, "info"):
        state = json.loads(state)
        for key in ("info", "deviations_path", "fixture_sha256"):
            setattr(suite, key, state[key])
        suite.capabilities = capabilities_from_json(state["info"]["capabilities"])
        suite.deviations = [Deviation(**d) for d in state["deviations"]]
        known = suite.records
        suite.records = {
            tid: known.get(tid) or TestRecord(tid, feature, nodeid) for tid, feature, nodeid in state["order"]
        }
        suite.records.update(known)
    record = _record_from_json(report.reflora_record)
    suite.records[record.test_id] = record
    if report.when == "teardown":
        _write_partial_report(config, None)
