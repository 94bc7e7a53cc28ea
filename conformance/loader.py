"""Finding, loading, describing and calling a candidate's driver (the dispatch under both transports).

``--candidate NAME`` is a shipped driver (``conformance.drivers.NAME``, or an alias of one in
``conformance.envs.ALIASES``); ``--candidate package.module:object`` is a driver the user wrote (see
conformance/protocol.py). ``call_driver`` rebuilds a case from its spec (``conformance.cases``) and calls one
driver method: the worker process (conformance.worker) and the in-process transport (conformance.transport)
both go through it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

from conformance.cases import build_case
from conformance.envs import ALIASES
from conformance.protocol import Capabilities, DriverLoadError, NotSupported

SHIPPED_DRIVER_PACKAGE = "conformance.drivers"


def shipped_drivers() -> list[str]:
    """Names usable as ``--candidate NAME``: the modules of ``conformance.drivers`` (``*_bridge`` are helpers)."""
    package = importlib.import_module(SHIPPED_DRIVER_PACKAGE)
    return sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_") and not m.name.endswith("_bridge")
    )


def shipped_name(candidate: str) -> str:
    """A shipped driver's module name for ``candidate``, which may be a library's own name (``adapters`` ->
    ``adapters_hub``, see ``conformance.envs.ALIASES``); any other name is returned as is."""
    return ALIASES.get(candidate, candidate)


def load_driver(candidate: str):
    """The driver object for ``NAME`` (a shipped driver or its alias) or ``package.module:object`` (see
    conformance/protocol.py)."""
    if ":" not in candidate:
        candidate = shipped_name(candidate)
    if ":" in candidate:
        module_name, _, attr = candidate.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DriverLoadError(f"cannot import {module_name!r} for --candidate {candidate}: {exc}") from exc
        obj: Any = module
        for part in attr.split(".") if attr else []:  # "package.module:" is the module itself
            if not hasattr(obj, part):
                raise DriverLoadError(f"--candidate {candidate}: module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
    else:
        names = shipped_drivers()
        if candidate not in names:
            raise DriverLoadError(
                f"--candidate {candidate!r} is not a shipped driver (shipped: {', '.join(names)}); "
                "a driver of your own is named package.module:object"
            )
        try:
            module = importlib.import_module(f"{SHIPPED_DRIVER_PACKAGE}.{candidate}")
        except ImportError as exc:
            raise DriverLoadError(f"the {candidate} driver cannot be imported: {exc}") from exc
        obj = getattr(module, "driver", module)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "capabilities")):
        obj = obj()
    for attr in ("name", "capabilities", "versions"):
        if not hasattr(obj, attr):
            raise DriverLoadError(f"--candidate {candidate}: {obj!r} is not a driver (it has no {attr!r})")
    if not isinstance(obj.capabilities, Capabilities):
        raise DriverLoadError(f"--candidate {candidate}: capabilities must be a conformance.protocol.Capabilities")
    return obj


def capabilities_to_json(caps: Capabilities) -> dict[str, Any]:
    out = {}
    for f in fields(caps):
        value = getattr(caps, f.name)
        out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


def capabilities_from_json(data: dict[str, Any]) -> Capabilities:
    kwargs = {}
    for f in fields(Capabilities):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = frozenset(value) if isinstance(value, list) else value
    return Capabilities(**kwargs)


def driver_info(driver, candidate: str) -> dict[str, Any]:
    """What the suite needs to know about a loaded driver, as JSON."""
    deviations = getattr(driver, "deviations", None)
    # a shipped driver's own file, also when a package.module:object candidate re-exports it
    home = driver.__name__ if isinstance(driver, ModuleType) else type(driver).__module__
    prefix = f"{SHIPPED_DRIVER_PACKAGE}."
    if ":" not in candidate:
        shipped = shipped_name(candidate)
    else:
        shipped = home.removeprefix(prefix) if home.startswith(prefix) else None
    if deviations is None and shipped:
        default = Path(__file__).parent / "deviations" / f"{shipped}.json"
        deviations = default if default.is_file() else None
    return {
        "name": str(driver.name),
        "capabilities": capabilities_to_json(driver.capabilities),
        "versions": {str(k): str(v) for k, v in dict(driver.versions()).items()},
        "deviations": None if deviations is None else str(deviations),
        "import_root": import_root(candidate),
    }


def import_root(candidate: str) -> str | None:
    """The folder a ``package.module:object`` driver was imported from (what PYTHONPATH needs for a replay), or
    None (a shipped driver, a module without a file)."""
    if ":" not in candidate:
        return None
    module_name = candidate.partition(":")[0]
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if not file:
        return None
    depth = module_name.count(".") + (Path(file).name == "__init__.py")
    return str(Path(file).resolve().parents[depth])


METHODS = ("layer_forward_backward", "layer_merge", "model_forward_backward", "save_adapter",
           "load_adapter_logits", "model_switch_adapters",
           # optional, the advanced level (conformance.protocol.Driver)
           "model_adapters", "model_merge", "merge_and_unload", "init_adapter", "weighted_adapter",
           # optional, the layer level (issue 15.1)
           "layer_init", "layer_adapters")  # fmt: skip


def call_driver(driver, method: str, spec: dict[str, Any], folder: str | None) -> Any:
    """Rebuild the case from ``spec`` and call ``driver.<method>``. Raises NotSupported or the driver's error."""
    if method not in METHODS:
        raise ValueError(f"unknown driver method {method!r}")
    function = getattr(driver, method, None)
    if function is None:
        raise NotSupported(f"the driver has no {method}()")
    case = build_case(spec)
    if method in ("save_adapter", "load_adapter_logits", "merge_and_unload"):
        return function(case, Path(folder))
    return function(case)
