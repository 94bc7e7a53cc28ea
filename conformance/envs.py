"""Isolated virtual environments for candidate libraries whose requirements conflict.

AdapterHub's ``adapters`` needs transformers ~=4.57, mlx-lm needs transformers >= 5.7 and no torch, flax and
keras bring JAX: no single environment holds every LoRA library. So each *group* of candidates that do
co-install gets its own venv, built and reused by this module:

    $REFLORA_ENV_DIR/<group>/            (default ~/.cache/reflora/envs/<group>)
        bin/python ...                   a plain ``python -m venv``
        constraints.txt                  torch==2.13.0: a bare ``torch`` would pull a multi-GB CUDA build
        reflora-env.json                 what was installed, the fingerprint of the request, install time

A venv is rebuilt when the fingerprint of its request changes (requirements, reflora's source location,
Python version); otherwise it is reused as is. Into each venv go reflora itself (``-e <repo>[conform]`` from a
source checkout, else ``reflora[conform]==<version>`` from the package index) and the group's pinned
requirements. Nothing is installed into the calling environment.

Command line (also what the docs show)::

    python -m conformance.envs list
    python -m conformance.envs build torch [--rebuild]   # "all": every group but llama (built only on request)
    python -m conformance.envs run keras -- python -m pytest tests/test_drivers_ecosystem.py -q
    python -m conformance.envs conform adapters -- --max-examples 5   # = reflora conform --candidate adapters --isolated

``run_isolated(candidate, argv)`` is ``reflora conform --candidate <candidate> --isolated``: it re-runs
``reflora conform --candidate <candidate> <argv>`` with the candidate group's venv and returns its exit code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
ENV_DIR_VARIABLE = "REFLORA_ENV_DIR"
MARKER = "reflora-env.json"


@dataclass(frozen=True)
class EnvGroup:
    """Candidates that install together, and exactly what their venv gets besides reflora."""

    name: str
    requirements: tuple[str, ...]  # pip requirement strings, pinned
    no_deps: tuple[str, ...] = ()  # installed afterwards with --no-deps (their declared deps are too broad)
    environment: tuple[tuple[str, str], ...] = ()  # variables set when running inside the venv
    notes: str = ""
    # built from source: a pinned requirement whose source distribution is downloaded and unpacked into
    # <venv>/src/ (its vendored files, e.g. llama.cpp's converter scripts, stay there), then pip-installed from
    # that folder with ``build_environment`` set and the build tree kept in <venv>/build/
    sdist: str = ""
    build_environment: tuple[tuple[str, str], ...] = ()
    sdist_packages: tuple[str, ...] = ()  # folders inside the unpacked sdist, pip-installed afterwards
    # optional extra builds (a name from EXTRA_BUILDS): a failure is recorded in the marker, not fatal
    extra_builds: tuple[str, ...] = ()
    # built only when named (``build llama``): never by ``build all``, ``reflora matrix`` or CI (a long build)
    on_request: bool = False


# llama.cpp for this machine's CPU only: no GPU backend, no curl, no multimodal library, no tests/examples/tools.
# GGML_NATIVE=ON compiles for the building machine's CPU (-march=native): the cached venv is machine-specific, fine
# for a local cache, but it must not be copied to (or restored from a cache on) a machine with another CPU
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)

TORCH_GROUP_REQUIREMENTS = (
    TORCH_PIN, "transformers>=5.0", "peft==0.21.2", "loralib==0.1.2", "lora-pytorch==0.2.0",
    "torchtune==0.6.1", "torchao==0.17.0", "litgpt==0.5.13",
)  # fmt: skip

GROUPS: dict[str, EnvGroup] = {
    group.name: group
    for group in (
        EnvGroup(
            "torch",
            TORCH_GROUP_REQUIREMENTS,
            notes="torchao 0.18 breaks torchtune 0.6.1's import, hence the torchao pin; litgpt's "
            "huggingface-hub<1.4 makes pip pick transformers 5.3 here",
        ),
        EnvGroup(
            "adapters",
            (TORCH_PIN, "adapters==1.3.0", "transformers~=4.57.6"),
            notes="adapters 1.3.0 requires transformers ~=4.57.6, older than the default environment's 5.x",
        ),
        EnvGroup(
            "mlx",
            ("mlx[cpu]==0.32.4", "mlx-lm==0.32.2", "transformers>=5.7"),
            notes="CPU build of MLX on Linux; no torch",
        ),
        EnvGroup("jax", ("flax==0.12.8",), environment=(("JAX_PLATFORMS", "cpu"),), notes="flax nnx on CPU JAX"),
        EnvGroup(
            "llama",
            (TORCH_PIN, "numpy", "safetensors", "transformers>=5.0", "sentencepiece", "protobuf"),
            sdist="llama-cpp-python==0.3.36",
            build_environment=(("CMAKE_ARGS", LLAMA_CMAKE_ARGS), ("CMAKE_BUILD_PARALLEL_LEVEL", "2")),
            sdist_packages=("vendor/llama.cpp/gguf-py",),
            extra_builds=("llama-export-lora",),
            on_request=True,
            notes="the adapter-file consumer llama_cpp (conformance.consumers.llama_cpp; no driver): "
            "llama-cpp-python built from its sdist for the CPU (about 15 min on 2 cores); the sdist's vendored "
            "llama.cpp keeps convert_hf_to_gguf.py / convert_lora_to_gguf.py in src/vendor/llama.cpp and its gguf-py "
            "is the gguf package installed; llama-export-lora is built from the kept build tree when it can be",
        ),
        EnvGroup(
            "keras",
            (TORCH_PIN, "keras==3.15.1", "regex", "kagglehub", "tokenizers", "sentencepiece"),
            no_deps=("keras-hub==0.32.0",),
            environment=(("KERAS_BACKEND", "torch"),),
            notes="keras 3 on its torch backend (float64 autograd); keras-hub with --no-deps to avoid tensorflow",
        ),
    )
}

# candidate (``--candidate``: the driver module under conformance.drivers) -> its venv group
CANDIDATES: dict[str, str] = {
    "peft": "torch",
    "loralib": "torch",
    "lora_pytorch": "torch",
    "torchtune": "torch",
    "litgpt": "torch",
    "adapters_hub": "adapters",
    "mlx_lm": "mlx",
    "flax_nnx": "jax",
    "keras": "keras",
}
# the libraries' own names, accepted as well
ALIASES = {"adapters": "adapters_hub", "mlx-lm": "mlx_lm", "flax": "flax_nnx", "lora-pytorch": "lora_pytorch"}
# adapter-file consumers (conformance.consumers.SHIPPED) -> their venv group; one not listed runs in the current
# environment (the default venv has transformers and peft). ``reflora conform --consumer NAME --isolated``.
# llama_cpp is not listed: it runs in the current environment and calls the ``llama`` venv's python itself, only
# when that venv is built (a 15-minute source build, ``on_request``: `envs build all`, `reflora matrix` and CI never
# start it; unbuilt, `reflora conform --consumer llama_cpp` exits with an error naming `build llama` and `reflora
# matrix` skips the consumer), so the venv is never rebuilt for a moved source checkout
CONSUMERS: dict[str, str] = {"mlx_lm_fuse": "mlx"}


def consumer_group(consumer: str) -> str | None:
    """The venv group of an adapter-file consumer, or None: it runs in the current environment."""
    return CONSUMERS.get(consumer)


class EnvError(RuntimeError):
    """A venv could not be built or used; the message says which group and which step."""


def env_root() -> Path:
    """``$REFLORA_ENV_DIR``, else ``~/.cache/reflora/envs``."""
    value = os.environ.get(ENV_DIR_VARIABLE)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "reflora" / "envs"


def driver_name(candidate: str) -> str:
    """The driver module of a candidate name or alias (``adapters`` -> ``adapters_hub``)."""
    name = ALIASES.get(candidate, candidate)
    if name not in CANDIDATES:
        known = sorted({*CANDIDATES, *ALIASES})
        raise EnvError(f"no isolated environment for candidate {candidate!r}; known: {', '.join(known)}")
    return name


def group_of(candidate: str) -> EnvGroup:
    return GROUPS[CANDIDATES[driver_name(candidate)]]


def reflora_source() -> Path | None:
    """The source checkout reflora is running from (a folder with pyproject.toml above the package), or None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "reflora").is_dir() else None


def reflora_requirement() -> list[str]:
    """pip arguments that install reflora with the conformance suite's dependencies."""
    source = reflora_source()
    if source is not None:
        return ["-e", f"{source}[conform]"]
    from reflora._version import __version__

    return [f"reflora[conform]=={__version__}"]


def console_scripts() -> dict[str, str]:
    """The source checkout's ``[project.scripts]`` (the ``reflora`` console script's target); {} without one. An
    editable install writes its scripts once: a moved entry point needs the venv rebuilt."""
    source = reflora_source()
    if source is None:
        return {}
    import tomllib

    return dict(tomllib.loads((source / "pyproject.toml").read_text()).get("project", {}).get("scripts", {}))


def fingerprint(group: EnvGroup) -> str:
    request = {
        "requirements": group.requirements,
        "no_deps": group.no_deps,
        "reflora": reflora_requirement(),
        "python": list(sys.version_info[:2]),
    }
    if group.sdist:
        request["sdist"] = [group.sdist, group.build_environment, group.sdist_packages, group.extra_builds]
    scripts = console_scripts()
    if scripts:
        request["scripts"] = scripts
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def venv_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_current(group: EnvGroup, folder: Path) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("fingerprint") == fingerprint(group) and venv_python(folder).exists()


def base_python() -> str:
    """The interpreter a venv is made from: the base of the current one (a venv's python would chain venvs)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _run(cmd: list[str], step: str, group: EnvGroup, env: dict[str, str] | None = None) -> None:
    print(f"[reflora envs] {group.name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise EnvError(f"building the {group.name!r} venv failed at {step} (exit {result.returncode})")


def folder_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def ensure_env(group_name: str, rebuild: bool = False) -> Path:
    """Build (or reuse) the venv of ``group_name`` and return its folder.

    The marker file is written last, after every install succeeded, so a half-built venv is never taken for
    a built one: the next call finds no (or a stale) marker and builds again from scratch.
    """
    if group_name not in GROUPS:
        raise EnvError(f"unknown environment group {group_name!r}; known: {', '.join(GROUPS)}")
    group = GROUPS[group_name]
    folder = env_root() / group.name
    if not rebuild and is_current(group, folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _run([base_python(), "-m", "venv", str(folder)], "python -m venv", group)
    constraints = folder / "constraints.txt"
    constraints.write_text(f"# never a bare torch: the CPU build, pinned\n{TORCH_PIN}\n")
    pip = [str(venv_python(folder)), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
    _run([*pip, *reflora_requirement(), *group.requirements], "pip install", group)
    if group.no_deps:
        _run([*pip, "--no-deps", *group.no_deps], "pip install --no-deps", group)
    extras = _build_sdist(group, folder, pip) if group.sdist else {}
    seconds = time.perf_counter() - start
    freeze = subprocess.run([str(venv_python(folder)), "-m", "pip", "freeze"], capture_output=True, text=True)
    marker = {
        "group": group.name,
        "fingerprint": fingerprint(group),
        "requirements": list(group.requirements),
        "no_deps": list(group.no_deps),
        "reflora": reflora_requirement(),
        "install_seconds": round(seconds, 1),
        "size_bytes": folder_size(folder),
        "freeze": freeze.stdout.splitlines(),
    }
    if group.sdist:
        marker["sdist"] = group.sdist
        marker["extra_builds"] = extras
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return folder


def sdist_folder(folder: Path) -> Path | None:
    """The unpacked source distribution of a group built from source (``<venv>/src/<name>-<version>``), or None."""
    found = sorted(p for p in (folder / "src").glob("*") if p.is_dir()) if (folder / "src").is_dir() else []
    return found[0] if found else None


def _build_sdist(group: EnvGroup, folder: Path, pip: list[str]) -> dict[str, str | None]:
    """Download ``group.sdist`` as a source distribution, unpack it into <venv>/src, pip-install it from there
    (``build_environment`` set, build tree kept in <venv>/build), then its ``sdist_packages``, then each of
    ``extra_builds`` (optional: {name: path of what was built, or None when it failed})."""
    import tarfile

    downloads = folder / "src-download"
    python = str(venv_python(folder))
    _run([python, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
          "-d", str(downloads), group.sdist], "pip download (sdist)", group)  # fmt: skip
    archives = sorted(downloads.glob("*.tar.gz"))
    if len(archives) != 1:
        raise EnvError(f"building the {group.name!r} venv: expected one .tar.gz for {group.sdist}, got {archives}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(folder / "src", filter="data")
    shutil.rmtree(downloads, ignore_errors=True)
    source = sdist_folder(folder)
    if source is None:
        raise EnvError(f"building the {group.name!r} venv: {archives[0].name} unpacked to nothing")
    env = {**os.environ, **dict(group.build_environment)}
    build_dir = folder / "build"
    _run([*pip, "-v", f"--config-settings=build-dir={build_dir}", str(source)],
         f"pip install {group.sdist} from source", group, env=env)  # fmt: skip
    for package in group.sdist_packages:
        _run([*pip, str(source / package)], f"pip install {package}", group)
    return {name: EXTRA_BUILDS[name](group, folder, source, build_dir, env) for name in group.extra_builds}


def _build_llama_tool(target: str, group: EnvGroup, folder: Path, source: Path, build_dir: Path, env: dict):
    """Re-configure the kept llama-cpp-python build tree with LLAMA_BUILD_TOOLS=ON and build only ``target``
    (the libraries are already built, so this compiles the tool alone); the binary is copied to <venv>/bin.
    Returns its path, or None (recorded in the marker) when it did not build."""
    cmake = shutil.which("cmake", path=f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}") or "cmake"
    steps = [
        [cmake, "-S", str(source), "-B", str(build_dir), "-DLLAMA_BUILD_TOOLS=ON"],
        [cmake, "--build", str(build_dir), "--target", target, "-j", env.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")],
    ]
    for cmd in steps:
        print(f"[reflora envs] {group.name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"[reflora envs] {group.name}: {target} did not build (optional)", file=sys.stderr, flush=True)
            return None
    built = [p for p in build_dir.rglob(target) if p.is_file() and os.access(p, os.X_OK)]
    if not built:
        return None
    destination = folder / "bin" / target
    shutil.copy2(built[0], destination)
    return str(destination)


EXTRA_BUILDS = {"llama-export-lora": lambda *args: _build_llama_tool("llama-export-lora", *args)}


def env_variables(group: EnvGroup, folder: Path) -> dict[str, str]:
    """The calling environment, with the venv first on PATH and the group's variables set."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env["VIRTUAL_ENV"] = str(folder)
    env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    for key, value in group.environment:
        env.setdefault(key, value)
    return env


def run_in_env(group_name: str, command: Sequence[str], cwd: Path | None = None) -> int:
    """Run ``command`` (``python`` is the venv's python, ``reflora`` its console script) inside the group's venv,
    building it if needed."""
    folder = ensure_env(group_name)
    group = GROUPS[group_name]
    command = list(command)
    if command and command[0] in ("python", "python3"):
        command[0] = str(venv_python(folder))
    elif command and command[0] == "reflora":
        command[0] = str(folder / "bin" / "reflora")
    return subprocess.run(command, env=env_variables(group, folder), cwd=cwd).returncode


def run_isolated(candidate: str, argv: Sequence[str]) -> int:
    """``reflora conform --candidate <driver> <argv>``, run inside the candidate's venv; its exit code.

    ``candidate`` is a driver name or an alias (``adapters``). ``argv`` is the rest of the ``conform`` command
    line: ``--isolated`` and any ``--candidate`` in it are dropped (the child must not recurse, and gets the
    driver's module name). Raises ``EnvError`` for a candidate with no environment or a venv that fails to build.
    """
    name = driver_name(candidate)
    return run_in_env(CANDIDATES[name], ["reflora", "conform", "--candidate", name, *conform_args(argv)])


def conform_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--isolated`` and without ``--candidate X`` / ``--candidate=X``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--candidate":
            skip = True
        elif arg != "--isolated" and not arg.startswith("--candidate="):
            out.append(arg)
    return out


def describe() -> list[dict]:
    """One row per group: its candidates, whether its venv is built and current, install time and size."""
    rows = []
    for group in GROUPS.values():
        folder = env_root() / group.name
        marker = read_marker(folder) or {}
        rows.append(
            {
                "group": group.name,
                "candidates": [c for c, g in CANDIDATES.items() if g == group.name],
                "folder": str(folder),
                "state": "current" if is_current(group, folder) else ("stale" if marker else "not built"),
                "install_seconds": marker.get("install_seconds"),
                "size_mb": round(marker["size_bytes"] / 2**20) if "size_bytes" in marker else None,
                "requirements": [*group.requirements, *(f"{r} (--no-deps)" for r in group.no_deps)],
                "on_request": group.on_request,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.envs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the groups, their candidates and the state of their venvs")
    build = sub.add_parser("build", help="build (or reuse) the venv of one group, or of all (but llama: only "
                           "on request)")  # fmt: skip
    build.add_argument("group", choices=[*GROUPS, "all"])
    build.add_argument("--rebuild", action="store_true", help="rebuild even when the venv is current")
    run = sub.add_parser("run", help="run a command inside a group's venv (after --)")
    run.add_argument("group", choices=list(GROUPS))
    run.add_argument("command", nargs=argparse.REMAINDER)
    conform = sub.add_parser("conform", help="reflora conform --isolated for one candidate (extra args after --)")
    conform.add_argument("candidate", help=f"one of {', '.join(sorted({*CANDIDATES, *ALIASES}))}")
    conform.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            print(json.dumps(describe(), indent=1))
            return 0
        if args.action == "build":
            if args.group == "all":
                for name in (g.name for g in GROUPS.values() if g.on_request):
                    print(f"{name}: skipped (built only on request: python -m conformance.envs build {name})")
            names = [g.name for g in GROUPS.values() if not g.on_request] if args.group == "all" else [args.group]
            for name in names:
                folder = ensure_env(name, rebuild=args.rebuild)
                marker = read_marker(folder) or {}
                size = marker.get("size_bytes", 0) / 2**20
                print(f"{name}: {folder} ({marker.get('install_seconds')} s to install, {size:.0f} MiB)")
            return 0
        rest = [a for a in (args.command if args.action == "run" else args.args)]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        if args.action == "run":
            if not rest:
                parser.error("run needs a command after --")
            return run_in_env(args.group, rest)
        return run_isolated(args.candidate, rest)
    except EnvError as exc:
        print(f"reflora envs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
