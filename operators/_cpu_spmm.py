"""CPU sparse-times-dense product for the CT system matrices (numba), faster than MKL here.

torch's CPU product (MKL) of a Joseph matrix with an 8-image batch spends most of its time
waiting on the gathered rows of the dense operand, not on the matrix's bytes (a 170 MB
matrix is read at 9 GB/s of the 24 GB/s this 2-core machine streams). This kernel:

* applies the matrix one column chunk after the other (``chunked``: a re-laid-out copy,
  memoised on the matrix), so the dense rows a chunk gathers (``CHUNK_BYTES``) stay in a
  core's L2 cache;
* accumulates 8 batch lanes in registers with two interleaved accumulators: one 8-wide
  multiply-add per entry. LLVM packs the lanes into one vector only with its SLP
  vectoriser, which numba leaves off by default: it is switched on while this kernel
  compiles (``_compiled``) and restored;
* runs on plain Python threads, one row range each (``torch.get_num_threads()`` of them,
  balanced by entries), not numba's parallel loops: no second OpenMP runtime competing with
  torch's, nothing unsafe after a fork.

Measured on a 2-core AMD EPYC (Zen 1) against MKL: 0.56-0.72x MKL's time for the
backprojections and 0.7-0.8x for the forward projections of the benchmark geometries
(parallel and fan; 1 and 2 threads; docs/benchmarks.md); batches are padded to multiples of 8
lanes and still win at batch 1 (0.87x). Sums run in the operand's dtype in another order
than MKL's: ~3e-7 relative difference in float32, ~1e-15 in float64.

Costs: the chunked copy doubles the memory of each CPU matrix it is used with; the first
use in a process compiles the kernels (~1-2 s per dtype) unless numba's disk cache (next to
this file, or numba's user cache folder) holds them; the copy takes ~0.5-1 s per matrix.
Used by ``ct._SparseApply`` for CPU float32/float64 products of matrices with at least
``MIN_NNZ`` entries; anything else, or ``FEDRECON_CPU_SPMM=off``, uses ``mat @ x``.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "ENV_VAR", "MIN_NNZ", "available", "chunked", "matmul", "use_kernel"]

LANES = 8
CHUNK_BYTES = 3 << 17  # 384 KiB of gathered dense rows per column chunk (L2 is 512 KiB here)
MIN_NNZ = 1 << 20  # below this the compile time is not worth it and MKL is fast anyway
ENV_VAR = "FEDRECON_CPU_SPMM"
_OFF = {"off", "0", "false", "no", "none"}
_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()  # guards the compilation's switch of a numba-wide setting
_STATE: dict[str, object] = {}


def _spmm8(crow, col, val, x, out, n_rows, r0, r1):  # pragma: no cover - compiled by numba
    """``out[r, 0:8] += sum_p val[p] * x[col[p], 0:8]`` for rows ``r0 <= r < r1``, one column
    chunk after the other.

    ``crow`` has ``n_chunks * n_rows + 1`` offsets, row ``r`` of chunk ``c`` being CSR row
    ``c * n_rows + r``; ``x`` and ``out`` are flat row-major ``(n, 8)`` arrays. Unsigned
    indices spare numba's negative-index checks, which would stop the vectorisation.
    """
    u1, u8 = np.uint64(1), np.uint64(8)
    zero = out.dtype.type(0)
    for c in range((crow.shape[0] - 1) // n_rows):
        base = np.uint64(c * n_rows)
        for r in range(r0, r1):
            p = np.uint64(crow[base + np.uint64(r)])
            e = np.uint64(crow[base + np.uint64(r) + u1])
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
            b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = zero
            while p + u1 < e:
                i = np.uint64(col[p]) * u8
                v = val[p]
                j = np.uint64(col[p + u1]) * u8
                w = val[p + u1]
                a0 += v * x[i]
                a1 += v * x[i + np.uint64(1)]
                a2 += v * x[i + np.uint64(2)]
                a3 += v * x[i + np.uint64(3)]
                a4 += v * x[i + np.uint64(4)]
                a5 += v * x[i + np.uint64(5)]
                a6 += v * x[i + np.uint64(6)]
                a7 += v * x[i + np.uint64(7)]
                b0 += w * x[j]
                b1 += w * x[j + np.uint64(1)]
                b2 += w * x[j + np.uint64(2)]
                b3 += w * x[j + np.uint64(3)]
                b4 += w * x[j + np.uint64(4)]
                b5 += w * x[j + np.uint64(5)]
                b6 += w * x[j + np.uint64(6)]
                b7 += w * x[j + np.uint64(7)]
                p += np.uint64(2)
            if p < e:
                i = np.uint64(col[p]) * u8
                v = val[p]
                a0 += v * x[i]
                a1 += v * x[i + np.uint64(1)]
                a2 += v * x[i + np.uint64(2)]
                a3 += v * x[i + np.uint64(3)]
                a4 += v * x[i + np.uint64(4)]
                a5 += v * x[i + np.uint64(5)]
                a6 += v * x[i + np.uint64(6)]
                a7 += v * x[i + np.uint64(7)]
            o = np.uint64(r) * u8
            out[o] += a0 + b0
            out[o + np.uint64(1)] += a1 + b1
            out[o + np.uint64(2)] += a2 + b2
            out[o + np.uint64(3)] += a3 + b3
            out[o + np.uint64(4)] += a4 + b4
            out[o + np.uint64(5)] += a5 + b5
            out[o + np.uint64(6)] += a6 + b6
            out[o + np.uint64(7)] += a7 + b7


def _split_chunks(crow, col, val, width, crow_c, col_c, val_c):  # pragma: no cover - numba
    """Counting sort of the entries by ``(column chunk, row)``: stable, so each row of each
    chunk keeps its columns sorted; an entry's chunk is found by walking its row's sorted
    columns (no division). ``crow_c`` must come zeroed."""
    n_rows = crow.shape[0] - 1
    for r in range(n_rows):
        c, end = 0, width
        for p in range(crow[r], crow[r + 1]):
            while col[p] >= end:
                c += 1
                end += width
            crow_c[c * n_rows + r + 1] += 1
    for k in range(1, crow_c.shape[0]):
        crow_c[k] += crow_c[k - 1]
    for r in range(n_rows):
        c, end = 0, width
        q = crow_c[r]
        for p in range(crow[r], crow[r + 1]):
            while col[p] >= end:
                c += 1
                end += width
                q = crow_c[c * n_rows + r]
            col_c[q] = col[p]
            val_c[q] = val[p]
            q += 1


def _jit(name: str, fn, **opts):
    """``fn`` under numba (built once), with numba's disk cache where it can write one."""
    disp = _STATE.get(name)
    if disp is None:
        numba = _numba()
        opts.update(boundscheck=False, fastmath=False, nogil=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                disp = numba.njit(cache=True, **opts)(fn)
        except Exception:  # noqa: BLE001 - no usable cache folder: compile in memory
            disp = numba.njit(**opts)(fn)
        _STATE[name] = disp
    return disp


def _compiled(args: tuple):
    """The dispatcher, compiled for ``args``'s types with LLVM's SLP vectoriser on.

    ``numba.config.SLP_VECTORIZE`` is read when the optimisation passes are built, so it is
    set only around this compilation (under the lock) and restored.
    """
    numba = _numba()
    disp = _jit("spmm8", _spmm8)
    sig = tuple(numba.typeof(a) for a in args)
    if sig not in disp.overloads:
        with _LOCK:
            old = numba.config.SLP_VECTORIZE
            numba.config.SLP_VECTORIZE = True
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", numba.NumbaWarning)
                    disp.compile(sig)
            finally:
                numba.config.SLP_VECTORIZE = old
    return disp


def _numba():
    """numba, imported on first use (~0.3 s: not paid by ``import fedrecon``), or None."""
    if "numba" not in _STATE:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with sigpy, a dependency
            numba = None
        _STATE["numba"] = numba
    return _STATE["numba"]


def available() -> bool:
    """Whether numba is importable (it comes with sigpy, a dependency)."""
    return _numba() is not None


def chunked(mat: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``mat`` (sparse CSR, CPU) as column chunks of ``CHUNK_BYTES // (8 * itemsize)``
    columns, memoised on the tensor: ``(crow, col, val, n_rows)``, ``crow`` holding
    ``n_chunks * n_rows + 1`` offsets, columns still global. A copy of the matrix: reading
    the chunks in place, row by row, was 2-3x slower (a TLB miss per row and chunk)."""
    parts = getattr(mat, "_fedrecon_chunks", None)
    if parts is None:
        crow = mat.crow_indices().numpy()
        col = mat.col_indices().numpy()
        val = mat.values().numpy()
        n_rows, n_cols = mat.shape
        width = max(1, CHUNK_BYTES // (LANES * val.itemsize))
        n_chunks = max(1, -(-n_cols // width))
        if n_chunks == 1:
            parts = (crow, col, val, n_rows)
        else:
            crow_c = np.zeros(n_chunks * n_rows + 1, dtype=crow.dtype)
            col_c, val_c = np.empty_like(col), np.empty_like(val)
            _jit("split", _split_chunks)(crow, col, val, width, crow_c, col_c, val_c)
            parts = (crow_c, col_c, val_c, n_rows)
        mat._fedrecon_chunks = parts
    return parts


def _row_split(mat: Tensor) -> list[int]:
    """Row boundaries giving each of ``torch.get_num_threads()`` threads equal entries."""
    crow = mat.crow_indices()
    n = max(1, min(torch.get_num_threads(), mat.shape[0]))
    targets = torch.arange(1, n, dtype=crow.dtype) * (int(crow[-1]) // n)
    inner = torch.searchsorted(crow, targets).tolist()
    return [0, *inner, mat.shape[0]]


def _run_split(kernel, args: tuple, bounds: list[int]) -> None:
    """``kernel(*args, r0, r1)`` over consecutive row ranges, one Python thread each (the
    kernel releases the GIL). Plain threads rather than numba's parallel loops: no second
    OpenMP runtime competing with torch's for the cores, nothing unsafe after a fork."""
    ranges = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    workers = [threading.Thread(target=kernel, args=(*args, a, b)) for a, b in ranges[1:]]
    for w in workers:
        w.start()
    try:
        if ranges:
            kernel(*args, *ranges[0])
    finally:
        for w in workers:
            w.join()


def use_kernel(mat: Tensor, x: Tensor) -> bool:
    """Whether ``matmul`` runs the numba kernel for ``mat @ x`` (else torch's product);
    ``FEDRECON_CPU_SPMM=off`` in the environment turns the kernel off."""
    return (mat.device.type == "cpu" and x.device.type == "cpu" and x.ndim == 2
            and mat.layout == torch.sparse_csr and x.dtype in _DTYPES
            and mat.dtype == x.dtype
            and mat._nnz() >= MIN_NNZ and available()
            and os.environ.get(ENV_VAR, "").strip().lower() not in _OFF)


def matmul(mat: Tensor, x: Tensor) -> Tensor:
    """``mat @ x`` for a CSR ``mat (M, N)`` and a dense ``x (N, B)`` of any strides: the
    kernel where it applies (``use_kernel``), else torch's product.

    The copies and allocations around the kernel are numpy's, not torch's: a torch op run
    just before leaves torch's OpenMP workers spinning on the cores the kernel's threads
    need (measured: 2-thread products ~8 ms slower of ~14), and numpy's transposes of these
    shapes take 0.4-0.7 ms where torch's took 2 ms. The result is returned as the transpose
    of a contiguous ``(B, M)`` array, the layout the projectors reshape into.
    """
    if not use_kernel(mat, x):
        return mat @ x.contiguous()
    crow, col, val, n_rows = chunked(mat)
    xn = x.detach().numpy()
    n, b = xn.shape
    blocks = -(-b // LANES)
    if b == LANES and xn.flags.c_contiguous:
        lanes = xn[None]
    else:
        lanes = np.zeros((blocks, n, LANES), dtype=xn.dtype)
        for k in range(blocks):
            width = min(LANES, b - k * LANES)
            lanes[k, :, :width] = xn[:, k * LANES : k * LANES + width]
    out = np.zeros((blocks, n_rows, LANES), dtype=xn.dtype)
    bounds = _row_split(mat)
    for k in range(blocks):
        args = (crow, col, val, lanes[k].reshape(-1), out[k].reshape(-1), n_rows)
        _run_split(_compiled((*args, 0, 0)), args, bounds)
    res = np.empty((b, n_rows), dtype=xn.dtype)
    for k in range(blocks):
        width = min(LANES, b - k * LANES)
        res[k * LANES : k * LANES + width] = out[k, :, :width].T
    return torch.from_numpy(res).T  # (M, B), its transpose contiguous: what callers read
