"""Privacy benchmark: reconstruction quality vs. epsilon on a small synthetic CT federation.

Sites: phantom CT at 16 px with different view counts (as in the runner tests), FedAvg,
a few rounds. Rows: plain FedAvg, secure aggregation (same numbers up to quantization),
DP-FedAvg at several noise multipliers (epsilon at delta = 1e-5 after the last round,
RDP accounting, no subsampling amplification claimed), and the no-federation baseline
(local training). Prints a markdown table; a few minutes on 2 CPU cores.

    python scripts/bench_privacy.py [--rounds 4] [--sites 3] [--clip-norm 0.3]

With ``--config RUN.toml`` (e.g. configs/demo.toml, the synthetic multi-site MRI setting)
the same settings run on that config's sites and model through the run-config path of
``fedrecon train`` (its rounds and local steps unless given); metrics are the last round's
validation records.

    python scripts/bench_privacy.py --config configs/demo.toml --clip-norm 1.0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runners"))
from _common import make_ct_sites, write_ct_files

from fedrecon.federated import FedAvg, LocalOnly
from fedrecon.privacy import UpdatePipeline
from fedrecon.runners import SimulationRunner, read_metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="a run config (MRI or CT)")
    ap.add_argument("--rounds", type=int, default=None, help="default: 4 (or the config's)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=None, help="default: 3 (or the config's)")
    ap.add_argument("--clip-norm", type=float, default=0.3)
    ap.add_argument("--noise-multipliers", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strategy", default="partial",
                    help="--config mode: a sum-compatible strategy (default: partial, the DC "
                         "layers stay local so no noise reaches the physics; 'fedavg' shares "
                         "and noises them too)")
    args = ap.parse_args(argv)
    if args.config is not None:
        return config_mode(args)
    args.rounds = 4 if args.rounds is None else args.rounds
    args.local_steps = 3 if args.local_steps is None else args.local_steps
    if args.rounds < 1 or args.sites < 2:
        ap.error("argument '--rounds' must be >= 1 and '--sites' >= 2")
    torch.set_num_threads(1)
    settings: list[tuple[str, object, dict | None]] = [
        ("local only", LocalOnly, None), ("fedavg", FedAvg, None),
        ("fedavg + secagg", FedAvg, {"secure_aggregation": {}})]
    for z in args.noise_multipliers:
        settings.append((f"dp z={z:g}", FedAvg, {"dp": {"clip_norm": args.clip_norm, "noise_multiplier": z}}))
        settings.append((f"dp z={z:g} + secagg (distributed)", FedAvg,
                         {"secure_aggregation": {}, "dp": {"clip_norm": args.clip_norm,
                                                           "noise_multiplier": z,
                                                           "noise": "distributed"}}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_ct_files(Path(tmp) / "data", args.sites)
        for name, cls, privacy in settings:
            psnrs, ssims, eps, secs = [], [], None, 0.0
            for seed in args.seeds:
                t0 = time.perf_counter()
                run_dir = Path(tmp) / f"{name.replace(' ', '_')}_{seed}"
                runner = SimulationRunner(
                    make_ct_sites(files, args.sites, seed=seed),
                    cls(local_steps=args.local_steps, lr=3e-3), rounds=args.rounds,
                    run_dir=run_dir, seed=seed, progress=False, eval_every=args.rounds,
                    privacy=UpdatePipeline(privacy, seed=seed) if privacy else None)
                runner.run()
                secs += time.perf_counter() - t0
                last = [r for r in read_metrics(run_dir) if r["round"] == args.rounds - 1]
                psnrs.append(np.mean([r["psnr"] for r in last]))
                ssims.append(np.mean([r["ssim"] for r in last]))
                eps = last[0]["epsilon"]
            rows.append((name, eps, float(np.mean(psnrs)), float(np.std(psnrs)),
                         float(np.mean(ssims)), secs / len(args.seeds)))
    print(f"{args.sites} CT sites (16 px), FedAvg, {args.rounds} rounds x {args.local_steps} "
          f"local steps, clip C={args.clip_norm}, delta=1e-5, seeds {args.seeds}")
    print("| setting | epsilon | PSNR (dB) | PSNR sd | SSIM | s/run |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, eps, p, sd, s, t in rows:
        e = "no DP" if eps is None else f"{eps:.2f}"
        print(f"| {name} | {e} | {p:.2f} | {sd:.2f} | {s:.3f} | {t:.1f} |")
    return 0


def _settings(args) -> list[tuple[str, str, dict]]:
    name = args.strategy
    out = [("local only", "local", {}), (name, name, {}),
           (f"{name} + secagg", name, {"secure_aggregation": {}})]
    for z in args.noise_multipliers:
        out.append((f"{name} + dp z={z:g}", name,
                    {"dp": {"clip_norm": args.clip_norm, "noise_multiplier": z}}))
    return out


def config_mode(args) -> int:
    """The settings on a run config's federation (``fedrecon train``'s path)."""
    import dataclasses
    import warnings

    from fedrecon.experiment import build_experiment, load_config, materialize_synthetic

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    base = load_config(args.config)
    over = {k: v for k, v in (("rounds", args.rounds), ("local_steps", args.local_steps))
            if v is not None}
    base = dataclasses.replace(base, eval_every=over.get("rounds", base.rounds), **over)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = materialize_synthetic(dataclasses.replace(base, seed=seed),
                                        Path(tmp) / f"data{seed}")
            for name, strategy, privacy in _settings(args):
                t0 = time.perf_counter()
                run_cfg = dataclasses.replace(cfg, strategy={"name": strategy}, privacy=privacy)
                run_dir = Path(tmp) / f"{name.replace(' ', '_')}_{seed}"
                build_experiment(run_cfg).runner(run_dir, progress=False).run()
                last = [r for r in read_metrics(run_dir) if r["round"] == cfg.rounds - 1]
                rows.append((name, seed, last[0]["epsilon"], float(np.mean([r["psnr"] for r in last])),
                             float(np.mean([r["ssim"] for r in last])), time.perf_counter() - t0))
                print(f"seed {seed} {name}: {rows[-1][3]:.2f} dB ({rows[-1][5]:.0f} s)", flush=True)
    print(f"\n{args.config.name}: {len(base.sites)} {base.modality.upper()} sites, "
          f"{base.rounds} rounds x {base.local_steps} local steps, clip C={args.clip_norm}, "
          f"delta=1e-5, seeds {args.seeds}; validation metrics after the last round")
    print("| setting | epsilon | PSNR (dB) | SSIM | s/run |")
    print("|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        eps = mine[0][2]
        e = "no DP" if eps is None else f"{eps:.2f}"
        print(f"| {name} | {e} | {np.mean([r[3] for r in mine]):.2f} | "
              f"{np.mean([r[4] for r in mine]):.3f} | {np.mean([r[5] for r in mine]):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
