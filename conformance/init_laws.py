"""The laws of LoRA initialisations at layer level: what a library's own init must draw (``layer.init.<law>.*``).

A law says, for a layer with rank r, in_features and out_features, how the entries of A (r, in) and of B
(out, r) are distributed (i.i.d.), or that they are exactly zero, and whether the output at init equals the
base layer's, y = x Wᵀ + b (it does whenever A or B is zero). ``conformance.checks`` tests each random matrix
with a Kolmogorov–Smirnov test against its law (``conformance.compare.compare_ks``, entries divided by the law's
scale: U(−1, 1) or N(0, 1)), a zero matrix exactly, and the output against the base.

A driver declares the laws its library has in ``Capabilities.layer_init_methods`` and maps each to the library's
own init (PEFT: ``kaiming_uniform`` is ``init_lora_weights=True``). Other helpers may APPEND a law at the end of
``LAWS``: one ``InitLaw`` with its one-line ``doc`` and the libraries that use it. Names are stable (feature ids
``layer.init.<name>.<layout>``); never rename or reorder one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

FAMILIES = ("uniform", "normal")


@dataclass(frozen=True)
class Entries:
    """I.i.d. entries: ``"uniform"`` U(−c, c) or ``"normal"`` N(0, c²), with c = ``scale(r, in_features,
    out_features)``; ``text`` is the law as the report prints it."""

    family: str
    scale: Callable[[int, int, int], float]
    text: str

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Entries.family must be one of {FAMILIES}, got {self.family!r}")


@dataclass(frozen=True)
class InitLaw:
    """One initialisation law. ``a`` / ``b``: the entries of A (r, in) / B (out, r), ``None`` = exactly zero.
    ``output_is_base``: y = x Wᵀ + b at init (true when A or B is zero)."""

    name: str
    a: Entries | None
    b: Entries | None
    doc: str
    libraries: str

    @property
    def output_is_base(self) -> bool:
        return self.a is None or self.b is None


def _inv_sqrt_in(r: int, in_f: int, out_f: int) -> float:
    return 1.0 / math.sqrt(in_f)


def _inv_r(r: int, in_f: int, out_f: int) -> float:
    return 1.0 / r


def _inv_sqrt_r(r: int, in_f: int, out_f: int) -> float:
    return 1.0 / math.sqrt(r)


def _he_in(r: int, in_f: int, out_f: int) -> float:
    return math.sqrt(6.0 / in_f)


def _kaiming_transposed(r: int, in_f: int, out_f: int) -> float:
    """torch ``kaiming_uniform_(t, a)`` on an (in, r) tensor t = Aᵀ: fan_in = t.size(1) = r, gain √(2/(1 + a²)),
    bound gain·√(3/r); with lora-pytorch's a = alpha/rank = 1/r: √(6r/(r² + 1))."""
    return math.sqrt(6.0 * r / (r * r + 1.0))


LAWS: tuple[InitLaw, ...] = (
    InitLaw("kaiming_uniform", Entries("uniform", _inv_sqrt_in, "U(±1/√in)"), None,
            "A ~ U(±1/√in): torch kaiming_uniform_(a=√5) on an (r, in) tensor; B = 0",
            "peft (init_lora_weights=True)"),
    InitLaw("gaussian", Entries("normal", _inv_r, "N(0, 1/r²)"), None,
            "A ~ N(0, 1/r²); B = 0", "peft (init_lora_weights='gaussian')"),
    InitLaw("peft_false", Entries("uniform", _inv_sqrt_in, "U(±1/√in)"), Entries("uniform", _inv_sqrt_r, "U(±1/√r)"),
            "A ~ U(±1/√in), B ~ U(±1/√r) (nn.Linear's own reset on both factors): the output is not the base's",
            "peft (init_lora_weights=False)"),
    InitLaw("he_uniform", Entries("uniform", _he_in, "U(±√(6/in))"), None,
            "A ~ U(±√(6/in)) (He / Kaiming uniform, fan_in = in); B = 0", "keras, flax"),
    InitLaw("normal_002", Entries("normal", lambda r, in_f, out_f: 0.02, "N(0, 0.02²)"),
            Entries("normal", lambda r, in_f, out_f: 0.02, "N(0, 0.02²)"),
            "A, B ~ N(0, 0.02²) (BERT's init on both factors): the output is not the base's",
            "adapters (LoRAConfig(init_weights='bert'))"),
    InitLaw("vera_he_uniform", Entries("uniform", _he_in, "U(±√(6/in))"),
            Entries("uniform", lambda r, in_f, out_f: math.sqrt(6.0 / r), "U(±√(6/r))"),
            "A ~ U(±√(6/in)), B ~ U(±√(6/r)) (torch kaiming_uniform_ with a = 0 on both factors, fan_in = in and "
            "r): the output is not the base's", "adapters (LoRAConfig(init_weights='vera') on a LoRA module)"),
    InitLaw("kaiming_uniform_transposed", Entries("uniform", _kaiming_transposed, "U(±√(6r/(r²+1)))"), None,
            "A ~ U(±√(6r/(r²+1))): torch kaiming_uniform_(a=1/r) on the (in, r) tensor Aᵀ (fan_in = r); B = 0",
            "lora-pytorch (LinearLoRAModule via LoRA.from_module)"),
    InitLaw("he_uniform_b", None, Entries("uniform", lambda r, in_f, out_f: math.sqrt(6.0 / out_f), "U(±√(6/out))"),
            "A = 0, B ~ U(±√(6/out)) (He uniform on B (out, r), fan_in = out: the factor on the kernel's first axis)",
            "keras (EinsumDense('...i,oi->...o').enable_lora: lora_kernel_a (out, r) = B, lora_kernel_b (r, in) = A)"),
)  # fmt: skip
LAW_NAMES = tuple(law.name for law in LAWS)
ANY_LAW = "*"  # ``missing_capability`` need "layer_init:*": some law is declared (``layer.dora_init.*``)


def law(name: str) -> InitLaw:
    """The law named ``name``; a clear error naming the known laws otherwise."""
    for candidate in LAWS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown init law {name!r}; conformance.init_laws.LAWS has {list(LAW_NAMES)}")
