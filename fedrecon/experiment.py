"""A federated experiment from a :class:`~fedrecon.run_config.RunConfig`: the sites' data
(with the acquisition checks that must pass before a run starts), the model, the strategy and
the runner. The CLI (:mod:`fedrecon.cli`) and the benchmark scripts are thin wrappers around
this module; the config itself is parsed in :mod:`fedrecon.run_config` (its names are
re-exported here).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedrecon.datasets import ConfigError, simulate_sites
from fedrecon.datasets.mri_transforms import CoilMapCache
from fedrecon.datasets.site_simulation import SPLITS, make_site_dataset, site_seed
from fedrecon.datasets.sites import MRIAcquisition, check_acquisition_fits, ct_acquisition_class
from fedrecon.models import ModelConfig, Partition, Role, build_model

from .run_config import (
    RUN_CONFIG_NAME,
    RunConfig,
    SiteEntry,
    config_to_toml,
    load_config,
    make_compressor,
    parse_config,
)

__all__ = [
    "RUN_CONFIG_NAME",
    "ConfigError",
    "Experiment",
    "RunConfig",
    "SiteEntry",
    "build_experiment",
    "check_synthetic_acquisitions",
    "config_to_toml",
    "load_config",
    "materialize_synthetic",
    "parse_config",
]


# -- acquisition checks ---------------------------------------------------------------------
def check_synthetic_acquisitions(cfg: RunConfig) -> None:
    """Training's checks of the synthetic MRI sites' acquisitions, whose k-space shape the
    config fixes (``(n_coils, image_size, image_size)``): the mask can be drawn and its
    centre suits ESPIRiT. A :class:`ConfigError` naming the file, the site and the key; run
    it before anything is written (``simulate-data`` alone needs neither)."""
    for i, entry in enumerate(cfg.sites):
        spec = entry.spec
        if entry.folders is not None or spec.modality != "mri" or spec.data.kind != "synthetic":
            continue
        size = spec.data.image_size
        espirit = cfg.coil_maps == "espirit" and spec.data.challenge == "multicoil"
        check_acquisition_fits(spec.acquisition, (spec.acquisition.n_coils, size, size),
                               f"{cfg.source or 'config'}: sites[{i}] ({entry.name!r})"
                               ".acquisition",
                               min_acs_ok=CoilMapCache().accepts if espirit else None,
                               what=f" of synthetic image_size {size}")


def _check_site_masks(cfg: RunConfig, index: int, splits: Mapping[str, Any]) -> None:
    """Draw every volume's mask now, as training would (memoised by the dataset), so that an
    acquisition that does not fit a file's k-space is a :class:`ConfigError` naming the
    config, the site and the key before any round runs."""
    entry = cfg.sites[index]
    where = f"{cfg.source or 'config'}: sites[{index}] ({entry.name!r}).acquisition"
    for ds in splits.values():
        if ds is None or getattr(ds, "mask_func", None) is None:
            continue
        cache = getattr(ds, "coil_map_cache", None)
        for v, info in enumerate(ds.volumes):
            if info.has_mask:  # the file's own mask
                continue
            try:
                n_low = ds.volume_mask(v).num_low_frequencies
                fine = cache is None or cache.accepts(n_low)
            except (ValueError, ArithmeticError, IndexError):
                fine = False
            if fine:
                continue
            shape = (info.n_coils, *info.kspace_shape[-2:])
            check_acquisition_fits(entry.spec.acquisition, shape, where,
                                   min_acs_ok=None if cache is None else cache.accepts,
                                   what=f" of {info.path.name}")
            raise ConfigError(f"{where}: the mask does not fit the k-space {shape} of "
                              f"{info.path.name}; check 'acceleration', 'center_fraction' and "
                              f"'calib_size'")


# -- data -----------------------------------------------------------------------------------
def materialize_synthetic(cfg: RunConfig, root: Path) -> RunConfig:
    """Simulate the synthetic sites of ``cfg`` into ``root/<site>/<split>/`` and return the
    config with those sites turned into folder sites (other sites unchanged)."""
    synthetic = [e.spec for e in cfg.sites if e.folders is None and e.spec.data.kind == "synthetic"]
    if not synthetic:
        return cfg
    for spec in synthetic:
        target = root / spec.name
        if target.exists() and any(target.iterdir()):
            raise ConfigError(f"data folder {target} exists and is not empty: remove it, or "
                              f"point the site's train/val/test keys at it")
    made = simulate_sites(synthetic, cfg.seed, root=root)
    entries = []
    for entry in cfg.sites:
        if entry.name not in made:
            entries.append(entry)
            continue
        folders = {}
        for split, files in made[entry.name].files.items():
            if not files:
                continue
            folder = root / entry.name / split
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                os.replace(f, folder / Path(f).name)
            folders[split] = folder.resolve()
        spec = dataclasses.replace(entry.spec, data=dataclasses.replace(
            entry.spec.data, kind="folder", path=str(folders["train"])))
        entries.append(SiteEntry(spec, folders))
    return dataclasses.replace(cfg, sites=tuple(entries))


def _folder_files(entry: SiteEntry, split: str) -> list[Path]:
    assert entry.folders is not None
    folder = entry.folders[split]
    files = sorted(p for p in folder.glob("*.h5") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"site {entry.name!r}: no .h5 files in its {split} folder {folder}")
    return files


def entry_datasets(entry: SiteEntry, seed: int, *, coil_maps: str | None = "espirit",
                   root: Path | None = None) -> dict[str, Any]:
    """``split -> dataset`` of one site (``None`` for a split it lacks). Folder sites read
    their split folders; spec sites are split by volume (synthetic ones simulated under
    ``root``, a temporary folder by default)."""
    maps = coil_maps if entry.spec.modality == "mri" else None
    if entry.folders is None:
        data = simulate_sites([entry.spec], seed, root=root, coil_maps=maps)[entry.name]
        return {"train": data.train, "val": data.val, "test": data.test}
    own = site_seed(seed, entry.name)
    out = {split: make_site_dataset(entry.spec, _folder_files(entry, split), own, maps)
           if split in entry.folders else None for split in SPLITS}
    for split in ("train", "val"):  # trained on / validated every round: targets needed
        bare = [v for v in getattr(out[split], "volumes", ())
                if getattr(v, "target_key", "") is None]
        if bare:
            key = "reconstruction_esc" if entry.spec.data.challenge == "singlecoil" \
                else "reconstruction_rss"
            raise ConfigError(f"site {entry.name!r}: {bare[0].path}: no dataset {key!r} (a "
                              f"test/challenge file with only a 'mask'); the {split} folder "
                              f"needs files with targets")
    return out


def site_datasets(cfg: RunConfig, entry: SiteEntry) -> dict[str, Any]:
    """``split -> dataset`` of one site of ``cfg``."""
    return entry_datasets(entry, cfg.seed, coil_maps=cfg.coil_maps)


# -- model, strategy, sites, runner ---------------------------------------------------------
def protocol_length(modality: str) -> int:
    acq = MRIAcquisition() if modality == "mri" else ct_acquisition_class()(
        image_size=(32, 32))
    return len(acq.protocol_vector())


def effective_model_config(cfg: RunConfig) -> ModelConfig:
    """The ``[model]`` table, with FiLM conditioning switched on for the hypernetwork."""
    model = cfg.model
    if cfg.strategy_name == "hypernetwork" and model.cond_dim == 0:
        model = dataclasses.replace(model, cond_dim=protocol_length(cfg.modality))
    return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: device 'cuda' requested but CUDA is not available")
    return torch.device(name)


@dataclass
class Experiment:
    """Everything a run needs, built from a :class:`RunConfig`."""

    config: RunConfig
    sites: list[Any]  # fedrecon.federated.Site (the training sites)
    strategy: Any  # fedrecon.federated.Strategy (for "centralized": the pooled FedAvg)
    model_config: ModelConfig
    held_out: Any = None  # the leave-one-site-out Site, never trained

    @property
    def all_sites(self) -> list[Any]:
        return self.sites + ([self.held_out] if self.held_out is not None else [])

    def held_out_state(self, state: Any) -> Any:
        """The GLOBAL state the held-out site reconstructs with."""
        new_site = getattr(self.strategy, "state_for_new_site", None)
        if new_site is not None and getattr(self.strategy, "embeddings", None) is None:
            return new_site(self.held_out.protocol)
        if new_site is not None:
            return new_site()
        return state.global_state

    def evaluators(self) -> dict[str, Any] | None:
        if self.held_out is None:
            return None
        out: dict[str, Any] = {
            s.site_id: (lambda state, split, s=s: s.evaluate(state.for_site(s.site_id),
                                                             split=split))
            for s in self.sites}
        out[self.held_out.site_id] = lambda state, split: self.held_out.evaluate(
            self.held_out_state(state), split=split)
        return out

    def runner(self, run_dir: Path, *, resume: bool = False, progress: bool = True,
               rounds: int | None = None) -> Any:
        from fedrecon.runners import SimulationRunner, centralized_runner

        cfg = self.config
        for site in self.all_sites:
            site.progress = progress
        kw: dict[str, Any] = {"seed": cfg.seed, "fraction": cfg.fraction, "min_sites": cfg.min_sites,
                                  "drop_prob": cfg.drop_prob, "eval_every": cfg.eval_every,
                                  "retries": cfg.retries, "progress": progress}
        if cfg.privacy:
            from fedrecon.privacy import UpdatePipeline

            kw["privacy"] = UpdatePipeline(cfg.privacy, seed=cfg.seed)
        if cfg.compression:
            kw["compression"] = make_compressor(cfg.compression)
        if cfg.strategy_name == "centralized":
            if self.held_out is not None:
                raise ConfigError("config: 'held_out' is not supported with the centralized "
                                  "baseline")
            return centralized_runner(self.sites, rounds=rounds or cfg.rounds, run_dir=run_dir,
                                      local_steps=self.strategy.local_steps, lr=cfg.lr,
                                      resume=resume, **kw)
        if resume:
            return SimulationRunner.resume(run_dir, self.sites, self.strategy, rounds=rounds,
                                           progress=progress, evaluators=self.evaluators(),
                                           privacy=kw.get("privacy"),
                                           compression=kw.get("compression"))
        return SimulationRunner(self.sites, self.strategy, rounds=cfg.rounds, run_dir=run_dir,
                                evaluators=self.evaluators(), **kw)


def site_models(exp: Experiment, runner: Any) -> dict[str, nn.Module]:
    """``site id -> model`` each site reconstructs with after ``runner``'s last round: its
    LOCAL state with its (personalized) GLOBAL state, its personal model (Ditto), the pooled
    model (centralized), or the consensus prior for a held-out site."""
    from fedrecon.runners.baselines import POOLED_SITE_ID

    state = runner.strategy._require_state()
    if exp.config.strategy_name == "centralized":
        model = runner.sites[POOLED_SITE_ID].evaluation_model(state.for_site(POOLED_SITE_ID))
        return {s.site_id: model for s in exp.sites}
    models = {sid: site.evaluation_model(state.for_site(sid)) for sid, site in runner.sites.items()}
    if exp.held_out is not None:
        models[exp.held_out.site_id] = exp.held_out.evaluation_model(exp.held_out_state(state))
    return models


def _model_factory(model_cfg: ModelConfig, complex_images: bool, seed: int):
    def factory() -> nn.Module:
        # every site starts from the same weights without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(model_cfg, complex_images=complex_images)
    return factory


def _local_steps(cfg: RunConfig, batches_per_epoch: Sequence[int]) -> int:
    if cfg.local_epochs is None:
        return cfg.local_steps
    # one plan for all sites: epochs of the average site (documented in RunConfig)
    return max(1, round(cfg.local_epochs * sum(batches_per_epoch) / len(batches_per_epoch)))


def build_experiment(cfg: RunConfig) -> Experiment:
    """Datasets, loaders, sites and the strategy of ``cfg`` (synthetic sites must have been
    materialized, or are simulated into a temporary folder)."""
    from fedrecon.federated import Site, make_strategy
    from fedrecon.federated.strategies_hypernetwork import global_names_with_roles

    mri = cfg.modality == "mri"
    model_cfg = effective_model_config(cfg)
    factory = _model_factory(model_cfg, mri, cfg.seed)
    device = resolve_device(cfg.device)
    check_synthetic_acquisitions(cfg)
    datasets = {e.name: site_datasets(cfg, e) for e in cfg.sites}
    for i, entry in enumerate(cfg.sites):
        if entry.spec.modality == "mri":
            _check_site_masks(cfg, i, datasets[entry.name])
    for name, ds in datasets.items():
        train = ds["train"]
        shapes = {train.sample_shape(i) for i in range(len(train))} \
            if hasattr(train, "sample_shape") and cfg.batch_size > 1 else ()
        if len(shapes) > 1:
            raise ConfigError(f"{cfg.source or 'config'}: key 'batch_size' ({cfg.batch_size}) "
                              f"needs one k-space shape per site; site {name!r} has train "
                              f"files of shapes {sorted(shapes)} ((coils, H, W), crop): set "
                              f"batch_size = 1")
    train_batches = [math.ceil(len(ds["train"]) / cfg.batch_size) for n, ds in datasets.items()
                     if n != cfg.held_out]
    steps = _local_steps(cfg, train_batches)

    kwargs = {k: v for k, v in cfg.strategy.items() if k != "name"}
    name = cfg.strategy_name
    if name == "centralized":
        strategy_name, kwargs = "fedavg", {}
    else:
        strategy_name = name
    if name == "fedavg" and "local_roles" not in kwargs:
        kwargs["local_roles"] = []  # classical FedAvg shares every parameter
    if name == "hypernetwork" and "local_roles" not in kwargs:
        kwargs["local_roles"] = [Role.DC.value, Role.ESTIMATOR.value]
    try:
        strategy = make_strategy(strategy_name, local_steps=steps, lr=cfg.lr, **kwargs)
        if name == "hypernetwork" and "targets" not in kwargs:
            targets = global_names_with_roles(factory(), strategy.partition, [Role.CONDITIONING])
            strategy = make_strategy(strategy_name, local_steps=steps, lr=cfg.lr,
                                     targets=targets, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cfg.source or 'config'}: [strategy]: {err}") from None
    partition: Partition = strategy.partition
    sites = [Site.from_datasets(
        entry.name, datasets[entry.name], modality=entry.spec.modality,
        batch_size=cfg.batch_size, eval_batch_size=max(cfg.batch_size, 8),
        loader_seed=site_seed(cfg.seed, entry.name), model_factory=factory, partition=partition,
        seed=cfg.seed, device=device, loss=cfg.loss, grad_clip=cfg.grad_clip,
        protocol=entry.spec.acquisition.protocol_vector()) for entry in cfg.sites]
    if cfg.eval_every and any(s.val_loader is None for s in sites):
        missing = [s.site_id for s in sites if s.val_loader is None]
        raise ConfigError(f"{cfg.source or 'config'}: sites {missing} have no val data; the "
                          f"runner evaluates on 'val' every {cfg.eval_every} round(s)")
    held = next((s for s in sites if s.site_id == cfg.held_out), None)
    training = [s for s in sites if s is not held]
    return Experiment(cfg, training, strategy, model_cfg, held)


def prepare_run_dir(out: Path) -> None:
    """Refuse a folder that holds a run; create it otherwise."""
    if (out / "checkpoint.pt").exists() or (out / RUN_CONFIG_NAME).exists():
        raise ConfigError(f"{out} already holds a run: use 'fedrecon resume --run {out}' or "
                          f"another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
