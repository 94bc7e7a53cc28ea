"""What reflora says: the expected result of every check, computed by the reference in a chosen dtype.

The suite calls these twice per case: in float64 (the expectation) and in float32 (the error a plain float32
evaluation of the same computation makes, which sets the tolerance; see ``conformance.tolerance``). The
``reference`` driver calls them in the candidate's dtype. Results use the protocol's names.

Every formula is reflora's: the ops and the model (``reflora.ops``, ``reflora.model``), the scaling
(``reflora.config.LoraConfig.scaling``, through ``LayerCase.scaling``), the merge delta
(``reflora.merge.lora_delta_weight``), the model-level merge, the inits and the weighted combinations
(``reflora.merge``, ``reflora.lora_init``, ``reflora.weighted``). Nothing here recomputes one of them.

* layer and model level: ``layer_forward_backward``, ``layer_merge``, ``model_forward_backward``,
  ``eval_logits``, ``adapter_load_logits``, ``adapter_switch_logits``;
* advanced level (an ``AdaptersCase``): ``ADVANCED_EXPECTATIONS`` maps a driver method to its function
  (``adapters_forward_backward``, ``merge_expectation``, ``init_expectation``, ``weighted_expectation``),
  and ``safe_merge_expectation``, ``unloaded_params``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conformance.protocol import AdaptersCase, LayerAdaptersCase, LayerCase, LayerInitCase, ModelCase, targeted_keys
from reflora.config import GPT2Config, LoraConfig
from reflora.layer import LayerAdapter, adapted_linear_backward, adapted_linear_forward
from reflora.lora_init import init_adapter
from reflora.merge import (
    MergeError,
    dora_delta_weight,
    dora_norm,
    lora_delta_bias,
    lora_delta_weight,
    merge_adapters,
    unmerge_adapters,
)
from reflora.model import gpt2_backward, gpt2_forward, gpt2_loss_and_grads, trainable_keys
from reflora.ops import LoraBranchWeights, lora_linear_backward, lora_linear_forward
from reflora.ops.linear import linear_forward
from reflora.scaling import runtime_multiplier, scaled_lora
from reflora.targets import LoraModule, plan_lora
from reflora.weighted import add_weighted_adapter

NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32}


def cast(array, dtype: str):
    """``array`` as a NumPy array of ``dtype`` ("float64" or "float32"); None stays None."""
    return None if array is None else np.asarray(array, dtype=NUMPY_DTYPES[dtype])


def cast_tree(tree, dtype: str):
    """Every float array of a nested tree (dicts, an adapter's ``(LoraConfig, tensors)``) cast to ``dtype``;
    anything else unchanged."""
    if isinstance(tree, dict):
        return {k: cast_tree(v, dtype) for k, v in tree.items()}
    if isinstance(tree, tuple):  # (LoraConfig, tensors)
        return (tree[0], cast_tree(tree[1], dtype))
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return tree.astype(NUMPY_DTYPES[dtype])
    return tree


def to_float64(tree):
    """Every array in a (nested) result converted to float64 NumPy; other values unchanged."""
    if isinstance(tree, dict):
        return {k: to_float64(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return tree.astype(np.float64)
    return tree


# ----------------------------------------------------------------------------------------------
# layer level
# ----------------------------------------------------------------------------------------------


def result_suffix(slice_name: str | None) -> str:
    return "" if slice_name is None else f".{slice_name}"


def layer_branches(case: LayerCase, dtype: str) -> list[tuple[str | None, LoraBranchWeights]]:
    """(slice name, branch) per LoRA branch; a q/k/v slice covers outputs [i·w, (i+1)·w) with w = out/3."""
    s = case.scaling
    out_f = case.dy.shape[-1]
    width = out_f // 3 if case.qkv_slices else out_f
    offsets = {None: 0, "q": 0, "k": width, "v": 2 * width}
    return [
        (name, LoraBranchWeights(cast(case.lora_A[name], dtype), cast(case.lora_B[name], dtype), s,
                                 offsets[name], offsets[name] + width))
        for name in case.lora_A
    ]  # fmt: skip


def layer_forward_backward(
    case: LayerCase, dtype: str, forward_op=lora_linear_forward, backward_op=lora_linear_backward
):
    """``y`` (B, T, out), ``dx`` (B, T, in), ``lora_A[.q]`` (r, in), ``lora_B[.q]`` (out_b, r), ``bias`` (out,) if
    trainable, and ``trainable`` (the names PEFT trains: the LoRA tensors, and the bias if its mode trains it)."""
    batch, seq_len, in_f = case.x.shape
    n = batch * seq_len
    x = cast(case.x, dtype).reshape(n, in_f)  # (N, in)
    weight, bias = cast(case.weight, dtype), cast(case.bias, dtype)
    mask = None if case.keep_mask is None else cast(case.keep_mask, dtype).reshape(n, in_f)  # (N, in)
    named = layer_branches(case, dtype)
    branches = tuple(b for _, b in named)
    y, cache = forward_op(x, weight, bias, branches, mask, case.lora_dropout, case.layout)  # (N, out)
    dy = cast(case.dy, dtype).reshape(n, -1)  # (N, out)
    dx, _, dbias, branch_grads = backward_op(
        dy, cache, weight, branches, mask, case.lora_dropout, case.layout, want_dx=True, want_dbias=case.bias_trainable
    )
    out: dict[str, Any] = {"y": y.reshape(batch, seq_len, -1), "dx": dx.reshape(batch, seq_len, in_f)}
    for (name, _), (dA, dB) in zip(named, branch_grads, strict=True):
        out[f"lora_A{result_suffix(name)}"], out[f"lora_B{result_suffix(name)}"] = dA, dB
    trainable = [k for k in out if k.startswith("lora_")]
    if case.bias_trainable:
        out["bias"] = dbias
        trainable.append("bias")
    out["trainable"] = trainable
    return out


def layer_adapted_forward_backward(case: LayerCase, dtype: str, norm_gradient: str | None = None) -> dict[str, Any]:
    """lora_bias / DoRA on one layer (issue 15.1), through ``reflora.layer.adapted_linear_forward/backward``:
    y = x Wtᵀ + b + s·(B A x + b_B) (lora_bias), or DoRA's m ⊙ (W + sBA)x / ‖W + sBA‖_row (+ b) with the norm
    detached (``norm_gradient="detached"``, PEFT's) or not (``"full"``); None: ``case.dora_norm``. One
    full-width branch, eval mode.

    Returns ``y`` (B, T, out), ``dx`` (B, T, in), ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_B_bias`` (out,)
    with lora_bias, ``magnitude`` (out,) with DoRA, ``bias`` (out,) if trainable, and ``trainable``."""
    batch, seq_len, in_f = case.x.shape
    n = batch * seq_len
    x = cast(case.x, dtype).reshape(n, in_f)  # (N, in)
    weight, bias = cast(case.weight, dtype), cast(case.bias, dtype)
    ((_, branch),) = layer_branches(case, dtype)
    ad = LayerAdapter((branch,), (cast(case.lora_bias_B, dtype),), cast(case.magnitude, dtype), None, 0.0, None)
    y, cache = adapted_linear_forward(x, weight, bias, (ad,), case.layout)  # (N, out)
    dy = cast(case.dy, dtype).reshape(n, -1)  # (N, out)
    norm = norm_gradient or case.dora_norm
    dx, _, dbias, (grads,) = adapted_linear_backward(
        dy, cache, weight, (ad,), case.layout, norm_gradient=norm, want_dbias=case.bias_trainable
    )
    ((dA, dB),) = grads.branches
    out: dict[str, Any] = {"y": y.reshape(batch, seq_len, -1), "dx": dx.reshape(batch, seq_len, in_f),
                           "lora_A": dA, "lora_B": dB}  # fmt: skip
    if case.lora_bias_B is not None:
        out["lora_B_bias"] = grads.biases[0]
    if case.magnitude is not None:
        out["magnitude"] = grads.magnitude
    trainable = list(out)[2:]
    if case.bias_trainable:
        out["bias"] = dbias
        trainable.append("bias")
    out["trainable"] = trainable
    return out


def layer_merge(case: LayerCase, dtype: str) -> dict[str, np.ndarray]:
    """``merged_weight``, ``merged_y`` (forward with the merged weight, eval mode) and ``unmerged_weight``.

    The delta is ``reflora.merge.lora_delta_weight`` (Σ_branches s·BA, laid out like ``case.weight``); with
    ``case.magnitude`` (DoRA, one full-width branch) it is ``reflora.merge.dora_delta_weight``, m ⊙ V/‖V‖_row − W
    with V = W + s·BA, so that the merged weight is m ⊙ V/‖V‖_row. In float64 the unmerged weight is W itself
    (the exact answer); in a lower dtype it is (W + Δ) − Δ rounded in that dtype, which is what a plain
    evaluation returns."""
    weight, bias = cast(case.weight, dtype), cast(case.bias, dtype)
    out_f = case.dy.shape[-1]
    branches = [br for _, br in layer_branches(case, dtype)]
    if case.magnitude is not None:  # layer.dora_merge.* / layer.dora_unmerge.*
        (branch,) = branches
        delta = dora_delta_weight(weight, branch, cast(case.magnitude, dtype), case.layout)
    else:
        delta = lora_delta_weight(branches, out_f, case.layout)
    merged = np.ascontiguousarray(weight + delta)
    x = cast(case.x, dtype)  # (B, T, in)
    merged_y = x @ merged if case.layout == "conv1d" else x @ merged.T  # (B, T, out)
    if bias is not None:
        merged_y = merged_y + bias
    unmerged = weight if dtype == "float64" else merged - delta
    return {"merged_weight": merged, "merged_y": merged_y, "unmerged_weight": unmerged}


def layer_init_expectation(case: LayerInitCase, lora_A, lora_B, dtype: str) -> dict[str, Any]:
    """What a layer initialised with the candidate's own ``lora_A`` (r, in) and ``lora_B`` (out, r) must give:
    ``y`` (B, T, out) = x Wᵀ + b + s·B A x (``lora_linear_forward``; x Wᵀ + b where B or A is zero), ``weight``
    (the case's, unchanged) and, with ``case.use_dora``, ``magnitude`` (out,) = ‖W + s·B A‖_row
    (``reflora.merge.dora_norm``; the row norms of W when B A = 0). DoRA's y at init is the same y (m = ‖V‖)."""
    batch, seq_len, in_f = case.x.shape
    x = cast(case.x, dtype).reshape(batch * seq_len, in_f)  # (N, in)
    weight, bias = cast(case.weight, dtype), cast(case.bias, dtype)
    A, B = cast(lora_A, dtype), cast(lora_B, dtype)
    branch = LoraBranchWeights(A, B, case.scaling, 0, B.shape[0])
    y, _ = lora_linear_forward(x, weight, bias, (branch,), None, 0.0, case.layout)  # (N, out)
    out: dict[str, Any] = {"y": y.reshape(batch, seq_len, -1), "weight": weight}
    if case.use_dora:
        out["magnitude"] = dora_norm(weight, branch, case.layout)
    return out


def layer_base_output(case: LayerInitCase | LayerAdaptersCase, dtype: str) -> np.ndarray:
    """The base layer's y = x Wᵀ + b (B, T, out) (``reflora.ops.linear.linear_forward``)."""
    batch, seq_len, in_f = case.x.shape
    x = cast(case.x, dtype).reshape(batch * seq_len, in_f)  # (N, in)
    y, _ = linear_forward(x, cast(case.weight, dtype), cast(case.bias, dtype), case.layout)
    return y.reshape(batch, seq_len, -1)


def layer_adapters_forward_backward(case: LayerAdaptersCase, dtype: str) -> dict[str, Any]:
    """Several LoRA adapters on one layer (``reflora.layer.adapted_linear_forward/backward``, each adapter a
    ``LayerAdapter`` with its own scaling): y = x Wᵀ + b + Σ_a R_a ⊙ s_a B_a A_a x with R_a all ones for an
    adapter of ``case.active`` (none for ``[]``), or the rows of the batch samples named a in
    ``case.adapter_names``. Eval mode. Returns ``y`` (B, T, out), ``dx`` (B, T, in) and ``grads``
    {"<name>.lora_A": (r, in), "<name>.lora_B": (out, r)} for every adapter that acts on some row."""
    batch, seq_len, in_f = case.x.shape
    n = batch * seq_len
    x = cast(case.x, dtype).reshape(n, in_f)  # (N, in)
    weight, bias = cast(case.weight, dtype), cast(case.bias, dtype)
    out_f = case.dy.shape[-1]
    if case.adapter_names is not None:
        acting = [name for name in case.adapters if name in case.adapter_names]
    else:
        acting = list(case.active or [])
    adapters = []
    for name in acting:
        a = case.adapters[name]
        branch = LoraBranchWeights(cast(a["lora_A"], dtype), cast(a["lora_B"], dtype), case.scaling(name), 0, out_f)
        rows = None
        if case.adapter_names is not None:  # (N, 1): 1 on the T rows of every sample named `name`
            chosen = np.array([row == name for row in case.adapter_names], dtype=NUMPY_DTYPES[dtype])
            rows = np.repeat(chosen, seq_len).reshape(n, 1)
        adapters.append(LayerAdapter((branch,), (None,), None, None, 0.0, rows))
    y, cache = adapted_linear_forward(x, weight, bias, tuple(adapters), case.layout)  # (N, out)
    dy = cast(case.dy, dtype).reshape(n, out_f)  # (N, out)
    dx, _, _, grads = adapted_linear_backward(dy, cache, weight, tuple(adapters), case.layout)
    out: dict[str, Any] = {"y": y.reshape(batch, seq_len, out_f), "dx": dx.reshape(batch, seq_len, in_f), "grads": {}}
    for name, g in zip(acting, grads, strict=True):
        ((dA, dB),) = g.branches
        out["grads"][f"{name}.lora_A"], out["grads"][f"{name}.lora_B"] = dA, dB
    return out


# ----------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------


def _model_inputs(case: ModelCase, dtype: str, params=None, adapter=None, lora: LoraConfig | None = None):
    params = case.params if params is None else params
    adapter = case.adapter if adapter is None else adapter
    return {
        "params": {k: cast(v, dtype) for k, v in params.items()},
        "adapter": {k: cast(v, dtype) for k, v in adapter.items()},
        "lora": case.lora if lora is None else lora,
    }


def model_forward_backward(case: ModelCase, dtype: str) -> dict[str, Any]:
    """``logits`` (B, T, V), ``loss`` (objective loss), ``grads`` (every key PEFT trains) and ``trainable``
    (key -> number of elements)."""
    inputs = _model_inputs(case, dtype)
    params, adapter, lora = inputs["params"], inputs["adapter"], inputs["lora"]
    if case.scale_ops:  # runtime scaling: every module's scaling times m (reflora.scaling)
        lora = scaled_lora(lora, runtime_multiplier(case.scale_ops))
    masks = None if case.dropout_masks is None else {k: cast(v, dtype) for k, v in case.dropout_masks.items()}
    keys = trainable_keys(case.config, lora)
    kwargs = dict(attention_mask=case.attention_mask, position_ids=case.position_ids, adapter=adapter, lora=lora,
                  dropout_masks=masks)  # fmt: skip
    out: dict[str, Any] = {}
    if case.labels is not None:
        loss, logits, grads = gpt2_loss_and_grads(params, case.config, case.input_ids, case.labels, wrt=keys, **kwargs)
        out["loss"] = np.asarray(loss)
    else:
        logits, cache = gpt2_forward(params, case.config, case.input_ids, **kwargs)
        grads = gpt2_backward(cast(case.dlogits, dtype), cache, keys)
    shapes = {**params, **adapter}
    out.update(logits=logits, grads=grads, trainable={k: int(shapes[k].size) for k in keys})
    return out


def eval_logits(case: ModelCase, dtype: str, params=None, adapter=None, lora: LoraConfig | None = None) -> np.ndarray:
    """Eval-mode logits (no LoRA dropout) of the case's inputs, optionally with other weights."""
    inputs = _model_inputs(case, dtype, params, adapter, lora)
    logits, _ = gpt2_forward(inputs["params"], case.config, case.input_ids, attention_mask=case.attention_mask,
                             position_ids=case.position_ids, adapter=inputs["adapter"], lora=inputs["lora"])  # fmt: skip
    return logits


def params_with_trained_biases(case: ModelCase) -> dict[str, np.ndarray]:
    return {**case.params, **(case.trained_biases or {})}


def adapter_load_logits(case: ModelCase, dtype: str) -> np.ndarray:
    return eval_logits(case, dtype, params=params_with_trained_biases(case))


def adapter_switch_logits(case: ModelCase, dtype: str) -> dict[str, np.ndarray]:
    first = eval_logits(case, dtype)
    second = eval_logits(case, dtype, adapter=case.second_adapter, lora=case.second_lora)
    return {"first": first, "second": second, "first_again": first}


# ----------------------------------------------------------------------------------------------
# advanced level: an AdaptersCase (docs/advanced-semantics.md)
# ----------------------------------------------------------------------------------------------


def adapters_forward_backward(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    params, adapters = cast_tree(case.params, dtype), cast_tree(case.adapters, dtype)
    masks = cast_tree(case.dropout_masks, dtype) if case.dropout_masks else None
    kwargs = dict(adapters=adapters, active=case.active, adapter_names=case.adapter_names, dropout_masks=masks)
    if case.labels is None:
        return {"logits": gpt2_forward(params, case.config, case.input_ids, **kwargs)[0]}
    loss, logits, grads = gpt2_loss_and_grads(params, case.config, case.input_ids, case.labels, wrt=case.wrt, **kwargs)
    return {"logits": logits, "loss": np.asarray(loss), "grads": grads}


def merge_expectation(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    params, adapters = cast_tree(case.params, dtype), cast_tree(case.adapters, dtype)
    keys = targeted_keys(case)
    logits = gpt2_forward(params, case.config, case.input_ids, adapters=adapters)[0]
    merged, record = merge_adapters(params, case.config, adapters)
    merged_logits = gpt2_forward(merged, case.config, case.input_ids)[0]
    # float64: W itself is the exact answer; float32: a plain round trip, which sets the bound
    unmerged = params if dtype == "float64" else unmerge_adapters(merged, case.config, adapters, record)
    return {"logits": logits, "merged_logits": merged_logits, "merged": {k: merged[k] for k in keys},
            "unmerged": {k: unmerged[k] for k in keys}}  # fmt: skip


def safe_merge_expectation(case: AdaptersCase) -> dict[str, Any]:
    try:
        merge_adapters(case.params, case.config, case.adapters, safe=True)
        refused = False
    except MergeError:
        refused = True
    return {"refused": refused, "after": {k: case.params[k] for k in targeted_keys(case)}}


def unloaded_params(case: AdaptersCase, dtype: str) -> dict[str, np.ndarray]:
    merged, _ = merge_adapters(cast_tree(case.params, dtype), case.config, cast_tree(case.adapters, dtype))
    return {k: merged[k] for k in case.params}


def module_branches(module: LoraModule, tensors: dict[str, np.ndarray]) -> list[LoraBranchWeights]:
    """The branches of one planned module with their tensors (A, B, scaling, output rows)."""
    return [LoraBranchWeights(tensors[b.a_key], tensors[b.b_key], module.scaling, b.out_start, b.out_stop)
            for b in module.branches]  # fmt: skip


def scaled_deltas(plan: dict[str, LoraModule], adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ΔWt = s·B A (out, in) per module of a one-branch plan (``reflora.merge.lora_delta_weight``): the sign-free
    quantity by which ``init_expectation`` and the PiSSA/OLoRA check compare an init, the same evaluation on both
    sides. s is folded into B first, (s·B)·A, the rounding the suite's recorded errors were measured with (s·(B A)
    moves the float32 plains in their last digits)."""
    deltas = {}
    for name, module in plan.items():
        branch = module.branches[0]
        folded = LoraBranchWeights(
            adapter[branch.a_key], module.scaling * adapter[branch.b_key], 1.0, 0, module.out_features
        )
        deltas[name] = lora_delta_weight([folded], module.out_features, "linear")
    return deltas


def init_expectation(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    """What a deterministic init gives: ``scaled_delta`` s·BA per module (sign-free), ``params`` (the residual
    base of the targeted weights), ``logits`` (the base model's: the output is unchanged at init), and the DoRA
    magnitude when there is one."""
    params = cast_tree(case.params, dtype)
    lora = case.init_lora
    rng = np.random.default_rng(0)  # the random inits' A does not enter the checked quantities
    adapter, new_params = init_adapter(params, case.config, lora, rng)
    plan = plan_lora(case.config, lora)
    # the output at init: the base's in real arithmetic (s·BA = 0, or the residual plus s·BA); evaluated through
    # the adapter, so that the float32 plains see the rounding of the split
    logits = gpt2_forward(new_params, case.config, case.input_ids, adapter=adapter, lora=lora)[0]
    out: dict[str, Any] = {"logits": logits}
    if lora.init_lora_weights in ("pissa", "olora"):
        out["scaled_delta"] = scaled_deltas(plan, adapter)
        out["params"] = {f"{m}.weight": new_params[f"{m}.weight"] for m in plan}
    if lora.use_dora:
        out["magnitude"] = {m: adapter[mod.magnitude_key] for m, mod in plan.items()}
    return out


def module_deltas(config: GPT2Config, lora: LoraConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Effective ΔWt = s·B A (out, in) and Δb = s·b_B per module of a LoRA adapter (``reflora.merge``'s
    ``lora_delta_weight`` and ``lora_delta_bias``)."""
    deltas, bias_deltas = {}, {}
    for name, module in plan_lora(config, lora).items():
        branches = module_branches(module, tensors)
        deltas[name] = lora_delta_weight(branches, module.out_features, "linear")
        biases = [None if b.bias_key is None else tensors[b.bias_key] for b in module.branches]
        bias = lora_delta_bias(branches, biases, module.out_features)
        if bias is not None:
            bias_deltas[name] = bias
    return {"deltas": deltas, "bias_deltas": bias_deltas}


def weighted_expectation(case: AdaptersCase, dtype: str) -> dict[str, Any]:
    params, adapters = cast_tree(case.params, dtype), cast_tree(case.adapters, dtype)
    c = case.combination
    lora, tensors = add_weighted_adapter(case.config, adapters, c["names"], c["weights"], c["combination_type"],
                                         c["svd_rank"], c.get("density"), c.get("majority_sign_method", "total"),
                                         keep_masks=case.keep_masks)  # fmt: skip
    out = module_deltas(case.config, lora, tensors)
    if not out["bias_deltas"]:
        del out["bias_deltas"]
    out["logits"] = gpt2_forward(params, case.config, case.input_ids, adapter=tensors, lora=lora)[0]
    return out


ADVANCED_EXPECTATIONS = {"model_adapters": adapters_forward_backward, "model_merge": merge_expectation,
                "init_adapter": init_expectation, "weighted_adapter": weighted_expectation}  # fmt: skip
