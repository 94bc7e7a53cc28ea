"""``reflora experiment why-lora``: the seed article's claims about LoRA, measured with the reference.

The seed article ("Why LoRA trains a fraction of parameters but matches full fine-tuning") claims that the weight
updates of fine-tuning live in a low-rank subspace (4–8 dimensions per layer), that r = 4 to 16 is the sweet spot
and that r > 32 rarely helps. This module tests those claims at a scale that two CPU cores can train:

1. *Pretrain* a small byte-level GPT-2 on one corpus (the standard library's source code).
2. *Fine-tune* it on another (pydoc's English help topics): fully, and with LoRA at every rank of ``ranks`` on
   the seed's targets (``c_attn``, ``c_proj``) and on all four Conv1D kinds, for several seeds. Each
   configuration gets its own learning rate, chosen from a grid by the validation loss of seed 0.
3. Measure the held-out (test split) loss, the trainable parameters, the peak memory of every run, the loss on
   the pretraining corpus afterwards (forgetting), and the singular value spectrum of the full fine-tuning update
   ΔW of every weight matrix, next to that of a random Gaussian matrix of the same shape.
4. Write ``why-lora-works.md``, its figures ``img/why-lora-*.png`` and the raw numbers ``why-lora-works.json``.
   The verdicts are computed from the numbers (``verdicts``); the prose around them is conditioned on them.

Runs execute in ``workers`` processes with single-threaded BLAS (on a shared or small machine, a multi-threaded
BLAS per process oversubscribes the cores and is several times slower). ``--quick`` is a seconds-long smoke test
of the whole pipeline with a tiny model (CI runs it); its page says it is not a measurement.

The package: ``run`` (the plan and the runs, in worker processes), ``analysis`` (summaries, spectra, verdicts)
and ``report`` (the figures and the page's text); this module is the command line.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from reflora.checkpoint import CheckpointError, read_json
from reflora.tools.errors import output_folder
from reflora.tools.experiment.analysis import (
    TOP_K,
    UPDATE_GROUPS,
    Summary,
    energy_fraction,
    lora_line,
    noise_level,
    random_spectrum,
    rank_for_energy,
    spectrum_table,
    summarize,
    update_table,
    verdicts,
)
from reflora.tools.experiment.report import (
    IMG_PREFIX,
    PAGE,
    RESULTS,
    TARGET_LABELS,
    interpretation,
    render_page,
    write_figures,
    write_page,
)
from reflora.tools.experiment.run import (
    KINDS,
    TARGET_SETS,
    TARGET_SHORT,
    Plan,
    Run,
    finetune,
    model_config,
    pretrain,
    quick_plan,
    run_experiment,
    target_weight_keys,
    update_spectra,
)

__all__ = [
    "IMG_PREFIX",
    "KINDS",
    "PAGE",
    "RESULTS",
    "TARGET_LABELS",
    "TARGET_SETS",
    "TARGET_SHORT",
    "TOP_K",
    "UPDATE_GROUPS",
    "Plan",
    "Run",
    "Summary",
    "energy_fraction",
    "finetune",
    "interpretation",
    "lora_line",
    "model_config",
    "noise_level",
    "pretrain",
    "quick_plan",
    "random_spectrum",
    "rank_for_energy",
    "register",
    "render_page",
    "run_experiment",
    "spectrum_table",
    "summarize",
    "target_weight_keys",
    "update_spectra",
    "update_table",
    "verdicts",
    "write_figures",
    "write_page",
]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run a documented experiment and write its page (why-lora: the seed article's claims, measured)",
        description="why-lora: pretrain a small GPT-2 on the standard library's source, fine-tune it on pydoc topics "
        "fully and with LoRA at r = 1..64 on two target sets and several seeds, and write docs/why-lora-works.md "
        "with its figures. About 20 minutes on 2 quiet cores; --quick is a seconds-long smoke test.",
    )
    p.add_argument("name", choices=["why-lora"], help="the experiment")
    p.add_argument("--out", type=output_folder, default=None, help="where the page goes (default: docs/ of this checkout; "
                   "--quick requires --out)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny smoke test of the pipeline (seconds)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, one BLAS thread each (default 2)")
    p.add_argument("--from-results", type=Path, metavar="JSON", help="rewrite the page from saved measurements")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    plan = quick_plan() if args.quick else Plan()
    if args.quick and args.out is None:
        raise SystemExit("reflora experiment: error: --quick writes a smoke-test page: give --out (e.g. a tmp dir)")
    out = args.out or Path(__file__).resolve().parents[3] / "docs"
    command = "reflora experiment why-lora" + (" --quick --out DIR" if args.quick else "")
    if args.workers < 1:
        raise SystemExit("reflora experiment: error: --workers must be >= 1")
    if args.from_results is not None:
        results = read_json(args.from_results, CheckpointError, "results file")
        if not isinstance(results, dict):
            raise SystemExit(f"reflora experiment: error: {args.from_results}: not a results object")
    else:
        with tempfile.TemporaryDirectory(prefix="reflora-why-lora-") as work:
            results = run_experiment(plan, args.workers, work, log=lambda m: print(m, flush=True))
    try:
        page = write_page(results, out, command)
    except (KeyError, TypeError, IndexError) as exc:
        if args.from_results is None:
            raise
        raise SystemExit(
            f"reflora experiment: error: {args.from_results}: not the results of this experiment "
            f"({type(exc).__name__}: {exc})"
        ) from None
    print(f"wrote {page} and its figures in {out / 'img'}")
    for v in verdicts(results):
        print(f"  {v['verdict']:>40}  {v['claim']}")
    return 0
