"""One site's own configuration file, and the :class:`~fedrecon.federated.Site` built from it.

A hospital that joins a federation writes one TOML file on its own machine: where its data
is and how it acquires (a ``[[sites]]`` table, :class:`~fedrecon.datasets.SiteSpec`), and how
it runs (a ``[site]`` table, :class:`SiteRuntime`: seed, the folder of its LOCAL state,
batch sizes, device). Nothing in this file is sent anywhere. The model architecture is not
here: it is the federation's (the run's ``[model]`` settings), so every site builds the
same network. Flower's ClientApp and the embedded runner build sites with the same
:func:`build_site`, so both run the very same site code on the very same data.

Example::

    [site]
    seed = 0
    state_dir = "/srv/fedrecon/state"    # LOCAL tensors (DC layers, personal models)

    [[sites]]
    name = "hospital_a"
    modality = "ct"
    split = [0.8, 0.2, 0.0]
    [sites.data]
    kind = "folder"
    path = "/srv/fedrecon/ct_volumes"
    [sites.acquisition]
    geometry = "fan"
    n_views = 120
    ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomllib
import torch
from torch import nn

from fedrecon.datasets import SiteSpec, simulate_sites
from fedrecon.datasets.config import ConfigError, dataclass_from_dict, dataclass_to_dict, toml_value
from fedrecon.datasets.sites import site_specs_to_toml
from fedrecon.federated import DiskStore, LocalStore, Site
from fedrecon.models import ModelConfig, Partition, build_model

__all__ = ["SiteConfig", "SiteRuntime", "build_site", "load_site_config", "model_factory",
           "site_config_to_toml"]


@dataclass(frozen=True)
class SiteRuntime:
    """How a site runs (the ``[site]`` table).

    Attributes
    ----------
    state_dir : str
        Folder of the site's LOCAL state (one file per site, atomic writes) and of its
        training loader's RNG state, so a restarted site continues where it stopped.
    seed : int
        The site's seed: data splits and masks, and :func:`~fedrecon.federated.site_seed`
        per round. Must equal the run's seed for runs to be comparable across runners.
    data_root : str, optional
        Where synthetic volumes are written (default ``<state_dir>/data``).
    batch_size, eval_batch_size : int
        Training and evaluation batch sizes.
    device : str
        Torch device of the site's training.
    loss : str
        Training loss of :func:`fedrecon.train.train_local`.
    torch_threads : int
        ``torch.set_num_threads`` in the site's worker processes (0: torch's default).
    """

    state_dir: str
    seed: int = 0
    data_root: str | None = None
    batch_size: int = 1
    eval_batch_size: int = 2
    device: str = "cpu"
    loss: str = "l1"
    torch_threads: int = 0

    def __post_init__(self) -> None:
        if not self.state_dir:
            raise ConfigError("[site]: 'state_dir' must be a non-empty path")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.torch_threads < 0:
            raise ConfigError(f"[site]: need batch_size, eval_batch_size >= 1 and "
                              f"torch_threads >= 0; got {self.batch_size}, "
                              f"{self.eval_batch_size}, {self.torch_threads}")


@dataclass(frozen=True)
class SiteConfig:
    """A site's configuration file: its spec (data, acquisition) and its runtime."""

    spec: SiteSpec
    runtime: SiteRuntime

    @property
    def name(self) -> str:
        return self.spec.name


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site configuration file: one ``[[sites]]`` table and a ``[site]`` table.
    Errors name the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: site configuration file not found") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(doc) - {"site", "sites"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown} (valid: 'site', "
                          f"'sites')")
    sites = doc.get("sites")
    if not isinstance(sites, list) or len(sites) != 1:
        raise ConfigError(f"{path}: needs exactly one [[sites]] table (this site); got "
                          f"{len(sites) if isinstance(sites, list) else 0}")
    if "site" not in doc:
        raise ConfigError(f"{path}: missing the [site] table (state_dir, seed, ...)")
    spec = SiteSpec.from_dict(sites[0], f"{path}: sites[0]")
    runtime = dataclass_from_dict(SiteRuntime, doc["site"], f"{path}: [site]")
    return SiteConfig(spec, runtime)


def site_config_to_toml(config: SiteConfig) -> str:
    """The TOML text of ``config`` (read back by :func:`load_site_config`)."""
    lines = ["[site]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in dataclass_to_dict(config.runtime).items()
              if v is not None]
    return "\n".join(lines) + "\n\n" + site_specs_to_toml([config.spec])


def model_factory(model: ModelConfig, *, complex_images: bool,
                  init_seed: int) -> Callable[[], nn.Module]:
    """A factory of identical fresh models: every site and the server build the same initial
    weights, without touching the global RNG that ``Site.fit`` seeds per site and round."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return build_model(model, complex_images=complex_images)

    return build


def build_site(config: SiteConfig, model: ModelConfig, *, init_seed: int = 0,
               partition: Partition | None = None, store: LocalStore | None = None) -> Site:
    """The :class:`~fedrecon.federated.Site` of ``config``, built like the embedded runner's
    (:meth:`Site.from_datasets`): datasets split by volume, ESPIRiT coil maps for multicoil
    MRI, a shuffled training loader with its own generator, and its LOCAL state in a
    :class:`~fedrecon.federated.DiskStore` under ``state_dir`` unless ``store`` is given."""
    spec, rt = config.spec, config.runtime
    root = Path(rt.data_root) if rt.data_root else Path(rt.state_dir) / "data"
    data = simulate_sites([spec], rt.seed, root=root,
                          coil_maps="espirit" if spec.modality == "mri" else None)[spec.name]
    return Site.from_datasets(
        spec.name, {"train": data.train, "val": data.val, "test": data.test},
        modality=spec.modality, batch_size=rt.batch_size, eval_batch_size=rt.eval_batch_size,
        loader_seed=rt.seed,
        model_factory=model_factory(model, complex_images=spec.modality == "mri",
                                    init_seed=init_seed),
        partition=partition, store=store if store is not None else DiskStore(
            Path(rt.state_dir) / "local"),
        device=rt.device, loss=rt.loss, seed=rt.seed, protocol=data.protocol)


def with_runtime(config: SiteConfig, **changes) -> SiteConfig:
    """``config`` with some :class:`SiteRuntime` fields replaced."""
    return SiteConfig(config.spec, dataclasses.replace(config.runtime, **changes))
