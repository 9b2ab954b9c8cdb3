"""Host-side cost of one SENSE call on a GPU: for the fused coil passes, torch's coil product
with the fused combine, and torch's passes throughout, the time to enqueue 50 calls (the
host's work per call, no synchronisation), the pipelined time per call (50 calls between two
synchronisations) and one synchronised call. Usage: python scripts/gpu/overhead_mri.py"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from fedrecon.operators import MultiCoilMRI, RandomMask, _sense_kernels, birdcage_maps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_operators import timeit  # a sibling script


def enqueue_and_pipelined(fn, calls: int = 50) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    enq, pipe = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        enq.append((t1 - t0) / calls)
        pipe.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(enq), 1e3 * min(pipe)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    batch, coils, n = 4, 15, 320
    gen = torch.Generator().manual_seed(0)
    maps = birdcage_maps(coils, (n, n)).to(torch.complex64).expand(batch, coils, n, n)
    op = MultiCoilMRI(maps.contiguous().to(dev), RandomMask([0.08], [4])((n, n), seed=0).mask.to(dev))
    x = torch.randn(batch, n, n, dtype=torch.complex64, generator=gen).to(dev)
    y = op(x)
    supported = _sense_kernels.supported
    variants = {
        "fused product + combine": lambda: None,
        "torch product, fused combine": lambda: setattr(
            _sense_kernels, "supported", lambda m, t, coil_dim: coil_dim and supported(m, t, coil_dim)),
        "torch passes (FEDRECON_SENSE_KERNELS=off)": lambda: os.environ.__setitem__(
            _sense_kernels.ENV_VAR, "off"),
    }
    print("\n| variant | call | enqueue (ms) | pipelined (ms) | synchronised (ms) |")
    print("|---|---|---:|---:|---:|")
    for name, setup in variants.items():
        _sense_kernels.supported = supported
        os.environ.pop(_sense_kernels.ENV_VAR, None)
        setup()
        for call, fn in (("A", lambda: op(x)), ("A^H", lambda: op.A_adjoint(y))):
            e, p = enqueue_and_pipelined(fn)
            print(f"| {name} | {call} | {e:.3f} | {p:.3f} | {1e3 * timeit(fn, 30, dev):.3f} |")
    _sense_kernels.supported = supported
    os.environ.pop(_sense_kernels.ENV_VAR, None)
    for name, fn in (("Triton product launch alone", lambda: _sense_kernels._launch_product(
            op.coil_maps, x, True)), ("torch maps * x alone", lambda: op.coil_maps * x.unsqueeze(-3)),
            ("fft2 alone", lambda: torch.fft.fft2(y, norm="ortho"))):
        e, p = enqueue_and_pipelined(fn)
        print(f"| {name} | | {e:.3f} | {p:.3f} | {1e3 * timeit(fn, 30, dev):.3f} |")


if __name__ == "__main__":
    main()
