"""GPU projector benchmark (issue #9): Triton matrix-free kernels vs torch sparse CSR vs ASTRA-CUDA.

Prints markdown tables: measured ceilings of the card (device-to-device copy bandwidth and
the read throughput of L2-resident data), then per case the median time of the forward
and adjoint in float32 / float16 / bfloat16, the sparse CSR path on the same card, ASTRA's
CUDA projectors (astra-toolbox, when importable) and the relative difference to ASTRA,
and each kernel's time over its gather floor: the bytes its interpolation reads must move
(counted from the ray table: steps inside the image x neighbours x batch x element size)
over the measured L2 read throughput.

    python scripts/bench_gpu.py            # on a CUDA machine with Triton
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import numpy as np
import torch
from fedrecon.operators import ConeBeam3D, FanBeam2D, ParallelBeam2D
from fedrecon.operators import _triton_ct as T


def timeit(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------
if T.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _read_kernel(src, out, n, passes, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in range(passes):
            off = ((pid + p * tl.num_programs(0)) * BLOCK + tl.arange(0, BLOCK)) % n
            acc += tl.load(src + off)
        tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)


def ceilings() -> tuple[float, float]:
    """(DRAM copy GB/s counting read + write, L2-resident read GB/s)."""
    big = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(big)
    ms = timeit(lambda: dst.copy_(big), reps=10)
    dram = 2 * big.numel() * 4 / ms / 1e6
    big.set_(torch.empty(0, device="cuda"))
    dst.set_(torch.empty(0, device="cuda"))
    n = 2**22  # 16 MiB: resident in L2 (50-60 MB)
    src = torch.randn(n, device="cuda")
    block, programs, passes = 1024, 132 * 16, 64
    out = torch.empty(programs * block, device="cuda")
    ms = timeit(lambda: _read_kernel[(programs,)](src, out, n, passes, BLOCK=block, num_warps=8))
    l2 = programs * block * passes * 4 / ms / 1e6
    return dram, l2


def gather_bytes_2d(op, batch: int, elem: int) -> tuple[float, float]:
    """Bytes the forward's interpolation reads (2 neighbours per step inside the image) and
    the adjoint's (one ray value per pixel-ray pair with nonzero weight), both x batch."""
    g = op.geometry
    table = T.ray_table_2d(g, torch.device("cpu"))
    h, w = g.image_size
    ax = table.axis.long()
    n_major = torch.where(ax == 0, h, w).double()
    n_minor = torch.where(ax == 0, w, h).double()
    a, b = table.a.double(), table.b.double()
    t = torch.arange(max(h, w), dtype=torch.float64)
    f = a[:, None] + b[:, None] * t
    inside = (f > -1) & (f < n_minor[:, None]) & (t < n_major[:, None])
    steps = float(inside.sum())
    return steps * 2 * batch * elem, steps * 2 * batch * elem


def astra_available() -> bool:
    try:
        import astra
        return bool(astra.use_cuda())
    except Exception as exc:  # noqa: BLE001
        print(f"(ASTRA not used: {type(exc).__name__}: {exc})", file=sys.stderr)
        return False


class AstraCuda3D:
    """ASTRA's CUDA 3D projector on GPU-resident torch tensors (``astra.data3d.link``, no
    host transfers): batched 2D parallel beam as 'parallel3d' (one slice per image), and
    our cone beam as 'cone_vec' with the geometry's own source/detector vectors."""

    def __init__(self, vol_geom, proj_geom, vol: torch.Tensor, proj: torch.Tensor) -> None:
        import astra

        self.astra = astra
        self.vid = astra.data3d.link("-vol", vol_geom, vol)
        self.pid = astra.data3d.link("-sino", proj_geom, proj)
        self.fp = self._alg("FP3D_CUDA", "VolumeDataId")
        self.bp = self._alg("BP3D_CUDA", "ReconstructionDataId")

    def _alg(self, kind: str, vol_key: str) -> int:
        cfg = self.astra.astra_dict(kind)
        cfg["ProjectionDataId"] = self.pid
        cfg[vol_key] = self.vid
        return self.astra.algorithm.create(cfg)

    def forward(self) -> None:
        self.astra.algorithm.run(self.fp)

    def back(self) -> None:
        self.astra.algorithm.run(self.bp)


def load_baseline(path: str):
    """Another version of ``_triton_ct.py`` (e.g. ``git show REV:operators/_triton_ct.py``),
    imported as its own module, to time against the current kernels in the same run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_triton_ct_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def bench_2d(name: str, op, batch: int, l2: float, use_astra: bool, rows: list,
             baseline=None) -> None:
    g = op.geometry
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(batch, *op.domain_shape, device="cuda", generator=gen)
    y = torch.rand(batch, *op.range_shape, device="cuda", generator=gen)
    fwd_bytes, adj_bytes = gather_bytes_2d(op, batch, 4)
    ref_f = T.joseph2d_forward(g, x)
    ref_b = T.joseph2d_adjoint(g, y)
    floors = (fwd_bytes / l2 / 1e6, adj_bytes / l2 / 1e6)
    if baseline is not None:
        tf0 = timeit(lambda: baseline.joseph2d_forward(g, x))
        tb0 = timeit(lambda: baseline.joseph2d_adjoint(g, y))
        e0 = f"{rel(baseline.joseph2d_forward(g, x), ref_f):.1e} / {rel(baseline.joseph2d_adjoint(g, y), ref_b):.1e}"
        rows.append((name, "Triton float32, **before** (baseline kernels)", tf0, tb0,
                     f"{tf0 / floors[0]:.1f}x / {tb0 / floors[1]:.1f}x", e0))
    T.SPLIT = 1  # the same kernels without splitting their loop over programs
    try:
        tf1 = timeit(lambda: T.joseph2d_forward(g, x))
        tb1 = timeit(lambda: T.joseph2d_adjoint(g, y))
        e1 = f"{rel(T.joseph2d_forward(g, x), ref_f):.1e} / {rel(T.joseph2d_adjoint(g, y), ref_b):.1e}"
    finally:
        T.SPLIT = None
    rows.append((name, "Triton float32, loop not split", tf1, tb1,
                 f"{tf1 / floors[0]:.1f}x / {tb1 / floors[1]:.1f}x", e1))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd, yd = x.to(dtype), y.to(dtype)
        el = torch.finfo(dtype).bits // 8
        tf = timeit(lambda xd=xd: T.joseph2d_forward(g, xd))
        tb = timeit(lambda yd=yd: T.joseph2d_adjoint(g, yd))
        ef = rel(T.joseph2d_forward(g, xd), ref_f)
        eb = rel(T.joseph2d_adjoint(g, yd), ref_b)
        floor_f = fwd_bytes * el / 4 / l2 / 1e6
        floor_b = adj_bytes * el / 4 / l2 / 1e6
        rows.append((name, f"Triton {str(dtype)[6:]}", tf, tb, f"{tf / floor_f:.1f}x / {tb / floor_b:.1f}x",
                     f"{ef:.1e} / {eb:.1e}" if dtype != torch.float32 else "-"))
    op_s = op  # the same geometry on the sparse CSR path of the same card
    op_s.backend = "sparse"
    mat, mat_t = op_s.matrices(torch.float32, torch.device("cuda"))
    ts_f = timeit(lambda: op_s.A(x))
    ts_b = timeit(lambda: op_s.A_adjoint(y))
    e_sf, e_sb = rel(op_s.A(x), ref_f), rel(op_s.A_adjoint(y), ref_b)
    mib = sum(m.values().numel() * 8 + m.crow_indices().numel() * 4 for m in (mat, mat_t)) / 2**20
    rows.append((name, f"torch sparse CSR fp32 ({mib:.0f} MiB of matrices)", ts_f, ts_b, "-",
                 f"{e_sf:.1e} / {e_sb:.1e}"))
    op.backend = "auto"
    if not use_astra:
        return
    import astra

    h, w = g.image_size
    ps = g.pixel_spacing
    if g.kind == "parallel":
        vol_geom = astra.create_vol_geom(h, w, batch)
        proj_geom = astra.create_proj_geom("parallel3d", g.det_spacing / ps, 1.0, batch, g.det_count,
                                           np.asarray(g.angles))
        vol = torch.empty(batch, h, w, device="cuda")
        proj = torch.empty(batch, g.n_angles, g.det_count, device="cuda")
        ast = AstraCuda3D(vol_geom, proj_geom, vol, proj)
        vol.copy_(x)
        tf = timeit(ast.forward)
        # ASTRA's 3D axis conventions (which way its volume's y and its detector count) are
        # settled by the data: the best of the flips
        errs = {}
        for vflip in (False, True):
            vol.copy_(x.flip(1) if vflip else x)
            ast.forward()
            for pflip in (False, True):
                errs[(vflip, pflip)] = rel((proj.flip(-1) if pflip else proj) * ps, ref_f)
        best = min(errs, key=errs.get)
        print(f"{name} vs ASTRA parallel3d: volume y flipped {best[0]}, detector reversed "
              f"{best[1]}: {errs[best]:.2e} (all: " + ", ".join(f"{v:.1e}" for v in errs.values()) + ")")
        proj.copy_(y.flip(-1) if best[1] else y)
        tb = timeit(ast.back)
        eb = rel((vol.flip(1) if best[0] else vol) * ps, ref_b)
        rows.append((name, "ASTRA-CUDA parallel3d (device memory)", tf, tb, "-",
                     f"{errs[best]:.1e} / {eb:.1e} vs ours"))
        proj_geom = astra.create_proj_geom("parallel", g.det_spacing / ps, g.det_count,
                                           np.asarray(g.angles))
        flip = False
    else:
        proj_geom = astra.create_proj_geom("fanflat", g.det_spacing / ps, g.det_count,
                                           np.asarray(g.angles) + math.pi, g.source_distance / ps,
                                           g.detector_distance / ps)
        flip = True
    # ASTRA's 2D CUDA projector from host arrays, one image per call (its 2D API)
    vol_geom = astra.create_vol_geom(h, w)
    pid = astra.create_projector("cuda", proj_geom, vol_geom)
    xs, ys = x.cpu().numpy(), y.cpu().numpy()

    def fp():
        out = []
        for im in xs:
            sid, sino = astra.create_sino(im, pid)
            astra.data2d.delete(sid)
            out.append(sino[:, ::-1] if flip else sino)
        return np.stack(out)

    def bp():
        out = []
        for s in ys:
            vid, rec = astra.create_backprojection(np.ascontiguousarray(s[:, ::-1] if flip else s), pid)
            astra.data2d.delete(vid)
            out.append(rec)
        return np.stack(out)

    import time
    t0 = time.perf_counter()
    for _ in range(3):
        sf = fp()
    tf = (time.perf_counter() - t0) / 3 * 1e3
    t0 = time.perf_counter()
    for _ in range(3):
        sb = bp()
    tb = (time.perf_counter() - t0) / 3 * 1e3
    ef = rel(torch.from_numpy(sf.copy()) * ps, ref_f.cpu())
    eb = rel(torch.from_numpy(sb.copy()) * ps, ref_b.cpu())
    label = f"ASTRA-CUDA 2D {'fanflat' if flip else 'parallel'} (host arrays, per image, incl. transfers)"
    rows.append((name, label, tf, tb, "-", f"{ef:.1e} / {eb:.1e} vs ours"))


def bench_cone(args, l2: float, use_astra: bool, rows: list) -> None:
    n, views, det = args.cone_size, args.cone_views, (args.cone_det_rows, args.cone_det_cols)
    op = ConeBeam3D(n, n_angles=views, det_shape=det, source_distance=2.0 * n,
                    detector_distance=1.0 * n, det_spacing=1.5, backend="triton").cuda()
    g = op.geometry
    name = f"cone {n}^3, {views} views, {det[0]}x{det[1]}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(1, n, n, n, device="cuda", generator=gen)
    y = torch.rand(1, *op.range_shape, device="cuda", generator=gen)
    ref_f = op.A(x)
    ref_b = op.A_adjoint(y)
    table = T.ray_table_3d(g, torch.device("cuda"))
    n_rays = table.w.numel()
    nnz_est = n_rays * n * 4  # upper bound on the sparse matrix's entries
    for dtype in (torch.float32, torch.bfloat16):
        xd, yd = x.to(dtype), y.to(dtype)
        tf = timeit(lambda xd=xd: op.A(xd), reps=5)
        tb = timeit(lambda yd=yd: op.A_adjoint(yd), reps=5)
        err = "-" if dtype == torch.float32 else f"{rel(op.A(xd), ref_f):.1e} / {rel(op.A_adjoint(yd), ref_b):.1e}"
        floor = n_rays * n * 4 * (torch.finfo(dtype).bits // 8) / l2 / 1e6
        rows.append((name, f"Triton {str(dtype)[6:]}", tf, tb, f"{tf / floor:.1f}x / {tb / floor:.1f}x", err))
    rows.append((name, f"(sparse matrix: ~{nnz_est / 1e9:.0f}e9 entries, ~{nnz_est * 8 / 2**30:.0f} GiB: not built)",
                 float("nan"), float("nan"), "-", "-"))
    if not use_astra:
        return
    import astra

    th = np.asarray(g.angles)
    vecs = np.zeros((views, 12))
    r = np.stack([np.sin(th), -np.cos(th), 0 * th], 1)
    u = np.stack([np.cos(th), np.sin(th), 0 * th], 1)
    vecs[:, 0:3] = -g.source_distance * r
    vecs[:, 3:6] = g.detector_distance * r + g.det_offset[1] * u + np.array([0, 0, g.det_offset[0]])
    vecs[:, 6:9] = g.det_spacing[1] * u
    vecs[:, 9:12] = np.array([0, 0, g.det_spacing[0]])
    vol_geom = astra.create_vol_geom(n, n, n)
    proj_geom = astra.create_proj_geom("cone_vec", det[0], det[1], vecs)
    vol = torch.empty(n, n, n, device="cuda")
    proj = torch.empty(det[0], views, det[1], device="cuda")
    ast = AstraCuda3D(vol_geom, proj_geom, vol, proj)
    vol.copy_(x[0])
    tf = timeit(ast.forward, reps=5)
    ours = ref_f[0].permute(1, 0, 2)  # (rows, views, cols) like ASTRA
    # axis conventions not pinned down by ASTRA's documentation (which way its volume's y
    # and its detector's rows count) are settled by the data: the best of the four flips
    errs = {}
    for vflip in (False, True):
        vol.copy_(x[0].flip(1) if vflip else x[0])
        ast.forward()
        for pflip in (False, True):
            errs[f"forward, volume y {'flipped' if vflip else 'as is'}, rows {'flipped' if pflip else 'as is'}"] = \
                rel(proj.flip(0) if pflip else proj, ours)
    proj.copy_(y[0].permute(1, 0, 2))
    tb = timeit(ast.back, reps=5)
    eb = min(rel(vol, ref_b[0]), rel(vol.flip(1), ref_b[0]))
    best = min(errs, key=errs.get)
    print(f"cone vs ASTRA: {best}: {errs[best]:.2e} (all: " + ", ".join(f"{v:.2e}" for v in errs.values()) + ")")
    rows.append((name, "ASTRA-CUDA cone_vec (device memory)", tf, tb, "-",
                 f"{errs[best]:.1e} / {eb:.1e} vs ours"))
    # ASTRA's cone kernels step every ray of a view along the view's central axis; ours
    # (stepping='ray') each along its own. The same projection with stepping='view':
    vflip, pflip = "volume y flipped" in best, "rows flipped" in best
    vol.copy_(x[0].flip(1) if vflip else x[0])
    ast.forward()
    theirs = proj.flip(0) if pflip else proj
    op_v = ConeBeam3D(n, n_angles=views, det_shape=det, source_distance=2.0 * n,
                      detector_distance=1.0 * n, det_spacing=1.5, backend="triton",
                      stepping="view").cuda()
    ours_v = op_v.A(x)
    tf_v = timeit(lambda: op_v.A(x), reps=5)
    tb_v = timeit(lambda: op_v.A_adjoint(y), reps=5)
    err_v = rel(theirs, ours_v[0].permute(1, 0, 2))
    ax_r = T.ray_table_3d(g, torch.device("cuda")).axis
    ax_v = T.ray_table_3d(op_v.geometry, torch.device("cuda")).axis
    same = (ax_r == ax_v).view(views, det[0], det[1]).permute(1, 0, 2)
    e_same = rel(theirs[same], ours[same])
    e_diff = rel(theirs[~same], ours[~same]) if bool((~same).any()) else float("nan")
    print(f"cone vs ASTRA, stepping='ray': {rel(theirs, ours):.2e} overall; {e_same:.2e} on the "
          f"{float(same.float().mean()):.1%} of rays whose own major axis is their view's, "
          f"{e_diff:.2e} on the others; stepping='view': {err_v:.2e}")
    rows.append((name, "Triton float32, stepping='view' (ASTRA's rule)", tf_v, tb_v, "-",
                 f"{err_v:.1e} vs ASTRA"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cone-size", type=int, default=128)
    p.add_argument("--cone-views", type=int, default=180)
    p.add_argument("--cone-det-rows", type=int, default=128)
    p.add_argument("--cone-det-cols", type=int, default=192)
    p.add_argument("--no-astra", action="store_true")
    p.add_argument("--no-cone", action="store_true")
    p.add_argument("--no-2d", action="store_true")
    p.add_argument("--baseline", help="an older _triton_ct.py to time side by side")
    args = p.parse_args(argv)
    if not T.available():
        sys.exit("bench_gpu.py needs a CUDA device and Triton")
    dram, l2 = ceilings()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"ceilings: device-to-device copy {dram:.0f} GB/s (read + write); L2-resident read {l2:.0f} GB/s")
    use_astra = not args.no_astra and astra_available()
    n = args.size
    cases = [
        (f"parallel B={args.batch} {n}^2 180 views", ParallelBeam2D(n, n_angles=180).cuda()),
        (f"fan B={args.batch} {n}^2 360 views", FanBeam2D(n, n_angles=360, det_count=2 * n,
                                                         source_distance=2 * n, detector_distance=2 * n).cuda()),
        (f"parallel B={args.batch} 512^2 720 views", ParallelBeam2D(512, n_angles=720).cuda()),
    ]
    rows: list = []
    baseline = load_baseline(args.baseline) if args.baseline else None
    for name, op in ([] if args.no_2d else cases):
        bench_2d(name, op, args.batch, l2, use_astra, rows, baseline)
    if not args.no_cone:
        bench_cone(args, l2, use_astra, rows)
    print("launch shapes picked by the tuner: (block, warps[, packed ray table]) for")
    print("2D (kernel, geometry, H, W, rays, batch, loop chunks, dtype) and cone (adjoint?, D, H, W, rays, batch, dtype):")
    for key, cfg in sorted(T.tuned_configs().items(), key=str):
        print(f"  {key[:-1]}: {cfg}")
    print("| case | method | A (ms) | A^T (ms) | time / gather floor (A / A^T) | rel. diff (A / A^T) |")
    print("|---|---|---:|---:|---:|---:|")
    for case, method, tf, tb, floor, err in rows:
        print(f"| {case} | {method} | {tf:.3f} | {tb:.3f} | {floor} | {err} |")


if __name__ == "__main__":
    main()
