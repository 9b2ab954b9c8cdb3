#!/usr/bin/env python
"""Per-round overhead of the embedded (in-process) federated runner.

Overhead = a round's wall time minus local training (``train_local``) and evaluation: what
is left is configure, state copies and serialization, LOCAL-state store reads/writes, the
update check, aggregation, the metrics records and the atomic checkpoint. Printed as a
fraction of the round time, with a breakdown, for small CT federations built like the
runner tests (phantom volumes, parallel beam, sites with different view counts).

    python scripts/bench_runner_overhead.py [--rounds 4] [--setting tiny|demo]
    python scripts/bench_runner_overhead.py --memory-sites 100   # peak RSS: 1 vs 100 sites

Memory mode: one fresh process per federation size runs one FedAvg round of the tiny
setting with every site taking part and reports its peak resident memory (``ru_maxrss``):
the embedded runner keeps LOCAL states on disk and builds one site model at a time, so the
peak should barely grow with the number of sites.
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

SETTINGS = {
    # name: (image size, model kwargs, local steps, batch size, sites)
    "tiny": (16, {"n_iter": 2, "chans": 4, "num_pools": 1}, 2, 1, 4),
    "demo": (48, {"n_iter": 4, "chans": 16, "num_pools": 2}, 15, 4, 3),
}


def build_sites(root: Path, setting: str, n_sites: int | None = None):
    from fedrecon.datasets import (
        CTAcquisition,
        CTSliceDataset,
        collate_ct_samples,
        write_phantom_volumes,
    )

    from fedrecon.federated import Site
    from fedrecon.models import ModelConfig, build_model

    size, model_kw, _, batch, default_sites = SETTINGS[setting]
    n_sites = n_sites or default_sites
    files = write_phantom_volumes(root, n_volumes=2 * n_sites, n_slices=4, image_size=size,
                                  seed=0, overwrite=True)
    cfg = ModelConfig(**model_kw)
    sites = []
    for k in range(n_sites):
        spacing = 400.0 / size
        acq = CTAcquisition(geometry="parallel", n_views=(8, 12, 16, 10)[k % 4] * size // 16,
                            image_size=(size, size), pixel_spacing=spacing, det_spacing=spacing,
                            photons=1e5)
        train = CTSliceDataset(files[2 * k: 2 * k + 1], acq, seed=k)
        val = CTSliceDataset(files[2 * k + 1: 2 * k + 2], acq, seed=100 + k)
        sites.append(Site(
            f"ct{k}", model_factory=lambda: build_model(cfg, complex_images=False),
            train_loader=DataLoader(train, batch_size=batch, shuffle=True,
                                    collate_fn=collate_ct_samples,
                                    generator=torch.Generator().manual_seed(k)),
            val_loader=DataLoader(val, batch_size=4, collate_fn=collate_ct_samples),
            protocol=acq.protocol_vector(), seed=0))
    return sites


class Timers:
    """Wall time spent inside wrapped callables, by label (outermost call only per label)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)
        self._depth: dict[str, int] = collections.defaultdict(int)

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            self._depth[label] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._depth[label] -= 1
                if self._depth[label] == 0:
                    self.total[label] += time.perf_counter() - t0
        return inner


def memory_child(n_sites: int) -> None:
    """One FedAvg round of the tiny setting with ``n_sites`` sites; prints peak RSS (MiB)."""
    import json
    import resource

    from fedrecon.federated import FedAvg
    from fedrecon.runners.simulation import SimulationRunner

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sites = build_sites(Path(tmp) / "data", "tiny", n_sites)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        runner = SimulationRunner(sites, FedAvg(local_steps=2, lr=3e-3), rounds=1,
                                  run_dir=Path(tmp) / "run", seed=0, progress=False)
        t0 = time.perf_counter()
        runner.run()
        wall = time.perf_counter() - t0
        records = sum(1 for _ in (Path(tmp) / "run" / "metrics.jsonl").open())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"sites": n_sites, "peak_mib": peak, "before_run_mib": before,
                      "round_s": wall, "records": records}))


def bench_memory(n_sites: int) -> None:
    import json
    import subprocess
    import sys

    rows = []
    for n in (1, n_sites):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# embedded runner memory, tiny setting (16 px CT, 1 round of FedAvg, every site "
          f"taking part), one fresh process each, torch {torch.__version__}")
    print()
    print("| sites | peak RSS (MiB) | RSS before the round (MiB) | round (s) | metrics records |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sites']} | {r['peak_mib']:.0f} | {r['before_run_mib']:.0f} | "
              f"{r['round_s']:.1f} | {r['records']} |")
    print(f"peak RSS ratio {n_sites} sites / 1 site: {rows[1]['peak_mib'] / rows[0]['peak_mib']:.2f}x "
          f"(goal < 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-sites", type=int, default=None,
                        help="measure peak RSS of 1 vs this many sites instead")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.memory_sites:
        bench_memory(args.memory_sites)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    import fedrecon.federated.site as site_mod
    from fedrecon.federated import FedAvg
    from fedrecon.runners import simulation
    from fedrecon.runners.checkpoint import RoundStore

    timers = Timers()
    # what is excluded: local training and evaluation
    site_mod.train_local = timers.wrap("local training", site_mod.train_local)
    site_mod.Site.evaluate = timers.wrap("evaluation", site_mod.Site.evaluate)
    # the breakdown of the rest
    runner_cls = simulation.SimulationRunner
    runner_cls._commit = timers.wrap("checkpoint (atomic)", runner_cls._commit)
    runner_cls._write_records = timers.wrap("metrics records", runner_cls._write_records)
    RoundStore.put = timers.wrap("LOCAL store writes", RoundStore.put)
    RoundStore.get = timers.wrap("LOCAL store reads", RoundStore.get)
    simulation.check_update = timers.wrap("update check", simulation.check_update)
    site_mod.make_update = timers.wrap("update (delta) serialization", site_mod.make_update)

    _, _, local_steps, _, _ = SETTINGS[args.setting]
    with tempfile.TemporaryDirectory() as tmp:
        sites = build_sites(Path(tmp) / "data", args.setting)
        strategy = FedAvg(local_steps=local_steps, lr=3e-3)
        strategy.aggregate = timers.wrap("aggregation", strategy.aggregate)
        runner = runner_cls(sites, strategy, rounds=args.rounds + 1, run_dir=Path(tmp) / "run",
                            seed=0, progress=False)
        runner.run(until_round=1)  # warm-up round (imports, matrix builds): not counted
        timers.total.clear()
        t0 = time.perf_counter()
        runner.run()
        wall = time.perf_counter() - t0
        n_params = sum(v.numel() for v in runner.strategy._require_state().global_state.values()) \
            if hasattr(runner.strategy._require_state(), "global_state") else None

    excluded = timers.total["local training"] + timers.total["evaluation"]
    overhead = wall - excluded
    print(f"# runner overhead, setting '{args.setting}': {len(sites)} sites, "
          f"{local_steps} local steps, {args.rounds} rounds (after 1 warm-up), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {n_params} global parameters" if n_params else ""))
    print()
    print("| part | s per round | share of round |")
    print("|---|---:|---:|")
    per = 1.0 / args.rounds
    for label in ("local training", "evaluation"):
        print(f"| {label} (excluded) | {timers.total[label] * per:.3f} | "
              f"{timers.total[label] / wall:.1%} |")
    print(f"| **overhead (all the rest)** | **{overhead * per:.3f}** | **{overhead / wall:.1%}** |")
    for label, t in sorted(timers.total.items(), key=lambda kv: -kv[1]):
        if label not in ("local training", "evaluation"):
            print(f"| - of which {label} | {t * per:.4f} | {t / wall:.2%} |")
    print(f"| round (wall) | {wall * per:.3f} | 100% |")


if __name__ == "__main__":
    main()
