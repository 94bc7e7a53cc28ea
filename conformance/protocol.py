"""The driver protocol: the thin, documented surface through which the suite drives a candidate library.

A driver is any object with the attributes and methods of ``Driver`` below (a class instance or a module).
The suite hands it *cases* built from reference tensors (always NumPy float64, always in reflora's names and
layouts) and compares what it returns with the reference. The driver's whole job is translation: put the
reference weights into the library's objects, in the library's layout and dtype, run the library, and return
the results in reflora's names and layouts, converted to NumPy float64. A driver must never compute LoRA
itself, and never bend the library to look conformant: where a library needs something folded or emulated,
say so in ``Capabilities.notes``.

Names used in results:

* layer level: ``"y"`` (B, T, out), ``"dx"`` (B, T, in), ``"lora_A"`` (r, in), ``"lora_B"`` (out, r), or for
  per-slice q/k/v ``"lora_A.q"``, ``"lora_B.q"`` ..., ``"bias"`` (out,) when the bias is trainable,
  ``"weight"`` in the case's layout.
* model level: ``"logits"`` (B, T, V), ``"loss"`` (0-d) and gradients under reflora keys (PEFT adapter keys
  such as ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``; HF base keys for biases).

How the suite finds a driver (``--candidate``):

* ``NAME``: a driver shipped with reflora, the module ``conformance.drivers.NAME``. Its attribute ``driver``
  is used if it has one, else the module itself (a module can be a driver).
* ``package.module:object``: a driver the user wrote, importable with no change to reflora. ``object`` may
  be a driver instance, a module, a class or a function taking no arguments that returns a driver.

Optional attributes a driver may add (the suite uses them when present):

* ``deviations``: path of its expected-deviations JSON (default for shipped drivers:
  ``conformance/deviations/<name>.json``; see docs/conformance.md).
* ``model_switch_adapters(case)``: see ``Driver`` below; needs ``Capabilities.adapter_switching``.
* the layer-level optional methods ``layer_init`` [layer_init_methods] (a ``LayerInitCase``) and
  ``layer_adapters`` [layer_multi_adapter; layer_mixed_batch] (a ``LayerAdaptersCase``); see ``Driver``.
* the advanced methods (docs/advanced-semantics.md: merge at model level, DoRA, initialisations, several
  adapters, weighted combinations), each taking an ``AdaptersCase`` and needing the capability in brackets:
  ``model_adapters`` [multi_adapter; dora; mixed_batch], ``model_merge`` [model_merge], ``merge_and_unload``
  [merge_and_unload], ``init_adapter`` [init_methods], ``weighted_adapter`` [weighted_combinations]. Their
  signatures and results are on ``Driver`` below. A driver without one gets "not supported".

Every array a driver returns may be in any float dtype; the suite converts it to float64 itself. A driver runs
in a worker process by default (crash isolation), so it must not rely on state kept between calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from reflora.config import GPT2Config, LoraConfig
from reflora.targets import TOKENS_MODULE, base_shapes, plan_lora

LAYOUTS = ("linear", "conv1d")  # linear: W is (out, in), y = x Wᵀ; conv1d: W is (in, out), y = x W
DTYPES = ("float64", "float32", "bfloat16")
# dtypes a candidate may also declare, drawn only by the features that force them (``layer.float16.*``): never by
# the plain dtype draws, so that adding one changes no existing draw
EXTRA_DTYPES = ("float16",)
BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class Capabilities:
    """What a candidate can do. Every test checks the capability it needs first; a missing capability makes
    the test "not supported" (with the reason from ``notes``), never a pass."""

    layer_layouts: frozenset[str] = frozenset()  # subset of LAYOUTS; empty = no layer level
    model_level: bool = False  # can build GPT-2 (HF names) with LoRA and run it
    lora_alpha: bool = True  # takes lora_alpha and scales by alpha/r
    model_lora_alpha: bool = True  # model level too (False: scaling 1 there, e.g. keras-hub's enable_lora(rank))
    rslora: bool = False  # alpha/sqrt(r)
    dropout_mask_injection: bool = False  # the reference's keep-mask can be put into the library's dropout
    bias_modes: frozenset[str] = frozenset({"none"})
    per_slice_qkv: bool = False  # independent LoRA on chosen q/k/v slices of a fused projection
    dtypes: frozenset[str] = frozenset({"float64"})  # subset of DTYPES + EXTRA_DTYPES
    target_modules_list: bool = False  # model level: PEFT's suffix-matching list
    target_modules_regex: bool = False  # model level: PEFT's fullmatch regex
    layers_to_transform: bool = False
    rank_alpha_pattern: bool = False
    target_modules_all_linear: bool = False  # model level: PEFT's target_modules="all-linear" (lm_head left out)
    exclude_modules: bool = False  # model level: PEFT's exclude_modules, a list (suffix) or a regex (fullmatch)
    runtime_scaling: bool = False  # model level: ModelCase.scale_ops (PEFT's set_scale / scale_layer / unscale_layer)
    embedding_lora: bool = False  # model level: LoRA on wte (PEFT lora.Embedding, lora_embedding_A/B, no dropout)
    trainable_tokens: bool = False  # model level: trainable_token_indices (new wte rows, used by the tied head too)
    modules_to_save: bool = False  # model level: modules_to_save (trainable copies; wte's leaves the head on W)
    ensure_weight_tying: bool = False  # model level: modules_to_save + ensure_weight_tying: one wte copy, head tied
    position_ids: bool = False
    padding: bool = False  # attention_mask with padding
    merge: bool = False  # layer level: merge W + s·BA (layer_merge's merged_weight, merged_y)
    # with merge: unmerge restores W (layer_merge's unmerged_weight; model_merge's "unmerged"); False for merge-only
    # libraries, at both levels: layer_merge returns merged_weight / merged_y only, model_merge may omit "unmerged"
    unmerge: bool = True
    # opt-in (issue 15): layer_merge with case.qkv_slices, each slice's s·B A in its own output rows (the
    # layer.merge_qkv_slices / layer.unmerge_qkv_slices features); a driver declaring merge and per_slice_qkv only
    # is not asked for it
    merge_qkv_slices: bool = False
    adapter_files: bool = False  # model level: write/read PEFT-format adapter files
    adapter_switching: bool = False  # model level: hold two adapters and switch the active one
    # docs/advanced-semantics.md; the optional methods (on ``Driver`` below) take an ``AdaptersCase``
    model_merge: bool = False  # model_merge(case): merge every adapter into the model, unmerge, safe merge
    merge_and_unload: bool = False  # merge_and_unload(case, folder): a plain GPT-2 checkpoint (HF format)
    dora: bool = False  # DoRA adapters (use_dora) in model_adapters / model_merge / init_adapter
    lora_bias: bool = False  # LoraConfig(lora_bias=True): B has a bias
    layer_lora_bias: bool = False  # layer_forward_backward with case.lora_bias_B: returns lora_B_bias (its grad)
    layer_dora: bool = False  # layer_forward_backward with case.magnitude: detached-norm DoRA, returns magnitude
    layer_dora_full_norm: bool = False  # the same with case.dora_norm == "full": the norm is differentiated too
    # issue 15.1, layer level (docs/conformance.md, "Layer level"): optional methods on ``Driver`` below
    layer_dora_merge: bool = False  # layer_merge with case.magnitude: merged_weight = m ⊙ V/‖V‖_row, V = W + s·BA
    layer_init_methods: frozenset[str] = frozenset()  # layer_init(case): laws of conformance.init_laws.LAWS
    layer_multi_adapter: bool = False  # layer_adapters(case): several adapters on one layer, active set, disabled
    layer_mixed_batch: bool = False  # layer_adapters(case) with case.adapter_names (one adapter per batch row)
    init_methods: frozenset[str] = frozenset()  # init_adapter: true gaussian false pissa pissa_niter olora orthogonal
    multi_adapter: bool = False  # model_adapters(case): several adapters, an ordered active set, disabled
    mixed_batch: bool = False  # model_adapters(case) with one adapter name per row
    weighted_combinations: frozenset[str] = frozenset()  # weighted_adapter: cat linear svd ties ... dare_ties_svd
    notes: dict[str, str] = field(default_factory=dict)  # capability name -> why missing / how mapped


@dataclass
class LayerCase:
    """One LoRA layer, in reference terms. Arrays are NumPy float64; ``dtype`` is what the candidate runs in."""

    layout: str  # "linear" or "conv1d"
    x: np.ndarray  # (B, T, in)
    weight: np.ndarray  # (out, in) if linear, (in, out) if conv1d
    bias: np.ndarray | None  # (out,)
    lora_A: dict[str | None, np.ndarray]  # slice name (None = full matrix; "q"/"k"/"v") -> (r, in)
    lora_B: dict[str | None, np.ndarray]  # slice -> (out, r), or (out/3, r) for a q/k/v slice
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    keep_mask: np.ndarray | None  # (B, T, in) of 0/1, or None: eval mode, no dropout
    bias_trainable: bool  # bias mode "all" or "lora_only": the layer's bias is trained
    dy: np.ndarray  # (B, T, out): the upstream gradient; backward computes grads of Σ dy ⊙ y
    dtype: str = "float64"
    seed: int = 0
    # issue 15.1 (layer.lora_bias.* / layer.dora.*): optional, None in every other layer case
    lora_bias_B: np.ndarray | None = None  # (out,): lora_bias, the bias of B; branch s·(B A x + b_B)
    magnitude: np.ndarray | None = None  # (out,): DoRA magnitude m (one full-width branch, no dropout)
    dora_norm: str = "detached"  # DoRA's norm gradient: "detached" (PEFT's) or "full" (layer_dora_full_norm)

    @property
    def qkv_slices(self) -> tuple[str, ...] | None:
        names = [k for k in self.lora_A if k is not None]
        return tuple(names) if names else None

    @property
    def scaling(self) -> float:
        """The scaling s of every branch: ``reflora.config.LoraConfig.scaling`` (alpha/r, or alpha/√r under rsLoRA)."""
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora).scaling(
            self.r, self.lora_alpha
        )


@dataclass
class LayerInitCase:
    """One LoRA layer to initialise with the library's own init (``layer_init``; features ``layer.init.<law>.*``,
    ``layer.dora_init.*``). Arrays are NumPy float64; ``dtype`` is what the candidate runs in."""

    layout: str  # "linear" or "conv1d"
    x: np.ndarray  # (B, T, in)
    weight: np.ndarray  # (out, in) if linear, (in, out) if conv1d
    bias: np.ndarray | None  # (out,)
    r: int
    lora_alpha: float
    use_rslora: bool
    init: str  # a law name of conformance.init_laws.LAWS (one of Capabilities.layer_init_methods)
    use_dora: bool = False  # DoRA: the library also initialises the magnitude (returned as "magnitude")
    dtype: str = "float32"
    seed: int = 0  # seed the library's RNG with it

    @property
    def scaling(self) -> float:
        """s = alpha/r (alpha/√r under rsLoRA): ``reflora.config.LoraConfig.scaling``."""
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora).scaling(
            self.r, self.lora_alpha
        )


@dataclass
class LayerAdaptersCase:
    """Several named LoRA adapters on one layer (``layer_adapters``; features ``layer.adapters.*``). Arrays are
    NumPy float64; ``dtype`` is what the candidate runs in. Eval mode, no dropout, no bias training."""

    layout: str  # "linear" or "conv1d"
    x: np.ndarray  # (B, T, in)
    weight: np.ndarray  # (out, in) if linear, (in, out) if conv1d
    bias: np.ndarray | None  # (out,)
    dy: np.ndarray  # (B, T, out): the upstream gradient; backward computes grads of Σ dy ⊙ y
    # name -> {"lora_A": (r, in), "lora_B": (out, r), "r": int, "lora_alpha": float, "use_rslora": bool},
    # created in dict order
    adapters: dict[str, dict[str, Any]]
    active: list[str] | None = None  # applied to every row, in this order; [] = every adapter disabled
    adapter_names: list[str] | None = None  # one name per batch row, "__base__" = none [layer_mixed_batch]
    dtype: str = "float64"
    seed: int = 0

    def scaling(self, name: str) -> float:
        """Adapter ``name``'s s = alpha/r (alpha/√r under rsLoRA): ``reflora.config.LoraConfig.scaling``."""
        a = self.adapters[name]
        return LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], use_rslora=a["use_rslora"]).scaling(
            a["r"], a["lora_alpha"]
        )


@dataclass
class ModelCase:
    """A whole GPT-2 with LoRA, in reference terms (HF / PEFT names, Conv1D layout, float64 NumPy)."""

    config: GPT2Config
    lora: LoraConfig
    params: dict[str, np.ndarray]  # HF base keys
    adapter: dict[str, np.ndarray]  # PEFT adapter keys
    input_ids: np.ndarray  # (B, T) int64
    labels: np.ndarray | None  # (B, T) int64, -100 ignored; None: backward from dlogits
    attention_mask: np.ndarray | None = None  # (B, T) 0/1
    position_ids: np.ndarray | None = None  # (B, T)
    dropout_masks: dict[str, np.ndarray] | None = None  # module name -> (B, T, in) keep-mask; None: eval mode
    dlogits: np.ndarray | None = None  # (B, T, V) upstream gradient when labels is None
    dtype: str = "float64"
    seed: int = 0
    # adapter files with bias 'all' / 'lora_only' carry trained biases (HF keys); None: the base's own biases
    trained_biases: dict[str, np.ndarray] | None = None
    # adapter switching: a second adapter (its own config and tensors) the driver loads next to the first
    second_lora: LoraConfig | None = None
    second_adapter: dict[str, np.ndarray] | None = None
    # runtime scaling (reflora.scaling): ops applied, in order, to every LoRA layer before the forward pass, each
    # ("set_scale", adapter, c), ("scale_layer", c) or ("unscale_layer", c or None); () = none
    scale_ops: tuple[tuple, ...] = ()


COMBINED = "combined"  # the name of a weighted combination's new adapter (``weighted_adapter``)


@dataclass
class AdaptersCase:
    """GPT-2 with several named adapters, in reference terms (HF / PEFT names, float64 NumPy): the case of the
    advanced methods (``model_adapters``, ``model_merge``, ``merge_and_unload``, ``init_adapter``,
    ``weighted_adapter``; see ``Driver``)."""

    config: GPT2Config
    params: dict[str, np.ndarray]
    adapters: dict[str, tuple[LoraConfig, dict[str, np.ndarray]]]  # name -> (config, PEFT file key -> array)
    input_ids: np.ndarray  # (B, T)
    labels: np.ndarray | None = None  # (B, T)
    active: list[str] | None = None  # every row, in this order; [] = disabled
    adapter_names: list[str] | None = None  # one per row
    dropout_masks: dict[str, dict[str, np.ndarray]] | None = None  # adapter -> module -> (B, T, in)
    wrt: list[str] = dataclasses.field(default_factory=list)  # qualified keys
    safe: bool = False
    init_lora: LoraConfig | None = None
    combination: dict[str, Any] | None = None
    dtype: str = "float64"
    seed: int = 0
    # DARE combinations (density < 1): mask key -> one keep-mask per source (reflora.weighted.dare_mask_shapes)
    keep_masks: dict[str, list[np.ndarray]] | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """Every input array under a flat name, for ``--dump`` (conformance.cases.case_tensors)."""
        out = {f"base/{k}": v for k, v in self.params.items()}
        for key, masks in (self.keep_masks or {}).items():
            out.update({f"keep_mask/{key}/{i}": m for i, m in enumerate(masks)})
        for name, (_, tensors) in self.adapters.items():
            out.update({f"adapter/{name}/{k}": v for k, v in tensors.items()})
        out["input_ids"] = self.input_ids
        if self.labels is not None:
            out["labels"] = self.labels
        for name, masks in (self.dropout_masks or {}).items():
            out.update({f"dropout/{name}/{k}": v for k, v in masks.items()})
        return out


def targeted_keys(case: AdaptersCase) -> list[str]:
    """HF keys of the weights (and biases) of every module some adapter targets (what ``model_merge`` returns
    under ``"merged"``, ``"unmerged"`` and ``"after"``)."""
    shapes = base_shapes(case.config)  # trainable tokens change wte's weight (it has no bias)
    modules = sorted({"transformer.wte" if m == TOKENS_MODULE else m
                      for lora, _ in case.adapters.values() for m in plan_lora(case.config, lora)})  # fmt: skip
    return [key for m in modules for key in (f"{m}.weight", f"{m}.bias") if key in shapes]


@runtime_checkable
class Driver(Protocol):
    """The protocol. Methods for capabilities a driver lacks may raise ``NotSupported``."""

    name: str
    capabilities: Capabilities

    def versions(self) -> dict[str, str]:
        """``{"candidate": "peft 0.21.2", "framework": "torch 2.13.0", ...}``: "<name> <version>" strings, printed
        in the report header and recorded in the JSON report (more keys, e.g. "transformers", are welcome)."""
        ...

    def layer_forward_backward(self, case: LayerCase) -> dict[str, np.ndarray]:
        """Build the library's LoRA layer from the case, run forward and backward (from ``case.dy``).
        Returns ``y``, ``dx``, ``lora_A``/``lora_B`` (or per slice), ``bias`` if trainable, and
        ``trainable`` (a list of the result names the library marks trainable) as ``np.array`` of str.
        [layer_lora_bias] ``case.lora_bias_B`` (out,) set: B has that bias, y gains s·b_B, and the result adds
        ``lora_B_bias`` (out,), its gradient (trainable). [layer_dora] ``case.magnitude`` (out,) set: DoRA with that
        magnitude, eval mode, detached norm (PEFT's); the result adds ``magnitude`` (out,), dm (trainable).
        [layer_dora_full_norm] ``case.dora_norm == "full"``: the same, the norm ‖W + sBA‖ not detached."""
        ...

    def layer_merge(self, case: LayerCase) -> dict[str, np.ndarray]:
        """Merge the LoRA delta into the weight, unmerge it again. Returns ``merged_weight``,
        ``merged_y`` (forward after merge), ``unmerged_weight`` (after merge then unmerge), in the case's layout.
        A library that merges but cannot unmerge (``Capabilities.unmerge=False``) returns the first two only.
        [layer_dora_merge] ``case.magnitude`` (out,) set (one full-width branch, no dropout): a DoRA layer with
        that magnitude; ``merged_weight`` = m ⊙ V/‖V‖_row with V = W + s·B A (the row norm over the input
        dimension), in the case's layout, and ``unmerged_weight`` ≈ W again."""
        ...

    def layer_init(self, case: LayerInitCase) -> dict[str, np.ndarray]:
        """[layer_init_methods] Build the library's LoRA layer on ``case.weight`` / ``case.bias`` with the library's
        own initialisation for the law ``case.init`` (conformance.init_laws; its RNG seeded with ``case.seed``),
        and ``case.use_dora`` [layer_dora]. Nothing is copied into A or B. Returns ``lora_A`` (r, in),
        ``lora_B`` (out, r), ``y`` (B, T, out): the forward of ``case.x`` at init in eval mode, ``weight``: the
        base weight after the init, in the case's layout, and ``magnitude`` (out,) when ``case.use_dora``."""
        ...

    def layer_adapters(self, case: LayerAdaptersCase) -> dict[str, Any]:
        """[layer_multi_adapter; layer_mixed_batch] Build the library's LoRA layer with every adapter of
        ``case.adapters`` (created in dict order, named by its key, its A and B copied in), then run forward and
        backward (from ``case.dy``, eval mode) with ``case.active`` (applied to every row, in that order; ``[]``:
        every adapter disabled) or ``case.adapter_names`` (one name per batch row, ``"__base__"`` for none).
        Expected y = x Wᵀ + b + Σ_active s_i B_i A_i x. Returns ``{"y" (B, T, out), "dx" (B, T, in), "grads":
        {"<name>.lora_A": (r, in), "<name>.lora_B": (out, r)}}`` for every adapter that acts on some row (grads
        may be omitted when every adapter is disabled)."""
        ...

    def model_forward_backward(self, case: ModelCase) -> dict[str, Any]:
        """Build GPT-2 + LoRA, forward, loss (if labels) and backward. Returns ``logits``, ``loss``,
        ``grads`` (reflora key -> array, every trainable tensor) and ``trainable`` (reflora key -> numel of
        every parameter the library will train)."""
        ...

    def save_adapter(self, case: ModelCase, folder: Path) -> None:
        """Write the case's adapter with the library's own save function (PEFT format expected)."""
        ...

    def load_adapter_logits(self, case: ModelCase, folder: Path) -> np.ndarray:
        """Load an adapter folder (written by reflora) with the library's own loader onto the case's base
        weights, and return eval-mode logits for the case's inputs."""
        ...

    def model_switch_adapters(self, case: ModelCase) -> dict[str, np.ndarray]:
        """Load ``case.adapter`` (config ``case.lora``) as the first adapter and ``case.second_adapter``
        (config ``case.second_lora``) as a second one, then return eval-mode logits with the first active
        (``"first"``), after switching to the second (``"second"``), and after switching back
        (``"first_again"``)."""
        ...

    # ------------------------------------------------------------------ advanced (docs/advanced-semantics.md)

    def model_adapters(self, case: AdaptersCase) -> dict[str, Any]:
        """[multi_adapter; dora; mixed_batch] Build GPT-2 with every adapter of ``case.adapters`` (created in dict
        order, named by its key, tensors copied in), then run with ``case.active`` (applied to every row in that
        order; ``[]``: adapters disabled) or ``case.adapter_names`` (one name per row, ``"__base__"`` for none),
        the keep-masks ``case.dropout_masks`` ({adapter: {module: mask}}; ``None``: eval mode), HF's loss on
        ``case.labels``, and the gradients of ``case.wrt`` (``"<adapter>:<PEFT file key>"``,
        reflora.qualified_key). Returns ``{"logits", "loss", "grads": {qualified key: array}}``."""
        ...

    def model_merge(self, case: AdaptersCase) -> dict[str, Any]:
        """[model_merge] With every adapter active, ``"logits"`` (unmerged, eval), then merge them all into the
        base: ``"merged_logits"`` and ``"merged"`` (HF key -> weight or bias of every targeted module, in HF's
        Conv1D layout; ``targeted_keys(case)``); then unmerge: ``"unmerged"`` (same keys; a merge-only library,
        ``Capabilities.unmerge=False``, may omit it, and the unmerge is then not checked). With ``case.safe`` the
        merge is a safe merge of an adapter holding a NaN or an infinity: return ``{"refused": bool, "after": {HF
        key -> weight or bias of every targeted module after the attempt}}``."""
        ...

    def merge_and_unload(self, case: AdaptersCase, folder: Path) -> None:
        """[merge_and_unload] Merge every adapter and write the plain model (``save_pretrained``: HF's GPT-2
        format) into ``folder``."""
        ...

    def init_adapter(self, case: AdaptersCase) -> dict[str, Any]:
        """[init_methods] Add ``case.init_lora`` (with its ``init_lora_weights``; the library's RNG seeded with
        ``case.seed``) to GPT-2 with ``case.params``. Returns ``{"adapter": {file key: array}, "params": {HF key:
        weight}, "logits"}``: the adapter as the library saves it (PEFT file keys, e.g.
        ``lora_magnitude_vector``), the targeted modules' base weights after the init (PiSSA/OLoRA change them)
        and eval logits at init."""
        ...

    def weighted_adapter(self, case: AdaptersCase) -> dict[str, Any]:
        """[weighted_combinations] Add the adapters, combine ``case.combination`` (``names``, ``weights``,
        ``combination_type``, ``svd_rank``; for the pruning types also ``density`` and
        ``majority_sign_method``) into a new adapter (named ``COMBINED``). Returns ``{"deltas": {module:
        (out, in)}, "bias_deltas": {module: (out,)}, "logits"}``: its effective ΔW per module (scaling included,
        (out, in) form), its effective bias delta ``s·b_B`` when it has one, and eval logits with the new adapter
        alone active. DARE types (``dare_*``, density < 1): the library's random keep-masks are
        ``case.keep_masks`` (mask key -> one mask per source, in ``reflora.weighted.dare_mask_shapes`` order and
        (out, in) / (r, in) / (out, r) shapes); a driver that cannot inject them raises NotSupported."""
        ...


class NotSupported(Exception):
    """Raised by a driver for a feature its library lacks; the test is reported as not supported."""


class CandidateError(Exception):
    """The candidate did not produce a result: it raised, crashed, hung or returned something unusable."""

    def __init__(self, kind: str, message: str, detail: str = ""):
        super().__init__(f"candidate {kind}: {message}")
        self.kind, self.message, self.detail = kind, message, detail


class DriverLoadError(Exception):
    """The candidate named by --candidate cannot be found or imported."""


CAPABILITY_NAMES = tuple(f.name for f in fields(Capabilities) if f.name != "notes")
