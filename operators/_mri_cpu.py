"""The SENSE operator's CPU chains without an autograd graph (``mri``): reused per-thread
buffers, scipy's FFT in place, the sampled-columns paths of column masks, and a pool of
recycled result buffers.

Fresh coil-sized CPU allocations are page-faulted in on every call, which costs as much as the
FFT itself, and torch's CPU FFT into ``out=`` computes into a temporary and copies back; so
these chains keep their data in ``_cpu_spmm.workspace`` buffers and transform them in place
with scipy's pocketfft, with the numba passes of ``_sense_kernels`` around it and no torch op
in between (torch's OpenMP workers keep spinning after one, slowing scipy's FFT).

The result of ``A`` is coil-sized and must be fresh (the caller keeps it). glibc hands blocks
over 32 MiB back to the kernel when they are freed, so every fresh one is page-faulted in again
(B=4, 15 coils, 320^2: writing 49 MB into fresh memory 13 ms, into paged-in memory 3 ms). So
the sampled-columns ``A`` writes into ``result_buffer``s: huge-page mappings handed out as
tensors and taken back when the tensor dies (its memory is never shared with a live tensor),
at most ``POOL_KEEP`` free ones per size and ``POOL_MAX_BYTES`` in all (older sizes dropped
first), like the caching allocator torch uses on CUDA. ``FEDRECON_CPU_POOL=off`` allocates
plainly; ``clear_scratch`` also empties the pool.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import scipy.fft
import torch
from torch import Tensor

from . import _cpu_spmm, _sense_kernels

__all__ = ["POOL_ENV_VAR", "POOL_KEEP", "POOL_MAX_BYTES", "clear_scratch", "columns_adjoint_fft",
           "columns_forward_fft", "fft_inplace", "pool_stats", "result_buffer", "scratch"]

_SCRATCH = "mri_scratch"  # this module's ``_cpu_spmm.workspace`` buffers: coil-sized
_COLUMNS = "mri_columns"  # the sampled columns of coil data (``columns_adjoint_fft``)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


POOL_ENV_VAR = "FEDRECON_CPU_POOL"  # "off": plain allocations for the results
POOL_KEEP = 2  # free result buffers kept per size
POOL_MAX_BYTES = 512 << 20  # and in all (the sizes given back longest ago are dropped first)
_POOL_MIN_BYTES = 4 << 20  # smaller blocks come back from malloc's heap without page faults
_POOL_LOCK = threading.Lock()
# free mappings by size, the size given back most recently last
_POOL: OrderedDict[int, list[mmap.mmap]] = OrderedDict()
_POOL_COUNTS = {"new": 0, "reused": 0}


def _reset_pool_in_child() -> None:
    """In a forked child: a fresh lock (another thread may have held the parent's at the
    fork) and an empty pool (the child's copies of the free buffers are not needed)."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_in_child)


def _give_back(region: mmap.mmap) -> None:
    """A dead result's mapping back into the pool. Beyond the pool's bounds the oldest free
    mappings are dropped (unmapped with their last reference): first those of the sizes
    given back longest ago, so a caller that moves on to another shape does not leave the
    old one's buffers held."""
    with _POOL_LOCK:
        size = len(region)
        if size > POOL_MAX_BYTES:
            return
        _POOL.setdefault(size, []).append(region)
        _POOL.move_to_end(size)
        del _POOL[size][:-POOL_KEEP]
        held = sum(len(r) for rs in _POOL.values() for r in rs)
        while held > POOL_MAX_BYTES:
            oldest = next(iter(_POOL))
            free = _POOL[oldest]
            if free:
                held -= len(free.pop(0))
            if not free:
                del _POOL[oldest]


def result_buffer(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor of ``shape`` and ``dtype`` for a result that leaves the
    call: from the pool (a mapping freed by an earlier result, already paged in) or a new
    huge-page mapping, given back to the pool when the tensor and every view of it are gone.
    Small sizes and ``FEDRECON_CPU_POOL=off``: ``torch.empty``."""
    dt = _np_dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    if nbytes < _POOL_MIN_BYTES or _cpu_spmm.switched_off(POOL_ENV_VAR):
        return torch.empty(tuple(shape), dtype=dtype)
    with _POOL_LOCK:
        free = _POOL.get(nbytes)
        region = free.pop() if free else None
        if free is not None and not free:
            del _POOL[nbytes]
        _POOL_COUNTS["reused" if region is not None else "new"] += 1
    if region is None:
        region = _cpu_spmm.huge_mapping(nbytes)
        if region is None:  # no huge-page mappings here: a plain result
            return torch.empty(tuple(shape), dtype=dtype)
    arr = np.frombuffer(region, dtype=dt, count=count).reshape(tuple(shape))
    # the tensor holds ``arr`` (torch.from_numpy): it dies with the last tensor on its memory
    weakref.finalize(arr, _give_back, region).atexit = False
    return torch.from_numpy(arr)


def pool_stats() -> dict[str, int]:
    """The pool's counts: result buffers newly mapped and reused, free buffers and bytes."""
    with _POOL_LOCK:
        return {**_POOL_COUNTS, "free": sum(len(rs) for rs in _POOL.values()),
                "free_bytes": sum(len(r) for rs in _POOL.values() for r in rs)}


def scratch(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A per-thread CPU buffer of ``shape`` and ``dtype``, reused from call to call
    (``_cpu_spmm.workspace``: one shape at a time, bounded memory); its contents never escape
    a call."""
    return torch.from_numpy(_cpu_spmm.workspace(_SCRATCH, tuple(shape), _np_dtype(dtype)))


def clear_scratch() -> None:
    """Release this thread's reusable MRI buffers and the pool's free result buffers."""
    _cpu_spmm.release_workspace(_SCRATCH)
    _cpu_spmm.release_workspace(_COLUMNS)
    with _POOL_LOCK:
        _POOL.clear()


def fft_inplace(buf: Tensor | np.ndarray, inverse: bool = False,
                axes: tuple[int, ...] = (-2, -1)) -> Tensor | np.ndarray:
    """Orthonormal (i)FFT over ``axes`` (default: the last two) of a contiguous CPU ``buf``
    (tensor or array), in place (scipy's pocketfft: ~1.2x faster here than torch's FFT into
    ``out=``). Only for buffers whose contents never escape a call."""
    fn = scipy.fft.ifftn if inverse else scipy.fft.fftn
    arr = buf.numpy() if isinstance(buf, Tensor) else buf
    out = fn(arr, axes=axes, norm="ortho", workers=max(1, torch.get_num_threads()),
             overwrite_x=True)
    if not np.may_share_memory(out, arr):
        arr[...] = out  # pocketfft declined to overwrite (never seen for contiguous c64/c128)
    return buf


def column_weights(mask_rows: Tensor, cols: Tensor, sign: float, dtype: torch.dtype) -> Tensor:
    """The k-space mask at the sampled columns ``cols`` of ``mask_rows (..., W)`` on the CPU
    as ``(2, ..., n)`` ``dtype``, by the parity of the row: the fast path's k-space
    checkerboard ``sign * (-1)^(i + j)`` (``columns_adjoint_fft``'s ``weights``)."""
    rdtype = torch.empty((), dtype=dtype).real.dtype
    m = mask_rows.to("cpu", rdtype).index_select(-1, cols) * (sign * (1 - 2 * (cols % 2)).to(rdtype))
    return torch.stack([m, -m]).to(dtype)


def columns_adjoint_fft(y: Tensor, cols: np.ndarray, weights: Tensor,
                        rows_per_sample: int) -> Tensor | None:
    """``ifft2(M y)`` of contiguous CPU coil data ``y (..., H, W)`` whose mask samples only the
    columns ``cols``: the sampled columns times ``weights`` (``column_weights``, flattened to
    ``(2, samples or 1, n)``) gathered into a reused buffer, the inverse FFT along ``H`` over
    them only, scattered into the zero-filled scratch buffer row by row, the inverse FFT
    along ``W`` there; returns that buffer (B=4, 15 coils, 320^2, 81 of 320 columns, with the
    combine: 38.6 vs 44 ms for the full scratch path). None where the CPU kernels do not
    run."""
    g = _cpu_spmm.workspace(_COLUMNS, (*y.shape[:-1], len(cols)), _np_dtype(y.dtype))
    if _sense_kernels.cpu_gather_columns(y, cols, weights, g, rows_per_sample) is None:
        return None
    buf = scratch(y.shape, y.dtype)
    _sense_kernels.cpu_scatter_columns(fft_inplace(g, inverse=True, axes=(-2,)), cols, buf)
    return fft_inplace(buf, inverse=True, axes=(-1,))


def columns_forward_fft(buf: Tensor, cols: np.ndarray, weights: Tensor,
                        rows_per_sample: int) -> Tensor | None:
    """``M fft2(buf)`` for coil images in a contiguous CPU scratch buffer ``buf (..., H, W)``
    (overwritten) and a mask that samples only the columns ``cols``: the FFT along ``W`` in
    place, the sampled columns gathered into a reused buffer, the FFT along ``H`` over them
    only, then scattered times ``weights`` (``column_weights``, as in
    ``columns_adjoint_fft``) into a zero-filled ``result_buffer``, which is returned. None
    where the CPU kernels do not run."""
    if not (_sense_kernels.cpu_ready(buf, weights) and buf.is_contiguous()):
        return None  # (checked before ``buf`` is transformed: the caller falls back on it)
    g = _cpu_spmm.workspace(_COLUMNS, (*buf.shape[:-1], len(cols)), _np_dtype(buf.dtype))
    _sense_kernels.cpu_gather_columns(fft_inplace(buf, axes=(-1,)), cols, None, g, 1)
    out = result_buffer(buf.shape, buf.dtype)
    return _sense_kernels.cpu_scatter_columns(fft_inplace(g, axes=(-2,)), cols, out, weights,
                                              rows_per_sample)
