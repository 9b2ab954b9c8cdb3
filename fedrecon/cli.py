"""The ``fedrecon`` command.

::

    fedrecon simulate-data --config SITES.toml --out DATA_DIR
    fedrecon train    --config CONFIG.toml --out RUN_DIR
    fedrecon resume   --run RUN_DIR [--rounds N]
    fedrecon evaluate --run RUN_DIR [RUN_DIR ...] --data-split test --out EVAL_DIR [--baselines]
    fedrecon bench    {operators,datasets,federated} [ARGS...]

Config errors print one line naming the file, the key and what was expected, exit with
status 2 and leave no run folder behind. Ctrl-C during training leaves the last completed
round's checkpoint: ``fedrecon resume`` continues from it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

log = logging.getLogger("fedrecon")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# -- simulate-data ----------------------------------------------------------------------------
def cmd_simulate_data(args: argparse.Namespace) -> int:
    from .experiment import config_to_toml, load_config, materialize_synthetic
    from .federated.store import atomic_write_text

    cfg = load_config(args.config)
    if args.seed is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, seed=args.seed)
    out = Path(args.out)
    created = not out.exists()
    existing = set(out.iterdir()) if out.is_dir() else set()
    # site folders that are there but empty (materialize_synthetic accepts them)
    empty = [d for d in (out / e.name for e in cfg.sites) if d.is_dir() and not any(d.iterdir())]
    try:
        out.mkdir(parents=True, exist_ok=True)
        made = materialize_synthetic(cfg, out.resolve())
        text = config_to_toml(made)
        # only the [[sites]] part is a sites file; the rest are this config's settings
        atomic_write_text(out / "sites.toml", text[text.index("[[sites]]"):])
    except BaseException:
        # leave nothing half-made: out if created, else what it added (site folders too)
        _remove_new(out, created, existing, ())
        for folder in empty:
            _remove_new(folder, False, set(), ())
        raise
    for e in made.sites:
        counts = {k: len(list(v.glob("*.h5"))) for k, v in (e.folders or {}).items()}
        print(f"{e.name:<20} {e.spec.modality}  volumes: " +
              ", ".join(f"{k} {n}" for k, n in counts.items()))
    print(f"wrote {out / 'sites.toml'} (paste its [[sites]] tables into a run config)")
    return 0


# -- train / resume ---------------------------------------------------------------------------
def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .experiment import (
        RUN_CONFIG_NAME,
        build_experiment,
        check_synthetic_acquisitions,
        config_to_toml,
        load_config,
        materialize_synthetic,
        prepare_run_dir,
    )
    from .federated.store import atomic_write_text

    cfg = load_config(args.config)
    if args.rounds is not None:
        cfg = dataclasses.replace(cfg, rounds=args.rounds)
    check_synthetic_acquisitions(cfg)  # before any folder is written or data simulated
    out = Path(args.out)
    prepare_run_dir(out)
    created = not out.exists()
    existing = set() if created else set(out.iterdir())
    root = Path(cfg.data_root or (out / "data")).resolve()
    # what a failed start must remove again: the data folders it simulated, the run files
    fresh = [d for d in (root, *(root / e.name for e in cfg.sites)) if not d.exists()]
    started = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        cfg = materialize_synthetic(cfg, root)
        exp = build_experiment(cfg)
        runner = exp.runner(out, progress=not args.quiet)
        atomic_write_text(out / RUN_CONFIG_NAME, config_to_toml(cfg))
        started = True
        return _run(runner, out, cfg.rounds)
    except BaseException:
        if not started:
            _remove_new(out, created, existing, fresh)
        raise


def _remove_new(out: Path, created: bool, existing: set[Path], fresh: Sequence[Path]) -> None:
    """Undo a failed ``train`` start: remove ``out`` if it was created, else what was added
    to it, and the data folders in ``fresh`` (they did not exist before)."""
    for folder in fresh:
        shutil.rmtree(folder, ignore_errors=True)
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in set(out.iterdir()) - existing if out.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _resumed_runner(exp: Any, run: Path, **kw: Any) -> Any:
    """``exp.runner(run, resume=True, ...)``; an unreadable checkpoint, or one that does not
    match the run's config, is a user error naming the file."""
    from .experiment import RUN_CONFIG_NAME, ConfigError

    path = run / "checkpoint.pt"
    try:
        return exp.runner(run, resume=True, **kw)
    except (ConfigError, CLIError, FileNotFoundError):
        raise
    except ValueError as err:  # the runner's own checks: format, sites, strategy
        msg = str(err)
        if msg.startswith(str(path)):
            msg = msg[len(str(path)):].lstrip(": ")
        raise CLIError(f"{path} does not match {run / RUN_CONFIG_NAME}: {msg}") from err
    except Exception as err:  # torch.load and the restore of a damaged file
        raise CLIError(f"{path}: cannot read the checkpoint ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else 'damaged file'}); restore "
                       f"a copy or start the run again") from err


def _run(runner: Any, out: Path, rounds: int) -> int:
    t0 = time.perf_counter()
    try:
        runner.run()
    except KeyboardInterrupt:
        done = runner.completed_rounds
        print(f"\ninterrupted after {done} of {rounds} rounds; the checkpoint of round {done} "
              f"is in {out}. Continue with: fedrecon resume --run {out}", file=sys.stderr)
        return 130
    print(f"trained {rounds} rounds in {time.perf_counter() - t0:.0f} s: {out} "
          f"(metrics.jsonl, checkpoint.pt). Evaluate with: fedrecon evaluate --run {out} "
          f"--data-split test --out {out}/eval --baselines")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from .experiment import RUN_CONFIG_NAME, build_experiment, load_config

    run = Path(args.run)
    path = run / RUN_CONFIG_NAME
    if not path.is_file():
        raise CLIError(f"{run}: not a fedrecon run folder (no {RUN_CONFIG_NAME})")
    cfg = load_config(path)
    exp = build_experiment(cfg)
    runner = _resumed_runner(exp, run, progress=not args.quiet, rounds=args.rounds)
    rounds = runner.config.rounds
    if rounds < runner.completed_rounds:
        raise CLIError(f"--rounds {rounds}: the run in {run} has already completed "
                       f"{runner.completed_rounds} rounds; a run can only be extended")
    if rounds != cfg.rounds:  # the run was extended: the effective config says so
        import dataclasses

        from .experiment import config_to_toml
        from .federated.store import atomic_write_text

        atomic_write_text(path, config_to_toml(dataclasses.replace(cfg, rounds=rounds)))
    if runner.completed_rounds >= rounds:
        print(f"{run}: all {rounds} rounds are complete (extend with --rounds N)")
        return 0
    print(f"resuming {run} after round {runner.completed_rounds} of {rounds}")
    return _run(runner, run, rounds)


# -- evaluate -----------------------------------------------------------------------------------
def _restore(run: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(config, experiment, site id -> model) of a finished or interrupted run."""
    from .experiment import RUN_CONFIG_NAME, build_experiment, load_config, site_models

    path = run / RUN_CONFIG_NAME
    if not path.is_file():
        raise CLIError(f"--run {run}: not a fedrecon run folder (no {RUN_CONFIG_NAME})")
    if not (run / "checkpoint.pt").is_file():
        raise CLIError(f"--run {run}: no checkpoint.pt (the run never completed a round)")
    cfg = load_config(path)
    exp = build_experiment(cfg)
    runner = _resumed_runner(exp, run, progress=False)
    if runner.completed_rounds == 0:
        raise CLIError(f"--run {run}: no round completed yet; nothing to evaluate")
    models = site_models(exp, runner)
    return cfg, exp, models


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from .evaluation import (
        baseline_methods,
        default_baselines,
        evaluate_volumes,
        model_method,
        summarize,
    )
    from .report import (
        figure_grid,
        run_summary_table,
        staged_output,
        training_curves,
        write_reconstructions,
        write_report,
        write_tables,
    )
    from .runners import read_metrics

    runs = [Path(r) for r in args.run]
    labels = {Path(k).resolve(): v for k, v in (args.label or {}).items()}
    unknown = [str(k) for k in labels if k not in {r.resolve() for r in runs}]
    if unknown:
        raise CLIError(f"--label: {unknown[0]} is not one of the --run folders")
    restored = {}
    for run in runs:
        cfg, exp, models = _restore(run)
        method = labels.get(run.resolve())
        name = method or cfg.strategy_name
        if name in restored:
            name = f"{name}@{run.name}"
        restored[name] = (run, cfg, exp, models)
    first_cfg, first_exp = next(iter(restored.values()))[1:3]
    site_ids = [s.site_id for s in first_exp.all_sites]
    for name, (run, cfg, exp, _) in restored.items():
        if [s.site_id for s in exp.all_sites] != site_ids:
            raise CLIError(f"--run {run}: its sites {[s.site_id for s in exp.all_sites]} differ "
                           f"from {site_ids}; runs compared together need the same sites")
    notes = _comparison_notes(first_cfg, restored)
    for note in notes:
        log.warning("%s", note)
    modality = first_cfg.modality
    if args.baselines is None:
        wanted: list[str] = []
    elif args.baselines == []:
        wanted = default_baselines(modality)
    else:
        wanted = list(args.baselines)
    split = args.data_split
    device = first_exp.sites[0].device
    eval_sites = first_exp.all_sites
    if args.data is not None:  # the site's model on other fastMRI-layout / CT files
        eval_sites = [_external_site(first_cfg, first_exp, args)]
        split = "test"
    metrics = ["psnr", "ssim", "nmse"] + (["psnr_hu", "ssim_hu"] if modality == "ct" else [])
    rows, volume_rows, figures = [], [], []
    chosen: dict[str, str] = {}
    with staged_output(Path(args.out), overwrite=args.overwrite) as stage:
        (stage / "figures").mkdir()
        for k, site in enumerate(eval_sites):
            loader = {"val": site.val_loader, "test": site.test_loader,
                      "train": site.train_loader}[split]
            if loader is None:
                raise CLIError(f"site '{site.site_id}' has no '{split}' split")
            methods: dict[str, Any] = {}
            for name, (_, _, _, models) in restored.items():
                methods[name] = (None, model_method(models[site.site_id]))
            for b, (param, m) in baseline_methods(wanted, modality, site.val_loader,
                                                  device).items():
                methods[b] = (param, m)
                chosen[f"{b}@{site.site_id}"] = param
            images, scores = {}, {}
            target_img = None
            for name, (param, method) in methods.items():
                vols = evaluate_volumes(method, loader, device=device, ct=modality == "ct")
                summary = summarize(vols)
                rows.append({"site": site.site_id, "method": name, **summary,
                             "volumes": int(summary["volumes"]), "parameter": param or ""})
                volume_rows += [{"site": site.site_id, "method": name, "volume": v.fname,
                                 **v.metrics} for v in vols]
                if not args.no_reconstructions:
                    write_reconstructions(stage, name, site.site_id, vols)
                mid = vols[0].recon.shape[0] // 2
                images[name] = vols[0].recon[mid].numpy()
                target_img = vols[0].target[mid].numpy()
                scores[name] = vols[0].metrics
                log.info("%-12s %-14s PSNR %.2f dB  SSIM %.4f  NMSE %.5f", site.site_id, name,
                         summary["psnr"], summary["ssim"], summary["nmse"])
            fig = f"figures/{k:02d}_{site.site_id}.png"
            figure_grid(stage / fig, f"{site.site_id} ({split})", np.asarray(target_img), images,
                        scores)
            figures.append(fig)
        table = write_tables(stage, rows, volume_rows, metrics)
        records = {name: read_metrics(run) for name, (run, *_) in restored.items()}
        curves = training_curves(stage / "figures" / "curves.png", records)
        base_desc = {b: "; ".join(f"{s.site_id}: {chosen[f'{b}@{s.site_id}']}" for s in eval_sites)
                     for b in wanted}
        write_report(stage, title=args.title or "fedrecon evaluation",
                     runs={n: r[0] for n, r in restored.items()}, split=split, table_md=table,
                     figures=figures, curves="figures/curves.png" if curves else None,
                     baselines=base_desc, run_table=run_summary_table(records),
                     notes=[*([(f"Leave-one-site-out: `{first_cfg.held_out}` never trained; "
                                f"it reconstructs with the consensus prior and initial DC "
                                f"layers."), ""] if first_cfg.held_out else []),
                            *(line for note in notes for line in (note, ""))])
    print(table)
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def _comparison_notes(first_cfg: Any, restored: dict[str, tuple]) -> list[str]:
    """Where runs compared together were trained on other acquisitions or splits than the
    first run's: every run is evaluated on the first run's sites (data, masks, coils), so
    the report says so instead of comparing them silently."""
    first = {e.name: e.spec for e in first_cfg.sites}
    notes = []
    for name, (run, cfg, *_) in list(restored.items())[1:]:
        for entry in cfg.sites:
            ref = first.get(entry.name)
            for field in ("acquisition", "split"):
                if ref is not None and getattr(entry.spec, field) != getattr(ref, field):
                    notes.append(f"Run `{name}` ({run}) was trained with another {field} at "
                                 f"site `{entry.name}` than the first run; it is evaluated on "
                                 f"the first run's ({getattr(ref, field)}).")
    return notes


def _external_site(cfg: Any, exp: Any, args: argparse.Namespace) -> Any:
    """A copy of site ``--site`` whose test split is the ``.h5`` files of ``--data``."""
    import copy

    from fedrecon.datasets import collate_ct_samples, collate_mri_samples

    from .experiment import SiteEntry, entry_datasets
    from .federated.site import eval_loader

    names = [s.site_id for s in exp.all_sites]
    if args.site is None and len(names) > 1:
        raise CLIError(f"--data needs --site (one of {names}): whose model and acquisition")
    name = args.site or names[0]
    if name not in names:
        raise CLIError(f"--site {name!r}: the run has sites {names}")
    folder = Path(args.data)
    if not folder.is_dir():
        raise CLIError(f"--data {folder}: not a folder")
    entry = next(e for e in cfg.sites if e.name == name)
    # the site's acquisition and seed over the folder's files, as for its own splits
    data = entry_datasets(SiteEntry(entry.spec, {"test": folder}), cfg.seed,
                          coil_maps=cfg.coil_maps)["test"]
    collate = collate_mri_samples if entry.spec.modality == "mri" else collate_ct_samples
    site = copy.copy(next(s for s in exp.all_sites if s.site_id == name))
    site.test_loader = eval_loader(data, 8, collate)
    return site


# -- bench ------------------------------------------------------------------------------------
BENCHES = ("operators", "datasets", "federated")


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "scripts" / f"bench_{args.which}.py"
    if not script.is_file():
        raise CLIError(f"bench '{args.which}': {script} not found; the benchmarks run from a "
                       f"source checkout of fedrecon")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


# -- parser -----------------------------------------------------------------------------------
def _labels(values: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise CLIError(f"--label {v!r}: expected RUN_DIR=NAME")
        run, name = v.split("=", 1)
        out[run] = name
    return out


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _nonnegative_int(text: str) -> int:
    return _int_at_least(0, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrecon", description="Federated physics-informed "
                                "reconstruction: simulate sites, train, resume, evaluate.")
    p.add_argument("--quiet", action="store_true", help="no progress bars or round log")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate-data", help="write synthetic multi-site fastMRI/CT files")
    s.add_argument("--config", required=True, help="a sites file or run config (TOML)")
    s.add_argument("--out", required=True, help="data folder: <out>/<site>/<split>/*.h5")
    s.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="overrides the config's seed (>= 0)")
    s.set_defaults(func=cmd_simulate_data)

    s = sub.add_parser("train", help="federated training from a TOML config")
    s.add_argument("--config", required=True, help="run config (TOML)")
    s.add_argument("--out", required=True, help="run folder (must not hold a run)")
    s.add_argument("--rounds", type=_positive_int, default=None,
                   help="overrides the config's rounds (>= 1)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("resume", help="continue an interrupted run")
    s.add_argument("--run", required=True, help="the run folder of 'fedrecon train --out'")
    s.add_argument("--rounds", type=_positive_int, default=None, metavar="N",
                   help="extend the run to N rounds (at least the rounds already completed)")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("evaluate", help="evaluate runs on a split (fastMRI metrics)")
    s.add_argument("--run", required=True, nargs="+", help="one or more run folders")
    s.add_argument("--data-split", default="test", choices=["train", "val", "test"],
                   help="the sites' split to evaluate on (default: test)")
    s.add_argument("--out", required=True, help="evaluation folder (written atomically)")
    s.add_argument("--baselines", nargs="*", default=None,
                   help="classical baselines, tuned on each site's val split (the flag alone: "
                        "all of the modality: zero_filled sense tv for MRI, fbp tv for CT; "
                        "without the flag: none)")
    s.add_argument("--label", nargs="*", default=None, metavar="RUN_DIR=NAME",
                   help="method name of a run in the tables (default: its strategy)")
    s.add_argument("--data", default=None, metavar="FOLDER",
                   help="evaluate on the .h5 files of FOLDER instead of a split (with --site)")
    s.add_argument("--site", default=None, help="with --data: the site whose model and "
                   "acquisition are used")
    s.add_argument("--title", default=None, help="title of report.md")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    s.add_argument("--no-reconstructions", action="store_true",
                   help="skip writing the reconstruction .h5 files")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("bench", help="run a benchmark script (from a source checkout)")
    s.add_argument("which", choices=BENCHES)
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)

    for module in ("fedrecon.runners.flower_cli", "fedrecon.privacy.audit"):
        try:  # optional subcommands (flwr, privacy extras)
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fedrecon.datasets.ct import CTFileError
    from fedrecon.datasets.fastmri import FastMRIFormatError

    from .experiment import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        if getattr(args, "label", None) is not None:
            args.label = _labels(args.label)
        return int(args.func(args) or 0)
    except (ConfigError, CLIError, FileExistsError, FileNotFoundError,
            FastMRIFormatError, CTFileError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"fedrecon {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
