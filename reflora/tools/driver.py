"""``reflora driver new NAME [--out DIR]``: write a commented conformance driver skeleton for a LoRA library.

    reflora driver new mylora              # ./mylora_driver.py and ./mylora_deviations.json
    reflora driver new mylora --out drv/   # the same in drv/ (created if missing)
    cd drv && PYTHONPATH=. reflora conform --candidate mylora_driver:driver

The skeleton has every method of ``conformance.protocol.Driver`` (core and advanced), every ``Capabilities``
field with what it means, and the traps of docs/conformance.md ("Writing a driver") as comments. As written it
declares nothing, so ``reflora conform`` reports every feature "not supported" and exits 5 ("nothing was
checked"). The module is named ``<NAME>_driver`` so that it never shadows the library ``NAME`` itself.
An existing file is never overwritten, and nothing is written when either file would be.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from string import Template

from reflora.tools.errors import output_folder

PROG = "reflora driver new"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "driver",
        help="write a commented driver skeleton for a LoRA library (reflora driver new NAME)",
        description="Tools for writing a conformance driver (docs/conformance.md, 'Writing a driver').",
    )
    actions = p.add_subparsers(dest="driver_action", metavar="ACTION")
    new = actions.add_parser(
        "new",
        help="write NAME_driver.py and NAME_deviations.json",
        description="Write NAME_driver.py, a commented skeleton with every driver method and capability, and "
        "NAME_deviations.json (an empty known-deviations list) beside it. Existing files are never overwritten. "
        "Then run: PYTHONPATH=DIR reflora conform --candidate NAME_driver:driver",
    )
    new.add_argument("name", metavar="NAME", help="the library's name: a Python identifier (letters, digits, _)")
    new.add_argument("--out", metavar="DIR", default=".", help="the folder to write into (default: .; created)")
    new.set_defaults(func=run_new)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a driver (its module is ``<name>_driver``), or None."""
    if not name:
        return "an empty name"
    if not (name.isascii() and name.isidentifier()) or name.startswith("_"):
        return (
            f"{name!r} is not usable: the driver is imported as the module {name}_driver, so NAME needs "
            "ASCII letters, digits and _, not starting with a digit or _"
        )
    return None


def run_new(args: argparse.Namespace) -> int:
    problem = name_problem(args.name)
    if problem is not None:
        return _fail(f"NAME: {problem}")
    try:
        folder = output_folder(args.out)
    except argparse.ArgumentTypeError as exc:
        return _fail(f"--out: {exc}")
    module = f"{args.name}_driver"
    driver_path, deviations_path = folder / f"{module}.py", folder / f"{args.name}_deviations.json"
    for path in (driver_path, deviations_path):
        if os.path.lexists(path):
            return _fail(f"{path} exists: refusing to overwrite it (remove it, or pick another NAME or --out)")
    texts = {
        driver_path: render_driver(args.name),
        deviations_path: json.dumps({"driver": args.name, "deviations": []}, indent=1) + "\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for path, text in texts.items():
            with open(path, "x", encoding="utf-8") as handle:  # "x": never replaces a file made meanwhile
                written.append(path)
                handle.write(text)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    print(f"wrote {driver_path} and {deviations_path}")
    print(f"run it: cd {folder} && PYTHONPATH=. reflora conform --candidate {module}:driver")
    print("(everything is 'not supported' until you declare capabilities; see docs/conformance.md, 'Writing a driver')")
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def render_driver(name: str) -> str:
    class_name = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) + "Driver"
    return Template(DRIVER_TEMPLATE).substitute(name=name, module=f"{name}_driver", class_name=class_name)


# The skeleton. ``$name``, ``$module`` and ``$class_name`` are filled in (string.Template; ``$$`` is a dollar).
# tests/test_driver_new.py checks that it names every Driver method and every Capabilities field.
DRIVER_TEMPLATE = '''\
"""A reflora conformance driver for $name (written by `reflora driver new $name`): fill in the TODOs.

Run it from this file's folder:

    PYTHONPATH=. reflora conform --candidate $module:driver
    PYTHONPATH=. reflora conform --candidate $module:driver -k layer.forward_backward   # one feature

As generated every capability is off: every feature is "not supported" and the run exits 5 ("nothing was
checked"; a run that checks nothing never passes). Turn a capability on once the method it needs is written;
the suite then draws cases for it and compares every output and gradient with reflora (float64).

The rules (docs/conformance.md, "Writing a driver"; conformance/protocol.py has every signature):

* Translate, never compute: put the case's tensors (NumPy float64, reflora's names and layouts) into your
  library's objects, in its layout and in ``case.dtype``, run the library, and return its results in reflora's
  names and layouts as NumPy arrays of any float dtype (the suite converts them to float64). Never compute LoRA
  here and never correct the library's answer; whatever you fold or emulate goes in ``Capabilities.notes``.
* A method for something the library lacks raises ``NotSupported("why")``: that test is "not supported".
* The driver runs in a worker process (``--isolation subprocess``, the default), which rebuilds every case from
  its spec: keep no state between calls. Every call, ``versions()`` included, has ``--timeout`` seconds
  (default 120; importing this module and building ``driver`` may take up to 300).
* This module is named ``$module``, not ``$name``: a file named like the library would shadow it on import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.protocol import (  # noqa: F401  (the names a driver uses; delete what you do not need)
    COMBINED,
    AdaptersCase,
    Capabilities,
    LayerAdaptersCase,
    LayerCase,
    LayerInitCase,
    ModelCase,
    NotSupported,
    targeted_keys,
)

# TODO: import your library (and its framework), e.g.
# import $name
# import torch


def as_numpy(value) -> np.ndarray:
    """TODO: your framework's tensor -> NumPy, any float dtype. TRAP: return a copy (torch:
    ``t.detach().cpu().double().numpy().copy()``): a view shares memory with the live tensor, and a later
    in-place change (an unmerge after the merged weights were taken) would change what you returned."""
    return np.asarray(value)


class $class_name:
    name = "$name"  # printed in the report header and in the JSON report

    # Known deviations: what the library does differently from the reference, and why (docs/conformance.md,
    # "Known deviations"). A failing test whose id starts with an entry's id is a known deviation and does not
    # fail the run. TRAP: a relative path here (or in --deviations) is opened relative to the folder you run
    # `reflora conform` from (its working directory), not this file's folder; hence the absolute path below.
    # (A re-exported shipped driver, `--candidate mymodule:driver` with `from conformance.drivers.peft import
    # driver`, keeps that driver's own file; a driver of your own built on PEFT + transformers does not inherit
    # PEFT's deviations: copy the entries that apply (conformance/deviations/peft.json) into this file.)
    deviations = str(Path(__file__).resolve().with_name("${name}_deviations.json"))

    # What the library can do. A test whose capability is off is "not supported" (with the reason from `notes`),
    # never a pass. Every field is written out at its default; turn one on only when its method works.
    capabilities = Capabilities(
        # -- layer level: layer_forward_backward / layer_merge
        # subset of {"linear", "conv1d"}: linear W is (out, in), y = x Wᵀ; conv1d W is (in, out), y = x W
        # (GPT-2's Conv1D). Empty: no layer-level feature runs.
        layer_layouts=frozenset(),
        # -- model level: GPT-2 (HF names and Conv1D layout) with LoRA; model_forward_backward and the rest.
        # model.forward_backward also needs target_modules_list.
        model_level=False,
        # takes lora_alpha and scales by alpha/r. False: cases draw alpha = r (scaling 1), the rest still runs
        lora_alpha=True,
        # the same at model level (False: scaling 1 there, e.g. keras-hub's enable_lora(rank) has no alpha)
        model_lora_alpha=True,
        # rsLoRA: scaling alpha/sqrt(r) (case.use_rslora / lora.use_rslora)
        rslora=False,
        # the reference's 0/1 keep-mask can be put into the library's dropout: x_d = x * mask / (1 - p)
        # (LayerCase.keep_mask, ModelCase.dropout_masks; None = eval mode, no dropout whatever p is)
        dropout_mask_injection=False,
        # subset of {"none", "all", "lora_only"}: PEFT's bias modes ("all": every *.bias, LayerNorms included;
        # "lora_only": the targeted modules' biases)
        bias_modes=frozenset({"none"}),
        # independent LoRA pairs on chosen q/k/v slices of a fused projection (loralib's MergedLinear);
        # LayerCase.lora_A / lora_B keyed "q", "k", "v" instead of None
        per_slice_qkv=False,
        # subset of {"float64", "float32", "bfloat16"}: what the library computes in (case.dtype); bfloat16 is
        # drawn at layer level only. Every case is checked against a bound from plain evaluations in that dtype.
        dtypes=frozenset({"float64"}),
        # model level: target_modules as PEFT's list (an entry matches a module whose name equals it or ends
        # with "." + entry: ["c_proj"] hits attn.c_proj and mlp.c_proj)
        target_modules_list=False,
        # model level: target_modules as a string, a Python re.fullmatch regex on the full module name
        target_modules_regex=False,
        # PEFT's layers_to_transform (an int or a list of h.<i> indices)
        layers_to_transform=False,
        # PEFT's rank_pattern / alpha_pattern (per-module r and alpha; the first matching key wins)
        rank_alpha_pattern=False,
        # PEFT's target_modules="all-linear": every Conv1D of every block, lm_head (the output layer) left out
        target_modules_all_linear=False,
        # PEFT's exclude_modules, checked before target_modules: a list (equal name or "." + entry suffix) or a
        # regex (re.fullmatch). TRAP: a library that ignores it silently adapts the excluded modules too.
        exclude_modules=False,
        # ModelCase.scale_ops: PEFT's set_scale(adapter, c) / scale_layer(c) / unscale_layer(c or None) on every
        # LoRA layer before the forward (model.scaling.*). TRAP: set_scale is absolute (c·alpha/r, c·alpha/√r
        # under rsLoRA), scale_layer multiplies, unscale_layer(None) resets.
        runtime_scaling=False,
        # LoRA on wte (model.embedding.lora): PEFT's lora.Embedding, file keys transformer.wte.lora_embedding_A
        # (r, vocab) / lora_embedding_B (n_embd, r), no dropout. TRAP: the tied head keeps the base wte.weight
        embedding_lora=False,
        # trainable_token_indices (model.embedding.trainable_tokens): chosen wte rows train, stored as
        # token_adapter.trainable_tokens_delta (K, n_embd), the new rows themselves; the tied head uses them too
        trainable_tokens=False,
        # modules_to_save (model.modules_to_save.*): a trainable copy replaces each module whose name ends with an
        # entry, file key base_model.model.<module>.weight. TRAP: a copy of wte feeds the lookup only (the head
        # keeps W); a copy of lm_head feeds the head only; a saved module gets no LoRA
        modules_to_save=False,
        # ensure_weight_tying with 'lm_head' in modules_to_save (model.modules_to_save.tied): one copy of wte for
        # the lookup and the head, saved twice (transformer.wte.weight and lm_head.weight)
        ensure_weight_tying=False,
        # explicit position_ids (model.position_ids.with_mask / .without_mask). TRAP (transformers-based
        # libraries): see model_forward_backward below: use_cache changes what the no-mask feature sees.
        position_ids=False,
        # attention_mask with left/right padding (padded labels are -100)
        padding=False,
        # layer level: merge W + s·BA into the weight (layer_merge: merged_weight, merged_y)
        merge=False,
        # with merge: unmerging restores W (unmerged_weight). False for a merge-only library
        unmerge=True,
        # model level: the library writes and reads PEFT-format adapter folders (save_adapter,
        # load_adapter_logits)
        adapter_files=False,
        # model level: hold two adapters and switch the active one (model_switch_adapters)
        adapter_switching=False,
        # -- the advanced level (docs/advanced-semantics.md); the methods take an AdaptersCase
        # model_merge(case): merge every adapter into the model, unmerge, and a safe merge that refuses NaN/inf
        model_merge=False,
        # merge_and_unload(case, folder): write the merged plain GPT-2 (HF save_pretrained format)
        merge_and_unload=False,
        # DoRA adapters (LoraConfig.use_dora) in model_adapters / model_merge / init_adapter
        dora=False,
        # LoraConfig(lora_bias=True): lora_B has a bias b_B; the branch adds s·b_B
        lora_bias=False,
        # layer level (layer.lora_bias.*): layer_forward_backward with case.lora_bias_B (out,) set; return its
        # gradient as "lora_B_bias"
        layer_lora_bias=False,
        # layer level (layer.dora.*): layer_forward_backward with case.magnitude (out,) set: DoRA, eval mode, the
        # norm detached (PEFT's); return dm as "magnitude"
        layer_dora=False,
        # layer level (layer.dora_full_norm.*): the same with case.dora_norm == "full" (norm not detached)
        layer_dora_full_norm=False,
        # layer level (layer.dora_merge.*, layer.dora_unmerge.*): layer_merge with case.magnitude set: the merged
        # weight is m * V / ||V||_row, V = W + s·BA
        layer_dora_merge=False,
        # layer level (layer.init.<law>.*): layer_init(case) with the library's own init, subset of the law
        # names of conformance.init_laws.LAWS (e.g. "kaiming_uniform", "gaussian", "peft_false", "he_uniform")
        layer_init_methods=frozenset(),
        # layer level (layer.adapters.*): layer_adapters(case): several named adapters on one layer
        layer_multi_adapter=False,
        # layer level (layer.adapters.mixed_batch.*): layer_adapters with case.adapter_names, one per batch row
        layer_mixed_batch=False,
        # layer level (layer.merge_qkv_slices.*, layer.unmerge_qkv_slices.*): layer_merge with per-slice q/k/v
        # branches (case.lora_A keyed "q"/"k"/"v"): each slice's delta lands in its own third of the output rows
        merge_qkv_slices=False,
        # init_adapter(case): the library's own inits, subset of {"true", "gaussian", "false", "pissa", "olora",
        # "orthogonal", "pissa_niter"}
        init_methods=frozenset(),
        # model_adapters(case): several named adapters, an ordered active set, all disabled
        multi_adapter=False,
        # model_adapters(case) with one adapter name per batch row (case.adapter_names; "__base__" = none)
        mixed_batch=False,
        # weighted_adapter(case): PEFT's add_weighted_adapter kinds, subset of {"cat", "linear", "svd", "ties",
        # "magnitude_prune", "ties_svd", "magnitude_prune_svd"}
        weighted_combinations=frozenset(),
        # capability name -> why it is missing, or how the library was mapped (shown as the reason)
        notes={"model_level": "TODO: why, or delete this note once it is supported"},
    )

    def versions(self) -> dict[str, str]:
        """"<name> <version>" strings for the report header (more keys, e.g. "transformers", are welcome; a
        failure matching a known deviation of a shipped driver on the same library gets a hint)."""
        return {"candidate": "$name TODO-version", "framework": "TODO e.g. torch 2.13.0"}

    # ------------------------------------------------------------------ layer level

    def layer_forward_backward(self, case: LayerCase) -> dict[str, np.ndarray]:
        """Build one LoRA layer from the case, forward, backward from case.dy (gradients of sum(dy * y)).

        case: layout ("linear": weight (out, in); "conv1d": (in, out)), x (B, T, in), weight, bias (out,) or
        None, lora_A / lora_B {None: full matrix, or "q"/"k"/"v": slices} (r, in) / (out, r) or (out/3, r),
        r, lora_alpha, use_rslora, lora_dropout, keep_mask (B, T, in) or None (eval), bias_trainable, dy, dtype;
        lora_bias_B (out,) or None [layer_lora_bias], magnitude (out,) or None and dora_norm [layer_dora].
        Return {"y" (B, T, out), "dx" (B, T, in), "lora_A", "lora_B" (the gradients; per slice "lora_A.q" ...),
        "bias" (its gradient, only when trainable), "lora_B_bias" / "magnitude" (their gradients, when set),
        "trainable": np.array([...names the library trains])}.
        """
        raise NotSupported("TODO: layer_forward_backward")

    def layer_merge(self, case: LayerCase) -> dict[str, np.ndarray]:
        """[merge] Merge s·BA into the weight, run forward, unmerge. Return {"merged_weight" (in the case's
        layout), "merged_y" (B, T, out), "unmerged_weight"} ("unmerged_weight" only with unmerge=True)."""
        raise NotSupported("TODO: layer_merge")

    def layer_init(self, case: LayerInitCase) -> dict[str, np.ndarray]:
        """[layer_init_methods] Build one LoRA layer on case.weight / case.bias with the library's own init for
        the law case.init (conformance.init_laws; seed the library's RNG with case.seed), DoRA if
        case.use_dora. Copy nothing into A or B. Return {"lora_A" (r, in), "lora_B" (out, r), "y" (B, T, out):
        eval forward of case.x at init, "weight": the base weight after the init (case layout), "magnitude"
        (out,) with DoRA}."""
        raise NotSupported("TODO: layer_init")

    def layer_adapters(self, case: LayerAdaptersCase) -> dict:
        """[layer_multi_adapter] Build one layer with every adapter of case.adapters (dict order; {"lora_A",
        "lora_B", "r", "lora_alpha", "use_rslora"} each, A and B copied in), activate case.active (in order; []
        = disabled) or, [layer_mixed_batch], use case.adapter_names (one per batch row, "__base__" = none);
        forward, backward from case.dy. Return {"y", "dx", "grads": {"<name>.lora_A", "<name>.lora_B"}}."""
        raise NotSupported("TODO: layer_adapters")

    # ------------------------------------------------------------------ model level (GPT-2, HF names)

    def model_forward_backward(self, case: ModelCase) -> dict:
        """[model_level] GPT-2 + LoRA: forward, loss (with labels), backward.

        case: config (GPT2Config: vocab_size, n_positions, n_embd, n_layer, n_head, n_inner,
        layer_norm_epsilon), lora (reflora LoraConfig; .to_peft_dict() gives PEFT's LoraConfig kwargs),
        params {HF key: array, Conv1D (in, out)}, adapter {PEFT key: array}, input_ids (B, T), labels (B, T,
        -100 ignored) or None (then backward from dlogits (B, T, V): gradients of sum(dlogits * logits), no
        loss), attention_mask (B, T) or None, position_ids (B, T) or None, dropout_masks {module: (B, T, in)} or
        None (eval mode), dtype. Return {"logits" (B, T, V), "loss" (0-d, with labels), "grads": {key: array for
        every trained tensor: PEFT adapter keys, HF base keys for trained biases}, "trainable": {key: number of
        elements of every parameter the library trains}}.

        TRAP, the loss's dtype: compute HF's shifted causal cross-entropy in the logits' dtype, e.g. torch's
        cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100).
        transformers' own loss (model(labels=...)) calls logits.float(): a float64 case's loss and every
        gradient then carry float32 rounding and fail the float64 bound.

        TRAP, use_cache and position_ids (transformers-based libraries): given position_ids and NO
        attention_mask, transformers builds a packed-sequence mask from them (masking_utils.
        find_packed_sequence_indices: each position that is not its predecessor + 1 starts a new sequence),
        but only when there is no cache, i.e. with use_cache=False (what training set-ups and the shipped
        drivers use). Then model.position_ids.without_mask fails (PEFT's known deviation, copy it from
        conformance/deviations/peft.json); with use_cache=True it passes. Pass case.attention_mask as it is
        (None stays None): the feature measures what the library does without a mask.
        """
        raise NotSupported("TODO: model_forward_backward")

    def save_adapter(self, case: ModelCase, folder: Path) -> None:
        """[adapter_files] Write the case's adapter with the library's own save function into ``folder`` (it
        exists): PEFT's format, adapter_model.safetensors + adapter_config.json; with bias "all"/"lora_only"
        the trained biases (case.params) go in the file too. reflora reads it back and compares modules, r,
        scaling, bias mode and every tensor."""
        raise NotSupported("TODO: save_adapter")

    def load_adapter_logits(self, case: ModelCase, folder: Path) -> np.ndarray:
        """[adapter_files] Load the PEFT-format adapter folder reflora wrote (its trained biases, if any,
        replace the base's) with the library's own loader onto case.params; return eval-mode logits
        (B, T, V) for case.input_ids (and case.attention_mask / position_ids)."""
        raise NotSupported("TODO: load_adapter_logits")

    def model_switch_adapters(self, case: ModelCase) -> dict[str, np.ndarray]:
        """[adapter_switching] Load case.adapter (config case.lora) as a first adapter and case.second_adapter
        (case.second_lora) as a second; return eval-mode logits {"first", "second" (after switching to it),
        "first_again" (after switching back)}."""
        raise NotSupported("TODO: model_switch_adapters")

    # ------------------------------------------------------------------ advanced level (AdaptersCase)
    # case: config, params {HF key: array}, adapters {name: (LoraConfig, {PEFT file key: array})} (create them
    # in that order, named by the key; file keys have no adapter name: base_model.model.<module>.lora_A.weight,
    # .lora_B.weight, .lora_B.bias (lora_bias), .lora_magnitude_vector (DoRA)), input_ids (B, T), labels,
    # active, adapter_names, dropout_masks, wrt, safe, init_lora, combination, dtype, seed.

    def model_adapters(self, case: AdaptersCase) -> dict:
        """[multi_adapter; dora; mixed_batch] Every adapter of case.adapters, run with case.active (that
        ordered list on every row; [] = adapters disabled) or case.adapter_names (one name per row,
        "__base__" = none), keep-masks case.dropout_masks {adapter: {module: (B, T, in)}} or None (eval),
        HF's loss on case.labels (in the logits' dtype, as above). Return {"logits", "loss" (with labels),
        "grads": {"<adapter>:<PEFT file key>": array for every key of case.wrt}}."""
        raise NotSupported("TODO: model_adapters")

    def model_merge(self, case: AdaptersCase) -> dict:
        """[model_merge] With every adapter active: "logits" (eval, unmerged); merge them all into the base:
        "merged_logits" and "merged" {HF key: array for every key of targeted_keys(case), i.e. the .weight and
        .bias of each module some adapter targets, HF Conv1D layout (in, out)}; unmerge: "unmerged" (same keys,
        W restored). With case.safe (one adapter holds a NaN or an infinity) do a safe merge instead and
        return {"refused": bool, "after": {same keys: the weights after the attempt}}: a correct library
        refuses and leaves every weight untouched."""
        raise NotSupported("TODO: model_merge")

    def merge_and_unload(self, case: AdaptersCase, folder: Path) -> None:
        """[merge_and_unload] Merge every adapter and write the plain model into ``folder`` (it exists) in HF's
        GPT-2 format (save_pretrained): model.safetensors with exactly the base keys and shapes (a tied
        lm_head.weight equal to wte is accepted); reflora.load_gpt2 reads it with the case's config."""
        raise NotSupported("TODO: merge_and_unload")

    def init_adapter(self, case: AdaptersCase) -> dict:
        """[init_methods] Add case.init_lora (its init_lora_weights: True, "gaussian", False, "pissa", "olora";
        the library's RNG seeded with case.seed) to GPT-2 with case.params. Return {"adapter": {PEFT file key:
        array, as the library saves it}, "params": {"<module>.weight": the targeted base weights after the init,
        Conv1D layout (PiSSA/OLoRA change them)}, "logits": eval logits at init}."""
        raise NotSupported("TODO: init_adapter")

    def weighted_adapter(self, case: AdaptersCase) -> dict:
        """[weighted_combinations] Add the adapters, combine case.combination ({"names", "weights",
        "combination_type", "svd_rank"}) into a new adapter named COMBINED. Return {"deltas": {module name
        (e.g. "transformer.h.0.attn.c_attn"): its effective ΔW, scaling included, (out, in)}, "bias_deltas":
        {module: s·b_B (out,)} when it has a lora bias, "logits": eval logits with COMBINED alone active}."""
        raise NotSupported("TODO: weighted_adapter")


driver = $class_name()
'''
