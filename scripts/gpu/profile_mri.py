"""Where SENSE's time goes on a GPU: per-call (synchronised), pipelined (50 calls between
two synchronisations: the GPU's own time once Python's launch overhead hides behind it) and
the CUDA kernels of one call (torch.profiler), for the full-FFT and the split-FFT path and a
bare fft2 / ifft2 of the same coil data. Usage: python scripts/gpu/profile_mri.py [OLD_MRI_PY]
(an older operators/mri.py, timed side by side as "before")."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from fedrecon.operators import MultiCoilMRI, RandomMask, birdcage_maps, registry
from fedrecon.operators.mri import SPLIT_ENV_VAR
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_operators import pipelined, timeit

DEV = torch.device(os.environ.get("PROFILE_DEVICE", "cuda"))


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def kernels(fn) -> list[tuple[str, float, int]]:
    fn()
    sync()
    acts = [ProfilerActivity.CUDA if DEV.type == "cuda" else ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(10):
            fn()
        sync()
    rows = []
    for ev in prof.key_averages():
        t = (getattr(ev, "device_time_total", 0) if DEV.type == "cuda"
             else ev.self_cpu_time_total)
        if t:
            rows.append((ev.key[:70], t / 10 / 1e3, ev.count // 10))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    dev = DEV
    print(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch.__version__)
    batch, coils, n = 4, 15, 320
    gen = torch.Generator().manual_seed(0)
    maps = birdcage_maps(coils, (n, n)).to(torch.complex64).expand(batch, coils, n, n)
    mask = RandomMask([0.08], [4])((n, n), seed=0).mask
    op = MultiCoilMRI(maps.contiguous().to(dev), mask.to(dev))
    x = torch.randn(batch, n, n, dtype=torch.complex64, generator=gen).to(dev)
    y = op(x)
    cases = {
        "fft2": lambda: torch.fft.fft2(y, norm="ortho"),
        "ifft2": lambda: torch.fft.ifft2(y, norm="ortho"),
    }
    refs = {}
    if len(sys.argv) > 1:  # the same operator from an older mri.py, in this process
        spec = importlib.util.spec_from_file_location("fedrecon.operators._mri_before", sys.argv[1])
        old = importlib.util.module_from_spec(spec)
        register = registry.register_operator
        registry.register_operator = lambda name: (lambda cls: cls)  # names already taken
        try:
            spec.loader.exec_module(old)
        finally:
            registry.register_operator = register
        before = old.MultiCoilMRI(maps.contiguous().to(dev), mask.to(dev))
        for mode in ("off", "on"):
            cases[f"before: A split={mode}"] = (mode, lambda: before(x))
            cases[f"before: A^H split={mode}"] = (mode, lambda: before.A_adjoint(y))
            cases[f"before: A^H A split={mode}"] = (mode, lambda: before.A_normal(x))
    for mode in ("off", "on"):
        os.environ[SPLIT_ENV_VAR] = mode
        refs[mode] = (op(x), op.A_adjoint(y))
        cases[f"A split={mode}"] = (mode, lambda: op(x))
        cases[f"A^H split={mode}"] = (mode, lambda: op.A_adjoint(y))
        cases[f"A^H A split={mode}"] = (mode, lambda: op.A_normal(x))
    for name, on, off in zip(("A", "A^H"), refs["on"], refs["off"]):
        print(f"split vs full, {name}: {float((on - off).abs().max() / off.abs().max()):.2e}")
    print("\n| case | per call (ms) | pipelined (ms) |\n|---|---:|---:|")
    for name, case in cases.items():
        mode, fn = case if isinstance(case, tuple) else (None, case)
        if mode:
            os.environ[SPLIT_ENV_VAR] = mode
        pipe = pipelined(fn) if DEV.type == "cuda" else timeit(fn, 10, DEV)
        print(f"| {name} | {1e3 * timeit(fn, 30, DEV):.3f} | {1e3 * pipe:.3f} |")
    for name in ("A split=off", "A split=on", "A^H split=off", "A^H split=on"):
        mode, fn = cases[name]
        os.environ[SPLIT_ENV_VAR] = mode
        ks = kernels(fn)
        print(f"\n{name}: kernels per call, {sum(k[1] for k in ks):.3f} ms in all")
        for key, ms, count in ks[:12]:
            print(f"  {ms:8.4f} ms  x{count}  {key}")
    for name in ("fft2", "ifft2"):
        ks = kernels(cases[name])
        print(f"\n{name}: kernels per call, {sum(k[1] for k in ks):.3f} ms in all")
        for key, ms, count in ks[:6]:
            print(f"  {ms:8.4f} ms  x{count}  {key}")


if __name__ == "__main__":
    main()
