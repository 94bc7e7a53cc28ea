"""The adapter-file level: a *consumer* (a program that loads adapter files) is checked on files reflora wrote.

A case is two folders and one input file, all written by reflora from a seeded draw (never downloaded):

* ``base/``: a HF GPT-2 checkpoint (``config.json`` + ``model.safetensors``, reflora.checkpoint.save_gpt2);
* ``adapter/``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
  reflora.checkpoint.save_adapter); with several adapters, PEFT's subfolder layout: the first adapter at the
  top, each further one in ``adapter/<name>/``;
* ``input``: ``input_ids`` (B, T) int64 and ``attention_mask`` (B, T) int64.

The consumer returns ``logits`` (B, T, V) with the first adapter active (with several: ``logits.<name>`` with
adapter ``<name>`` alone active), and where it merges ``merged_logits`` (B, T, V) and ``merged.<HF key>``
(merged weights). The reference answer is reflora.model.gpt2_forward / reflora.merge.merge_and_unload on the
tensors *as stored in the files* (a float16 file's values, widened exactly to float64). Tolerances are
conformance.tolerance's, for the dtype the consumer computes in (``FileConsumer.compute_dtype``).

A consumer is an object with ``name``, ``versions()``, ``file_features`` (the ids it supports, the others are
"not supported" with ``notes``), ``file_dtypes`` and ``consume(base, adapter, input, out_dir) -> dict``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conformance.tolerance import Comparison, compare
from reflora.checkpoint import read_safetensors, safetensors_bytes, save_adapter, save_gpt2
from reflora.config import GPT2Config, LoraConfig
from reflora.init import init_gpt2_params, init_lora_adapter
from reflora.merge import merge_and_unload
from reflora.model import gpt2_forward
from reflora.targets import plan_lora

FILE_CONFIG = GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2)
SECOND = "second"  # the name of a second adapter (subfolder adapter/second/)


@dataclass(frozen=True)
class FileFeature:
    """One ``file.*`` feature: what its files carry (``variant``) and what the consumer must return."""

    id: str
    variant: str
    title: str
    merge: bool = False  # needs merged logits / weights
    level: str = "file"


FILE_FEATURES = [
    FileFeature("file.load.c_attn", "plain", "r, alpha on c_attn: logits with the adapter loaded"),
    FileFeature("file.load.all_targets", "all_targets", "every target kind: c_attn, attn.c_proj, c_fc, mlp.c_proj"),
    FileFeature("file.load.rslora", "rslora", "use_rslora: scaling alpha/sqrt(r)"),
    FileFeature("file.load.patterns", "patterns", "rank_pattern and alpha_pattern"),
    FileFeature("file.load.layers", "layers", "layers_to_transform"),
    FileFeature("file.load.lora_bias", "lora_bias", "lora_bias: B has a bias (lora_B.bias)"),
    FileFeature("file.load.dora", "dora", "DoRA: lora_magnitude_vector"),
    FileFeature("file.load.padding", "padding", "left padding with an attention mask"),
    FileFeature("file.load.several", "several", "two adapters in one folder (PEFT's subfolder layout), each alone"),
    FileFeature("file.dtype.float32", "float32", "float32 files"),
    FileFeature("file.dtype.float16", "float16", "float16 files"),
    FileFeature("file.dtype.bfloat16", "bfloat16", "bfloat16 files"),
    FileFeature("file.merge.logits", "merge", "merge the adapter: merged logits and every merged weight", True),
    FileFeature("file.merge.dora", "merge_dora", "merge a DoRA adapter: merged logits and weights", True),
]
FILE_FEATURE_IDS = {f.id: f for f in FILE_FEATURES}


@dataclass
class FileCase:
    """A drawn case in memory (float64 reference values, already rounded to the file dtype)."""

    variant: str
    seed: int
    config: GPT2Config
    params: dict[str, np.ndarray]
    adapters: dict[str, tuple[LoraConfig, dict[str, np.ndarray]]]  # name -> (config, PEFT file tensors)
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    file_dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict)


def _lora_for(variant: str, rng: np.random.Generator) -> LoraConfig:
    """The LoraConfig a variant draws: r in 1..4, alpha in {r, 2r, 3.5, 16} (alpha != r matters for scaling)."""
    r = int(rng.integers(1, 5))
    alpha = float(rng.choice([2 * r, 3.5, 16.0, r + 1]))
    base = dict(r=r, lora_alpha=alpha, target_modules=("c_attn",))
    if variant in ("all_targets", "padding", "float32", "float16", "bfloat16", "merge", "several"):
        base["target_modules"] = ("c_attn", "c_proj", "c_fc")
    if variant == "rslora":
        base.update(use_rslora=True, r=int(rng.integers(2, 5)))
    if variant == "patterns":
        base.update(target_modules=("c_attn", "c_proj", "c_fc"), rank_pattern={"c_fc": r + 2},
                    alpha_pattern={"h.1.attn.c_attn": alpha + 5.0})  # fmt: skip
    if variant == "layers":
        base.update(target_modules=("c_attn", "c_fc"), layers_to_transform=(1,))
    if variant == "lora_bias":
        base.update(lora_bias=True, target_modules=("c_attn", "c_fc"))
    if variant in ("dora", "merge_dora"):
        base.update(use_dora=True, target_modules=("c_attn", "c_fc"))
    return LoraConfig(**base)


def _draw_adapter(lora: LoraConfig, params, config: GPT2Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random non-zero A, B (reflora's "test" init), and for DoRA a magnitude m = ‖W + sBA‖_row · U(0.5, 1.5)
    (out,), so that the magnitude is neither the init value nor arbitrary in scale."""
    plain = dataclasses.replace(lora, use_dora=False)
    adapter = init_lora_adapter(plan_lora(config, plain), rng, "test")
    for module in plan_lora(config, lora).values():
        if module.magnitude_key is not None:
            weight = params[f"{module.name}.weight"]  # (in, out), Conv1D
            norms = np.linalg.norm(weight, axis=0)
            adapter[module.magnitude_key] = norms * rng.uniform(0.5, 1.5, norms.shape)
    return adapter


def _round(values: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Round to the file dtype and widen back to float64 (exact): the values the file really holds. bfloat16:
    float32 rounded to nearest even on its upper 16 bits (NumPy has no bfloat16)."""
    if dtype == "bfloat16":
        out = {}
        for k, v in values.items():
            bits = v.astype(np.float32).view(np.uint32)
            bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
            out[k] = bits.view(np.float32).astype(np.float64)
        return out
    return {k: v.astype(dtype).astype(np.float64) for k, v in values.items()}


def draw_file_case(variant: str, seed: int) -> FileCase:
    """The case of ``variant`` for ``seed``: base weights N(0, 0.02²) (reflora.init), B in 1..2, T in 3..6."""
    rng = np.random.default_rng(seed)
    config = FILE_CONFIG
    dtype = variant if variant in ("float16", "bfloat16") else "float32"
    params = _round(init_gpt2_params(config, rng), dtype)
    adapters = {}
    names = ["default", SECOND] if variant == "several" else ["default"]
    for name in names:
        lora = _lora_for(variant, rng)
        adapters[name] = (lora, _round(_draw_adapter(lora, params, config, rng), dtype))
    batch, seq = int(rng.integers(1, 3)), int(rng.integers(3, 7))
    input_ids = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if variant == "padding":
        mask[0, : int(rng.integers(1, seq))] = 0  # left padding in the first row
    return FileCase(variant, seed, config, params, adapters, input_ids, mask, dtype)


def _storage(values: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The arrays to write: float32 for bfloat16 files (``_to_bfloat16_file`` then narrows the file)."""
    if dtype == "bfloat16":
        return {k: v.astype(np.float32) for k, v in values.items()}
    return {k: v.astype(dtype) for k, v in values.items()}


def _to_bfloat16_file(path: Path) -> None:
    """Rewrite a safetensors file's F32 tensors as BF16 (the upper 16 bits: exact, the values are bf16-rounded)."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    new_header, chunks, offset = {}, [], 0
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    for name in names:
        info = header[name]
        start, stop = info["data_offsets"]
        chunk = body[start:stop]
        if info["dtype"] == "F32":
            chunk = (np.frombuffer(chunk, "<u4") >> 16).astype("<u2").tobytes()
            info = {**info, "dtype": "BF16"}
        new_header[name] = {**info, "data_offsets": [offset, offset + len(chunk)]}
        chunks.append(chunk)
        offset += len(chunk)
    if "__metadata__" in header:
        new_header["__metadata__"] = header["__metadata__"]
    text = json.dumps(new_header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def write_file_case(case: FileCase, folder: Path) -> dict[str, Path]:
    """Write ``base/``, ``adapter/`` (and ``adapter/<name>/``) and ``input.safetensors`` under ``folder``."""
    folder = Path(folder)
    save_gpt2(folder / "base", _storage(case.params, case.file_dtype), case.config)
    for i, (name, (lora, tensors)) in enumerate(case.adapters.items()):
        where = folder / "adapter" if i == 0 else folder / "adapter" / name
        save_adapter(where, _storage(tensors, case.file_dtype), lora, case.config)
    if case.file_dtype == "bfloat16":
        _to_bfloat16_file(folder / "base" / "model.safetensors")
        for file in (folder / "adapter").rglob("adapter_model.safetensors"):
            _to_bfloat16_file(file)
    inputs = {"input_ids": case.input_ids, "attention_mask": case.attention_mask}
    (folder / "input.safetensors").write_bytes(safetensors_bytes(inputs, {"format": "pt"}))
    return {"base": folder / "base", "adapter": folder / "adapter", "input": folder / "input.safetensors"}


def _logits(case: FileCase, params, adapters, name: str | None, xp_dtype) -> np.ndarray:
    """Eval logits (B, T, V) of the base plus adapter ``name`` alone (None: no adapter), computed in xp_dtype."""
    params = {k: v.astype(xp_dtype) for k, v in params.items()}
    kwargs = {}
    if name is not None:
        lora, tensors = adapters[name]
        kwargs = dict(lora=lora, adapter={k: v.astype(xp_dtype) for k, v in tensors.items()})
    mask = case.attention_mask.astype(xp_dtype)
    logits, _ = gpt2_forward(params, case.config, case.input_ids, attention_mask=mask, **kwargs)
    return np.asarray(logits)


def expected_results(case: FileCase, merge: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (float64 reference, plain float32 evaluation) of every result the feature checks."""
    out = {}
    for i, name in enumerate(case.adapters):
        key = "logits" if i == 0 else f"logits.{name}"
        out[key] = (_logits(case, case.params, case.adapters, name, np.float64),
                    _logits(case, case.params, case.adapters, name, np.float32))  # fmt: skip
    if merge:
        lora, tensors = case.adapters["default"]
        merged = merge_and_unload(case.params, case.config, lora, tensors)
        merged32 = merge_and_unload({k: v.astype(np.float32) for k, v in case.params.items()}, case.config, lora,
                                    {k: v.astype(np.float32) for k, v in tensors.items()})  # fmt: skip
        out["merged_logits"] = (_logits(case, merged, {}, None, np.float64),
                                _logits(case, merged32, {}, None, np.float32))  # fmt: skip
        for module in plan_lora(case.config, lora):
            key = f"{module}.weight"
            out[f"merged.{key}"] = (merged[key], merged32[key])
    # padded positions are not compared: their logits are whatever the consumer's masking leaves there
    return out


def check_file_case(case: FileCase, feature: FileFeature, results: dict[str, Any]) -> list[Comparison]:
    """Compare a consumer's results with the reference (conformance.tolerance, float32 policy; padded query
    positions are dropped from the logits before the comparison)."""
    keep = case.attention_mask.astype(bool)
    comparisons = []
    for name, (expected, plain) in expected_results(case, feature.merge).items():
        actual = results.get(name)
        if name.endswith("logits") or name.startswith("logits."):
            if actual is not None and np.shape(actual) == expected.shape:
                actual = np.asarray(actual, dtype=np.float64)[keep]
            expected, plain = expected[keep], plain[keep]
        comparisons.append(compare(name, actual, expected, plain, "float32"))
    return comparisons


@dataclass
class FileOutcome:
    feature: str
    outcome: str  # passed, failed, not_supported, error
    examples: int = 0
    worst_ratio: float = 0.0
    detail: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def run_file_feature(
    consumer, feature: FileFeature, workdir: Path, examples: int = 3, seed: int = 0, deviations=()
) -> FileOutcome:
    """Run ``examples`` seeded draws of ``feature`` through ``consumer``; the first failure stops the feature.
    A consumer raising ``NotSupported`` (conformance.protocol) for a draw makes the feature not supported;
    ``CandidateError`` (crash, timeout, bad output) and any other exception an error. A failure whose feature id
    one of ``deviations`` covers (conformance.deviations.covers) is a ``known_deviation``."""
    from conformance.deviations import match
    from conformance.protocol import CandidateError, NotSupported

    if feature.id not in consumer.file_features:
        reason = getattr(consumer, "notes", {}).get(feature.id, "the consumer does not declare it")
        return FileOutcome(feature.id, "not_supported", detail=reason)
    outcome = FileOutcome(feature.id, "passed")
    for i in range(examples):
        case_seed = seed * 1000 + i + 17 * sum(map(ord, feature.id))
        case = draw_file_case(feature.variant, case_seed)
        folder = Path(workdir) / f"{feature.id}-{i}"
        paths = write_file_case(case, folder)
        try:
            results = consumer.consume(paths["base"], paths["adapter"], paths["input"], folder / "out")
        except NotSupported as exc:
            return FileOutcome(feature.id, "not_supported", i, detail=str(exc))
        except CandidateError as exc:
            return FileOutcome(feature.id, "error", i, detail=f"{exc}\n{exc.detail}".strip())
        except Exception as exc:
            return FileOutcome(feature.id, "error", i, detail=f"{type(exc).__name__}: {exc}")
        outcome.examples += 1
        comparisons = check_file_case(case, feature, results)
        outcome.worst_ratio = max([outcome.worst_ratio, *(c.ratio for c in comparisons if c.passed)])
        bad = [c for c in comparisons if not c.passed]
        if bad:
            lines = [f"{c.name}: {c.problem or f'error {c.error:.3g} > bound {c.bound:.3g}'}" for c in bad[:4]]
            spec = {"variant": feature.variant, "seed": case_seed}
            outcome.outcome, outcome.detail = "failed", "; ".join(lines) + f" (case {json.dumps(spec)})"
            known = match(list(deviations), feature.id)
            if known is not None:
                outcome.outcome, outcome.detail = "known_deviation", f"{known.reason} [{outcome.detail}]"
            return outcome
    return outcome


def run_file_features(
    consumer, workdir: Path, examples: int = 3, only: str | None = None, deviations=()
) -> list[FileOutcome]:
    """Every ``file.*`` feature (or those whose id contains ``only``) against ``consumer``."""
    return [run_file_feature(consumer, f, workdir, examples, deviations=deviations)
            for f in FILE_FEATURES if only is None or only in f.id]  # fmt: skip


def consumer_deviations(consumer):
    """The shipped consumer's known deviations (conformance/consumers/deviations/<name>.json), else none."""
    from conformance.deviations import load_deviations

    path = Path(__file__).parent / "consumers" / "deviations" / f"{consumer.name}.json"
    return load_deviations(path) if path.is_file() else []


def read_results(path: Path) -> dict[str, np.ndarray]:
    """A consumer's output safetensors file, as stored (see docs/conformance.md, "Command candidates")."""
    return read_safetensors(path)
