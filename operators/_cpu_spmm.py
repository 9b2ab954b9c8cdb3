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
* runs one row range per thread (``torch.get_num_threads()`` of them, balanced by entries)
  in a numba ``prange`` on numba's OpenMP layer, which shares torch's libgomp and so its
  worker threads (``run_parallel``; plain Python threads, used before, competed with torch's
  spinning workers: 16-17 ms instead of 10 right after a torch op).

Measured on a 2-core AMD EPYC (Zen 1) against MKL: 0.56-0.72x MKL's time for the
backprojections and 0.7-0.8x for the forward projections of the benchmark geometries
(parallel and fan; 1 and 2 threads; docs/benchmarks.md); batches are padded to multiples of 8
lanes and still win at batch 1 (0.87x). Sums run in the operand's dtype in another order
than MKL's: ~3e-7 relative difference in float32, ~1e-15 in float64.

A 16-lane variant (``_spmm_source(16)``: one 64-byte gathered row per entry) serves ``ct``'s
quarter-turn path, which stacks two half-problems as the lanes of one pass over a half-size
matrix (``pack16`` / ``unpack_sum16`` / ``unpack_split16`` move the data in and out).
Multiply-adds may be fused (numba ``fastmath={"contract"}``: FMA, no reassociation). The
lane and output buffers are kept per thread between calls (``workspace``): fresh ones cost
~2000 page faults per product, inside the kernel.

Costs: the chunked copy adds 3/4 of the memory of each float32 CPU matrix it is used with
(5/6 for float64: the columns are stored as uint16 offsets within their chunk); the first
use in a process compiles the kernels (~1-2 s per dtype) unless numba's disk cache (next to
this file, or numba's user cache folder) holds them, and the parallel driver of each kernel
(~0.85 s, not cached on disk); the copy takes ~0.5-1 s per matrix.
Used by ``ct._SparseApply`` for CPU float32/float64 products of matrices with at least
``MIN_NNZ`` entries; anything else, or ``FEDRECON_CPU_SPMM=off``, uses ``mat @ x``.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "ENV_VAR", "MIN_NNZ", "available", "chunked", "compile_slp",
           "huge_mapping", "matmul", "pack16", "product", "release_workspace", "run_parallel",
           "run_split", "switched_off", "unpack_split16", "unpack_sum16", "use_kernel",
           "workspace"]

LANES = 8
CHUNK_BYTES = 3 << 17  # 384 KiB of gathered dense rows per column chunk (L2 is 512 KiB here)
MIN_NNZ = 1 << 20  # below this the compile time is not worth it and MKL is fast anyway
ENV_VAR = "FEDRECON_CPU_SPMM"
_OFF = {"off", "0", "false", "no", "none"}
_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()  # guards the compilation's switch of a numba-wide setting
_STATE: dict[str, object] = {}


def switched_off(env_var: str) -> bool:
    """Whether the environment variable ``env_var`` turns a fast path off ("off", "0",
    "false", "no" or "none", any case; read at every call)."""
    return os.environ.get(env_var, "").strip().lower() in _OFF


def _spmm_source(lanes: int) -> str:
    """Source of ``_spmm{lanes}``: ``out[r, 0:L] += sum_p val[p] * x[col[p], 0:L]`` for rows
    ``r0 <= r < r1``, one column chunk after the other.

    ``crow`` has ``n_chunks * n_rows + 1`` offsets, row ``r`` of chunk ``c`` being CSR row
    ``c * n_rows + r``; ``col`` holds each entry's column less its chunk's first column
    ``c * width`` (uint16: 6 instead of 8 bytes per entry, ~7% faster); ``x`` and ``out`` are
    flat row-major ``(n, L)`` arrays. Written out
    lane by lane with two interleaved accumulators (entries ``p`` and ``p + 1``) because
    LLVM's SLP vectoriser packs such scalar locals into vectors (loops over the lanes ran
    1.7-3x slower). Unsigned indices spare numba's negative-index checks, which would stop
    the vectorisation.
    """
    ln = range(lanes)

    def acc(name: str, weight: str, idx: str) -> list[str]:
        return [f"{name}{k} += {weight} * x[{idx} + np.uint64({k})]" for k in ln]

    def zero(name: str) -> str:
        return " = ".join(f"{name}{k}" for k in ln) + " = zero"

    body = [
        f"def _spmm{lanes}(crow, col, val, x, out, n_rows, width, r0, r1):",
        f"    u1, uL = np.uint64(1), np.uint64({lanes})",
        "    zero = out.dtype.type(0)",
        "    for c in range((crow.shape[0] - 1) // n_rows):",
        "        base = np.uint64(c * n_rows)",
        "        first = np.uint64(c * width)",
        "        for r in range(r0, r1):",
        "            p = np.uint64(crow[base + np.uint64(r)])",
        "            e = np.uint64(crow[base + np.uint64(r) + u1])",
        f"            {zero('a')}",
        f"            {zero('b')}",
        "            while p + u1 < e:",
        "                i = (np.uint64(col[p]) + first) * uL",
        "                v = val[p]",
        "                j = (np.uint64(col[p + u1]) + first) * uL",
        "                w = val[p + u1]",
        *("                " + line for line in acc("a", "v", "i") + acc("b", "w", "j")),
        "                p += np.uint64(2)",
        "            if p < e:",
        "                i = (np.uint64(col[p]) + first) * uL",
        "                v = val[p]",
        *("                " + line for line in acc("a", "v", "i")),
        "            o = np.uint64(r) * uL",
        *(f"            out[o + np.uint64({k})] += a{k} + b{k}" for k in ln),
    ]
    return "\n".join(body) + "\n"


def _make_kernel(lanes: int):
    """``_spmm{lanes}`` compiled from ``_spmm_source`` under this file's name, so that numba's
    disk cache (keyed by file, function name and line) works for it as for the others."""
    scope = {"np": np, "__name__": __name__}
    exec(compile(_spmm_source(lanes), __file__, "exec"), scope)  # noqa: S102 - our own source
    return scope[f"_spmm{lanes}"]


def _split_chunks(crow, col, val, width, crow_c, col_c, val_c):  # pragma: no cover - numba
    """Counting sort of the entries by ``(column chunk, row)``: stable, so each row of each
    chunk keeps its columns sorted; an entry's chunk is found by walking its row's sorted
    columns (no division). ``col_c`` gets each column less its chunk's first one (``< width``,
    so it fits the uint16 ``col_c``). ``crow_c`` must come zeroed."""
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
            col_c[q] = col[p] - (end - width)
            val_c[q] = val[p]
            q += 1


def _pack16(x, rows_a, rows_b, b0, width, lanes, r0, r1):  # pragma: no cover - numba
    """``lanes[i, l] = x[rows_a[i], b0 + l]``, ``lanes[i, 8 + l] = x[rows_b[i], b0 + l]`` for
    ``l < width`` (the other lanes zeroed), ``r0 <= i < r1``."""
    zero = lanes.dtype.type(0)
    for i in range(r0, r1):
        ra, rb = rows_a[i], rows_b[i]
        for l in range(8):
            if l < width:
                lanes[i, l] = x[ra, b0 + l]
                lanes[i, 8 + l] = x[rb, b0 + l]
            else:
                lanes[i, l] = zero
                lanes[i, 8 + l] = zero


def _unpack_sum16(out, perm, res, r0, r1):  # pragma: no cover - compiled by numba
    """``res[l, p] = out[p, l] + out[perm[p], 8 + l]``, ``l < 8``, ``r0 <= p < r1``; flat
    arrays, ``out`` row-major ``(n, 16)``, ``res`` row-major ``(8, n)``. Unsigned indices: no
    wraparound checks (1.5x faster)."""
    n = np.uint64(perm.shape[0])
    u8, u16 = np.uint64(8), np.uint64(16)
    for p in range(r0, r1):
        pp = np.uint64(p)
        q = np.uint64(perm[pp])
        for l in range(8):
            ul = np.uint64(l)
            res[ul * n + pp] = out[pp * u16 + ul] + out[q * u16 + u8 + ul]


def _unpack_split16(out, rows_a, rows_b, n_cols, res, r0, r1):  # pragma: no cover - numba
    """``res[l, rows_a[i]] = out[i, l]``, ``res[l, rows_b[i]] = out[i, 8 + l]``, ``l < 8``,
    ``r0 <= i < r1``; flat arrays, ``out`` row-major ``(n, 16)``, ``res`` ``(8, n_cols)``."""
    m = np.uint64(n_cols)
    u8, u16 = np.uint64(8), np.uint64(16)
    for i in range(r0, r1):
        ii = np.uint64(i)
        ra, rb = np.uint64(rows_a[ii]), np.uint64(rows_b[ii])
        for l in range(8):
            ul = np.uint64(l)
            res[ul * m + ra] = out[ii * u16 + ul]
            res[ul * m + rb] = out[ii * u16 + u8 + ul]

_KERNELS = {n: _make_kernel(n) for n in (8, 16)}


def _jit(name: str, fn, **opts):
    """``fn`` under numba (built once), with numba's disk cache where it can write one."""
    disp = _STATE.get(name)
    if disp is None:
        numba = _numba()
        opts = {"boundscheck": False, "fastmath": False, "nogil": True, **opts}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                disp = numba.njit(cache=True, **opts)(fn)
        except Exception:  # noqa: BLE001 - no usable cache folder: compile in memory
            disp = numba.njit(**opts)(fn)
        _STATE[name] = disp
    return disp


def compile_slp(name: str, fn, args: tuple, **opts):
    """``fn`` under numba (``_jit``), compiled for ``args``'s types with LLVM's SLP vectoriser
    on: it packs per-lane scalar code into vectors, which numba leaves off by default.

    ``numba.config.SLP_VECTORIZE`` is read when the optimisation passes are built, so it is
    set only around this compilation (under the lock) and restored.
    """
    numba = _numba()
    disp = _jit(name, fn, **opts)
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


def _compiled(args: tuple, lanes: int = LANES):
    """The ``lanes``-lane dispatcher (8 or 16) for ``args`` (``compile_slp``)."""
    # "contract" lets LLVM fuse each multiply-add (FMA), no reassociation: same summation
    # order, ~4% faster for 16 lanes (more for some 8-lane products)
    return compile_slp(f"spmm{lanes}", _KERNELS[lanes], args, fastmath={"contract"})


def _numba():
    """numba, imported on first use (~0.3 s: not paid by ``import fedrecon``), or None."""
    if "numba" not in _STATE:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with sigpy, a dependency
            numba = None
        else:
            if "NUMBA_THREADING_LAYER" not in os.environ:
                # OpenMP first: numba's OpenMP layer runs on the libgomp torch has loaded, so
                # the parallel kernels run on torch's own (often still spinning) workers
                # instead of competing with them for the cores (see ``run_parallel``); a
                # no-op once some numba parallel code has run
                numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
        _STATE["numba"] = numba
    return _STATE["numba"]


def available() -> bool:
    """Whether numba is importable (it comes with sigpy, a dependency)."""
    return _numba() is not None


def chunked(mat: Tensor, lanes: int = LANES) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``mat`` (sparse CSR, CPU) as column chunks of ``width = CHUNK_BYTES // (lanes *
    itemsize)`` columns, memoised on the tensor per lane count: ``(crow, col, val, n_rows,
    width)``, ``crow`` holding ``n_chunks * n_rows + 1`` offsets, ``col`` (uint16) each
    column less its chunk's first. A copy of the matrix: reading the chunks in place, row by
    row, was 2-3x slower (a TLB miss per row and chunk)."""
    memo = getattr(mat, "_fedrecon_chunks", None)
    if memo is None:
        memo = mat._fedrecon_chunks = {}
    parts = memo.get(lanes)
    if parts is None:
        crow = mat.crow_indices().numpy()
        col = mat.col_indices().numpy()
        val = mat.values().numpy()
        n_rows, n_cols = mat.shape
        width = max(1, min(CHUNK_BYTES // (lanes * val.itemsize), 1 << 16))
        n_chunks = max(1, -(-n_cols // width))
        crow_c = np.zeros(n_chunks * n_rows + 1, dtype=crow.dtype)
        col_c, val_c = np.empty(col.shape, dtype=np.uint16), np.empty_like(val)
        _jit("split", _split_chunks)(crow, col, val, width, crow_c, col_c, val_c)
        parts = memo[lanes] = (crow_c, col_c, val_c, n_rows, width)
    return parts


def _row_split(mat: Tensor) -> list[int]:
    """Row boundaries giving each of ``torch.get_num_threads()`` threads equal entries,
    memoised on the matrix per thread count."""
    n = max(1, min(torch.get_num_threads(), mat.shape[0]))
    memo = getattr(mat, "_fedrecon_row_split", None)
    if memo is None:
        memo = mat._fedrecon_row_split = {}
    if n not in memo:
        crow = mat.crow_indices()
        targets = torch.arange(1, n, dtype=crow.dtype) * (int(crow[-1]) // n)
        memo[n] = [0, *torch.searchsorted(crow, targets).tolist(), mat.shape[0]]
    return memo[n]


def run_split(kernel, args: tuple, bounds: list[int]) -> None:
    """``kernel(*args, r0, r1)`` over consecutive ranges, one plain Python thread each (the
    kernel releases the GIL): for kernels next to scipy's FFT, whose own threads would
    compete with the OpenMP workers ``run_parallel`` leaves spinning (the SENSE chain A^H:
    45-49 ms this way, 54 ms with ``run_parallel``)."""
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


def run_parallel(kernel, args: tuple, bounds: list[int]) -> None:
    """``kernel(*args, r0, r1)`` (a numba dispatcher compiled for these arguments) over the
    consecutive ranges of ``bounds``, one per thread, from a numba ``prange`` driver
    (``_driver``) on numba's OpenMP layer.

    That layer (``_numba`` puts it first) shares the libgomp torch uses, so the ranges run
    on torch's worker threads. Those keep spinning for ~5-10 ms after each torch op, and
    plain Python threads (``run_split``) had to share the cores with them: the 256^2 /
    180-view backprojection right after a torch op took 19.5 ms with Python threads, 15 ms
    this way (FBP 29.5 -> 23.5 ms). Fork safety is then that of torch's own CPU ops (the
    same GNU OpenMP): in a forked child, one thread (``torch.set_num_threads(1)``, as torch's
    data-loader workers do).
    """
    numba = _numba()
    numba.set_num_threads(max(1, min(len(bounds) - 1, numba.config.NUMBA_NUM_THREADS)))
    _driver(kernel, len(args))(*args, np.asarray(bounds, dtype=np.int64))


def _driver(kernel, n_args: int):
    """A ``parallel=True`` function calling ``kernel(a0, .., a{n-1}, bounds[t], bounds[t+1])``
    in a ``prange`` over ``t``, built once per kernel. The kernel is compiled on its own
    (with the SLP vectoriser, ``compile_slp``) and called, not inlined: its loops written
    inside the ``prange`` body compiled 15% slower."""
    drivers = _STATE.setdefault("drivers", {})
    key = (id(kernel), n_args)
    if key not in drivers:
        numba = _numba()
        params = ", ".join(f"a{k}" for k in range(n_args))
        src = (f"def drive({params}, bounds):\n"
               f"    for t in prange(bounds.shape[0] - 1):\n"
               f"        kernel({params}, bounds[t], bounds[t + 1])\n")
        scope = {"prange": numba.prange, "kernel": kernel}
        exec(src, scope)  # noqa: S102 - our own source
        drivers[key] = (kernel, numba.njit(parallel=True, nogil=True)(scope["drive"]))
    return drivers[key][1]


_LOCAL = threading.local()


def workspace(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A buffer kept per thread and ``name`` between calls (the latest shape only): fresh
    arrays of these sizes cost ~2000 page faults per product, inside the kernel."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        bufs.pop(name, None)  # the old one goes first: one buffer per name at any time
        buf = bufs[name] = _mapped(shape, np.dtype(dtype))
    return buf


_HUGE_BYTES = 4 << 20  # from this size on a workspace asks for transparent huge pages


def _mapped(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, from an anonymous mapping of its own with
    ``MADV_HUGEPAGE`` when it is large (where the system offers both): huge pages whatever
    the allocator in the process does with large blocks. numpy asks for them on its own
    large allocations, but under a heap-keeping malloc setting (``GLIBC_TUNABLES``, see the
    README) a buffer from the heap lost them, and scipy's in-place FFT along ``H`` of the
    SENSE scratch buffer slowed down (A^H 38 -> 52-55 ms)."""
    count = int(np.prod(shape, dtype=np.int64))
    region = huge_mapping(count * dtype.itemsize) if count * dtype.itemsize >= _HUGE_BYTES else None
    if region is None:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)


def huge_mapping(nbytes: int) -> mmap.mmap | None:
    """A private anonymous mapping of ``nbytes`` with ``MADV_HUGEPAGE`` (a forked child gets
    its own copy on write, as with ``np.empty``), or None where the system offers no
    transparent huge pages."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # no huge pages here: the plain allocation
        return None
    return region


def release_workspace(name: str) -> None:
    """Free this thread's ``workspace`` buffer ``name`` (a no-op when there is none)."""
    getattr(_LOCAL, "bufs", {}).pop(name, None)


def use_kernel(mat: Tensor, x: Tensor) -> bool:
    """Whether ``matmul`` runs the numba kernel for ``mat @ x`` (else torch's product);
    ``FEDRECON_CPU_SPMM=off`` in the environment turns the kernel off."""
    return (mat.device.type == "cpu" and x.device.type == "cpu" and x.ndim == 2
            and mat.layout == torch.sparse_csr and x.dtype in _DTYPES
            and mat.dtype == x.dtype
            and mat._nnz() >= MIN_NNZ and available() and not switched_off(ENV_VAR))


def matmul(mat: Tensor, x: Tensor) -> Tensor:
    """``mat @ x`` for a CSR ``mat (M, N)`` and a dense ``x (N, B)`` of any strides: the
    kernel where it applies (``use_kernel``), else torch's product.

    The copies and allocations around the kernel are numpy's, not torch's: numpy's
    transposes of these shapes take 0.4-0.7 ms where torch's took 2 ms. The result is
    returned as the transpose of a contiguous ``(B, M)`` array, the layout the projectors
    reshape into.
    """
    if not use_kernel(mat, x):
        return mat @ x.contiguous()
    xn = x.detach().numpy()
    n, b = xn.shape
    blocks = -(-b // LANES)
    if b == LANES and xn.flags.c_contiguous:
        lanes = xn[None]
    else:
        lanes = workspace("lanes", (blocks, n, LANES), xn.dtype)
        for k in range(blocks):
            width = min(LANES, b - k * LANES)
            lanes[k, :, :width] = xn[:, k * LANES : k * LANES + width]
            lanes[k, :, width:] = 0
    out = product(mat, lanes, workspace("out", (blocks, mat.shape[0], LANES), xn.dtype))
    n_rows = out.shape[1]
    res = np.empty((b, n_rows), dtype=xn.dtype)
    for k in range(blocks):
        width = min(LANES, b - k * LANES)
        res[k * LANES : k * LANES + width] = out[k, :, :width].T
    return torch.from_numpy(res).T  # (M, B), its transpose contiguous: what callers read


def product(mat: Tensor, lanes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The kernel's ``mat @ lanes[k]`` for each block ``k`` of ``lanes (blocks, N, L)``, a
    C-contiguous array of ``mat``'s dtype with ``L`` = 8 or 16 lanes: ``(blocks, M, L)``,
    written to ``out`` (C-contiguous, overwritten) when given."""
    n_lanes = lanes.shape[-1]
    crow, col, val, n_rows, width = chunked(mat, n_lanes)
    if out is None:
        out = np.zeros((lanes.shape[0], n_rows, n_lanes), dtype=lanes.dtype)
    else:
        out.fill(0)
    bounds = _row_split(mat)
    kernel = None
    for k in range(lanes.shape[0]):
        args = (crow, col, val, lanes[k].reshape(-1), out[k].reshape(-1), n_rows, width)
        kernel = kernel or _compiled((*args, 0, 0), n_lanes)  # the blocks share one signature
        run_parallel(kernel, args, bounds)
    return out


def pack16(x: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray, b0: int,
           lanes: np.ndarray) -> None:
    """Fill ``lanes (n, 16)`` from ``x (N, B)`` (any strides): lanes 0-7 from rows ``rows_a``,
    8-15 from rows ``rows_b``, batch columns ``b0 ..`` (zero-padded past ``B``). One thread:
    two were no faster (this and the unpacks take ~0.5-1 ms)."""
    width = min(8, x.shape[1] - b0)
    _jit("pack16", _pack16)(x, rows_a, rows_b, b0, width, lanes, 0, lanes.shape[0])


def unpack_sum16(out: np.ndarray, perm: np.ndarray, res: np.ndarray) -> None:
    """``res[l, p] = out[p, l] + out[perm[p], 8 + l]`` for C-contiguous ``out (n, 16)`` and
    ``res (8, n)``."""
    _jit("unpack_sum16", _unpack_sum16)(out.reshape(-1), perm, res.reshape(-1), 0, perm.shape[0])


def unpack_split16(out: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray,
                   res: np.ndarray) -> None:
    """Scatter C-contiguous ``out (n, 16)``'s lanes 0-7 to columns ``rows_a`` and 8-15 to
    columns ``rows_b`` of C-contiguous ``res (8, M)``."""
    _jit("unpack_split16", _unpack_split16)(out.reshape(-1), rows_a, rows_b, res.shape[1],
                                            res.reshape(-1), 0, rows_a.shape[0])
