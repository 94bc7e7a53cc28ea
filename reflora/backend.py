"""The array namespace: one code path for NumPy, CuPy and any array-API-standard namespace.

Every op takes its namespace from its arrays (``x.__array_namespace__()``), never from a global, so the
same function runs on NumPy arrays on the CPU, CuPy arrays on the GPU, and ``array_api_strict`` arrays in
the tests (which proves the code uses nothing outside the standard). Three helpers below step outside
the standard (``to_numpy``, ``scatter_add_rows``, ``add_at_columns``), and each says why. CuPy arrays do not
carry the standard's ``__array_namespace__``, so ``namespace`` gives them array-api-compat's CuPy wrapper.

``for_each_row_block`` is the one concession to speed on the CPU: big elementwise passes (the softmax over
the vocabulary, GELU, LayerNorm) and attention's small per-head products go through their rows in blocks that
fit in a core's L2 cache, on as many threads as the BLAS uses (each block's products on one BLAS thread), so
that a chain of NumPy operations reads main memory once and no core idles between two matrix products.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Array = Any  # an array of some array-API namespace


def namespace(*arrays: Array):
    """The array namespace shared by ``arrays`` (``None`` entries are skipped)."""
    spaces = {}
    for array in arrays:
        if array is not None:
            xp = _namespace_of(array)
            spaces[id(xp)] = xp
    if len(spaces) != 1:
        raise TypeError(f"expected arrays of one array namespace, got {len(spaces)} namespaces")
    return next(iter(spaces.values()))


def _namespace_of(array: Array):
    get_namespace = getattr(array, "__array_namespace__", None)
    xp = get_namespace() if get_namespace is not None else None
    if xp is None or getattr(xp, "__name__", "") == "cupy":
        if not type(array).__module__.startswith("cupy"):
            raise TypeError(f"{type(array).__name__} is not an array-API array: it has no __array_namespace__")
        # CuPy's own namespace lacks parts of the standard (vecdot, matrix_transpose, ...): use its
        # standard wrapper, which hands back plain CuPy arrays.
        try:
            from array_api_compat import cupy as xp
        except ImportError as exc:  # pragma: no cover - needs CuPy
            raise RuntimeError(
                "CuPy arrays need array-api-compat: pip install 'reflora[gpu]' array-api-compat"
            ) from exc
    return xp


def library(xp) -> str:
    """The array library under a namespace: ``"numpy"``, ``"cupy"`` (also through array-api-compat), or the
    namespace's own name (``"array_api_strict"``)."""
    return getattr(xp, "__name__", "").rsplit(".", 1)[-1]


def get_backend(name: str):
    """The namespace for a documented backend switch: ``"numpy"``, ``"cupy"`` or ``"array_api_strict"``."""
    if name == "numpy":
        import numpy

        return numpy
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError("backend 'cupy' needs CuPy: pip install 'reflora[gpu]'") from exc
        return cupy
    if name == "array_api_strict":
        import array_api_strict

        return array_api_strict
    raise ValueError(f"backend must be 'numpy', 'cupy' or 'array_api_strict', got {name!r}")


def to_namespace(xp, array: Array) -> Array:
    """Copy a NumPy array into namespace ``xp`` (``xp.asarray``; CuPy copies host to device)."""
    return xp.asarray(array)


def to_numpy(array: Array):
    """A NumPy copy of any backend's array (CuPy: ``.get()``; standard namespaces: DLPack or buffer)."""
    import numpy

    if isinstance(array, numpy.ndarray):
        return array
    if hasattr(array, "get"):  # CuPy
        return array.get()
    try:
        return numpy.from_dlpack(array)
    except (TypeError, RuntimeError, AttributeError, BufferError):
        return numpy.asarray(array)


# Bytes of one row block: half of a 2 MiB per-core L2 cache, leaving room for the block's temporaries.
BLOCK_BYTES = 1 << 20
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool), made on first use
_BLAS_CONTROLLER: Any = None  # threadpoolctl's controller, made on first use; False when not installed


def num_threads() -> int:
    """Threads for ``for_each_row_block`` on NumPy: ``REFLORA_NUM_THREADS``, else ``OMP_NUM_THREADS``, else
    ``OPENBLAS_NUM_THREADS`` (the BLAS's own count), else the CPUs this process may run on."""
    for name in ("REFLORA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def row_blocks(x: Array, threads: int = 1) -> list[slice]:
    """Slices that cover the rows (first axis) of ``x`` in equal blocks of at most about ``BLOCK_BYTES``
    (at least one row each), as many as a multiple of ``threads``. One block on any namespace but NumPy."""
    n_rows = x.shape[0]
    if library(namespace(x)) != "numpy" or n_rows == 0:
        return [slice(0, n_rows)]
    total_bytes = math.prod(x.shape) * x.dtype.itemsize
    n_blocks = -(-max(1, total_bytes // BLOCK_BYTES) // threads) * threads  # rounded up to a multiple
    n_blocks = min(n_rows, n_blocks)
    return [slice(n_rows * i // n_blocks, n_rows * (i + 1) // n_blocks) for i in range(n_blocks)]


def for_each_row_block(work: Callable[[slice], None], x: Array) -> None:
    """Call ``work(rows)`` for every block of ``row_blocks(x)``; each call must touch only its own rows.

    The one concession to speed on the CPU. NumPy runs each elementwise operation over a whole array, one
    core, one trip to memory per operation; ``work`` runs a chain of operations on a block that stays in
    cache, and the blocks run on ``num_threads()`` threads (NumPy releases the GIL inside its loops), as
    torch runs its elementwise kernels. A GPU wants few, large kernels: there, and on any other namespace,
    ``work`` runs once over all rows. The results do not depend on the blocking: each row is computed alone.
    """
    global _POOL
    threads = num_threads() if library(namespace(x)) == "numpy" else 1
    blocks = row_blocks(x, threads)
    if threads == 1 or len(blocks) == 1:
        for rows in blocks:
            work(rows)
        return
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != threads:  # new after a fork or a change
        _POOL = (os.getpid(), threads, ThreadPoolExecutor(threads - 1, thread_name_prefix="reflora"))
    shares = [blocks[i::threads] for i in range(threads)]  # this thread runs the first share itself
    with _one_blas_thread_each():
        others = [_POOL[2].submit(_run_blocks, work, share) for share in shares[1:]]
        _run_blocks(work, shares[0])
        for other in others:
            other.result()  # re-raises an exception from its blocks


def _one_blas_thread_each():
    """While the blocks run, the BLAS uses one thread per call: the blocks are the parallelism, and a block's
    small products (attention's per-head q kᵀ) then run side by side instead of queueing for the BLAS's own
    threads. Needs threadpoolctl; without it the BLAS keeps its count (correct, only slower). The limit is
    process-wide: two threads running reflora at once may leave the BLAS on one thread (slower, never wrong)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    if _BLAS_CONTROLLER is False:
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def _run_blocks(work: Callable[[slice], None], blocks: list[slice]) -> None:
    for rows in blocks:
        work(rows)


def add_at_columns(xp, array: Array, columns: Array, values: Array) -> Array:
    """``array[n, columns[n]] += values[n]`` for every row n, in place; returns ``array``.

    array: (N, M); columns: (N,) int; values: (N,). One element per row (a one-hot update, as in the
    cross-entropy gradient). NumPy and CuPy index it directly (N element updates); the array API standard has
    no scatter, so elsewhere the update is the exact one-hot product, O(N·M).
    """
    if library(xp) in ("numpy", "cupy"):
        array[xp.arange(array.shape[0]), columns] += values
    else:
        onehot = xp.astype(columns[:, None] == xp.arange(array.shape[1])[None, :], array.dtype)  # (N, M)
        array += onehot * values[:, None]
    return array


def scatter_add_rows(xp, num_rows: int, index: Array, values: Array) -> Array:
    """``out[index[n], :] += values[n, :]`` for every n, on a zero (num_rows, C) array.

    The array API standard has no scatter-add, so this uses the namespace's own primitive where it has one
    (NumPy ``add.at``, CuPy ``cupyx.scatter_add``) and otherwise the exact one-hot product
    ``onehot(index)ᵀ @ values``, which is O(N·num_rows·C) but standard.
    index: (N,) int; values: (N, C) -> (num_rows, C)
    """
    out = xp.zeros((num_rows, values.shape[1]), dtype=values.dtype)
    if library(xp) == "numpy":
        xp.add.at(out, index, values)
    elif library(xp) == "cupy":  # pragma: no cover - needs a GPU
        import cupyx

        cupyx.scatter_add(out, index, values)
    else:
        onehot = xp.astype(index[:, None] == xp.arange(num_rows)[None, :], values.dtype)  # (N, num_rows)
        out = xp.matmul(xp.matrix_transpose(onehot), values)
    return out
