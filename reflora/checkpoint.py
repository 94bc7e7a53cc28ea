"""Checkpoints and adapters in the files transformers and PEFT write. Safetensors and JSON only.

* GPT-2: ``model.safetensors`` (+ ``config.json``) as ``GPT2LMHeadModel.save_pretrained`` writes them; the
  tied ``lm_head.weight`` is absent, or equal to ``transformer.wte.weight`` if present.
* LoRA: ``adapter_model.safetensors`` + ``adapter_config.json`` as ``PeftModel.save_pretrained`` writes them.
  Keys drop the adapter name (``base_model.model.<module>.lora_A.weight``); with ``bias`` ``'all'`` or
  ``'lora_only'`` the trained biases are saved too, a targeted module's as ``<module>.base_layer.bias``.
  A ``modules_to_save`` copy is saved under its module's own name (``base_model.model.<module>.weight``, without
  ``modules_to_save.default``); a head tied to wte's copy (``ensure_weight_tying``) is saved twice, as
  ``...transformer.wte.weight`` and ``...lm_head.weight``, which must agree on load.

Every write goes to temporary files in the same folder (``.<name>.reflora-tmp-<pid>-<random>``), which are
renamed into place only once all of a save's files are complete, so an interrupted save never leaves a partial
file or a mismatched pair; a process killed outright leaves its temporaries, which the next write to that
folder removes. A target that is not a regular file (a folder, a device, a fifo) is refused, and a write that
fails is a ``CheckpointWriteError`` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import struct
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.targets import ADAPTER_PREFIX, HEAD_KEY, adapter_shapes, base_shapes, plan_lora, trainable_bias_keys
from reflora.validate import key_mismatch


class CheckpointError(ValueError):
    """A checkpoint or adapter file is missing, malformed, or disagrees with its config."""


class CheckpointWriteError(CheckpointError, OSError):
    """A file could not be written (a full disk, a path under a file, a folder or a device in the way, no
    permission); the message names the path. An ``OSError`` too, for callers that catch those."""


_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_MARK = ".reflora-tmp-"  # a temporary file is ".<name>.reflora-tmp-<pid>-<random>" next to its target


def temp_owner(name: str) -> int | None:
    """The pid in a temporary file's name (``.<name>.reflora-tmp-<pid>-<random>``), or None for other names."""
    if not name.startswith(".") or TEMP_MARK not in name:
        return None
    pid = name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process (or we cannot tell): leave its file alone
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` left by a write whose process is gone (killed before it could
    clean up, e.g. by SIGKILL); a live process's temporary files are kept. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = temp_owner(entry.name)
        if pid is not None and not _pid_alive(pid) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def check_writable_target(path: Path) -> None:
    """``CheckpointWriteError`` unless ``path`` is a new path or an existing regular file in a folder (or a
    chain of folders still to create): never a device, a fifo, a socket or a folder, which a rename would
    replace."""
    path = Path(path)
    if str(path) in ("", "."):
        raise CheckpointWriteError(f"{str(path)!r}: not a file path")
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise CheckpointWriteError(f"{path}: a dangling symbolic link; refusing to write through it") from None
        if stat.S_ISDIR(mode):
            raise CheckpointWriteError(f"{path}: is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise CheckpointWriteError(f"{path}: not a regular file (a device, fifo or socket); refusing to replace it")
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise CheckpointWriteError(f"{path}: {parent} is not a folder")
            break


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back so that Ctrl-C or SIGTERM lands before or after the block, never inside it
    (inside a group of renames, or between creating a temporary file and recording it). A signal mask would not
    do: the BLAS's threads can take a process's signal, and Python runs its handler in the main thread at the
    next bytecode. So the block swaps in handlers that only note the signal, and raises it again after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files as one unit: every file goes to a temporary file in its folder first
    (``.<name>.reflora-tmp-<pid>-<random>``), and only when all of them are fully written (and fsynced) are
    they renamed into place, with SIGINT and SIGTERM held back during the renames. A failure before the
    renames leaves every old file untouched and no temporary behind; a process killed outright (SIGKILL)
    leaves its temporaries, and the next write to that folder removes them (``remove_stale_temps``).

    A target that exists and is not a regular file (a folder, a device such as ``/dev/full``, a fifo), or
    whose folder cannot be created, is refused before anything is written; any write failure is a
    ``CheckpointWriteError`` naming the path."""
    targets = {Path(path): data for path, data in files.items()}
    for path in targets:
        check_writable_target(path)
    temps: list[tuple[str, Path]] = []
    swept: set[Path] = set()
    current = None
    try:
        for path, data in targets.items():
            current = path
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise CheckpointWriteError(f"{path}: cannot create its folder (a file is in the way)") from None
            if path.parent not in swept:  # once per folder, not once per file
                remove_stale_temps(path.parent)
                swept.add(path.parent)
            with _signals_held():  # a signal right after mkstemp would leave a temporary nobody removes
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-")
                temps.append((tmp, path))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a saved file gets the usual permissions
        with _signals_held():
            for tmp, path in temps:
                current = path
                os.replace(tmp, path)
    except CheckpointWriteError:
        _remove(temps)
        raise
    except OSError as exc:
        _remove(temps)
        raise CheckpointWriteError(f"{current}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        _remove(temps)
        raise


def _remove(temps: list[tuple[str, Path]]) -> None:
    for tmp, _ in temps:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    atomic_write_files({Path(path): data})


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                       "uint8": "U8", "bool": "BOOL"}  # fmt: skip


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file, canonical: tensors sorted by name and stored in that order, metadata
    sorted by key, compact JSON header padded with spaces to a multiple of 8. The same tensors and metadata
    always give the same bytes (``safetensors.numpy.save`` orders the metadata at random)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        if array.dtype.name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, not one of {list(_SAFETENSORS_DTYPES)}")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def atomic_save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written through a temporary file and a rename."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file; a malformed or truncated file is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_json(path: str | Path, error: type[Exception] = CheckpointError, what: str = "file") -> Any:
    """The JSON value in ``path``; a missing file or invalid JSON is ``error`` naming the path (``what`` names
    the kind of file). Only JSON is ever read: nothing is unpickled."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}), so not a JSON {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object (a config file) from ``path``; ``CheckpointError`` naming the path otherwise."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------


def load_gpt2(path: str | Path, config: GPT2Config | None = None) -> tuple[dict[str, np.ndarray], GPT2Config]:
    """Load ``model.safetensors`` from a file or a ``save_pretrained`` folder.

    The config comes from ``config`` or else the folder's ``config.json``. Keys must be exactly the base keys
    (an extra ``lm_head.weight`` is accepted only if it equals the tied ``transformer.wte.weight``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (a GPT-2 folder, or its model.safetensors)")
    folder, file = (path, path / "model.safetensors") if path.is_dir() else (path.parent, path)
    if config is None:
        config = GPT2Config.from_dict(read_json_object(folder / "config.json"))
    tensors = read_safetensors(file)
    head = tensors.pop("lm_head.weight", None)
    expected = base_shapes(config)
    mismatch = key_mismatch(tensors, expected, show=5)
    if mismatch:
        raise CheckpointError(f"{file}: keys do not match GPT-2 {config}: {mismatch}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{file}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        _check_float(file, key, tensors[key])
    if head is not None and not np.array_equal(head, tensors["transformer.wte.weight"]):
        raise CheckpointError(f"{file}: lm_head.weight is not tied to transformer.wte.weight")
    return {k: tensors[k] for k in expected}, config


def save_gpt2(folder: str | Path, params: dict[str, np.ndarray], config: GPT2Config) -> None:
    """Write ``model.safetensors`` and ``config.json`` as transformers does (tied head omitted)."""
    folder = Path(folder)
    hf_config = {**config.to_dict(), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True}  # fmt: skip
    weights = safetensors_bytes({k: params[k] for k in base_shapes(config)}, {"format": "pt"})
    atomic_write_files({folder / "model.safetensors": weights,
                        folder / "config.json": (json.dumps(hf_config, indent=2) + "\n").encode()})  # fmt: skip


# ----------------------------------------------------------------------------------------------
# LoRA adapters
# ----------------------------------------------------------------------------------------------


def _adapter_bias_file_key(key: str, targeted: set[str]) -> str:
    module = key.removesuffix(".bias")
    return f"{ADAPTER_PREFIX}{module}.base_layer.bias" if module in targeted else f"{ADAPTER_PREFIX}{key}"


def save_adapter(
    folder: str | Path,
    adapter: dict[str, np.ndarray],
    lora: LoraConfig,
    config: GPT2Config,
    biases: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's format.

    ``biases``: the trained base biases of the ``bias`` mode, under HF keys (required unless bias='none').
    """
    plan = plan_lora(config, lora)
    shapes = adapter_shapes(plan)
    _check_adapter_tensors(adapter, shapes, where="adapter")
    tensors = {k: adapter[k] for k in shapes}
    tensors.update({k: adapter[v] for k, v in _tied_duplicates(plan).items()})  # PEFT saves a tied copy twice
    bias_keys = trainable_bias_keys(config, lora, plan)
    if bias_keys:
        if biases is None or any(k not in biases for k in bias_keys):
            raise CheckpointError(f"bias={lora.bias!r} saves the trained biases: pass biases for {bias_keys[:3]}...")
        for key in bias_keys:
            tensors[_adapter_bias_file_key(key, set(plan))] = biases[key]
    peft_config = {**lora.to_peft_dict(), "peft_type": "LORA", "task_type": None, "fan_in_fan_out": True,
                   "inference_mode": True, "base_model_name_or_path": None}  # fmt: skip
    if lora.qkv_slices is not None:
        peft_config["qkv_slices"] = list(lora.qkv_slices)  # reflora-only: PEFT cannot load per-slice adapters
    folder = Path(folder)
    atomic_write_files({
        folder / "adapter_model.safetensors": safetensors_bytes(tensors, {"format": "pt"}),
        folder / "adapter_config.json": (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode(),
    })  # fmt: skip


def load_adapter(
    folder: str | Path, config: GPT2Config
) -> tuple[dict[str, np.ndarray], LoraConfig, dict[str, np.ndarray]]:
    """Read a PEFT adapter folder: ``(adapter tensors, LoraConfig, trained biases under HF keys)``.

    The tensors must be exactly those the config implies, with the implied shapes; otherwise the error names
    the first disagreement (a missing key, an unexpected key, or a shape whose r or size is off).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder" if not folder.exists() else f"{folder}: not a folder "
                              "(an adapter is a folder with adapter_model.safetensors + adapter_config.json)")  # fmt: skip
    try:
        lora = LoraConfig.from_dict(read_json_object(folder / "adapter_config.json"))
    except ConfigError as exc:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: {exc}") from None
    tensors = read_safetensors(folder / "adapter_model.safetensors")
    plan = plan_lora(config, lora)
    shapes = adapter_shapes(plan)
    bias_keys = trainable_bias_keys(config, lora, plan)
    bias_file_keys = {_adapter_bias_file_key(k, set(plan)): k for k in bias_keys}
    for duplicate, key in _tied_duplicates(plan).items():  # a tied head's copy, saved twice: both must agree
        if duplicate not in tensors:
            raise CheckpointError(f"{folder}: ensure_weight_tying ties lm_head to wte's copy, but the file lacks "
                                  f"{duplicate} (PEFT saves the shared copy under both keys)")  # fmt: skip
        if key in tensors and not np.array_equal(tensors.pop(duplicate), tensors[key]):
            raise CheckpointError(f"{folder}: {duplicate} differs from {key}, but ensure_weight_tying makes them one "
                                  "tensor")  # fmt: skip
    lora_tensors = {k: v for k, v in tensors.items() if k not in bias_file_keys}
    _check_adapter_tensors(lora_tensors, shapes, where=str(folder / "adapter_model.safetensors"))
    missing_bias = [k for k in bias_file_keys if k not in tensors]
    if missing_bias:
        raise CheckpointError(f"{folder}: bias={lora.bias!r} but the file lacks {missing_bias[:3]}")
    biases = {hf_key: tensors[file_key] for file_key, hf_key in bias_file_keys.items()}
    for file_key in bias_file_keys:
        _check_float(folder / "adapter_model.safetensors", file_key, tensors[file_key])
    return {k: lora_tensors[k] for k in shapes}, lora, biases


def _tied_duplicates(plan) -> dict[str, str]:
    """{``base_model.model.lm_head.weight``: wte's copy key} when modules_to_save ties the head to wte's copy (PEFT
    writes the shared copy under both module names), else {}."""
    out = {}
    for module in plan.values():
        for key, hf_key, _ in module.saved or ():
            if hf_key == HEAD_KEY and key != ADAPTER_PREFIX + HEAD_KEY:
                out[ADAPTER_PREFIX + HEAD_KEY] = key
    return out


def _check_adapter_tensors(tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], where: str) -> None:
    mismatch = key_mismatch(tensors, shapes)
    if mismatch:
        raise CheckpointError(f"{where}: tensors disagree with adapter_config.json: {mismatch}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(tensors[key].shape)}, but adapter_config.json implies {shape} "
                "(check r, rank_pattern and target_modules)"
            )
        _check_float(where, key, tensors[key])


def _check_float(where: str | Path, key: str, value: np.ndarray) -> None:
    """Weights are floating point: an integer or boolean tensor would be cast silently and merge wrong values."""
    if np.asarray(value).dtype.kind != "f":
        raise CheckpointError(f"{where}: {key} has dtype {np.asarray(value).dtype}, expected a floating-point tensor")
