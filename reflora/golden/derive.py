"""The derivation: every input of a case drawn from its seed, and the reference's outputs.

    spec ──load_spec──> filled spec ──draw_case──> inputs ──compute_outputs──> logits, loss, grads
                                                        └─────────── generate_case ───────────┘

``draw_case``'s docstring is the draw order; ``compute_outputs`` calls the reference (``reflora.model``,
``reflora.merge``, ``reflora.weighted``) and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflora._version import __version__
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.golden.spec import (
    DARE_MASK_PREFIX,
    DEFAULT_ADAPTER,
    FORMAT,
    FULL_GRADIENT_PREFIX,
    adapter_configs,
    adapter_prefix,
    dare_mask_layout,
    dropout_masks_drawn,
    dropout_prefix,
    fixture_layout,
    grad_name,
    gradient_keys,
    load_spec,
    merged_keys,
    scale_multiplier,
    spec_configs,
    stored_spec_json,
)
from reflora.init import draw_dropout_masks, init_gpt2_params
from reflora.lora_init import init_adapter
from reflora.merge import merge_and_unload
from reflora.model import gpt2_backward, gpt2_forward, gpt2_loss_and_grads
from reflora.ops.crossentropy import IGNORE_INDEX
from reflora.scaling import scaled_lora
from reflora.targets import plan_lora
from reflora.weighted import add_weighted_adapter, draw_dare_masks

RANDOM_PADDING_P = 0.5  # padding="random": each position (but the last of a row) is padding with this probability


def draw_case(spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every input tensor of a filled spec, drawn from ``Generator(PCG64(seed))`` in this order:

    1. base: ``init_gpt2_params`` (every base tensor, ``base_shapes`` order)
    2. adapter (if lora): ``init_adapter(params, config, lora, rng, init="test")``: the trainable-token rows
       ~ N(0, 1); per LoRA module in model order, per branch A, B (never zero), b_B (``lora_bias``), then DoRA's
       m = ‖Wᵀ + s·B A‖ ⊙ U(0.5, 1.5); then each modules_to_save copy in model order, drawn as its base tensor
       (``draw_base_like``; a tied ``lm_head`` shares wte's copy and draws nothing); under
       ``adapter_init="peft"`` ``lora.init_lora_weights`` instead (PiSSA/OLoRA: base/ becomes the residual,
       original/base/ keeps the weights before). Then each extra adapter (``adapters``), sorted by name
    3. input_ids: ``rng.integers(0, vocab_size, (B, T))``
    4. attention_mask: ones, then padding "left"/"right": ``n_pad = rng.integers(1, T, B)`` pads per row, at
       its start/end; "random": ``rng.random((B, T)) < 0.5`` is padding, the last position of a row never is
    5. position_ids: "from_mask": HF generate's ``cumsum(mask) − 1`` with 1 at padding (no draw);
       "random": ``rng.integers(0, n_positions, (B, T))``
    6. labels (objective "loss"): input_ids, −100 where the mask is 0 (``ignore_padding_labels``), then −100
       where ``rng.random((B, T)) < ignore_label_fraction`` (drawn only when the fraction is > 0)
    7. dropout masks (lora_dropout > 0 and dropout "train"): ``draw_dropout_masks(plan, p, B, T, rng)``, the
       first adapter's, then each extra adapter's (its own p), sorted by name
    8. dlogits (objective "dlogits"): ``rng.standard_normal((B, T, V))``
    9. ``zero_norm_rows`` (no draw): each entry's output row of ``base/<module>.weight`` and of its lora_B set
       to 0 (the DoRA magnitude keeps its drawn value)
    10. DARE keep-masks (``weighted`` of a ``dare_*`` type, density < 1): ``rng.random(shape) < density`` for
       each ``dare_mask/<key>/<i>`` in ``dare_mask_layout`` order (``reflora.weighted.draw_dare_masks``)

    Values are drawn in float64 and cast to ``spec["dtype"]``.
    """
    config, lora = spec_configs(spec)
    dtype = np.dtype(spec["dtype"])
    b, t = spec["batch_size"], spec["seq_len"]
    rng = np.random.Generator(np.random.PCG64(spec["seed"]))
    tensors: dict[str, np.ndarray] = {}
    params = init_gpt2_params(config, rng, np.float64)
    tensors.update({f"base/{k}": v.astype(dtype) for k, v in params.items()})
    loras = adapter_configs(spec)
    if lora is not None:
        init = "test" if spec["adapter_init"] == "test" else lora.init_lora_weights
        adapter, used = init_adapter(params, config, lora, rng, init=init)
        for key in fixture_layout(spec):
            if key.startswith("original/base/"):
                tensors[key] = tensors[key.removeprefix("original/")]
                tensors[key.removeprefix("original/")] = used[key.removeprefix("original/base/")].astype(dtype)
        tensors.update({f"adapter/{k}": v.astype(dtype) for k, v in adapter.items()})
        for name, extra in loras.items():
            if name != DEFAULT_ADAPTER:
                extra_tensors, _ = init_adapter(params, config, extra, rng, init="test")
                tensors.update({f"{adapter_prefix(name)}{k}": v.astype(dtype) for k, v in extra_tensors.items()})
    input_ids = rng.integers(0, config.vocab_size, size=(b, t), dtype=np.int64)  # (B, T)
    mask = np.ones((b, t), dtype=np.int64)  # (B, T)
    if spec["padding"] in ("left", "right"):
        n_pad = rng.integers(1, t, size=b)  # (B,) in [1, T−1]: every row has a pad and a real token
        for row, k in enumerate(n_pad):
            if spec["padding"] == "left":
                mask[row, :k] = 0
            else:
                mask[row, t - k :] = 0
    elif spec["padding"] == "random":
        mask[rng.random((b, t)) < RANDOM_PADDING_P] = 0
        mask[:, -1] = 1
    tensors["input_ids"], tensors["attention_mask"] = input_ids, mask
    if spec["position_ids"] == "from_mask":
        positions = np.cumsum(mask, axis=1) - 1  # (B, T)
        positions[mask == 0] = 1
        tensors["position_ids"] = positions.astype(np.int64)
    elif spec["position_ids"] == "random":
        tensors["position_ids"] = rng.integers(0, config.n_positions, size=(b, t), dtype=np.int64)
    if spec["objective"] == "loss":
        labels = input_ids.copy()  # (B, T)
        if spec["ignore_padding_labels"]:
            labels[mask == 0] = IGNORE_INDEX
        if spec["ignore_label_fraction"] > 0:
            labels[rng.random((b, t)) < spec["ignore_label_fraction"]] = IGNORE_INDEX
        if not np.any(labels[:, 1:] != IGNORE_INDEX):
            raise ConfigError(
                f"with seed={spec['seed']}, every label after the causal shift is ignored (padding / "
                "ignore_padding_labels / ignore_label_fraction): the loss is undefined; change spec.seed"
            )
        tensors["labels"] = labels
    for name, adapter_lora in loras.items():
        if dropout_masks_drawn(spec, adapter_lora):
            plan = plan_lora(config, adapter_lora)
            masks = draw_dropout_masks(plan, adapter_lora.lora_dropout, b, t, rng, np.float64)
            tensors.update({f"{dropout_prefix(name)}{m}": v.astype(dtype) for m, v in masks.items()})
    if spec["objective"] == "dlogits":
        tensors["dlogits"] = rng.standard_normal((b, t, config.vocab_size)).astype(dtype)
    for entry in spec.get("zero_norm_rows", []):  # 9. no draw: row o of W (a Conv1D column) and of lora_B zeroed
        (branch,) = plan_lora(config, lora)[entry["module"]].branches
        tensors[f"base/{entry['module']}.weight"][:, entry["row"]] = 0
        tensors[f"adapter/{branch.b_key}"][entry["row"], :] = 0
    layout = dare_mask_layout(spec)  # 10. last, so that every draw above is unchanged
    if layout:
        masks = draw_dare_masks({name: [shape] for name, shape in layout.items()}, spec["weighted"]["density"], rng)
        tensors.update({name: group[0].astype(dtype) for name, group in masks.items()})
    return tensors


@dataclass(frozen=True)
class GoldenCase:
    """A fixture unpacked into what a replay needs, under reflora's names (see ``unpack_fixture``).

    ``grads`` maps reflora keys (PEFT adapter keys, HF base keys) to the stored gradients; ``loss``, ``labels``
    are None for objective "dlogits", ``dlogits`` is None for objective "loss".
    """

    spec: dict[str, Any]
    config: GPT2Config
    lora: LoraConfig | None
    params: dict[str, np.ndarray]  # HF key -> base tensor
    adapter: dict[str, np.ndarray] | None  # PEFT key -> LoRA tensor
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64 of 0/1
    position_ids: np.ndarray | None  # (B, T) int64, or None: arange(T)
    labels: np.ndarray | None  # (B, T) int64, -100 ignored
    dlogits: np.ndarray | None  # (B, T, V)
    dropout_masks: dict[str, np.ndarray] | None  # module name -> (B, T, in) keep-mask, or None: no dropout
    wrt: list[str]  # gradient keys, in file order
    logits: np.ndarray | None = None  # (B, T, V)
    loss: np.ndarray | None = None  # 0-d
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    # several adapters (spec "adapters", "adapter_names"): the others, by name, and their dropout masks
    extra_adapters: dict[str, tuple[LoraConfig, dict[str, np.ndarray]]] = field(default_factory=dict)
    extra_dropout_masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    adapter_names: list[str] | None = None  # one per sample, "__base__" for none; None: every adapter active
    original_params: dict[str, np.ndarray] = field(default_factory=dict)  # PiSSA/OLoRA: weights before the init
    derived: dict[str, np.ndarray] = field(default_factory=dict)  # the stored merged/... and weighted/... tensors
    dare_masks: dict[str, list[np.ndarray]] | None = None  # DARE keep-masks: mask key -> one per source

    @property
    def multi(self) -> bool:
        """reflora's several-adapters mode (gradient keys ``"<name>:<PEFT key>"``)."""
        return bool(self.extra_adapters) or self.adapter_names is not None

    def all_adapters(self) -> dict[str, tuple[LoraConfig, dict[str, np.ndarray]]]:
        """``{"default": (lora, adapter), <name>: (lora, tensors), ...}`` (``gpt2_forward(adapters=...)``)."""
        if self.lora is None:
            return {}
        return {DEFAULT_ADAPTER: (self.lora, self.adapter), **self.extra_adapters}

    def forward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``reflora.gpt2_forward`` (and ``peft_bridge.run_peft``) for this case; with
        several adapters (``multi``), those of the ``adapters=`` mode (``peft_bridge.run_peft_adapters``)."""
        if self.multi:
            masks = {DEFAULT_ADAPTER: self.dropout_masks} if self.dropout_masks else {}
            masks.update(self.extra_dropout_masks)
            return {
                "attention_mask": self.attention_mask,
                "position_ids": self.position_ids,
                "adapters": self.all_adapters(),
                "adapter_names": self.adapter_names,
                "dropout_masks": masks or None,
            }
        multiplier = scale_multiplier(self.spec)  # spec.scale_ops: every module's scaling times m
        return {
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "adapter": self.adapter,
            "lora": self.lora if self.lora is None or multiplier == 1 else scaled_lora(self.lora, multiplier),
            "dropout_masks": self.dropout_masks,
        }


def unpack_fixture(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> GoldenCase:
    """Split a fixture's flat tensor dict (``read_fixture``) into a ``GoldenCase``. Outputs are optional, so
    this also unpacks the inputs alone (``draw_case``)."""
    config, lora = spec_configs(spec)

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    loras = adapter_configs(spec)
    extras = [n for n in loras if n != DEFAULT_ADAPTER]

    def own(prefix: str) -> dict[str, np.ndarray]:  # the default adapter's: no "<name>/" after the prefix
        return {k: v for k, v in group(prefix).items() if not any(k.startswith(f"{n}/") for n in extras)}

    wrt = gradient_keys(spec)
    grads = {key: tensors[grad_name(key)] for key in wrt if grad_name(key) in tensors}
    return GoldenCase(
        spec=dict(spec), config=config, lora=lora, params=group("base/"),
        adapter=own("adapter/") if lora is not None else None,
        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
        position_ids=tensors.get("position_ids"), labels=tensors.get("labels"), dlogits=tensors.get("dlogits"),
        dropout_masks=own("dropout/") or None, wrt=wrt,
        logits=tensors.get("logits"), loss=tensors.get("loss"), grads=grads,
        extra_adapters={n: (loras[n], group(f"{adapter_prefix(n)}")) for n in extras},
        extra_dropout_masks={n: group(dropout_prefix(n)) for n in extras if group(dropout_prefix(n))},
        adapter_names=spec["adapter_names"], original_params=group("original/base/"),
        derived={k: v for k, v in tensors.items() if k.startswith(("merged/", "weighted/", FULL_GRADIENT_PREFIX))},
        dare_masks=_dare_masks(spec, tensors),
    )  # fmt: skip


def _dare_masks(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]] | None:
    """The ``dare_mask/<key>/<i>`` tensors grouped as ``add_weighted_adapter``'s ``keep_masks``, or None."""
    masks: dict[str, list[np.ndarray]] = {}
    for name in dare_mask_layout(spec):
        key = name.removeprefix(DARE_MASK_PREFIX).rsplit("/", 1)[0]
        masks.setdefault(key, []).append(tensors[name])
    return masks or None


def compute_outputs(case: GoldenCase) -> dict[str, np.ndarray]:
    """logits, loss (objective "loss") and ``grad/<group>/<key>`` for every gradient key, by the reference."""
    if case.labels is not None:
        loss, logits, grads = gpt2_loss_and_grads(
            case.params, case.config, case.input_ids, case.labels, wrt=case.wrt, **case.forward_kwargs()
        )
        out = {"logits": logits, "loss": np.asarray(loss)}
    else:
        logits, cache = gpt2_forward(case.params, case.config, case.input_ids, **case.forward_kwargs())
        grads = gpt2_backward(case.dlogits, cache, case.wrt)
        out = {"logits": logits}
    out.update({grad_name(key): grads[key] for key in case.wrt})
    if case.spec["dora_full_gradient"]:
        kwargs = {**case.forward_kwargs(), "dora_norm_gradient": "full"}
        if case.labels is not None:
            full = gpt2_loss_and_grads(case.params, case.config, case.input_ids, case.labels, wrt=case.wrt, **kwargs)[2]
        else:
            full = gpt2_backward(case.dlogits, gpt2_forward(case.params, case.config, case.input_ids, **kwargs)[1],
                                 case.wrt)  # fmt: skip
        out.update({FULL_GRADIENT_PREFIX + grad_name(key).removeprefix("grad/"): full[key] for key in case.wrt})
    plain = {"attention_mask": case.attention_mask, "position_ids": case.position_ids}
    if case.spec["merge"]:
        merged = merge_and_unload(case.params, case.config, adapters=case.all_adapters())
        out.update({f"merged/base/{k}": merged[k] for k in merged_keys(case.spec)})
        out["merged/logits"] = gpt2_forward(merged, case.config, case.input_ids, **plain)[0]
    weighted = case.spec["weighted"]
    if weighted is not None:
        combined, tensors = add_weighted_adapter(
            case.config, case.all_adapters(), weighted["adapters"], weighted["weights"],
            weighted["combination_type"], weighted["svd_rank"], weighted.get("density"),
            weighted.get("majority_sign_method", "total"), keep_masks=case.dare_masks,
        )  # fmt: skip
        out.update({f"weighted/{k}": v for k, v in tensors.items()})
        out["weighted/r"] = np.asarray(combined.r, dtype=np.int64)
        out["weighted/lora_alpha"] = np.asarray(combined.lora_alpha, dtype=np.float64)
        out["weighted/logits"] = gpt2_forward(
            case.params, case.config, case.input_ids, adapter=tensors, lora=combined, **plain
        )[0]
    return out


def generate_case(spec: Mapping[str, Any] | str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of one fixture: the spec's inputs and the reference's outputs, plus the
    ``__metadata__`` (format, filled spec, versions). Nothing is written."""
    spec = load_spec(spec)
    tensors = draw_case(spec)
    tensors.update(compute_outputs(unpack_fixture(spec, tensors)))
    layout = fixture_layout(spec)
    tensors = {name: np.asarray(tensors[name], dtype=dtype, order="C") for name, (_, dtype) in layout.items()}
    metadata = {
        "format": FORMAT,
        "spec": stored_spec_json(spec),
        "reflora_version": __version__,
        "numpy_version": np.__version__,
    }
    return tensors, metadata
