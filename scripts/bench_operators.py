#!/usr/bin/env python
"""Operator benchmark: fedrecon vs ASTRA-CPU and scikit-image (CT), sigpy and a bare FFT
(MRI), side by side in one run.

Prints a markdown table of median wall times and the speed-up ratios. Cases (issues #2, #9):
parallel and fan beam, batch 8, 256x256, 180 views; multi-coil SENSE, batch 4, 15 coils,
320x320 (also with each setting of the column-mask paths, ``FEDRECON_MRI_SPLIT``
auto / on / off, interleaved). Geometry matrices are built once (the build time is reported separately) and
reused, as in training. ASTRA (``pip install astra-toolbox``, GPL, benchmark-only) is used
when installed: its 2D CPU projectors, one image at a time, plus the relative difference of
our sinograms/backprojections to ASTRA's. ``--matrix-cache`` also times building vs loading
the system matrices from the on-disk cache, each in a fresh process (peak memory).

    python scripts/bench_operators.py [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def pipelined(fn: Callable[[], object], calls: int = 50) -> float:
    """Seconds per call of ``calls`` CUDA calls between two synchronisations (best of 5): the
    GPU's throughput once the launches run ahead of it."""
    fn()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def timeit(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    return statistics.median(_once(fn, device) for _ in range(repeats))


def fmt_ms(t: float | None) -> str:
    if t is None:
        return "n/a"
    return f"{1e3 * t:.1f}" if t >= 0.01 else f"{1e3 * t:.3f}"


def ratio(ref: float | None, ours: float) -> str:
    return "n/a" if ref is None else f"{ref / ours:.1f}x"


N, VIEWS, BATCH = 256, 180, 8


def ct_operators() -> dict:
    from fedrecon.operators import FanBeam2D, ParallelBeam2D

    angles = torch.arange(VIEWS, dtype=torch.float64) * math.pi / VIEWS
    par = ParallelBeam2D(N, angles, det_count=367)
    fan = FanBeam2D(N, torch.arange(VIEWS, dtype=torch.float64) * 2 * math.pi / VIEWS,
                    det_count=512, det_spacing=1.0, source_distance=500.0, detector_distance=500.0)
    return {"parallel": par, "fan": fan}


class AstraCPU:
    """ASTRA's 2D CPU projector for one of our geometries, one image per call (its API).

    Conventions (checked here against our projector): parallel beam is ASTRA's 'parallel'
    with the same angles; our fan beam is ASTRA's 'fanflat' at angles + pi with the detector
    reversed. ASTRA-CPU has a Joseph ('linear') kernel for parallel beam only; fan beam uses
    'line_fanflat' (a different kernel: expect ~0.5-1% differences, as 'line' vs 'linear').
    """

    def __init__(self, op) -> None:
        import astra

        self.astra = astra
        g = op.geometry
        h, w = g.image_size
        self.vol = astra.create_vol_geom(h, w)
        ang = np.asarray(g.angles, dtype=np.float64)
        if g.kind == "parallel":
            self.proj = astra.create_proj_geom("parallel", g.det_spacing / g.pixel_spacing,
                                               g.det_count, ang)
            self.kernel, self.flip = "linear", False
        else:
            ps = g.pixel_spacing
            self.proj = astra.create_proj_geom("fanflat", g.det_spacing / ps, g.det_count,
                                               ang + math.pi, g.source_distance / ps,
                                               g.detector_distance / ps)
            self.kernel, self.flip = "line_fanflat", True
        self.scale = g.pixel_spacing
        self.pid = astra.create_projector(self.kernel, self.proj, self.vol)
        self.vid = astra.data2d.create("-vol", self.vol, 0.0)
        self.sid = astra.data2d.create("-sino", self.proj, 0.0)
        self.fp = self._alg("FP")
        self.bp = self._alg("BP")

    def _alg(self, kind: str) -> int:
        cfg = self.astra.astra_dict(kind)
        cfg["ProjectorId"] = self.pid
        cfg["ProjectionDataId"] = self.sid
        cfg["VolumeDataId" if kind == "FP" else "ReconstructionDataId"] = self.vid
        return self.astra.algorithm.create(cfg)

    def forward(self, imgs: np.ndarray) -> np.ndarray:
        out = []
        for im in imgs:
            self.astra.data2d.store(self.vid, im)
            self.astra.algorithm.run(self.fp)
            s = self.astra.data2d.get(self.sid) * self.scale
            out.append(s[:, ::-1] if self.flip else s)
        return np.stack(out)

    def back(self, sinos: np.ndarray) -> np.ndarray:
        out = []
        for s in sinos:
            self.astra.data2d.store(self.sid, np.ascontiguousarray(s[:, ::-1] if self.flip else s))
            self.astra.algorithm.run(self.bp)
            out.append(self.astra.data2d.get(self.vid) * self.scale)
        return np.stack(out)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bench_ct(args: argparse.Namespace, device: torch.device, rows: list,
             accuracy: list) -> None:
    from fedrecon.operators import fbp, shepp_logan

    n, views, batch = N, VIEWS, BATCH
    x = shepp_logan(n).to(device).expand(batch, n, n).contiguous()
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    angles = torch.arange(views, dtype=torch.float64) * math.pi / views
    for label, op in ct_operators().items():
        t0 = time.perf_counter()
        op.matrices(torch.float32, device)
        build = time.perf_counter() - t0
        mat, mat_t = op.matrices(torch.float32, device)
        mem = sum(t.values().numel() * 4 + t.col_indices().numel() * t.col_indices().element_size()
                  + t.crow_indices().numel() * t.crow_indices().element_size() for t in (mat, mat_t))
        sino = op(x)
        fwd = timeit(lambda: op(x), args.repeats, device)
        adj = timeit(lambda: op.A_adjoint(sino), args.repeats, device)
        rec = timeit(lambda: fbp(op, sino), args.repeats, device)
        sk_fwd = sk_adj = sk_fbp = None
        if label == "parallel" and device.type == "cpu":
            try:
                from skimage.transform import iradon, radon
            except ImportError:
                pass
            else:
                deg = np.rad2deg(angles.numpy())
                imgs = x.cpu().numpy()
                sk_sinos = [radon(im, theta=deg, circle=False) for im in imgs]
                sk_fwd = timeit(lambda: [radon(im, theta=deg, circle=False) for im in imgs],
                                max(1, args.repeats // 2), device)
                sk_adj = timeit(lambda: [iradon(s, theta=deg, filter_name=None, circle=False)
                                         for s in sk_sinos], max(1, args.repeats // 2), device)
                sk_fbp = timeit(lambda: [iradon(s, theta=deg, filter_name="ramp", circle=False)
                                         for s in sk_sinos], max(1, args.repeats // 2), device)
        as_fwd = as_adj = None
        if device.type == "cpu" and not args.no_astra:
            try:
                ast = AstraCPU(op)
            except ImportError:
                ast = None
            if ast is not None:
                imgs = x.cpu().numpy()
                sinos = sino.cpu().numpy()
                as_fwd = timeit(lambda: ast.forward(imgs), max(1, args.repeats // 2), device)
                as_adj = timeit(lambda: ast.back(sinos), max(1, args.repeats // 2), device)
                accuracy.append((f"{label} beam A", ast.kernel, _rel(sinos, ast.forward(imgs))))
                accuracy.append((f"{label} beam A^T", ast.kernel,
                                 _rel(op.A_adjoint(sino).cpu().numpy(), ast.back(sinos))))
        rows.append((f"{label} beam A (B={batch}, {n}^2, {views} views)", fwd,
                     f"ASTRA-CPU '{ast.kernel}'" if as_fwd else "ASTRA-CPU", as_fwd))
        rows.append((f"{label} beam A", fwd, "skimage radon", sk_fwd))
        rows.append((f"{label} beam A^T (matched)", adj, "ASTRA-CPU BP", as_adj))
        rows.append((f"{label} beam A^T (matched)", adj, "skimage iradon, no filter", sk_adj))
        rows.append((f"{label} beam FBP (ramp)", rec, "skimage iradon, ramp", sk_fbp))
        print(f"# {label}: matrix build {build:.2f} s (once per geometry/dtype/device), "
              f"A + A^T {mem / 2**20:.0f} MiB")


def bench_mri(args: argparse.Namespace, device: torch.device, rows: list) -> None:
    from fedrecon.operators import MultiCoilMRI, RandomMask, birdcage_maps
    from fedrecon.operators.mri import SPLIT_ENV_VAR, split_mode

    batch, coils, n = 4, 15, 320
    gen = torch.Generator().manual_seed(0)
    maps = birdcage_maps(coils, (n, n)).to(torch.complex64)
    maps = maps.expand(batch, coils, n, n).contiguous()
    mask = RandomMask([0.08], [4])((n, n), seed=0).mask  # (1, n)
    x = torch.randn(batch, n, n, dtype=torch.complex64, generator=gen)
    op = MultiCoilMRI(maps.to(device), mask.to(device))
    xd = x.to(device)
    y = op(xd)
    fwd = timeit(lambda: op(xd), args.repeats, device)
    adj = timeit(lambda: op.A_adjoint(y), args.repeats, device)
    nrm = timeit(lambda: op.A_normal(xd), args.repeats, device)
    sp_fwd = sp_adj = sp_nrm = None
    if device.type == "cpu":
        try:
            import sigpy as sp
            import sigpy.mri as spm
        except ImportError:
            pass
        else:
            weights = np.broadcast_to(mask.numpy(), (n, n)).astype(np.float32)
            ops = [spm.linop.Sense(maps[b].numpy(), weights=weights) for b in range(batch)]
            xs = [x[b].numpy() for b in range(batch)]
            ys = [o(v) for o, v in zip(ops, xs)]
            sp_fwd = timeit(lambda: [o(v) for o, v in zip(ops, xs)], args.repeats, device)
            sp_adj = timeit(lambda: [o.H(v) for o, v in zip(ops, ys)], args.repeats, device)
            sp_nrm = timeit(lambda: [o.N(v) for o, v in zip(ops, xs)], args.repeats, device)
            _bench_cg_sense(args, op, maps, weights, y, device, rows)
    # the floor: one bare FFT pass over the same coil data (allocating its output, as A does)
    fft_f = timeit(lambda: torch.fft.fft2(y, norm="ortho"), args.repeats, device)
    fft_b = timeit(lambda: torch.fft.ifft2(y, norm="ortho"), args.repeats, device)
    # the paths of column masks (FEDRECON_MRI_SPLIT): auto (the default: A^H A along W only,
    # the CPU's A^H on the sampled columns), on (plus torch's split A and A^H), off (the full
    # 2D FFTs always), interleaved call by call so that a varying machine load hits all alike;
    # "A^H A, autograd" is the training path (a graph recorded, forward only)
    xg = xd.clone().requires_grad_(True)
    cases = {"A": lambda: op(xd), "A^H": lambda: op.A_adjoint(y), "A^H A": lambda: op.A_normal(xd),
             "A^H A, autograd": lambda: op.A_normal(xg)}
    split: dict = {"auto": {}, "on": {}, "off": {}}
    for name, fn in cases.items():
        times: dict = {mode: [] for mode in split}
        for i in range(args.repeats + 1):  # the first call of each is a warm-up
            for mode in times:
                with _env(SPLIT_ENV_VAR, mode):
                    t = _once(fn, device)
                times[mode] += [t] if i else []
        for mode, ts in times.items():
            split[mode][name] = statistics.median(ts)
    print(f"# SENSE mask: {mask.shape[-1]} columns, {int((mask != 0).sum())} sampled; "
          f"{SPLIT_ENV_VAR}={split_mode()} for the rows without a mode")
    rows.append((f"SENSE A (B={batch}, {coils} coils, {n}^2)", fwd, "sigpy Sense", sp_fwd))
    rows.append(("SENSE A", fwd, "bare fft2 of (B, C, H, W)", fft_f))
    rows.append(("SENSE A^H", adj, "sigpy Sense.H", sp_adj))
    rows.append(("SENSE A^H", adj, "bare ifft2 of (B, C, H, W)", fft_b))
    rows.append(("SENSE A^H A", nrm, "sigpy Sense.N", sp_nrm))
    rows.append(("SENSE A^H A", nrm, "bare fft2 + ifft2", fft_f + fft_b))
    rows.append(("SENSE A + A^H", fwd + adj, "bare fft2 + ifft2", fft_f + fft_b))
    if device.type == "cpu":  # the fastest bare FFT here: scipy's, in place on a paged-in buffer
        from fedrecon.operators._mri_cpu import fft_inplace

        buf = y.clone()
        sci = timeit(lambda: fft_inplace(buf), args.repeats, device) + timeit(
            lambda: fft_inplace(buf, inverse=True), args.repeats, device)
        rows.append(("SENSE A + A^H", fwd + adj, "scipy fft2 + ifft2 in place", sci))
    if device.type == "cuda":  # the GPU's own time: Python's launch overhead hidden
        pipe = [pipelined(fn) for fn in (lambda: op(xd), lambda: op.A_adjoint(y),
                                         lambda: torch.fft.fft2(y, norm="ortho"),
                                         lambda: torch.fft.ifft2(y, norm="ortho"))]
        rows.append(("SENSE A + A^H, pipelined", pipe[0] + pipe[1], "bare fft2 + ifft2, pipelined",
                     pipe[2] + pipe[3]))
    for name in cases:
        for mode in ("auto", "on"):
            rows.append((f"SENSE {name}, column paths {mode}", split[mode][name],
                         "column paths off (2D FFTs)", split["off"][name]))
    for mode in ("auto", "on", "off"):
        both = split[mode]["A"] + split[mode]["A^H"]
        rows.append((f"SENSE A + A^H, column paths {mode}", both, "bare fft2 + ifft2",
                     fft_f + fft_b))


def _bench_cg_sense(args: argparse.Namespace, op, maps: torch.Tensor, weights: np.ndarray,
                    y: torch.Tensor, device: torch.device, rows: list) -> None:
    """A whole solver against sigpy's: ``cg_sense`` and ``sigpy.mri.app.SenseRecon`` (CG on
    ``(A^H A + lam I) x = A^H y``, same weight and iterations; sigpy per sample) and the
    relative difference of their results."""
    import sigpy.mri as spm
    from fedrecon.operators import cg_sense

    lam, iters = 1e-2, 15
    ys = [y[b].cpu().numpy() for b in range(y.shape[0])]

    def sigpy_recon() -> list:
        return [spm.app.SenseRecon(v, maps[b].numpy(), lamda=lam, weights=weights,
                                   max_iter=iters, show_pbar=False).run()
                for b, v in enumerate(ys)]

    repeats = max(1, args.repeats // 2)
    ours = timeit(lambda: cg_sense(op, y, lam=lam, n_iter=iters), repeats, device)
    theirs = timeit(sigpy_recon, repeats, device)
    a = cg_sense(op, y, lam=lam, n_iter=iters).cpu().numpy()
    b = np.stack(sigpy_recon())
    diff = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    rows.append((f"CG-SENSE, {iters} iterations (rel. diff. {diff:.1e})", ours,
                 "sigpy SenseRecon", theirs))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the duration of the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matrix_child(geometry: str, mode: str) -> None:
    """In a fresh process: get the float32 matrices of ``geometry`` once (build or load)."""
    op = ct_operators()[geometry]
    before = _rss_mib()
    t0 = time.perf_counter()
    mat, mat_t = op.matrices(torch.float32)
    seconds = time.perf_counter() - t0
    held = sum(t.values().nbytes + t.col_indices().nbytes + t.crow_indices().nbytes
               for t in (mat, mat_t)) / 2**20
    # (ru_maxrss survives exec, so a child's peak RSS is not measurable this way)
    print(json.dumps({"mode": mode, "seconds": seconds, "rss_delta_mib": _rss_mib() - before,
                      "held_mib": held}))


def bench_matrix_cache() -> None:
    """Build (disk cache off), build + write, load from disk: one fresh process each."""
    print()
    print("| geometry | build (s) | build + write file (s) | load from disk (s) | "
          "build / load | A + A^T in memory (MiB) | file (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for geometry in ("parallel", "fan"):
            res = {}
            for mode, cache in (("off", "off"), ("write", tmp), ("load", tmp)):
                env = dict(os.environ, FEDRECON_CACHE_DIR=cache)
                out = subprocess.run([sys.executable, __file__, "--child", geometry, mode],
                                     env=env, capture_output=True, text=True, check=True)
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in Path(tmp, "projectors").glob(f"joseph-{geometry}-*"))
            print(f"| {geometry} | {res['off']['seconds']:.2f} | {res['write']['seconds']:.2f} | "
                  f"{res['load']['seconds']:.2f} | {res['off']['seconds'] / res['load']['seconds']:.0f}x | "
                  f"{res['off']['held_mib']:.0f} | {size / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["ct", "mri"], default=None)
    parser.add_argument("--no-astra", action="store_true", help="skip ASTRA even if installed")
    parser.add_argument("--matrix-cache", action="store_true",
                        help="time matrix build vs disk-cache load (fresh processes)")
    parser.add_argument("--child", nargs=2, metavar=("GEOMETRY", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        matrix_child(*args.child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# fedrecon operator benchmark: torch {torch.__version__}, device {device} ({name}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    rows: list = []
    accuracy: list = []
    if args.only in (None, "ct"):
        bench_ct(args, device, rows, accuracy)
    if args.only in (None, "mri"):
        bench_mri(args, device, rows)
    print()
    print("| operation | fedrecon (ms) | reference | reference (ms) | speed-up |")
    print("|---|---:|---|---:|---:|")
    for label, ours, ref_name, ref in rows:
        if ref is not None:
            print(f"| {label} | {fmt_ms(ours)} | {ref_name} | {fmt_ms(ref)} | {ratio(ref, ours)} |")
    if accuracy:
        print()
        print("| operation | ASTRA kernel | relative L2 difference (float32) |")
        print("|---|---|---:|")
        for label, kernel, rel in accuracy:
            print(f"| {label} | {kernel} | {rel:.1e} |")
    if args.matrix_cache and device.type == "cpu" and args.only in (None, "ct"):
        bench_matrix_cache()


if __name__ == "__main__":
    main()
