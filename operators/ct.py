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

import torch
from torch import Tensor

from . import _cpu_spmm, _matrix_cache, _triton_ct
from ._checks import as_image_size, check_positive, check_real, check_trailing_shape
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
    (0.6-0.75x of MKL's time there); everything else ``M @ x``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mat: Tensor, mat_t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.mats = (mat, mat_t)
        return _cpu_spmm.matmul(mat, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        mat, mat_t = ctx.mats
        return _SparseApply.apply(grad, mat_t, mat), None, None


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
        if transpose:
            mat, mat_t = mat_t, mat
        flat = t.reshape(-1, in_shape[0] * in_shape[1]).T  # made contiguous by _cpu_spmm.matmul
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
    elif n_angles < 1:
        raise ValueError(f"argument 'n_angles' must be >= 1; got {n_angles}")
    else:
        ang = torch.arange(n_angles, dtype=torch.float64) * (full_scan / n_angles)
    return (h, w, ang, check_positive("pixel_spacing", pixel_spacing),
            check_positive("det_spacing", det_spacing))


def _check_det_count(det_count: int) -> int:
    if int(det_count) < 1:
        raise ValueError(f"argument 'det_count' must be >= 1; got {det_count}")
    return int(det_count)


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
                                    _check_det_count(det_count), ds, float(det_offset), ps), backend)


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
                                    ds, float(det_offset), ps, dso, dod), backend)

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
