"""2D CT projectors: ``ParallelBeam2D`` and ``FanBeam2D`` (flat detector).

Conventions (the same for both geometries, ASTRA-like):

* Image ``(..., H, W)``; pixel ``(i, j)`` has its centre at
  ``x = (j - (W-1)/2) * pixel_spacing`` (right) and ``y = ((H-1)/2 - i) * pixel_spacing`` (up);
  the rotation centre is the image centre.
* At angle ``theta`` the rays travel along ``r = (sin theta, -cos theta)`` and the detector
  axis is ``u = (cos theta, sin theta)``; detector bin ``k`` sits at
  ``s_k = (k - (det_count-1)/2) * det_spacing + det_offset`` along ``u``. At ``theta = 0``
  the rays run from the top of the image to the bottom and bin index grows with ``x``.
* Fan beam: the source is at ``-source_distance * r``, the flat detector's centre at
  ``+detector_distance * r``; ``s_k`` is measured on the detector itself.
* Sinograms are ``(..., n_angles, det_count)`` line integrals in physical length units
  (pixel units when ``pixel_spacing = 1``).

The projector is Joseph's method (linear interpolation between the two pixels a ray passes
between, one step per image column or row, whichever the ray is more aligned with), the
kernel ASTRA calls ``linear``. It is stored as a sparse matrix built once per geometry,
dtype and device and cached; the backprojection is its exact transpose, so ``A_adjoint``
is the matched adjoint and autograd's vector-Jacobian product of ``A`` is ``A_adjoint``.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _cpu_spmm, _matrix_cache, _triton_ct
from ._checks import (
    as_image_size,
    as_int,
    check_finite_number,
    check_positive,
    check_real,
    check_trailing_shape,
)
from .base import LinearOperator
from .registry import register_operator

__all__ = ["CTGeometry", "FanBeam2D", "ParallelBeam2D", "clear_projector_cache"]


@dataclass(frozen=True)
class CTGeometry:
    """Everything that defines a 2D projector (hashable; the cache key)."""

    kind: str  # "parallel" | "fan"
    image_size: tuple[int, int]
    angles: tuple[float, ...]
    det_count: int
    det_spacing: float
    det_offset: float
    pixel_spacing: float
    source_distance: float = math.inf
    detector_distance: float = 0.0

    @property
    def n_angles(self) -> int:
        return len(self.angles)

    @property
    def source_detector_distance(self) -> float:
        return self.source_distance + self.detector_distance

    def digest(self) -> str:
        return hashlib.sha1(repr(self).encode()).hexdigest()[:16]

    def detector_positions(self) -> Tensor:
        k = torch.arange(self.det_count, dtype=torch.float64)
        return (k - (self.det_count - 1) / 2) * self.det_spacing + self.det_offset

    def rays(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions, ``(n_angles * det_count, 2)`` float64 each."""
        th = torch.tensor(self.angles, dtype=torch.float64, device=device)[:, None]
        s = self.detector_positions().to(device)[None, :]
        r = torch.stack([torch.sin(th), -torch.cos(th)], dim=-1)  # (A, 1, 2)
        u = torch.stack([torch.cos(th), torch.sin(th)], dim=-1)
        if self.kind == "parallel":
            origins = s[..., None] * u
            directions = r.expand_as(origins)
        else:
            src = -self.source_distance * r
            det = self.detector_distance * r + s[..., None] * u
            d = det - src
            directions = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)
            origins = src.expand_as(directions)
        return origins.reshape(-1, 2), directions.reshape(-1, 2)


# ---------------------------------------------------------------------------------------
# Sparse Joseph system matrix
# ---------------------------------------------------------------------------------------
def _joseph_rows(geom: CTGeometry, device: torch.device,
                 chunk_rays: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """CSR arrays ``(crow, col, val)`` of the Joseph projector, rows = rays, float64 weights.

    Each ray gets ``2 * max(H, W)`` candidate entries (two interpolation neighbours per
    step); zero-weight and out-of-image candidates are dropped, and every row's columns
    are sorted, so no global sort is needed.
    """
    h, w = geom.image_size
    ps = geom.pixel_spacing
    origins, directions = geom.rays(device)
    n_steps = max(h, w)
    steps = torch.arange(n_steps, device=device, dtype=torch.float64)
    counts_all, cols_all, vals_all = [], [], []
    for start in range(0, origins.shape[0], chunk_rays):
        o = origins[start : start + chunk_rays]
        d = directions[start : start + chunk_rays]
        xmajor = (d[:, 0].abs() >= d[:, 1].abs())[:, None]
        # x-major rays step over columns (centre x_j), y-major rays over rows (centre y_i)
        n_major = torch.where(xmajor, w, h)
        centre = torch.where(xmajor, (steps - (w - 1) / 2) * ps, ((h - 1) / 2 - steps) * ps)
        o_major = torch.where(xmajor, o[:, :1], o[:, 1:])
        o_minor = torch.where(xmajor, o[:, 1:], o[:, :1])
        d_major = torch.where(xmajor, d[:, :1], d[:, 1:])
        d_minor = torch.where(xmajor, d[:, 1:], d[:, :1])
        minor = o_minor + (centre - o_major) / d_major * d_minor
        frac = torch.where(xmajor, (h - 1) / 2 - minor / ps, minor / ps + (w - 1) / 2)
        n_minor = torch.where(xmajor, h, w)
        step_len = ps / d_major.abs()
        lo = torch.floor(frac)
        wt_hi = frac - lo
        idx = torch.stack([lo, lo + 1.0], dim=-1)  # (R, S, 2)
        wt = torch.stack([1.0 - wt_hi, wt_hi], dim=-1) * step_len[..., None]
        ok = (idx >= 0) & (idx <= (n_minor - 1)[..., None]) & (wt > 0)
        ok &= (steps[None, :] < n_major)[..., None]
        major_idx = steps[None, :, None].expand_as(idx)
        pix = torch.where(xmajor[..., None], idx * w + major_idx, major_idx * w + idx)
        big = float(h * w)
        pix = torch.where(ok, pix, torch.full_like(pix, big)).reshape(pix.shape[0], -1)
        wt = torch.where(ok, wt, torch.zeros_like(wt)).reshape(pix.shape[0], -1)
        pix, order = torch.sort(pix, dim=1)
        wt = torch.gather(wt, 1, order)
        keep = pix < big
        counts_all.append(keep.sum(dim=1))
        cols_all.append(pix[keep].to(torch.int64))
        vals_all.append(wt[keep])
    counts = torch.cat(counts_all)
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, torch.cat(cols_all), torch.cat(vals_all)


def _transpose_csr(crow: Tensor, col: Tensor, val: Tensor,
                   n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR arrays of the transpose (a stable counting order keeps rows sorted)."""
    n_rows = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.diff())
    order = torch.sort(col.to(torch.int32), stable=True).indices
    crow_t = torch.zeros(n_cols + 1, dtype=torch.int64, device=crow.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=n_cols), 0)
    return crow_t, rows[order], val[order]


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int],
         dtype: torch.dtype) -> Tensor:
    index_dtype = torch.int32 if val.numel() < 2**31 else torch.int64
    return torch.sparse_csr_tensor(crow.to(index_dtype), col.to(index_dtype), val.to(dtype),
                                   size=shape, check_invariants=False)


_CACHE: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 12
_NORM_CACHE: dict[CTGeometry, float] = {}


def clear_projector_cache(*, disk: bool = False) -> None:
    """Drop every system matrix cached in memory (they are reloaded or rebuilt on the next
    call); with ``disk=True`` also delete the files of the on-disk cache."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _NORM_CACHE.clear()
    folder = _matrix_cache.cache_dir()
    if disk and folder is not None and folder.is_dir():
        for f in folder.glob("*.pt"):
            f.unlink(missing_ok=True)


RowBuilder = Callable[[CTGeometry, torch.device], tuple[Tensor, Tensor, Tensor]]


def cached_sparse_pair(kind: str, geom: CTGeometry, build_rows: RowBuilder, shape: tuple[int, int],
                       dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """A sparse matrix ``(shape)`` and its transpose, built by ``build_rows`` and cached.

    Two levels: in memory (LRU) under ``(kind, geometry, dtype, device)``, and on disk
    (see ``_matrix_cache``: keyed by a hash of every geometry parameter, the dtype, the
    builder's source and a format version; corrupted or mismatched files are rebuilt).
    """
    key = (kind, geom, dtype, str(device))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    path = _matrix_cache.cache_path(kind, geom, build_rows, shape, dtype)
    disk_key = _matrix_cache.key_text(kind, geom, build_rows, shape, dtype) if path else ""
    pair = _matrix_cache.load_pair(path, disk_key, shape, dtype) if path else None
    if pair is not None:
        mat, mat_t = (m.to(device) for m in pair)
    else:
        build_device = device if device.type == "cuda" else torch.device("cpu")
        crow, col, val = build_rows(geom, build_device)
        mat = _csr(crow, col, val, shape, dtype)
        mat_t = _csr(*_transpose_csr(crow, col, val, shape[1]), (shape[1], shape[0]), dtype)
        del crow, col, val
        if path is not None:
            _matrix_cache.save_pair(path, disk_key, mat, mat_t)
        mat, mat_t = mat.to(device), mat_t.to(device)
    with _CACHE_LOCK:
        _CACHE[key] = (mat, mat_t)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return mat, mat_t


def _system_matrices(geom: CTGeometry, dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    n_rays = geom.n_angles * geom.det_count
    n_pix = geom.image_size[0] * geom.image_size[1]
    return cached_sparse_pair("joseph", geom, _joseph_rows, (n_rays, n_pix), dtype, device)


class _SparseApply(torch.autograd.Function):
    """``M @ x`` whose vector-Jacobian product is ``M^T @ g`` (twice differentiable).

    Large CPU products run the numba kernel of ``_cpu_spmm``
    (0.6-0.75x of MKL's time there); everything else ``M @ x``. Projectors whose geometry
    has a verified quarter-turn symmetry take ``_QuarterApply`` instead (CPU kernel only).
    """

    @staticmethod
    def forward(ctx, x: Tensor, mat: Tensor, mat_t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.mats = (mat, mat_t)
        return _cpu_spmm.matmul(mat, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        mat, mat_t = ctx.mats
        return _SparseApply.apply(grad, mat_t, mat), None, None


# ---------------------------------------------------------------------------------------
# Quarter-turn symmetry (CPU kernel): half the matrix, 16 lanes per pass
# ---------------------------------------------------------------------------------------
QUARTER_TURN = True  # use the symmetry where it is verified (tests toggle it)
QUARTER_ENV_VAR = "FEDRECON_QUARTER_TURN"  # "off" in the environment: the plain kernel path
_QUARTER_ANGLE_TOL = 1e-9
_QUARTER_RTOL = 1e-6
_QUARTER_MAX_VIEWS = 4096


def _quarter_pairs(geom: CTGeometry) -> tuple[np.ndarray, np.ndarray] | None:
    """Views paired as ``(first, second)`` with ``angle[second[i]] = angle[first[i]] + pi/2``
    (mod 2 pi, within ``_QUARTER_ANGLE_TOL``), every view in exactly one pair; None when the
    image is not square, no such pairing is found (greedy, in view order) or there are more
    than ``_QUARTER_MAX_VIEWS`` views (the search is quadratic)."""
    h, w = geom.image_size
    n = geom.n_angles
    if h != w or n % 2 or n > _QUARTER_MAX_VIEWS:
        return None
    ang = np.asarray(geom.angles, dtype=np.float64)
    gap = ang[None, :] - ang[:, None] - math.pi / 2  # gap[i, j] = 0: j is i + pi/2
    plus = np.abs((gap + math.pi) % (2 * math.pi) - math.pi) <= _QUARTER_ANGLE_TOL
    used = np.zeros(n, dtype=bool)
    first, second = [], []
    for i in range(n):
        if used[i]:
            continue
        later = np.flatnonzero(plus[i] & ~used)
        earlier = np.flatnonzero(plus[:, i] & ~used)
        if later.size:
            a, b = i, int(later[0])
        elif earlier.size:
            a, b = int(earlier[0]), i
        else:
            return None
        first.append(a)
        second.append(b)
        used[a] = used[b] = True
    return np.array(first, dtype=np.int64), np.array(second, dtype=np.int64)


class _QuarterTurn:
    """``A`` of a square image whose views pair up a quarter turn apart, from half its rows.

    The rows of the ``second`` views are those of their ``first`` partners with the pixels
    permuted by a 90-degree rotation ``sigma`` (``A2 x = M1 x[sigma]``), so with ``M1`` the
    ``first`` views' rows: ``A x = [M1 x ; M1 x[sigma]]`` and ``A^T y = M1^T y1 +
    scatter_sigma(M1^T y2)``. Both halves run as the 16 lanes of one pass of the CPU kernel
    over the half-size matrix (``_cpu_spmm.product``): half the gathers, 64-byte rows
    (measured: A^T 0.85-0.9x, A ~0.8x of the plain kernel's time, 256^2, 180 views, B=8).
    The relation is verified on the built matrix (``build``), never assumed; ``A`` and
    ``A^T`` both use ``M1``, so they stay exact transposes of each other, and equal the full
    matrix's products to ``_QUARTER_RTOL`` (measured 5e-15 to 2e-14 relative in float64).

    Memory: ``M1`` and ``M1^T`` as CSR plus their 16-lane chunked copies (uint16 columns),
    3.5 x half the matrix (float32, parallel 256^2 x 180 views: 161 + 124 = ~285 MiB), in
    place of the plain path's chunked copies of ``A`` and ``A^T`` (~245 MiB), which are then
    not made. The first use
    (``build``, scipy) takes ~2 s (parallel) to ~4 s (fan) for these sizes, transiently
    ~2-3x the matrix's memory.
    """

    def __init__(self, half: Tensor, half_t: Tensor, rows1: np.ndarray, rows2: np.ndarray,
                 sigma: np.ndarray) -> None:
        self.half, self.half_t = half, half_t
        self.rows1, self.rows2 = rows1, rows2
        self.n_rays = rows1.size + rows2.size
        self.sigma, self.sigma_inv = sigma, np.argsort(sigma)
        self.identity = np.arange(sigma.size, dtype=np.int64)

    @staticmethod
    def build(geom: CTGeometry, mat: Tensor) -> _QuarterTurn | None:
        """The symmetry of ``mat`` (CPU CSR of ``geom``), or None where it does not hold:
        both rotation directions are tried; entries must agree to ``_QUARTER_RTOL`` of the
        largest one (a view whose Joseph axis choice breaks the symmetry, e.g. an exact
        45-degree tie, fails it)."""
        import scipy.sparse as sp

        pairs = _quarter_pairs(geom)
        if pairs is None:
            return None
        n = geom.image_size[0]
        bins = np.arange(geom.det_count, dtype=np.int64)
        rows1, rows2 = ((v[:, None] * geom.det_count + bins).ravel() for v in pairs)
        full = sp.csr_matrix((mat.values().numpy(), mat.col_indices().numpy(),
                              mat.crow_indices().numpy()), shape=tuple(mat.shape))
        m1, m2 = full[rows1], full[rows2]
        scale = float(np.abs(m2.data).max(initial=0.0))
        if scale == 0.0:  # entries below rounding may differ in number: compared as values
            return None
        grid = np.arange(n * n, dtype=np.int64).reshape(n, n)
        for turn in (1, -1):
            sigma = np.ascontiguousarray(np.rot90(grid, turn)).ravel()
            moved = sp.csr_matrix((m1.data, sigma[m1.indices], m1.indptr), shape=m1.shape)
            diff = (m2.astype(np.float64) - moved.astype(np.float64)).data
            if float(np.abs(diff).max(initial=0.0)) <= _QUARTER_RTOL * scale:
                m1t = m1.T.tocsr()
                m1t.sort_indices()
                m1.sort_indices()
                half = _csr(*(torch.from_numpy(a) for a in (m1.indptr, m1.indices, m1.data)),
                            m1.shape, mat.dtype)
                half_t = _csr(*(torch.from_numpy(a) for a in (m1t.indptr, m1t.indices,
                                                               m1t.data)), m1t.shape, mat.dtype)
                return _QuarterTurn(half, half_t, rows1, rows2, sigma)
        return None

    def forward(self, x: Tensor) -> Tensor:
        """``A x`` for ``x (H*W, B)``: ``(n_rays, B)``, its transpose contiguous."""
        return self._run("x", x, self.half, (self.identity, self.sigma), self.n_rays,
                         lambda out, res: _cpu_spmm.unpack_split16(out, self.rows1, self.rows2, res))

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^T y`` for ``y (n_rays, B)``: ``(H*W, B)``, its transpose contiguous."""
        return self._run("y", y, self.half_t, (self.rows1, self.rows2), self.sigma.size,
                         lambda out, res: _cpu_spmm.unpack_sum16(out, self.sigma_inv, res))

    @staticmethod
    def _run(name: str, t: Tensor, mat: Tensor, rows: tuple[np.ndarray, np.ndarray], n_out: int,
             unpack: Callable[[np.ndarray, np.ndarray], None]) -> Tensor:
        """Pack ``t``'s rows ``rows[0]`` / ``rows[1]`` as lanes 0-7 / 8-15 (8 batch columns
        per block), one 16-lane pass of ``mat``, then ``unpack`` each block into ``(8, n_out)``;
        ``name`` keeps the two directions' reused buffers apart."""
        tn = t.detach().numpy()
        b = tn.shape[1]
        blocks = -(-b // 8)
        lanes = _cpu_spmm.workspace(f"q_lanes_{name}", (blocks, rows[0].size, 16), tn.dtype)
        for k in range(blocks):
            _cpu_spmm.pack16(tn, rows[0], rows[1], 8 * k, lanes[k])
        out = _cpu_spmm.product(mat, lanes, _cpu_spmm.workspace(
            f"q_out_{name}", (blocks, mat.shape[0], 16), tn.dtype))
        res = np.empty((8 * blocks, n_out), dtype=tn.dtype)
        for k in range(blocks):
            unpack(out[k], res[8 * k : 8 * k + 8])
        return torch.from_numpy(res[:b]).T


def _quarter_turn(geom: CTGeometry, mat: Tensor, x: Tensor) -> _QuarterTurn | None:
    """The verified quarter-turn split of ``mat`` (memoised on it) when the CPU kernel runs
    ``mat``'s products for ``x`` (``_cpu_spmm.use_kernel``), else None."""
    if not (QUARTER_TURN and not _cpu_spmm.switched_off(QUARTER_ENV_VAR)
            and _cpu_spmm.use_kernel(mat, x)):
        return None
    qt = getattr(mat, "_fedrecon_quarter", None)
    if qt is None:
        qt = _QuarterTurn.build(geom, mat) or False
        mat._fedrecon_quarter = qt
    return qt or None


class _QuarterApply(torch.autograd.Function):
    """``A x`` (or ``A^T x``) through ``_QuarterTurn``; its vector-Jacobian product is the
    other direction through the same half matrix (twice differentiable)."""

    @staticmethod
    def forward(ctx, x: Tensor, qt: _QuarterTurn, transpose: bool) -> Tensor:  # type: ignore[override]
        ctx.qt, ctx.transpose = qt, transpose
        return qt.adjoint(x) if transpose else qt.forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _QuarterApply.apply(grad, ctx.qt, not ctx.transpose), None, None


def _as_float_tensor(name: str, value: Sequence[float] | Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"argument '{name}' must be a non-empty 1D sequence of angles in radians; "
                         f"got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"argument '{name}' must contain only finite values; got NaN or Inf")
    return t


class _TritonApply(torch.autograd.Function):
    """Matrix-free CUDA projection (``_triton_ct``) whose vector-Jacobian product is the
    matched other direction (twice differentiable)."""

    @staticmethod
    def forward(ctx, t: Tensor, geom: CTGeometry, transpose: bool) -> Tensor:  # type: ignore[override]
        ctx.geom, ctx.transpose = geom, transpose
        fn = _triton_ct.joseph2d_adjoint if transpose else _triton_ct.joseph2d_forward
        return fn(geom, t.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _TritonApply.apply(grad, ctx.geom, not ctx.transpose), None, None


BACKENDS = ("auto", "sparse", "triton")


class _Projector2D(LinearOperator):
    """Shared machinery: geometry, matrix lookup, batching and checks.

    ``backend``: ``"sparse"`` (the cached CSR matrix, CPU and CUDA), ``"triton"``
    (matrix-free fused CUDA kernels, float32/float16/bfloat16, no matrix memory) or
    ``"auto"`` (Triton on CUDA when it is installed, else sparse).
    """

    def __init__(self, geom: CTGeometry, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"argument 'backend' must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.backend = backend
        self.geometry = geom
        self.register_buffer("angles", torch.tensor(geom.angles, dtype=torch.float32))
        self.domain_shape = geom.image_size
        self.range_shape = (geom.n_angles, geom.det_count)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.geometry.image_size

    @property
    def n_angles(self) -> int:
        return self.geometry.n_angles

    @property
    def det_count(self) -> int:
        return self.geometry.det_count

    def matrices(self, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """The cached CSR system matrix ``(n_rays, H*W)`` and its transpose."""
        return _system_matrices(self.geometry, dtype or self.real_dtype,
                                torch.device(device) if device is not None else self.device)

    def _compute_norm_bound(self) -> float:
        """``||A||_2`` by power iteration, shared by every projector of the same geometry."""
        with _CACHE_LOCK:
            cached = _NORM_CACHE.get(self.geometry)
        if cached is None:
            cached = super()._compute_norm_bound()
            with _CACHE_LOCK:
                _NORM_CACHE[self.geometry] = cached
        return cached

    def _run(self, t: Tensor, name: str, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...], transpose: bool) -> Tensor:
        check_trailing_shape(name, t, in_shape, owner=type(self).__name__)
        check_real(name, t, owner=type(self).__name__)
        batch = t.shape[: t.ndim - 2]
        if self._use_triton(t):
            flat = t.reshape(-1, *in_shape)
            if flat.shape[0] == 0:
                return t.new_zeros(*batch, *out_shape)
            return _TritonApply.apply(flat, self.geometry, transpose).reshape(*batch, *out_shape)
        mat, mat_t = self.matrices(t.dtype, t.device)
        flat = t.reshape(-1, in_shape[0] * in_shape[1]).T  # made contiguous by _cpu_spmm.matmul
        qt = _quarter_turn(self.geometry, mat, flat)
        if qt is not None:
            return _QuarterApply.apply(flat, qt, transpose).T.reshape(*batch, *out_shape)
        if transpose:
            mat, mat_t = mat_t, mat
        out = _SparseApply.apply(flat, mat, mat_t)
        return out.T.reshape(*batch, *out_shape)

    def _use_triton(self, t: Tensor) -> bool:
        return _triton_ct.use_kernels(self.backend, t, type(self).__name__)

    def A(self, x: Tensor) -> Tensor:
        """Forward projection ``(..., H, W) -> (..., n_angles, det_count)``."""
        return self._run(x, "x", self.domain_shape, self.range_shape, transpose=False)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Matched backprojection ``(..., n_angles, det_count) -> (..., H, W)``."""
        return self._run(y, "y", self.range_shape, self.domain_shape, transpose=True)

    def extra_repr(self) -> str:
        g = self.geometry
        s = (f"image_size={g.image_size}, n_angles={g.n_angles}, det_count={g.det_count}, "
             f"det_spacing={g.det_spacing}, pixel_spacing={g.pixel_spacing}")
        if g.kind == "fan":
            s += f", source_distance={g.source_distance}, detector_distance={g.detector_distance}"
        return s + f", backend={self.backend!r}"


def _common_geometry(image_size: int | Sequence[int], angles: Sequence[float] | Tensor | None,
                     n_angles: int, full_scan: float, pixel_spacing: float,
                     det_spacing: float) -> tuple[int, int, Tensor, float, float]:
    """Validated ``(H, W, angles, pixel_spacing, det_spacing)`` shared by both geometries;
    ``n_angles`` equispaced angles over ``[0, full_scan)`` when ``angles`` is None."""
    h, w = as_image_size("image_size", image_size)
    if angles is not None:
        ang = _as_float_tensor("angles", angles)
    else:
        n_angles = as_int("n_angles", n_angles, minimum=1)
        ang = torch.arange(n_angles, dtype=torch.float64) * (full_scan / n_angles)
    return (h, w, ang, check_positive("pixel_spacing", pixel_spacing),
            check_positive("det_spacing", det_spacing))


def _check_det_count(det_count: int) -> int:
    return as_int("det_count", det_count, minimum=1)


class ParallelBeam2D(_Projector2D):
    """Parallel-beam 2D projector with a matched backprojector.

    Parameters
    ----------
    image_size
        ``N`` or ``(H, W)`` in pixels.
    angles
        Projection angles in radians (any set: sparse-view, limited-angle). Default:
        ``n_angles`` equispaced angles over ``[0, pi)``.
    det_count
        Number of detector bins; default covers the image diagonal.
    det_spacing, pixel_spacing
        Bin width and pixel width in the same length unit (default 1: pixel units).
    det_offset
        Shift of the detector centre along ``u`` (same unit).
    backend
        ``"auto"`` (default: matrix-free Triton kernels on CUDA when Triton is installed,
        else the cached sparse matrix), ``"sparse"`` or ``"triton"``.
    """

    def __init__(self, image_size: int | Sequence[int], angles: Sequence[float] | Tensor | None = None,
                 det_count: int | None = None, det_spacing: float = 1.0, *,
                 n_angles: int = 180, pixel_spacing: float = 1.0, det_offset: float = 0.0,
                 backend: str = "auto") -> None:
        h, w, ang, ps, ds = _common_geometry(image_size, angles, n_angles, math.pi,
                                             pixel_spacing, det_spacing)
        if det_count is None:
            det_count = math.ceil(math.hypot(h, w) * ps / ds) + 1
        super().__init__(CTGeometry("parallel", (h, w), tuple(ang.tolist()),
                                    _check_det_count(det_count), ds, check_finite_number("det_offset", det_offset), ps),
                         backend)


class FanBeam2D(_Projector2D):
    """Fan-beam 2D projector with a flat detector and a matched backprojector.

    Parameters
    ----------
    image_size
        ``N`` or ``(H, W)`` in pixels.
    angles
        Source angles in radians; default ``n_angles`` equispaced over ``[0, 2 pi)``.
    det_count, det_spacing
        Detector bins and their width measured on the detector (not at the isocentre).
    source_distance, detector_distance
        Source-to-isocentre and isocentre-to-detector distances (same unit as the pixel
        spacing). The source must lie outside the image's circumscribed circle.
    backend
        As for ``ParallelBeam2D``.
    """

    def __init__(self, image_size: int | Sequence[int], angles: Sequence[float] | Tensor | None = None,
                 det_count: int | None = None, det_spacing: float = 1.0, *,
                 source_distance: float, detector_distance: float, n_angles: int = 360,
                 pixel_spacing: float = 1.0, det_offset: float = 0.0, backend: str = "auto") -> None:
        h, w, ang, ps, ds = _common_geometry(image_size, angles, n_angles, 2 * math.pi,
                                             pixel_spacing, det_spacing)
        dso = check_positive("source_distance", source_distance)
        dod = float(detector_distance)
        if not math.isfinite(dod) or dod < 0:
            raise ValueError(f"argument 'detector_distance' must be finite and >= 0; got {dod}")
        radius = 0.5 * math.hypot(h, w) * ps
        if dso <= radius:
            raise ValueError(
                f"argument 'source_distance' must exceed the image's half-diagonal {radius:.3g} "
                f"(the source must lie outside the image); got {dso}"
            )
        if det_count is None:
            half = radius * (dso + dod) / math.sqrt(dso**2 - radius**2)
            det_count = math.ceil(2 * half / ds) + 1
        super().__init__(CTGeometry("fan", (h, w), tuple(ang.tolist()), _check_det_count(det_count),
                                    ds, check_finite_number("det_offset", det_offset), ps, dso, dod), backend)

    @property
    def magnification(self) -> float:
        g = self.geometry
        return g.source_detector_distance / g.source_distance


@register_operator("parallel_beam_2d")
def _parallel_factory(*, device: torch.device, dtype: torch.dtype, image_size=(20, 24),
                      n_angles: int = 17, det_count: int | None = None, **kw) -> ParallelBeam2D:
    angles = torch.linspace(0.1, math.pi - 0.05, n_angles)
    op = ParallelBeam2D(image_size, angles, det_count, n_angles=n_angles, **kw)
    return op.to(device=device, dtype=dtype)


@register_operator("fan_beam_2d")
def _fan_factory(*, device: torch.device, dtype: torch.dtype, image_size=(20, 24),
                 n_angles: int = 23, det_count: int | None = 41, **kw) -> FanBeam2D:
    kw.setdefault("source_distance", 40.0)
    kw.setdefault("detector_distance", 30.0)
    op = FanBeam2D(image_size, None, det_count, n_angles=n_angles, **kw)
    return op.to(device=device, dtype=dtype)


@register_operator("parallel_beam_2d_sparse_view")
def _parallel_sparse_factory(*, device: torch.device, dtype: torch.dtype, image_size: int = 16,
                             **kw) -> ParallelBeam2D:
    """Limited-angle, irregular angles, detector narrower than the image, offset centre."""
    angles = torch.tensor([0.0, 0.3, 0.35, 1.2, 2.0])
    op = ParallelBeam2D(image_size, angles, det_count=13, det_spacing=1.3, det_offset=0.7, **kw)
    return op.to(device=device, dtype=dtype)
