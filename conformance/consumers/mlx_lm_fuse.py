"""mlx-lm 0.32.x (MLX, CPU build on Linux): ``mlx_lm.utils.load_model`` on the HF GPT-2 folder, the adapter by
mlx-lm's own ``load_adapters`` (mlx_lm/tuner/utils.py), merged by ``fuse()`` of each LoRA layer as ``mlx_lm.fuse``
does (mlx_lm/tuner/lora.py ``LoRALinear.fuse``, mlx_lm/tuner/dora.py ``DoRALinear.fuse``).

mlx-lm has **no PEFT reader**: ``load_adapters`` reads only its own format (``adapter_config.json`` with
``fine_tune_type`` / ``num_layers`` / ``lora_parameters``, and ``adapters.safetensors`` with its own key names).
So this consumer first *translates* the PEFT folder into that format (``translate``), then hands the translated
folder to mlx-lm. What is checked is mlx-lm's loading, LoRA forward and fuse on the translated files, plus the
translation itself; a PEFT feature mlx-lm's format cannot carry is "not supported" (``notes``).

Key map (PEFT file -> mlx-lm file), for each adapted module ``transformer.h.{i}.{kind}``, kind one of
``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``:

====================================================================  ==========================================
PEFT ``adapter_model.safetensors``                                     mlx-lm ``adapters.safetensors``
====================================================================  ==========================================
``base_model.model.transformer.h.{i}.{kind}.lora_A.weight`` (r, in)    ``model.h.{i}.{kind}.lora_a`` (in, r) = Aᵀ
``base_model.model.transformer.h.{i}.{kind}.lora_B.weight`` (out, r)   ``model.h.{i}.{kind}.lora_b`` (r, out) = Bᵀ
``base_model.model.transformer.h.{i}.{kind}.lora_magnitude_vector``    ``model.h.{i}.{kind}.m`` (out,) (DoRA)
====================================================================  ==========================================

and ``adapter_config.json``: ``fine_tune_type`` = ``"dora"`` if use_dora else ``"lora"``; ``num_layers`` = N,
the adapted blocks being the last N (mlx-lm adapts ``model.layers[-N:]``); ``lora_parameters`` = ``{"rank": r,
"scale": s, "dropout": 0.0, "keys": [the kinds]}}`` with s = lora_alpha / r **computed by the translation**
(reflora's ``LoraConfig.scaling``): mlx-lm's format carries the scale itself, not alpha, so for every feature this
consumer checks mlx-lm's loading, model and fuse *given a scale*, never how a scale is derived from a PEFT config
(``SCALE_NOTE``). mlx-lm has no rsLoRA (``scale`` is an absolute multiplier), so ``use_rslora`` is not supported
rather than translated to alpha / √r, which would check reflora's formula. Tensors keep the file's dtype
(``mx.load`` / ``mx.save_safetensors``).

Base: mlx-lm's GPT-2 reads neither of two things a folder written by transformers' ``GPT2LMHeadModel
.save_pretrained`` has (both in ``BASE_NOTES``, docs/findings.md), so the base needs two fixes too:

* its ``sanitize`` (models/gpt2.py) knows only the keys of the hub's ``gpt2`` checkpoint (``h.0.attn.c_attn.weight``,
  saved from a GPT2Model), not ``transformer.h.0.attn.c_attn.weight``: ``load_model`` raises "Received 28
  parameters not in model". ``translate_base`` rewrites the file with the ``transformer.`` prefix removed (values
  and dtype unchanged), nothing else;
* its ``ModelArgs`` requires an ``n_ctx`` field (unused by the model) that transformers no longer writes: given
  through load_model's own ``model_config={"n_ctx": n_positions}`` argument.

The model is then cast to float32 (``model.set_dtype``), as the torch consumers load in float32: it computes in
float32 whatever the file dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from conformance.files import FILE_FEATURE_IDS
from conformance.protocol import NotSupported
from reflora.checkpoint import read_json_object, read_safetensors
from reflora.config import GPT2Config, LoraConfig
from reflora.targets import plan_lora

UNSUPPORTED = {
    "file.load.rslora": "mlx-lm has no rsLoRA: its adapter_config.json carries lora_parameters.scale, an absolute "
    "multiplier (tuner/utils.py linear_to_lora_layers passes config['scale'] to LoRALinear / DoRALinear, which "
    "apply scale · B A x; no field or code path in mlx_lm/tuner gives alpha / √r), so a use_rslora file could only "
    "be carried by the translation computing alpha / √r itself, which would check reflora's formula, not mlx-lm",
    "file.load.patterns": "mlx-lm's adapter_config.json has one lora_parameters.rank and one scale for every "
    "adapted layer (tuner/utils.py linear_to_lora_layers): a rank_pattern / alpha_pattern giving several ranks or "
    "scales cannot be written",
    "file.load.lora_bias": "mlx-lm's LoRALinear / DoRALinear hold lora_a and lora_b matrices only "
    "(tuner/lora.py, tuner/dora.py): no bias on B, so PEFT's lora_B.bias has nowhere to go",
    "file.load.padding": "mlx-lm's GPT-2 takes no attention mask (models/gpt2.py GPT2Model.__call__(inputs, "
    "cache): causal mask only)",
}
LAYERS_NOTE = ("mlx-lm's num_layers adapts the last N blocks (tuner/utils.py linear_to_lora_layers, "
               "model.layers[-num_layers:]); other layers_to_transform cannot be written")  # fmt: skip
SCALE_NOTE = ("the translation computes scale = lora_alpha / r and writes it to lora_parameters.scale (mlx-lm's "
              "format carries the scale itself, not alpha): mlx_lm_fuse checks mlx-lm's loading, model and fuse "
              "given that scale, for every feature; it does not check how a scale is derived from a PEFT config "
              "(mlx-lm has no PEFT reader and no rsLoRA)")  # fmt: skip
KINDS_NOTE = "mlx-lm's lora_parameters.keys are the same module paths in every adapted block"


def _mlx_plan(base_config: GPT2Config, lora: LoraConfig, where: Path) -> tuple[dict, dict]:
    """The mlx-lm ``adapter_config.json`` for a PEFT config, and the key map PEFT file key -> (mlx key,
    transpose). NotSupported (naming the PEFT field) when mlx-lm's format cannot carry it."""
    if lora.lora_bias:
        raise NotSupported(f"{where}: lora_bias: {UNSUPPORTED['file.load.lora_bias']}")
    if lora.use_rslora:
        raise NotSupported(f"{where}: use_rslora: {UNSUPPORTED['file.load.rslora']}")
    plan = plan_lora(base_config, lora)
    if not plan:
        raise NotSupported(f"{where}: no module is adapted")
    ranks = {(m.r, m.scaling) for m in plan.values()}
    if len(ranks) > 1:
        raise NotSupported(f"{where}: (rank, scale) pairs {sorted(ranks)}: {UNSUPPORTED['file.load.patterns']}")
    kinds_by_layer: dict[int, set[str]] = {}
    for module in plan.values():
        if len(module.branches) != 1 or module.layer < 0:
            raise NotSupported(f"{where}: {module.name}: mlx-lm's LoRALinear adapts a whole Linear once")
        kinds_by_layer.setdefault(module.layer, set()).add(module.kind)
    kinds = set().union(*kinds_by_layer.values())
    if any(k != kinds for k in kinds_by_layer.values()):
        raise NotSupported(f"{where}: {KINDS_NOTE}")
    n = len(kinds_by_layer)
    if set(kinds_by_layer) != set(range(base_config.n_layer - n, base_config.n_layer)):
        raise NotSupported(f"{where}: layers {sorted(kinds_by_layer)}: {LAYERS_NOTE}")
    (r, scale), = ranks  # fmt: skip
    config = {"fine_tune_type": "dora" if lora.use_dora else "lora", "num_layers": n,
              "lora_parameters": {"rank": r, "scale": scale, "dropout": 0.0, "keys": sorted(kinds)}}  # fmt: skip
    keys = {}
    for module in plan.values():
        path = f"model.h.{module.layer}.{module.kind}"
        branch = module.branches[0]
        keys[branch.a_key] = (f"{path}.lora_a", True)
        keys[branch.b_key] = (f"{path}.lora_b", True)
        if module.magnitude_key is not None:
            keys[module.magnitude_key] = (f"{path}.m", False)
    return config, keys


def translate(peft_folder: Path, base_config: GPT2Config, out: Path) -> Path:
    """Write mlx-lm's adapter folder (``adapter_config.json`` + ``adapters.safetensors``) for one PEFT adapter
    folder into ``out`` (the key map in the module docstring; lora_a (in, r) = Aᵀ, lora_b (r, out) = Bᵀ, m (out,)).
    Every file key must be mapped: an unknown key is an error naming it."""
    import mlx.core as mx

    peft_folder, out = Path(peft_folder), Path(out)
    lora = LoraConfig.from_dict(read_json_object(peft_folder / "adapter_config.json"))
    config, keys = _mlx_plan(base_config, lora, peft_folder)
    tensors = mx.load(str(peft_folder / "adapter_model.safetensors"))
    unknown = sorted(set(tensors) - set(keys))
    if unknown:
        raise NotSupported(f"{peft_folder}: file keys mlx-lm's format has no place for: {unknown[:3]}")
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise ValueError(f"{peft_folder}/adapter_model.safetensors lacks {missing[:3]}")
    weights = {mlx_key: tensors[key].T if transpose else tensors[key] for key, (mlx_key, transpose) in keys.items()}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


BASE_NOTES = {
    "base_keys": "mlx-lm 0.32.2's GPT-2 sanitize (models/gpt2.py) takes only the hub checkpoint's un-prefixed keys "
    "(h.0.attn.c_attn.weight): a folder saved by transformers' GPT2LMHeadModel (transformer.h.0...) fails in "
    "load_model with 'Received 28 parameters not in model'; the consumer strips the 'transformer.' prefix first",
    "base_n_ctx": "mlx-lm's gpt2.ModelArgs requires n_ctx, which transformers 5 does not write to config.json; the "
    "consumer passes load_model(..., model_config={'n_ctx': n_positions})",
}


def translate_base(base: Path, out: Path) -> Path:
    """A copy of the HF GPT-2 folder (``config.json``, ``model.safetensors``) with ``transformer.`` removed from
    every key (the names mlx-lm's GPT-2 ``sanitize`` reads); values and dtypes as stored."""
    import mlx.core as mx

    base, out = Path(base), Path(out)
    weights = mx.load(str(base / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), {k.removeprefix("transformer."): v for k, v in weights.items()})
    (out / "config.json").write_bytes((base / "config.json").read_bytes())
    return out


def _np(array) -> np.ndarray:
    import mlx.core as mx

    return np.array(array.astype(mx.float32)).astype(np.float64)


class MlxLmFuse:
    name = "mlx_lm_fuse"
    file_features = frozenset(f for f in FILE_FEATURE_IDS if f not in UNSUPPORTED)
    notes: ClassVar[dict[str, str]] = {
        **UNSUPPORTED,
        **BASE_NOTES,
        "translation": "mlx-lm has no PEFT reader: the consumer translates the PEFT folder into mlx-lm's adapter "
        "format (conformance/consumers/mlx_lm_fuse.py, docs/conformance.md), then calls load_adapters and fuse",
        "scale": SCALE_NOTE,
        "file.load.layers": f"passes only where layers_to_transform is the last N blocks: {LAYERS_NOTE}",
        "file.load.several": "load_adapters converts one model's layers once: each adapter is loaded into a fresh "
        "model (one adapter per model)",
    }

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        def installed(package: str) -> str:
            try:
                return f"{package} {version(package)}"
            except PackageNotFoundError:
                return f"{package} (not installed: run with --isolated)"

        return {"candidate": installed("mlx-lm"), "framework": installed("mlx")}

    def _model(self, base: Path, config: GPT2Config, adapter: Path | None):
        """mlx-lm's GPT-2 from the folder, the translated adapter loaded, float32."""
        import mlx.core as mx
        from mlx_lm.utils import load_adapters, load_model

        model, _ = load_model(Path(base), model_config={"n_ctx": config.n_positions})
        if adapter is not None:
            load_adapters(model, str(adapter))
        model.set_dtype(mx.float32)
        model.eval()
        return model

    def consume(self, base: Path, adapter: Path, input: Path, out_dir: Path) -> dict:
        """``logits`` (B, T, V) with the top-level adapter, ``logits.<name>`` for each subfolder adapter (a fresh
        model each), then ``fuse()`` of every LoRA layer (as ``mlx_lm.fuse``): ``merged_logits`` and
        ``merged.transformer.h.{i}.{kind}.weight`` in HF's Conv1D layout (in, out) (mlx-lm's Linear is (out, in))."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        base, adapter, out_dir = Path(base), Path(adapter), Path(out_dir)
        config = GPT2Config.from_dict(read_json_object(base / "config.json"))
        data = read_safetensors(input)
        if not np.all(data["attention_mask"] == 1):
            raise NotSupported(UNSUPPORTED["file.load.padding"])
        ids = mx.array(data["input_ids"].astype(np.int32))
        names = ["default", *sorted(p.parent.name for p in adapter.glob("*/adapter_config.json"))]
        translated = {n: translate(adapter if n == "default" else adapter / n, config, out_dir / f"mlx-{n}")
                      for n in names}  # fmt: skip
        base = translate_base(base, out_dir / "mlx-base")
        out = {}
        for n in names[1:]:
            out[f"logits.{n}"] = _np(self._model(base, config, translated[n])(ids))
        model = self._model(base, config, translated["default"])
        out["logits"] = _np(model(ids))
        fused = [(path, module.fuse()) for path, module in model.named_modules() if hasattr(module, "fuse")]
        model.update_modules(tree_unflatten(fused))
        out["merged_logits"] = _np(model(ids))
        for path, module in fused:  # model.h.{i}.{kind} -> transformer.h.{i}.{kind}.weight, (out, in) -> (in, out)
            out[f"merged.transformer.{path.removeprefix('model.')}.weight"] = _np(module.weight).T
        return out


consumer = MlxLmFuse()
