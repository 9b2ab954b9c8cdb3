"""Fused kernels for the SENSE operator's elementwise passes: Triton on CUDA (complex64), numba
on the CPU (complex64 and complex128).

Measured on an H200 (B=4, 15 coils, 320^2): torch's coil combine ``(conj(S) * z).sum(-3)``
runs three kernels (materialising ``conj(S)``, the product, the reduction: 72 us) where one
pass over ``S`` and ``z`` suffices; the image-side checkerboard of the fast path is one more
launch on each side; and a zero-filled k-space written column by column with
``index_copy_`` took 53 us + 12 us for the fill. On the 2-core CPU, the combine as one
``addcmul_`` per coil took 15.5 ms with the checkerboard, the fused pass 8 ms; and scipy's FFT
runs slower right after a torch op (torch's OpenMP workers keep spinning, see ``cpu_ready``),
so the CPU paths around it avoid torch ops altogether. Here:

* ``coil_product(maps, x, check)``: ``maps * x[:, None] * c`` (``c`` the checkerboard when
  ``check``) in one pass;
* ``coil_combine(maps, z, check)``: ``sum_c conj(maps_c) * z_c * c`` in one pass;
* on the CPU, without autograd: ``cpu_product``, ``cpu_combine`` and ``cpu_mask`` (the mask
  multiply, in place or into a given buffer);
* ``scatter_columns(zs, pos, width)`` (Triton only): the ``(..., H, W)`` array with ``zs``'s
  columns at the positions where ``pos >= 0`` (``pos[w]`` = the column of ``zs``), zeros
  elsewhere, in one write pass.

Each is an autograd Function (the vector-Jacobian product of the product is the combine and
vice versa; of the scatter, the gather of the columns), for inputs whose coil maps do not
require grad. Complex data are read as interleaved real pairs: on the GPU ``(BLOCK, 2)``
tiles split into real and imaginary parts in registers; on the CPU blocks of ``_CPU_BLOCK``
pixels accumulated in a small buffer (L1-resident) over the coils, with LLVM's SLP vectoriser
(``_cpu_spmm.compile_slp``), on plain Python threads (``_cpu_spmm.run_split``). Their index
arithmetic is unsigned: numba checks signed indices for wraparound, which kept LLVM from
vectorising the loops (2-core Xeon, B=4, 15 coils, 320^2: product 6.6 -> 3.7-4.2 ms, combine
7.4 -> 4.0-4.8, mask 5.2 -> 3.1-3.4, torch's 3.3-3.6, 3.1-3.3). They pay where they keep torch
out of a chain with scipy's FFT (A, A^H, A^H A; torch's spinning OpenMP workers slow it). The Triton
kernels also run under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``) for the
tests. ``FEDRECON_SENSE_KERNELS=off`` keeps torch's passes everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _cpu_spmm, _triton_ct

__all__ = ["ENV_VAR", "available", "coil_combine", "coil_product", "cpu_combine",
           "cpu_gather_columns", "cpu_mask", "cpu_product", "cpu_ready", "cpu_scatter_columns",
           "scatter_columns", "supported"]

ENV_VAR = "FEDRECON_SENSE_KERNELS"  # "off": torch's passes

triton, tl = _triton_ct.triton, _triton_ct.tl

_BLOCK = 512  # pixels per program (each a (512, 2) float32 tile per coil)
_BLOCK_R, _BLOCK_W = 8, 64  # rows x columns per program of the scatter
_CPU_BLOCK = 2048  # pixels per CPU task (a 16 KiB complex64 accumulator)


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` (CUDA with Triton, or the interpreter)."""
    return _triton_ct.available(device)


def _cpu_product(s, x, out, n_coils, n_pix, width, maps_bstride, x_bstride, check, t0,
                 t1):  # pragma: no cover - numba
    """Tasks ``t0 <= t < t1`` = (sample, block of ``_CPU_BLOCK`` pixels) of the coil product;
    flat real views, ``maps_bstride`` / ``x_bstride`` reals between samples of the maps and
    of the image ``x`` (0: shared), ``out (B, C, P, 2)``. Index arithmetic unsigned (see the
    module docstring), as in the other CPU kernels."""
    u1, u2 = np.uint64(1), np.uint64(2)
    blk, npx = np.uint64(_CPU_BLOCK), np.uint64(n_pix)
    nc, wd = np.uint64(n_coils), np.uint64(width)
    n_blk = (npx + blk - u1) // blk
    xs = np.empty(2 * _CPU_BLOCK, dtype=out.dtype)
    for t in range(np.uint64(t0), np.uint64(t1)):
        b, p0 = t // n_blk, (t % n_blk) * blk
        m = min(npx, p0 + blk) - p0
        xb = b * np.uint64(x_bstride) + u2 * p0
        for k in range(m):
            sign = 1.0
            if check:
                h = (p0 + k) // wd
                sign = 1.0 - 2.0 * ((h + p0 + k - h * wd) % u2)
            xs[u2 * k] = x[xb + u2 * k] * sign
            xs[u2 * k + u1] = x[xb + u2 * k + u1] * sign
        for c in range(nc):
            sb = b * np.uint64(maps_bstride) + c * u2 * npx + u2 * p0
            ob = (b * nc + c) * u2 * npx + u2 * p0
            for k in range(m):
                sr, si = s[sb + u2 * k], s[sb + u2 * k + u1]
                xr, xi = xs[u2 * k], xs[u2 * k + u1]
                out[ob + u2 * k] = sr * xr - si * xi
                out[ob + u2 * k + u1] = sr * xi + si * xr


def _cpu_mask(y, m, out, n_coils, n_pix, m_bstride, t0, t1):  # pragma: no cover - numba
    """``out = y * m`` for coil planes ``t0 <= t < t1`` (complex arrays, flat), ``m`` one
    plane per sample (``m_bstride`` elements apart, 0: shared); ``out`` may be ``y``."""
    npx, nc, mbs = np.uint64(n_pix), np.uint64(n_coils), np.uint64(m_bstride)
    for t in range(np.uint64(t0), np.uint64(t1)):
        base, mb = t * npx, (t // nc) * mbs
        for k in range(npx):
            out[base + k] = y[base + k] * m[mb + k]


def _cpu_combine(s, z, out, n_coils, n_pix, width, maps_bstride, check, t0, t1):  # pragma: no cover - numba
    """Tasks ``t0 <= t < t1`` of the combine; ``z (B, C, P, 2)``, ``out (B, P, 2)``."""
    u1, u2 = np.uint64(1), np.uint64(2)
    blk, npx = np.uint64(_CPU_BLOCK), np.uint64(n_pix)
    nc, wd = np.uint64(n_coils), np.uint64(width)
    n_blk = (npx + blk - u1) // blk
    acc = np.empty(2 * _CPU_BLOCK, dtype=out.dtype)
    for t in range(np.uint64(t0), np.uint64(t1)):
        b, p0 = t // n_blk, (t % n_blk) * blk
        m = min(npx, p0 + blk) - p0
        for k in range(u2 * m):
            acc[k] = 0.0
        for c in range(nc):
            sb = b * np.uint64(maps_bstride) + c * u2 * npx + u2 * p0
            zb = (b * nc + c) * u2 * npx + u2 * p0
            for k in range(m):
                sr, si = s[sb + u2 * k], s[sb + u2 * k + u1]
                zr, zi = z[zb + u2 * k], z[zb + u2 * k + u1]
                acc[u2 * k] += sr * zr + si * zi
                acc[u2 * k + u1] += sr * zi - si * zr
        ob = b * u2 * npx + u2 * p0
        for k in range(m):
            sign = 1.0
            if check:
                h = (p0 + k) // wd
                sign = 1.0 - 2.0 * ((h + p0 + k - h * wd) % u2)
            out[ob + u2 * k] = acc[u2 * k] * sign
            out[ob + u2 * k + u1] = acc[u2 * k + u1] * sign


def _cpu_columns(src, cols, wts, dst, n_sel, width, rows_per_sample, height, w_bstride,
                 w_pstride, scatter, t0, t1):  # pragma: no cover - numba
    """Rows ``t0 <= r < t1``, flat arrays. Gather: ``dst[r, j] = src[r, cols[j]] * w`` for
    ``src (R, width)``, ``dst (R, n_sel)``. Scatter: ``dst (R, width)`` zero but
    ``dst[r, cols[j]] = src[r, j] * w`` (each row written once, while it is in L1). The weight
    ``w = wts[parity * w_pstride + sample * w_bstride + j]``: ``parity`` of the row within its
    image (a sign alternating along ``H`` needs no multiply), ``sample = r //
    rows_per_sample``; 0 strides: shared."""
    u2 = np.uint64(2)
    ns, wd = np.uint64(n_sel), np.uint64(width)
    rps, ht = np.uint64(rows_per_sample), np.uint64(height)
    wbs, wps = np.uint64(w_bstride), np.uint64(w_pstride)
    for r in range(np.uint64(t0), np.uint64(t1)):
        wb = (r // rps) * wbs + ((r % ht) % u2) * wps
        if scatter:
            sb, db = r * ns, r * wd
            for k in range(wd):
                dst[db + k] = 0
            for j in range(ns):
                dst[db + np.uint64(cols[j])] = src[sb + j] * wts[wb + j]
        else:
            sb, db = r * wd, r * ns
            for j in range(ns):
                dst[db + j] = src[sb + np.uint64(cols[j])] * wts[wb + j]


def cpu_ready(*ts: Tensor) -> bool:
    """Whether the CPU kernels take ``ts``: on the CPU, one complex dtype, numba importable,
    not switched off (``FEDRECON_SENSE_KERNELS=off``). They run without autograd, for the SENSE
    operator's scratch-buffer paths, where no torch op runs just before them: torch's
    OpenMP workers keep spinning for a while after an op and take the cores from these
    kernels' threads (measured: the combine after a torch ifft2 15-17 ms instead of 10)."""
    dtype = ts[0].dtype
    return (all(t.device.type == "cpu" and t.dtype == dtype for t in ts)
            and dtype in (torch.complex64, torch.complex128) and _cpu_spmm.available()
            and not _cpu_spmm.switched_off(ENV_VAR))


def _cpu_run(name: str, fn, args: tuple, n_tasks: int) -> None:
    """``fn(*args, t0, t1)`` over ``n_tasks`` tasks on ``torch.get_num_threads()`` threads."""
    if n_tasks:
        kernel = _cpu_spmm.compile_slp(f"sense_{name}", fn, (*args, 0, 0), fastmath={"contract"})
        n = max(1, min(torch.get_num_threads(), n_tasks))
        _cpu_spmm.run_split(kernel, args, [n_tasks * k // n for k in range(n + 1)])


def _reals(*ts: Tensor) -> tuple:
    return tuple(torch.view_as_real(t).numpy().reshape(-1) for t in ts)


def cpu_product(maps: Tensor, x: Tensor, check: bool, out: Tensor) -> Tensor | None:
    """``coil_product`` on the CPU into ``out`` (contiguous ``(..., C, H, W)``), maps and image
    each per sample or shared; None (``out`` untouched) where it does not apply."""
    c, h, w = out.shape[-3:]
    nb = out.shape[:-3].numel()
    ms, xs = _lead_stride(maps, 3, nb), _lead_stride(x, 2, nb)
    if not (cpu_ready(maps, x, out) and out.is_contiguous()) or ms is None or xs is None:
        return None
    maps, x = (t.detach().resolve_conj().contiguous() for t in (maps, x))
    _cpu_run("product", _cpu_product, (*_reals(maps, x, out), c, h * w, w, ms, xs, check),
             nb * -(-(h * w) // _CPU_BLOCK))
    return out


def cpu_mask(y: Tensor, m: Tensor, out: Tensor | None = None) -> Tensor | None:
    """``y * m`` on the CPU for coil data ``y (..., C, H, W)`` and a mask ``m`` broadcastable
    to ``(..., 1, H, W)`` without adding dims, into ``out`` (may be ``y``; fresh when None);
    None where it does not apply."""
    c, h, w = y.shape[-3:]
    nb = y.shape[:-3].numel()
    if not cpu_ready(y, m) or not y.is_contiguous() or (out is not None and not cpu_ready(out)):
        return None
    if torch.broadcast_shapes(y.shape, m.shape) != y.shape or m.shape[-3] != 1:
        return None
    lead = y.shape[:-3] if m.shape[:-3].numel() > 1 else (1,) * (y.ndim - 3)
    planes = m.detach().expand(*lead, 1, h, w).reshape(-1, h * w).contiguous()
    out = torch.empty_like(y) if out is None else out
    _cpu_run("mask", _cpu_mask, (y.numpy().reshape(-1), planes.numpy().reshape(-1),
                                 out.numpy().reshape(-1), c, h * w,
                                 h * w if planes.shape[0] > 1 else 0), nb * c)
    return out


def cpu_combine(maps: Tensor, z: Tensor, check: bool) -> Tensor | None:
    """``coil_combine`` on the CPU, without autograd (see ``cpu_ready``); None where it does
    not apply. After scipy's FFT: 11 ms vs 23 ms for torch's per-coil ``addcmul_`` combine
    and checkerboard (B=4, 15 coils, 320^2)."""
    c, h, w = z.shape[-3:]
    nb = z.shape[:-3].numel()
    stride = _lead_stride(maps, 3, nb)
    if not cpu_ready(maps, z) or stride is None or maps.shape[-3:] != z.shape[-3:]:
        return None
    maps, z = (t.detach().resolve_conj().contiguous() for t in (maps, z))
    out = torch.empty((*z.shape[:-3], h, w), dtype=z.dtype)
    _cpu_run("combine", _cpu_combine, (*_reals(maps, z, out), c, h * w, w, stride, check),
             nb * -(-(h * w) // _CPU_BLOCK))
    return out


def _column_args(weights: Tensor | None, n: int, rows_per_sample: int, height: int,
                 dtype: torch.dtype) -> tuple:
    """The weight arguments of ``_cpu_columns``: the flat weights (ones when
    None), ``rows_per_sample``, ``height`` and the sample and parity strides."""
    if weights is None:
        weights = torch.ones(1, 1, n, dtype=dtype)
    p, s = weights.shape[:2]
    w = weights.detach().resolve_conj().contiguous().numpy().reshape(-1)
    return w, rows_per_sample, height, n if s > 1 else 0, s * n if p > 1 else 0


def cpu_gather_columns(y: Tensor, cols: np.ndarray, weights: Tensor | None, out: np.ndarray,
                       rows_per_sample: int) -> np.ndarray | None:
    """``out[..., r, j] = y[..., r, cols[j]] * weights[row parity, sample, j]`` on the CPU for
    a contiguous ``y (..., W)`` and ``out (..., len(cols))`` (same dtype); ``weights`` is
    ``(P, S, n)`` with ``P`` 1 or 2 (when 2, by the parity of the row's index along ``H =
    y.shape[-2]``: a sign alternating along ``H`` without a multiply) and ``S`` 1 (shared) or
    the number of samples (``rows_per_sample`` rows each), or None (ones). None where it does
    not apply."""
    if (not cpu_ready(y, *(() if weights is None else (weights,))) or not y.is_contiguous()
            or out.dtype != y.numpy().dtype):
        return None
    n = len(cols)
    w, *rest = _column_args(weights, n, rows_per_sample, y.shape[-2], y.dtype)
    _cpu_run("columns", _cpu_columns, (y.numpy().reshape(-1), cols, w, out.reshape(-1), n,
                                       y.shape[-1], *rest, False), y.numel() // y.shape[-1])
    return out


def cpu_scatter_columns(g: np.ndarray, cols: np.ndarray, out: Tensor,
                        weights: Tensor | None = None,
                        rows_per_sample: int = 1) -> Tensor | None:
    """``out (..., W)`` zero but ``out[..., r, cols[j]] = g[..., r, j] * weights[row parity,
    sample, j]`` (``weights`` as in ``cpu_gather_columns``; None: ones), on the CPU, each row
    written once; None where it does not apply."""
    if (not cpu_ready(out, *(() if weights is None else (weights,))) or not out.is_contiguous()
            or out.numpy().dtype != g.dtype):
        return None
    n = len(cols)
    w, *rest = _column_args(weights, n, rows_per_sample, out.shape[-2], out.dtype)
    _cpu_run("columns", _cpu_columns, (g.reshape(-1), cols, w, out.numpy().reshape(-1), n,
                                       out.shape[-1], *rest, True), out.numel() // out.shape[-1])
    return out


if triton is not None:

    @triton.jit
    def _sign(p, width):
        h = p // width
        return 1.0 - 2.0 * ((h + p - h * width) % 2).to(tl.float32)

    @triton.jit
    def _tile(n_pix, BLOCK: tl.constexpr):
        """This program's sample ``b``, pixels ``p``, the ``(BLOCK, 2)`` offsets of their real
        and imaginary parts and the in-bounds mask."""
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return b, p, 2 * p[:, None] + tl.arange(0, 2)[None, :], (p < n_pix)[:, None]

    @triton.jit
    def _product_kernel(maps, x, out, n_coils, n_pix, width, maps_bstride,
                        CHECK: tl.constexpr, BLOCK: tl.constexpr):
        b, p, idx, ok = _tile(n_pix, BLOCK)
        xr, xi = tl.split(tl.load(x + b * 2 * n_pix + idx, mask=ok, other=0.0))
        if CHECK:
            s = _sign(p, width)
            xr, xi = xr * s, xi * s
        mb = maps + b * maps_bstride
        ob = out + b * n_coils * 2 * n_pix
        for c in range(n_coils):
            off = c * 2 * n_pix
            sr, si = tl.split(tl.load(mb + off + idx, mask=ok, other=0.0))
            tl.store(ob + off + idx, tl.join(sr * xr - si * xi, sr * xi + si * xr), mask=ok)

    @triton.jit
    def _combine_kernel(maps, z, out, n_coils, n_pix, width, maps_bstride,
                        CHECK: tl.constexpr, BLOCK: tl.constexpr):
        b, p, idx, ok = _tile(n_pix, BLOCK)
        mb = maps + b * maps_bstride
        zb = z + b * n_coils * 2 * n_pix
        acc_r = tl.zeros([BLOCK], dtype=tl.float32)
        acc_i = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(n_coils):
            off = c * 2 * n_pix
            sr, si = tl.split(tl.load(mb + off + idx, mask=ok, other=0.0))
            vr, vi = tl.split(tl.load(zb + off + idx, mask=ok, other=0.0))
            acc_r += sr * vr + si * vi
            acc_i += sr * vi - si * vr
        if CHECK:
            s = _sign(p, width)
            acc_r, acc_i = acc_r * s, acc_i * s
        tl.store(out + b * 2 * n_pix + idx, tl.join(acc_r, acc_i), mask=ok)

    @triton.jit
    def _scatter_kernel(zs, pos, out, n_rows, width, n_sel,
                        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        pw = tl.load(pos + w, mask=w < width, other=-1)
        two = tl.arange(0, 2)[None, None, :]
        rows = (r < n_rows)[:, None]
        src = (r[:, None] * n_sel + pw[None, :])[:, :, None] * 2 + two
        v = tl.load(zs + src, mask=(rows & (pw >= 0)[None, :])[:, :, None], other=0.0)
        dst = (r[:, None] * width + w[None, :])[:, :, None] * 2 + two
        tl.store(out + dst, v, mask=(rows & (w < width)[None, :])[:, :, None])


def _lead_stride(t: Tensor, tail: int, batch: int) -> int | None:
    """Real offset between samples of ``t`` (its last ``tail`` dims per sample) flattened to
    ``batch`` samples: a sample's size when per sample, 0 when shared; None otherwise."""
    lead = t.shape[:-tail].numel()
    if lead == batch:
        return 2 * t.shape[-tail:].numel()
    return 0 if lead == 1 else None


def supported(maps: Tensor, t: Tensor, coil_dim: bool) -> bool:
    """Whether the Triton kernels take ``maps`` with ``t`` (image ``(..., H, W)`` when not
    ``coil_dim``, coil data ``(..., C, H, W)`` when it is): complex64 on a device they run
    on, maps not requiring grad, per sample or shared by the whole batch; not switched off
    (``FEDRECON_SENSE_KERNELS=off``)."""
    if not (t.dtype == maps.dtype == torch.complex64 and t.device == maps.device
            and available(t.device)):
        return False
    if _cpu_spmm.switched_off(ENV_VAR):
        return False
    if torch.is_grad_enabled() and maps.requires_grad:
        return False
    lead = t.shape[:-3] if coil_dim else t.shape[:-2]
    return maps.shape[:-3] == lead or maps.shape[:-3].numel() == 1


def _launch_product(maps: Tensor, x: Tensor, check: bool, out: Tensor | None = None) -> Tensor:
    c, h, w = maps.shape[-3:]
    batch = x.shape[:-2]
    nb = batch.numel()
    maps, x = maps.resolve_conj().contiguous(), x.resolve_conj().contiguous()
    if out is None:
        out = torch.empty((*batch, c, h, w), dtype=x.dtype, device=x.device)
    if nb and c:
        _product_kernel[(triton.cdiv(h * w, _BLOCK), nb)](
            torch.view_as_real(maps), torch.view_as_real(x), torch.view_as_real(out), c, h * w,
            w, _lead_stride(maps, 3, nb), CHECK=check, BLOCK=_BLOCK)
    return out


def _launch_combine(maps: Tensor, z: Tensor, check: bool) -> Tensor:
    c, h, w = z.shape[-3:]
    batch = z.shape[:-3]
    nb = batch.numel()
    maps, z = maps.resolve_conj().contiguous(), z.resolve_conj().contiguous()
    out = torch.empty((*batch, h, w), dtype=z.dtype, device=z.device)
    if nb:
        _combine_kernel[(triton.cdiv(h * w, _BLOCK), nb)](
            torch.view_as_real(maps), torch.view_as_real(z), torch.view_as_real(out), c, h * w,
            w, _lead_stride(maps, 3, nb), CHECK=check, BLOCK=_BLOCK)
    return out


class _CoilPass(torch.autograd.Function):
    """The coil product (``combine`` False) or the coil combine (True) of ``t``; each one's
    vector-Jacobian product is the other (twice differentiable)."""

    @staticmethod
    def forward(ctx, t: Tensor, maps: Tensor, check: bool, combine: bool) -> Tensor:  # type: ignore[override]
        ctx.maps, ctx.check, ctx.combine = maps, check, combine
        return (_launch_combine if combine else _launch_product)(maps, t, check)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _CoilPass.apply(grad, ctx.maps, ctx.check, not ctx.combine), None, None, None


def coil_product(maps: Tensor, x: Tensor, check: bool, out: Tensor | None = None) -> Tensor:
    """``maps (..., C, H, W) * x (..., H, W)[..., None, :, :]``, times the checkerboard
    ``(-1)^(i + j)`` when ``check``: ``(..., C, H, W)``. See ``supported``. ``out`` (a
    contiguous buffer of the result's shape, written and returned) only without an autograd
    graph."""
    if out is not None:
        return _launch_product(maps, x, check, out)
    return _CoilPass.apply(x, maps.detach(), check, False)


def coil_combine(maps: Tensor, z: Tensor, check: bool) -> Tensor:
    """``sum_c conj(maps_c) * z_c`` over dim -3 of ``z (..., C, H, W)``, times the
    checkerboard when ``check``: ``(..., H, W)``. See ``supported``."""
    return _CoilPass.apply(z, maps.detach(), check, True)


def _launch_scatter(zs: Tensor, pos: Tensor, width: int) -> Tensor:
    zs = zs.contiguous()
    out = torch.empty((*zs.shape[:-1], width), dtype=zs.dtype, device=zs.device)
    n_rows = zs.shape[:-1].numel()
    if n_rows:
        grid = (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(width, _BLOCK_W))
        _scatter_kernel[grid](torch.view_as_real(zs), pos, torch.view_as_real(out), n_rows,
                              width, zs.shape[-1], BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W)
    return out


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs: Tensor, pos: Tensor, cols: Tensor) -> Tensor:  # type: ignore[override]
        ctx.cols = cols
        return _launch_scatter(zs, pos, pos.numel())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.index_select(-1, ctx.cols), None, None


def scatter_columns(zs: Tensor, cols: Tensor, pos: Tensor) -> Tensor:
    """``zs (..., H, n)`` complex64 placed at the columns ``cols (n,)`` of a zero ``(..., H, W)``
    array; ``pos (W,)`` int32 is ``k`` at ``cols[k]`` and -1 elsewhere."""
    return _Scatter.apply(zs, pos, cols)
