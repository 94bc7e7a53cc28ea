"""Seeded random weights: a GPT-2 base, LoRA adapters, dropout masks and token batches.

Everything is drawn with NumPy's ``Generator(PCG64(seed))`` in float64 and then cast, so a seed gives the
same numbers on every machine and backend. The base is not HF's init: biases and LayerNorm parameters are
random too, so that a mistake in any of them shows.
"""

from __future__ import annotations

import numpy as np

from reflora.config import GPT2Config
from reflora.lora_init import draw_base_like, draw_embedding_factors, draw_lora_bias, draw_lora_factors
from reflora.targets import EMBEDDING_KIND, LoraModule, base_shapes, dropout_plan

LORA_INITS = ("test", True, False, "gaussian")


def init_gpt2_params(config: GPT2Config, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """Every base tensor under its HF key: weights N(0, 0.02²) (HF's ``initializer_range``), LayerNorm
    weights 1 + N(0, 0.1²), all biases N(0, 0.02²)."""
    return {key: draw_base_like(key, shape, rng).astype(dtype) for key, shape in base_shapes(config).items()}


def init_lora_adapter(
    plan: dict[str, LoraModule], rng: np.random.Generator, init: bool | str = "test", dtype=np.float64
) -> dict[str, np.ndarray]:
    """LoRA tensors under PEFT keys, A: (r, in), B: (out, r).

    ``init``:
      * ``"test"`` (reflora's, for fixtures): A ~ U(±1/√in) and B ~ U(±1/√r): B is never zero, so a
        transposed, missing or mis-scaled delta cannot hide.
      * ``True`` (PEFT's default): A ~ U(±1/√in) (kaiming-uniform with a = √5), B = 0.
      * ``"gaussian"``: A ~ N(0, (1/r)²), B = 0.
      * On ``wte`` (PEFT's Embedding) ``True`` and ``False`` are ``draw_embedding_factors``'.
      * Trainable tokens (``trainable_tokens_delta``): ``"test"`` draws the new rows ~ N(0, 1); PEFT's start
        (the base rows) needs the weights: reflora.lora_init.init_adapter.
      * ``False``: A ~ U(±1/√in), B ~ U(±1/√r) (``nn.Linear``'s own init), the same law as ``"test"``.
      * ``modules_to_save`` copies: ``"test"`` draws each as ``init_gpt2_params`` draws a base tensor (so a copy
        differs from its original); PEFT's start (a copy of the base module) is reflora.lora_init.init_adapter's.
    """
    if init not in LORA_INITS:
        raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")
    adapter = {}
    for module in plan.values():  # the order of adapter_shapes: per branch A, B, then b_B
        if module.saved is not None:  # modules_to_save: "test" draws the copy afresh, as init_gpt2_params draws
            if init != "test":  # a base (PEFT copies the module: reflora.lora_init.init_adapter)
                raise ValueError(f"{module.name}: PEFT's modules_to_save copy starts as the base module, which this "
                                 "weight-free init does not have; use reflora.lora_init.init_adapter")  # fmt: skip
            for key, hf_key, shape in module.saved:
                if key not in adapter:  # a tied head shares wte's copy
                    adapter[key] = draw_base_like(hf_key, shape, rng).astype(dtype)
            continue
        if module.tokens_key is not None:  # trainable tokens: the new rows (PEFT's True starts them at W's rows)
            if init is True:
                raise ValueError(f"{module.tokens_key}: PEFT starts the new rows at the base rows of wte, which this "
                                 "weight-free init does not have; use reflora.lora_init.init_adapter")  # fmt: skip
            adapter[module.tokens_key] = rng.standard_normal((len(module.token_indices), module.out_features)).astype(
                dtype
            )
            continue
        if module.magnitude_key is not None:
            raise ValueError(
                f"{module.magnitude_key}: DoRA's magnitude starts at the row norms of the base weight, which this "
                "weight-free init does not have; use reflora.lora_init.init_adapter(params, config, lora, rng)"
            )
        for branch in module.branches:
            n_out = branch.out_stop - branch.out_start
            if module.kind == EMBEDDING_KIND and init in (True, False):
                A, B = draw_embedding_factors(init, module.r, module.in_features, n_out, rng)
            else:
                A, B = draw_lora_factors(init, module.r, module.in_features, n_out, rng)
            adapter[branch.a_key], adapter[branch.b_key] = A.astype(dtype), B.astype(dtype)
            if branch.bias_key is not None:
                adapter[branch.bias_key] = draw_lora_bias(init, module.r, n_out, rng).astype(dtype)
    return adapter


def draw_dropout_masks(
    plan: dict[str, LoraModule], p: float, batch: int, seq_len: int, rng: np.random.Generator, dtype=np.float64
) -> dict[str, np.ndarray]:
    """One keep-mask per targeted module, (B, T, in) of 0/1, each entry kept with probability 1 − p."""
    return {
        name: (rng.random((batch, seq_len, module.in_features)) >= p).astype(dtype)
        for name, module in dropout_plan(plan).items()
    }
