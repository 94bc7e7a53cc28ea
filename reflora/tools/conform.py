"""``reflora conform``: run the conformance suite against a candidate LoRA library.

    reflora conform --candidate peft                      # the whole suite, table and score at the end
    reflora conform --candidate mypkg.driver:driver       # a driver you wrote, no change to reflora needed
    reflora conform --candidate peft --report-json r.json --junitxml junit.xml
    reflora conform --candidate peft --replay '<spec json>' --dump case.safetensors   # one case alone
    reflora conform --candidate-cmd 'node my_layer.js --case {case} --out {out}'     # a layer in any language

It runs pytest on the installed ``conformance`` package with its plugin (conformance/plugin.py); it installs
nothing (``--isolated`` asks ``conformance.envs`` for the candidate's own virtual environment, which may install
it there). Exit
status: 0 when every failure is a known deviation, 1 with unknown failures, 2 on a usage error, 5 when nothing
was checked. ``--replay``: 0 pass, 1 fail, 3 not supported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from reflora.tools.errors import output_file

# found, not imported: pytest must import the suite itself (its plugin's assertion rewriting)
CONFORMANCE_DIR = Path(importlib.util.find_spec("conformance").origin).resolve().parent
SCRATCH_VARIABLE = "REFLORA_CONFORM_SCRATCH"  # set by the CLI: hypothesis's storage folder for the run


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "conform",
        help="run the conformance suite against a LoRA library (e.g. --candidate peft)",
        description="Run the property-based conformance suite against a candidate LoRA library and print what "
        "conforms. The candidate is a shipped driver name or package.module:object. See docs/conformance.md.",
    )
    p.add_argument("--candidate", metavar="NAME|MODULE:OBJECT", help="the library under test (required)")
    p.add_argument("--list-candidates", action="store_true", help="list the shipped drivers and exit")
    p.add_argument(
        "--profile", choices=["ci", "dev", "thorough"], help="examples and randomness (default: ci if $CI, else dev)"
    )
    p.add_argument("--max-examples", type=positive_int, metavar="N",
                   help="examples per feature (at least 1), overriding the profile")  # fmt: skip
    p.add_argument(
        "--isolation",
        choices=["subprocess", "none"],
        default="subprocess",
        help="run the candidate in a worker process (default: a crash or a hang fails one test, the run goes on) "
        "or in this process (faster to start; the timeout interrupts Python code only, not a call stuck in C "
        "code, and a crash or os._exit ends the run: the --report-json file then holds the tests run so far)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        metavar="S",
        help="seconds (> 0) one driver call, versions() and capabilities included, may take before the candidate "
        "counts as hung (default 120; importing and constructing the driver may take up to 300)",
    )
    p.add_argument("-n", dest="workers", type=positive_int, metavar="N",
                   help="split the features over N pytest-xdist worker processes, each with its own candidate "
                   "worker (needs pytest-xdist; the report is the same as a serial run's)")  # fmt: skip
    p.add_argument("--fresh-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run every feature in a fresh candidate worker process (default: on in the thorough "
                   "profile, off in ci and dev)")  # fmt: skip
    p.add_argument("--feature-seed", type=feature_seed, metavar="N", help="shuffle the feature order with this "
                   "seed (dev and thorough shuffle with a random one the report prints; ci keeps its fixed order)")  # fmt: skip
    p.add_argument("--deviations", metavar="PATH", help="known-deviations JSON (default: the driver's own)")
    p.add_argument("--report-json", metavar="PATH", type=output_file, help="write the machine-readable report here")
    p.add_argument("--junitxml", metavar="PATH", type=output_file, help="write JUnit XML here (pytest's --junitxml)")
    p.add_argument("--golden-dir", metavar="DIR", help="golden fixtures to replay (default: $REFLORA_GOLDEN_DIR, "
                   "golden/ of a checkout, or <prefix>/share/reflora/golden of an installed wheel)")  # fmt: skip
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="only tests matching this pytest -k expression")
    p.add_argument("--replay", metavar="JSON", help="run one case, given as the spec JSON a failure printed")
    p.add_argument("--dump", metavar="PATH", type=output_file, help="with --replay: write the case's inputs, expected and candidate "
                   "results to this safetensors file")  # fmt: skip
    p.add_argument(
        "--isolated",
        action="store_true",
        help="run inside the candidate's own virtual environment (conformance.envs; may install it)",
    )
    # the adapter-file level (conformance.files; reflora.tools.conform_files): docs/conformance.md
    p.add_argument("--candidate-cmd", metavar="TEMPLATE", help="check a program in any language on adapter files: "
                   "a command with {base} {adapter} {input} {out}; or on the layer level: a command with {case} "
                   "{out} (docs/conformance.md, Command candidates)")  # fmt: skip
    p.add_argument("--cmd-merge", action="store_true", help="with --candidate-cmd: it also returns merged results")
    p.add_argument("--cmd-capabilities", metavar="PATH", help="with a layer-level --candidate-cmd ({case}): a JSON "
                   "object of the capabilities it declares (default: both layouts, forward/backward, merge, unmerge)")  # fmt: skip
    p.add_argument("--consumer", metavar="NAME", help="check a shipped adapter-file consumer "
                   "(conformance.consumers.SHIPPED: transformers_load_adapter, peft_from_pretrained, mlx_lm_fuse, "
                   "...) on the file.* features; with --isolated, in its own venv (conformance.envs.CONSUMERS)")  # fmt: skip
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: extra pytest arguments")
    p.set_defaults(func=run)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 examples would check nothing and pass)."""
    from conformance.options import positive_int as parse

    return parse(text)


def feature_seed(text: str) -> int:
    """argparse type: the seed of a shuffled feature order, a whole number >= 0."""
    from conformance.options import feature_seed as parse

    return parse(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (0 would make every candidate "hang")."""
    from conformance.options import positive_float as parse

    return parse(text)


def pytest_arguments(args: argparse.Namespace) -> list[str]:
    """The pytest command line for ``args`` (the plugin's options, plus pass-through ones)."""
    argv = [
        str(CONFORMANCE_DIR),
        "-p",
        "no:cacheprovider",
        "-r",
        "fE",
        "--candidate",
        args.candidate,
        "--conformance-progress",
        "-o",
        "console_output_style=classic",
    ]  # a line per feature, no dots
    if not _plugin_registered():
        argv += ["-p", "conformance.plugin"]
    options = {"--profile": args.profile, "--max-examples": args.max_examples, "--isolation": args.isolation,
               "--candidate-timeout": args.timeout, "--deviations": args.deviations,
               "--report-json": args.report_json, "--junitxml": args.junitxml, "--golden-dir": args.golden_dir,
               "-k": args.keyword, "-n": getattr(args, "workers", None)}  # fmt: skip
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    argv += _state_isolation_argv(args)
    extra = list(args.pytest_args or [])
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def _plugin_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "conformance.plugin" for ep in entry_points(group="pytest11"))


def _forwarded_argv(args: argparse.Namespace) -> list[str]:
    """``args`` as a ``reflora conform`` command line again (for ``--isolated``)."""
    argv = ["--candidate", args.candidate]
    for flag, value in (("--profile", args.profile), ("--max-examples", args.max_examples),
                        ("--isolation", args.isolation), ("--timeout", args.timeout),
                        ("--deviations", args.deviations), ("--report-json", args.report_json),
                        ("--junitxml", args.junitxml), ("--golden-dir", args.golden_dir), ("-k", args.keyword),
                        ("-n", getattr(args, "workers", None)),
                        ("--replay", args.replay), ("--dump", args.dump)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    return argv + _state_isolation_argv(args) + list(args.pytest_args or [])


def _state_isolation_argv(args: argparse.Namespace) -> list[str]:
    """``--fresh-process`` / ``--no-fresh-process`` and ``--feature-seed N``, when given (the same in pytest)."""
    fresh = getattr(args, "fresh_process", None)
    argv = [] if fresh is None else ["--fresh-process" if fresh else "--no-fresh-process"]
    seed = getattr(args, "feature_seed", None)
    return argv + ([] if seed is None else ["--feature-seed", str(seed)])


def run(args: argparse.Namespace) -> int:
    if args.candidate_cmd:
        from conformance.consumers.command_layer import template_level

        try:
            level = template_level(args.candidate_cmd)
        except ValueError as exc:
            print(f"reflora conform: {exc}", file=sys.stderr)
            return 2
        if level == "layer":
            return run_layer_command(args)
    if getattr(args, "cmd_capabilities", None):
        print("reflora conform: --cmd-capabilities goes with a layer-level --candidate-cmd (one with {case})",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.candidate_cmd or args.consumer:
        from reflora.tools.conform_files import run_files

        return run_files(args)
    if args.list_candidates:
        from conformance.loader import shipped_drivers

        print("\n".join(shipped_drivers()))
        return 0
    if not args.candidate:
        from conformance.loader import shipped_drivers

        print(
            "reflora conform: no candidate given. Name one with --candidate NAME (shipped: "
            f"{', '.join(shipped_drivers())}) or --candidate package.module:object (a driver you wrote).",
            file=sys.stderr,
        )
        return 2
    if args.isolated:
        from conformance.envs import run_isolated

        return run_isolated(args.candidate, _forwarded_argv(args))
    if args.replay is not None:
        return replay(args)
    if args.dump is not None:
        print("reflora conform: --dump needs --replay (it writes one replayed case)", file=sys.stderr)
        return 2
    if getattr(args, "workers", None) is not None and importlib.util.find_spec("xdist") is None:
        print("reflora conform: -n needs pytest-xdist (pip install pytest-xdist, or reflora[conform])", file=sys.stderr)
        return 2
    import os
    import tempfile

    import pytest

    # hypothesis caches things in ./.hypothesis: the CLI points it at a scratch folder (see plugin.py), so that
    # nothing is left behind in the caller's folder
    with tempfile.TemporaryDirectory(prefix="reflora-conform-") as scratch:
        os.environ[SCRATCH_VARIABLE] = scratch
        try:
            code = int(pytest.main(pytest_arguments(args)))
        finally:
            os.environ.pop(SCRATCH_VARIABLE, None)
    # pytest says 4 for a usage error (an unknown --candidate, a bad deviations file); the CLI's is 2
    return 2 if code == int(pytest.ExitCode.USAGE_ERROR) else code


CALL_MARGIN = 30.0  # the suite's call timeout exceeds the command's, so the command's own timeout kills it first


def run_layer_command(args: argparse.Namespace) -> int:
    """``--candidate-cmd`` with ``{case}``: the suite's layer features against the command
    (conformance.consumers.command_layer), passed to the suite's worker processes in the environment."""
    from conformance.consumers.command_layer import (
        CAPABILITIES_VARIABLE,
        LAYER_CANDIDATE,
        TEMPLATE_VARIABLE,
        TIMEOUT_VARIABLE,
        CommandLayerDriver,
        load_capabilities,
    )

    conflict = next((flag for flag, given in (("--candidate", args.candidate), ("--consumer", args.consumer),
                                              ("--cmd-merge", args.cmd_merge), ("--isolated", args.isolated))
                     if given), None)  # fmt: skip
    if conflict:
        hint = {"--cmd-merge": ' (the layer level declares "merge" in --cmd-capabilities)'}.get(conflict, "")
        print(f"reflora conform: {conflict} does not go with a layer-level --candidate-cmd{hint}", file=sys.stderr)
        return 2
    try:
        caps = load_capabilities(args.cmd_capabilities) if args.cmd_capabilities else None
        CommandLayerDriver(args.candidate_cmd, caps, args.timeout)
    except ValueError as exc:
        print(f"reflora conform: {exc}", file=sys.stderr)
        return 2
    env = {TEMPLATE_VARIABLE: args.candidate_cmd, TIMEOUT_VARIABLE: repr(args.timeout),
           CAPABILITIES_VARIABLE: str(Path(args.cmd_capabilities).resolve()) if args.cmd_capabilities else None}  # fmt: skip
    saved = _set_environment(env)
    layer_args = argparse.Namespace(**{**vars(args), "candidate": LAYER_CANDIDATE, "candidate_cmd": None,
                                       "cmd_capabilities": None, "timeout": args.timeout + CALL_MARGIN})  # fmt: skip
    try:
        return run(layer_args)
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, remove) environment variables; their previous values."""
    import os

    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return saved


def replay(args: argparse.Namespace) -> int:
    """Run the one case ``args.replay`` describes, print its comparison, optionally dump it."""
    from conformance.checks import run_check
    from conformance.features import FEATURES, missing_capability
    from conformance.loader import capabilities_from_json
    from conformance.protocol import CandidateError, DriverLoadError, NotSupported
    from conformance.runner import make_runner
    from conformance.tolerance import IllConditioned

    try:
        spec = json.loads(args.replay)
    except json.JSONDecodeError as exc:
        print(f"reflora conform: --replay is not valid JSON ({exc})", file=sys.stderr)
        return 2
    if not isinstance(spec, dict) or spec.get("feature") not in FEATURES:
        print(f"reflora conform: --replay needs a spec with a 'feature' among {sorted(FEATURES)}", file=sys.stderr)
        return 2
    problem = replay_spec_problem(spec)
    if problem is not None:
        print(f"reflora conform: --replay: {problem}", file=sys.stderr)
        return 2
    try:
        runner = make_runner(args.candidate, args.isolation, args.timeout)
    except (DriverLoadError, CandidateError) as exc:
        print(f"reflora conform: {exc}", file=sys.stderr)
        return 2
    try:
        feature = FEATURES[spec["feature"]]
        needs = feature.needs
        if feature.level == "golden":
            import pytest

            from conformance.suite import golden_needs
            from reflora.golden import read_fixture

            try:
                needs = golden_needs(read_fixture(spec["fixture"])[0])
            except pytest.skip.Exception as exc:
                print(f"{spec['feature']}: {exc}")
                return 3
        reason = missing_capability(capabilities_from_json(runner.info["capabilities"]), tuple(needs))
        if reason is not None:
            print(f"{spec['feature']}: not supported: {reason}")
            return 3
        try:
            result = run_check(spec, runner.call, capabilities_from_json(runner.info["capabilities"]))
        except IllConditioned as exc:
            print(f"{spec['feature']}: this float32 case is ill-conditioned ({exc}); the suite never draws it")
            return 3
        except NotSupported as exc:
            print(f"{spec['feature']}: not supported: the driver says: {exc}")
            return 3
    finally:
        runner.close()
    from conformance.suite import replay_prefix

    print(result.report(args.candidate, replay_prefix(args.candidate, runner.info.get("import_root"))))
    if args.dump:
        dump_case(result, args.dump, args.candidate)
        print(f"wrote {args.dump}")
    return 0 if result.passed else 1


def replay_spec_problem(spec: dict) -> str | None:
    """What is wrong with a --replay spec (a missing key, a bad value), or None: the case is built here, before
    the candidate runs, so a truncated spec is named as such instead of failing the candidate."""
    import pytest

    from conformance.cases import build_case
    from conformance.features import FEATURES

    level = FEATURES[spec["feature"]].level
    if level == "golden" and "fixture" not in spec:
        return "the spec lacks the key 'fixture' (paste the whole 'case:' line the failure printed)"
    try:
        build_case(spec)
    except KeyError as exc:
        return f"the spec lacks the key {exc.args[0]!r} (paste the whole 'case:' line the failure printed)"
    except pytest.skip.Exception:
        return None  # a golden fixture outside the driver protocol: replay says so
    except Exception as exc:  # a wrong type or value: the case cannot be built
        return f"the spec does not describe a valid {spec['feature']} case ({type(exc).__name__}: {exc})"
    return None


def dump_case(result, path: str, candidate: str) -> None:
    """The case's inputs (``input/...``, golden fixture names), the reference's expected results
    (``expected/...``) and the candidate's (``candidate/...``) in one safetensors file; metadata: the spec."""
    import numpy as np

    from conformance.cases import build_case, case_tensors, spec_json
    from conformance.wire import encode_results
    from reflora.checkpoint import atomic_save_safetensors

    tensors = {f"input/{k}": np.asarray(v) for k, v in case_tensors(build_case(result.spec)).items()}
    for group, values in (("expected", result.expected), ("candidate", result.actual)):
        if values is None:
            continue
        _, flat = encode_results(values)
        tensors.update({f"{group}/{k}": v for k, v in flat.items()})
    metadata = {"spec": spec_json(result.spec), "candidate": candidate, "passed": str(result.passed)}
    atomic_save_safetensors(Path(path), tensors, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflora.tools.conform")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["conform", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
