"""The run config: one TOML file parsed and validated into a :class:`RunConfig`, and written
back (:func:`config_to_toml`). :mod:`fedrecon.experiment` builds the run from it.

A run config::

    seed = 0
    rounds = 10
    local_steps = 20            # or local_epochs (steps = epochs x the site's batches)
    lr = 1e-3
    [strategy]
    name = "partial"            # any of fedrecon.federated.STRATEGIES, or "centralized"
    [model]                     # fedrecon.models.ModelConfig
    [[sites]]
    name = "north"
    modality = "mri"
    train = "data/north/train"  # folders of fastMRI-layout .h5 files (relative to this file)
    val = "data/north/val"
    test = "data/north/test"
    [sites.acquisition]
    mask = "random"             # alias of mask_type
    acceleration = 4
    center_fraction = 0.08

A site may instead be a :class:`~fedrecon.datasets.SiteSpec` table (``[sites.data]`` with
``kind = "synthetic"`` or ``"folder"`` and a ``split``): synthetic sites are simulated into
``data_root/<site>/<split>/`` before training and appear in the run's effective config as
folder sites, so ``evaluate`` and ``resume`` read the very same files.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedrecon.datasets import ConfigError, SiteSpec
from fedrecon.datasets.config import toml_value
from fedrecon.datasets.site_simulation import SPLITS
from fedrecon.models import ModelConfig, Role

__all__ = [
    "RUN_CONFIG_NAME",
    "SPECIAL_STRATEGIES",
    "ConfigError",
    "RunConfig",
    "SiteEntry",
    "config_to_toml",
    "load_config",
    "make_compressor",
    "parse_config",
]

RUN_CONFIG_NAME = "config.toml"  # the effective config, saved in the run folder
SPECIAL_STRATEGIES = ("centralized",)


def _unknown_key(where: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint} (valid: {', '.join(valid)})")


# -- the config ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteEntry:
    """A ``[[sites]]`` table: its spec (name, modality, acquisition, data source) and, for
    folder sites, the folder of each split."""

    spec: SiteSpec
    folders: dict[str, Path] | None = None  # split -> folder; None: spec.data decides

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class RunConfig:
    """A validated run config (see the module docstring).

    Attributes
    ----------
    seed, rounds
        Seed of everything; number of federated rounds.
    local_steps, local_epochs
        Local work per round: optimizer steps, or epochs of the site's training data (one of
        the two; ``local_epochs`` wins when given).
    lr, batch_size, loss, grad_clip
        Each site's Adam learning rate, batch size, loss (l1 | mse | ssim), gradient
        clipping norm (0: no clipping).
    fraction, min_sites, drop_prob, retries, eval_every
        Participation: fraction of sites sampled per round, the minimum that must answer,
        the probability that a sampled site drops (simulation), resampling retries, and the
        evaluation period in rounds.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    coil_maps
        MRI: ``"espirit"`` coil maps estimated from each volume's ACS lines.
    data_root
        Where synthetic sites are written (default: ``<run>/data``).
    held_out
        Leave-one-site-out: this site never trains; it is evaluated every round with the
        consensus prior (or, for the hypernetwork, the prior generated from its protocol)
        and its DC layers at their initial values, the way a new hospital would join.
    strategy, model, privacy, compression
        The ``[strategy]`` table (``name`` and the strategy's keyword arguments), the
        ``[model]`` table (:class:`~fedrecon.models.ModelConfig`), the ``[privacy]`` table
        (:mod:`fedrecon.privacy`) and the ``[compression]`` table (update compression,
        :class:`fedrecon.efficient.CompressionConfig`: method, fraction, error_feedback).
    """

    sites: tuple[SiteEntry, ...]
    seed: int = 0
    rounds: int = 10
    local_steps: int = 20
    local_epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 4
    loss: str = "l1"
    grad_clip: float | None = 1.0
    fraction: float = 1.0
    min_sites: int = 1
    drop_prob: float = 0.0
    retries: int = 0
    eval_every: int = 1
    device: str = "cpu"
    coil_maps: str = "espirit"
    data_root: Path | None = None
    held_out: str | None = None
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "partial"})
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the file it was read from

    @property
    def strategy_name(self) -> str:
        return str(self.strategy["name"])

    @property
    def modality(self) -> str:
        return self.sites[0].spec.modality


_SCALARS: dict[str, tuple[type, ...]] = {
    "seed": (int,), "rounds": (int,), "local_steps": (int,), "local_epochs": (int,),
    "lr": (float, int), "batch_size": (int,), "loss": (str,), "grad_clip": (float, int),
    "fraction": (float, int), "min_sites": (int,), "drop_prob": (float, int), "retries": (int,),
    "eval_every": (int,), "device": (str,), "coil_maps": (str,), "data_root": (str,),
    "held_out": (str,),
}
_TABLES = ("sites", "strategy", "model", "privacy", "compression")


def _check_scalar(key: str, value: Any, where: str) -> Any:
    types = _SCALARS[key]
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{where}: key '{key}' must be {want}; got {value!r}")
    return float(value) if float in types else value


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _parse_site(data: Any, where: str, base: Path) -> SiteEntry:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table ([[sites]]); got {type(data).__name__}")
    raw = dict(data)
    spec_where = where  # SiteSpec.from_dict adds the site's name itself
    if isinstance(raw.get("name"), str):
        where = f"{where} ({raw['name']!r})"
    acq = raw.get("acquisition")
    if isinstance(acq, Mapping) and "mask" in acq:
        acq = dict(acq)
        if "mask_type" in acq:
            raise ConfigError(f"{where}.acquisition: give 'mask' or 'mask_type', not both")
        acq["mask_type"] = acq.pop("mask")
        raw["acquisition"] = acq
    folder_keys = [k for k in SPLITS if k in raw]
    if not folder_keys:
        if isinstance(raw.get("data"), Mapping) and raw["data"].get("path"):
            raw["data"] = dict(raw["data"]) | {"path": str(_resolve(raw["data"]["path"], base))}
        spec = SiteSpec.from_dict(raw, spec_where)
        if spec.data.kind == "folder" and not Path(spec.data.path).is_dir():
            raise ConfigError(f"{where}: data folder {spec.data.path} does not exist")
        return SiteEntry(spec)
    if "data" in raw or "split" in raw:
        raise ConfigError(f"{where}: give either train/val/test folders or a [sites.data] "
                          f"table with a split, not both")
    if "train" not in raw:
        raise ConfigError(f"{where}: folder sites need key 'train'")
    folders: dict[str, Path] = {}
    for key in folder_keys:
        value = raw.pop(key)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be a folder path; got {value!r}")
        folder = _resolve(value, base)
        if not folder.is_dir():
            raise ConfigError(f"{where}: {key} folder {folder} does not exist")
        folders[key] = folder
    raw["data"] = {"kind": "folder", "path": str(folders["train"])}
    return SiteEntry(SiteSpec.from_dict(raw, spec_where), folders)


def parse_config(doc: Mapping[str, Any], *, base: Path | None = None,
                 where: str = "config") -> RunConfig:
    """Validate a config document (the parsed TOML). Relative paths are relative to
    ``base``. Every error is a :class:`ConfigError` naming ``where`` and the key."""
    base = Path.cwd() if base is None else Path(base)
    valid = [*_SCALARS, *_TABLES]
    for key in doc:
        if key not in valid:
            raise _unknown_key(where, key, valid)
    kw: dict[str, Any] = {k: _check_scalar(k, v, where) for k, v in doc.items() if k in _SCALARS}
    if "data_root" in kw:
        kw["data_root"] = _resolve(kw["data_root"], base)
    for key in ("rounds", "local_steps", "batch_size", "min_sites", "eval_every"):
        if key in kw and kw[key] < 1:
            raise ConfigError(f"{where}: key '{key}' must be >= 1; got {kw[key]}")
    if kw.get("local_epochs") is not None and kw["local_epochs"] < 1:
        raise ConfigError(f"{where}: key 'local_epochs' must be >= 1; got {kw['local_epochs']}")
    if kw.get("seed", 0) < 0:
        raise ConfigError(f"{where}: key 'seed' must be >= 0; got {kw['seed']}")
    if kw.get("grad_clip", 1.0) < 0:
        raise ConfigError(f"{where}: key 'grad_clip' must be >= 0 (0: no clipping); "
                          f"got {kw['grad_clip']}")
    if "lr" in kw and not kw["lr"] > 0:
        raise ConfigError(f"{where}: key 'lr' must be > 0; got {kw['lr']}")
    from fedrecon.train.loop import LOSSES

    if kw.get("loss", "l1") not in LOSSES:
        raise ConfigError(f"{where}: key 'loss' must be one of {tuple(LOSSES)}; got {kw['loss']!r}")
    if kw.get("device", "cpu") not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"{where}: key 'device' must be 'cpu', 'cuda' or 'auto'; "
                          f"got {kw['device']!r}")
    if kw.get("coil_maps", "espirit") != "espirit":
        raise ConfigError(f"{where}: key 'coil_maps' must be 'espirit'; got {kw['coil_maps']!r}")

    sites = doc.get("sites")
    if not isinstance(sites, list) or not sites:
        raise ConfigError(f"{where}: needs at least one [[sites]] table")
    entries = tuple(_parse_site(d, f"{where}: sites[{i}]", base) for i, d in enumerate(sites))
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: site names must be unique; repeated: {dup}")
    modalities = {e.spec.modality for e in entries}
    if len(modalities) > 1:
        raise ConfigError(f"{where}: all sites must share one modality (one network serves "
                          f"them); got {sorted(modalities)}")
    held = kw.get("held_out")
    if held is not None:
        if held not in names:
            close = difflib.get_close_matches(held, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: key 'held_out' names no site: {held!r}{hint}")
        if len(entries) < 2:
            raise ConfigError(f"{where}: key 'held_out' needs at least two sites")
    from fedrecon.runners.simulation import RunnerConfig

    runner_keys = ("rounds", "seed", "fraction", "min_sites", "drop_prob", "eval_every", "retries")
    try:  # the runner's own checks, before any folder is written
        RunnerConfig(**{k: kw[k] for k in runner_keys if k in kw} | {"rounds": kw.get("rounds", 10)}
                     ).validate(len(entries) - (held is not None))
    except ValueError as err:
        raise ConfigError(f"{where}: {str(err).replace('argument ', 'key ', 1)}") from None

    strategy = doc.get("strategy", {"name": "partial"})
    if not isinstance(strategy, Mapping) or not isinstance(strategy.get("name"), str):
        raise ConfigError(f"{where}: [strategy] needs key 'name' (a string)")
    strategy = dict(strategy)
    for key in ("local_steps", "lr"):
        if key in strategy:
            raise ConfigError(f"{where}: [strategy] key '{key}' belongs at the top level")
    _check_strategy(strategy, f"{where}: [strategy]")

    model_doc = doc.get("model", {})
    if not isinstance(model_doc, Mapping):
        raise ConfigError(f"{where}: [model] must be a table")
    if isinstance(model_doc.get("pretrained"), str) and model_doc["pretrained"]:
        model_doc = dict(model_doc) | {"pretrained": str(_resolve(model_doc["pretrained"], base))}
    try:
        model = ModelConfig.from_dict(model_doc, where=f"{where}: [model]")
    except ValueError as err:
        raise ConfigError(str(err)) from None

    privacy = doc.get("privacy", {})
    if not isinstance(privacy, Mapping):
        raise ConfigError(f"{where}: [privacy] must be a table")
    if privacy:
        _check_privacy(strategy["name"], dict(privacy), f"{where}: [privacy]")
    compression = doc.get("compression", {})
    if not isinstance(compression, Mapping):
        raise ConfigError(f"{where}: [compression] must be a table")
    if compression:
        if strategy["name"] in SPECIAL_STRATEGIES:
            raise ConfigError(f"{where}: [compression] does not apply to the "
                              f"'{strategy['name']}' baseline")
        make_compressor(dict(compression), f"{where}: [compression]")
    return RunConfig(sites=entries, strategy=strategy, model=model, privacy=dict(privacy),
                     compression=dict(compression), **kw)


def make_compressor(table: Mapping[str, Any], where: str = "[compression]") -> Any:
    from fedrecon.efficient import CompressionConfig, UpdateCompressor

    try:
        return UpdateCompressor(CompressionConfig.from_dict(table, where=where))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_strategy(strategy: dict[str, Any], where: str) -> None:
    from fedrecon.federated import STRATEGIES, make_strategy, strategy_kwargs

    name = strategy["name"]
    if name in SPECIAL_STRATEGIES:
        extra = [k for k in strategy if k != "name"]
        if extra:
            raise ConfigError(f"{where}: strategy '{name}' takes no keys; got {extra}")
        return
    if name not in STRATEGIES:
        raise _unknown_key(f"{where} name", name, [*STRATEGIES, *SPECIAL_STRATEGIES])
    valid = [k for k in strategy_kwargs(STRATEGIES[name]) if k not in ("local_steps", "lr",
                                                                        "partition")]
    valid += ["local_roles"]
    for key in strategy:
        if key != "name" and key not in valid:
            raise _unknown_key(f"{where} (strategy '{name}')", key, ["name", *valid])
    roles = strategy.get("local_roles")
    if roles is not None:
        known = [r.value for r in Role]
        if not isinstance(roles, list) or any(r not in known for r in roles):
            raise ConfigError(f"{where}: key 'local_roles' must be a list of roles from "
                              f"{known}; got {roles!r}")
    types = _strategy_value_types(STRATEGIES[name])
    kwargs = {k: v for k, v in strategy.items() if k != "name"}
    for key, value in kwargs.items():
        want = types.get(key)
        if want is not None and (isinstance(value, bool) != (bool in want)
                                 or not isinstance(value, want)):
            raise ConfigError(f"{where}: key '{key}' of strategy '{name}' must be "
                              f"{' or '.join(t.__name__ for t in want)}; got {value!r}")
    try:  # the strategy's own range checks, before anything is written
        make_strategy(name, local_steps=1, lr=1e-3, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _strategy_value_types(cls: type) -> dict[str, tuple[type, ...]]:
    """``key -> accepted TOML value types`` of a strategy's scalar keyword arguments, read
    from their defaults (or, for a ``None`` default, their annotation)."""
    import inspect

    names = {"bool": (bool,), "int": (int,), "float": (float, int), "str": (str,)}
    out: dict[str, tuple[type, ...]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name in out or p.default is inspect.Parameter.empty:
                continue
            if p.default is not None:
                kind = type(p.default).__name__
            else:  # "int | None" -> int; anything else is left to the strategy
                parts = [t.strip() for t in str(p.annotation).split("|") if t.strip() != "None"]
                kind = parts[0] if len(parts) == 1 else ""
            if kind in names:
                out[p.name] = names[kind]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def _check_privacy(strategy: str, privacy: dict[str, Any], where: str) -> None:
    if strategy in SPECIAL_STRATEGIES:
        raise ConfigError(f"{where}: the '{strategy}' baseline pools the data; privacy "
                          f"options do not apply to it")
    try:
        from fedrecon.privacy import check_privacy_compatibility
    except ImportError:
        raise ConfigError(f"{where}: privacy options need fedrecon.privacy, which this "
                          f"installation lacks") from None
    try:
        check_privacy_compatibility(strategy, privacy)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a run config file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    cfg = parse_config(doc, base=path.resolve().parent, where=str(path))
    return dataclasses.replace(cfg, source=path.resolve())


def config_to_toml(cfg: RunConfig) -> str:
    """The TOML text of ``cfg`` with absolute paths (what ``load_config`` reads back)."""
    lines = [f"# effective config of a fedrecon run (from {cfg.source or 'a dict'})"]
    for key in _SCALARS:
        value = getattr(cfg, key)
        if value is not None:
            lines.append(f"{key} = {toml_value(str(value) if isinstance(value, Path) else value)}")
    lines += ["", "[strategy]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in cfg.strategy.items()]
    lines += ["", "[model]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in dataclasses.asdict(cfg.model).items()]
    if cfg.privacy:
        lines += _toml_table("privacy", cfg.privacy)
    if cfg.compression:
        lines += _toml_table("compression", cfg.compression)
    for entry in cfg.sites:
        d = entry.spec.to_dict()
        lines += ["", "[[sites]]", f"name = {toml_value(entry.name)}",
                  f"modality = {toml_value(entry.spec.modality)}"]
        if entry.folders is not None:
            lines += [f"{k} = {toml_value(str(v))}" for k, v in entry.folders.items()]
        else:
            lines.append(f"split = {toml_value(list(entry.spec.split))}")
            lines.append("[sites.data]")
            lines += [f"{k} = {toml_value(v)}" for k, v in d["data"].items() if v is not None]
        lines.append("[sites.acquisition]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d["acquisition"].items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_table(name: str, table: Mapping[str, Any]) -> list[str]:
    lines = ["", f"[{name}]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    for k, v in table.items():
        if isinstance(v, Mapping):
            lines += _toml_table(f"{name}.{k}", v)
    return lines
