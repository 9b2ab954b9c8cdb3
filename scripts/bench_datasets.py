"""Time loading one fastMRI slice (mask + crop + cached ESPIRiT maps) on one CPU thread.

Writes a 15-coil 640 x 368 knee-sized multicoil volume to a temporary folder, warms the
coil-map cache (ESPIRiT once per volume, not timed), then loads slices many times and prints
median / p90 per stage::

    python scripts/bench_datasets.py [--slices 3] [--repeats 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fedrecon.datasets import (
    CoilMapCache,
    EspiritSettings,
    FastMRISliceDataset,
    rss_target,
    write_fastmri_volume,
)
from fedrecon.operators import RandomMask, birdcage_maps, fft2c


def make_volume(path: Path, n_slices: int, n_coils: int = 15,
                shape: tuple[int, int] = (640, 368)) -> Path:
    maps = birdcage_maps(n_coils, shape)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]),
                            indexing="ij")
    slices = []
    for s in range(n_slices):
        obj = ((yy / 0.8) ** 2 + (xx / (0.6 + 0.05 * s)) ** 2 < 1).to(torch.complex64)
        slices.append(fft2c(maps * obj * (1 + 0.3 * torch.cos(8 * yy))))
    k = torch.stack(slices)
    k[..., :16] = 0  # zero padding outside the acquired columns, as in the knee data
    k[..., -16:] = 0
    k = k.numpy()
    return write_fastmri_volume(path, k, reconstruction_rss=rss_target(k, (320, 320)).numpy())


def stats(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_volume(root / "file_bench.h5", args.slices)
        t_write = time.perf_counter() - t0
        cache = CoilMapCache(root / ".fedrecon-cache", EspiritSettings(max_iter=30))
        mask = RandomMask([0.08], [4])
        ds_maps = FastMRISliceDataset(root, "multicoil", mask=mask, coil_maps=cache)
        ds_plain = FastMRISliceDataset(root, "multicoil", mask=mask)
        t0 = time.perf_counter()
        ds_maps[0]  # warm: ESPIRiT for the whole volume, written to the sidecar
        t_warm = time.perf_counter() - t0

        rows = []
        for name, ds in (("kspace + mask + crop", ds_plain),
                         ("... + cached coil maps", ds_maps)):
            times = []
            for r in range(args.repeats):
                i = r % len(ds)
                t0 = time.perf_counter()
                sample = ds[i]
                times.append(time.perf_counter() - t0)
            rows.append((name, *stats(times)))
        s = ds_maps[0]
        print(f"volume: {args.slices} x 15 coils x 640 x 368 complex64 "
              f"({s.kspace.numel() * 8 / 2**20:.0f} MiB k-space + "
              f"{s.coil_maps.numel() * 8 / 2**20:.0f} MiB maps per slice), 1 thread")
        print(f"write volume: {t_write:.2f} s;  ESPIRiT warm-up (whole volume): {t_warm:.1f} s")
        print(f"{'load one slice':28s} {'median ms':>10s} {'p90 ms':>10s}")
        for name, med, p90 in rows:
            print(f"{name:28s} {med:10.1f} {p90:10.1f}")
        assert sample.target is not None and sample.target.shape == (320, 320)


if __name__ == "__main__":
    main()
