"""Driver for Flax NNX 0.12.8 (``nnx.LoRALinear`` and ``nnx.LoRA``, on JAX's CPU backend): layer level.

Mapping (flax/nnx/nn/lora.py):

* ``nnx.LoRALinear(in, out, lora_rank=r, use_bias=..., param_dtype=..., lora_param_dtype=...)``: an ``nnx.Linear``
  whose ``kernel`` is (in, out) (the case's "conv1d" layout), plus ``lora`` = ``nnx.LoRA`` with ``lora_a`` (in, r)
  = Aᵀ and ``lora_b`` (r, out) = Bᵀ. Its output is ``x @ kernel + bias + x @ lora_a @ lora_b``.
* NNX's other LoRA API is the wrapper ``nnx.LoRA(in, r, out, base_module=...)``: output ``x @ lora_a @ lora_b +
  base_module(x)``. The linear layout (weight (out, in)) always uses it, around ``nnx.Einsum("...i,oi->...o",
  (out, in))``; the conv1d layout uses ``LoRALinear`` on even case seeds and the wrapper around an ``nnx.Linear``
  on odd ones. So both of NNX's forms (the ``LoRALinear`` subclass and the ``LoRA`` wrapper) are checked.
* init (``layer_init``): NNX's own defaults, ``lora_a`` by ``he_uniform()`` (fan_in = in) and ``lora_b`` zeros:
  the law ``he_uniform`` of conformance.init_laws; drawn from ``nnx.Rngs(case.seed)``.
* dtypes: float64, float32, bfloat16 and float16 (``param_dtype`` / ``lora_param_dtype`` set to the case's).
* no scaling (no alpha), no dropout: only scaling-1 cases (``lora_alpha == r``) without a keep-mask are expressible.
* float64 needs ``jax_enable_x64``, which the driver switches on (JAX is otherwise float32-only); the tensors are
  created in the case's dtype (``param_dtype`` / ``lora_param_dtype``).
* trainable: NNX has no global switch; its documented LoRA recipe differentiates w.r.t. ``nnx.LoRAParam`` only
  (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``). A trainable bias is ``nnx.Any(nnx.LoRAParam,
  nnx.PathContains("bias"))``: the driver passes that filter to ``nnx.grad`` (``nnx.DiffState``).
* merge: NNX's LoRA has no merge (flax/nnx/nn/lora.py defines LoRA, LoRALinear and LoRAParam only).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from conformance.drivers._ecosystem import refuse_unsupported
from conformance.protocol import Capabilities, LayerCase, LayerInitCase, ModelCase, NotSupported

name = "flax-nnx"
capabilities = Capabilities(
    layer_layouts=frozenset({"conv1d", "linear"}),
    model_level=False,
    lora_alpha=False,
    rslora=False,
    dropout_mask_injection=False,
    bias_modes=frozenset({"none", "all", "lora_only"}),
    per_slice_qkv=False,
    dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
    merge=False,
    layer_init_methods=frozenset({"he_uniform"}),  # nnx.LoRA: a_initializer he_uniform, b_initializer zeros
    notes={
        "model_level": "Flax ships no GPT-2 in NNX (flax.nnx has layers, no model zoo)",
        "layer_layouts": "conv1d: nnx.LoRALinear (even seeds) or nnx.LoRA(base_module=nnx.Linear) (odd seeds), "
        "kernel (in, out); linear: the wrapper nnx.LoRA(base_module=nnx.Einsum('...i,oi->...o')), kernel (out, in)",
        "lora_alpha": "nnx.LoRA has no scaling argument (flax/nnx/nn/lora.py: out = x @ lora_a @ lora_b): only "
        "lora_alpha == r (scaling 1) is expressible",
        "rslora": "nnx.LoRA has no scaling at all",
        "dropout_mask_injection": "nnx.LoRA / LoRALinear have no dropout argument",
        "per_slice_qkv": "nnx.LoRA adapts a whole kernel",
        "bias_modes": "trainability is the filter given to nnx.grad / nnx.Optimizer(wrt=...): "
        "LoRAParam, plus PathContains('bias') for a trainable bias",
        "merge": "nnx.LoRA has no merge (flax/nnx/nn/lora.py defines LoRA, LoRALinear and LoRAParam only)",
        "unmerge": "nnx.LoRA has no merge or unmerge",
        "layer_lora_bias": "nnx.LoRA has lora_a / lora_b only: no bias on B",
        "layer_dora": "Flax NNX has no DoRA (flax/nnx/nn/lora.py: LoRA, LoRALinear, LoRAParam)",
        "layer_dora_full_norm": "Flax NNX has no DoRA",
        "layer_dora_merge": "Flax NNX has no DoRA and no merge",
        "layer_init_methods": "nnx.LoRA's defaults (a_initializer=he_uniform(), b_initializer=zeros): the he_uniform "
        "law; other laws would be initializers the user passes, not NNX's own init",
        "layer_multi_adapter": "one nnx.LoRA per module (a wrapper around another LoRA adds its output too, but NNX "
        "has no adapter names, active set or disabling)",
        "layer_mixed_batch": "nnx.LoRA.__call__(x) takes no adapter names",
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


def _lora_layer(case: LayerCase | LayerInitCase):
    """The case's layer with NNX's LoRA (its own initialisation, ``nnx.Rngs(case.seed)``): ``(layer, lora, base,
    prefix)`` with ``lora`` the ``nnx.LoRA`` holding ``lora_a`` (in, r) / ``lora_b`` (r, out), ``base`` the module
    holding the case's kernel and bias, and ``prefix`` the LoRA's path in the layer's state. Both of NNX's APIs are checked: the conv1d layout (kernel (in, out)) is
    ``nnx.LoRALinear`` on an even seed and the wrapper ``nnx.LoRA(base_module=nnx.Linear(...))`` on an odd one;
    the linear layout (kernel (out, in)) is the wrapper around ``nnx.Einsum("...i,oi->...o")`` (LoRALinear's kernel
    is always (in, out))."""
    import jax.numpy as jnp
    from flax import nnx

    dtype = getattr(jnp, case.dtype)
    kernel, has_bias = _jnp(case.weight, case.dtype), case.bias is not None
    if case.layout == "conv1d":
        in_f, out_f = case.weight.shape
        if case.seed % 2 == 0:  # the subclass API: nnx.LoRALinear
            layer = nnx.LoRALinear(in_f, out_f, lora_rank=case.r, use_bias=has_bias, param_dtype=dtype,
                                   lora_param_dtype=dtype, rngs=nnx.Rngs(case.seed))  # fmt: skip
            base, lora, prefix = layer, layer.lora, "lora."
        else:  # the wrapper API around an nnx.Linear
            base = nnx.Linear(in_f, out_f, use_bias=has_bias, param_dtype=dtype, rngs=nnx.Rngs(case.seed + 1))
            layer = lora = nnx.LoRA(in_f, case.r, out_f, base_module=base, param_dtype=dtype,
                                    rngs=nnx.Rngs(case.seed))  # fmt: skip
            prefix = ""
    else:  # the wrapper API around an Einsum with the (out, in) kernel
        out_f, in_f = case.weight.shape
        base = nnx.Einsum("...i,oi->...o", (out_f, in_f), (out_f,) if has_bias else None, param_dtype=dtype,
                          rngs=nnx.Rngs(case.seed + 1))  # fmt: skip
        layer = lora = nnx.LoRA(in_f, case.r, out_f, base_module=base, param_dtype=dtype, rngs=nnx.Rngs(case.seed))
        prefix = ""
    base.kernel.set_value(kernel)  # the case's layout
    if has_bias:
        base.bias.set_value(_jnp(case.bias, case.dtype))
    return layer, lora, base, prefix


def layer_forward_backward(case: LayerCase) -> dict[str, np.ndarray]:
    refuse_unsupported(case, capabilities, name)
    x, dy = _jnp(case.x, case.dtype), _jnp(case.dy, case.dtype)
    import jax.numpy as jnp
    from flax import nnx

    layer, lora, _, prefix = _lora_layer(case)
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


INIT_LAW = "he_uniform"  # conformance.init_laws: nnx.LoRA's default a_initializer / b_initializer


def layer_init(case: LayerInitCase) -> dict[str, np.ndarray]:
    """[layer_init_methods: he_uniform] NNX's own LoRA init (``nnx.Rngs(case.seed)``): ``lora_a`` (in, r) by
    ``default_a_initializer = initializers.he_uniform()`` (U(±√(6/fan_in)), fan_in = in), ``lora_b`` (r, out) by
    ``initializers.zeros``. Returns ``lora_A`` (r, in), ``lora_B`` (out, r), ``y`` (the forward at init),
    ``weight`` (the base kernel, the case's layout)."""
    if case.init != INIT_LAW:
        raise NotSupported(f"{name}: init law {case.init!r}: {capabilities.notes['layer_init_methods']}")
    if case.use_dora or case.use_rslora or not math.isclose(case.scaling, 1.0, rel_tol=0, abs_tol=1e-15):
        raise NotSupported(f"{name}: {capabilities.notes['layer_dora' if case.use_dora else 'lora_alpha']}")
    layer, lora, base, _ = _lora_layer(case)
    return {"lora_A": _np(lora.lora_a.get_value()).T, "lora_B": _np(lora.lora_b.get_value()).T,
            "y": _np(layer(_jnp(case.x, case.dtype))), "weight": _np(base.kernel.get_value())}  # fmt: skip


def layer_merge(case: LayerCase) -> dict[str, np.ndarray]:
    raise NotSupported(f"{name}: {capabilities.notes['merge']}")


def model_forward_backward(case: ModelCase) -> dict:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def save_adapter(case: ModelCase, folder: Path) -> None:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")


def load_adapter_logits(case: ModelCase, folder: Path) -> np.ndarray:
    raise NotSupported(f"{name}: {capabilities.notes['model_level']}")
