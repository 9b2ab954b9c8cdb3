#!/usr/bin/env python
"""Train an unrolled network at one site on synthetic data and compare it with classical
reconstructions on held-out volumes.

MRI (default): multi-coil k-space simulated from real anatomy (the MNI152 template), 4x
equispaced Cartesian undersampling, ESPIRiT coil maps; baselines: zero-filled RSS and
CG-SENSE at the Tikhonov weight that is best on the *training* volumes.
CT (``--modality ct``): tissue-like phantoms, sparse-view low-dose parallel beam; baseline:
FBP with the filter that is best on the training volumes.

Prints a table (method, seed, PSNR, SSIM, NMSE), writes ``OUT/metrics.csv`` and
``OUT/comparison.png`` (atomically)::

    python scripts/train_single_site.py --out runs/single_site [--modality ct] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

MRI_DEFAULTS = {"size": 64, "coils": 8, "train_volumes": 8, "test_volumes": 2, "slices": 6,
                "steps": 300, "lr": 5e-3, "batch_size": 4}
CT_DEFAULTS = {"size": 64, "train_volumes": 4, "test_volumes": 1, "slices": 8, "steps": 150,
               "lr": 2e-3, "batch_size": 4}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write to a temporary file in ``path``'s folder, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- data and baselines -----------------------------------------------------------------
def mri_setup(args: argparse.Namespace, root: Path):
    from fedrecon.datasets import FastMRISliceDataset, collate_mri_samples, make_synthetic_fastmri
    from fedrecon.datasets.mri_transforms import center_crop, zero_filled
    from fedrecon.operators import EquispacedFractionMask, cg_sense

    from fedrecon.train import to_target_space

    n_vol = args.train_volumes + args.test_volumes
    files = make_synthetic_fastmri(root / "mri", n_volumes=n_vol, n_coils=args.coils,
                                   image_size=args.size, n_slices=args.slices, seed=args.data_seed,
                                   noise_std=args.noise)
    mask = EquispacedFractionMask([args.center_fraction], [4])
    train = FastMRISliceDataset(files[: args.train_volumes], mask=mask, coil_maps="espirit")
    test = FastMRISliceDataset(files[args.train_volumes:], mask=mask, coil_maps="espirit")

    def sense(lam: float) -> Callable:
        return lambda p: to_target_space(cg_sense(p.op, p.y, lam=lam, n_iter=args.sense_iters), p)

    candidates = {f"CG-SENSE (lam={lam:g})": sense(lam) for lam in (0.0, 1e-3, 3e-3, 1e-2, 3e-2)}
    fixed = {"zero-filled RSS": lambda p: center_crop(zero_filled(p.y), p.crop_size)}
    return train, test, collate_mri_samples, fixed, candidates, True


def ct_setup(args: argparse.Namespace, root: Path):
    from fedrecon.datasets import (
        CTAcquisition,
        CTSliceDataset,
        collate_ct_samples,
        write_phantom_volumes,
    )
    from fedrecon.operators import fbp

    files = write_phantom_volumes(root / "ct", args.train_volumes + args.test_volumes,
                                  args.slices, args.size, seed=args.data_seed)
    acq = CTAcquisition(geometry="parallel", n_views=args.views, image_size=args.size,
                        pixel_spacing=400.0 / args.size, det_spacing=400.0 / args.size,
                        photons=args.photons)
    train = CTSliceDataset(files[: args.train_volumes], acq, seed=0)
    test = CTSliceDataset(files[args.train_volumes:], acq, seed=1)
    candidates = {f"FBP ({flt})": (lambda p, flt=flt: fbp(p.op, p.y, flt))
                  for flt in ("ramp", "shepp-logan", "cosine", "hann")}
    return train, test, collate_ct_samples, {}, candidates, False


# -- main -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=("mri", "ct"), default="mri")
    parser.add_argument("--out", type=Path, default=Path("runs/single_site"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--size", type=int, help="image size (px)")
    parser.add_argument("--train-volumes", type=int)
    parser.add_argument("--test-volumes", type=int)
    parser.add_argument("--slices", type=int, help="slices per volume")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--dc", choices=("gradient", "proximal"), default=None)
    parser.add_argument("--n-iter", type=int, default=None)
    parser.add_argument("--chans", type=int, default=16)
    parser.add_argument("--num-pools", type=int, default=2)
    parser.add_argument("--cg-iters", type=int, default=6)
    parser.add_argument("--loss", default="l1")
    parser.add_argument("--coils", type=int, help="MRI: receive coils")
    parser.add_argument("--noise", type=float, default=0.002, help="MRI: k-space noise std")
    parser.add_argument("--center-fraction", type=float, default=0.12, help="MRI: ACS fraction")
    parser.add_argument("--sense-iters", type=int, default=30)
    parser.add_argument("--views", type=int, default=24, help="CT: projection views")
    parser.add_argument("--photons", type=float, default=1e5, help="CT: blank-scan photons")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for key, value in (MRI_DEFAULTS if args.modality == "mri" else CT_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.dc is None:
        args.dc = "proximal" if args.modality == "mri" else "gradient"
    if args.n_iter is None:
        args.n_iter = 4
    if args.threads:
        torch.set_num_threads(args.threads)

    from fedrecon.models import ModelConfig, build_model
    from fedrecon.train import evaluate_model, prepare_batch, reconstruct, train_local

    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedrecon-single-site-") as tmp:
        setup = mri_setup if args.modality == "mri" else ct_setup
        train, test, collate, fixed, candidates, complex_images = setup(args, Path(tmp))
        eval_train = DataLoader(train, batch_size=16, collate_fn=collate)
        eval_test = DataLoader(test, batch_size=16, collate_fn=collate)
        print(f"{args.modality}: {len(train)} training and {len(test)} held-out slices "
              f"({time.perf_counter() - t_start:.1f} s to prepare)", flush=True)

        # the classical baseline at its best setting on the training volumes (fair tuning)
        on_train = {name: evaluate_model(fn, eval_train) for name, fn in candidates.items()}
        best_name = max(on_train, key=lambda n: on_train[n]["psnr"])
        baselines = {**fixed, best_name: candidates[best_name]}
        rows = [{"method": name, "seed": "", **evaluate_model(fn, eval_test)}
                for name, fn in baselines.items()]

        cfg = ModelConfig(dc=args.dc, n_iter=args.n_iter, chans=args.chans,
                          num_pools=args.num_pools, cg_iters=args.cg_iters)
        models = {}
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_model(cfg, complex_images=complex_images)
            loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                generator=torch.Generator().manual_seed(seed))
            result = train_local(model, loader, steps=args.steps, lr=args.lr, loss=args.loss,
                                 seed=seed, progress=not args.no_progress)
            metrics = evaluate_model(model, eval_test)
            rows.append({"method": f"unrolled ({args.dc}, {args.n_iter} iter)", "seed": seed,
                         **metrics, "train_s": result.seconds})
            models[seed] = model
            print(f"seed {seed}: {result.steps} steps in {result.seconds:.1f} s, "
                  f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}", flush=True)

        # one held-out slice for the figure
        prep = prepare_batch(next(iter(DataLoader(test, batch_size=1, collate_fn=collate))))
        with torch.no_grad():
            images = [("reference", prep.target[0])]
            images += [(name, fn(prep)[0]) for name, fn in baselines.items()]
            model = models[args.seeds[0]].eval()
            images.append((f"unrolled (seed {args.seeds[0]})", reconstruct(model, prep)[0]))

    print(f"\n{'method':<34} {'seed':>4} {'PSNR (dB)':>9} {'SSIM':>7} {'NMSE':>8}")
    for r in rows:
        print(f"{r['method']:<34} {r['seed']!s:>4} {r['psnr']:9.2f} {r['ssim']:7.4f} "
              f"{r['nmse']:8.5f}")
    trained = [r for r in rows if r["seed"] != ""]
    if len(trained) > 1:
        p = np.array([r["psnr"] for r in trained])
        s = np.array([r["ssim"] for r in trained])
        print(f"{'unrolled, mean +- std over seeds':<34} {'':>4} {p.mean():6.2f}+-{p.std():.2f} "
              f"{s.mean():.4f}+-{s.std():.4f}")

    def write_csv(tmp_path: str) -> None:
        with open(tmp_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["modality", "method", "seed", "psnr", "ssim", "nmse", "n_slices"])
            for r in rows:
                w.writerow([args.modality, r["method"], r["seed"], f"{r['psnr']:.4f}",
                            f"{r['ssim']:.5f}", f"{r['nmse']:.6f}", int(r["n"])])

    _atomic_write(args.out / "metrics.csv", write_csv)
    save_figure(images, args.out / "comparison.png", title=f"{args.modality.upper()}, held-out slice")
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'comparison.png'} "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    return rows


def save_figure(images: list[tuple[str, torch.Tensor]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedrecon.metrics import psnr, ssim

    ref = images[0][1].float()
    vmax = float(ref.max())
    fig, axes = plt.subplots(2, len(images), figsize=(2.6 * len(images), 5.4), squeeze=False)
    for c, (label, img) in enumerate(images):
        img = img.float()
        axes[0][c].imshow(img.numpy(), cmap="gray", vmin=0, vmax=vmax)
        sub = label if c == 0 else (f"{label}\n{float(psnr(img, ref, vmax)):.2f} dB, "
                                    f"SSIM {float(ssim(img, ref, vmax)):.3f}")
        axes[0][c].set_title(sub, fontsize=7)
        axes[1][c].imshow((img - ref).abs().numpy(), cmap="magma", vmin=0, vmax=0.2 * vmax)
        axes[1][c].set_title("|error| (x5)" if c else "", fontsize=7)
        for r in (0, 1):
            axes[r][c].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


if __name__ == "__main__":
    main()
