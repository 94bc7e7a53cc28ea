"""Golden fixtures: a versioned corpus of inputs, weights, outputs and gradients (the fixtures level).

A *case* is a JSON spec (``load_spec``): an HF ``GPT2Config`` (``"gpt2"``), a PEFT ``LoraConfig`` (``"lora"``),
reflora-only choices under their own keys (``"reflora_lora"``, ``"padding"``, ``"train_base"``...), and a seed.
Everything else follows from the seed (``draw_case``), in a fixed, documented order. A *fixture* is one
safetensors file per case (format ``reflora-golden/1``) holding the inputs, every base and adapter tensor, the
LoRA dropout masks, the logits, the loss and the gradient of the loss with respect to every trainable tensor.

    spec ──load_spec──> filled spec ──draw_case──> inputs ──compute_outputs──> logits, loss, grads
                                                        └─────────── generate_case ───────────┘
    fixture file ──read_fixture──> (spec, tensors) ──unpack_fixture──> GoldenCase (what a replay needs)

Additive spec keys (format 1 still; defaults reproduce the original cases byte for byte): ``adapter_init``
(PiSSA/OLoRA), ``adapters`` (extra named adapters), ``adapter_names`` (a mixed batch), ``merge`` (merged
weights), ``weighted`` (add_weighted_adapter); DoRA and ``lora_bias`` are PEFT fields inside ``lora``.

The committed corpus lives in ``golden/``: ``cases/<name>.json`` (specs, the source), ``fixtures/<name>.safetensors``
and ``manifest.json`` (every case's filled spec, the sha256 of its file, provenance). ``reflora golden generate``
rewrites it; ``reflora golden verify`` regenerates every case in memory and compares. docs/golden-format.md is
the complete description of the format; a consumer in another language needs nothing else.

The package, in reading order (each module imports only the spec and the ones before it):

* ``reflora.golden.spec``: the case spec (``load_spec``, its defaults and checks, ``spec_configs``,
  ``adapter_configs``, ``gradient_keys``, ``fixture_layout``)
* ``reflora.golden.derive``: the derivation (``draw_case``, ``GoldenCase``, ``unpack_fixture``,
  ``compute_outputs``, ``generate_case``)
* ``reflora.golden.files``: the file format (``serialize_fixture``, ``write_case``, ``read_fixture``,
  ``sha256_file``, ``load_fixture``, ``GoldenError``)
* ``reflora.golden.verify``: one fixture against its regeneration (``RTOL``, ``compare_tensors``, ``verify_fixture``)
* ``reflora.golden.corpus``: the committed corpus (manifest, ``verify_corpus``, ``generate_corpus``)
* ``reflora.golden.trajectory``: golden trajectories, a few optimizer steps of LoRA training (not imported here)

Every name is re-exported here: ``from reflora.golden import read_fixture, unpack_fixture`` works. The command line
(``reflora golden``) is ``reflora.tools.golden``.
"""

from reflora.golden.corpus import (
    CASES_DIR,
    CORPUS_LIMIT_BYTES,
    FIXTURES_DIR,
    GENERATE_COMMAND,
    MANIFEST,
    CorpusReport,
    corpus_fixtures,
    default_golden_dir,
    generate_corpus,
    read_case_specs,
    read_manifest,
    verify_corpus,
)
from reflora.golden.derive import (
    RANDOM_PADDING_P,
    GoldenCase,
    compute_outputs,
    draw_case,
    generate_case,
    unpack_fixture,
)
from reflora.golden.files import (
    GoldenError,
    load_fixture,
    read_fixture,
    serialize_fixture,
    sha256_file,
    write_case,
)
from reflora.golden.spec import (
    ADAPTER_INITS,
    ADAPTER_NAME_PATTERN,
    DEFAULT_ADAPTER,
    DROPOUT_MODES,
    DTYPES,
    FORMAT,
    FULL_GRADIENT_PREFIX,
    OBJECTIVES,
    OUTPUT_PREFIXES,
    PADDINGS,
    POSITION_IDS,
    SPEC_DEFAULTS,
    WEIGHTED_DEFAULTS,
    adapter_configs,
    adapter_prefix,
    dropout_prefix,
    fixture_layout,
    grad_name,
    gradient_keys,
    is_multi_adapter,
    is_output,
    load_spec,
    participating_adapters,
    reflora_only_lora_fields,
    spec_configs,
    stored_spec,
    weighted_config,
)
from reflora.golden.verify import (
    RTOL,
    ZERO_GRADIENT_FLOOR,
    CaseReport,
    compare_tensors,
    gradient_floor,
    relative_error,
    verify_fixture,
)

__all__ = [
    "ADAPTER_INITS",
    "ADAPTER_NAME_PATTERN",
    "CASES_DIR",
    "CORPUS_LIMIT_BYTES",
    "DEFAULT_ADAPTER",
    "DROPOUT_MODES",
    "DTYPES",
    "FIXTURES_DIR",
    "FORMAT",
    "FULL_GRADIENT_PREFIX",
    "GENERATE_COMMAND",
    "MANIFEST",
    "OBJECTIVES",
    "OUTPUT_PREFIXES",
    "PADDINGS",
    "POSITION_IDS",
    "RANDOM_PADDING_P",
    "RTOL",
    "SPEC_DEFAULTS",
    "WEIGHTED_DEFAULTS",
    "ZERO_GRADIENT_FLOOR",
    "CaseReport",
    "CorpusReport",
    "GoldenCase",
    "GoldenError",
    "adapter_configs",
    "adapter_prefix",
    "compare_tensors",
    "compute_outputs",
    "corpus_fixtures",
    "default_golden_dir",
    "draw_case",
    "dropout_prefix",
    "fixture_layout",
    "generate_case",
    "generate_corpus",
    "grad_name",
    "gradient_floor",
    "gradient_keys",
    "is_multi_adapter",
    "is_output",
    "load_fixture",
    "load_spec",
    "participating_adapters",
    "read_case_specs",
    "read_fixture",
    "read_manifest",
    "reflora_only_lora_fields",
    "relative_error",
    "serialize_fixture",
    "sha256_file",
    "spec_configs",
    "stored_spec",
    "unpack_fixture",
    "verify_corpus",
    "verify_fixture",
    "weighted_config",
    "write_case",
]
