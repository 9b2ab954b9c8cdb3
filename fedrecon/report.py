"""Evaluation outputs: tables (CSV + markdown), fastMRI-layout reconstructions, figure grids,
training curves and a ``report.md`` that ties them together. Everything is written into a
staging folder that replaces the output folder only when complete."""

from __future__ import annotations

import csv
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import VolumeResult, per_method_table

__all__ = [
    "figure_grid",
    "mean_rows",
    "staged_output",
    "training_curves",
    "write_reconstructions",
    "write_report",
    "write_tables",
]

TABLE_METRICS = ("psnr", "ssim", "nmse")


@contextmanager
def staged_output(out: Path, *, overwrite: bool = False):
    """Yield a staging folder next to ``out``; on success it becomes ``out`` (an existing
    ``out`` is replaced only with ``overwrite``); on error it is removed and ``out`` is
    untouched."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def mean_rows(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One ``site = "mean"`` row per method: the mean over sites of each metric."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        row: dict[str, Any] = {"site": "mean", "method": m}
        for k in metrics:
            vals = [r[k] for r in mine if r.get(k) is not None]
            row[k] = statistics.mean(vals) if vals else None
        out.append(row)
    return out


def write_tables(stage: Path, rows: Sequence[Mapping[str, Any]],
                 volume_rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """``metrics.csv`` (site, method, metrics...), ``metrics_volumes.csv`` and
    ``metrics.md``; returns the markdown."""
    fields = ["site", "method", *metrics, "volumes", "parameter"]
    with open(stage / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    vfields = ["site", "method", "volume", *metrics, "slices"]
    with open(stage / "metrics_volumes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=vfields, extrasaction="ignore")
        w.writeheader()
        for r in volume_rows:
            w.writerow(r)
    md = ("## Per site\n\n" + per_method_table(rows, metrics) + "\n\n## Mean over sites\n\n"
          + per_method_table(mean_rows(rows, metrics), metrics) + "\n")
    (stage / "metrics.md").write_text(md)
    return md


def write_reconstructions(stage: Path, method: str, site: str,
                          volumes: Sequence[VolumeResult]) -> None:
    """fastMRI's submission layout: one ``<volume>.h5`` with a ``reconstruction`` dataset
    ``(slices, H, W)`` per volume, under ``reconstructions/<method>/<site>/``."""
    import h5py

    folder = stage / "reconstructions" / method / site
    folder.mkdir(parents=True, exist_ok=True)
    for v in volumes:
        name = Path(v.fname).name
        name = name if name.endswith(".h5") else f"{name}.h5"
        with h5py.File(folder / name, "w") as hf:
            hf.create_dataset("reconstruction", data=v.recon.numpy().astype(np.float32))


def figure_grid(path: Path, site: str, target: np.ndarray, images: Mapping[str, np.ndarray],
                scores: Mapping[str, Mapping[str, float]]) -> None:
    """Target and every method's reconstruction (top row), absolute error maps (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images) + 1
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 4.8), squeeze=False)
    vmax = float(target.max()) or 1.0
    axes[0, 0].imshow(target, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("target", fontsize=9)
    axes[1, 0].axis("off")
    err_max = max(float(np.abs(img - target).max()) for img in images.values()) or 1.0
    for j, (name, img) in enumerate(images.items(), start=1):
        s = scores.get(name, {})
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=vmax)
        label = f"{name}\n{s['psnr']:.2f} dB / {s['ssim']:.3f}" if s else name
        axes[0, j].set_title(label, fontsize=8)
        axes[1, j].imshow(np.abs(img - target), cmap="magma", vmin=0, vmax=err_max / 2)
        axes[1, j].set_title("|error|", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(site, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(path: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> bool:
    """PSNR and SSIM over rounds: one colour per site, one line style per run; ``False`` when
    the runs have no evaluation records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    site_color: dict[str, str] = {}
    drawn = False
    for i, (method, records) in enumerate(runs.items()):
        by_site: dict[str, list[tuple[int, float, float]]] = {}
        for r in records:
            if r.get("psnr") is not None and not (isinstance(r["psnr"], float)
                                                  and math.isnan(r["psnr"])):
                by_site.setdefault(r["site"], []).append((r["round"] + 1, r["psnr"], r["ssim"]))
        for site, pts in sorted(by_site.items()):
            pts.sort()
            x = [p[0] for p in pts]
            color = site_color.setdefault(site, colors[len(site_color) % len(colors)])
            axes[0].plot(x, [p[1] for p in pts], styles[i % 4], color=color, marker="o", ms=3,
                         label=f"{method}: {site}")
            axes[1].plot(x, [p[2] for p in pts], styles[i % 4], color=color, marker="o", ms=3)
            drawn = True
    if drawn:
        axes[0].set(xlabel="round", ylabel="PSNR (dB)", title="validation PSNR per site")
        axes[1].set(xlabel="round", ylabel="SSIM", title="validation SSIM per site")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_report(stage: Path, *, title: str, runs: Mapping[str, Path], split: str,
                 table_md: str, figures: Sequence[str], curves: str | None,
                 baselines: Mapping[str, str], notes: Sequence[str] = (),
                 run_table: str | None = None) -> Path:
    lines = [f"# {title}", ""]
    lines.append(f"Evaluated on the **{split}** split of every site; metrics as fastMRI defines "
                 f"them (per volume: PSNR with the volume's max as data range, SSIM with a 7x7 "
                 f"window averaged over slices, NMSE), then the mean over volumes.")
    lines.append("")
    lines.append("Runs: " + ", ".join(f"`{m}` ({p})" for m, p in runs.items()))
    if baselines:
        lines.append("")
        lines.append("Baselines (parameter tuned on each site's validation split): " + ", ".join(
            f"`{k}` ({v})" for k, v in baselines.items()))
    lines += ["", table_md, ""]
    if run_table:
        lines += ["## Runs: privacy and communication", "", run_table, ""]
    if curves:
        lines += ["## Training curves", "", f"![curves]({curves})", ""]
    if figures:
        lines += ["## Reconstructions (middle slice of each site's first volume)", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures]
        lines.append("")
    lines += list(notes)
    lines += [("Files: `metrics.csv` (per site and method), `metrics_volumes.csv` (per volume), "
              "`reconstructions/<method>/<site>/<volume>.h5` (fastMRI submission layout, key "
              "`reconstruction`)."), ""]
    path = stage / "report.md"
    path.write_text("\n".join(lines))
    return path


def run_summary_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown: per run, the rounds completed, the DP epsilon after the last round (when the
    run used DP) and the bytes sent and received over the run (all sites, from the records)."""
    lines = ["| method | rounds | DP epsilon | MB sent (sites -> server) | MB received |",
             "|---|---:|---:|---:|---:|"]
    for method, records in runs.items():
        rounds = 1 + max((int(r["round"]) for r in records), default=-1)
        eps = [r.get("epsilon") for r in records if r.get("epsilon") is not None]
        sent = sum(int(r.get("bytes_sent") or 0) for r in records)
        received = sum(int(r.get("bytes_received") or 0) for r in records)
        lines.append(f"| {method} | {rounds} | {f'{eps[-1]:.3g}' if eps else '-'} | "
                     f"{sent / 1e6:.3f} | {received / 1e6:.3f} |")
    return "\n".join(lines)
