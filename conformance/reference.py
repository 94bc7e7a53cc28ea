"""What reflora says: the expected result of every check, computed by the reference in a chosen dtype.

The suite calls these twice per case: in float64 (the expectation) and in float32 (the error a plain float32
evaluation of the same computation makes, which sets the tolerance; see ``conformance.tolerance``). The
``reference`` driver calls them in the candidate's dtype. Results use the protocol's names.

Merge, inline until ``reflora.merge`` exists (per branch, s the scaling, rows/columns of its output slice):

    linear layout (W: (out, in)):   W'[start:stop, :] = W[start:stop, :] + s · B A
    conv1d layout (W: (in, out)):   W'[:, start:stop] = W[:, start:stop] + s · (B A)ᵀ
    merged_y = x W'ᵀ + b (linear) or x W' + b (conv1d);  unmerge: W'' = W' − s · B A (laid out the same way)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from conformance.protocol import LayerCase, ModelCase
from reflora.config import LoraConfig
from reflora.model import gpt2_backward, gpt2_forward, gpt2_loss_and_grads, trainable_keys
from reflora.ops import LoraBranchWeights, lora_linear_backward, lora_linear_forward

NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32}


def _cast(array, dtype: str):
    return None if array is None else np.asarray(array, dtype=NUMPY_DTYPES[dtype])


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def result_suffix(slice_name: str | None) -> str:
    return "" if slice_name is None else f".{slice_name}"


def layer_branches(case: LayerCase, dtype: str) -> list[tuple[str | None, LoraBranchWeights]]:
    """(slice name, branch) per LoRA branch; a q/k/v slice covers outputs [i·w, (i+1)·w) with w = out/3."""
    s = scaling(case.r, case.lora_alpha, case.use_rslora)
    out_f = case.dy.shape[-1]
    width = out_f // 3 if case.qkv_slices else out_f
    offsets = {None: 0, "q": 0, "k": width, "v": 2 * width}
    return [
        (name, LoraBranchWeights(_cast(case.lora_A[name], dtype), _cast(case.lora_B[name], dtype), s,
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
    x = _cast(case.x, dtype).reshape(n, in_f)  # (N, in)
    weight, bias = _cast(case.weight, dtype), _cast(case.bias, dtype)
    mask = None if case.keep_mask is None else _cast(case.keep_mask, dtype).reshape(n, in_f)  # (N, in)
    named = layer_branches(case, dtype)
    branches = tuple(b for _, b in named)
    y, cache = forward_op(x, weight, bias, branches, mask, case.lora_dropout, case.layout)  # (N, out)
    dy = _cast(case.dy, dtype).reshape(n, -1)  # (N, out)
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


def merge_delta(case: LayerCase, dtype: str) -> np.ndarray:
    """Σ_branches s·BA laid out like ``case.weight`` (see the module docstring)."""
    delta = np.zeros_like(_cast(case.weight, dtype))
    for _, br in layer_branches(case, dtype):
        ba = br.scaling * (br.B @ br.A)  # (out_b, in)
        if case.layout == "linear":
            delta[br.start : br.stop, :] += ba
        else:
            delta[:, br.start : br.stop] += ba.T
    return delta


def layer_merge(case: LayerCase, dtype: str) -> dict[str, np.ndarray]:
    """``merged_weight``, ``merged_y`` (forward with the merged weight, eval mode) and ``unmerged_weight``.

    In float64 the unmerged weight is W itself (the exact answer); in a lower dtype it is (W + Δ) − Δ rounded
    in that dtype, which is what a plain evaluation returns."""
    weight, bias = _cast(case.weight, dtype), _cast(case.bias, dtype)
    delta = merge_delta(case, dtype)
    merged = weight + delta
    x = _cast(case.x, dtype)  # (B, T, in)
    merged_y = x @ merged if case.layout == "conv1d" else x @ merged.T  # (B, T, out)
    if bias is not None:
        merged_y = merged_y + bias
    unmerged = weight if dtype == "float64" else merged - delta
    return {"merged_weight": merged, "merged_y": merged_y, "unmerged_weight": unmerged}


def _model_inputs(case: ModelCase, dtype: str, params=None, adapter=None, lora: LoraConfig | None = None):
    params = case.params if params is None else params
    adapter = case.adapter if adapter is None else adapter
    return {
        "params": {k: _cast(v, dtype) for k, v in params.items()},
        "adapter": {k: _cast(v, dtype) for k, v in adapter.items()},
        "lora": case.lora if lora is None else lora,
    }


def model_forward_backward(case: ModelCase, dtype: str) -> dict[str, Any]:
    """``logits`` (B, T, V), ``loss`` (objective loss), ``grads`` (every key PEFT trains) and ``trainable``
    (key -> number of elements)."""
    inputs = _model_inputs(case, dtype)
    params, adapter, lora = inputs["params"], inputs["adapter"], inputs["lora"]
    masks = None if case.dropout_masks is None else {k: _cast(v, dtype) for k, v in case.dropout_masks.items()}
    keys = trainable_keys(case.config, lora)
    kwargs = dict(attention_mask=case.attention_mask, position_ids=case.position_ids, adapter=adapter, lora=lora,
                  dropout_masks=masks)  # fmt: skip
    out: dict[str, Any] = {}
    if case.labels is not None:
        loss, logits, grads = gpt2_loss_and_grads(params, case.config, case.input_ids, case.labels, wrt=keys, **kwargs)
        out["loss"] = np.asarray(loss)
    else:
        logits, cache = gpt2_forward(params, case.config, case.input_ids, **kwargs)
        grads = gpt2_backward(_cast(case.dlogits, dtype), cache, keys)
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


def perturbed(case, seed: int):
    """The case with every float input multiplied by (1 + δ), δ ~ U(±2⁻²⁴) (one float32 rounding), masks and
    integer inputs kept. A plain float32 evaluation of it samples another rounding of the same computation."""
    import dataclasses

    rng = np.random.default_rng(seed)

    def jiggle(value):
        if isinstance(value, dict):
            return {k: jiggle(v) for k, v in value.items()}
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return value * (1.0 + 2.0**-24 * rng.uniform(-1.0, 1.0, value.shape))
        return value

    names = ("x", "weight", "bias", "lora_A", "lora_B", "dy") if isinstance(case, LayerCase) else (
        "params", "adapter", "dlogits", "trained_biases", "second_adapter")  # fmt: skip
    return dataclasses.replace(case, **{name: jiggle(getattr(case, name)) for name in names})


def to_float64(tree):
    """Every array in a (nested) result converted to float64 NumPy; other values unchanged."""
    if isinstance(tree, dict):
        return {k: to_float64(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return tree.astype(np.float64)
    return tree
