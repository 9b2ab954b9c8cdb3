#!/usr/bin/env python
"""Operator benchmark: fedrecon vs scikit-image (CT) and sigpy (MRI), side by side in one run.

Prints a markdown table of median wall times and the speed-up ratios. Cases (issue #2):
parallel and fan beam, batch 8, 256x256, 180 views; multi-coil SENSE, batch 4, 15 coils,
320x320. Geometry matrices are built once (the build time is reported separately) and
reused, as in training.

    python scripts/bench_operators.py [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def timeit(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt_ms(t: float | None) -> str:
    return "n/a" if t is None else f"{1e3 * t:.1f}"


def ratio(ref: float | None, ours: float) -> str:
    return "n/a" if ref is None else f"{ref / ours:.1f}x"


def bench_ct(args: argparse.Namespace, device: torch.device, rows: list) -> None:
    from fedrecon.operators import FanBeam2D, ParallelBeam2D, fbp, shepp_logan

    n, views, batch = 256, 180, 8
    x = shepp_logan(n).to(device).expand(batch, n, n).contiguous()
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    angles = torch.arange(views, dtype=torch.float64) * math.pi / views
    par = ParallelBeam2D(n, angles, det_count=367)
    fan = FanBeam2D(n, torch.arange(views, dtype=torch.float64) * 2 * math.pi / views,
                    det_count=512, det_spacing=1.0, source_distance=500.0, detector_distance=500.0)
    for label, op in (("parallel", par), ("fan", fan)):
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
        rows.append((f"{label} beam A (B={batch}, {n}^2, {views} views)", fwd, "skimage radon", sk_fwd))
        rows.append((f"{label} beam A^T (matched)", adj, "skimage iradon, no filter", sk_adj))
        rows.append((f"{label} beam FBP (ramp)", rec, "skimage iradon, ramp", sk_fbp))
        print(f"# {label}: matrix build {build:.2f} s (once per geometry/dtype/device), "
              f"A + A^T {mem / 2**20:.0f} MiB")


def bench_mri(args: argparse.Namespace, device: torch.device, rows: list) -> None:
    from fedrecon.operators import MultiCoilMRI, RandomMask, birdcage_maps

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
    rows.append((f"SENSE A (B={batch}, {coils} coils, {n}^2)", fwd, "sigpy Sense", sp_fwd))
    rows.append(("SENSE A^H", adj, "sigpy Sense.H", sp_adj))
    rows.append(("SENSE A^H A", nrm, "sigpy Sense.N", sp_nrm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["ct", "mri"], default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# fedrecon operator benchmark: torch {torch.__version__}, device {device} ({name}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    rows: list = []
    if args.only in (None, "ct"):
        bench_ct(args, device, rows)
    if args.only in (None, "mri"):
        bench_mri(args, device, rows)
    print()
    print("| operation | fedrecon (ms) | reference | reference (ms) | speed-up |")
    print("|---|---:|---|---:|---:|")
    for label, ours, ref_name, ref in rows:
        print(f"| {label} | {fmt_ms(ours)} | {ref_name if ref is not None else '-'} | "
              f"{fmt_ms(ref)} | {ratio(ref, ours)} |")


if __name__ == "__main__":
    main()
