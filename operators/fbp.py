"""Filtered backprojection for ``ParallelBeam2D`` and ``FanBeam2D`` (flat detector).

The filter is the band-limited ramp discretized in the spatial domain (Kak & Slaney,
ch. 3, eq. 61), which has no DC bias, optionally apodized by a Shepp-Logan, cosine, Hamming
or Hann window; projections are zero-padded to at least twice their length before filtering.
The backprojection here is pixel-driven (each pixel interpolates the filtered projection
at the point its ray meets the detector) with the analytic weights of the inversion
formula; the operator's matched adjoint is the right tool for iterative methods, this one
for FBP. It is a sparse matrix too, built once per geometry and cached, so FBP inside a
training loop (the usual ``x0`` of an unrolled CT network) costs one filter and one sparse
product, and is differentiable. Fan beam uses the equally-spaced-collinear-detector
algorithm (Kak & Slaney 3.4.2): cosine pre-weighting, ramp filtering at the isocentre, and ``1/U^2`` distance
weighting. Angle weights assume the angles sample a full scan uniformly (``[0, pi)`` for
parallel beam, ``[0, 2 pi)`` for fan beam); for a short fan scan pass ``parker=True``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_real, check_trailing_shape
from .ct import CTGeometry, FanBeam2D, ParallelBeam2D, _Projector2D, _SparseApply, cached_sparse_pair

__all__ = ["FILTERS", "fbp", "filter_sinogram", "is_short_scan", "parker_weights", "ramp_filter"]

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
_FILTER_ALIASES = {"ram-lak": "ramp", "ramlak": "ramp"}


def _filter_name(filter: object) -> str:
    """The canonical name of ``filter`` (case, ``_``/``-`` and the Ram-Lak alias folded)."""
    if not isinstance(filter, str):
        raise TypeError(f"argument 'filter' must be a str, one of {FILTERS}; "
                        f"got {type(filter).__name__}")
    name = filter.lower().replace("_", "-")
    name = _FILTER_ALIASES.get(name, name)
    if name not in FILTERS:
        raise ValueError(f"argument 'filter' must be one of {FILTERS} (or 'ram-lak'); "
                         f"got {filter!r}")
    return name


def ramp_filter(n_det: int, spacing: float = 1.0, filter: str = "ramp", cutoff: float = 1.0, *,  # noqa: A002
                dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """Frequency response for ``torch.fft.rfft`` of length ``n_pad`` (returned ``(n_pad//2+1,)``).

    ``filter``: ``"ramp"`` (alias ``"ram-lak"``) times a window of ``g = f / cutoff`` (``f`` in
    cycles per sample): ``"shepp-logan"`` ``sinc(g)``, ``"cosine"`` ``cos(pi g)``,
    ``"hamming"`` ``0.54 + 0.46 cos(2 pi g)``, ``"hann"`` ``0.5 + 0.5 cos(2 pi g)``.
    ``cutoff`` in ``(0, 1]`` is the fraction of the Nyquist frequency kept by the window.
    The response includes the detector spacing, so ``irfft(rfft(p) * H)`` is the filtered
    projection of the inversion formula.
    """
    name = _filter_name(filter)
    if not 0 < cutoff <= 1:
        raise ValueError(f"argument 'cutoff' must be in (0, 1]; got {cutoff}")
    n_pad = max(64, 1 << math.ceil(math.log2(2 * n_det)))
    n = torch.arange(n_pad, dtype=torch.float64)
    n = torch.where(n > n_pad // 2, n - n_pad, n)  # circular index -n_pad/2 .. n_pad/2
    h = torch.zeros(n_pad, dtype=torch.float64)
    h[0] = 1.0 / (4.0 * spacing**2)
    odd = (n.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi**2 * n[odd] ** 2 * spacing**2)
    response = torch.fft.rfft(h).real * spacing  # spacing: the quadrature of the convolution
    f = torch.fft.rfftfreq(n_pad)  # cycles per sample, 0 .. 0.5
    fc = f / cutoff
    if name == "shepp-logan":
        window = torch.sinc(fc)  # sin(pi f)/(pi f)
    elif name == "cosine":
        window = torch.cos(math.pi * fc)
    elif name == "hamming":
        window = 0.54 + 0.46 * torch.cos(2.0 * math.pi * fc)
    elif name == "hann":
        window = 0.5 * (1.0 + torch.cos(2.0 * math.pi * fc))
    else:
        window = torch.ones_like(f)
    window = torch.where(fc <= 0.5, window, torch.zeros_like(window))
    return (response * window).to(dtype=dtype, device=device)


def filter_sinogram(sino: Tensor, spacing: float = 1.0, filter: str = "ramp",  # noqa: A002
                    cutoff: float = 1.0) -> Tensor:
    """Ramp-filter ``(..., n_angles, n_det)`` projections along the detector axis."""
    n_det = sino.shape[-1]
    response = ramp_filter(n_det, spacing, filter, cutoff, dtype=sino.dtype, device=sino.device)
    n_pad = 2 * (response.shape[0] - 1)
    spec = torch.fft.rfft(sino, n=n_pad, dim=-1) * response
    return torch.fft.irfft(spec, n=n_pad, dim=-1)[..., :n_det]


def parker_weights(op: FanBeam2D, dtype: torch.dtype = torch.float64) -> Tensor:
    """Parker short-scan weights ``(n_angles, det_count)`` for a fan scan over ``pi + 2 gamma_max``.

    Angles must increase from their first value; the weights make every line count once.
    """
    g = op.geometry
    beta = torch.tensor(g.angles, dtype=torch.float64)
    beta = beta - beta[0]
    s = g.detector_positions()
    gamma = torch.atan(s / g.source_detector_distance)  # fan angle of each bin
    gmax = float(gamma.abs().max())
    b, gm = beta[:, None], gamma[None, :]
    w = torch.ones(b.shape[0], gm.shape[1], dtype=torch.float64)
    rise = b < 2 * (gmax - gm)
    w = torch.where(rise, torch.sin(math.pi / 4 * b / (gmax - gm).clamp_min(1e-12)) ** 2, w)
    fall = b > math.pi - 2 * gm
    w = torch.where(fall, torch.sin(math.pi / 4 * (math.pi + 2 * gmax - b) / (gmax + gm).clamp_min(1e-12)) ** 2, w)
    w = torch.where(b > math.pi + 2 * gmax, torch.zeros_like(w), w)
    return w.to(dtype)


def is_short_scan(op: ParallelBeam2D | FanBeam2D) -> bool:
    """Whether ``op`` is a fan-beam short scan, for which FBP needs Parker weights
    (``fbp(..., parker=True)``): its angles cover at least ``pi`` plus the fan angle but less
    than ``2 pi`` (the rule of ``CTAcquisition.uses_short_scan``, from the geometry itself)."""
    if not isinstance(op, FanBeam2D):
        return False
    g = op.geometry
    n = g.n_angles
    span = abs(float(g.angles[-1] - g.angles[0])) * n / max(n - 1, 1)  # n equispaced views
    fan = 2.0 * float(torch.atan(g.detector_positions().abs().max() / g.source_detector_distance))
    return math.pi + fan <= span + 1e-9 and span < 2.0 * math.pi - 1e-9


def _fbp_backprojector_rows(geom: CTGeometry, device: torch.device,
                            chunk_pixels: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """CSR arrays of the pixel-driven backprojector ``(H*W, n_angles*det_count)``.

    Each pixel linearly interpolates every projection at the point where its ray meets
    the detector; fan beam adds the ``(D_so / L)^2`` distance weight of the inversion
    formula. Rows are pixels; columns (ray indices) come out sorted within each row.
    """
    h, w = geom.image_size
    ps = geom.pixel_spacing
    n_det = geom.det_count
    xs = (torch.arange(w, device=device, dtype=torch.float64) - (w - 1) / 2) * ps
    ys = ((h - 1) / 2 - torch.arange(h, device=device, dtype=torch.float64)) * ps
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    xx, yy = xx.reshape(-1, 1), yy.reshape(-1, 1)
    th = torch.tensor(geom.angles, device=device, dtype=torch.float64)[None, :]
    cos, sin = torch.cos(th), torch.sin(th)
    ray0 = torch.arange(geom.n_angles, device=device)[None, :] * n_det
    counts_all, cols_all, vals_all = [], [], []
    for p0 in range(0, h * w, chunk_pixels):
        x, y = xx[p0 : p0 + chunk_pixels], yy[p0 : p0 + chunk_pixels]
        along = x * cos + y * sin  # x . u, (P, A)
        weight = torch.ones_like(along)
        if geom.kind == "parallel":
            s = along
        else:
            dist = geom.source_distance + x * sin - y * cos  # D_so + x . r
            s = geom.source_detector_distance * along / dist
            weight = (geom.source_distance / dist) ** 2
        pos = (s - geom.det_offset) / geom.det_spacing + (n_det - 1) / 2
        lo = torch.floor(pos)
        frac = pos - lo
        idx = torch.stack([lo, lo + 1.0], dim=-1)  # (P, A, 2)
        wt = torch.stack([1.0 - frac, frac], dim=-1) * weight[..., None]
        keep = (idx >= 0) & (idx <= n_det - 1) & (wt != 0)
        col = ray0[..., None] + idx.to(torch.int64)
        keep = keep.reshape(keep.shape[0], -1)
        counts_all.append(keep.sum(dim=1))
        cols_all.append(col.reshape(keep.shape)[keep])
        vals_all.append(wt.reshape(keep.shape)[keep])
    counts = torch.cat(counts_all)
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, torch.cat(cols_all), torch.cat(vals_all)


def _fbp_backprojector(geom: CTGeometry, dtype: torch.dtype,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    n_rays = geom.n_angles * geom.det_count
    n_pix = geom.image_size[0] * geom.image_size[1]
    return cached_sparse_pair("fbp", geom, _fbp_backprojector_rows, (n_pix, n_rays), dtype, device)


def _backproject(q: Tensor, op: _Projector2D, scale: float) -> Tensor:
    """Interpolating backprojection of ``q`` ``(B, n_angles, n_det)`` -> ``(B, H, W)``."""
    g = op.geometry
    mat, mat_t = _fbp_backprojector(g, q.dtype, q.device)
    flat = q.reshape(q.shape[0], -1).T.contiguous()
    out = _SparseApply.apply(flat, mat, mat_t).T
    return (out * scale).reshape(q.shape[0], *g.image_size)


def fbp(op: ParallelBeam2D | FanBeam2D, sino: Tensor, filter: str = "ramp",  # noqa: A002
        cutoff: float = 1.0, *, parker: bool = False) -> Tensor:
    """Filtered backprojection ``(..., n_angles, det_count) -> (..., H, W)``.

    Parameters
    ----------
    op
        The projector that produced ``sino`` (its geometry is used).
    filter
        ``"ramp"`` (Ram-Lak, also ``"ram-lak"``), ``"shepp-logan"``, ``"cosine"``,
        ``"hamming"`` or ``"hann"`` (see :func:`ramp_filter`).
    cutoff
        Window cut-off as a fraction of the Nyquist frequency.
    parker
        Fan beam only: apply Parker weights for a short scan (angles over ``pi + fan angle``).
    """
    if not isinstance(op, _Projector2D):
        raise TypeError(f"argument 'op' must be ParallelBeam2D or FanBeam2D; got {type(op).__name__}")
    check_trailing_shape("sino", sino, op.range_shape, owner="fbp")
    check_real("sino", sino, owner="fbp")
    if parker and not isinstance(op, FanBeam2D):
        raise ValueError(f"fbp: argument 'parker' applies to FanBeam2D only; got parker=True "
                         f"with {type(op).__name__}")
    g = op.geometry
    batch = sino.shape[:-2]
    p = sino.reshape(-1, *op.range_shape)
    n = g.n_angles
    if g.kind == "parallel":
        q = filter_sinogram(p, g.det_spacing, filter, cutoff)
        return _backproject(q, op, math.pi / n).reshape(*batch, *g.image_size)
    mag = g.source_detector_distance / g.source_distance
    s_iso = g.detector_positions().to(p) / mag  # bin positions scaled to the isocentre
    pre = g.source_distance / torch.sqrt(g.source_distance**2 + s_iso**2)
    p = p * pre
    scale = math.pi / n
    if parker:
        p = p * parker_weights(op).to(p) * 2.0
        span = float(g.angles[-1] - g.angles[0]) * n / max(n - 1, 1)
        scale = span / (2.0 * n)
    q = filter_sinogram(p, g.det_spacing / mag, filter, cutoff)
    return _backproject(q, op, scale).reshape(*batch, *g.image_size)
