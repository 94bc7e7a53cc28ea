"""Driver for Flax NNX 0.12.8 (``nnx.LoRALinear``, on JAX's CPU backend): layer level.

Mapping (flax/nnx/nn/lora.py):

* ``nnx.LoRALinear(in, out, lora_rank=r, use_bias=..., param_dtype=..., lora_param_dtype=...)``: an ``nnx.Linear``
  whose ``kernel`` is (in, out) (the case's "conv1d" layout), plus ``lora`` = ``nnx.LoRA`` with ``lora_a`` (in, r)
  = Aᵀ and ``lora_b`` (r, out) = Bᵀ. Its output is ``x @ kernel + bias + x @ lora_a @ lora_b``.
* the linear layout (weight (out, in)) goes through NNX's other LoRA API, the wrapper ``nnx.LoRA(in, r, out,
  base_module=nnx.Einsum("...i,oi->...o", (out, in)))``: output ``x @ lora_a @ lora_b + base_module(x)``. So
  both of NNX's forms (the ``LoRALinear`` subclass and the ``LoRA`` wrapper) are checked, one per layout.
* no scaling (no alpha), no dropout: only scaling-1 cases (``lora_alpha == r``) without a keep-mask are expressible.
* float64 needs ``jax_enable_x64``, which the driver switches on (JAX is otherwise float32-only); the tensors are
  created in the case's dtype (``param_dtype`` / ``lora_param_dtype``).
* trainable: NNX has no global switch; its documented LoRA recipe differentiates w.r.t. ``nnx.LoRAParam`` only
  (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``). A trainable bias is ``nnx.Any(nnx.LoRAParam,
  nnx.PathContains("bias"))``: the driver passes that filter to ``nnx.grad`` (``nnx.DiffState``).
* merge: NNX's LoRA has no merge (flax/nnx/nn/lora.py defines LoRA, LoRALinear and LoRAParam only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import refuse_unsupported
from conformance.protocol import Capabilities, LayerCase, ModelCase, NotSupported

name = "flax-nnx"
capabilities = Capabilities(
    layer_layouts=frozenset({"conv1d", "linear"}),
    model_level=False,
    lora_alpha=False,
    rslora=False,
    dropout_mask_injection=False,
    bias_modes=frozenset({"none", "all", "lora_only"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16"}),
    merge=False,
    notes={
        "model_level": "Flax ships no GPT-2 in NNX",
        "layer_layouts": "conv1d: nnx.LoRALinear (kernel (in, out)); linear: the wrapper nnx.LoRA(base_module="
        "nnx.Einsum('...i,oi->...o')) around a kernel (out, in)",
        "lora_alpha": "nnx.LoRA has no scaling: only lora_alpha == r (scaling 1) is expressible",
        "rslora": "no scaling at all",
        "dropout_mask_injection": "nnx.LoRA has no dropout",
        "per_slice_qkv": "nnx.LoRA adapts a whole kernel",
        "bias_modes": "trainability is the filter given to nnx.grad / nnx.Optimizer(wrt=...): "
        "LoRAParam, plus PathContains('bias') for a trainable bias",
        "merge": "nnx.LoRA has no merge",
    },
)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"candidate": f"flax {version('flax')}", "framework": f"jax {version('jax')} (jaxlib {version('jaxlib')})"}


def _jnp(array: np.ndarray, dtype: str):
    import jax

    jax.config.update("jax_enable_x64", True)  # before any float64 array exists
    import jax.numpy as jnp

    return jnp.asarray(np.asarray(array, dtype=np.float64), dtype=getattr(jnp, dtype))


def _np(array) -> np.ndarray:
    return np.asarray(array.astype("float32") if str(array.dtype) == "bfloat16" else array).astype(np.float64)


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    x, dy, kernel = _jnp(case.x, case.dtype), _jnp(case.dy, case.dtype), _jnp(case.weight, case.dtype)
    import jax.numpy as jnp
    from flax import nnx

    dtype = getattr(jnp, case.dtype)
    if case.layout == "conv1d":  # the subclass API: nnx.LoRALinear
        in_f, out_f = case.weight.shape
        layer = nnx.LoRALinear(in_f, out_f, lora_rank=case.r, use_bias=case.bias is not None, param_dtype=dtype,
                               lora_param_dtype=dtype, rngs=nnx.Rngs(case.seed))  # fmt: skip
        layer.kernel.set_value(kernel)  # (in, out)
        if case.bias is not None:
            layer.bias.set_value(_jnp(case.bias, case.dtype))
        lora, prefix = layer.lora, "lora."
    else:  # the wrapper API: nnx.LoRA(base_module=...) around an Einsum with the (out, in) kernel
        out_f, in_f = case.weight.shape
        base = nnx.Einsum("...i,oi->...o", (out_f, in_f), (out_f,) if case.bias is not None else None,
                          param_dtype=dtype, rngs=nnx.Rngs(case.seed))  # fmt: skip
        base.kernel.set_value(kernel)  # (out, in)
        if case.bias is not None:
            base.bias.set_value(_jnp(case.bias, case.dtype))
        layer = lora = nnx.LoRA(in_f, case.r, out_f, base_module=base, param_dtype=dtype, rngs=nnx.Rngs(case.seed))
        prefix = ""
    lora.lora_a.set_value(_jnp(case.lora_A[None].T, case.dtype))  # (in, r)
    lora.lora_b.set_value(_jnp(case.lora_B[None].T, case.dtype))  # (r, out)
    trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("bias")) if case.bias_trainable else nnx.LoRAParam

    def objective(model, x):
        return jnp.sum(model(x) * dy)

    grads, dx = nnx.grad(objective, argnums=(nnx.DiffState(0, trainable), 1))(layer, x)
    flat = {".".join(str(k) for k in path): v.get_value() for path, v in nnx.to_flat_state(grads)}
    out = {"y": _np(layer(x)), "dx": _np(dx)}
    rename = {f"{prefix}lora_a": "lora_A", f"{prefix}lora_b": "lora_B", "kernel": "weight", "bias": "bias",
              "base_module.kernel": "weight", "base_module.bias": "bias"}  # fmt: skip
    for path, grad in flat.items():
        is_lora = rename.get(path) in ("lora_A", "lora_B")
        out[rename.get(path, path)] = _np(grad).T if is_lora else _np(grad)
    out["trainable"] = np.array(sorted(rename.get(p, p) for p in flat), dtype=str)
    return out


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    raise NotSupported(f"{name}: {capabilities.notes['merge']}")


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
