"""Golden trajectories: a few optimizer steps of LoRA training, in the golden fixture format.

A trajectory case is a golden case (``reflora.golden``: a GPT-2, a LoRA config, a seed; everything drawn from the
seed) plus one more spec key, ``"trajectory"``::

    "trajectory": {"optimizer": {"name": "adamw", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-08,
                                 "weight_decay": 0.1},
                   "steps": 4, "micro_batches": 2, "clip_norm": null}

Starting from the case's base and adapter (``golden.draw_case``), each of ``steps`` steps

    splits the case's batch (its B rows, in order) into ``micro_batches`` equal groups of rows,
    computes each group's loss (its own mean; the case's attention mask, position ids, labels and LoRA dropout
    masks, restricted to the group's rows) and gradient, averages both over the groups,
    clips the gradient by global norm if ``clip_norm`` is set (torch.nn.utils.clip_grad_norm_),
    and updates the trained tensors (PEFT's: the adapter, plus the biases of the ``bias`` mode) with the optimizer
    (reflora.optim: torch.optim.AdamW or SGD semantics), at a constant lr.

The same batch every step: the trajectory fits one batch, so its loss falls. The fixture (format
``reflora-golden/1``, ``__metadata__["spec"]`` holding the whole spec, ``"trajectory"`` included) holds every
tensor of the golden case (inputs, weights, dropout masks, and the logits, loss and gradients at the start), plus:

    trajectory/loss                (steps,)   the mean loss at the start of each step (the mean of the micro-batches' losses)
    trajectory/grad_norm           (steps,)   the global gradient norm of each step, before clipping
    trajectory/adapter/<PEFT key>  the adapter tensors after the last step
    trajectory/base/<HF key>       the trained base biases after the last step (``bias`` modes only)

The committed cases live in ``golden/trajectories/`` with the golden corpus's layout (``cases/<name>.json``,
``fixtures/<name>.safetensors``, ``manifest.json``); ``reflora trajectory generate`` rewrites them and
``reflora trajectory verify`` regenerates them in memory and compares (inputs bit-exact, outputs to ``RTOL``,
which explains why a trajectory needs a looser tolerance than a single gradient). tests/test_trajectory.py replays them with transformers + PEFT + ``torch.optim.AdamW``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reflora._version import __version__
from reflora.checkpoint import atomic_write_files, read_json
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.golden.corpus import default_golden_dir
from reflora.golden.derive import GoldenCase, generate_case, unpack_fixture
from reflora.golden.files import GoldenError, read_fixture_file, serialize_fixture, sha256_file
from reflora.golden.spec import FORMAT, fixture_layout, load_spec, spec_configs
from reflora.model import gpt2_loss_and_grads, trainable_keys
from reflora.optim import (
    OptimizerError,
    clip_grad_norm,
    init_optimizer_state,
    optimizer_config_from_dict,
    optimizer_config_to_dict,
    optimizer_step,
)
from reflora.targets import ADAPTER_PREFIX, adapter_shapes, base_shapes, plan_lora

TRAJECTORY_KEY = "trajectory"
TRAJECTORY_DEFAULTS: dict[str, Any] = {
    "optimizer": {"name": "adamw"},
    "steps": 3,
    "micro_batches": 1,
    "clip_norm": None,
}
TRAJECTORIES_DIR = "trajectories"
# Stored and recomputed trajectories (by reflora again, or by PEFT + torch) must satisfy, per tensor,
# max|new − stored| ≤ RTOL · max|stored|. Measured against PEFT + torch.optim (float64): ≤ 6e-15 for every tensor but
# one kind, the bias of c_attn's key slice under ``bias`` modes, at 1.6e-12. Its gradient is zero in exact arithmetic
# (adding a constant to every key of a row leaves the softmax unchanged), so it is pure rounding noise g ~ 1e-17, and
# AdamW turns noise below ε into an update lr·g/ε, 1e4–1e6 times larger. 1e-10 keeps a 60x margin over that and is
# still 1e4x below the change that any real difference in the step (a wrong ε, decay or bias correction) makes.
# Only float64: in float32 the noise reaches ε, and AdamW's update of such a tensor becomes ±lr at random.
RTOL = 1e-10
GENERATE_COMMAND = "reflora trajectory generate"


# ----------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------


def load_trajectory_spec(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Validate a trajectory spec and fill in every default (a fixed point, as ``golden.load_spec``).

    The golden part is checked by ``golden.load_spec``; a trajectory needs LoRA, the loss objective and
    ``train_base`` false (it trains what PEFT trains), and ``batch_size`` divisible by ``micro_batches``.
    """
    if isinstance(source, (str, Path)):
        source = read_json(source, ConfigError, "spec file")
    if not isinstance(source, Mapping) or TRAJECTORY_KEY not in source:
        raise ConfigError(f"a trajectory spec is a golden spec with a {TRAJECTORY_KEY!r} object")
    spec = load_spec({k: v for k, v in source.items() if k != TRAJECTORY_KEY})
    raw = source[TRAJECTORY_KEY]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"spec.trajectory must be a JSON object, got {raw!r}")
    unknown = [k for k in raw if k not in TRAJECTORY_DEFAULTS]
    if unknown:
        raise ConfigError(f"spec.trajectory.{unknown[0]} is unknown (known: {', '.join(TRAJECTORY_DEFAULTS)})")
    trajectory = {k: copy.deepcopy(raw.get(k, v)) for k, v in TRAJECTORY_DEFAULTS.items()}
    try:
        trajectory["optimizer"] = optimizer_config_to_dict(optimizer_config_from_dict(trajectory["optimizer"]))
    except (OptimizerError, TypeError, AttributeError) as exc:
        raise ConfigError(f"spec.trajectory.optimizer: {exc}") from None
    for key in ("steps", "micro_batches"):
        value = trajectory[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"spec.trajectory.{key} must be an integer >= 1, got {value!r}")
    clip = trajectory["clip_norm"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"spec.trajectory.clip_norm must be a positive number or null, got {clip!r}")
    if spec["lora"] is None or spec["train_base"]:
        raise ConfigError("a trajectory trains a LoRA adapter: spec.lora must be set and spec.train_base false")
    if spec["dtype"] != "float64":
        raise ConfigError(
            "a trajectory is float64 only: AdamW makes float32 rounding noise into ±lr updates "
            "(see reflora.golden.trajectory.RTOL)"
        )
    if spec["objective"] != "loss":
        raise ConfigError("a trajectory minimises the loss: spec.objective must be 'loss'")
    if spec["batch_size"] % trajectory["micro_batches"]:
        raise ConfigError(f"spec.batch_size={spec['batch_size']} must be divisible by "
                          f"spec.trajectory.micro_batches={trajectory['micro_batches']}")  # fmt: skip
    spec[TRAJECTORY_KEY] = trajectory
    return spec


def golden_part(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec without its ``"trajectory"`` key: a plain golden spec."""
    return {k: v for k, v in spec.items() if k != TRAJECTORY_KEY}


def trajectory_layout(spec: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The trajectory tensors of a filled spec (besides the golden case's): name -> (shape, dtype)."""
    config, lora = spec_configs(spec)
    steps, dtype = spec[TRAJECTORY_KEY]["steps"], spec["dtype"]
    shapes = {**base_shapes(config), **adapter_shapes(plan_lora(config, lora))}
    layout = {"trajectory/loss": ((steps,), dtype), "trajectory/grad_norm": ((steps,), dtype)}
    for key in trainable_keys(config, lora):
        layout[final_name(key)] = (shapes[key], dtype)
    return layout


def final_name(key: str) -> str:
    """Fixture name of a trained tensor after the last step."""
    return f"trajectory/adapter/{key}" if key.startswith(ADAPTER_PREFIX) else f"trajectory/base/{key}"


# ----------------------------------------------------------------------------------------------
# running a trajectory
# ----------------------------------------------------------------------------------------------


def accumulated_loss_and_grads(
    params: Mapping[str, np.ndarray],
    adapter: Mapping[str, np.ndarray] | None,
    config: GPT2Config,
    lora: LoraConfig | None,
    micro_batches: list[dict[str, Any]],
    wrt: list[str] | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean loss and mean gradient of the trained tensors (``wrt``, default ``trainable_keys``) over micro-batches.

    Each micro-batch is a dict with ``input_ids`` (b, T) and ``labels`` (b, T), and optionally ``attention_mask``,
    ``position_ids`` and ``dropout_masks`` (``gpt2_forward``'s arguments). Its loss is its own mean; with K
    micro-batches the result is Σ_k loss_k / K and Σ_k g_k / K, what ``(loss_k / K).backward()`` accumulates.
    """
    k = len(micro_batches)
    total_loss, total = 0.0, None
    for batch in micro_batches:
        forward = {name: value for name, value in batch.items() if name not in ("input_ids", "labels")}
        loss, _, grads = gpt2_loss_and_grads(
            params, config, batch["input_ids"], batch["labels"], wrt=wrt, adapter=adapter, lora=lora, **forward
        )
        total_loss += float(loss) / k
        if total is None:
            total = {key: g / k for key, g in grads.items()}
        else:
            for key, g in grads.items():
                total[key] = total[key] + g / k
    return total_loss, total


def micro_batch_rows(batch_size: int, micro_batches: int) -> list[slice]:
    """The rows of each micro-batch: equal consecutive groups."""
    size = batch_size // micro_batches
    return [slice(i * size, (i + 1) * size) for i in range(micro_batches)]


def micro_batches_of(case: GoldenCase, rows: slice) -> dict[str, Any]:
    """The forward inputs of the case's rows ``rows`` (``accumulated_loss_and_grads``'s micro-batch)."""
    batch: dict[str, Any] = {"input_ids": case.input_ids[rows], "labels": case.labels[rows],
                             "attention_mask": case.attention_mask[rows]}  # fmt: skip
    if case.position_ids is not None:
        batch["position_ids"] = case.position_ids[rows]
    if case.dropout_masks is not None:
        batch["dropout_masks"] = {name: mask[rows] for name, mask in case.dropout_masks.items()}
    return batch


def run_trajectory(case: GoldenCase, trajectory: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The trajectory tensors (``trajectory_layout``) of a case, by the reference and ``reflora.optim``."""
    optimizer = optimizer_config_from_dict(trajectory["optimizer"])
    keys = trainable_keys(case.config, case.lora)
    params, adapter = dict(case.params), dict(case.adapter)
    trained = {k: params[k] if k in params else adapter[k] for k in keys}
    state = init_optimizer_state(optimizer, trained)
    groups = [
        micro_batches_of(case, rows) for rows in micro_batch_rows(len(case.input_ids), trajectory["micro_batches"])
    ]
    losses, norms = [], []
    for _ in range(trajectory["steps"]):
        loss, grads = accumulated_loss_and_grads(params, adapter, case.config, case.lora, groups)
        norm = float(np.sqrt(sum(float(np.sum(g * g)) for g in grads.values())))
        if trajectory["clip_norm"] is not None:
            grads, norm = clip_grad_norm(grads, trajectory["clip_norm"])
        trained, state = optimizer_step(optimizer, trained, grads, state)
        params.update({k: v for k, v in trained.items() if k in params})
        adapter.update({k: v for k, v in trained.items() if k in adapter})
        losses.append(loss)
        norms.append(norm)
    out = {"trajectory/loss": np.asarray(losses), "trajectory/grad_norm": np.asarray(norms)}
    out.update({final_name(k): v for k, v in trained.items()})
    return out


def generate_trajectory_case(spec: Mapping[str, Any] | str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of one trajectory fixture: the golden case's tensors plus the trajectory's."""
    spec = load_trajectory_spec(spec)
    tensors, metadata = generate_case(golden_part(spec))
    tensors.update(run_trajectory(unpack_fixture(golden_part(spec), tensors), spec[TRAJECTORY_KEY]))
    for name, (_, dtype) in trajectory_layout(spec).items():
        tensors[name] = np.asarray(tensors[name], dtype=dtype, order="C")
    metadata = {**metadata, "spec": json.dumps(spec, sort_keys=True), "kind": "trajectory"}
    return tensors, metadata


@dataclass(frozen=True)
class TrajectoryCase:
    """A trajectory fixture unpacked: the golden case, the filled ``"trajectory"`` spec and the stored results."""

    case: GoldenCase
    trajectory: dict[str, Any]
    losses: np.ndarray  # (steps,)
    grad_norms: np.ndarray  # (steps,)
    final: dict[str, np.ndarray]  # trained key -> tensor after the last step


def read_trajectory_fixture(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(filled spec, tensors)`` of a trajectory fixture; the tensors must be exactly those the spec implies."""
    path = Path(path)
    metadata, tensors = read_fixture_file(path)
    if metadata.get("format") != FORMAT or metadata.get("kind") != "trajectory":
        raise GoldenError(f"{path}: not a {FORMAT} trajectory fixture (format {metadata.get('format')!r}, "
                          f"kind {metadata.get('kind')!r})")  # fmt: skip
    try:
        spec = load_trajectory_spec(json.loads(metadata.get("spec", "null")))
    except (json.JSONDecodeError, ConfigError) as exc:
        raise GoldenError(f"{path}: __metadata__.spec is not a valid trajectory spec ({exc})") from None
    layout = {**fixture_layout(golden_part(spec)), **trajectory_layout(spec)}
    missing = [k for k in layout if k not in tensors]
    unexpected = [k for k in tensors if k not in layout]
    if missing or unexpected:
        raise GoldenError(f"{path}: tensors disagree with the spec: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, (shape, dtype) in layout.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != np.dtype(dtype):
            raise GoldenError(f"{path}: {name} is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                              f"the spec implies {shape} {dtype}")  # fmt: skip
    return spec, tensors


def unpack_trajectory(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> TrajectoryCase:
    case = unpack_fixture(golden_part(spec), tensors)
    prefixes = ("trajectory/adapter/", "trajectory/base/")
    final = {name.split("/", 2)[2]: value for name, value in tensors.items() if name.startswith(prefixes)}
    return TrajectoryCase(case, dict(spec[TRAJECTORY_KEY]), tensors["trajectory/loss"],
                          tensors["trajectory/grad_norm"], final)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the committed cases: golden/trajectories/
# ----------------------------------------------------------------------------------------------


def default_trajectories_dir() -> Path:
    return default_golden_dir() / TRAJECTORIES_DIR


def read_trajectory_specs(folder: str | Path) -> dict[str, dict[str, Any]]:
    files = sorted((Path(folder) / "cases").glob("*.json"))
    if not files:
        raise GoldenError(f"{Path(folder) / 'cases'}: no trajectory specs (*.json)")
    specs = {}
    for file in files:
        try:
            specs[file.stem] = load_trajectory_spec(file)
        except ConfigError as exc:  # name the file once (read_json's messages already start with it)
            raise ConfigError(str(exc) if str(exc).startswith(str(file)) else f"{file}: {exc}") from None
    return specs


def generate_trajectory_corpus(folder: str | Path | None = None) -> dict[str, Any]:
    """Rewrite ``fixtures/`` and ``manifest.json`` of the trajectory folder from its ``cases/*.json``."""
    folder = Path(folder) if folder is not None else default_trajectories_dir()
    specs = read_trajectory_specs(folder)
    serialized = {name: serialize_fixture(*generate_trajectory_case(spec)) for name, spec in specs.items()}
    provenance = {"generator": f"reflora {__version__}", "numpy": np.__version__, "command": GENERATE_COMMAND}
    cases, files = {}, {}
    for name, data in serialized.items():
        relative = f"fixtures/{name}.safetensors"
        files[folder / relative] = data
        cases[name] = {"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "spec": specs[name], "provenance": provenance}  # fmt: skip
    manifest = {"format": FORMAT, "kind": "trajectory", "case_count": len(cases),
                "total_bytes": sum(len(d) for d in serialized.values()), "rtol": {"float64": RTOL}, "cases": cases}  # fmt: skip
    files[folder / "manifest.json"] = (json.dumps(manifest, indent=1) + "\n").encode()
    atomic_write_files(files)  # the fixtures and the manifest as one unit: all replaced, or none
    for stale in (folder / "fixtures").glob("*.safetensors"):
        if stale.stem not in cases:
            stale.unlink()
    return manifest


def trajectory_fixtures(folder: str | Path | None = None) -> dict[str, Path]:
    """Case name -> fixture path, from the manifest; each file must exist and match its sha256."""
    folder = Path(folder) if folder is not None else default_trajectories_dir()
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise GoldenError(f"{folder / 'manifest.json'}: unreadable ({exc}); run `{GENERATE_COMMAND}`") from None
    paths = {}
    for name, entry in manifest["cases"].items():
        path = folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise GoldenError(f"{path}: missing, or its sha256 differs from the manifest (run `{GENERATE_COMMAND}`)")
        paths[name] = path
    return paths


def verify_trajectory_fixture(path: str | Path) -> list[str]:
    """Regenerate a fixture in memory; problems (empty: ok). Inputs bit-exact, outputs within ``RTOL``
    (max|new − stored| ≤ RTOL · max|stored| per tensor)."""
    spec, stored = read_trajectory_fixture(path)
    fresh, _ = generate_trajectory_case(spec)
    rtol = RTOL
    problems = []
    for name, value in stored.items():
        is_output = name in ("logits", "loss") or name.startswith(("grad/", "trajectory/"))
        if not is_output:
            if not np.array_equal(value, fresh[name]):
                problems.append(f"{name}: the input drawn from the seed differs")
            continue
        scale = float(np.max(np.abs(value))) if value.size else 0.0
        error = float(np.max(np.abs(fresh[name] - value))) if value.size else 0.0
        if error > rtol * max(scale, np.finfo(value.dtype).tiny):
            problems.append(f"{name}: max|new − stored| = {error:.3e} > {rtol:.0e} · {scale:.3e}")
    return problems


def verify_trajectory_corpus(folder: str | Path | None = None) -> dict[str, list[str]]:
    """Case name -> problems, for every case of the manifest; the specs in ``cases/`` must match it."""
    folder = Path(folder) if folder is not None else default_trajectories_dir()
    paths = trajectory_fixtures(folder)
    specs = read_trajectory_specs(folder)
    report = {name: verify_trajectory_fixture(path) for name, path in paths.items()}
    for name in sorted(set(specs) ^ set(paths)):
        report.setdefault(name, []).append(f"in cases/ or the manifest but not both (run `{GENERATE_COMMAND}`)")
    for name in sorted(set(specs) & set(paths)):
        if read_trajectory_fixture(paths[name])[0] != specs[name]:
            report[name].append(f"cases/{name}.json differs from the fixture's spec (run `{GENERATE_COMMAND}`)")
    return report
