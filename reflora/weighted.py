"""Weighted combinations of LoRA adapters: PEFT 0.21's ``add_weighted_adapter`` (``cat``, ``linear``, ``svd``).

Sources i = 1..K with weights w_i, scalings s_i, and on a module ΔWt_i = s_i B_i A_i (out, in). The new adapter
has scaling exactly 1 (see "Scaling" below) and, on every module that some source targets:

* ``cat``: A = rows[w_i s_i A_i], B = cols[B_i], rank Σ_i r_i. Then B A = Σ_i w_i s_i B_i A_i = Σ_i w_i ΔWt_i
  exactly: the only exact low-rank combination.
* ``linear`` (equal ranks): A = Σ_i σ_i √|w_i s_i| A_i, B = Σ_i √|w_i s_i| B_i with σ_i = sign(w_i s_i). Then
  B A = Σ_i w_i s_i B_i A_i + Σ_{i≠j} σ_j √|w_i s_i| √|w_j s_j| B_i A_j: PEFT's formula keeps the cross terms
  i ≠ j, so it is Σ w_i ΔW_i only for one source (or sources with orthogonal factors). Its docs call it "a very
  rough approximation". reflora reproduces it, cross terms included.
* ``svd``: ΔWt = Σ_i w_i ΔWt_i, U S Vh its SVD, B = U_k diag(S_k), A = Vh_k with k = ``svd_rank`` (default
  max r_i): the best rank-k approximation of ΔWt (Eckart–Young); exact when k ≥ rank(ΔWt).

* ``ties`` / ``magnitude_prune`` (equal ranks): PEFT's ``merge_utils`` on the A_i with coefficients
  σ_i √|w_i s_i| and, separately, on the B_i with √|w_i s_i| (``_task_merge``: magnitude pruning to
  ``density`` of each unweighted tensor, then the weighted sum, or for ties the elected sign and the mean over
  the agreeing sources). ``ties_svd`` / ``magnitude_prune_svd``: the same on ΔWt_i with coefficients w_i,
  then the SVD as for ``svd``.

* ``dare_linear`` / ``dare_ties`` (equal ranks) and ``dare_linear_svd`` / ``dare_ties_svd``: as
  ``magnitude_prune`` / ``ties`` (and their ``_svd`` forms), but each task tensor is pruned at random and
  rescaled, P_i = T_i ⊙ M_i / density (PEFT's ``random_pruning``: M_i = ``torch.bernoulli(density)``, one
  draw per task tensor). The keep-masks M_i are inputs (``keep_masks``, 1.0 kept / 0.0 dropped, as for
  dropout): their keys, shapes and PEFT's draw order are ``dare_mask_shapes``. density ≥ 1 prunes nothing and
  does not rescale (PEFT returns the tensor unchanged and draws no mask); density must be > 0 (PEFT divides
  by it: NaN at 0).

One source is always ``linear`` (as in PEFT; exact then). ``lora_bias`` (reflora; PEFT drops the biases):
b_B = Σ_i w_i s_i b_i on every combination type, exact. Not covered: ``svd_clamp``. DoRA sources are refused: a
combination of DoRA adapters is not a LoRA adapter (each one's factor c_i depends on its own V_i), and PEFT
silently builds a DoRA adapter whose magnitude is the base norm, not a combination. Sources with
``modules_to_save`` or ``trainable_token_indices`` are refused too (a full copy of a module, new rows of wte:
not low-rank deltas), and so are sources with different ``qkv_slices``.

Scaling. The new config is the first source's with ``r = r_new`` and ``rank_pattern = alpha_pattern = {}``, as
in PEFT, and with ``lora_alpha`` chosen so that the scaling is exactly 1: ``lora_alpha = r_new`` (α/r = 1), or
under ``use_rslora`` ``lora_alpha = √r_new`` (α/√r = 1). PEFT always sets ``lora_alpha = r_new``, which under
rsLoRA gives scaling √r_new: its combined adapter is √r_new times too strong (docs/advanced-semantics.md).
The other settings (``use_rslora``, ``lora_dropout``, ``bias``, ``fan_in_fan_out``) are the first source's;
``init_lora_weights`` becomes ``True`` (PEFT keeps the first's, and a ``"pissa"``/``"olora"`` there makes PEFT
re-initialise, i.e. rewrite, the base weights for the new adapter). ``target_modules`` is the union of the
sources' targets (PEFT: the union of the lists, or the alternation of regexes); when that config does not
target exactly the union of the sources' modules (different ``layers_to_transform``), reflora lists the
modules in a regex instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from reflora.backend import Array, namespace
from reflora.config import ConfigError, GPT2Config, LoraConfig
from reflora.targets import LoraModule, module_names, plan_lora
from reflora.validate import check_adapter

DARE_TYPES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")  # random pruning: need keep_masks
COMBINATION_TYPES = ("cat", "linear", "svd", "ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd", *DARE_TYPES)
PRUNED_TYPES = ("ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd", *DARE_TYPES)  # need ``density``
# combine A_i and B_i separately: equal ranks
FACTOR_TYPES = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


def max_rank(lora: LoraConfig) -> int:
    """PEFT's rank of a source adapter: ``r``, or the largest rank of its ``rank_pattern`` (the rank that
    ``linear``, ``cat`` and the default ``svd_rank`` count)."""
    return max(lora.r, *lora.rank_pattern.values()) if lora.rank_pattern else lora.r


def combined_rank(combination_type: str, sources: Sequence[LoraConfig], svd_rank: int | None = None) -> int:
    """The new adapter's rank: ``linear`` keeps the sources' (equal) rank, ``cat`` sums them, ``svd`` is
    ``svd_rank`` or the largest; a single source is always combined linearly (``max_rank`` of each source)."""
    ranks = [max_rank(s) for s in sources]
    kind = "linear" if len(sources) == 1 else combination_type
    if kind in FACTOR_TYPES:
        return ranks[0]
    return sum(ranks) if kind == "cat" else svd_rank or max(ranks)


def combined_config(sources: Sequence[LoraConfig], config: GPT2Config, new_rank: int) -> LoraConfig:
    """The new adapter's config (see "Scaling" in the module docstring)."""
    first = sources[0]
    kinds = {isinstance(s.target_modules, str) for s in sources}
    if len(kinds) > 1:
        raise ConfigError("the sources mix list and regex target_modules (PEFT refuses this too)")
    targets = [s.target_modules if s.target_modules is not None else ("c_attn",) for s in sources]
    if isinstance(targets[0], str):
        target_modules: tuple[str, ...] | str = "|".join(f"({t})" for t in targets)
    else:
        target_modules = tuple(dict.fromkeys(t for ts in targets for t in ts))
    alpha = math.sqrt(new_rank) if first.use_rslora else new_rank
    new = dataclasses.replace(
        first, r=new_rank, lora_alpha=alpha, target_modules=target_modules, rank_pattern={}, alpha_pattern={},
        init_lora_weights=True, lora_bias=any(s.lora_bias for s in sources),
    )  # fmt: skip
    union = {name for s in sources for name in plan_lora(config, s)}
    if set(plan_lora(config, new)) != union:
        names = "|".join(re.escape(n) for n in sorted(union))
        new = dataclasses.replace(new, target_modules=names, layers_to_transform=None, layers_pattern=None)
    return new


def add_weighted_adapter(
    config: GPT2Config,
    adapters: Mapping[str, tuple[LoraConfig, Mapping[str, Array]]],
    names: Sequence[str],
    weights: Sequence[float],
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    keep_masks: Mapping[str, Sequence[Array]] | None = None,
) -> tuple[LoraConfig, dict[str, Array]]:
    """``(config, tensors)`` of the combination of ``adapters[names[i]]`` with ``weights[i]`` (module docstring);
    ``density`` (0 ≤ density, ≥ 1 keeps everything; DARE: 0 < density) and ``majority_sign_method`` are the
    pruning types' own. ``keep_masks`` (DARE types with density < 1 only): mask key -> one keep-mask per source
    that targets the module, in ``names`` order, each of the task tensor's shape (``dare_mask_shapes``)."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    names = list(names)
    if not names or len(names) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(names)} names, {len(weights)} weights")
    unknown = [n for n in names if n not in adapters]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; known: {list(adapters)}")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    sources = [adapters[n][0] for n in names]
    dtype = next(iter(adapters[names[0]][1].values())).dtype
    for name in names:
        check_adapter(adapters[name][1], adapters[name][0], config, dtype, where=f"adapters[{name!r}]")
    dora = [n for n, s in zip(names, sources) if s.use_dora]
    if dora:
        raise ValueError(f"adapters {dora} use DoRA: a weighted combination of DoRA adapters is not a LoRA adapter")
    _check_same_slices(names, sources)
    saving = [n for n, s in zip(names, sources, strict=True) if s.modules_to_save is not None]
    if saving:  # a modules_to_save copy is a full module, not a low-rank delta to combine
        raise ValueError(f"adapters {saving} use modules_to_save: reflora does not combine their copies")
    tokens = [n for n, s in zip(names, sources, strict=True) if s.trainable_token_indices is not None]
    if tokens:  # the new rows replace wte's rows: not a low-rank delta to combine
        raise ValueError(f"adapters {tokens} use trainable_token_indices: reflora does not combine their new rows")
    if len(names) == 1:
        combination_type = "linear"  # PEFT: a single adapter is always combined linearly (exact)
    if combination_type in PRUNED_TYPES:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not density >= 0:
            raise ValueError(f"combination_type={combination_type!r} needs density >= 0, got {density!r}")
        if combination_type in DARE_TYPES and density == 0:
            raise ValueError(f"combination_type={combination_type!r} needs density > 0: DARE rescales by "
                             "1/density (PEFT's random_pruning divides by it and returns NaN at 0)")  # fmt: skip
        if majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise ValueError(
                f"majority_sign_method must be one of {MAJORITY_SIGN_METHODS}, got {majority_sign_method!r}"
            )
    ranks = [max_rank(s) for s in sources]
    if combination_type in FACTOR_TYPES and len(set(ranks)) != 1:
        raise ValueError(f"combination_type={combination_type!r} needs equal ranks, got {dict(zip(names, ranks))}")
    if combination_type.endswith("svd") and svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    new_rank = combined_rank(combination_type, sources, svd_rank)
    new = combined_config(sources, config, new_rank)
    plans = [plan_lora(config, s) for s in sources]
    masks = _checked_masks(config, sources, combination_type, density, keep_masks)
    tensors: dict[str, Array] = {}
    for module_name, module in plan_lora(config, new).items():
        parts = [(w, p[module_name], adapters[n][1]) for n, w, p in zip(names, weights, plans) if module_name in p]
        for index, branch in enumerate(module.branches):
            srcs = [(w, m.scaling, t[m.branches[index].a_key], t[m.branches[index].b_key]) for w, m, t in parts]
            branch_masks = [masks.get(k) for k in mask_keys(combination_type, module, index)] if masks else None
            A, B = _combine(combination_type, srcs, new_rank, module_name, density, majority_sign_method,
                            branch_masks)  # fmt: skip
            tensors[branch.a_key], tensors[branch.b_key] = A, B
            if branch.bias_key is not None:
                tensors[branch.bias_key] = _combined_bias(parts, index, branch.out_stop - branch.out_start, A)
    return new, tensors


def _check_same_slices(names: Sequence[str], sources: Sequence[LoraConfig]) -> None:
    """Refuse sources whose ``qkv_slices`` differ: their c_attn branches do not correspond one to one."""
    if len({s.qkv_slices for s in sources}) > 1:
        slices = {n: list(s.qkv_slices) if s.qkv_slices else None for n, s in zip(names, sources, strict=True)}
        raise ValueError(f"the adapters have different qkv_slices {slices}; their branches cannot be combined")


def _combine(
    kind: str,
    srcs: list[tuple[float, float, Array, Array]],
    rank: int,
    where: str,
    density: float | None = None,
    sign_method: str = "total",
    masks: list | None = None,
) -> tuple[Array, Array]:
    """A (rank, in), B (out, rank) of one branch from [(w, s, A_i, B_i)]; ``masks`` (DARE, density < 1): the
    keep-masks [of the A_i, of the B_i] (factor types) or [of the s_i B_i A_i] (``_svd`` types)."""
    xp = namespace(*(a for _, _, a, _ in srcs))
    in_f, out_f, dtype = srcs[0][2].shape[1], srcs[0][3].shape[0], srcs[0][2].dtype
    if kind in ("ties", "magnitude_prune", "dare_linear", "dare_ties"):
        ranks = {a.shape[0] for _, _, a, _ in srcs}
        if len(ranks) != 1:
            raise ValueError(f"combination_type={kind!r} needs equal ranks on {where}, got {sorted(ranks)}")
        a_masks, b_masks = masks if masks else (None, None)
        signed = [math.copysign(math.sqrt(abs(w * s)), w * s) for w, s, _, _ in srcs]
        A = _task_merge(kind, [a for _, _, a, _ in srcs], signed, density, sign_method, a_masks)
        B = _task_merge(kind, [b for _, _, _, b in srcs], [math.sqrt(abs(w * s)) for w, s, _, _ in srcs], density,
                        sign_method, b_masks)  # fmt: skip
    elif kind in ("ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"):
        deltas = [s * xp.matmul(b, a) for _, s, a, b in srcs]  # s_i B_i A_i (out, in)
        delta = _task_merge(kind.removesuffix("_svd"), deltas, [w for w, _, _, _ in srcs], density, sign_method,
                            masks[0] if masks else None)  # fmt: skip
        U, S, Vh = xp.linalg.svd(delta, full_matrices=False)
        B = U[:, :rank] * xp.reshape(S[:rank], (1, -1))
        A = Vh[:rank, :]
    elif kind == "cat":
        A = xp.concat([(w * s) * a for w, s, a, _ in srcs], axis=0)  # (Σ r_i, in)
        B = xp.concat([b for _, _, _, b in srcs], axis=1)  # (out, Σ r_i)
    elif kind == "linear":
        ranks = {a.shape[0] for _, _, a, _ in srcs}
        if len(ranks) != 1:
            raise ValueError(f"combination_type='linear' needs equal ranks on {where}, got {sorted(ranks)}")
        A = sum(
            (math.copysign(math.sqrt(abs(w * s)), w * s) * a for w, s, a, _ in srcs), start=xp.zeros_like(srcs[0][2])
        )
        B = sum((math.sqrt(abs(w * s)) * b for w, s, _, b in srcs), start=xp.zeros_like(srcs[0][3]))
    else:
        delta = sum((w * s) * xp.matmul(b, a) for w, s, a, b in srcs)  # (out, in)
        U, S, Vh = xp.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
        B = U[:, :rank] * xp.reshape(S[:rank], (1, -1))  # (out, ≤ rank)
        A = Vh[:rank, :]  # (≤ rank, in)
    # zero rows/columns up to the new rank: a module with lower-rank sources (rank_pattern), or k < svd_rank
    if A.shape[0] < rank:
        A = xp.concat([A, xp.zeros((rank - A.shape[0], in_f), dtype=dtype)], axis=0)
        B = xp.concat([B, xp.zeros((out_f, rank - B.shape[1]), dtype=dtype)], axis=1)
    return A, B


def _combined_bias(parts: list[tuple[float, LoraModule, Mapping]], index: int, n_out: int, like: Array) -> Array:
    """b_B = Σ_i w_i s_i b_i (new scaling 1); a source without ``lora_bias`` contributes 0."""
    xp = namespace(like)
    bias = xp.zeros((n_out,), dtype=like.dtype)
    for w, module, t in parts:
        key = module.branches[index].bias_key
        if key is not None:
            bias = bias + (w * module.scaling) * t[key]
    return bias


def magnitude_mask(task: Array, density: float) -> Array:
    """PEFT's ``magnitude_based_pruning`` mask (same shape as ``task``, 1.0 kept / 0.0 pruned): the
    k = ⌊density · numel⌋ entries of largest |value| are kept (``torch.topk``; on equal magnitudes the first in
    row-major order); density ≥ 1 keeps everything (PEFT's ``prune`` returns the tensor unchanged)."""
    xp = namespace(task)
    if density >= 1:
        return xp.ones_like(task)
    flat = xp.reshape(xp.abs(task), (-1,))
    k = int(density * flat.shape[0])
    order = xp.argsort(-flat, stable=True)  # position p holds the index of the p-th largest
    position = xp.argsort(order, stable=True)  # the inverse permutation: each entry's place in that order
    return xp.reshape(xp.astype(position < k, task.dtype), task.shape)


def _task_merge(
    kind: str, tasks: list[Array], weights: list[float], density: float, sign_method: str, masks: list | None = None
) -> Array:
    """PEFT's ``merge_utils`` on task tensors T_i (all one shape) with weights c_i:

    * prune: P_i = T_i ⊙ M_i, M_i = ``magnitude_mask(T_i, density)`` (on the unweighted T_i); DARE
      (``dare_*``): P_i = T_i ⊙ M_i / density with the given keep-masks ``masks[i]`` (density ≥ 1: P_i = T_i);
    * ``magnitude_prune`` / ``dare_linear``: Σ_i c_i P_i;
    * ``ties`` / ``dare_ties``: elect a sign per entry from the pruned, unweighted P_i: σ = +1 where Σ_i P_i ≥ 0
      (``"total"``) or Σ_i sign(P_i) ≥ 0 (``"frequency"``), else −1; keep K_i = [sign(P_i) = σ] (a pruned or
      zero entry is never kept); result Σ_i c_i P_i K_i / max(1, Σ_i K_i) (the disjoint mean; the weights are
      not normalised).
    """
    xp = namespace(*tasks)
    if kind.startswith("dare"):
        kept = tasks if density >= 1 else [t * xp.astype(m, t.dtype) / density for t, m in zip(tasks, masks)]
        pruned = xp.stack(kept, axis=0)  # (K, ...)
    else:
        pruned = xp.stack([t * magnitude_mask(t, density) for t in tasks], axis=0)  # (K, ...)
    coeffs = xp.reshape(xp.asarray(weights, dtype=pruned.dtype), (len(weights),) + (1,) * (pruned.ndim - 1))
    weighted = pruned * coeffs
    if kind in ("magnitude_prune", "dare_linear"):
        return xp.sum(weighted, axis=0)
    sign = xp.sign(pruned)
    votes = xp.sum(pruned if sign_method == "total" else sign, axis=0)
    majority = xp.where(votes >= 0, xp.ones_like(votes), -xp.ones_like(votes))
    keep = xp.astype(sign == majority, pruned.dtype)
    count = xp.sum(keep, axis=0)
    return xp.sum(weighted * keep, axis=0) / xp.maximum(count, xp.ones_like(count))


def mask_keys(kind: str, module: LoraModule, index: int = 0) -> tuple[str, ...]:
    """The keep-mask keys of branch ``index`` of ``module``: its A and B keys (factor types), or
    ``"<module>.delta"`` (``"<module>.delta.<index>"`` with several branches) for the ``_svd`` types."""
    branch = module.branches[index]
    if kind in FACTOR_TYPES:
        return (branch.a_key, branch.b_key)
    return (f"{module.name}.delta" + (f".{index}" if len(module.branches) > 1 else ""),)


def dare_mask_shapes(
    config: GPT2Config, sources: Sequence[LoraConfig], combination_type: str
) -> dict[str, list[tuple[int, ...]]]:
    """The keep-masks a DARE combination of ``sources`` (in ``names`` order) needs, in PEFT's draw order:
    mask key -> one shape per source that targets the module (in source order). Modules in model order; per
    module A's masks (r_i, in) then B's (out, r_i) for ``dare_linear`` / ``dare_ties``, or one (out, in) mask
    of ΔWt_i = s_i B_i A_i for the ``_svd`` forms (key ``mask_keys``': ``<module>.delta``, or ``<module>.delta.<i>``
    per branch i with ``qkv_slices``). Sources with different ``qkv_slices`` are refused (ValueError). (PEFT draws the same masks of the (in, out) ΔW of a Conv1D or
    Embedding: the transposes of these.) Empty for any other combination type, and for one source (``linear``)."""
    if combination_type not in DARE_TYPES or len(sources) == 1:
        return {}
    _check_same_slices([f"#{i}" for i in range(len(sources))], sources)
    plans = [plan_lora(config, s) for s in sources]
    targeted = {name for p in plans for name in p}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for module_name in (name for name in module_names(config) if name in targeted):  # model order
        parts = [p[module_name] for p in plans if module_name in p]
        for index in range(len(parts[0].branches)):
            keys = mask_keys(combination_type, parts[0], index)
            for m in parts:
                b = m.branches[index]
                width = b.out_stop - b.out_start
                if combination_type in FACTOR_TYPES:
                    shapes.setdefault(keys[0], []).append((m.r, m.in_features))
                else:
                    shapes.setdefault(keys[0], []).append((width, m.in_features))
            if combination_type in FACTOR_TYPES:
                for m in parts:
                    b = m.branches[index]
                    shapes.setdefault(keys[1], []).append((b.out_stop - b.out_start, m.r))
    return shapes


def draw_dare_masks(shapes: Mapping[str, Sequence[tuple[int, ...]]], density: float, rng) -> dict[str, list]:
    """Keep-masks for ``dare_mask_shapes``: each entry 1.0 with probability ``density`` (``rng.random() <
    density``, float64), drawn key by key and source by source in that order."""
    return {key: [(rng.random(shape) < density).astype("float64") for shape in group] for key, group in shapes.items()}


def _checked_masks(
    config: GPT2Config,
    sources: Sequence[LoraConfig],
    kind: str,
    density: float | None,
    keep_masks: Mapping[str, Sequence[Array]] | None,
) -> dict[str, list]:
    """``keep_masks`` checked against ``dare_mask_shapes`` (keys, counts, shapes, values 0/1), or {} where no
    mask is used (not DARE, one source, density ≥ 1)."""
    if kind not in DARE_TYPES or len(sources) == 1 or density >= 1:
        return {}
    if keep_masks is None:
        raise ValueError(f"combination_type={kind!r} with density {density} < 1 needs keep_masks "
                         "(reflora.weighted.dare_mask_shapes)")  # fmt: skip
    shapes = dare_mask_shapes(config, sources, kind)
    if set(keep_masks) != set(shapes):
        missing, extra = sorted(set(shapes) - set(keep_masks)), sorted(set(keep_masks) - set(shapes))
        raise ValueError(f"keep_masks: missing keys {missing[:3]}, unexpected keys {extra[:3]}")
    out = {}
    for key, group in shapes.items():
        masks = list(keep_masks[key])
        if len(masks) != len(group):
            raise ValueError(f"keep_masks[{key!r}]: {len(masks)} masks for {len(group)} sources")
        for i, (mask, shape) in enumerate(zip(masks, group)):
            if tuple(mask.shape) != tuple(shape):
                raise ValueError(f"keep_masks[{key!r}][{i}] has shape {tuple(mask.shape)}, expected {shape}")
            xp = namespace(mask)
            if not bool(xp.all((mask == 0) | (mask == 1))):
                raise ValueError(f"keep_masks[{key!r}][{i}] must hold only 0.0 and 1.0")
        out[key] = masks
    return out
