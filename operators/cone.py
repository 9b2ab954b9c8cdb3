"""3D circular cone-beam projector (flat detector), matrix-free: ``ConeBeam3D``.

At clinical sizes the sparse system matrix of ``ParallelBeam2D`` cannot exist in 3D (256^3
voxels, 360 views of 384 x 256 bins: ~3.5e10 nonzeros), so this projector walks the rays
on the fly: Joseph's method in 3D (step over the voxel centres of the axis the ray is most
aligned with, bilinear interpolation in the two others, weight = step length), the 3D
analogue of ``ParallelBeam2D``'s 'linear' kernel.

Conventions (extending the 2D ones): volume ``(..., D, H, W)``; voxel ``(k, i, j)`` has its
centre at ``x = (j - (W-1)/2) s``, ``y = ((H-1)/2 - i) s``, ``z = (k - (D-1)/2) s`` with
``s = voxel_spacing``. The source turns about the z axis: at angle ``theta`` it sits at
``-source_distance * r`` with ``r = (sin theta, -cos theta, 0)``; the flat detector's centre
is at ``+detector_distance * r``, its columns run along ``u = (cos theta, sin theta, 0)`` and
its rows along ``z``. Bin ``(m, n)`` sits at ``(n - (det_cols-1)/2) * det_spacing[1] +
det_offset[1]`` along ``u`` and ``(m - (det_rows-1)/2) * det_spacing[0] + det_offset[0]`` along z.
Projections are ``(..., n_angles, det_rows, det_cols)`` line integrals in length units.

Backends: on CUDA with Triton, fused kernels (``operators._triton_ct``: gather forward,
atomic-scatter adjoint); elsewhere a chunked torch implementation of the same arithmetic
(``index_add_`` adjoint), slower but exact, which is also the kernels' reference. Both read a
per-ray table (24 bytes per ray, built once per geometry and device, the last 8 kept): 256^3
voxels with 360 views of 256 x 384 bins is 35 M rays, 0.8 GB, against up to 3.6e10 entries
(~290 GB) for the sparse matrix.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _triton_ct
from ._checks import check_finite_number, check_positive, check_real, check_trailing_shape
from .base import LinearOperator
from .registry import register_operator

__all__ = ["ConeBeam3D", "ConeGeometry"]


@dataclass(frozen=True)
class ConeGeometry:
    """Everything that defines a cone-beam projector (hashable)."""

    volume_size: tuple[int, int, int]
    angles: tuple[float, ...]
    det_rows: int
    det_cols: int
    det_spacing: tuple[float, float]
    det_offset: tuple[float, float]
    voxel_spacing: float
    source_distance: float
    detector_distance: float
    stepping: str = "ray"

    @property
    def n_angles(self) -> int:
        return len(self.angles)

    def _frame(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per view, float64: ``r`` (source to detector, ``(n_angles, 3)``), the detector's
        column axis ``u`` (same shape) and its row axis ``v = z`` (``(3,)``)."""
        th = torch.tensor(self.angles, dtype=torch.float64, device=device)
        zeros = torch.zeros_like(th)
        r = torch.stack([th.sin(), -th.cos(), zeros], -1)
        u = torch.stack([th.cos(), th.sin(), zeros], -1)
        return r, u, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)

    def central_directions(self) -> Tensor:
        """Per view, the direction from the source to the detector's centre, ``(n_angles, 3)``
        float64 (unnormalized)."""
        r, u, v = self._frame(torch.device("cpu"))
        det = self.detector_distance * r + self.det_offset[1] * u + self.det_offset[0] * v
        return det + self.source_distance * r

    def digest(self) -> str:
        return hashlib.sha1(repr(self).encode()).hexdigest()[:16]

    def rays(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Source positions and unit directions, ``(n_angles * det_rows * det_cols, 3)``
        float64 each, ordered angle, then row, then column."""
        r, u, v = self._frame(device)
        r, u = r[:, None, None, :], u[:, None, None, :]
        rows = ((torch.arange(self.det_rows, dtype=torch.float64, device=device)
                 - (self.det_rows - 1) / 2) * self.det_spacing[0] + self.det_offset[0])
        cols = ((torch.arange(self.det_cols, dtype=torch.float64, device=device)
                 - (self.det_cols - 1) / 2) * self.det_spacing[1] + self.det_offset[1])
        src = -self.source_distance * r
        det = (self.detector_distance * r + cols[None, None, :, None] * u
               + rows[None, :, None, None] * v)
        d = det - src
        d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)
        return src.expand_as(d).reshape(-1, 3), d.reshape(-1, 3)


# ---------------------------------------------------------------------------------------
# Torch implementation (CPU, and the reference of the CUDA kernels)
# ---------------------------------------------------------------------------------------
def _interp_entries(geom: ConeGeometry, table: _triton_ct.RayTable, rays: slice,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Flat voxel indices, weights and ray ids (each ``(R*S*4,)``) of a chunk of rays;
    weights of out-of-volume corners are zero (their index is clamped to 0)."""
    d, h, w = geom.volume_size
    a, b, wt = table.a[rays], table.b[rays], table.w[rays]
    ax = table.axis[rays].long()
    n_steps = max(d, h, w)
    t = torch.arange(n_steps, dtype=dtype, device=a.device)
    f1 = a[:, 0:1] + b[:, 0:1] * t
    f2 = a[:, 1:2] + b[:, 1:2] * t
    l1, l2 = torch.floor(f1), torch.floor(f2)
    h1, h2 = f1 - l1, f2 - l2
    l1, l2 = l1.long(), l2.long()
    sizes = torch.tensor([d, h, w], device=a.device)
    n_major = sizes[ax][:, None]
    n1 = torch.where(ax == 0, h, d)[:, None]
    n2 = torch.where(ax == 2, h, w)[:, None]
    ti = torch.arange(n_steps, device=a.device)[None, :]
    idx, wts = [], []
    for c1, c2, wc in ((0, 0, (1 - h1) * (1 - h2)), (0, 1, (1 - h1) * h2),
                       (1, 0, h1 * (1 - h2)), (1, 1, h1 * h2)):
        m1, m2 = l1 + c1, l2 + c2
        ok = (ti < n_major) & (m1 >= 0) & (m1 < n1) & (m2 >= 0) & (m2 < n2)
        # (k, i, j) of the corner for each major axis
        k = torch.where(ax[:, None] == 0, ti, m1)
        i = torch.where(ax[:, None] == 0, m1, torch.where(ax[:, None] == 1, ti, m2))
        j = torch.where(ax[:, None] == 2, ti, m2)
        flat = (k * h + i) * w + j
        idx.append(torch.where(ok, flat, torch.zeros_like(flat)))
        wts.append(torch.where(ok, wc * wt[:, None], torch.zeros_like(wc)))
    ray_ids = torch.arange(rays.start, rays.stop, device=a.device)[:, None, None]
    return (torch.stack(idx, -1).reshape(-1), torch.stack(wts, -1).reshape(-1),
            ray_ids.expand(*l1.shape, 4).reshape(-1))


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(geom: ConeGeometry, n_rays: int) -> list[slice]:
    per = max(1, (1 << 22) // (4 * max(geom.volume_size)))
    return [slice(s, min(s + per, n_rays)) for s in range(0, n_rays, per)]


def cone_forward_torch(geom: ConeGeometry, x: Tensor) -> Tensor:
    """``(B, D, H, W) -> (B, n_angles, det_rows, det_cols)``, chunked gathers."""
    table = _triton_ct.ray_table_3d(geom, x.device, _table_dtype(x.dtype))
    n_rays = table.w.numel()
    flat = x.reshape(x.shape[0], -1)
    out = torch.empty(x.shape[0], n_rays, dtype=x.dtype, device=x.device)
    for rays in _chunks(geom, n_rays):
        idx, wts, _ = _interp_entries(geom, table, rays, x.dtype)
        vals = flat[:, idx] * wts.to(x.dtype)
        out[:, rays] = vals.view(x.shape[0], rays.stop - rays.start, -1).sum(-1)
    return out.view(x.shape[0], geom.n_angles, geom.det_rows, geom.det_cols)


def cone_adjoint_torch(geom: ConeGeometry, y: Tensor) -> Tensor:
    """The exact transpose of :func:`cone_forward_torch` (``index_add_``)."""
    table = _triton_ct.ray_table_3d(geom, y.device, _table_dtype(y.dtype))
    n_rays = table.w.numel()
    vals = y.reshape(y.shape[0], n_rays)
    out = torch.zeros(y.shape[0], math.prod(geom.volume_size), dtype=y.dtype, device=y.device)
    for rays in _chunks(geom, n_rays):
        idx, wts, ray_ids = _interp_entries(geom, table, rays, y.dtype)
        out.index_add_(1, idx, vals[:, ray_ids] * wts.to(y.dtype))
    return out.view(y.shape[0], *geom.volume_size)


class _ConeApply(torch.autograd.Function):
    """Forward or adjoint projection whose vector-Jacobian product is the other one."""

    @staticmethod
    def forward(ctx, t: Tensor, geom: ConeGeometry, adjoint: bool, use_triton: bool) -> Tensor:  # type: ignore[override]
        ctx.geom, ctx.adjoint, ctx.use_triton = geom, adjoint, use_triton
        return _cone_apply(geom, t, adjoint, use_triton)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _ConeApply.apply(grad.contiguous(), ctx.geom, not ctx.adjoint, ctx.use_triton), None, None, None


def _cone_apply(geom: ConeGeometry, t: Tensor, adjoint: bool, use_triton: bool) -> Tensor:
    if use_triton:
        fn = _triton_ct.joseph3d_adjoint if adjoint else _triton_ct.joseph3d_forward
    else:
        fn = cone_adjoint_torch if adjoint else cone_forward_torch
    return fn(geom, t.contiguous())


def _pair(name: str, value: float | Sequence[float], allow_scalar: bool = True) -> tuple[float, float]:
    """``(row, column)`` floats from a pair (or, with ``allow_scalar``, one number for both:
    Python, numpy or a 0-d tensor)."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and allow_scalar:
        return float(value), float(value)
    try:
        pair = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2:
        want = "a number or (row, column)" if allow_scalar else "a pair (row, column)"
        raise ValueError(f"argument '{name}' must be {want}; got {value!r}")
    return pair  # type: ignore[return-value]


class ConeBeam3D(LinearOperator):
    """Circular cone-beam projector with a flat detector and a matched backprojector.

    Parameters
    ----------
    volume_size
        ``N`` or ``(D, H, W)`` voxels.
    angles
        Source angles in radians; default ``n_angles`` equispaced over ``[0, 2 pi)``.
    det_shape
        ``(det_rows, det_cols)``; default covers the volume's bounding sphere.
    det_spacing
        Bin size on the detector, a number or ``(row, column)``.
    source_distance, detector_distance
        Source-to-axis and axis-to-detector distances (voxel-spacing units).
    backend
        ``"auto"`` (Triton kernels on CUDA when Triton is installed, else torch),
        ``"triton"`` or ``"torch"``.
    stepping
        ``"ray"`` (default): each ray steps over the voxel planes of the axis it is most
        aligned with, as the 2D projectors. ``"view"``: all rays of a view step along the
        axis of the view's central ray, as ASTRA's cone-beam kernels do (projections then
        agree with ASTRA-CUDA's ``cone_vec``: 1.7e-4 measured, against 2.9e-3 with "ray").
        The two differ where a view's rays cross the 45-degree diagonals; both are exact
        transposes of their backprojections.
    """

    def __init__(self, volume_size: int | Sequence[int], angles: Sequence[float] | Tensor | None = None,
                 det_shape: Sequence[int] | None = None, det_spacing: float | Sequence[float] = 1.0, *,
                 source_distance: float, detector_distance: float, n_angles: int = 360,
                 voxel_spacing: float = 1.0, det_offset: Sequence[float] = (0.0, 0.0),
                 backend: str = "auto", stepping: str = "ray") -> None:
        super().__init__()
        if stepping not in ("ray", "view"):
            raise ValueError(f"argument 'stepping' must be 'ray' or 'view'; got {stepping!r}")
        size = (volume_size,) * 3 if isinstance(volume_size, int) else tuple(int(s) for s in volume_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"argument 'volume_size' must be a positive int or (D, H, W); got {volume_size}")
        if angles is None:
            if n_angles < 1:
                raise ValueError(f"argument 'n_angles' must be >= 1; got {n_angles}")
            ang = torch.arange(n_angles, dtype=torch.float64) * (2 * math.pi / n_angles)
        else:
            ang = torch.as_tensor(angles, dtype=torch.float64).detach().cpu().reshape(-1)
            if ang.numel() == 0 or not bool(torch.isfinite(ang).all()):
                raise ValueError("argument 'angles' must be a non-empty sequence of finite radians")
        vs = check_positive("voxel_spacing", voxel_spacing)
        dso = check_positive("source_distance", source_distance)
        dod = float(detector_distance)
        if not math.isfinite(dod) or dod < 0:
            raise ValueError(f"argument 'detector_distance' must be finite and >= 0; got {dod}")
        radius = 0.5 * math.sqrt(sum(s * s for s in size)) * vs
        if dso <= radius:
            raise ValueError(f"argument 'source_distance' must exceed the volume's half-diagonal "
                             f"{radius:.3g} (the source must lie outside the volume); got {dso}")
        spacing = _pair("det_spacing", det_spacing)
        spacing = tuple(check_positive("det_spacing", s) for s in spacing)
        if det_shape is None:
            mag = (dso + dod) / (dso - radius)
            det_shape = (math.ceil(2 * radius * mag / spacing[0]) + 1,
                         math.ceil(2 * radius * mag / spacing[1]) + 1)
        rows, cols = (int(s) for s in det_shape)
        if rows < 1 or cols < 1:
            raise ValueError(f"argument 'det_shape' must be two positive ints; got {det_shape}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"argument 'backend' must be 'auto', 'triton' or 'torch'; got {backend!r}")
        offset = tuple(check_finite_number("det_offset", o)
                       for o in _pair("det_offset", det_offset, allow_scalar=False))
        self.backend = backend
        self.geometry = ConeGeometry(size, tuple(ang.tolist()), rows, cols, spacing, offset,  # type: ignore[arg-type]
                                     vs, dso, dod, stepping)
        self.register_buffer("angles", ang.to(torch.float32))
        self.domain_shape = size
        self.range_shape = (self.geometry.n_angles, rows, cols)

    def _use_triton(self, t: Tensor) -> bool:
        return _triton_ct.use_kernels(self.backend, t, type(self).__name__)

    def _run(self, t: Tensor, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
             adjoint: bool) -> Tensor:
        check_trailing_shape(name, t, in_shape, owner=type(self).__name__)
        check_real(name, t, owner=type(self).__name__)
        batch = t.shape[: t.ndim - len(in_shape)]
        flat = t.reshape(-1, *in_shape)
        if flat.shape[0] == 0:
            return t.new_zeros(*batch, *out_shape)
        out = _ConeApply.apply(flat, self.geometry, adjoint, self._use_triton(t))
        return out.reshape(*batch, *out_shape)

    def A(self, x: Tensor) -> Tensor:
        """Forward projection ``(..., D, H, W) -> (..., n_angles, det_rows, det_cols)``."""
        return self._run(x, "x", self.domain_shape, self.range_shape, adjoint=False)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Matched backprojection ``(..., n_angles, det_rows, det_cols) -> (..., D, H, W)``."""
        return self._run(y, "y", self.range_shape, self.domain_shape, adjoint=True)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"volume_size={g.volume_size}, n_angles={g.n_angles}, det_shape=({g.det_rows}, "
                f"{g.det_cols}), source_distance={g.source_distance}, "
                f"detector_distance={g.detector_distance}, backend={self.backend!r}"
                + (f", stepping={g.stepping!r}" if g.stepping != "ray" else ""))


@register_operator("cone_beam_3d")
def _cone_factory(*, device: torch.device, dtype: torch.dtype, volume_size=(6, 9, 8),
                  n_angles: int = 7, **kw) -> ConeBeam3D:
    kw.setdefault("source_distance", 20.0)
    kw.setdefault("detector_distance", 12.0)
    kw.setdefault("det_shape", (9, 13))
    op = ConeBeam3D(volume_size, None, n_angles=n_angles, **kw)
    return op.to(device=device, dtype=dtype)
