"""The whole model's backward against central finite differences, in float64, for every parameter kind.

Objective: the model's shifted cross-entropy loss (so the loss, the tied head, every block, the residuals and
both embeddings are on the path), or ``Σ dlogits ⊙ logits`` for a random ``dlogits``. Every element of every
tensor is checked: LoRA A and B (full-matrix, rank-patterned and per-slice), every base weight and bias kind,
the LayerNorms, ``wte`` (tied: the head and the embedding together), ``wpe`` and ``inputs_embeds``. Then a
larger config is checked along random directions: ⟨grad, dir⟩ against (f(p + h·dir) − f(p − h·dir)) / 2h.

The weights are drawn larger than GPT-2's (std 0.3 instead of 0.02) so that every layer is clearly
non-linear and no gradient is negligible. The difference is the fourth-order central stencil

    f'(x) ≈ (8·(f(x+h) − f(x−h)) − (f(x+2h) − f(x−2h))) / 12h        (error O(h⁴) + O(ε·|f|/h))

with h = 1e-4: the plain two-point stencil cannot get below ~1e-8 relative on the small gradients of a deep
model (its O(h²) truncation and O(ε/h) rounding cross there), while this one reaches ~1e-10. Measured worst
relative error (per tensor, relative to its largest entry): 6e-10 elementwise, 3e-11 directional; the
tolerances are 1e-8, so a gradient off by a factor 1 + 1e-7 already fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import reflora as rf
import reflora.backend
from reflora.ops import cross_entropy_forward

H = 1e-4
RTOL_ELEMENTWISE = 1e-8
RTOL_DIRECTIONAL = 1e-8

TINY = rf.GPT2Config(vocab_size=11, n_positions=7, n_embd=6, n_layer=2, n_head=3, n_inner=10)


@dataclass
class ModelCase:
    config: rf.GPT2Config
    params: dict
    lora: rf.LoraConfig | None
    adapter: dict | None
    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray | None
    position_ids: np.ndarray | None
    dropout_masks: dict | None
    dlogits: np.ndarray | None  # None: the objective is the loss

    def forward_kwargs(self) -> dict:
        return {
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "adapter": self.adapter,
            "lora": self.lora,
            "dropout_masks": self.dropout_masks,
        }

    def objective(self, inputs_embeds: np.ndarray | None = None) -> float:
        if inputs_embeds is None:
            logits, _ = rf.gpt2_forward(self.params, self.config, self.input_ids, **self.forward_kwargs())
        else:
            logits, _ = rf.gpt2_forward(self.params, self.config, inputs_embeds=inputs_embeds, **self.forward_kwargs())
        if self.dlogits is not None:
            return float(np.sum(self.dlogits * logits))
        return float(cross_entropy_forward(logits, self.labels)[0])

    def gradients(self, wrt: list[str]) -> dict:
        if self.dlogits is None:
            _, _, grads = rf.gpt2_loss_and_grads(
                self.params, self.config, self.input_ids, self.labels, wrt=wrt, **self.forward_kwargs()
            )
            return grads
        _, cache = rf.gpt2_forward(self.params, self.config, self.input_ids, **self.forward_kwargs())
        return rf.gpt2_backward(self.dlogits, cache, wrt)

    def tensor(self, key: str) -> np.ndarray:
        return self.adapter[key] if key.startswith("base_model.") else self.params[key]


def make_case(
    config: rf.GPT2Config,
    lora: rf.LoraConfig | None,
    *,
    seed: int,
    batch: int = 3,
    seq_len: int = 5,
    padding: bool = True,
    position_ids: str | None = None,
    objective: str = "loss",
    weight_std: float = 0.3,
) -> ModelCase:
    rng = np.random.default_rng(seed)
    params = rf.init_gpt2_params(config, rng)
    for key, value in params.items():
        if not (".ln_" in key and key.endswith(".weight")):
            value *= weight_std / 0.02
    adapter = masks = None
    if lora is not None:
        plan = rf.plan_lora(config, lora)
        adapter = rf.init_lora_adapter(plan, rng)
        if lora.lora_dropout > 0:
            masks = rf.draw_dropout_masks(plan, lora.lora_dropout, batch, seq_len, rng)
    input_ids = rng.integers(0, config.vocab_size, (batch, seq_len))
    attention_mask = None
    labels = input_ids.copy()
    if padding:
        attention_mask = np.ones((batch, seq_len), dtype=np.int64)
        attention_mask[0, :2] = 0  # left padding: the first two queries see no key
        attention_mask[-1, -1] = 0  # right padding
        labels[attention_mask == 0] = -100
    labels[1, 2] = -100  # an ignored label inside a sequence
    pos = None
    if position_ids == "per_row":  # HF's left-padding positions: cumsum(mask) − 1, clipped at 0
        pos = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    elif position_ids == "shared":  # (1, T), shifted: every row starts at position 1
        pos = np.arange(1, seq_len + 1)[None, :]
    dlogits = rng.standard_normal((batch, seq_len, config.vocab_size)) if objective == "dlogits" else None
    return ModelCase(config, params, lora, adapter, input_ids, labels, attention_mask, pos, masks, dlogits)


def central_difference(f, x: np.ndarray, direction: np.ndarray, h: float = H) -> float:
    """The fourth-order central difference of ``f()`` at ``x`` along ``direction`` (``x`` is moved in place
    and restored)."""
    original = x.copy()
    values = []
    for step in (h, -h, 2 * h, -2 * h):
        x[...] = original + step * direction
        values.append(f())
    x[...] = original
    return (8 * (values[0] - values[1]) - (values[2] - values[3])) / (12 * h)


def numerical_gradient(f, x: np.ndarray, h: float = H) -> np.ndarray:
    """The central difference of ``f()`` along every unit vector of ``x``."""
    grad = np.zeros_like(x)
    unit = np.zeros_like(x)
    for i in range(x.size):
        unit.flat[i] = 1.0
        grad.flat[i] = central_difference(f, x, unit, h)
        unit.flat[i] = 0.0
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    scale = float(np.max(np.abs(numeric)))
    assert scale > 0, "the finite-difference gradient is zero, so the check would prove nothing"
    return float(np.max(np.abs(analytic - numeric))) / scale


CASES = {
    # full-matrix LoRA on every Conv1D kind, a rank pattern, rsLoRA, dropout, bias='all', left/right padding,
    # HF's per-row position_ids; gradients of every base tensor too
    "lora_all_kinds": lambda: make_case(
        TINY,
        rf.LoraConfig(
            r=2,
            lora_alpha=3.0,
            target_modules=["c_attn", "c_proj", "c_fc"],
            rank_pattern={"c_fc": 3},
            use_rslora=True,
            lora_dropout=0.25,
            bias="all",
        ),
        seed=10,
        position_ids="per_row",
    ),
    # per-slice q/v LoRA on c_attn plus a rank-patterned mlp.c_proj, (1, T) position_ids, random dlogits
    "per_slice_dlogits": lambda: make_case(
        TINY,
        rf.LoraConfig(
            r=2,
            lora_alpha=5.0,
            target_modules=["c_attn", "mlp.c_proj"],
            qkv_slices=["q", "v"],
            lora_dropout=0.5,
            rank_pattern={"mlp.c_proj": 1},
        ),
        seed=11,
        position_ids="shared",
        objective="dlogits",
    ),
    "per_slice_qkv": lambda: make_case(
        TINY, rf.LoraConfig(r=1, lora_alpha=2.0, target_modules=["c_attn"], qkv_slices=["q", "k", "v"]), seed=12
    ),
    # no LoRA: full fine-tuning gradients, no padding
    "no_lora": lambda: make_case(TINY, None, seed=13, padding=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_gradient_matches_finite_differences(name):
    case = CASES[name]()
    adapter_keys = list(case.adapter) if case.adapter is not None else []
    wrt = adapter_keys + list(rf.base_shapes(case.config)) + ["inputs_embeds"]
    grads = case.gradients(wrt)
    assert set(grads) == set(wrt)
    errors = {}
    for key in wrt:
        if key == "inputs_embeds":
            embeds = np.ascontiguousarray(case.params["transformer.wte.weight"][case.input_ids])
            numeric = numerical_gradient(lambda embeds=embeds: case.objective(embeds), embeds)
        else:
            numeric = numerical_gradient(case.objective, case.tensor(key))
        assert grads[key].shape == numeric.shape, key
        errors[key] = relative_error(grads[key], numeric)
    worst = max(errors, key=errors.get)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if e > RTOL_ELEMENTWISE}
    assert not bad, f"gradients off (relative error > {RTOL_ELEMENTWISE:.0e}): {bad}"
    assert errors[worst] <= RTOL_ELEMENTWISE


def test_gradients_with_inputs_embeds_as_the_input():
    """Forward from ``inputs_embeds`` (no ids): its gradient, and every other one, match finite differences."""
    case = CASES["lora_all_kinds"]()
    embeds = np.ascontiguousarray(case.params["transformer.wte.weight"][case.input_ids])
    kwargs = case.forward_kwargs()
    wrt = ["inputs_embeds", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", *list(case.adapter)[:2]]
    _, _, grads = rf.gpt2_loss_and_grads(
        case.params, case.config, None, case.labels, wrt=wrt, inputs_embeds=embeds, **kwargs
    )
    f = lambda: case.objective(embeds)  # noqa: E731
    for key in wrt:
        numeric = numerical_gradient(f, embeds if key == "inputs_embeds" else case.tensor(key))
        assert relative_error(grads[key], numeric) <= RTOL_ELEMENTWISE, key


@pytest.mark.parametrize("name", ["lora_all_kinds", "per_slice_dlogits"])
def test_partial_wrt_gives_the_same_gradients(name):
    """Asking for one key stops backpropagation early; the answer must not change."""
    case = CASES[name]()
    wrt = list(case.adapter) + list(rf.base_shapes(case.config)) + ["inputs_embeds"]
    full = case.gradients(wrt)
    for key in wrt:
        alone = case.gradients([key])
        assert list(alone) == [key]
        np.testing.assert_allclose(
            alone[key], full[key], rtol=1e-14, atol=1e-15 * np.max(np.abs(full[key])), err_msg=key
        )


@pytest.mark.parametrize("name", ["lora_all_kinds", "per_slice_dlogits"])
def test_row_blocks_do_not_change_the_results(name, monkeypatch):
    """The elementwise ops run over ``reflora.backend.row_blocks``; one row per block must give the same numbers."""
    case = CASES[name]()
    wrt = list(case.adapter) + list(rf.base_shapes(case.config)) + ["inputs_embeds"]
    whole = case.gradients(wrt)
    monkeypatch.setattr(reflora.backend, "BLOCK_BYTES", 1, raising=False)
    blocked = case.gradients(wrt)
    for key in wrt:
        np.testing.assert_allclose(
            blocked[key], whole[key], rtol=1e-13, atol=1e-14 * np.max(np.abs(whole[key])), err_msg=key
        )


def test_directional_derivatives_on_a_larger_model():
    """n_embd 20, 5 heads, 3 layers, T 9: ⟨grad, dir⟩ against a central difference along 3 random directions."""
    config = rf.GPT2Config(vocab_size=29, n_positions=12, n_embd=20, n_layer=3, n_head=5, n_inner=28)
    lora = rf.LoraConfig(r=3, lora_alpha=7.0, target_modules=".*\\.h\\.[02]\\.(attn\\.c_attn|mlp\\.c_fc|mlp\\.c_proj)",
                         lora_dropout=0.2, bias="lora_only", alpha_pattern={"c_fc": 2.0})  # fmt: skip
    case = make_case(config, lora, seed=14, batch=2, seq_len=9, position_ids="per_row", weight_std=0.15)
    wrt = list(case.adapter) + list(rf.base_shapes(config)) + ["inputs_embeds"]
    grads = case.gradients(wrt)
    rng = np.random.default_rng(15)
    embeds = np.ascontiguousarray(case.params["transformer.wte.weight"][case.input_ids])
    for key in wrt:
        tensor = embeds if key == "inputs_embeds" else case.tensor(key)
        f = (lambda: case.objective(embeds)) if key == "inputs_embeds" else case.objective
        for _ in range(3):
            direction = rng.standard_normal(tensor.shape)
            numeric = central_difference(f, tensor, direction)
            analytic = float(np.sum(grads[key] * direction))
            scale = float(np.linalg.norm(grads[key]) * np.linalg.norm(direction))
            assert abs(analytic - numeric) <= RTOL_DIRECTIONAL * scale, (key, analytic, numeric)
