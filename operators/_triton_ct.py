"""Matrix-free Joseph projectors for CUDA, written in Triton (2D parallel/fan beam, 3D cone beam).

Every ray of a geometry is a straight line. In *index space* (fractional array indices of
the image) a ray that steps over the centres of its major axis (the axis its direction is
most aligned with, as ASTRA's 'linear' kernel and ``operators.ct._joseph_rows`` choose it)
visits, at step ``t``, the fractional minor indices ``f = a + b * t``: linear in ``t``. So a
ray is fully described by a few numbers computed once per geometry on the host in float64
(``RayTable``): ``a``, ``b`` per minor axis, the physical step length ``w`` and its major axis.

* Forward (2D and 3D): one lane per (ray, batch) pair walks its ray, linear (2D) or
  bilinear (3D) interpolation between the voxels around ``f``, weight ``w``. The image is
  first laid out batch-innermost and, for 2D, once more transposed, so that every gather
  of a block of neighbouring rays reads neighbouring addresses whatever the ray direction.
* Adjoint 2D (matched, deterministic): pixel-driven *gather*. For each angle, the rays that
  can touch pixel ``(i, j)`` are those crossing the segment of length two pixels centred on
  it along the ray's major axis; their detector indices form an interval found by projecting
  the segment's ends onto the detector. Each candidate's weight is recomputed with exactly
  the forward's formula from the same ``RayTable``, so the result is the transpose of the
  forward operator up to float rounding (no atomics, bitwise reproducible).
* Adjoint 3D: ray-driven scatter with atomic adds (the exact transpose; float sums in a
  run-dependent order).
* Launches (2D): the batch is cut into blocks of up to 8 (zero padded) with a compile-time
  stride, so a gather of one neighbour for the whole block is one vector load. On the first
  call for a problem shape a small tuner times a few launch shapes (block size, warps, packed
  or separate ray table) and keeps the fastest for the process. They agree to float rounding
  (~1e-7), not bitwise (each shape compiles to different arithmetic code):
  ``FEDRECON_TRITON_TUNE=0`` fixes the launch shape for bitwise run-to-run reproducibility.
  When a launch has too few rays/pixels to fill the GPU, its loop (steps for A, angles for
  A^T) is split into chunks whose partial sums are added in a fixed order; the number of
  chunks depends on the problem and the card only, so results are reproducible.

Everything accumulates in float32; images and sinograms may be stored as float16/bfloat16.
This module imports triton lazily; ``available()`` says whether the kernels can run.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RayTable",
    "available",
    "joseph2d_adjoint",
    "joseph2d_forward",
    "joseph3d_adjoint",
    "joseph3d_forward",
    "ray_table_2d",
    "ray_table_3d",
]

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None


def available(device: torch.device | None = None) -> bool:
    """True when Triton is importable and ``device`` (default: CUDA) can run its kernels."""
    if triton is None:
        return False
    if device is not None and device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return torch.cuda.is_available()


def use_kernels(backend: str, t: Tensor, owner: str) -> bool:
    """Whether an operator with ``backend`` ("auto", "triton" or its own non-Triton one) runs
    ``t`` on these kernels: "auto" picks them for CUDA float32/16/bf16 tensors when Triton is
    installed; "triton" insists (``RuntimeError`` naming ``owner`` otherwise)."""
    if backend not in ("auto", "triton"):
        return False
    ok = available(t.device) and t.dtype != torch.float64
    if backend == "auto":
        return ok and t.is_cuda
    if not ok:
        raise RuntimeError(f"{owner}(backend='triton') needs Triton, a CUDA tensor and "
                           f"float32/float16/bfloat16 data; got {t.device} {t.dtype}")
    return True


@dataclass(frozen=True)
class RayTable:
    """Per-ray line parameters in index space (see the module docstring), on one device."""

    a: Tensor        # (n_rays,) 2D or (n_rays, 2) 3D, float32: minor fractional index at step 0
    b: Tensor        # same shape: its increment per step
    w: Tensor        # (n_rays,) float32: physical length of one step
    axis: Tensor     # (n_rays,) int32: major axis (2D: 0 = rows i, 1 = columns j)
    # 2D adjoint only: step lengths split by major axis, (2, n_rays), 0 for rays of the other
    # axis; (n_angles, 2) int32 flags, does the angle have rays of each major axis; the
    # angles' cosines and sines (float32)
    w_major: Tensor | None = None
    has_major: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    # 2D adjoint: (n_rays, 4) float32 records (a, b, w_major[0], w_major[1]), one vector load
    packed: Tensor | None = None


_TABLES: OrderedDict[tuple, RayTable] = OrderedDict()
_TABLES_MAX = 8  # ray tables kept per process (LRU); 40 bytes per ray (2D), 24 (3D)


def _remember(key: tuple, table: RayTable) -> RayTable:
    with _LOCK:
        _TABLES[key] = table
        _TABLES.move_to_end(key)
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    return table
_LOCK = threading.Lock()


def _major_axis(e: Tensor) -> Tensor:
    """Index of the largest ``|e|`` per row, ties to the *last* axis (x-major when
    ``|d_x| >= |d_y|``, as ``_joseph_rows``): flip, argmax (first max), flip back."""
    return (e.shape[1] - 1) - torch.argmax(e.abs().flip(1), dim=1)


def _line_params(q0: Tensor, e: Tensor,
                 axis: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index-space line ``q0 + lam * e`` (float64, ``(R, n)``) -> major axis, ``a``, ``b``, ``w``.

    ``w`` is the physical length per unit step of the major index, i.e. ``1 / |e_major|``
    when ``e`` is the index-space velocity of a unit-speed physical ray. The major axis is
    each ray's own (``_major_axis``) unless ``axis`` gives one per ray.
    """
    n = e.shape[1]
    if axis is None:
        axis = _major_axis(e)
    e_m = e.gather(1, axis[:, None])
    q_m = q0.gather(1, axis[:, None])
    minor_cols = torch.stack([torch.tensor([c for c in range(n) if c != m], dtype=torch.int64)
                              for m in range(n)]).to(e.device)[axis]  # (R, n-1)
    e_n = e.gather(1, minor_cols)
    q_n = q0.gather(1, minor_cols)
    b = e_n / e_m
    a = q_n - q_m * b
    return axis, a, b, 1.0 / e_m.abs()[:, 0]


def ray_table_2d(geom, device: torch.device) -> RayTable:
    """The ``RayTable`` of a ``CTGeometry`` (cached per geometry and device)."""
    key = ("2d", geom, str(device))
    with _LOCK:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
    h, w = geom.image_size
    ps = geom.pixel_spacing
    origins, directions = geom.rays(torch.device("cpu"))
    # index space: row i = (H-1)/2 - y/ps, column j = x/ps + (W-1)/2
    q0 = torch.stack([(h - 1) / 2 - origins[:, 1] / ps, origins[:, 0] / ps + (w - 1) / 2], 1)
    e = torch.stack([-directions[:, 1] / ps, directions[:, 0] / ps], 1)
    axis, a, b, step = _line_params(q0, e)
    w_major = torch.stack([torch.where(axis == m, step, torch.zeros_like(step)) for m in (0, 1)])
    per_angle = axis.view(geom.n_angles, geom.det_count)
    has_major = torch.stack([(per_angle == m).any(1) for m in (0, 1)], 1)
    th = torch.tensor(geom.angles, dtype=torch.float64)

    def dev(t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return t.to(device, dtype).contiguous()

    packed = torch.stack([a[:, 0], b[:, 0], w_major[0], w_major[1]], 1)
    table = RayTable(dev(a[:, 0]), dev(b[:, 0]), dev(step), dev(axis, torch.int32),
                     dev(w_major), dev(has_major, torch.int32), dev(th.cos()), dev(th.sin()),
                     dev(packed))
    return _remember(key, table)


# ---------------------------------------------------------------------------------------
# 2D kernels
# ---------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _t_range(a, b, n, t_lo, t_hi):
        """Narrow [t_lo, t_hi] to the steps where -1 < a + b t < n (widened by one step)."""
        inv = tl.where(b != 0, 1.0 / tl.where(b != 0, b, 1.0), 0.0)
        t1 = (-1.0 - a) * inv
        t2 = (n.to(tl.float32) - a) * inv
        t_lo = tl.where(b > 0, tl.maximum(t_lo, t1 - 1.0), tl.where(b < 0, tl.maximum(t_lo, t2 - 1.0), t_lo))
        t_hi = tl.where(b > 0, tl.minimum(t_hi, t2 + 1.0), tl.where(b < 0, tl.minimum(t_hi, t1 + 1.0), t_hi))
        return t_lo, t_hi

    @triton.jit
    def _fp2d_kernel(img_ptr, out_ptr, a_ptr, b_ptr, w_ptr, ax_ptr,
                     n_rays, H, W, B, n_steps, steps_per_split,
                     BLOCK_R: tl.constexpr, BB: tl.constexpr):
        # img_ptr: (n_bblocks, 2, H*W, BB): per block of BB batch elements (zero padded),
        # the image row-major (for row-stepping rays) then transposed (column-stepping rays),
        # batch innermost with a compile-time stride, so each gather is one vector load;
        # out_ptr: (splits, B, n_rays), split s sums the steps of its chunk
        pid_r = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_s = tl.program_id(2)
        img_ptr += pid_b.to(tl.int64) * (2 * H * W * BB)
        out_ptr += pid_s.to(tl.int64) * B * n_rays
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < n_rays
        lane = tl.arange(0, BB)
        bi = pid_b * BB + lane
        a = tl.load(a_ptr + r, mask=rm, other=0.0)
        b = tl.load(b_ptr + r, mask=rm, other=0.0)
        wt = tl.load(w_ptr + r, mask=rm, other=0.0)
        ax = tl.load(ax_ptr + r, mask=rm, other=0)
        # axis 0: steps over rows i (minor = column j, stride 1 in the row-major copy)
        # axis 1: steps over columns j (minor = row i, stride 1 in the transposed copy)
        n_major = tl.where(ax == 0, H, W)
        n_minor = tl.where(ax == 0, W, H)
        base = tl.where(ax == 0, 0, H * W)
        # steps where the ray is inside the image: -1 < a + b t < n_minor
        t_lo = tl.zeros([BLOCK_R], dtype=tl.float32)
        t_hi = (n_major - 1).to(tl.float32)
        t_lo, t_hi = _t_range(a, b, n_minor, t_lo, t_hi)
        t_lo = tl.where(rm, tl.minimum(t_lo, n_steps * 1.0), n_steps * 1.0)
        t_hi = tl.where(rm, tl.maximum(t_hi, -1.0), -1.0)
        start = tl.maximum(tl.min(tl.floor(t_lo), axis=0).to(tl.int32), pid_s * steps_per_split)
        stop = tl.minimum(tl.max(tl.ceil(t_hi), axis=0).to(tl.int32) + 1,
                          tl.minimum(n_steps, (pid_s + 1) * steps_per_split))
        acc = tl.zeros([BLOCK_R, BB], dtype=tl.float32)
        for t in range(start, stop):
            f = a + b * t
            lo_f = tl.floor(f)
            hi_w = f - lo_f
            lo = lo_f.to(tl.int32)
            ok = rm & (t < n_major)
            ok0 = ok & (lo >= 0) & (lo < n_minor)
            ok1 = ok & (lo + 1 >= 0) & (lo + 1 < n_minor)
            off0 = (base + t * n_minor + lo) * BB
            v0 = tl.load(img_ptr + off0[:, None] + lane[None, :], mask=ok0[:, None], other=0.0).to(tl.float32)
            v1 = tl.load(img_ptr + (off0 + BB)[:, None] + lane[None, :], mask=ok1[:, None],
                         other=0.0).to(tl.float32)
            acc += v0 * (1.0 - hi_w)[:, None] + v1 * hi_w[:, None]
        acc = acc * wt[:, None]
        out = out_ptr + bi[None, :] * n_rays + r[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & (bi < B)[None, :])

    @triton.jit
    def _det_index(px, py, cs, sn, det_count, det_spacing, det_offset, sod, sdd,
                   FAN: tl.constexpr):
        """Fractional detector index of the ray through physical point (px, py)."""
        s = px * cs + py * sn
        if FAN:
            s = sdd * s / (sod + px * sn - py * cs)
        return (s - det_offset) / det_spacing + (det_count - 1) * 0.5

    @triton.jit
    def _bp2d_kernel(sino_ptr, out_ptr, tab_ptr, a_ptr, b_ptr, wm_ptr, has_ptr, cos_ptr, sin_ptr,
                     n_angles, det_count, H, W, B, ps, det_spacing, det_offset, sod, sdd,
                     angles_per_split,
                     FAN: tl.constexpr, PACKED: tl.constexpr, BLOCK_P: tl.constexpr,
                     BB: tl.constexpr):
        # sino_ptr: (n_bblocks, n_rays, BB), batch innermost with a compile-time stride;
        # out_ptr: (splits, B, H*W), split s sums the angles of its chunk;
        # tab_ptr: (n_rays, 4) = a, b, step length if the ray steps over rows else 0, the
        # same for columns (one vector load per candidate ray when PACKED); a_ptr, b_ptr,
        # wm_ptr: the same numbers as separate arrays, wm (2, n_rays);
        # has_ptr: (n_angles, 2) int32, whether the angle has rays of each major axis
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_s = tl.program_id(2)
        n_rays = n_angles * det_count
        sino_ptr += pid_b.to(tl.int64) * n_rays * BB
        out_ptr += pid_s.to(tl.int64) * B * H * W
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < H * W
        i = p // W
        j = p - i * W
        lane = tl.arange(0, BB)
        bi = pid_b * BB + lane
        col = tl.arange(0, 4)[None, :]
        x = (j.to(tl.float32) - (W - 1) * 0.5) * ps
        y = ((H - 1) * 0.5 - i.to(tl.float32)) * ps
        fi = i.to(tl.float32)
        fj = j.to(tl.float32)
        acc = tl.zeros([BLOCK_P, BB], dtype=tl.float32)
        for ang in range(pid_s * angles_per_split, tl.minimum(n_angles, (pid_s + 1) * angles_per_split)):
            cs = tl.load(cos_ptr + ang)
            sn = tl.load(sin_ptr + ang)
            for major in tl.static_range(2):
                if tl.load(has_ptr + 2 * ang + major) != 0:
                    # rays stepping over rows (major 0) cross the horizontal segment through
                    # the pixel centre (x +- ps, y); column-stepping rays (major 1) the vertical one
                    if major == 0:
                        k_a = _det_index(x - ps, y, cs, sn, det_count, det_spacing, det_offset, sod, sdd, FAN)
                        k_b = _det_index(x + ps, y, cs, sn, det_count, det_spacing, det_offset, sod, sdd, FAN)
                        t_f = fi
                        target = j
                    else:
                        k_a = _det_index(x, y - ps, cs, sn, det_count, det_spacing, det_offset, sod, sdd, FAN)
                        k_b = _det_index(x, y + ps, cs, sn, det_count, det_spacing, det_offset, sod, sdd, FAN)
                        t_f = fj
                        target = i
                    # bins whose rays cross the open segment, widened by 0.01 bin against
                    # rounding (far above float32 error); the exact weight below decides
                    lo_k = tl.minimum(tl.maximum(tl.minimum(k_a, k_b) - 0.01, -2.0), det_count + 1.0)
                    hi_k = tl.minimum(tl.maximum(tl.maximum(k_a, k_b) + 0.01, -2.0), det_count + 1.0)
                    k0 = tl.maximum(tl.ceil(lo_k).to(tl.int32), 0)
                    k1 = tl.minimum(tl.floor(hi_k).to(tl.int32), det_count - 1)
                    n_c = tl.where(pm, k1 - k0 + 1, 0)
                    c_max = tl.max(n_c, axis=0)
                    for c in range(c_max):
                        k = k0 + c
                        ok = pm & (k <= k1)
                        ray = ang * det_count + k
                        if PACKED:
                            rec = tl.load(tab_ptr + ray[:, None] * 4 + col, mask=ok[:, None], other=0.0)
                            a = tl.sum(tl.where(col == 0, rec, 0.0), axis=1)
                            b = tl.sum(tl.where(col == 1, rec, 0.0), axis=1)
                            wt = tl.sum(tl.where(col == 2 + major, rec, 0.0), axis=1)
                        else:
                            a = tl.load(a_ptr + ray, mask=ok, other=0.0)
                            b = tl.load(b_ptr + ray, mask=ok, other=0.0)
                            wt = tl.load(wm_ptr + major * n_rays + ray, mask=ok, other=0.0)
                        f = a + b * t_f
                        lo_f = tl.floor(f)
                        hi_w = f - lo_f
                        lo = lo_f.to(tl.int32)
                        coef = tl.where(lo == target, 1.0 - hi_w, tl.where(lo + 1 == target, hi_w, 0.0))
                        coef = coef * wt
                        use = ok & (coef != 0.0)
                        v = tl.load(sino_ptr + ray[:, None] * BB + lane[None, :],
                                    mask=use[:, None], other=0.0).to(tl.float32)
                        acc += v * coef[:, None]
        out = out_ptr + bi[None, :] * (H * W) + p[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pm[:, None] & (bi < B)[None, :])


# ---------------------------------------------------------------------------------------
# launch configuration: work split and a small per-shape tuner
# ---------------------------------------------------------------------------------------
_BLOCK_B_MAX = 8
# Launch shapes tried on the first call for each problem shape (each output element runs
# the same loop in the same order; results agree to float rounding): (block, num_warps[,
# packed ray table]). The first is used when tuning is off (FEDRECON_TRITON_TUNE=0, or
# Triton's CPU interpreter).
_FP2D_CONFIGS = ((128, 4), (64, 2), (32, 1), (16, 1), (128, 2))
_BP2D_CONFIGS = ((128, 4, True), (128, 4, False), (64, 2, True), (32, 1, True), (32, 1, False),
                 (16, 1, True))
_CONE_CONFIGS = ((128, 4), (64, 2), (32, 1), (16, 1))
_TUNED: dict[tuple, tuple] = {}
# None: split a launch's loop (steps for A, angles for A^T) into chunks when it has too few
# rays/pixels to fill the GPU; an int forces that many chunks (1 = no split)
SPLIT: int | None = None
_MAX_SPLITS = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_b(batch: int) -> int:
    return min(_BLOCK_B_MAX, triton.next_power_of_2(max(batch, 1)))


def _splits(lanes: int, loop: int, device: torch.device) -> int:
    """Chunks of a kernel's loop: enough (ray or pixel, batch block) lanes for every thread
    slot of the GPU (SMs x 2048), at most 8 and at least 16 loop iterations each. A function
    of the problem and the card only, so a given call always sums in the same order."""
    if SPLIT is not None:
        return max(1, min(SPLIT, loop))
    if device.type != "cuda":
        n = 1
    else:
        props = torch.cuda.get_device_properties(device)
        slots = props.multi_processor_count * getattr(props, "max_threads_per_multi_processor", 2048)
        n = slots // max(lanes, 1)
    return max(1, min(n, _MAX_SPLITS, loop // 16 if loop >= 32 else 1))


def _tune(key: tuple, configs: tuple, launch, rounds: int = 5) -> tuple:
    """The fastest of ``configs`` for ``key``, remembered per process. Every config is
    launched once untimed (compiling it and bringing the GPU's clocks up), then timed in
    ``rounds`` round-robin passes (one launch each), so that clock ramps and noise hit all
    alike; the lowest median wins. ``launch(cfg)`` must only overwrite its outputs. Off under
    the interpreter, during CUDA-graph capture or with FEDRECON_TRITON_TUNE=0."""
    with _LOCK:
        cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if (len(configs) == 1 or _interpreting() or os.environ.get("FEDRECON_TRITON_TUNE", "1") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return configs[0]  # not remembered: a later call may tune
    for c in configs:
        launch(c)
    events = [[] for _ in configs]
    for _ in range(rounds):
        for n, c in enumerate(configs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch(c)
            end.record()
            events[n].append((start, end))
    torch.cuda.synchronize()
    medians = [sorted(s.elapsed_time(e) for s, e in ev)[rounds // 2] for ev in events]
    cfg = configs[min(range(len(configs)), key=medians.__getitem__)]
    with _LOCK:
        _TUNED[key] = cfg
    return cfg


def tuned_configs() -> dict[tuple, tuple]:
    """The launch shapes the tuner picked so far: ``{(kernel, shape...): config}``."""
    with _LOCK:
        return dict(_TUNED)


def _batch_blocks(t: Tensor, block_b: int) -> Tensor:
    """``(B, N)`` -> ``(ceil(B / block_b), N, block_b)``, zero padded, contiguous."""
    batch, n = t.shape
    nbb = triton.cdiv(batch, block_b)
    if nbb * block_b != batch:
        t = torch.cat([t, t.new_zeros(nbb * block_b - batch, n)])
    return t.view(nbb, block_b, n).transpose(1, 2).contiguous()


def _sum_splits(part: Tensor, dtype: torch.dtype) -> Tensor:
    """Add the chunks' partial sums in a fixed order (deterministic)."""
    out = part[0] if part.shape[0] == 1 else part.sum(0)
    return out.to(dtype)


def joseph2d_forward(geom, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """``(B, H, W) -> (B, n_angles, det_count)`` on CUDA (``x`` float32/float16/bfloat16)."""
    h, w = geom.image_size
    table = ray_table_2d(geom, x.device)
    batch = x.shape[0]
    bb = _block_b(batch)
    # per batch block, the image row-major and transposed, batch innermost: both kinds of
    # rays gather along contiguous memory
    img = torch.stack([_batch_blocks(x.reshape(batch, h * w), bb),
                       _batch_blocks(x.transpose(1, 2).reshape(batch, h * w), bb)], 1).contiguous()
    n_rays = geom.n_angles * geom.det_count
    n_steps = max(h, w)
    nbb = img.shape[0]
    splits = _splits(n_rays * nbb, n_steps, x.device)
    per = triton.cdiv(n_steps, splits)
    splits = triton.cdiv(n_steps, per)
    dtype = out_dtype or x.dtype
    part = torch.empty(splits, batch, n_rays, device=x.device,
                       dtype=dtype if splits == 1 else torch.float32)

    def launch(cfg):
        block, warps = cfg
        _fp2d_kernel[(triton.cdiv(n_rays, block), nbb, splits)](
            img, part, table.a, table.b, table.w, table.axis, n_rays, h, w, batch, n_steps, per,
            BLOCK_R=block, BB=bb, num_warps=warps)

    cfg = _tune(("fp2d", geom.kind, h, w, n_rays, batch, splits, str(x.dtype), str(x.device)),
                _FP2D_CONFIGS, launch)
    launch(cfg)
    return _sum_splits(part, dtype).view(batch, geom.n_angles, geom.det_count)


def joseph2d_adjoint(geom, y: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Matched backprojection ``(B, n_angles, det_count) -> (B, H, W)`` on CUDA."""
    h, w = geom.image_size
    table = ray_table_2d(geom, y.device)
    batch = y.shape[0]
    n_rays = geom.n_angles * geom.det_count
    bb = _block_b(batch)
    sino = _batch_blocks(y.reshape(batch, n_rays), bb)  # (n_bblocks, n_rays, BB)
    nbb = sino.shape[0]
    fan = geom.kind == "fan"
    splits = _splits(h * w * nbb, geom.n_angles, y.device)
    per = triton.cdiv(geom.n_angles, splits)
    splits = triton.cdiv(geom.n_angles, per)
    dtype = out_dtype or y.dtype
    part = torch.empty(splits, batch, h * w, device=y.device,
                       dtype=dtype if splits == 1 else torch.float32)

    def launch(cfg):
        block, warps, packed = cfg
        _bp2d_kernel[(triton.cdiv(h * w, block), nbb, splits)](
            sino, part, table.packed, table.a, table.b, table.w_major, table.has_major,
            table.cos, table.sin, geom.n_angles, geom.det_count, h, w, batch,
            float(geom.pixel_spacing), float(geom.det_spacing), float(geom.det_offset),
            float(geom.source_distance) if fan else 0.0,
            float(geom.source_detector_distance) if fan else 0.0, per,
            FAN=fan, PACKED=packed, BLOCK_P=block, BB=bb, num_warps=warps)

    cfg = _tune(("bp2d", geom.kind, h, w, n_rays, batch, splits, str(y.dtype), str(y.device)),
                _BP2D_CONFIGS, launch)
    launch(cfg)
    return _sum_splits(part, dtype).view(batch, h, w)


# ---------------------------------------------------------------------------------------
# 3D cone beam
# ---------------------------------------------------------------------------------------
def ray_table_3d(geom, device: torch.device, dtype: torch.dtype = torch.float32) -> RayTable:
    """The ``RayTable`` of a ``ConeGeometry`` (index space ``(k, i, j)`` = (z, y down, x));
    float32 for the kernels, float64 for the torch path's float64 reference."""
    key = ("3d", geom, str(device), dtype)
    with _LOCK:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
    d, h, w = geom.volume_size
    vs = geom.voxel_spacing
    origins, directions = geom.rays(torch.device("cpu"))
    q0 = torch.stack([origins[:, 2] / vs + (d - 1) / 2, (h - 1) / 2 - origins[:, 1] / vs,
                      origins[:, 0] / vs + (w - 1) / 2], 1)
    e = torch.stack([directions[:, 2], -directions[:, 1], directions[:, 0]], 1) / vs
    forced = None
    if geom.stepping == "view":
        # every ray of a view steps along the major axis of the view's central ray (source
        # to detector centre), as ASTRA's cone kernels do
        centre = geom.central_directions()
        view_axis = _major_axis(torch.stack([centre[:, 2], -centre[:, 1], centre[:, 0]], 1))
        forced = view_axis.repeat_interleave(geom.det_rows * geom.det_cols)
        along = e.gather(1, forced[:, None]).abs()[:, 0] / torch.linalg.vector_norm(e, dim=1)
        if float(along.min()) < 0.05:
            raise ValueError("stepping='view' needs every ray within ~87 degrees of its view's "
                             "stepping axis; this geometry's cone is too wide: use stepping='ray'")
    axis, a, b, step = _line_params(q0, e, forced)
    table = RayTable(a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous(),
                     step.to(device, dtype).contiguous(), axis.to(device, torch.int32).contiguous())
    return _remember(key, table)


if triton is not None:

    @triton.jit
    def _axis_layout(ax, D, H, W):
        """Per-lane (n_major, n1, n2, stride_major, stride1, base) of the two volume copies:
        copy 0 is (D, H, W) for k- and i-stepping rays, copy 1 is (D, W, H) for j-stepping
        rays; the second minor axis always has stride 1 (both batch-innermost)."""
        n_major = tl.where(ax == 0, D, tl.where(ax == 1, H, W))
        n1 = tl.where(ax == 0, H, D)
        n2 = tl.where(ax == 0, W, tl.where(ax == 1, W, H))
        s_major = tl.where(ax == 0, H * W, tl.where(ax == 1, W, H))
        s1 = tl.where(ax == 0, W, H * W)
        base = tl.where(ax == 2, D * H * W, 0)
        return n_major, n1, n2, s_major, s1, base

    @triton.jit
    def _cone_walk(vol_ptr, out_ptr, a_ptr, b_ptr, w_ptr, ax_ptr, n_rays, D, H, W, B, n_steps,
                   ADJOINT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        """Forward: gather along each ray into out (B, n_rays). Adjoint: scatter the ray
        values (vol_ptr: (B, n_rays)) into out_ptr, the two float32 volume copies."""
        pid_r = tl.program_id(0)
        pid_b = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < n_rays
        bi = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        bm = bi < B
        a1 = tl.load(a_ptr + 2 * r, mask=rm, other=0.0)
        a2 = tl.load(a_ptr + 2 * r + 1, mask=rm, other=0.0)
        b1 = tl.load(b_ptr + 2 * r, mask=rm, other=0.0)
        b2 = tl.load(b_ptr + 2 * r + 1, mask=rm, other=0.0)
        wt = tl.load(w_ptr + r, mask=rm, other=0.0)
        ax = tl.load(ax_ptr + r, mask=rm, other=0)
        n_major, n1, n2, s_major, s1, base = _axis_layout(ax, D, H, W)
        t_lo = tl.zeros([BLOCK_R], dtype=tl.float32)
        t_hi = (n_major - 1).to(tl.float32)
        t_lo, t_hi = _t_range(a1, b1, n1, t_lo, t_hi)
        t_lo, t_hi = _t_range(a2, b2, n2, t_lo, t_hi)
        t_lo = tl.where(rm, tl.minimum(t_lo, n_steps * 1.0), n_steps * 1.0)
        t_hi = tl.where(rm, tl.maximum(t_hi, -1.0), -1.0)
        start = tl.maximum(tl.min(tl.floor(t_lo), axis=0).to(tl.int32), 0)
        stop = tl.minimum(tl.max(tl.ceil(t_hi), axis=0).to(tl.int32) + 1, n_steps)
        bmask = bm[None, :]
        if ADJOINT:
            val = tl.load(vol_ptr + bi[None, :] * n_rays + r[:, None], mask=rm[:, None] & bmask,
                          other=0.0).to(tl.float32) * wt[:, None]
        else:
            acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
        for t in range(start, stop):
            f1 = a1 + b1 * t
            f2 = a2 + b2 * t
            l1f = tl.floor(f1)
            l2f = tl.floor(f2)
            h1 = f1 - l1f
            h2 = f2 - l2f
            l1 = l1f.to(tl.int32)
            l2 = l2f.to(tl.int32)
            ok = rm & (t < n_major)
            in1a = ok & (l1 >= 0) & (l1 < n1)
            in1b = ok & (l1 + 1 >= 0) & (l1 + 1 < n1)
            in2a = (l2 >= 0) & (l2 < n2)
            in2b = (l2 + 1 >= 0) & (l2 + 1 < n2)
            off = base + t * s_major + l1 * s1 + l2
            o00 = (off * B)[:, None] + bi[None, :]
            o01 = o00 + B
            o10 = o00 + (s1 * B)[:, None]
            o11 = o10 + B
            w00 = (1.0 - h1) * (1.0 - h2)
            w01 = (1.0 - h1) * h2
            w10 = h1 * (1.0 - h2)
            w11 = h1 * h2
            m00 = (in1a & in2a)[:, None] & bmask
            m01 = (in1a & in2b)[:, None] & bmask
            m10 = (in1b & in2a)[:, None] & bmask
            m11 = (in1b & in2b)[:, None] & bmask
            if ADJOINT:
                tl.atomic_add(out_ptr + o00, val * w00[:, None], mask=m00, sem="relaxed")
                tl.atomic_add(out_ptr + o01, val * w01[:, None], mask=m01, sem="relaxed")
                tl.atomic_add(out_ptr + o10, val * w10[:, None], mask=m10, sem="relaxed")
                tl.atomic_add(out_ptr + o11, val * w11[:, None], mask=m11, sem="relaxed")
            else:
                v00 = tl.load(vol_ptr + o00, mask=m00, other=0.0).to(tl.float32)
                v01 = tl.load(vol_ptr + o01, mask=m01, other=0.0).to(tl.float32)
                v10 = tl.load(vol_ptr + o10, mask=m10, other=0.0).to(tl.float32)
                v11 = tl.load(vol_ptr + o11, mask=m11, other=0.0).to(tl.float32)
                acc += (v00 * w00[:, None] + v01 * w01[:, None] + v10 * w10[:, None]
                        + v11 * w11[:, None])
        if not ADJOINT:
            acc = acc * wt[:, None]
            tl.store(out_ptr + bi[None, :] * n_rays + r[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=rm[:, None] & bmask)


def _cone_launch(geom, src: Tensor, dst: Tensor, adjoint: bool) -> None:
    d, h, w = geom.volume_size
    table = ray_table_3d(geom, src.device)
    n_rays = table.w.numel()
    batch = src.shape[-1] if not adjoint else src.shape[0]
    block_b = _block_b(batch)

    def launch(cfg):
        block, warps = cfg
        if adjoint:
            dst.zero_()  # the scatter accumulates: every launch starts from zero
        _cone_walk[(triton.cdiv(n_rays, block), triton.cdiv(batch, block_b))](
            src, dst, table.a, table.b, table.w, table.axis, n_rays, d, h, w, batch,
            max(d, h, w), ADJOINT=adjoint, BLOCK_R=block, BLOCK_B=block_b, num_warps=warps)

    cfg = _tune(("cone", adjoint, d, h, w, n_rays, batch, str(src.dtype), str(src.device)),
                _CONE_CONFIGS, launch)
    launch(cfg)


def joseph3d_forward(geom, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """``(B, D, H, W) -> (B, n_angles, det_rows, det_cols)`` on CUDA."""
    _d, _h, _w = geom.volume_size
    batch = x.shape[0]
    vol = torch.stack([x.permute(1, 2, 3, 0).reshape(-1, batch),
                       x.permute(1, 3, 2, 0).reshape(-1, batch)]).contiguous()
    n_rays = geom.n_angles * geom.det_rows * geom.det_cols
    out = torch.empty(batch, n_rays, device=x.device, dtype=out_dtype or x.dtype)
    _cone_launch(geom, vol, out, adjoint=False)
    return out.view(batch, geom.n_angles, geom.det_rows, geom.det_cols)


def joseph3d_adjoint(geom, y: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Exact transpose ``(B, n_angles, det_rows, det_cols) -> (B, D, H, W)`` (atomic scatter)."""
    d, h, w = geom.volume_size
    batch = y.shape[0]
    acc = torch.zeros(2, d * h * w, batch, device=y.device, dtype=torch.float32)
    _cone_launch(geom, y.reshape(batch, -1).contiguous(), acc, adjoint=True)
    out = (acc[0].view(d, h, w, batch).permute(3, 0, 1, 2)
           + acc[1].view(d, w, h, batch).permute(3, 0, 2, 1))
    return out.to(out_dtype or y.dtype).contiguous()
