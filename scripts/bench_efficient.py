#!/usr/bin/env python
"""Parameter-efficient and compressed federation of a pretrained prior on a small multi-site
MRI setting: full-prior FedAvg (DC local: the "partial" setting) against LoRA / bias-only /
FiLM-only adaptation of the frozen prior and against top-k (error feedback) / int8
compression of the full prior's updates.

A prior is pretrained centrally on a synthetic "public" set (T1, 4x); three sites then
federate on their own volumes (other anatomy slices and seeds, 4x / 4x / 6x). Every variant
starts from the same checkpoint and runs the same rounds and local steps; bytes are the
serialized message sizes (the runner's compression hook, ``method="none"`` for the dense
runs). Prints a markdown table and writes ``OUT/results.json``::

    python scripts/bench_efficient.py --out runs/bench_efficient [--rounds 4] [--chans 16]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def main(argv: list[str] | None = None) -> None:
    from fedrecon.datasets import FastMRISliceDataset, collate_mri_samples, make_synthetic_fastmri
    from fedrecon.efficient import (
        UpdateCompressor,
        film_partition,
        pretrain_prior,
        save_prior_checkpoint,
    )
    from fedrecon.federated import FedAvg, Site
    from fedrecon.models import ModelConfig, Partition, Scope, build_model
    from fedrecon.operators import EquispacedFractionMask
    from fedrecon.runners import SimulationRunner, read_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_efficient"))
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--chans", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def dataset(files, accel):
        mask = EquispacedFractionMask([0.12], [accel])
        return FastMRISliceDataset(files, mask=mask, coil_maps="espirit")

    def loader(ds, shuffle, seed=0):
        return DataLoader(ds, batch_size=3, shuffle=shuffle, collate_fn=collate_mri_samples,
                          generator=torch.Generator().manual_seed(seed))

    t0 = time.perf_counter()
    public = make_synthetic_fastmri(out / "data/public", n_volumes=2, n_coils=4, image_size=args.size,
                                    n_slices=4, seed=100, anatomy="mni152", overwrite=True)
    base = dict(n_iter=3, share_weights=True, chans=args.chans, num_pools=2, norm="group")
    cfg = ModelConfig(**base)
    torch.manual_seed(args.seed)
    model = build_model(cfg, complex_images=True)
    pretrain_prior(model, loader(dataset(public, 4), True), steps=args.pretrain_steps, lr=3e-3,
                   seed=args.seed)
    ckpt = save_prior_checkpoint(model, out / "prior.pt", config=cfg)
    print(f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s")

    accels = (4, 4, 6)
    site_data = []
    for k, accel in enumerate(accels):
        files = make_synthetic_fastmri(out / f"data/site{k}", n_volumes=2, n_coils=4,
                                       image_size=args.size, n_slices=4, seed=10 + k,
                                       anatomy="mni152", overwrite=True,
                                       acquisition="AXT2" if k == 2 else "AXT1")
        site_data.append((dataset(files[:1], accel), dataset(files[1:], accel)))
    cond_dim = int(site_data[0][0][0].protocol.numel())

    variants = {
        "full (FedAvg, DC local)": (dict(), None, None),
        "full + top-k 1% EF": (dict(), None, {"method": "topk", "fraction": 0.01}),
        "full + int8": (dict(), None, {"method": "int8"}),
        "full + top-k 2% int8 EF": (dict(), None, {"method": "topk_int8", "fraction": 0.02}),
        "LoRA r=2": (dict(peft="lora", lora_rank=2), None, None),
        "bias-only": (dict(peft="bias"), None, None),
        "FiLM-only (shared)": (dict(peft="film", cond_dim=cond_dim), film_partition(), None),
    }
    results = {}
    for name, (keys, partition, comp) in variants.items():
        if args.only is not None and not any(o in name for o in args.only):
            continue
        vcfg = ModelConfig(**base, pretrained=str(ckpt), **keys)
        part = partition or Partition.default()
        sites = []
        for k, (train, test) in enumerate(site_data):
            sites.append(Site(f"site{k}", model_factory=lambda c=vcfg: build_model(c, complex_images=True),
                              train_loader=loader(train, True, k), test_loader=loader(test, False),
                              val_loader=loader(test, False), partition=part, seed=args.seed))
        strategy = FedAvg(local_steps=args.local_steps, lr=3e-3, partition=part)
        run_dir = out / "runs" / name.split(" ")[0].lower().replace("-", "") / str(abs(hash(name)) % 10**6)
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t1 = time.perf_counter()
        SimulationRunner(sites, strategy, rounds=args.rounds, run_dir=run_dir, seed=args.seed,
                         eval_every=args.rounds, eval_split="test", progress=False,
                         compression=UpdateCompressor(comp or {"method": "none"})).run()
        recs = read_metrics(run_dir)
        last = [r for r in recs if r["round"] == args.rounds - 1]
        sent = [r["bytes_sent"] for r in recs if r["participated"]]
        recv = [r["bytes_received"] for r in recs if r["sampled"]]
        probe = sites[0].model_factory()
        results[name] = {
            "psnr": {r["site"]: r["psnr"] for r in last}, "ssim": {r["site"]: r["ssim"] for r in last},
            "bytes_sent_per_site_round": float(np.mean(sent)),
            "bytes_received_per_site_round": float(np.mean(recv)),
            "global_tensors": sum(probe.state_dict()[n].numel()
                                  for n in part.names(probe, Scope.GLOBAL)),
            "seconds": time.perf_counter() - t1}
        print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)

    ref = "full (FedAvg, DC local)"
    lines = ["| variant | shared tensors | up B/site/round | down B/site/round | up x fewer | "
             + " | ".join(f"PSNR site{k}" for k in range(3)) + " | mean PSNR | dPSNR | mean SSIM |",
             "|---" * 10 + "|"]
    for name, r in results.items():
        ps = [r["psnr"][f"site{k}"] for k in range(3)]
        ratio = results[ref]["bytes_sent_per_site_round"] / r["bytes_sent_per_site_round"] if ref in results else float("nan")
        d = np.mean(ps) - np.mean(list(results[ref]["psnr"].values())) if ref in results else float("nan")
        lines.append(f"| {name} | {r['global_tensors']} | {r['bytes_sent_per_site_round']:.0f} | "
                     f"{r['bytes_received_per_site_round']:.0f} | {ratio:.1f} | "
                     + " | ".join(f"{x:.2f}" for x in ps)
                     + f" | {np.mean(ps):.2f} | {d:+.2f} | {np.mean(list(r['ssim'].values())):.4f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
