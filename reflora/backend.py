"""The array namespace: one code path for NumPy, CuPy and any array-API-standard namespace.

Every op takes its namespace from its arrays (``x.__array_namespace__()``), never from a global, so the
same function runs on NumPy arrays on the CPU, CuPy arrays on the GPU, and ``array_api_strict`` arrays in
the tests (which proves the code uses nothing outside the standard). Only two helpers below step outside
the standard, and each says why.
"""

from __future__ import annotations

from typing import Any

Array = Any  # an array of some array-API namespace


def namespace(*arrays: Array):
    """The array namespace shared by ``arrays`` (``None`` entries are skipped)."""
    spaces = {id(a.__array_namespace__()): a.__array_namespace__() for a in arrays if a is not None}
    if len(spaces) != 1:
        raise TypeError(f"expected arrays of one array namespace, got {len(spaces)} namespaces")
    return next(iter(spaces.values()))


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


def scatter_add_rows(xp, num_rows: int, index: Array, values: Array) -> Array:
    """``out[index[n], :] += values[n, :]`` for every n, on a zero (num_rows, C) array.

    The array API standard has no scatter-add, so this uses the namespace's own primitive where it has one
    (NumPy ``add.at``, CuPy ``cupyx.scatter_add``) and otherwise the exact one-hot product
    ``onehot(index)ᵀ @ values``, which is O(N·num_rows·C) but standard.
    index: (N,) int; values: (N, C) -> (num_rows, C)
    """
    out = xp.zeros((num_rows, values.shape[1]), dtype=values.dtype)
    name = getattr(xp, "__name__", "")
    if name == "numpy":
        xp.add.at(out, index, values)
    elif name == "cupy":  # pragma: no cover - needs a GPU
        import cupyx

        cupyx.scatter_add(out, index, values)
    else:
        onehot = xp.astype(index[:, None] == xp.arange(num_rows)[None, :], values.dtype)  # (N, num_rows)
        out = xp.matmul(xp.matrix_transpose(onehot), values)
    return out
