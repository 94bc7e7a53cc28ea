"""Merge adapters into the base weights, unmerge them, and unload them into a plain GPT-2 checkpoint.

In the (out, in) form ``Wt`` of a weight (``Wt = Wᵀ`` for GPT-2's Conv1D, stored (in, out); ``Wt = W`` for a
Linear), one adapter changes one module by

    LoRA:  ΔWt[start:stop, :] = s · B A      per branch (full width, or a q/k/v slice)     (out, in)
           Δb[start:stop]     = s · b_B      with lora_bias (PEFT: "merging adds s·b_B to the base bias")
    DoRA:  ΔWt = c ⊙ (Wt + s·B A) − Wt,      c = m / n, n = ‖Wt + s·B A‖ per output row

and is stored back in the weight's layout (ΔW = ΔWtᵀ for a Conv1D). Merging several adapters adds their
deltas, each measured from the *unmerged* base: ``W' = W + Σ_a ΔW_a(W)``. That is what the forward computes
(reflora.layer), so merged and unmerged forwards agree; the order of the adapters does not matter.

Unmerge inverts this exactly in real arithmetic. A LoRA delta does not depend on W, so ``W = W' − ΔW``. A DoRA
delta does, and ``‖W'‖`` per row is ``m``, not n: n is lost in the merge, so ``merge`` returns it in a
``MergeRecord`` (PEFT caches it on the layer for the same reason). With γ = 1 + Σ_DoRA (c_a − 1) per row:

    W = (W' − Σ_LoRA s B A − Σ_DoRA c_a ⊙ s B_a A_a) / γ         (γ = 1 without DoRA)

In floating point unmerge restores W up to rounding, per entry |W_rt − W| ≤ 4·u·(|W| + |W'| + Σ_a |ΔW_a|) / |γ|
with u the unit roundoff (1.1e-16 in float64, 6e-8 in float32); measured worst 2.2·u (tests/test_merge.py). A γ
near 0 (DoRA factors that cancel) makes the unmerge ill-conditioned, as the formula says. One exception is
exact: a DoRA row of zero norm (n_o = 0 in the record, factor c_o = 0, merged row 0) has V_o = Wt_o + s·(B A)_o
= 0, so unmerge restores ``Wt_o = −s·(B A)_o`` from that adapter alone, whatever γ_o is (γ_o = 0 for one DoRA
adapter, where the formula would be 0/0).

Trainable tokens (``trainable_token_indices``) merge as PEFT's ``TrainableTokensLayer.merge``: wte's rows
``token_indices`` become the adapter's new rows (an ``index_copy``, not an addition; the tied head follows),
disjoint indices only; the record keeps the original rows and unmerge writes them back.

``safe=True`` computes the merge, refuses it with a ``MergeError`` naming the module and adapter if any merged
value is not finite, and leaves the input untouched either way (every function here returns new dicts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reflora.backend import Array, namespace
from reflora.config import GPT2Config, LoraConfig
from reflora.ops.dora_linear import dora_factor, dora_weight, dora_weight_norm
from reflora.ops.linear import weight_t
from reflora.ops.lora_linear import LoraBranchWeights, lora_delta_bias, lora_delta_weight
from reflora.targets import TOKENS_KIND, TOKENS_MODULE, LoraModule, base_shapes, plan_lora
from reflora.validate import InputError, check_adapter

__all__ = [
    "MergeError",
    "MergeRecord",
    "dora_delta_weight",
    "dora_norm",
    "lora_delta_bias",
    "lora_delta_weight",
    "merge_adapter",
    "merge_adapters",
    "merge_and_unload",
    "unmerge_adapter",
    "unmerge_adapters",
]


class MergeError(ValueError):
    """A merge would produce non-finite weights, or an unmerge lacks what it needs."""


@dataclass(frozen=True)
class MergeRecord:
    """What ``unmerge`` needs: the merged adapters' names, each DoRA module's norm n (out,) at merge time, and
    each trainable-tokens adapter's original wte rows (K, C) (PEFT's ``trainable_tokens_original``)."""

    names: tuple[str, ...]
    dora_norms: dict[str, dict[str, Array]] = field(default_factory=dict)  # adapter -> module name -> n
    token_rows: dict[str, Array] = field(default_factory=dict)  # adapter -> wte rows before the merge (K, C)


# ----------------------------------------------------------------------------------------------
# one module
# ----------------------------------------------------------------------------------------------


# ΔW of LoRA (s·B A per branch) and Δb (s·b_B) are ``lora_delta_weight`` and ``lora_delta_bias`` of
# reflora.ops.lora_linear, where the LoRA delta is derived; V and n of DoRA are ``dora_weight`` of
# reflora.ops.dora_linear.


def dora_norm(weight: Array, branch: LoraBranchWeights, layout: str = "conv1d") -> Array:
    """n = ‖Wt + s·B A‖ per output row, (out,)."""
    return dora_weight_norm(weight, branch.A, branch.B, branch.scaling, layout)


def dora_delta_weight(
    weight: Array, branch: LoraBranchWeights, magnitude: Array, layout: str = "conv1d", norm: Array | None = None
) -> Array:
    """ΔW = c ⊙ (Wt + s·B A) − Wt with c = m / n (``dora_factor``: 0 on a zero-norm row, whose merged row is
    then 0), in the weight's layout. ``norm`` defaults to ``dora_norm``."""
    xp = namespace(weight, branch.A, magnitude)
    V, n = dora_weight(weight, branch.A, branch.B, branch.scaling, layout)  # (out, in), (out,)
    factor = xp.reshape(dora_factor(magnitude, n if norm is None else norm), (-1, 1))  # (out, 1)
    return weight_t(factor * V - weight_t(weight, layout), layout)


# ----------------------------------------------------------------------------------------------
# a model: params dicts
# ----------------------------------------------------------------------------------------------


def _module_branches(module: LoraModule, tensors: Mapping[str, Array]) -> tuple[tuple[LoraBranchWeights, ...], tuple]:
    branches = tuple(
        LoraBranchWeights(tensors[b.a_key], tensors[b.b_key], module.scaling, b.out_start, b.out_stop)
        for b in module.branches
    )
    biases = tuple(None if b.bias_key is None else tensors[b.bias_key] for b in module.branches)
    return branches, biases


def _named(adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]], names: Sequence[str] | None) -> list[str]:
    names = list(adapters) if names is None else list(names)
    unknown = [n for n in names if n not in adapters]
    if unknown or len(set(names)) != len(names):
        raise MergeError(f"names must list distinct adapters of {list(adapters)}, got {names}")
    return names


def merge_adapters(
    params: Mapping[str, Array],
    config: GPT2Config,
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]],
    names: Sequence[str] | None = None,
    *,
    safe: bool = False,
) -> tuple[dict[str, Array], MergeRecord]:
    """``(merged params, record)``: W' = W + Σ_a ΔW_a(W) and b' = b + Σ_a Δb_a over ``names`` (default: all).

    ``safe``: refuse (``MergeError``) a merge whose result holds a NaN or an infinity."""
    names = _named(adapters, names)
    _check_sources(params, config, adapters, names)
    merged = dict(params)
    dora_norms: dict[str, dict[str, Array]] = {}
    weight_deltas: dict[str, list[tuple[str, Array]]] = {}
    bias_deltas: dict[str, list[tuple[str, Array]]] = {}
    for name in names:
        lora, tensors = adapters[name]
        for module_name, module in plan_lora(config, lora).items():
            if module.kind == TOKENS_KIND:  # trainable tokens: below, after every delta
                continue
            weight = params[f"{module_name}.weight"]
            branches, biases = _module_branches(module, tensors)
            if module.magnitude_key is not None:
                n = dora_norm(weight, branches[0])
                dora_norms.setdefault(name, {})[module_name] = n
                delta = dora_delta_weight(weight, branches[0], tensors[module.magnitude_key], norm=n)
            else:
                delta = lora_delta_weight(branches, module.out_features)
            weight_deltas.setdefault(f"{module_name}.weight", []).append((name, delta))
            db = lora_delta_bias(branches, biases, module.out_features)
            if db is not None:
                bias_deltas.setdefault(f"{module_name}.bias", []).append((name, db))
    for key, deltas in (*weight_deltas.items(), *bias_deltas.items()):
        value = params[key]
        for _, delta in deltas:
            value = value + delta
        if safe:
            _check_finite(key, value, deltas)
        merged[key] = value
    token_rows = _merge_tokens(params, merged, config, adapters, names, safe)
    return merged, MergeRecord(tuple(names), dora_norms, token_rows)


def _merge_tokens(params, merged: dict[str, Array], config: GPT2Config, adapters, names: list[str], safe: bool):
    """PEFT's ``TrainableTokensLayer.merge``: wte's rows ``token_indices`` of each trainable-tokens adapter
    become its ``trainable_tokens_delta`` (K, C) (``index_copy``: the new rows themselves; the tied head sees
    them too). The adapters' indices must be disjoint (PEFT: "Only disjunct token indices are currently
    supported"). Writes ``merged["transformer.wte.weight"]``; returns {adapter: the original rows (K, C)}."""
    owners = [(n, plan_lora(config, adapters[n][0]).get(TOKENS_MODULE)) for n in names]
    owners = [(n, module) for n, module in owners if module is not None]
    if not owners:
        return {}
    wte_lora = [n for n in names if "transformer.wte" in plan_lora(config, adapters[n][0])]
    if wte_lora:
        raise MergeError(f"adapters {wte_lora} put LoRA on transformer.wte while {owners[0][0]!r} has trainable "
                         "tokens there: merging both is not defined")  # fmt: skip
    key = "transformer.wte.weight"
    xp = namespace(params[key])
    wte = xp.asarray(merged[key], copy=True)  # (V, C)
    taken: dict[int, str] = {}
    originals = {}
    for name, module in owners:
        clash = [i for i in module.token_indices if i in taken]
        if clash:
            raise MergeError(f"adapters {taken[clash[0]]!r} and {name!r} both replace wte row {clash[0]}: PEFT "
                             "merges only disjoint token indices")  # fmt: skip
        taken.update(dict.fromkeys(module.token_indices, name))
        rows = xp.asarray(module.token_indices)
        originals[name] = xp.take(params[key], rows, axis=0)  # (K, C)
        wte[rows, :] = adapters[name][1][module.tokens_key]
    if safe:
        _check_finite(key, wte, [(n, adapters[n][1][m.tokens_key]) for n, m in owners])
    merged[key] = wte
    return originals


def _check_sources(params, config: GPT2Config, adapters, names: list[str]) -> None:
    """Each named adapter holds exactly its config's tensors, in the params' dtype (a mix would promote)."""
    missing = [k for k in base_shapes(config) if k not in params]
    if missing:
        raise MergeError(f"params lack {missing[:3]}")
    dtype = params["transformer.wte.weight"].dtype
    for name in names:
        entry = adapters[name]
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise MergeError(f"adapters[{name!r}] must be a (LoraConfig, tensors) pair")
        try:
            check_adapter(entry[1], entry[0], config, dtype, where=f"adapters[{name!r}]")
        except InputError as exc:
            raise MergeError(str(exc)) from None
        if entry[0].modules_to_save is not None:  # PEFT's unload swaps in the copies, wte's one untying the head
            raise MergeError(f"adapters[{name!r}]: reflora does not merge modules_to_save (PEFT's merge_and_unload "
                             "replaces each module by its copy; a copy of wte alone leaves the head on the old W)")  # fmt: skip


def _check_finite(key: str, value: Array, deltas: list[tuple[str, Array]]) -> None:
    xp = namespace(value)
    if bool(xp.all(xp.isfinite(value))):
        return
    bad = int(xp.sum(xp.astype(~xp.isfinite(value), xp.int64)))
    culprits = [name for name, delta in deltas if not bool(xp.all(xp.isfinite(delta)))]
    because = (
        f"adapter(s) {culprits} have non-finite deltas" if culprits else "the sum overflows (or the base is not finite)"
    )
    raise MergeError(f"safe merge refused: {key} would hold {bad} non-finite value(s); {because}")


def unmerge_adapters(
    merged: Mapping[str, Array],
    config: GPT2Config,
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]],
    record: MergeRecord | None = None,
) -> dict[str, Array]:
    """The params before ``merge_adapters``: undoes the adapters of ``record`` (None: all of ``adapters``, which
    is allowed only when none of them is DoRA)."""
    names = _named(adapters, None if record is None else record.names)
    _check_sources(merged, config, adapters, names)
    if record is None and any(adapters[n][0].use_dora for n in names):
        raise MergeError("unmerging DoRA needs the MergeRecord that merge returned (the norms n are lost in W')")
    norms = {} if record is None else record.dora_norms
    out = dict(merged)
    subtract: dict[str, Array] = {}  # Σ of the W-independent parts, per weight/bias key, in the stored layout
    gamma: dict[str, Array] = {}  # 1 + Σ_DoRA (c − 1), per weight key, (out,)
    zero_rows: dict[str, list[tuple[Array, Array]]] = {}  # per weight key: (n == 0 (out,), s B A stored layout)
    tokens = [n for n in names if adapters[n][0].trainable_token_indices is not None]
    if tokens and (record is None or any(n not in record.token_rows for n in tokens)):
        raise MergeError(f"unmerging the trainable tokens of {tokens} needs the MergeRecord that merge returned "
                         "(the original wte rows are overwritten)")  # fmt: skip
    for name in names:
        lora, tensors = adapters[name]
        for module_name, module in plan_lora(config, lora).items():
            if module.kind == TOKENS_KIND:  # restored below
                continue
            key = f"{module_name}.weight"
            xp = namespace(merged[key])
            branches, biases = _module_branches(module, tensors)
            if module.magnitude_key is not None:
                n = norms.get(name, {}).get(module_name)
                if n is None:
                    raise MergeError(f"the MergeRecord has no DoRA norm for adapter {name!r}, module {module_name}")
                factor = dora_factor(tensors[module.magnitude_key], n)  # (out,) c
                delta = lora_delta_weight(branches, module.out_features)  # s B A, stored (in, out)
                part = delta * xp.reshape(factor, (1, -1))  # c ⊙ s B A
                gamma[key] = gamma.get(key, 1.0) + (factor - 1.0)
                if bool(xp.any(n == 0)):
                    zero_rows.setdefault(key, []).append((n == 0, delta))
            else:
                part = lora_delta_weight(branches, module.out_features)
            subtract[key] = subtract[key] + part if key in subtract else part
            db = lora_delta_bias(branches, biases, module.out_features)
            if db is not None:
                bkey = f"{module_name}.bias"
                subtract[bkey] = subtract[bkey] + db if bkey in subtract else db
    for key, part in subtract.items():
        value = merged[key] - part
        if key in gamma:
            xp = namespace(value)
            known = None
            for zero, _ in zero_rows.get(key, []):
                known = zero if known is None else known | zero
            g = gamma[key] if known is None else xp.where(known, 1.0, gamma[key])  # known rows: set below
            value = value / xp.reshape(g, (1, -1))  # stored (in, out): one γ per output column
            for zero, delta in zero_rows.get(key, []):  # V_o = 0: Wt_o = −s (B A)_o exactly
                value = xp.where(xp.reshape(zero, (1, -1)), -delta, value)
        out[key] = value
    if tokens:  # PEFT's TrainableTokensLayer.unmerge: the original rows back (index_copy_)
        key = "transformer.wte.weight"
        xp = namespace(merged[key])
        wte = xp.asarray(out[key], copy=True)
        for name in tokens:
            module = plan_lora(config, adapters[name][0])[TOKENS_MODULE]
            wte[xp.asarray(module.token_indices), :] = record.token_rows[name]
        out[key] = wte
    return out


def merge_adapter(
    params: Mapping[str, Array], config: GPT2Config, lora: LoraConfig, adapter: Mapping[str, Array], *, safe=False
) -> tuple[dict[str, Array], MergeRecord]:
    """``merge_adapters`` for one adapter (named ``"default"`` in the record)."""
    return merge_adapters(params, config, {"default": (lora, adapter)}, safe=safe)


def unmerge_adapter(
    merged: Mapping[str, Array],
    config: GPT2Config,
    lora: LoraConfig,
    adapter: Mapping[str, Array],
    record: MergeRecord | None = None,
) -> dict[str, Array]:
    """``unmerge_adapters`` for one adapter."""
    return unmerge_adapters(merged, config, {"default": (lora, adapter)}, record)


def merge_and_unload(
    params: Mapping[str, Array],
    config: GPT2Config,
    lora: LoraConfig | None = None,
    adapter: Mapping[str, Array] | None = None,
    *,
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]] | None = None,
    names: Sequence[str] | None = None,
    safe: bool = False,
) -> dict[str, Array]:
    """A plain GPT-2 params dict (exactly the keys of ``base_shapes``) with the adapters merged in: what
    ``reflora.save_gpt2`` writes and ``transformers.GPT2LMHeadModel.from_pretrained`` loads. Give ``lora`` and
    ``adapter`` (one adapter) or ``adapters`` (with ``names``, default all)."""
    if (adapters is None) == (lora is None or adapter is None):
        raise MergeError("give lora= and adapter= (one adapter) or adapters= (several)")
    if adapters is None:
        adapters = {"default": (lora, adapter)}
    merged, _ = merge_adapters(params, config, adapters, names, safe=safe)
    return {key: merged[key] for key in base_shapes(config)}
