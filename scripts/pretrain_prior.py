#!/usr/bin/env python
"""Pretrain an unrolled network's prior centrally and save the prior checkpoint that sites
load with ``[model] pretrained = "PATH"``.

Data: fastMRI-layout multi-coil HDF5 files (``--data`` files or folders), or a synthetic
set simulated here (``--synthetic N`` volumes; the default). The DC layers are trained too
(the prior learns in context) but stay out of the checkpoint: each site learns its own::

    python scripts/pretrain_prior.py --out runs/prior.pt --model prior=swin chans=96 depth=6 \\
        --steps 2000 --device cuda --amp
"""

from __future__ import annotations

import argparse
import ast
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> None:
    from fedrecon.datasets import FastMRISliceDataset, collate_mri_samples, make_synthetic_fastmri
    from fedrecon.efficient import pretrain_prior, save_prior_checkpoint
    from fedrecon.models import ModelConfig, build_model
    from fedrecon.operators import EquispacedFractionMask
    from fedrecon.train import evaluate_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (atomically)")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="[model] keys, e.g. prior=unet chans=64 num_pools=4 share_weights=true")
    p.add_argument("--data", nargs="*", type=Path, default=[], help="fastMRI-layout .h5 files/folders")
    p.add_argument("--synthetic", type=int, default=4, help="synthetic volumes when --data is empty")
    p.add_argument("--size", type=int, default=64, help="synthetic image size")
    p.add_argument("--coils", type=int, default=4)
    p.add_argument("--accel", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="CUDA autocast + gradient scaling")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    keys = {}
    for item in args.model:
        if "=" not in item:
            p.error(f"--model: expected KEY=VALUE; got {item!r}")
        k, v = item.split("=", 1)
        keys[k] = {"true": True, "false": False}.get(v.lower(), _value(v))
    for forbidden in ("pretrained", "peft"):
        if forbidden in keys:
            p.error(f"--model: key '{forbidden}' makes no sense when pretraining")
    cfg = ModelConfig.from_dict(keys, where="--model")
    files: list[Path] = []
    for d in args.data:
        files += sorted(d.glob("*.h5")) if d.is_dir() else [d]
    if args.data and not files:
        p.error(f"--data: no .h5 files in {[str(d) for d in args.data]}")
    if not files:
        root = args.out.parent / f".{args.out.stem}-data"
        files = make_synthetic_fastmri(root, n_volumes=args.synthetic, n_coils=args.coils,
                                       image_size=args.size, n_slices=6, seed=args.seed,
                                       anatomy="mni152", overwrite=True)
    mask = EquispacedFractionMask([0.08 if args.accel > 4 else 0.12], [args.accel])
    ds = FastMRISliceDataset(files, mask=mask, coil_maps="espirit")
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate_mri_samples,
                        generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = build_model(cfg, complex_images=True)
    n = sum(t.numel() for t in model.priors.parameters())
    print(f"prior: {cfg.prior}, {n / 1e6:.2f}M parameters; {len(ds)} slices; {args.steps} steps")
    t0 = time.perf_counter()
    res = pretrain_prior(model, loader, steps=args.steps, lr=args.lr, amp=args.amp,
                         device=args.device, seed=args.seed)
    metrics = evaluate_model(model, DataLoader(ds, batch_size=args.batch_size,
                                               collate_fn=collate_mri_samples), device=args.device)
    path = save_prior_checkpoint(model.cpu(), args.out, config=cfg, meta={
        "steps": args.steps, "lr": args.lr, "files": [str(f) for f in files],
        "train_psnr": metrics["psnr"], "final_loss": res.last_loss})
    print(f"trained in {time.perf_counter() - t0:.1f} s; train PSNR {metrics['psnr']:.2f} dB; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
