"""GPT-2 with LoRA: the whole forward and its hand-written backward.

The model is HF ``GPT2LMHeadModel`` with its own dropouts off (pre-LN blocks, tied head):

    x  = wte[ids] + wpe[pos]                                  (B, T, C); or x = inputs_embeds + wpe[pos]
    for each block i:
        x = x + c_proj(attention(c_attn(ln_1(x))))            every c_* is a Conv1D with adapters
        x = x + mlp.c_proj(gelu(c_fc(ln_2(x))))
    logits = ln_f(x) @ wteᵀ                                   (B, T, V)

A targeted Conv1D computes ``y = x W + b + Σ_a R_a ⊙ δ_a(x)`` over the adapters a that take part (reflora.adapters):
LoRA (``s·(x_d Aᵀ Bᵀ + b_B)``) or DoRA (reflora.ops.dora_linear). One adapter is ``adapter=, lora=``; several are
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
from typing import Any, NamedTuple

from reflora.adapters import (
    BASE_ADAPTER,
    LayerAdapter,
    adapted_linear_backward,
    adapted_linear_forward,
    check_adapter_name,
    qualified_key,
    split_key,
)
from reflora.backend import Array, namespace
from reflora.config import GPT2Config, LoraConfig
from reflora.ops import (
    LoraBranchWeights,
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
    lora_linear_backward,
    lora_linear_forward,
)
from reflora.ops.dora_linear import NORM_GRADIENTS
from reflora.targets import LoraModule, adapter_shapes, base_shapes, plan_lora, trainable_bias_keys

INPUTS_EMBEDS = "inputs_embeds"
# Order of the ops inside a block, used to find how far down backpropagation must go.
_OP_INDEX = {"ln_1": 0, "attn.c_attn": 1, "attn.c_proj": 2, "ln_2": 3, "mlp.c_fc": 4, "mlp.c_proj": 5}
_OPS_PER_BLOCK = len(_OP_INDEX)


class InputError(ValueError):
    """An input tensor has the wrong shape, dtype, keys or values; the message names it."""


class _Slot(NamedTuple):
    """One adapter taking part in a forward pass."""

    name: str
    lora: LoraConfig
    tensors: Mapping[str, Array]
    plan: dict[str, LoraModule]
    masks: dict[str, Array]  # module name -> (B, T, in) keep-mask
    rows: Array | None  # (B,) of 0/1: the samples it applies to; None = every sample
    key_prefix: str  # "" for the single-adapter arguments, "<name>:" for adapters=


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
    dtype = _check_params(params, config)
    batch, seq_len = _check_inputs(xp, config, input_ids, inputs_embeds, attention_mask, position_ids, dtype)
    if dora_norm_gradient not in NORM_GRADIENTS:
        raise InputError(f"dora_norm_gradient must be one of {NORM_GRADIENTS}, got {dora_norm_gradient!r}")
    slots = _adapter_slots(
        xp, config, dtype, batch, seq_len, adapter, lora, dropout_masks, adapters, active, adapter_names
    )
    c, n = config.n_embd, batch * seq_len

    if position_ids is None:
        position_ids = xp.reshape(xp.arange(seq_len), (1, seq_len))
    if attention_mask is None:
        attention_mask = xp.ones((batch, seq_len), dtype=xp.int64)
    tokens = embedding_forward(input_ids, params["transformer.wte.weight"]) if inputs_embeds is None else inputs_embeds
    positions = embedding_forward(position_ids, params["transformer.wpe.weight"])  # (B or 1, T, C)
    x = xp.reshape(tokens + positions, (n, c))  # (N, C)
    visible = attention_visibility(attention_mask, seq_len)  # (B, 1, T, T)
    row_masks = {  # (N, 1) row selectors of a mixed batch
        slot.name: xp.reshape(xp.broadcast_to(xp.reshape(slot.rows, (batch, 1)), (batch, seq_len)), (n, 1))
        for slot in slots
        if slot.rows is not None
    }

    def layer_adapters(name: str) -> tuple[list[tuple[_Slot, LoraModule]], tuple[LayerAdapter, ...]]:
        """The adapters on module ``name``: their owners and tensors."""
        owners, layer = [], []
        for slot in slots:
            module = slot.plan.get(name)
            if module is None:
                continue
            t = slot.tensors
            mask = slot.masks.get(name)
            layer.append(
                LayerAdapter(
                    branches=tuple(
                        LoraBranchWeights(t[b.a_key], t[b.b_key], module.scaling, b.out_start, b.out_stop)
                        for b in module.branches
                    ),
                    biases=tuple(None if b.bias_key is None else t[b.bias_key] for b in module.branches),
                    magnitude=None if module.magnitude_key is None else t[module.magnitude_key],
                    keep_mask=None if mask is None else xp.reshape(mask, (n, mask.shape[-1])),
                    dropout_p=slot.lora.lora_dropout,
                    rows=row_masks.get(slot.name),
                )
            )
            owners.append((slot, module))
        return owners, tuple(layer)

    def linear(h: Array, name: str) -> tuple[Array, tuple]:
        owners, layer = layer_adapters(name)
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        plain = all(ad.magnitude is None and ad.rows is None and all(b is None for b in ad.biases) for ad in layer)
        if plain and (len(layer) <= 1 or all(ad.keep_mask is None for ad in layer)):
            # plain LoRA on every row: the one fused op (reflora.ops.lora_linear), all branches at once
            branches = tuple(br for ad in layer for br in ad.branches)
            mask, p = (layer[0].keep_mask, layer[0].dropout_p) if layer else (None, 0.0)
            y, op_cache = lora_linear_forward(h, weight, bias, branches, mask, p, "conv1d")
            return y, ("lora", owners, branches, mask, p, op_cache)
        y, op_cache = adapted_linear_forward(h, weight, bias, layer, "conv1d")
        return y, ("adapted", owners, layer, op_cache)

    layers = []
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}"
        h1, ln1_cache = layernorm_forward(
            x, params[f"{pre}.ln_1.weight"], params[f"{pre}.ln_1.bias"], config.layer_norm_epsilon
        )
        qkv, c_attn_cache = linear(h1, f"{pre}.attn.c_attn")  # (N, 3C)
        att, att_cache = attention_forward(xp.reshape(qkv, (batch, seq_len, 3 * c)), visible, config.n_head)
        proj, c_proj_cache = linear(xp.reshape(att, (n, c)), f"{pre}.attn.c_proj")  # (N, C)
        x += proj  # x is this function's own buffer (tokens + positions), never cached
        h2, ln2_cache = layernorm_forward(
            x, params[f"{pre}.ln_2.weight"], params[f"{pre}.ln_2.bias"], config.layer_norm_epsilon
        )
        fc, fc_cache = linear(h2, f"{pre}.mlp.c_fc")  # (N, inner)
        act, gelu_cache = gelu_forward(fc)
        out, mlp_proj_cache = linear(act, f"{pre}.mlp.c_proj")  # (N, C)
        x += out
        layers.append(
            (ln1_cache, c_attn_cache, att_cache, c_proj_cache, ln2_cache, fc_cache, gelu_cache, mlp_proj_cache)
        )
    hf, lnf_cache = layernorm_forward(
        x, params["transformer.ln_f.weight"], params["transformer.ln_f.bias"], config.layer_norm_epsilon
    )
    logits = xp.reshape(xp.matmul(hf, xp.matrix_transpose(params["transformer.wte.weight"])), (batch, seq_len, -1))
    cache = {
        "config": config, "params": params, "slots": slots, "dora_norm_gradient": dora_norm_gradient,
        "input_ids": input_ids, "position_ids": position_ids, "shape": (batch, seq_len),
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
    wanted = _check_wrt(wrt, params, slots)
    if tuple(dlogits.shape) != (batch, seq_len, config.vocab_size):
        raise InputError(f"dlogits has shape {tuple(dlogits.shape)}, expected {(batch, seq_len, config.vocab_size)}")
    lowest = _lowest_op_needed(wanted, config.n_layer)
    grads: dict[str, Array] = {}
    wte = params["transformer.wte.weight"]

    dlogits2 = xp.reshape(dlogits, (n, config.vocab_size))  # (N, V)
    if "transformer.wte.weight" in wanted:
        grads["transformer.wte.weight"] = xp.matmul(xp.matrix_transpose(dlogits2), cache["hf"])  # (V, C)
    ln_f_position = _OPS_PER_BLOCK * config.n_layer  # ln_f sits above every block
    if lowest > ln_f_position:  # nothing below the head is wanted
        return {key: grads[key] for key in wanted}
    dhf = xp.matmul(dlogits2, wte)  # (N, C)
    dx, dw, db = layernorm_backward(
        dhf, cache["lnf_cache"], params["transformer.ln_f.weight"], want_dparams=_wants_norm(wanted, "transformer.ln_f")
    )
    _keep(grads, wanted, "transformer.ln_f.weight", dw)
    _keep(grads, wanted, "transformer.ln_f.bias", db)
    if lowest == ln_f_position:
        return {key: grads[key] for key in wanted}

    def linear_backward(dy: Array, layer_cache: tuple, name: str, op_position: int) -> Array | None:
        path, owners, *rest = layer_cache
        weight = params[f"{name}.weight"]
        want = {
            "want_dx": op_position > lowest,
            "want_dweight": f"{name}.weight" in wanted,
            "want_dbias": f"{name}.bias" in wanted,
        }
        if path == "lora":
            branches, mask, p, op_cache = rest
            dx_, dw_, db_, branch_grads = lora_linear_backward(
                dy, op_cache, weight, branches, mask, p, "conv1d", **want
            )
            per_adapter = iter(branch_grads)
            for slot, module in owners:
                for branch in module.branches:
                    dA, dB = next(per_adapter)
                    _keep(grads, wanted, slot.key_prefix + branch.a_key, dA)
                    _keep(grads, wanted, slot.key_prefix + branch.b_key, dB)
        else:
            layer, op_cache = rest
            dx_, dw_, db_, adapter_grads = adapted_linear_backward(
                dy, op_cache, weight, layer, "conv1d", cache["dora_norm_gradient"], **want
            )
            for (slot, module), ad_grads in zip(owners, adapter_grads, strict=True):
                for branch, (dA, dB), d_bias in zip(module.branches, ad_grads.branches, ad_grads.biases, strict=True):
                    _keep(grads, wanted, slot.key_prefix + branch.a_key, dA)
                    _keep(grads, wanted, slot.key_prefix + branch.b_key, dB)
                    if branch.bias_key is not None:
                        _keep(grads, wanted, slot.key_prefix + branch.bias_key, d_bias)
                if module.magnitude_key is not None:
                    _keep(grads, wanted, slot.key_prefix + module.magnitude_key, ad_grads.magnitude)
        _keep(grads, wanted, f"{name}.weight", dw_)
        _keep(grads, wanted, f"{name}.bias", db_)
        return dx_

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
        dres, dw, db = layernorm_backward(
            dh2, ln2_cache, params[f"{pre}.ln_2.weight"], want_dparams=_wants_norm(wanted, f"{pre}.ln_2")
        )
        _keep(grads, wanted, f"{pre}.ln_2.weight", dw)
        _keep(grads, wanted, f"{pre}.ln_2.bias", db)
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
        dres, dw, db = layernorm_backward(
            dh1, ln1_cache, params[f"{pre}.ln_1.weight"], want_dparams=_wants_norm(wanted, f"{pre}.ln_1")
        )
        _keep(grads, wanted, f"{pre}.ln_1.weight", dw)
        _keep(grads, wanted, f"{pre}.ln_1.bias", db)
        if lowest >= base:
            break
        dx += dres  # dx is a fresh gradient buffer, never cached
    else:
        dembeds = xp.reshape(dx, (batch, seq_len, c))  # (B, T, C): gradient of wte[ids] + wpe[pos]
        if INPUTS_EMBEDS in wanted:
            grads[INPUTS_EMBEDS] = dembeds
        if "transformer.wpe.weight" in wanted:
            pos = cache["position_ids"]
            if pos.shape[0] != batch:  # (1, T) positions are shared by every row: sum the rows first
                pos, dpos = pos, xp.sum(dembeds, axis=0, keepdims=True)
            else:
                dpos = dembeds
            grads["transformer.wpe.weight"] = embedding_backward(dpos, pos, config.n_positions)
        if "transformer.wte.weight" in wanted:
            if cache["input_ids"] is None:
                raise InputError("the gradient of transformer.wte.weight needs input_ids, not inputs_embeds")
            grads["transformer.wte.weight"] += embedding_backward(dembeds, cache["input_ids"], config.vocab_size)
    return {key: grads[key] for key in wanted}


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


def _wants_norm(wanted: set, name: str) -> bool:
    """Whether a LayerNorm's weight or bias gradient is asked for (under LoRA the norms are frozen)."""
    return f"{name}.weight" in wanted or f"{name}.bias" in wanted


def _keep(grads: dict, wanted: set, key: str, value: Array | None) -> None:
    if key in wanted and value is not None:
        grads[key] = value


def _lowest_op_needed(wanted: set[str], n_layer: int) -> int:
    """The lowest op position whose parameters are wanted: -1 for the embeddings, 6·i + op inside block i,
    6·n_layer for ln_f, and a huge number when nothing is wanted."""
    lowest = 10**9
    for key in wanted:
        if key in (INPUTS_EMBEDS, "transformer.wpe.weight", "transformer.wte.weight"):
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


def _float_dtypes(xp) -> tuple:
    return (xp.float32, xp.float64)


def _check_params(params: Mapping[str, Array], config: GPT2Config):
    expected = base_shapes(config)
    missing = [k for k in expected if k not in params]
    unknown = [k for k in params if k not in expected]
    if missing or unknown:
        raise InputError(f"params do not match the config: missing {missing[:5]}, unexpected {unknown[:5]}")
    xp = namespace(*params.values())
    dtype = params["transformer.wte.weight"].dtype
    if dtype not in _float_dtypes(xp):
        raise InputError(f"params must be float32 or float64; transformer.wte.weight is {dtype}")
    for key, shape in expected.items():
        value = params[key]
        if tuple(value.shape) != shape:
            raise InputError(f"params[{key!r}] has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype != dtype:
            raise InputError(f"params[{key!r}] has dtype {value.dtype}, but transformer.wte.weight is {dtype}")
    return dtype


def check_adapter(adapter, lora: LoraConfig | None, config: GPT2Config, dtype, where: str = "adapter") -> dict:
    """The plan of ``lora``, after checking that ``adapter`` holds exactly its tensors, with their shapes and
    ``dtype`` (``InputError`` naming ``where`` otherwise); ``{}`` when both are None."""
    if lora is None and adapter is None:
        return {}
    if lora is None or adapter is None:
        raise InputError("adapter and lora must be given together")
    if not isinstance(lora, LoraConfig):
        raise InputError(f"the LoRA config of {where} must be a reflora LoraConfig, got {type(lora).__name__}")
    plan = plan_lora(config, lora)
    expected = adapter_shapes(plan)
    missing = [k for k in expected if k not in adapter]
    unknown = [k for k in adapter if k not in expected]
    if missing or unknown:
        raise InputError(
            f"{where} tensors do not match the LoRA config: missing {missing[:3]}, unexpected {unknown[:3]}"
        )
    for key, shape in expected.items():
        if tuple(adapter[key].shape) != shape:
            raise InputError(f"{where}[{key!r}] has shape {tuple(adapter[key].shape)}, expected {shape}")
        if adapter[key].dtype != dtype:
            raise InputError(f"{where}[{key!r}] has dtype {adapter[key].dtype}, but the params are {dtype}")
    return plan


def _adapter_slots(
    xp, config, dtype, batch, seq_len, adapter, lora, dropout_masks, adapters, active, adapter_names
) -> list[_Slot]:
    """The adapters that take part, validated: from ``adapter``/``lora``, or from ``adapters`` with ``active`` or
    ``adapter_names``."""
    if adapters is None:
        if active is not None or adapter_names is not None:
            raise InputError("active and adapter_names select among adapters={name: (lora, tensors)}; none were given")
        plan = check_adapter(adapter, lora, config, dtype)
        if lora is None:
            if dropout_masks is not None:
                raise InputError("dropout_masks were given without a LoRA config")
            return []
        masks = _check_dropout_masks(dropout_masks, lora, plan, batch, seq_len, dtype)
        return [_Slot("default", lora, adapter, plan, masks, None, "")]
    if adapter is not None or lora is not None:
        raise InputError("give either adapter= and lora= (one adapter) or adapters= (several), not both")
    if not isinstance(adapters, Mapping):
        raise InputError(f"adapters must map adapter names to (LoraConfig, tensors), got {type(adapters).__name__}")
    for name in adapters:
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if active is not None and adapter_names is not None:
        raise InputError(
            "give at most one of active (the same adapters for every sample) and adapter_names (per sample)"
        )
    rows: dict[str, Array | None] = {}
    if adapter_names is not None:
        names = list(adapter_names)
        if len(names) != batch:
            raise InputError(f"adapter_names has {len(names)} entries, but the batch has {batch} samples")
        bad = sorted({str(a) for a in names if a != BASE_ADAPTER and a not in adapters})
        if bad:
            raise InputError(
                f"adapter_names names unknown adapters {bad}; known: {list(adapters)} and {BASE_ADAPTER!r}"
            )
        for name in dict.fromkeys(a for a in names if a != BASE_ADAPTER):
            rows[name] = xp.asarray([1.0 if a == name else 0.0 for a in names], dtype=dtype)  # (B,)
    else:
        names = list(adapters) if active is None else list(active)
        if isinstance(active, str):
            raise InputError(f"active must be a list of adapter names, not the string {active!r}")
        unknown = [a for a in names if a not in adapters]
        if unknown or len(set(names)) != len(names):
            raise InputError(f"active must list distinct adapters of {list(adapters)}, got {names}")
        rows = dict.fromkeys(names)
    masks_by_adapter = {} if dropout_masks is None else dict(dropout_masks)
    stray = [k for k in masks_by_adapter if k not in rows]
    if stray:
        raise InputError(
            f"with adapters=, dropout_masks maps adapter names to {{module: mask}}; {stray[:3]} take no part in this pass"
        )
    slots = []
    for name, row_select in rows.items():
        entry = adapters[name]
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise InputError(f"adapters[{name!r}] must be a (LoraConfig, tensors) pair")
        ad_lora, tensors = entry
        plan = check_adapter(tensors, ad_lora, config, dtype, where=f"adapters[{name!r}]")
        masks = _check_dropout_masks(masks_by_adapter.get(name), ad_lora, plan, batch, seq_len, dtype)
        slots.append(_Slot(name, ad_lora, tensors, plan, masks, row_select, qualified_key(name, "")))
    return slots


def _check_inputs(xp, config, input_ids, inputs_embeds, attention_mask, position_ids, dtype) -> tuple[int, int]:
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise InputError(f"input_ids must have shape (batch, seq_len) with both > 0, got {tuple(input_ids.shape)}")
        if not xp.isdtype(input_ids.dtype, "integral"):
            raise InputError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        lo, hi = int(xp.min(input_ids)), int(xp.max(input_ids))
        if lo < 0 or hi >= config.vocab_size:
            raise InputError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in [{lo}, {hi}]")
        batch, seq_len = input_ids.shape
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[2] != config.n_embd or 0 in inputs_embeds.shape:
            raise InputError(
                f"inputs_embeds must have shape (batch, seq_len, n_embd={config.n_embd}), got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.dtype != dtype:
            raise InputError(f"inputs_embeds has dtype {inputs_embeds.dtype}, but the params are {dtype}")
        batch, seq_len = inputs_embeds.shape[:2]
    if seq_len > config.n_positions:
        raise InputError(f"sequence length {seq_len} exceeds n_positions={config.n_positions}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, seq_len):
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq_len)}")
        if not bool(xp.all((attention_mask == 0) | (attention_mask == 1))):
            raise InputError("attention_mask must hold only 0 and 1")
    if position_ids is not None:
        if position_ids.ndim != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
            raise InputError(
                f"position_ids has shape {tuple(position_ids.shape)}, expected {(batch, seq_len)} or {(1, seq_len)}"
            )
        if not xp.isdtype(position_ids.dtype, "integral"):
            raise InputError(f"position_ids must be integers, got dtype {position_ids.dtype}")
        lo, hi = int(xp.min(position_ids)), int(xp.max(position_ids))
        if lo < 0 or hi >= config.n_positions:
            raise InputError(
                f"position_ids must lie in [0, n_positions={config.n_positions}), got values in [{lo}, {hi}]"
            )
    return batch, seq_len


def _check_dropout_masks(masks, lora, plan, batch, seq_len, dtype) -> dict:
    if masks is None:
        return {}
    if lora is None:
        raise InputError("dropout_masks were given without a LoRA config")
    if lora.lora_dropout == 0.0:
        if masks:
            raise InputError("dropout_masks were given, but lora.lora_dropout is 0 (no dropout)")
        return {}
    missing = [k for k in plan if k not in masks]
    unknown = [k for k in masks if k not in plan]
    if missing or unknown:
        raise InputError(
            f"dropout_masks need one mask per targeted module: missing {missing[:3]}, unexpected {unknown[:3]}"
        )
    for name, module in plan.items():
        shape = (batch, seq_len, module.in_features)
        if tuple(masks[name].shape) != shape:
            raise InputError(f"dropout_masks[{name!r}] has shape {tuple(masks[name].shape)}, expected {shape}")
        if masks[name].dtype != dtype:
            raise InputError(f"dropout_masks[{name!r}] has dtype {masks[name].dtype}, but the params are {dtype}")
    return dict(masks)


def _check_wrt(wrt: Iterable[str], params, slots: Sequence[_Slot]) -> set[str]:
    if isinstance(wrt, str):
        raise InputError(f"wrt must be a collection of keys, not the string {wrt!r}")
    wanted = set(wrt)
    known = set(params) | {INPUTS_EMBEDS}
    for slot in slots:
        known |= {slot.key_prefix + key for key in adapter_shapes(slot.plan)}
    unknown = sorted(wanted - known)
    if unknown:
        hint = ""
        if any(split_key(k)[0] is not None for k in unknown):
            hint = " (a qualified key must name an adapter that takes part in this forward pass)"
        raise InputError(f"cannot differentiate with respect to unknown keys {unknown[:5]}{hint}")
    return wanted
