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

Every array a driver returns may be in any float dtype; the suite converts it to float64 itself. A driver runs
in a worker process by default (crash isolation), so it must not rely on state kept between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from reflora.config import GPT2Config, LoraConfig

LAYOUTS = ("linear", "conv1d")  # linear: W is (out, in), y = x Wᵀ; conv1d: W is (in, out), y = x W
DTYPES = ("float64", "float32", "bfloat16")
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
    dtypes: frozenset[str] = frozenset({"float64"})
    target_modules_list: bool = False  # model level: PEFT's suffix-matching list
    target_modules_regex: bool = False  # model level: PEFT's fullmatch regex
    layers_to_transform: bool = False
    rank_alpha_pattern: bool = False
    position_ids: bool = False
    padding: bool = False  # attention_mask with padding
    merge: bool = False  # layer level: merge W + s·BA (layer_merge's merged_weight, merged_y)
    unmerge: bool = True  # with merge: unmerge restores W (unmerged_weight); False for merge-only libraries
    adapter_files: bool = False  # model level: write/read PEFT-format adapter files
    adapter_switching: bool = False  # model level: hold two adapters and switch the active one
    # docs/advanced-semantics.md; the optional methods and their AdaptersCase are documented in conformance/advanced.py
    model_merge: bool = False  # model_merge(case): merge every adapter into the model, unmerge, safe merge
    merge_and_unload: bool = False  # merge_and_unload(case, folder): a plain GPT-2 checkpoint (HF format)
    dora: bool = False  # DoRA adapters (use_dora) in model_adapters / model_merge / init_adapter
    lora_bias: bool = False  # LoraConfig(lora_bias=True): B has a bias
    init_methods: frozenset[str] = frozenset()  # init_adapter(case): "true", "gaussian", "false", "pissa", "olora"
    multi_adapter: bool = False  # model_adapters(case): several adapters, an ordered active set, disabled
    mixed_batch: bool = False  # model_adapters(case) with one adapter name per row
    weighted_combinations: frozenset[str] = frozenset()  # weighted_adapter(case): "cat", "linear", "svd"
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

    @property
    def qkv_slices(self) -> tuple[str, ...] | None:
        names = [k for k in self.lora_A if k is not None]
        return tuple(names) if names else None


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
        ``trainable`` (a list of the result names the library marks trainable) as ``np.array`` of str."""
        ...

    def layer_merge(self, case: LayerCase) -> dict[str, np.ndarray]:
        """Merge the LoRA delta into the weight, unmerge it again. Returns ``merged_weight``,
        ``merged_y`` (forward after merge), ``unmerged_weight`` (after merge then unmerge), in the case's layout.
        A library that merges but cannot unmerge (``Capabilities.unmerge=False``) returns the first two only."""
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


class NotSupported(Exception):
    """Raised by a driver for a feature its library lacks; the test is reported as not supported."""


CAPABILITY_NAMES = tuple(f.name for f in fields(Capabilities) if f.name != "notes")
