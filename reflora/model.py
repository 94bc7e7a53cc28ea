"""GPT-2 with LoRA: the whole forward and its hand-written backward.

The model is HF ``GPT2LMHeadModel`` with its own dropouts off (pre-LN blocks, tied head):

    x  = wte[ids] + wpe[pos]                                  (B, T, C); or x = inputs_embeds + wpe[pos]
         (+ s·Aᵀ[ids] Bᵀ with LoRA on wte, reflora.ops.lora_embedding; the head keeps the base wte)
    for each block i:
        x = x + c_proj(attention(c_attn(ln_1(x))))            every c_* is a Conv1D with adapters
        x = x + mlp.c_proj(gelu(c_fc(ln_2(x))))
    logits = ln_f(x) @ wteᵀ                                   (B, T, V)

``modules_to_save`` (PEFT's ModulesToSaveWrapper): each saved module computes with its trainable copy (adapter
keys ``base_model.model.<module>.weight`` / ``.bias``) instead of its frozen original. A copy of ``wte`` feeds
the lookup only (the head keeps W); a copy of ``lm_head`` (V, C) replaces W in the head only; tied
(``ensure_weight_tying``) one copy of ``wte`` feeds both, and its gradient is the sum of both uses. An original
that a copy replaces is used nowhere, so its gradient (if asked for) is 0, as is wte's when copies replace it in
both the lookup and the head; any other gradient the backward did not compute is an error (RuntimeError).

A targeted Conv1D computes ``y = x W + b + Σ_a R_a ⊙ δ_a(x)`` over the adapters a that take part (reflora.layer;
reflora.dispatch finds them): LoRA (``s·(x_d Aᵀ Bᵀ + b_B)``, reflora.ops.lora_linear) or DoRA
(reflora.ops.dora_linear). The inputs are checked first (reflora.validate). One adapter is ``adapter=, lora=``; several are
``adapters={name: (lora, tensors)}`` with ``active=[names]`` (their deltas sum; ``[]`` is the base model) or
``adapter_names=[one name per sample]`` (a mixed batch; ``"__base__"`` for none).

``gpt2_forward`` returns ``(logits, cache)``; ``gpt2_backward(dlogits, cache, wrt)`` returns the gradient of
every key in ``wrt``: PEFT adapter keys (``base_model.model....lora_A.weight``; with ``adapters=`` qualified by
the adapter's name, ``"<name>:base_model.model...."``), HF base keys (``transformer.h.0.attn.c_attn.weight``;
``transformer.wte.weight`` sums the head and the embedding) or ``"inputs_embeds"`` (the gradient with respect to
``wte[ids]``, HF's ``inputs_embeds``). Nothing that is not asked for is computed: backpropagation stops at the
lowest op that a requested gradient needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reflora.adapters import qualified_key, split_key
from reflora.backend import Array, namespace
from reflora.config import GPT2Config, LoraConfig
from reflora.dispatch import module_backward, module_forward, row_masks
from reflora.ops import (
    attention_backward,
    attention_forward,
    attention_visibility,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    lora_embedding_backward,
    lora_embedding_forward,
)
from reflora.targets import (
    ADAPTER_PREFIX,
    EMBEDDING_MODULE,
    HEAD_KEY,
    SAVED_KIND,
    TOKENS_MODULE,
    adapter_shapes,
    base_shapes,
    plan_lora,
    trainable_bias_keys,
)
from reflora.validate import (
    INPUTS_EMBEDS,
    InputError,
    adapter_slots,
    check_inputs,
    check_norm_gradient,
    check_params,
    check_wrt,
)

__all__ = [
    "INPUTS_EMBEDS",
    "InputError",
    "adapter_trainable_keys",
    "gpt2_backward",
    "gpt2_forward",
    "gpt2_loss_and_grads",
    "trainable_keys",
]

# Order of the ops inside a block, used to find how far down backpropagation must go.
_OP_INDEX = {"ln_1": 0, "attn.c_attn": 1, "attn.c_proj": 2, "ln_2": 3, "mlp.c_fc": 4, "mlp.c_proj": 5}
_OPS_PER_BLOCK = len(_OP_INDEX)


def trainable_keys(config: GPT2Config, lora: LoraConfig | None) -> list[str]:
    """What PEFT trains by default: every adapter tensor plus the biases of the ``bias`` mode."""
    if lora is None:
        return list(base_shapes(config))
    plan = plan_lora(config, lora)
    return list(adapter_shapes(plan)) + trainable_bias_keys(config, lora, plan)


def gpt2_forward(
    params: Mapping[str, Array],
    config: GPT2Config,
    input_ids: Array | None = None,
    *,
    attention_mask: Array | None = None,
    position_ids: Array | None = None,
    inputs_embeds: Array | None = None,
    adapter: Mapping[str, Array] | None = None,
    lora: LoraConfig | None = None,
    dropout_masks: Mapping[str, Any] | None = None,
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]] | None = None,
    active: Sequence[str] | None = None,
    adapter_names: Sequence[str] | None = None,
    dora_norm_gradient: str = "detached",
) -> tuple[Array, dict[str, Any]]:
    """Logits (B, T, V) and the cache for ``gpt2_backward``.

    params: HF base tensors (``base_shapes``); adapter: PEFT adapter tensors for ``lora`` (both or neither).
    attention_mask: (B, T) of 0/1, default all ones. position_ids: (B, T) or (1, T), default ``arange(T)``.
    dropout_masks: {module name: (B, T, in) keep-mask of 0/1}, one per targeted module, applied with
    scaling 1/(1 − lora_dropout) to the LoRA branch only. ``None`` means eval mode: no LoRA dropout.

    Several adapters (instead of ``adapter``/``lora``): ``adapters`` {name: (LoraConfig, tensors)}; ``active``:
    the names applied to every sample (default: all of ``adapters``; ``[]``: none, the base model); or
    ``adapter_names``: one name per sample, ``"__base__"`` for none. ``dropout_masks`` is then
    {adapter name: {module name: mask}} for the adapters that take part. Gradient keys are qualified
    (reflora.adapters.qualified_key). ``dora_norm_gradient``: ``"detached"`` (PEFT, DoRA paper §4.3) or
    ``"full"``: how ``gpt2_backward`` treats DoRA's weight norm.
    """
    xp = namespace(*params.values())
    dtype = check_params(params, config)
    batch, seq_len = check_inputs(xp, config, input_ids, inputs_embeds, attention_mask, position_ids, dtype)
    check_norm_gradient(dora_norm_gradient)
    slots = adapter_slots(
        xp, config, dtype, batch, seq_len, adapter, lora, dropout_masks, adapters, active, adapter_names
    )
    c, n = config.n_embd, batch * seq_len
    rows = row_masks(slots, batch, seq_len)  # {adapter: (N, 1)} in a mixed batch

    def linear(h: Array, name: str) -> tuple[Array, tuple]:  # h W + b + Σ_a R_a ⊙ δ_a(h): reflora.dispatch
        return module_forward(h, params, name, slots, rows)

    if position_ids is None:
        position_ids = xp.reshape(xp.arange(seq_len), (1, seq_len))
    if attention_mask is None:
        attention_mask = xp.ones((batch, seq_len), dtype=xp.int64)
    wte_cache, wte_lora_caches = None, []
    params, saved = _saved_copies(params, slots)  # modules_to_save: the copies replace their modules
    groups = _trainable_tokens_groups(params["transformer.wte.weight"], slots, rows)  # [(W'_g, R_g, slot_g)]
    head_w = saved["head_w"]  # the tied head's (V, C) without trainable tokens
    if inputs_embeds is None:
        if groups:  # Σ_g R_g ⊙ W'_g[ids]: each sample looks up its own W'
            tokens, wte_cache = _grouped_lookup(input_ids, groups, batch, seq_len)  # (B, T, C)
        else:
            tokens, wte_cache = embedding_forward(input_ids, saved["lookup_w"])  # (B, T, C)
        tokens, wte_lora_caches = _wte_lora_forward(tokens, input_ids, slots, rows, batch, seq_len)
    else:
        tokens = inputs_embeds
    positions, wpe_cache = embedding_forward(position_ids, params["transformer.wpe.weight"])  # (B or 1, T, C)
    x = xp.reshape(tokens + positions, (n, c))  # (N, C)
    visible = attention_visibility(attention_mask, seq_len)  # (B, 1, T, T)
    eps = config.layer_norm_epsilon

    layers = []
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}"
        h1, ln1_cache = layernorm_forward(x, params[f"{pre}.ln_1.weight"], params[f"{pre}.ln_1.bias"], eps)
        qkv, c_attn_cache = linear(h1, f"{pre}.attn.c_attn")  # (N, 3C)
        att, att_cache = attention_forward(xp.reshape(qkv, (batch, seq_len, 3 * c)), visible, config.n_head)
        proj, c_proj_cache = linear(xp.reshape(att, (n, c)), f"{pre}.attn.c_proj")  # (N, C)
        x += proj  # x is this function's own buffer (tokens + positions), never cached
        h2, ln2_cache = layernorm_forward(x, params[f"{pre}.ln_2.weight"], params[f"{pre}.ln_2.bias"], eps)
        fc, fc_cache = linear(h2, f"{pre}.mlp.c_fc")  # (N, inner)
        act, gelu_cache = gelu_forward(fc)
        out, mlp_proj_cache = linear(act, f"{pre}.mlp.c_proj")  # (N, C)
        x += out
        layers.append(
            (ln1_cache, c_attn_cache, att_cache, c_proj_cache, ln2_cache, fc_cache, gelu_cache, mlp_proj_cache)
        )
    hf, lnf_cache = layernorm_forward(x, params["transformer.ln_f.weight"], params["transformer.ln_f.bias"], eps)
    if groups:  # Σ_g R_g ⊙ h_f W'_gᵀ: each sample's tied head is its own W'
        logits2 = sum(_masked(xp.matmul(hf, xp.matrix_transpose(w)), r) for w, r, _ in groups)
    else:
        logits2 = xp.matmul(hf, xp.matrix_transpose(head_w))
    logits = xp.reshape(logits2, (batch, seq_len, -1))
    cache = {
        "config": config, "params": params, "slots": slots, "dora_norm_gradient": dora_norm_gradient,
        "wte_cache": wte_cache, "wte_lora_caches": wte_lora_caches, "wpe_cache": wpe_cache,
        "wte": groups[0][0] if len(groups) == 1 and groups[0][1] is None else head_w,  # the head's W' for every row
        "saved": saved,
        "tokens_groups": groups, "shape": (batch, seq_len),
        "layers": layers, "hf": hf, "lnf_cache": lnf_cache,
    }  # fmt: skip
    return logits, cache


def gpt2_backward(dlogits: Array, cache: dict[str, Any], wrt: Iterable[str]) -> dict[str, Array]:
    """Gradients of ``Σ dlogits ⊙ logits`` for every key in ``wrt`` (see the module docstring)."""
    config: GPT2Config = cache["config"]
    params, slots = cache["params"], cache["slots"]
    xp = namespace(dlogits)
    batch, seq_len = cache["shape"]
    n, c = batch * seq_len, config.n_embd
    asked = check_wrt(wrt, params, slots)
    if tuple(dlogits.shape) != (batch, seq_len, config.vocab_size):
        raise InputError(f"dlogits has shape {tuple(dlogits.shape)}, expected {(batch, seq_len, config.vocab_size)}")
    saved = cache["saved"]
    alias = saved["alias"]  # modules_to_save: copy's adapter key -> the HF key it stands in for
    head_key, lookup_key = saved["head"], saved["lookup"]  # who owns the head's and the lookup's (V, C)
    wanted = {alias.get(k, k) for k in asked if k not in alias.values()}  # a replaced original is used nowhere
    lowest = _lowest_op_needed(_lowered(wanted, head_key, lookup_key), config.n_layer)
    grads: dict[str, Array] = {}

    def finish() -> dict[str, Array]:
        out = {}
        for key in asked:
            if key in alias:
                out[key] = grads[alias[key]]
            elif key in grads and key not in alias.values():
                out[key] = grads[key]
            elif key in alias.values() or (key == "transformer.wte.weight" and key not in (head_key, lookup_key)):
                out[key] = xp.zeros_like(params[key])  # replaced by a saved copy, so used nowhere: gradient 0
            else:
                raise RuntimeError(f"gpt2_backward computed no gradient for {key!r}, which wrt asks for and the "
                                   "forward uses (a bug in reflora)")  # fmt: skip
        return out

    def norm_backward(dy: Array, ln_cache: tuple, name: str) -> Array:
        wants = f"{name}.weight" in wanted or f"{name}.bias" in wanted  # under LoRA the norms are frozen
        dx_, dw, db = layernorm_backward(dy, ln_cache, params[f"{name}.weight"], want_dparams=wants)
        grads.update({k: v for k, v in ((f"{name}.weight", dw), (f"{name}.bias", db)) if k in wanted})
        return dx_

    def linear_backward(dy: Array, layer_cache: tuple, name: str, op_position: int) -> Array | None:
        dh, module_grads = module_backward(
            dy, layer_cache, params, name, wanted, norm_gradient=cache["dora_norm_gradient"],
            want_dx=op_position > lowest,
        )  # fmt: skip
        grads.update(module_grads)
        return dh  # None when nothing below this op is wanted

    # tied head: logits = h_f W'ᵀ, or Σ_g R_g ⊙ h_f W'_gᵀ with trainable tokens (W'_g: _trainable_tokens_groups)
    dlogits2 = xp.reshape(dlogits, (n, config.vocab_size))  # (N, V)
    groups = cache["tokens_groups"]
    tokens_wanted = any(_tokens_key(slot) in wanted for _, _, slot in groups)
    head_wanted = head_key in wanted or tokens_wanted
    lookup_wanted = lookup_key in wanted or tokens_wanted
    d_groups = []  # dW'_g (V, C) per group: head, then lookup; split into wte and the new rows at the end
    if groups and (head_wanted or lookup_wanted):
        d_groups = [xp.matmul(xp.matrix_transpose(_masked(dlogits2, r)), cache["hf"]) for _, r, _ in groups]
    elif head_wanted:
        grads[head_key] = xp.matmul(xp.matrix_transpose(dlogits2), cache["hf"])  # (V, C)
    ln_f_position = _OPS_PER_BLOCK * config.n_layer  # ln_f sits above every block
    if lowest > ln_f_position:  # nothing below the head is wanted
        return finish()
    if groups:
        dhf = sum(xp.matmul(_masked(dlogits2, r), w) for w, r, _ in groups)  # (N, C)
    else:
        dhf = xp.matmul(dlogits2, cache["wte"])  # (N, C)
    dx = norm_backward(dhf, cache["lnf_cache"], "transformer.ln_f")
    if lowest == ln_f_position:
        return finish()

    for i in reversed(range(config.n_layer)):
        pre = f"transformer.h.{i}"
        base = _OPS_PER_BLOCK * i
        ln1_cache, c_attn_cache, att_cache, c_proj_cache, ln2_cache, fc_cache, gelu_cache, mlp_proj_cache = cache[
            "layers"
        ][i]
        # MLP half: x = x + mlp.c_proj(gelu(c_fc(ln_2(x))))
        dact = linear_backward(dx, mlp_proj_cache, f"{pre}.mlp.c_proj", base + 5)
        if dact is None:
            break
        dfc = gelu_backward(dact, gelu_cache)
        dh2 = linear_backward(dfc, fc_cache, f"{pre}.mlp.c_fc", base + 4)
        if dh2 is None:
            break
        dres = norm_backward(dh2, ln2_cache, f"{pre}.ln_2")
        if lowest >= base + 3:
            break
        dx += dres  # dx is a fresh gradient buffer, never cached
        # attention half: x = x + c_proj(attention(c_attn(ln_1(x))))
        datt = linear_backward(dx, c_proj_cache, f"{pre}.attn.c_proj", base + 2)
        if datt is None:
            break
        dqkv = attention_backward(xp.reshape(datt, (batch, seq_len, c)), att_cache)  # (B, T, 3C)
        dh1 = linear_backward(xp.reshape(dqkv, (n, 3 * c)), c_attn_cache, f"{pre}.attn.c_attn", base + 1)
        if dh1 is None:
            break
        dres = norm_backward(dh1, ln1_cache, f"{pre}.ln_1")
        if lowest >= base:
            break
        dx += dres  # dx is a fresh gradient buffer, never cached
    else:
        # embeddings: x₀ = wte[ids] + wpe[pos]
        dembeds = xp.reshape(dx, (batch, seq_len, c))  # (B, T, C)
        if INPUTS_EMBEDS in wanted:
            grads[INPUTS_EMBEDS] = dembeds
        grads.update(_wte_lora_backward(dembeds, cache["wte_lora_caches"], wanted))
        if "transformer.wpe.weight" in wanted:
            shared = cache["wpe_cache"][0].shape[0] != batch  # (1, T) positions are shared: sum the rows first
            dpos = xp.sum(dembeds, axis=0, keepdims=True) if shared else dembeds
            grads["transformer.wpe.weight"] = embedding_backward(dpos, cache["wpe_cache"])
        if lookup_wanted and cache["wte_cache"] is not None and groups:
            grouped = xp.reshape(dembeds, (n, c))
            for g, (_, r, _) in enumerate(groups):
                d_lookup = embedding_backward(xp.reshape(_masked(grouped, r), (batch, seq_len, c)), cache["wte_cache"])
                d_groups[g] = d_groups[g] + d_lookup
        elif lookup_wanted and cache["wte_cache"] is not None:
            d_lookup = embedding_backward(dembeds, cache["wte_cache"])  # (V, C)
            grads[lookup_key] = grads[lookup_key] + d_lookup if lookup_key in grads else d_lookup
        elif lookup_key in wanted:
            raise InputError(f"the gradient of {lookup_key} needs input_ids, not inputs_embeds")
    # dW'_g split: group g's replaced rows go to its new rows (its tokens key), the rest to W (summed over g)
    for d_g, (_, _, slot) in zip(d_groups, groups, strict=True):
        if slot is not None:
            index = xp.asarray(slot.plan[TOKENS_MODULE].token_indices)
            grads[_tokens_key(slot)] = xp.take(d_g, index, axis=0)  # (K, C)
            d_g[index, :] = 0  # W's replaced rows reach neither this group's lookup nor its head
        grads["transformer.wte.weight"] = (
            grads["transformer.wte.weight"] + d_g if "transformer.wte.weight" in grads else d_g
        )
    return finish()


def gpt2_loss_and_grads(
    params: Mapping[str, Array],
    config: GPT2Config,
    input_ids: Array | None,
    labels: Array,
    *,
    wrt: Iterable[str] | None = None,
    **forward_kwargs: Any,
) -> tuple[Array, Array, dict[str, Array]]:
    """``(loss, logits, grads)`` for HF's shifted causal cross-entropy (labels -100 ignored, mean).

    ``wrt`` defaults to ``trainable_keys(config, lora)``; the other keyword arguments go to ``gpt2_forward``.
    """
    logits, cache = gpt2_forward(params, config, input_ids, **forward_kwargs)
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise InputError(f"labels has shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])}")
    loss, ce_cache = cross_entropy_forward(logits, labels)
    dlogits = cross_entropy_backward(1.0, ce_cache)
    if wrt is None:
        if forward_kwargs.get("adapters") is None:
            wrt = trainable_keys(config, forward_kwargs.get("lora"))
        else:
            wrt = adapter_trainable_keys(config, forward_kwargs["adapters"], [slot.name for slot in cache["slots"]])
    return loss, logits, gpt2_backward(dlogits, cache, wrt)


def adapter_trainable_keys(
    config: GPT2Config, adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]], names: Iterable[str]
) -> list[str]:
    """The default ``wrt`` with ``adapters=``: every tensor of the named adapters (qualified keys), then the
    base biases their ``bias`` modes train."""
    keys, biases = [], {}
    for name in names:
        lora = adapters[name][0]
        plan = plan_lora(config, lora)
        keys += [qualified_key(name, key) for key in adapter_shapes(plan)]
        biases.update(dict.fromkeys(trainable_bias_keys(config, lora, plan)))
    return keys + list(biases)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _trainable_tokens_groups(wte: Array, slots, rows: Mapping[str, Array]) -> list[tuple[Array, Any, Any]]:
    """PEFT ``trainable_token_indices``: ``[(W'_g (V, C), R_g (N, 1) or None, slot_g or None)]``, the weights
    that the lookup *and* the tied head use; ``[]`` when no adapter taking part has trainable tokens. W'_a = wte
    with rows ``token_indices`` replaced by adapter a's ``trainable_tokens_delta`` (K, C) (the new rows
    themselves). Active on every row: one group, R = None (every sample); at most one such adapter (PEFT 0.21's
    ``TrainableTokensWrapper.check_set_adapter`` raises "Only one adapter can be set at a time" otherwise); the
    others' LoRA adds as usual. A mixed batch (``adapter_names``): one group per adapter with trainable tokens,
    R_a = its samples' rows, plus (wte, R_rest, None) for the other samples (plain adapters and ``"__base__"``:
    wte's own rows), so each sample uses its own adapter's W' and Σ_g R_g = 1 (docs/advanced-semantics.md, D13:
    PEFT 0.21.2 raises KeyError for a row that names an adapter without trainable tokens). LoRA on ``wte`` next
    to trainable tokens is refused (PEFT's ``add_adapter`` raises on LoRA over the TrainableTokensWrapper)."""
    owners = [slot for slot in slots if TOKENS_MODULE in slot.plan]
    if not owners:
        return []
    mixed = any(slot.rows is not None for slot in owners)
    if len(owners) > 1 and not mixed:
        raise InputError(f"{len(owners)} active adapters have trainable_token_indices; at most one may be active "
                         "(PEFT: 'Only one adapter can be set at a time')")  # fmt: skip
    embedding = [other.name for other in slots if EMBEDDING_MODULE in other.plan]
    if embedding:
        raise InputError(f"adapter {owners[0].name!r} has trainable_token_indices and adapter {embedding[0]!r} has "
                         f"LoRA on {EMBEDDING_MODULE}; they cannot be active together (PEFT 0.21 refuses to build this: "
                         "'Target module TrainableTokensWrapper(...) is not supported')")  # fmt: skip
    xp = namespace(wte)
    groups = []
    for slot in owners:
        module = slot.plan[TOKENS_MODULE]
        w = xp.asarray(wte, copy=True)
        w[xp.asarray(module.token_indices), :] = slot.tensors[module.tokens_key]
        groups.append((w, rows.get(slot.name), slot))
    if mixed:
        rest = 1 - sum(r for _, r, _ in groups)  # (N, 1): the samples of plain adapters and "__base__"
        groups.append((wte, rest, None))
    return groups


def _masked(value: Array, row: Array | None) -> Array:
    """R ⊙ value for value (N, ·) and R (N, 1) of 0/1; value itself when R is None (every sample)."""
    return value if row is None else value * row


def _grouped_lookup(input_ids: Array, groups, batch: int, seq_len: int) -> tuple[Array, tuple]:
    """Σ_g R_g ⊙ W'_g[ids] (B, T, C) and the embedding cache (the same ids for every group)."""
    total, cache = None, None
    for w, r, _ in groups:
        out, cache = embedding_forward(input_ids, w)  # (B, T, C)
        if r is not None:
            out = out * namespace(r).reshape(r, (batch, seq_len, 1))
        total = out if total is None else total + out
    return total, cache


def _saved_copies(params: Mapping[str, Array], slots) -> tuple[Mapping[str, Array], dict[str, Any]]:
    """PEFT ``modules_to_save``: ``(params', saved)``. params' = params with each saved module's tensors replaced
    by its copy's (adapter keys ``base_model.model.<module>.weight`` / ``.bias``), except ``wte``: ``saved`` holds
    ``lookup_w`` (V, C) (``transformer.wte``'s copy, or the base W) for the lookup and ``head_w`` (V, C)
    (``lm_head``'s copy, wte's copy when tied, or the base W) for the tied head, which key owns each one's
    gradient (``lookup``, ``head``), and ``alias`` {copy's adapter key: HF key} for the other saved tensors.
    One adapter only (``adapter=``): several are refused."""
    wte = params["transformer.wte.weight"]
    saved = {"lookup_w": wte, "head_w": wte, "lookup": "transformer.wte.weight", "head": "transformer.wte.weight",
             "alias": {}}  # fmt: skip
    owners = [slot for slot in slots if any(m.kind == SAVED_KIND for m in slot.plan.values())]
    if not owners:
        return params, saved
    if len(slots) > 1 or owners[0].rows is not None:
        raise InputError("modules_to_save is supported with one adapter (adapter=, lora=) only")
    (slot,) = owners
    out = dict(params)
    for module in slot.plan.values():
        for key, hf_key, _ in module.saved or ():
            grad_key = slot.key_prefix + key  # qualified "<name>:<key>" with adapters=
            if hf_key == "transformer.wte.weight":
                saved["lookup_w"], saved["lookup"] = slot.tensors[key], grad_key
            elif hf_key == HEAD_KEY:
                saved["head_w"], saved["head"] = slot.tensors[key], grad_key
            else:
                out[hf_key] = slot.tensors[key]
                saved["alias"][grad_key] = hf_key
    return out, saved


def _lowered(wanted: set[str], head_key: str, lookup_key: str) -> set[str]:
    """``wanted`` as ``_lowest_op_needed`` reads it: the lookup's owner is ``wte`` (the embeddings), the head's
    owner alone needs nothing below the head."""
    out = set()
    for key in wanted:
        if key == lookup_key:
            out.add("transformer.wte.weight")
        elif key != head_key:
            out.add(key)
    return out


def _tokens_key(slot) -> str | None:
    return None if slot is None else slot.key_prefix + slot.plan[TOKENS_MODULE].tokens_key


def _wte_lora_forward(
    tokens: Array, input_ids: Array, slots, rows: Mapping[str, Array], batch: int, seq_len: int
) -> tuple[Array, list]:
    """LoRA on ``wte`` (PEFT ``lora.Embedding``): tokens (B, T, C) + Σ_a R_a ⊙ s_a Aᵀ_a[ids] B_aᵀ over the
    adapters that target ``transformer.wte`` (reflora.ops.lora_embedding; R_a (N, 1) in a mixed batch, as
    (B, T, 1) here). No dropout. Only the lookup changes: the tied head keeps the base ``wte.weight``."""
    caches = []
    for slot in slots:
        module = slot.plan.get(EMBEDDING_MODULE)
        if module is None:
            continue
        (branch,) = module.branches
        A, B = slot.tensors[branch.a_key], slot.tensors[branch.b_key]
        delta, op_cache = lora_embedding_forward(input_ids, A, B, module.scaling)  # (B, T, C)
        row = rows.get(slot.name)
        if row is not None:
            row = namespace(row).reshape(row, (batch, seq_len, 1))
            delta = delta * row
        tokens = tokens + delta
        caches.append((slot, branch, module.scaling, row, op_cache))
    return tokens, caches


def _wte_lora_backward(dembeds: Array, caches: list, wanted: set[str]) -> dict[str, Array]:
    """dembeds (B, T, C) -> {qualified lora_embedding_A / _B key: gradient} for the wanted ones."""
    grads = {}
    for slot, branch, scaling, row, op_cache in caches:
        a_key, b_key = slot.key_prefix + branch.a_key, slot.key_prefix + branch.b_key
        if a_key not in wanted and b_key not in wanted:
            continue
        g = dembeds if row is None else dembeds * row
        A, B = slot.tensors[branch.a_key], slot.tensors[branch.b_key]
        dA, dB = lora_embedding_backward(g, op_cache, A, B, scaling)
        grads.update({k: v for k, v in ((a_key, dA), (b_key, dB)) if k in wanted})
    return grads


def _lowest_op_needed(wanted: set[str], n_layer: int) -> int:
    """The lowest op position whose parameters are wanted: -1 for the embeddings, 6·i + op inside block i,
    6·n_layer for ln_f, and a huge number when nothing is wanted."""
    lowest = 10**9
    for key in wanted:
        if key in (INPUTS_EMBEDS, "transformer.wpe.weight", "transformer.wte.weight"):
            return -1
        if split_key(key)[1].startswith(ADAPTER_PREFIX + EMBEDDING_MODULE + "."):  # LoRA on wte
            return -1
        if key.startswith("transformer.ln_f."):
            lowest = min(lowest, _OPS_PER_BLOCK * n_layer)
            continue
        name = split_key(key)[1].removeprefix("base_model.model.")
        parts = name.split(".")
        layer = int(parts[2])
        op = parts[3] if parts[3] in _OP_INDEX else ".".join(parts[3:5])
        lowest = min(lowest, _OPS_PER_BLOCK * layer + _OP_INDEX[op])
    return lowest
