"""Cartesian MRI operators: the centered orthonormal FFT, SENSE (multi-coil) and single-coil.

Conventions (fastMRI's, with native complex tensors):

- images are ``(..., H, W)``, multi-coil k-space is ``(..., C, H, W)``;
- ``fft2c = fftshift o fft2(norm="ortho") o ifftshift`` over the last two dims, so the
  k-space centre (DC) sits at index ``(H // 2, W // 2)``;
- a sampling mask is real and may carry non-binary weights ``M``: ``A = M F S``,
  ``A^H = S^H F^H M`` and ``A^H A = S^H F^H M^2 F S``.

dtype and device: operators compute in the dtype and on the device of their *input*. Real
inputs are promoted to the complex twin (float32 -> complex64, float64 -> complex128); coil
maps and masks are cast to that dtype and moved to the input's device at call time when they
differ. (``nn.Module.double()`` converts only real buffers, so an operator built with
complex64 maps still serves complex128 inputs exactly in complex128.)

For even ``H`` and ``W`` the shifts are folded into checkerboard modulations, which is exact:
``fft2c(x) = s * c * fft2(c * x)`` with ``c[i, j] = (-1)^(i + j)`` and
``s = (-1)^(H/2 + W/2)``. The image-side ``c`` multiplies the (small) image, the k-space side
``s * c`` is folded into the mask, so no shifted copy of the coil data is ever made. Odd sizes
take the plain shift path.

On CUDA (complex64) the coil product and the coil combine are single fused passes with the
image-side checkerboard inside (``_sense_kernels``), and the FFTs run unnormalised with their
orthonormal scale folded into the mask: what is left besides the FFT is one pass each for
the coil product, the mask and the combine (measured on an H200: A + A^H 1.29x the GPU time
of a bare orthonormal fft2 + ifft2 of the coil data; docs/benchmarks.md). On the CPU, without
an autograd graph, ``A^H``, ``A^H A`` and (column masks) ``A`` run the in-place chains of
``_mri_cpu``.

Masks whose rows are all the same (fastMRI's 1D masks of columns) take shorter paths, chosen
by ``FEDRECON_MRI_SPLIT`` (``auto``, the default; ``on``; ``off``: the full 2D FFTs always):

- ``A^H A`` (``auto``, ``on``): such a mask commutes with the FFT along ``H``, so in
  ``F^H M^2 F`` the ``H``-transforms cancel and only the FFTs along ``W`` run: exact, half
  the FFT work, on every device and through autograd (CPU, B=4, 15 coils, 320^2: 63 vs 88 ms
  without a graph).
- ``A`` and ``A^H`` on the CPU without an autograd graph (``auto``, ``on``; even sizes, at
  most :data:`SPLIT_MAX_FRACTION` of the columns sampled): the FFT along ``H`` over the
  sampled columns only (``_mri_cpu.columns_forward_fft`` / ``columns_adjoint_fft``), numba
  passes and scipy's in-place FFTs; ``A``'s zero-filled result comes from a pool of recycled
  buffers (``_mri_cpu.result_buffer``: a fresh one is page-faulted in on every call). B=4, 15
  coils, 320^2, 81 of 320 columns, 2-core Xeon: A 25 vs 29 ms, A^H 25 vs 29 ms.
- The *split* path of ``A`` and ``A^H`` in torch (``on`` only, where the CPU paths above do
  not run, e.g. under autograd): the FFT along ``W`` over all the coil data, then the FFT
  along ``H`` over the sampled columns only, the rest of k-space left zero (``A^H`` mirrors
  it). It works with autograd and on CUDA but was measured slower than the full path on both
  machines tried (the gather and the zero-filled scatter cost more: H200 A 0.25 vs 0.13 ms,
  2-core CPU 84 vs 53 ms).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _mri_cpu, _sense_kernels
from ._checks import (
    as_image_size,
    check_complex,
    check_tensor,
    check_trailing_shape,
    complex_dtype_of,
    format_shape,
)
from ._kspace import (
    _as_mask,
    _checkerboard,
    _coil_combine,
    _column_support,
    _compute_dtype,
    _norm,
    _same_rows,
)
from ._mri_cpu import clear_scratch  # noqa: F401 - part of this module's surface
from .base import LinearOperator
from .registry import register_operator

__all__ = ["SPLIT_ENV_VAR", "SPLIT_MAX_FRACTION", "MultiCoilMRI", "SingleCoilMRI", "fft2c",
           "ifft2c", "rss", "split_mode"]

_DIMS = (-2, -1)

SPLIT_ENV_VAR = "FEDRECON_MRI_SPLIT"  # auto (default) / on / off
# the sampled-columns paths of A and A^H only while at most this fraction of the columns is
# sampled: beyond it the saved H-FFT work no longer pays for the gather and scatter
SPLIT_MAX_FRACTION = 0.5


def fft2c(x: Tensor) -> Tensor:
    """Centered orthonormal 2D FFT over the last two dims.

    Parameters
    ----------
    x : Tensor
        ``(..., H, W)`` image (complex, or real which is promoted).

    Returns
    -------
    Tensor
        ``(..., H, W)`` complex k-space with the DC term at ``(H // 2, W // 2)``.
    """
    x = torch.fft.ifftshift(x, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(k: Tensor) -> Tensor:
    """Centered orthonormal inverse 2D FFT over the last two dims (the adjoint of :func:`fft2c`).

    Parameters
    ----------
    k : Tensor
        ``(..., H, W)`` complex k-space.

    Returns
    -------
    Tensor
        ``(..., H, W)`` complex image.
    """
    k = torch.fft.ifftshift(k, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), dim=_DIMS)


def rss(x: Tensor, dim: int = -3) -> Tensor:
    """Root-sum-of-squares combination ``sqrt(sum |x|^2)`` along ``dim`` (the coil dim).

    Parameters
    ----------
    x : Tensor
        ``(..., C, H, W)`` coil images, complex or real.
    dim : int
        The coil dimension.

    Returns
    -------
    Tensor
        Real tensor with ``dim`` removed, e.g. ``(..., H, W)``.
    """
    return torch.linalg.vector_norm(x, dim=dim)


# -- helpers -------------------------------------------------------------------------------
def split_mode() -> str:
    """``FEDRECON_MRI_SPLIT`` as ``"auto"`` (the default), ``"on"`` or ``"off"`` (read at
    every call; see the module docstring)."""
    env = os.environ.get(SPLIT_ENV_VAR, "").strip().lower()
    if env in ("on", "1", "true", "yes"):
        return "on"
    return "off" if env in ("off", "0", "false", "no") else "auto"


def _no_graph(*tensors: Tensor) -> bool:
    """True when no autograd graph is recorded for ops on ``tensors`` (``out=`` and in-place
    buffer reuse are then safe); CPU only (CUDA's caching allocator already reuses memory)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class _CartesianMRI(LinearOperator):
    """Shared machinery: the mask (with the k-space checkerboard folded in) at call time."""

    mask: Tensor
    _fast: bool
    _sign: float

    def _setup_fft(self, h: int, w: int) -> None:
        self._fast = h % 2 == 0 and w % 2 == 0
        self._sign = float((-1) ** ((h // 2 + w // 2) % 2))

    def _memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` cached per operator under ``key`` and the mask's identity and version
        (rebuilt after an in-place change; never cached while the mask is learned)."""
        if self.mask.requires_grad:
            return build()
        cache = self.__dict__.setdefault("_memo_cache", {})
        full = (*key, self.mask.data_ptr(), self.mask._version)
        if full not in cache:  # (a cached None is a result too)
            if len(cache) >= 16:  # the split path keeps ~6 entries per dtype and device
                cache.clear()
            cache[full] = build()
        return cache[full]

    def _kmask(self, dtype: torch.dtype, device: torch.device, square: bool = False,
               fold: bool = False) -> Tensor:
        """The mask to apply in the *unshifted* FFT frame on the fast path, as ``dtype``.

        ``square`` gives ``M^2`` (the checkerboard squares to one); ``fold`` includes the
        orthonormal FFT's scale (``1/sqrt(HW)`` per transform, see ``_fold``). Complex so the
        products with k-space take torch's fast complex-complex path. Cached per dtype and
        device.
        """
        return self._memo(("kmask", dtype, str(device), square, fold),
                          lambda: self._build_kmask(dtype, device, square, fold))

    def _build_kmask(self, dtype: torch.dtype, device: torch.device, square: bool,
                     fold: bool) -> Tensor:
        rdtype = torch.empty((), dtype=dtype).real.dtype
        m = self.mask.to(device=device, dtype=rdtype)
        h, w = self.domain_shape
        if square:
            m = m * m
        elif self._fast:
            m = m * _checkerboard(h, w, self._sign, rdtype, device)
        if fold:
            m = m * (1.0 / (h * w) if square else (h * w) ** -0.5)
        return m.to(dtype)

    def _fold(self, t: Tensor) -> bool:
        """Whether the FFTs run unnormalised, their orthonormal scale folded into the mask
        (``_kmask(fold=True)``): on CUDA's fast path, where torch scales an orthonormal FFT's
        output in a pass of its own (24 us of a 98 us fft2 of 4 x 15 x 320^2 on an H200)."""
        return self._fast and t.is_cuda

    def _apply_mask(self, k: Tensor, m: Tensor) -> Tensor:
        """``k * m`` for a fresh FFT output ``k``, in place where that is safe (it saves an
        allocation of coil size): when ``m`` adds no dims and autograd needs no ``k``."""
        needs_k = torch.is_grad_enabled() and self.mask.requires_grad
        if needs_k or torch.broadcast_shapes(k.shape, m.shape) != k.shape:
            return k * m
        return k.mul_(m)

    def _icheck(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        h, w = self.domain_shape
        rdtype = torch.empty((), dtype=dtype).real.dtype
        return self._memo(("icheck", rdtype, str(device)),
                          lambda: _checkerboard(h, w, 1.0, rdtype, device))

    def _fwd_fft(self, z: Tensor, fold: bool = False, w_only: bool = False) -> Tensor:
        """``F`` (centered) on the slow path, ``fft2`` (shifts folded elsewhere) on the fast;
        unnormalised with ``fold``; along ``W`` only with ``w_only``."""
        if w_only:
            return self._fft1(z, -1, False, fold)
        if not self._fast:
            return fft2c(z)
        return torch.fft.fft2(z, dim=_DIMS, norm=_norm(False, fold))

    def _adj_fft(self, z: Tensor, fold: bool = False, w_only: bool = False) -> Tensor:
        if w_only:
            return self._fft1(z, -1, True, fold)
        if not self._fast:
            return ifft2c(z)
        return torch.fft.ifft2(z, dim=_DIMS, norm=_norm(True, fold))

    def _normal_mask(self, dtype: torch.dtype, device: torch.device,
                     fold: bool) -> tuple[Tensor, bool]:
        """The mask of ``A^H A`` and whether its FFTs run along ``W`` only (``w_only``).

        A mask whose rows are all the same (fastMRI's 1D masks) commutes with the FFT along
        ``H``, so in ``F^H M^2 F`` the two ``H``-transforms cancel: ``A^H A`` needs the FFTs
        along ``W`` only (half the FFT work, exact). ``M^2`` then comes as its first row
        ``(..., 1, W)`` (times ``1/W`` with ``fold``). Not with ``FEDRECON_MRI_SPLIT=off``.
        """
        def build() -> Tensor | None:
            rows = _same_rows(self.mask)
            if rows is None:
                return None
            m = rows.to(device=device, dtype=torch.empty((), dtype=dtype).real.dtype)
            m = m * m * (1.0 / self.domain_shape[1] if fold else 1.0)
            return m.to(dtype)

        if split_mode() != "off":
            rows = self._memo(("normal_rows", dtype, str(device), fold), build)
            if rows is not None:
                return rows, True
        return self._kmask(dtype, device, square=True, fold=fold), False

    def kspace_path(self, device: torch.device | str | None = None) -> str:
        """``"split"`` or ``"full"``: the torch path ``A`` and ``A^H`` take on ``device``
        (default: the mask's) under the current ``FEDRECON_MRI_SPLIT`` (``"split"`` only with
        ``on``; ``A^H A`` along ``W`` and the CPU's sampled-columns ``A^H`` are chosen apart,
        see the module docstring)."""
        device = self.mask.device if device is None else torch.device(device)
        return "full" if self._split_columns(device) is None else "split"

    def _split_columns(self, device: torch.device) -> Tensor | None:
        """The sampled column indices on ``device`` when the split path is taken, else None.

        Not for a learned mask (its support may change every step), nor beyond
        ``SPLIT_MAX_FRACTION``; detection is cached until the mask changes.
        """
        if self.mask.requires_grad or split_mode() != "on":
            return None
        cols = self._columns(device)
        if cols is None or not 0 < cols.numel() <= SPLIT_MAX_FRACTION * self.domain_shape[1]:
            return None
        return cols

    def _columns(self, device: torch.device) -> Tensor | None:
        """``_column_support`` of the mask on ``device``, cached until the mask changes."""
        return self._memo(("cols", str(device)),
                          lambda: _column_support(self.mask, self.domain_shape[1], device))

    def _fft1(self, z: Tensor, dim: int, inverse: bool, fold: bool = False) -> Tensor:
        """Orthonormal 1D (i)FFT along ``dim`` (unnormalised with ``fold``): plain on the
        fast path (the checkerboards fold the shifts), centered otherwise."""
        fn = torch.fft.ifft if inverse else torch.fft.fft
        if self._fast:
            return fn(z, dim=dim, norm=_norm(inverse, fold))
        return torch.fft.fftshift(fn(torch.fft.ifftshift(z, dim), dim=dim, norm="ortho"), dim)

    def _split(self, z: Tensor, cols: Tensor, adjoint: bool) -> Tensor:
        """The k-space part of ``A`` or (``adjoint``) ``A^H`` on the sampled columns ``cols``
        only (``A^H A`` needs no ``H``-FFT at all for such masks, see ``_normal_mask``).

        ``A``: FFT along W, gather ``cols``, FFT along H; ``A^H``: gather ``cols`` of the
        k-space ``z``. Then the gathered mask, and for ``A^H`` the inverse FFT along H, scatter
        into zeros, inverse FFT along W; for ``A`` scatter into zeros (the full-size k-space
        it returns).
        """
        fold = self._fold(z)
        if not adjoint:
            z = self._fft1(self._fft1(z, -1, False, fold).index_select(-1, cols), -2, False, fold)
        else:
            z = z.index_select(-1, cols)
        m = self._memo(("split_mask", z.dtype, str(z.device), fold),
                       lambda: self._kmask(z.dtype, z.device, False, fold).index_select(-1, cols))
        z = self._apply_mask(z, m)
        if adjoint:
            z = self._fft1(z, -2, True, fold)
        w = self.domain_shape[1]
        if z.dtype == torch.complex64 and _sense_kernels.available(z.device):
            # one write pass (index_copy_ into zeros: 53 + 12 us on an H200 for 4 x 15 x 320^2)
            pos = self._memo(("split_pos", str(z.device)), lambda: torch.full(
                (w,), -1, dtype=torch.int32, device=z.device).index_copy_(
                0, cols, torch.arange(cols.numel(), dtype=torch.int32, device=z.device)))
            full = _sense_kernels.scatter_columns(z, cols, pos)
        else:
            full = z.new_zeros((*z.shape[:-1], w)).index_copy_(-1, cols, z)
        return self._fft1(full, -1, True, fold) if adjoint else full

    def _prepare_image(self, x: Tensor, check: bool = True) -> Tensor:
        """Validate ``x``, promote to complex and (with ``check``) apply the image-side
        checkerboard."""
        check_trailing_shape("x", x, self.domain_shape, type(self).__name__)
        x = x.to(_compute_dtype(x))
        if self._fast and check:
            x = x * self._icheck(x.dtype, x.device)
        return x

    def _finish_image(self, x: Tensor) -> Tensor:
        return x * self._icheck(x.dtype, x.device) if self._fast else x


class MultiCoilMRI(_CartesianMRI):
    """Cartesian SENSE: ``A x = M * fft2c(S * x)`` for coil maps ``S`` and a real mask ``M``.

    Parameters
    ----------
    coil_maps : Tensor
        ``(..., C, H, W)`` complex sensitivities; leading dims are per-sample.
    mask : Tensor
        Real sampling weights broadcastable to ``(..., 1, H, W)``: ``(W,)``, ``(1, W)``,
        ``(H, W)``, ``(..., 1, H, W)``, ``(..., 1, 1, W)``, ... Stored as ``(..., 1, h, w)``.

    Notes
    -----
    ``A``: ``(..., H, W) -> (..., C, H, W)``. ``batch_shape`` is the broadcast of the leading
    dims of ``coil_maps`` and ``mask``. See the module docstring for dtype handling.
    """

    def __init__(self, coil_maps: Tensor, mask: Tensor) -> None:
        super().__init__()
        owner = type(self).__name__
        check_tensor("coil_maps", coil_maps)
        if coil_maps.ndim < 3:
            raise ValueError(
                f"{owner}: argument 'coil_maps' must have shape (..., C, H, W); "
                f"got {format_shape(tuple(coil_maps.shape))}"
            )
        check_complex("coil_maps", coil_maps, owner)
        c, h, w = (int(s) for s in coil_maps.shape[-3:])
        mask = _as_mask(mask, (h, w), owner, coil_dim=True)
        try:
            batch = torch.broadcast_shapes(coil_maps.shape[:-3], mask.shape[:-3])
        except RuntimeError:
            raise ValueError(
                f"{owner}: leading dims of 'mask' {format_shape(tuple(mask.shape))} do not "
                f"broadcast with those of 'coil_maps' {format_shape(tuple(coil_maps.shape))}"
            ) from None
        self._batch_shape = tuple(batch)
        self.register_buffer("coil_maps", coil_maps)
        self.register_buffer("mask", mask)
        self.domain_shape, self.range_shape = (h, w), (c, h, w)
        self.domain_complex = self.range_complex = True
        self._setup_fft(h, w)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self._batch_shape

    @property
    def n_coils(self) -> int:
        return self.range_shape[0]

    def _maps(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.coil_maps.to(device=device, dtype=dtype)

    def _coils(self, maps: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``S * (c x)`` for an image ``x`` without its checkerboard ``c`` (fast path) yet:
        one fused pass where the Triton kernels run (``_sense_kernels``), else torch's;
        written to ``out`` (a reused buffer, no autograd graph) when given."""
        if self._fast and _sense_kernels.supported(maps, x, coil_dim=False):
            return _sense_kernels.coil_product(maps, x, check=True, out=out)
        if self._fast:
            x = x * self._icheck(x.dtype, x.device)
        return maps * x.unsqueeze(-3) if out is None else torch.mul(maps, x.unsqueeze(-3), out=out)

    def _image(self, maps: Tensor, z: Tensor, after_scipy: bool = False) -> Tensor:
        """``c * sum_c conj(S_c) z_c`` (``c`` on the fast path), fused where it can be: by
        the Triton kernel, or on the CPU by the numba one when ``z`` comes from the scratch
        paths (``after_scipy``: no graph, and no torch op just before, see
        ``_sense_kernels.cpu_combine``)."""
        if self._fast and after_scipy:
            out = _sense_kernels.cpu_combine(maps, z, check=True)
            if out is not None:
                return out
        if self._fast and _sense_kernels.supported(maps, z, coil_dim=True):
            return _sense_kernels.coil_combine(maps, z, check=True)
        return self._finish_image(_coil_combine(maps, z))

    def A(self, x: Tensor) -> Tensor:
        """``(..., H, W) -> (..., C, H, W)``: ``M * fft2c(S * x)``."""
        x = self._prepare_image(x, check=False)
        maps = self._maps(x.dtype, x.device)
        fold = self._fold(x)
        m = self._kmask(x.dtype, x.device, fold=fold)
        cols = self._split_columns(x.device)
        if self._fast and _no_graph(x, maps, m):
            shape = torch.broadcast_shapes(maps.shape, x.unsqueeze(-3).shape)
            if torch.broadcast_shapes(shape, m.shape) == shape:
                # a column mask: the sampled-columns chain, its result from the pool
                buf = _mri_cpu.scratch(shape, x.dtype)
                out = self._forward_columns(maps, x, buf)
                if out is not None:
                    return out
                if cols is None:
                    # else one coil-sized allocation (the result): the coil product goes to
                    # the scratch buffer, torch's FFT writes the fresh result (it is fastest
                    # with a fresh output), the mask multiplies it in place. (The CPU kernels +
                    # scipy's FFT in place + the mask into the fresh result, as in A^H,
                    # measured slower: 58 vs 48 ms, B=4, 15 coils, 320^2, 2-core AMD.)
                    buf = self._coils(maps, x, out=buf)
                    return torch.fft.fft2(buf, dim=_DIMS, norm="ortho").mul_(m)
        if cols is not None:
            return self._split(self._coils(maps, x), cols, adjoint=False)
        k = self._fwd_fft(self._coils(maps, x), fold)
        return self._apply_mask(k, m)

    def A_adjoint(self, y: Tensor) -> Tensor:
        """``(..., C, H, W) -> (..., H, W)``: ``sum_c conj(S_c) * ifft2c(M * y_c)``."""
        owner = type(self).__name__
        check_trailing_shape("y", y, self.range_shape, owner)
        y = y.to(_compute_dtype(y))
        maps = self._maps(y.dtype, y.device)
        fold = self._fold(y)
        m = self._kmask(y.dtype, y.device, fold=fold)
        scratch = (self._fast and _no_graph(y, maps, m)
                   and torch.broadcast_shapes(y.shape, m.shape) == y.shape)
        out = self._adjoint_columns(maps, y) if scratch else None
        if out is not None:
            return out
        cols = self._split_columns(y.device)
        if cols is not None:
            return self._image(maps, self._split(y, cols, adjoint=True))
        if scratch:
            # no coil-sized allocation at all, and with the CPU kernels no torch op (torch's
            # OpenMP workers keep spinning after one, slowing scipy's FFT: 50 vs 44 ms here)
            buf = _mri_cpu.scratch(y.shape, y.dtype)
            if _sense_kernels.cpu_mask(y, m, out=buf) is None:
                torch.mul(y, m, out=buf)
            return self._image(maps, _mri_cpu.fft_inplace(buf, inverse=True), after_scipy=True)
        return self._image(maps, self._adj_fft(y * m, fold))

    def _adjoint_columns(self, maps: Tensor, y: Tensor) -> Tensor | None:
        """``A^H y`` on the CPU without autograd for a mask of at most
        ``SPLIT_MAX_FRACTION`` of the columns (fast path; not with ``FEDRECON_MRI_SPLIT=off``):
        the sampled columns times the mask gathered into a reused buffer, the inverse FFT
        along ``H`` over them only, scattered into the zero-filled scratch buffer, the inverse
        FFT along ``W``, the combine; numba passes and scipy's in-place FFTs, no torch op
        (B=4, 15 coils, 320^2, 81 of 320 columns: 38.6 vs 44 ms for the full scratch path).
        None where it does not apply."""
        cols = self._column_weights(y.dtype, y.shape[:-3])
        if cols is None:
            return None
        cols, weights = cols
        c, h, _ = self.range_shape
        buf = _mri_cpu.columns_adjoint_fft(y.contiguous(), cols, weights, c * h)
        return None if buf is None else self._image(maps, buf, after_scipy=True)

    def _forward_columns(self, maps: Tensor, x: Tensor, buf: Tensor) -> Tensor | None:
        """``A x`` on the CPU without autograd for a mask of at most ``SPLIT_MAX_FRACTION`` of
        the columns (fast path; not with ``FEDRECON_MRI_SPLIT=off``): the coil product into
        the scratch buffer ``buf``, then ``_mri_cpu.columns_forward_fft`` (the FFT along
        ``H`` over the sampled columns only, the result in a recycled buffer). None (``buf``
        untouched) where it does not apply."""
        cols = self._column_weights(buf.dtype, buf.shape[:-3])
        if cols is None or _sense_kernels.cpu_product(maps, x, True, buf) is None:
            return None
        return _mri_cpu.columns_forward_fft(buf, *cols, self.range_shape[0] * self.domain_shape[0])

    def _column_weights(self, dtype: torch.dtype,
                        lead: torch.Size) -> tuple[np.ndarray, Tensor] | None:
        """The sampled columns and the k-space mask at them as ``(2, samples or 1, n)``
        weights (``_sampled_columns``) for coil data with leading dims ``lead``; None where
        the sampled-columns paths do not apply (no column mask, none or more than
        ``SPLIT_MAX_FRACTION`` of the columns sampled)."""
        cols = self._sampled_columns(dtype)
        if cols is None:
            return None
        cols, weights = cols
        mlead, n = weights.shape[1:-1], len(cols)
        if not 0 < n <= SPLIT_MAX_FRACTION * self.domain_shape[1]:
            return None
        if mlead != lead and mlead.numel() > 1:  # per-sample weights for every sample
            ones = (1,) * (len(lead) - len(mlead))
            weights = weights.reshape(2, *ones, *mlead, n).expand(2, *lead, n)
        return cols, weights.reshape(2, -1, n)

    def _sampled_columns(self, dtype: torch.dtype) -> tuple[np.ndarray, Tensor] | None:
        """For ``_adjoint_columns``: the sampled columns and the k-space mask at them on the
        CPU, ``(2, *lead, n)`` by the parity of the row (the fast path's k-space checkerboard
        ``s (-1)^(i + j)``); None when the mask is learned or not column-structured, or with
        ``FEDRECON_MRI_SPLIT=off``."""
        if self.mask.requires_grad or split_mode() == "off":
            return None

        def build() -> tuple[np.ndarray, Tensor] | None:
            cols = self._columns(torch.device("cpu"))
            if cols is None:
                return None
            weights = _mri_cpu.column_weights(self.mask[..., 0, 0, :], cols, self._sign, dtype)
            return cols.numpy().astype(np.int64), weights

        return self._memo(("columns", dtype), build)

    def A_normal(self, x: Tensor) -> Tensor:
        """``(..., H, W) -> (..., H, W)``: ``S^H F^H M^2 F S x`` in one pass over the coils
        (FFTs along ``W`` only for a 1D column mask, ``_normal_mask``)."""
        x = self._prepare_image(x, check=False)
        maps = self._maps(x.dtype, x.device)
        # the k-space checkerboard squares to one, so only M^2 is applied here
        fold = self._fold(x)
        m2, w_only = self._normal_mask(x.dtype, x.device, fold)
        if self._fast and _no_graph(x, maps, m2):
            shape = torch.broadcast_shapes(maps.shape, x.unsqueeze(-3).shape)
            if torch.broadcast_shapes(shape, m2.shape) == shape:
                axes = (-1,) if w_only else _DIMS
                buf = _mri_cpu.scratch(shape, x.dtype)
                if _sense_kernels.cpu_product(maps, x, True, buf) is None:
                    self._coils(maps, x, out=buf)
                if _sense_kernels.cpu_mask(_mri_cpu.fft_inplace(buf, axes=axes), m2, out=buf) is None:
                    buf.mul_(m2)
                return self._image(maps, _mri_cpu.fft_inplace(buf, inverse=True, axes=axes),
                                   after_scipy=True)
        k = self._fwd_fft(self._coils(maps, x), fold, w_only)
        z = self._adj_fft(self._apply_mask(k, m2), fold, w_only)
        return self._image(maps, z)

    def domain_support(self) -> Tensor:
        """``(..., H, W)`` float: 1 where some coil map is non-zero (SENSE sees nothing else)."""
        return (self.coil_maps.abs().square().sum(dim=-3) > 0).to(self.coil_maps.real.dtype)

    def _compute_norm_bound(self) -> float:
        """``max|M| * max_pixel sqrt(sum_c |S_c|^2)`` >= ``||A||_2`` (exact for RSS-normalized maps
        and a mask that samples some column fully)."""
        sens = float(self.coil_maps.detach().abs().square().sum(dim=-3).max().sqrt())
        return sens * float(self.mask.abs().max())

    def extra_repr(self) -> str:
        return (f"coils={self.n_coils}, image={self.domain_shape}, "
                f"batch_shape={self.batch_shape}")


class SingleCoilMRI(_CartesianMRI):
    """Single-coil Cartesian MRI: ``A x = M * fft2c(x)``.

    Parameters
    ----------
    mask : Tensor
        Real weights broadcastable to ``(..., H, W)``: ``(W,)``, ``(1, W)``, ``(H, W)``,
        ``(..., h, w)`` with ``h in {1, H}``, ``w in {1, W}``. Leading dims are per-sample.
    image_size : int or (int, int), optional
        ``(H, W)``; required when the mask does not carry both (e.g. a ``(1, W)`` mask).
    """

    def __init__(self, mask: Tensor, image_size: int | Sequence[int] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        size = as_image_size("image_size", image_size) if image_size is not None else None
        mask = _as_mask(mask, size, owner, coil_dim=False)
        if size is None:
            if 1 in mask.shape[-2:]:
                raise ValueError(
                    f"{owner}: argument 'image_size' (H, W) is required for a mask of shape "
                    f"{format_shape(tuple(mask.shape))} that does not carry both H and W"
                )
            size = (int(mask.shape[-2]), int(mask.shape[-1]))
        self.register_buffer("mask", mask)
        self.domain_shape = self.range_shape = size
        self.domain_complex = self.range_complex = True
        self._setup_fft(*size)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape[:-2])

    def A(self, x: Tensor) -> Tensor:
        """``(..., H, W) -> (..., H, W)``: ``M * fft2c(x)``."""
        x = self._prepare_image(x)
        cols = self._split_columns(x.device)
        if cols is not None:
            return self._split(x, cols, adjoint=False)
        fold = self._fold(x)
        return self._apply_mask(self._fwd_fft(x, fold), self._kmask(x.dtype, x.device, fold=fold))

    def A_adjoint(self, y: Tensor) -> Tensor:
        """``(..., H, W) -> (..., H, W)``: ``ifft2c(M * y)``."""
        check_trailing_shape("y", y, self.range_shape, type(self).__name__)
        y = y.to(_compute_dtype(y))
        cols = self._split_columns(y.device)
        if cols is not None:
            return self._finish_image(self._split(y, cols, adjoint=True))
        fold = self._fold(y)
        return self._finish_image(self._adj_fft(y * self._kmask(y.dtype, y.device, fold=fold), fold))

    def _compute_norm_bound(self) -> float:
        """``max|M|``: the centred orthonormal FFT has norm one."""
        return float(self.mask.abs().max())

    def A_normal(self, x: Tensor) -> Tensor:
        """``ifft2c(M^2 * fft2c(x))``."""
        x = self._prepare_image(x)
        fold = self._fold(x)
        m2, w_only = self._normal_mask(x.dtype, x.device, fold)
        return self._finish_image(self._adj_fft(self._fwd_fft(x, fold, w_only) * m2, fold, w_only))

    def extra_repr(self) -> str:
        return f"image={self.domain_shape}, batch_shape={self.batch_shape}"


# -- registry factories (small, seeded) ------------------------------------------------------
def _random_maps(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    cdtype = complex_dtype_of(dtype)
    return torch.randn(shape, generator=gen, dtype=cdtype).to(device)


def _random_mask(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
                 device: torch.device, weighted: bool = False) -> Tensor:
    m = (torch.rand(shape, generator=gen, dtype=dtype) < 0.5).to(dtype)
    if weighted:
        m = m * (0.5 + torch.rand(shape, generator=gen, dtype=dtype))
    return m.to(device)


@register_operator("multicoil_mri")
def _make_multicoil(*, device: torch.device, dtype: torch.dtype, n_coils: int = 4,
                    image_size: tuple[int, int] = (16, 20), seed: int = 0) -> MultiCoilMRI:
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    maps = _random_maps((n_coils, h, w), gen, dtype, device)
    return MultiCoilMRI(maps, _random_mask((w,), gen, dtype, device))


@register_operator("multicoil_mri_batched")
def _make_multicoil_batched(*, device: torch.device, dtype: torch.dtype, batch: int = 2,
                            n_coils: int = 3, image_size: tuple[int, int] = (12, 10),
                            seed: int = 1) -> MultiCoilMRI:
    """Per-sample coil maps ``(B, C, H, W)`` and weighted 2D masks ``(B, 1, H, W)``."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    maps = _random_maps((batch, n_coils, h, w), gen, dtype, device)
    mask = _random_mask((batch, 1, h, w), gen, dtype, device, weighted=True)
    return MultiCoilMRI(maps, mask)


@register_operator("multicoil_mri_odd")
def _make_multicoil_odd(*, device: torch.device, dtype: torch.dtype, n_coils: int = 3,
                        image_size: tuple[int, int] = (15, 12), seed: int = 2) -> MultiCoilMRI:
    """Odd height: exercises the shift (non-checkerboard) path."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    maps = _random_maps((n_coils, h, w), gen, dtype, device)
    return MultiCoilMRI(maps, _random_mask((1, w), gen, dtype, device))


@register_operator("singlecoil_mri")
def _make_singlecoil(*, device: torch.device, dtype: torch.dtype,
                     image_size: tuple[int, int] = (16, 20), seed: int = 3) -> SingleCoilMRI:
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    return SingleCoilMRI(_random_mask((1, w), gen, dtype, device), image_size=(h, w))
