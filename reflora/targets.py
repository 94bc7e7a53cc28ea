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
from collections.abc import Sequence
from dataclasses import dataclass

from reflora.config import ConfigError, GPT2Config, LoraConfig, is_all_linear, saved_module_pattern

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
    saved: tuple[tuple[str, str, tuple[int, ...]], ...] | None = None  # modules_to_save: (adapter key, HF key, shape)


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


def _target_matches(
    lora: LoraConfig, name: str, linear: frozenset[str] = frozenset(), saved: Sequence[str] = ()
) -> bool:
    """PEFT 0.21 ``check_target_module_exists`` for one module name: False when ``exclude_modules`` excludes it
    or a ``saved`` entry m (modules_to_save after tying) matches it (``re.match(saved_module_pattern(m))``);
    else ``"all-linear"``: ``name`` in ``linear`` (``linear_module_names``); a regex: fullmatch; a list: equal
    to an entry (no layer filter), or ending in ``"." + entry`` and, with ``layers_to_transform``, in a listed
    layer (``layer_index_match``). ``target_modules=None`` reads as ``["c_attn"]``."""
    targets = lora.target_modules if lora.target_modules is not None else ("c_attn",)
    if excluded(lora, name):
        return False
    if any(re.match(saved_module_pattern(m), name) for m in saved):  # PEFT: a saved module never gets LoRA
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
    saved_entries, tied = saved_entries_after_tying(lora)
    if lora.ensure_weight_tying and not tied and _embedding_in_targets(lora):
        raise ConfigError("lora.ensure_weight_tying=true with 'lm_head' / 'embed_tokens' among lora.target_modules is "
                          "PEFT's tied LoRA on the head (_add_targets_to_tie), which reflora does not implement")  # fmt: skip
    matched = [n for n in module_names(config) if _target_matches(lora, n, linear, saved_entries)]
    if not matched and saved_entries and any(_target_matches(lora, n, linear) for n in module_names(config)):
        raise ConfigError(
            f"lora.modules_to_save={_show(lora.modules_to_save)} covers every module that "
            f"lora.target_modules={_show(lora.target_modules)} matches, so no module gets LoRA (PEFT: 'No modules "
            "were targeted for adaptation ... only targeted modules that are marked to be saved')"
        )
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
    plan.update(_saved_modules(config, lora, plan, saved_entries, tied))
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


SAVED_KIND = "saved"  # modules_to_save: plan key "<module>.modules_to_save" (PEFT's ModulesToSaveWrapper child)
SAVED_SUFFIX = ".modules_to_save"
HEAD_MODULE = "lm_head"  # GPT-2's output Linear, tied to transformer.wte
HEAD_KEY = "lm_head.weight"  # the head's weight in a modules_to_save pair (reflora's params omit it: it is wte's)
# modules reflora can save: the leaf modules of GPT-2 that hold parameters
_SAVABLE_KINDS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT 0.21 utils.constants.EMBEDDING_LAYER_NAMES
_LORA_INTERNALS = ("base_layer", "lora_dropout", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                   "lora_magnitude_vector", "token_adapter", "default")  # fmt: skip


def saved_entries_after_tying(lora: LoraConfig) -> tuple[list[str], bool]:
    """PEFT 0.21 ``BaseTuner._check_tied_modules`` + ``LoraModel._add_modules_to_save_to_tie`` on GPT-2 (whose
    ``lm_head`` is tied to ``transformer.wte``): ``(entries, tied)``. Without ``ensure_weight_tying``, or when no
    entry's last component is ``embed_tokens`` / ``lm_head`` (so ``["wte"]`` does *not* count), the entries are
    ``modules_to_save`` as given and ``tied`` is False. Otherwise PEFT rewrites the list: it appends
    ``"transformer.wte"`` (if absent) and, for its one tied module name ``"lm_head"``, removes the *first* entry m
    that matches it (``re.match(saved_module_pattern(m), "lm_head")``, then ``break``: a later matching entry
    stays, and ``_saved_modules`` refuses it), and ``lm_head`` is wrapped with the embedding's copy: tied."""
    entries = list(lora.modules_to_save or [])
    if not lora.ensure_weight_tying or not any(m.split(".")[-1] in _EMBEDDING_LAYER_NAMES for m in entries):
        return entries, False
    if EMBEDDING_MODULE not in entries:
        entries.append(EMBEDDING_MODULE)
    for m in entries:  # PEFT's loop over its one tied module name, "lm_head": the first match only
        if re.match(saved_module_pattern(m), HEAD_MODULE):
            entries.remove(m)
            break
    return entries, True


def _embedding_in_targets(lora: LoraConfig) -> bool:
    """PEFT 0.21 ``_check_tied_modules``' ``is_embedding_in_target``: a list entry whose last component is
    ``embed_tokens`` / ``lm_head``, or a regex that fullmatches one of those bare names."""
    tm = lora.target_modules
    if isinstance(tm, str):
        return any(re.fullmatch(tm, m) for m in _EMBEDDING_LAYER_NAMES)
    return any(m.split(".")[-1] in _EMBEDDING_LAYER_NAMES for m in tm or ())


def _saved_modules(
    config: GPT2Config, lora: LoraConfig, plan: dict[str, LoraModule], entries: list[str], tied: bool
) -> dict[str, LoraModule]:
    """PEFT 0.21 ``modules_to_save`` on GPT-2: every module whose name *ends with* an entry (plain ``endswith``,
    ``_set_trainable``) gets a trainable copy that replaces it in the forward; the original is frozen. A plan entry
    ``"<module>.modules_to_save"`` (kind ``"saved"``) lists the copy's tensors as (adapter key, HF key) pairs; the
    adapter key is PEFT's file key ``base_model.model.<module>.weight`` / ``.bias``. ``transformer.wte``'s copy
    feeds the lookup only (the tied head keeps the base W); ``lm_head``'s copy (V, C) feeds the head only; with
    ``tied`` (``ensure_weight_tying``, see ``saved_entries_after_tying``) ``lm_head``'s entry names wte's copy,
    one tensor for both. reflora refuses what PEFT does silently or oddly: an entry that matches no module, a
    module without parameters or with sub-modules, an entry that would wrap a LoRA layer or its internals,
    ``bias='all'``, trainable tokens together with a saved ``wte`` / ``lm_head``."""
    if not entries:
        return {}
    raw = list(lora.modules_to_save or ())
    internals = [f"{m}.{x}" for m in plan if m not in (TOKENS_MODULE,) for x in _LORA_INTERNALS]
    internals += [f"{m}.{x}.default" for m in plan for x in _LORA_INTERNALS[1:4]]
    if TOKENS_MODULE in plan:
        internals += [TOKENS_MODULE, f"{TOKENS_MODULE}.base_layer"]
    for m in entries:
        inside = [n for n in internals if n.endswith(m)]
        if inside:
            raise ConfigError(f"lora.modules_to_save entry {m!r} matches {inside[0]!r}, a part of PEFT's own adapter "
                              "layers, not a module of GPT-2")  # fmt: skip
    names = module_names(config)
    saved = [n for n in names if any(n.endswith(m) for m in entries)]
    if tied and HEAD_MODULE in saved:  # e.g. "head": PEFT's rewrite keeps it, then wraps lm_head untied first
        raise ConfigError(f"lora.modules_to_save={_show(lora.modules_to_save)} with ensure_weight_tying: an entry that "
                          "PEFT's rewrite keeps still matches lm_head, so PEFT gives the head its own untied copy")  # fmt: skip
    if tied:
        saved.append(HEAD_MODULE)
    for m in raw:  # PEFT ignores an entry that matches nothing; reflora refuses it
        if not any(n.endswith(m) for n in names):
            raise ConfigError(f"lora.modules_to_save entry {m!r} matches no module of this GPT-2 (a module is saved "
                              "when its name ends with an entry, e.g. 'wte', 'lm_head', 'ln_f', 'h.0.mlp.c_fc')")  # fmt: skip
    if lora.bias == "all":
        raise ConfigError("lora.bias='all' cannot be combined with lora.modules_to_save in reflora (PEFT then trains "
                          "the saved copy's bias and saves the frozen original's too, under ...original_module.bias)")  # fmt: skip
    out: dict[str, LoraModule] = {}
    base = base_shapes(config)
    for name in saved:
        if name in plan:
            raise ConfigError(f"lora.modules_to_save saves {name!r}, which lora.target_modules also adapts with LoRA "
                              "(PEFT's exclusion regex misses this entry; PEFT: 'modules_to_save cannot be applied "
                              "to modules of type ...lora.layer.Linear')")  # fmt: skip
        if name in (EMBEDDING_MODULE, HEAD_MODULE) and TOKENS_MODULE in plan:
            raise ConfigError(f"lora.modules_to_save saves {name!r}, which lora.trainable_token_indices adapts too "
                              "(PEFT: 'The embedding layer is already marked to be trained fully')")  # fmt: skip
        parts = name.split(".")
        leaf = name in (EMBEDDING_MODULE, "transformer.wpe", "transformer.ln_f", HEAD_MODULE) or (
            len(parts) >= 4 and ".".join(parts[3:]) in _SAVABLE_KINDS
        )
        if not leaf:
            has_params = any(k.startswith(name + ".") for k in base)
            why = "holds sub-modules" if has_params else "has no parameters"
            raise ConfigError(f"lora.modules_to_save matches {name!r}, which {why}; reflora saves the GPT-2 modules "
                              "that hold weights themselves (wte, wpe, ln_1, c_attn, c_proj, ln_2, c_fc, ln_f, lm_head)")  # fmt: skip
        if name == HEAD_MODULE:
            key = ADAPTER_PREFIX + (f"{EMBEDDING_MODULE}.weight" if tied else HEAD_KEY)
            pairs = ((key, HEAD_KEY, (config.vocab_size, config.n_embd)),)
        else:
            pairs = tuple((ADAPTER_PREFIX + k, k, shape) for k, shape in base.items() if k.rpartition(".")[0] == name)
        layer = int(parts[2]) if len(parts) >= 4 else -1
        out[name + SAVED_SUFFIX] = LoraModule(name, layer, SAVED_KIND, 0, 0, 0, 0.0, 0.0, (), saved=pairs)
    return out


def dropout_plan(plan: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """The modules of ``plan`` whose LoRA input is dropped out: all but ``wte`` (PEFT's Embedding has none) and the
    saved copies (modules_to_save, no LoRA)."""
    return {name: m for name, m in plan.items() if m.kind not in (EMBEDDING_KIND, TOKENS_KIND, SAVED_KIND)}


def adapter_shapes(plan: dict[str, LoraModule]) -> dict[str, tuple[int, ...]]:
    """Adapter key -> shape, in model order: A is (r, in), B is (out of its slice, r); with ``lora_bias`` B's
    bias is (out of its slice,); with ``use_dora`` the module's magnitude is (out,); a modules_to_save copy's
    tensors have their base tensor's shapes (``lm_head``'s (V, C))."""
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
        for key, _, shape in module.saved or ():  # modules_to_save: the copy's tensors (a tied head shares wte's)
            shapes[key] = shape
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
