"""Which GPT-2 modules get LoRA, with what rank and scaling, and what the tensors are called.

The rules are PEFT 0.21's (``tuners_utils.check_target_module_exists``, ``utils.other.get_pattern_key``),
applied to the module names of transformers' ``GPT2LMHeadModel``:

* ``target_modules`` as a list: a module matches if its name equals an entry or ends with ``"." + entry``.
  So ``["c_attn", "c_proj"]`` matches ``attn.c_attn``, ``attn.c_proj`` *and* ``mlp.c_proj``.
* ``target_modules`` as a string: ``re.fullmatch(target_modules, name)``.
* ``layers_to_transform`` (list targets only): keep modules whose ``h.<i>`` index is listed.
* ``target_modules="all-linear"`` (any case): every Conv1D of every block (``linear_module_names``); the
  ``lm_head`` output layer is left out, as PEFT leaves out ``get_output_embeddings()``.
* ``exclude_modules`` (checked first): a list (equal name or ``"." + entry`` suffix) or a regex (fullmatch).
* ``rank_pattern`` / ``alpha_pattern``: the first key (in the dict's order) with ``re.match(rf"(.*\\.)?({key})$", name)`` wins.
* A spec that matches no module, or a module reflora cannot adapt (only the four Conv1D kinds are LoRA
  targets here), is an error.

Adapter tensors are named as PEFT saves them: ``base_model.model.<module>.lora_A.weight`` with shape
(r, in) and ``...lora_B.weight`` with shape (out, r). Per-slice q/k/v adapters (reflora's ``qkv_slices``)
are ``...c_attn.lora_A.<slice>.weight`` (r, in) and ``...c_attn.lora_B.<slice>.weight`` (n_embd, r).
With ``lora_bias`` each B has a bias ``...lora_B.weight`` -> ``...lora_B.bias`` (out,) (PEFT's key); with
``use_dora`` each module has a magnitude ``<module>.lora_magnitude_vector`` (out,): PEFT 0.21 saves that key
without ``.weight`` (``LoraModel._get_adapter_state_dict``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from reflora.config import ConfigError, GPT2Config, LoraConfig, is_all_linear

ADAPTER_PREFIX = "base_model.model."
LORA_MODULE_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LoraBranch:
    """One low-rank branch: ``y[:, out_start:out_stop] += scaling * drop(x) @ A.T @ B.T``."""

    a_key: str  # adapter key of A, shape (r, in_features)
    b_key: str  # adapter key of B, shape (out_stop - out_start, r)
    out_start: int
    out_stop: int
    bias_key: str | None = None  # lora_bias: adapter key of B's bias, shape (out_stop - out_start,)


@dataclass(frozen=True)
class LoraModule:
    """A targeted Conv1D: its HF name, sizes, rank, alpha, scaling and branches."""

    name: str  # e.g. "transformer.h.0.attn.c_attn"
    layer: int
    kind: str  # one of LORA_MODULE_KINDS
    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    scaling: float
    branches: tuple[LoraBranch, ...]
    magnitude_key: str | None = None  # use_dora: adapter key of the magnitude m, shape (out_features,)
    token_indices: tuple[int, ...] | None = None  # trainable tokens (kind "tokens"): the replaced rows of wte
    tokens_key: str | None = None  # trainable tokens: adapter key of the new rows, shape (len(token_indices), C)


def module_names(config: GPT2Config) -> list[str]:
    """Every module name of HF ``GPT2LMHeadModel`` (``named_modules()``, root excluded), in order."""
    names = ["transformer", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h"]
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        names += [h, f"{h}.ln_1", f"{h}.attn", f"{h}.attn.c_attn", f"{h}.attn.c_proj", f"{h}.attn.attn_dropout",
                  f"{h}.attn.resid_dropout", f"{h}.ln_2", f"{h}.mlp", f"{h}.mlp.c_fc", f"{h}.mlp.c_proj",
                  f"{h}.mlp.act", f"{h}.mlp.dropout"]  # fmt: skip
    return [*names, "transformer.ln_f", "lm_head"]


def conv1d_shape(config: GPT2Config, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of a GPT-2 Conv1D kind; its weight has exactly this shape."""
    c, inner = config.n_embd, config.inner_dim
    return {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, inner), "mlp.c_proj": (inner, c)}[kind]


def linear_module_names(config: GPT2Config) -> list[str]:
    """PEFT's ``target_modules="all-linear"`` on ``GPT2LMHeadModel``: every ``nn.Linear`` or ``Conv1D`` module,
    minus the output embedding (``get_output_embeddings()``, the ``lm_head`` Linear tied to ``wte``). On GPT-2
    that is the four Conv1D kinds of every block, in model order; ``wte``/``wpe`` are Embeddings, not linear."""
    return [n for n in module_names(config) if n.count(".") == 4 and ".".join(n.split(".")[-2:]) in LORA_MODULE_KINDS]


def excluded(lora: LoraConfig, name: str) -> bool:
    """PEFT ``check_target_module_exists``' first test: a string ``exclude_modules`` is ``re.fullmatch``-ed
    against the name; a list excludes a name equal to an entry or ending with ``"." + entry``."""
    ex = lora.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return name in ex or any(name.endswith("." + e) for e in ex)


def layer_index_match(layers_pattern, name: str) -> re.Match | None:
    """PEFT ``check_target_module_exists``' layer index of a module, group ``idx``. No (or an empty)
    ``layers_pattern``: the first ``"<something>.<digits>."`` component, ``re.match(r".*?\\.[^.]*\\.(?P<idx>\\d+)\\.")``
    (``h.<i>`` on GPT-2). Else each pattern in order (a string is a list of one), a regex:
    ``re.match(rf"(?:^|.*?\\.){pattern}\\.(?P<idx>\\d+)\\.", name)``; the first that matches gives the index. A pattern
    that names no layer list (``"layers"``) matches nothing, so nothing is targeted."""
    if not layers_pattern:
        return re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match is not None:
            return match
    return None


def _target_matches(lora: LoraConfig, name: str, linear: frozenset[str] = frozenset()) -> bool:
    targets = lora.target_modules if lora.target_modules is not None else ("c_attn",)
    if excluded(lora, name):
        return False
    if is_all_linear(targets):  # PEFT replaces the shorthand by the set of full names: exact matches
        return name in linear
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # PEFT: an exact name match skips the layers_to_transform filter
    if not any(name.endswith("." + t) for t in targets):
        return False
    if lora.layers_to_transform is None:
        return True
    match = layer_index_match(lora.layers_pattern, name)
    if match is None:
        return False
    index = int(match.group("idx"))
    ltt = lora.layers_to_transform
    return index == ltt if isinstance(ltt, int) else index in ltt


def pattern_key(patterns, name: str) -> str | None:
    """PEFT ``get_pattern_key``: the first key of ``patterns`` (in its order) with
    ``re.match(rf"(.*\\.)?({key})$", name)``, else ``None``. Keys are regexes: ``"c_proj"`` matches any name
    ending in ``.c_proj``; an anchor ``^`` only matches when the key matches the whole name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _pattern_value(patterns: dict, name: str, default):
    key = pattern_key(patterns, name)
    return default if key is None else patterns[key]


def plan_lora(config: GPT2Config, lora: LoraConfig) -> dict[str, LoraModule]:
    """Resolve a LoRA config against a GPT-2 into the targeted modules, in model order."""
    if isinstance(lora.layers_to_transform, (int, tuple)):  # before matching: out of range matches nothing
        wanted = (
            {lora.layers_to_transform} if isinstance(lora.layers_to_transform, int) else set(lora.layers_to_transform)
        )
        missing = sorted(i for i in wanted if i >= config.n_layer)
        if missing:
            raise ConfigError(f"lora.layers_to_transform names layers {missing}, but gpt2.n_layer is {config.n_layer}")
    linear = frozenset(linear_module_names(config))
    matched = [n for n in module_names(config) if _target_matches(lora, n, linear)]
    if not matched:
        if lora.exclude_modules and any(_target_matches(dataclasses.replace(lora, exclude_modules=None), n, linear)
                                        for n in module_names(config)):  # fmt: skip
            raise ConfigError(
                f"lora.exclude_modules={_show(lora.exclude_modules)} excludes every module that "
                f"lora.target_modules={_show(lora.target_modules)} matches (PEFT: 'All modules were excluded')"
            )
        raise ConfigError(f"lora.target_modules={_show(lora.target_modules)} matches no module of this GPT-2")
    plan: dict[str, LoraModule] = {}
    tokens = _tokens_module(config, lora)
    if tokens is not None:
        if EMBEDDING_MODULE in matched:
            raise ConfigError("lora.trainable_token_indices cannot be combined with LoRA on transformer.wte "
                              "(both adapt the same Embedding)")  # fmt: skip
        plan[TOKENS_MODULE] = tokens
    for name in matched:
        if name == EMBEDDING_MODULE:
            plan[name] = _embedding_module(config, lora, name)
            continue
        parts = name.split(".")
        kind = ".".join(parts[-2:])
        if len(parts) != 5 or kind not in LORA_MODULE_KINDS:
            raise ConfigError(
                f"lora.target_modules={_show(lora.target_modules)} matches {name!r}, which is not a Conv1D "
                f"that reflora can adapt (targets are {', '.join(LORA_MODULE_KINDS)}, and wte)"
            )
        layer = int(parts[2])
        in_f, out_f = conv1d_shape(config, kind)
        r = _pattern_value(lora.rank_pattern, name, lora.r)
        alpha = _pattern_value(lora.alpha_pattern, name, lora.lora_alpha)
        prefix = ADAPTER_PREFIX + name
        if kind == "attn.c_attn" and lora.qkv_slices is not None:
            c = config.n_embd
            offsets = {"q": 0, "k": c, "v": 2 * c}
            slices = [(f".{s}", offsets[s], offsets[s] + c) for s in lora.qkv_slices]
        else:
            slices = [("", 0, out_f)]
        branches = tuple(
            LoraBranch(
                f"{prefix}.lora_A{tag}.weight", f"{prefix}.lora_B{tag}.weight", start, stop,
                f"{prefix}.lora_B{tag}.bias" if lora.lora_bias else None,
            )
            for tag, start, stop in slices
        )  # fmt: skip
        magnitude_key = f"{prefix}.lora_magnitude_vector" if lora.use_dora else None
        plan[name] = LoraModule(
            name, layer, kind, in_f, out_f, r, alpha, lora.scaling(r, alpha), branches, magnitude_key
        )
    return plan


EMBEDDING_MODULE = "transformer.wte"  # the one Embedding reflora adapts (PEFT ``lora.Embedding``)
EMBEDDING_KIND = "wte"


def _embedding_module(config: GPT2Config, lora: LoraConfig, name: str) -> LoraModule:
    """PEFT 0.21 ``lora.Embedding`` on ``transformer.wte``: ``lora_embedding_A`` (r, V) and ``lora_embedding_B``
    (C, r), saved without ``.weight``; scaling as for a Conv1D; no dropout, no bias (reflora.ops.lora_embedding).
    The tied ``lm_head`` keeps the base ``wte.weight`` (docs/semantics.md, "Tied embedding")."""
    if lora.use_dora or lora.lora_bias or lora.qkv_slices is not None:
        field = "use_dora" if lora.use_dora else "lora_bias" if lora.lora_bias else "qkv_slices"
        raise ConfigError(f"lora.{field} cannot be combined with LoRA on {name} (an Embedding); reflora adapts it "
                          "with plain LoRA only")  # fmt: skip
    if lora.init_lora_weights not in (True, False):
        raise ConfigError(f"lora.init_lora_weights={lora.init_lora_weights!r} is not supported with LoRA on {name}; "
                          "use true or false")  # fmt: skip
    r = _pattern_value(lora.rank_pattern, name, lora.r)
    alpha = _pattern_value(lora.alpha_pattern, name, lora.lora_alpha)
    prefix = ADAPTER_PREFIX + name
    c = config.n_embd
    branch = LoraBranch(f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B", 0, c)
    return LoraModule(name, -1, EMBEDDING_KIND, config.vocab_size, c, r, alpha, lora.scaling(r, alpha), (branch,))


TOKENS_MODULE = "transformer.wte.token_adapter"  # PEFT's TrainableTokensWrapper child on wte (and, tied, lm_head)
TOKENS_KIND = "tokens"


def _tokens_module(config: GPT2Config, lora: LoraConfig) -> LoraModule | None:
    """PEFT 0.21 ``trainable_token_indices`` on GPT-2: a TrainableTokens layer on ``wte`` whose file key
    ``base_model.model.transformer.wte.token_adapter.trainable_tokens_delta`` (K, C) holds the *new rows*
    themselves (not a difference): W' = W with rows ``token_indices`` replaced. The tied ``lm_head`` is wrapped
    with the same layer, so the head uses W' too. A list targets the input embedding; a dict
    ``{"wte": [...]}`` names it (equal name or ``"." + key`` suffix)."""
    tti = lora.trainable_token_indices
    if tti is None:
        return None
    if isinstance(tti, dict):
        unknown = [k for k in tti if not (k == EMBEDDING_MODULE or EMBEDDING_MODULE.endswith("." + k))]
        if unknown or len(tti) != 1:
            raise ConfigError(f"lora.trainable_token_indices names {unknown or list(tti)}: reflora trains tokens of "
                              "wte only (one key, e.g. {'wte': [...]})")  # fmt: skip
        (ids,) = tti.values()
    else:
        ids = tti
    bad = [i for i in ids if i >= config.vocab_size]
    if bad:
        raise ConfigError(f"lora.trainable_token_indices holds {bad}, outside gpt2.vocab_size={config.vocab_size}")
    key = f"{ADAPTER_PREFIX}{TOKENS_MODULE}.trainable_tokens_delta"
    c = config.n_embd
    return LoraModule(TOKENS_MODULE, -1, TOKENS_KIND, config.vocab_size, c, 0, 0.0, 0.0, (), None, tuple(ids), key)


def dropout_plan(plan: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """The modules of ``plan`` whose LoRA input is dropped out: all but ``wte`` (PEFT's Embedding has none)."""
    return {name: module for name, module in plan.items() if module.kind not in (EMBEDDING_KIND, TOKENS_KIND)}


def adapter_shapes(plan: dict[str, LoraModule]) -> dict[str, tuple[int, ...]]:
    """Adapter key -> shape, in model order: A is (r, in), B is (out of its slice, r); with ``lora_bias`` B's
    bias is (out of its slice,); with ``use_dora`` the module's magnitude is (out,)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module in plan.values():
        for branch in module.branches:
            shapes[branch.a_key] = (module.r, module.in_features)
            shapes[branch.b_key] = (branch.out_stop - branch.out_start, module.r)
            if branch.bias_key is not None:
                shapes[branch.bias_key] = (branch.out_stop - branch.out_start,)
        if module.magnitude_key is not None:
            shapes[module.magnitude_key] = (module.out_features,)
        if module.tokens_key is not None:
            shapes[module.tokens_key] = (len(module.token_indices), module.out_features)
    return shapes


def trainable_bias_keys(config: GPT2Config, lora: LoraConfig, plan: dict[str, LoraModule]) -> list[str]:
    """Base-model bias keys that PEFT's ``bias`` mode makes trainable.

    ``'none'``: none. ``'all'``: every ``*.bias`` of the model (LayerNorms and ``ln_f`` included).
    ``'lora_only'``: the biases of the targeted modules only.
    """
    if lora.bias == "none":
        return []
    if lora.bias == "lora_only":
        return [f"{name}.bias" for name, m in dropout_plan(plan).items()]  # wte has no bias
    return [key for key in base_shapes(config) if key.endswith(".bias")]


def base_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every base parameter under its HF ``model.safetensors`` key (tied ``lm_head`` omitted), in order."""
    c = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config.vocab_size, c),
        "transformer.wpe.weight": (config.n_positions, c),
    }
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes[f"{h}.ln_1.weight"] = (c,)
        shapes[f"{h}.ln_1.bias"] = (c,)
        for kind in LORA_MODULE_KINDS[:2]:
            in_f, out_f = conv1d_shape(config, kind)
            shapes[f"{h}.{kind}.weight"] = (in_f, out_f)
            shapes[f"{h}.{kind}.bias"] = (out_f,)
        shapes[f"{h}.ln_2.weight"] = (c,)
        shapes[f"{h}.ln_2.bias"] = (c,)
        for kind in LORA_MODULE_KINDS[2:]:
            in_f, out_f = conv1d_shape(config, kind)
            shapes[f"{h}.{kind}.weight"] = (in_f, out_f)
            shapes[f"{h}.{kind}.bias"] = (out_f,)
    shapes["transformer.ln_f.weight"] = (c,)
    shapes["transformer.ln_f.bias"] = (c,)
    return shapes


def _show(targets) -> str:
    return repr(list(targets)) if isinstance(targets, tuple) else repr(targets)
