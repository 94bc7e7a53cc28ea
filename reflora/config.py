"""Configurations, with the field names of Hugging Face's ``GPT2Config`` and PEFT's ``LoraConfig``.

Both are plain frozen dataclasses. ``from_dict`` accepts exactly the JSON that transformers and PEFT
write (``config.json``, ``adapter_config.json``): a field reflora implements is validated; a field it
does not implement is accepted only at PEFT's / transformers' default value, and any other value is an
error that names the field. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration field is missing, unknown, or has a value reflora cannot honour."""


# ----------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPT2Config:
    """The GPT-2 hyper-parameters, as ``transformers.GPT2Config`` names them.

    Defaults are GPT-2 small (124M). ``n_inner=None`` means ``4 * n_embd``.
    HF's own dropouts (``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``) are not part of reflora's model:
    the reference is GPT-2 with those dropouts off. LoRA's dropout is separate (see ``LoraConfig``).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"gpt2.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ConfigError(f"gpt2.n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"gpt2.n_embd ({self.n_embd}) must be divisible by gpt2.n_head ({self.n_head})")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"gpt2.layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        if self.activation_function != "gelu_new":
            raise ConfigError(
                f"gpt2.activation_function={self.activation_function!r} is not supported; reflora implements 'gelu_new'"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        """Build from HF ``config.json`` fields. Fields that do not change the math are accepted and dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"gpt2 config must be a JSON object, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in own:
                kwargs[key] = value
            elif key in _GPT2_IGNORED_FIELDS:
                continue
            elif key in _GPT2_REQUIRED_DEFAULTS:
                if value != _GPT2_REQUIRED_DEFAULTS[key]:
                    raise ConfigError(
                        f"gpt2.{key}={value!r} is not supported; reflora implements only "
                        f"{key}={_GPT2_REQUIRED_DEFAULTS[key]!r}"
                    )
            else:
                raise ConfigError(f"gpt2.{key} is not a GPT2Config field reflora knows")
        return cls(**kwargs)


# Fields of HF GPT2Config that never change the forward pass of the reference (dropouts are off,
# generation and bookkeeping fields are irrelevant).
_GPT2_IGNORED_FIELDS = frozenset(
    {
        "resid_pdrop", "embd_pdrop", "attn_pdrop", "initializer_range", "summary_type", "summary_use_proj",
        "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "use_cache", "bos_token_id",
        "eos_token_id", "pad_token_id", "architectures", "model_type", "transformers_version", "torch_dtype",
        "dtype", "task_specific_params", "n_ctx", "tie_word_embeddings", "_name_or_path", "output_attentions",
        "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "is_decoder",
    }
)  # fmt: skip
# Fields that change the math; reflora implements only their default value.
_GPT2_REQUIRED_DEFAULTS: dict[str, Any] = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

BIAS_MODES = ("none", "all", "lora_only")
LORA_INIT_VALUES = (True, False, "gaussian", "pissa", "olora", "orthogonal")
QKV_SLICE_NAMES = ("q", "k", "v")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters with PEFT ``LoraConfig`` field names and defaults (PEFT 0.21).

    ``target_modules``: a list (a module matches if its name equals an entry or ends with ``"." + entry``)
    or a string (a regex, ``re.fullmatch`` against the module name). ``None`` is PEFT's "model default",
    which for GPT-2 is ``["c_attn"]``.

    reflora-only field: ``qkv_slices``, e.g. ``["q", "v"]``: on the fused ``c_attn``, put independent
    rank-r adapters on those slices of the output only (loralib's ``MergedLinear(enable_lora=[T, F, T])``).
    ``None`` (the default) is PEFT's full-matrix LoRA on ``c_attn``.

    ``use_dora``: DoRA, a magnitude vector per targeted module (docs/advanced-semantics.md). ``lora_bias``: B gets
    a bias, the branch is ``s·(B A x + b_B)``. ``init_lora_weights``: ``True``, ``False``, ``"gaussian"``,
    ``"pissa"``, ``"olora"`` (reflora.lora_init). As in PEFT, ``lora_bias`` excludes DoRA and needs
    ``init_lora_weights`` true or false. reflora adds: DoRA is not combined with ``qkv_slices``.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: tuple[str, ...] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    qkv_slices: tuple[str, ...] | None = None
    use_dora: bool = False
    lora_bias: bool = False
    exclude_modules: tuple[str, ...] | str | None = None  # targets: see _check_targets
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None  # see _check_tokens
    modules_to_save: tuple[str, ...] | None = None  # see _check_saved
    ensure_weight_tying: bool = False  # see _check_saved

    def __post_init__(self) -> None:
        self._check_targets()
        self._check_tokens()
        self._check_saved()
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.layers_to_transform, list):
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        if isinstance(self.qkv_slices, list):
            object.__setattr__(self, "qkv_slices", tuple(self.qkv_slices))
        _check_rank("lora.r", self.r)
        _check_number("lora.lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"lora.use_rslora must be true or false, got {self.use_rslora!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"lora.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            if not isinstance(tm, tuple) or not tm or not all(isinstance(t, str) and t for t in tm):
                raise ConfigError(f"lora.target_modules must be a non-empty list of names or a regex, got {tm!r}")
        if isinstance(tm, str):
            try:
                re.compile(tm)  # "all-linear" compiles too; reflora.targets reads it as PEFT's shorthand
            except re.error as exc:
                raise ConfigError(f"lora.target_modules is not a valid regex ({exc}): {tm!r}") from None
            if self.layers_to_transform is not None:
                raise ConfigError("lora.layers_to_transform cannot be used when lora.target_modules is a regex string")
            if self.layers_pattern is not None:
                raise ConfigError("lora.layers_pattern cannot be used when lora.target_modules is a regex string")
        ltt = self.layers_to_transform
        if ltt is not None:
            items = (ltt,) if isinstance(ltt, int) else ltt
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise ConfigError(f"lora.layers_to_transform must be a layer index or a list of them, got {ltt!r}")
        if isinstance(self.layers_pattern, list):
            object.__setattr__(self, "layers_pattern", tuple(self.layers_pattern))
        if self.layers_pattern is not None:  # PEFT: a name, or a list of names, each a regex (reflora.targets)
            lp = self.layers_pattern
            names = (lp,) if isinstance(lp, str) else lp
            if not isinstance(names, tuple) or not all(isinstance(p, str) for p in names):
                raise ConfigError(f"lora.layers_pattern must be a name, a list of names or null, got {lp!r}")
            for p in names:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise ConfigError(f"lora.layers_pattern entry {p!r} is not a valid regex ({exc})") from None
            if lp and self.layers_to_transform is None:
                raise ConfigError("lora.layers_pattern is set, so lora.layers_to_transform must be set too")
        for key, value in self.rank_pattern.items():
            _check_rank(f"lora.rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_number(f"lora.alpha_pattern[{key!r}]", value)
        if not isinstance(self.fan_in_fan_out, bool):
            raise ConfigError(f"lora.fan_in_fan_out must be true or false, got {self.fan_in_fan_out!r}")
        init = self.init_lora_weights
        niter = isinstance(init, str) and re.fullmatch(r"pissa_niter_[0-9]+", init) is not None  # randomised PiSSA
        if not (isinstance(init, bool) or niter or (isinstance(init, str) and init in LORA_INIT_VALUES)):
            raise ConfigError(
                f"lora.init_lora_weights={self.init_lora_weights!r} is not supported; "
                "use true, false, 'gaussian', 'pissa', 'pissa_niter_K' (K ≥ 0), 'olora' or 'orthogonal'"
            )
        if init == "orthogonal":  # PEFT's orthogonal_init splits an r×r orthogonal matrix into halves
            odd = {k: v for k, v in {"r": self.r, **self.rank_pattern}.items() if v % 2}
            if odd:
                raise ConfigError(f"lora.init_lora_weights='orthogonal' needs even ranks (as in PEFT), got {odd}")
        for name in ("use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"lora.{name} must be true or false, got {getattr(self, name)!r}")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora.lora_bias=true cannot be combined with lora.use_dora=true (as in PEFT)")
        if self.lora_bias and not isinstance(self.init_lora_weights, bool):
            raise ConfigError(
                f"lora.lora_bias=true needs lora.init_lora_weights true or false (as in PEFT), got {self.init_lora_weights!r}"
            )
        if self.use_dora and self.qkv_slices is not None:
            raise ConfigError(
                "lora.use_dora=true cannot be combined with lora.qkv_slices (reflora defines no per-slice DoRA)"
            )
        if self.qkv_slices is not None:
            qs = self.qkv_slices
            if not qs or len(set(qs)) != len(qs) or any(s not in QKV_SLICE_NAMES for s in qs):
                raise ConfigError(f"lora.qkv_slices must be a non-empty subset of ['q', 'k', 'v'], got {list(qs)!r}")
            object.__setattr__(self, "qkv_slices", tuple(s for s in QKV_SLICE_NAMES if s in qs))

    def _check_targets(self) -> None:
        """``exclude_modules`` (PEFT 0.21 ``check_target_module_exists``, checked before ``target_modules``):
        a list (a module is excluded if its name equals an entry or ends with ``"." + entry``) or a string
        (a regex, ``re.fullmatch`` against the module name). ``target_modules="all-linear"`` (any case) is
        PEFT's shorthand for every ``nn.Linear``/``Conv1D`` except the output layer (reflora.targets)."""
        ex = self.exclude_modules
        if isinstance(ex, (list, set, frozenset)):
            ex = tuple(sorted(ex)) if isinstance(ex, (set, frozenset)) else tuple(ex)
            object.__setattr__(self, "exclude_modules", ex)
        if isinstance(ex, str):
            try:
                re.compile(ex)
            except re.error as exc:
                raise ConfigError(f"lora.exclude_modules is not a valid regex ({exc}): {ex!r}") from None
        elif ex is not None and not (isinstance(ex, tuple) and all(isinstance(t, str) and t for t in ex)):
            raise ConfigError(f"lora.exclude_modules must be a list of names, a regex or null, got {ex!r}")

    def _check_tokens(self) -> None:
        """``trainable_token_indices`` (PEFT 0.21 TrainableTokens, on GPT-2's tied ``wte``): a list of distinct
        token ids, or ``{"wte": [...]}`` (a key naming ``transformer.wte`` by suffix). reflora.targets resolves it."""
        tti = self.trainable_token_indices
        if tti is None:
            return
        items = tti.items() if isinstance(tti, dict) else [(None, tti)]
        out = {}
        for key, ids in items:
            where = "lora.trainable_token_indices" + ("" if key is None else f"[{key!r}]")
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ConfigError(f"{where} must be a non-empty list of token ids, got {ids!r}")
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"{where} must hold token ids (integers >= 0), got {list(ids)!r}")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"{where} repeats a token id ({list(ids)!r}); PEFT's index_copy keeps one of "
                                  "the repeated rows, reflora refuses it")  # fmt: skip
            out[key] = tuple(ids)
        object.__setattr__(self, "trainable_token_indices", out[None] if None in out else out)

    def _check_saved(self) -> None:
        """``modules_to_save`` (PEFT 0.21 ModulesToSaveWrapper): a list of names; a module is saved when its name
        ends with an entry (plain ``str.endswith``, as PEFT's ``_set_trainable``). ``ensure_weight_tying``: a bool
        (``null`` reads as false). reflora.targets resolves both against the model (``_saved_modules``)."""
        mts = self.modules_to_save
        if isinstance(mts, list):
            mts = tuple(mts)
            object.__setattr__(self, "modules_to_save", mts)
        if mts is not None and not (isinstance(mts, tuple) and mts and all(isinstance(m, str) and m for m in mts)):
            raise ConfigError(f"lora.modules_to_save must be a non-empty list of module names or null, got {mts!r}")
        if mts is not None:
            for m in mts:  # PEFT embeds each entry in a regex (saved_module_pattern): that pattern must compile
                try:
                    re.compile(saved_module_pattern(m))
                except re.error as exc:
                    raise ConfigError(
                        f"lora.modules_to_save entry {m!r} does not give a valid regex {saved_module_pattern(m)!r} "
                        f"({exc})"
                    ) from None
        if self.ensure_weight_tying is None:
            object.__setattr__(self, "ensure_weight_tying", False)
        if not isinstance(self.ensure_weight_tying, bool):
            raise ConfigError(f"lora.ensure_weight_tying must be true or false, got {self.ensure_weight_tying!r}")

    def scaling(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA (PEFT ``LoraLayer.update_layer``)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON values (tuples become lists), except the newer fields of
        ``_ADDITIVE_LORA_DEFAULTS`` at their defaults, which are left out (``from_dict`` fills them back in)."""
        out = dataclasses.asdict(self)
        for key in ("target_modules", "layers_to_transform", "layers_pattern", "qkv_slices", "exclude_modules",
                    "modules_to_save"):  # fmt: skip
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        tti = out["trainable_token_indices"]
        if tti is not None:
            out["trainable_token_indices"] = (
                {k: list(v) for k, v in tti.items()} if isinstance(tti, dict) else list(tti)
            )
        for key, default in _ADDITIVE_LORA_DEFAULTS.items():  # newer fields: left out at their default,
            if key in out and out[key] == default:  # so older specs and manifests keep their bytes
                del out[key]
        return out

    def to_peft_dict(self) -> dict[str, Any]:
        """The fields PEFT's ``LoraConfig(**d)`` accepts (the reflora-only ``qkv_slices`` is left out)."""
        out = self.to_dict()
        del out["qkv_slices"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a spec's ``lora`` object or a PEFT ``adapter_config.json``.

        A PEFT field that reflora does not implement must hold PEFT's default value (``None``, ``False``,
        ``{}``...); anything else is an error naming the field.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"lora config must be a JSON object, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in own:
                kwargs[key] = value
            elif key in _PEFT_BOOKKEEPING_FIELDS:
                if key == "peft_type" and value not in (None, "LORA"):
                    raise ConfigError(f"lora.peft_type={value!r}: reflora reads LoRA adapters only")
                continue
            elif key in _PEFT_UNSUPPORTED_DEFAULTS:
                if value != _PEFT_UNSUPPORTED_DEFAULTS[key] and not (value is None and key in _NONE_IS_DEFAULT):
                    raise ConfigError(
                        f"lora.{key}={value!r} is not supported by reflora (only the default "
                        f"{_PEFT_UNSUPPORTED_DEFAULTS[key]!r} is)"
                    )
            else:
                raise ConfigError(f"lora.{key} is not a LoraConfig field reflora knows")
        if kwargs.get("rank_pattern") is None:
            kwargs["rank_pattern"] = {}
        if kwargs.get("alpha_pattern") is None:
            kwargs["alpha_pattern"] = {}
        for key in ("use_dora", "lora_bias"):  # PEFT writes null for false in some versions
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = False
        return cls(**kwargs)


# PEFT fields that do not change what LoRA computes.
_PEFT_BOOKKEEPING_FIELDS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "megatron_core",
    }
)  # fmt: skip
# PEFT fields for features reflora does not implement, with the default value PEFT writes.
_PEFT_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}  # fmt: skip
# LoraConfig fields added after the golden corpus existed: ``to_dict`` leaves them out at these defaults.
_ADDITIVE_LORA_DEFAULTS: dict[str, Any] = {"exclude_modules": None, "trainable_token_indices": None,
                                           "modules_to_save": None, "ensure_weight_tying": False}  # fmt: skip
ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND, compared case-insensitively


def saved_module_pattern(entry: str) -> str:
    """PEFT 0.21's regex for a ``modules_to_save`` entry m, ``(^|.*\\.){m}($|\\..*)`` with m inserted as is
    (``check_target_module_exists``' exclusion of saved modules, ``_add_modules_to_save_to_tie``): ``re.match``-ed
    against a module name, it matches the module named m, or ending in ``"." + m``, and the modules inside it."""
    return rf"(^|.*\.){entry}($|\..*)"


def is_all_linear(target_modules: Any) -> bool:
    """PEFT ``_maybe_include_all_linear_layers``: ``target_modules`` is the string ``"all-linear"`` in any case."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


_NONE_IS_DEFAULT = frozenset({"loftq_config", "use_qalora"})


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
