"""Flower messages of a fedrecon run: the run configuration (``[tool.flwr.app.config]``) and
the conversion of name-keyed tensors and training plans to and from Flower records."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedrecon.federated import (
    Strategy,
    TrainingPlan,
    make_strategy,
)
from fedrecon.models import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
NODE_CONFIG_KEY = "site-config"  # --node-config 'site-config="/path/site.toml"'
_POLL_S = 0.2                    # how often the server pulls replies
_LIVENESS_S = 2.0                # how often it checks that waited-for nodes are online
_TTL_SLACK_S = 5.0               # a train/evaluate message lives round-timeout + this


# -- the run's configuration ([tool.flwr.app.config], overridable with flwr run -c) --------
@dataclass(frozen=True)
class FlowerRunConfig:
    """The run configuration, parsed strictly from Flower's flat ``run_config``.

    Top-level keys use dashes (``num-server-rounds``); ``strategy.*`` keys go to
    :func:`~fedrecon.federated.make_strategy` (``strategy.name`` picks it), ``model.*``
    to :class:`~fedrecon.models.ModelConfig`, ``secagg.*`` to the SecAgg+ workflow.
    """

    run_dir: str = ""
    num_server_rounds: int = 2
    modality: str = "ct"
    seed: int = 0
    fraction: float = 1.0
    min_sites: int = 1
    expected_sites: int = 0
    eval_every: int = 1
    eval_split: str = "val"
    round_timeout: float = 600.0
    connect_timeout: float = 300.0
    resume: bool = False
    secure_aggregation: bool = False
    strategy_name: str = "fedavg"
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    secagg_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FlowerRunConfig:
        plain = {f.name: f for f in dataclasses.fields(cls)
                 if f.name not in ("strategy_name", "strategy_kwargs", "model", "secagg_kwargs")}
        kw: dict[str, Any] = {}
        strategy: dict[str, Any] = {}
        model: dict[str, Any] = {}
        secagg: dict[str, Any] = {}
        for key, value in config.items():
            head, _, rest = key.partition(".")
            if rest and head in ("strategy", "model", "secagg"):
                {"strategy": strategy, "model": model, "secagg": secagg}[head][
                    rest.replace("-", "_")] = value
                continue
            name = key.replace("-", "_")
            if name not in plain:
                raise ValueError(f"run config: unknown key '{key}' (valid: "
                                 f"{', '.join(n.replace('_', '-') for n in plain)}, "
                                 f"strategy.*, model.*, secagg.*)")
            want = type(plain[name].default)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"run config: key '{key}' must be {want.__name__}; "
                                 f"got {value!r}")
            kw[name] = value
        name = strategy.pop("name", "fedavg")
        cfg = cls(**kw, strategy_name=name, strategy_kwargs=strategy,
                  model=ModelConfig.from_dict(model, "run config model.*"),
                  secagg_kwargs=secagg)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.modality not in ("ct", "mri"):
            raise ValueError(f"run config: 'modality' must be 'ct' or 'mri'; got "
                             f"{self.modality!r}")
        for key, value, low in (("num-server-rounds", self.num_server_rounds, 0),
                                ("min-sites", self.min_sites, 1),
                                ("expected-sites", self.expected_sites, 0),
                                ("eval-every", self.eval_every, 1)):
            if value < low:
                raise ValueError(f"run config: '{key}' must be >= {low}; got {value}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"run config: 'fraction' must lie in (0, 1]; got {self.fraction}")
        if self.eval_split not in ("train", "val", "test"):
            raise ValueError(f"run config: 'eval-split' must be 'train', 'val' or 'test'; got "
                             f"{self.eval_split!r}")
        for key, value in (("round-timeout", self.round_timeout),
                           ("connect-timeout", self.connect_timeout)):
            if not (value > 0 and math.isfinite(value)):  # nan: no wait at all; inf: no ttl
                raise ValueError(f"run config: '{key}' must be a finite number of seconds > 0; "
                                 f"got {value}")

    def build_strategy(self) -> Strategy:
        return make_strategy(self.strategy_name, **self.strategy_kwargs)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = dataclasses.asdict(self.model)
        return out


# -- records <-> name-keyed tensors ------------------------------------------------------------
def state_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Name-keyed tensors as an ``ArrayRecord`` (CPU copies, names kept)."""
    return ArrayRecord({k: _array(v) for k, v in state.items()})


_BFLOAT16 = "bfloat16"  # numpy has no bfloat16: its bits travel as uint16 under this dtype


def _array(t: torch.Tensor) -> Any:
    import io

    from flwr.app import Array

    # resolve_conj/resolve_neg: a conjugate or negative view has no numpy() of its own
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    if t.dtype != torch.bfloat16:
        return Array(t.numpy())
    buf = io.BytesIO()
    np.save(buf, t.view(torch.int16).numpy().view(np.uint16), allow_pickle=False)
    return Array(dtype=_BFLOAT16, shape=tuple(t.shape), stype="numpy.ndarray",
                 data=buf.getvalue())


def _tensor(a: Any) -> torch.Tensor:
    data = np.array(a.numpy(), copy=True)
    if a.dtype == _BFLOAT16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` back to name-keyed tensors (writable copies)."""
    return {k: _tensor(v) for k, v in record.items()}


def _plan_to_config(round: int, site_id: str, plan: TrainingPlan,
                    run_key: str = "") -> ConfigRecord:
    """A site's plan of one round; ``run-key`` names the run (kept across a resume), so a
    site can tell a repeated round of the same run from a round of another run."""
    values = {k: v for k, v in dataclasses.asdict(plan).items() if v is not None}
    return ConfigRecord({"round": round, "site-id": site_id, "run-key": run_key, **values})


def _plan_from_config(config: Mapping[str, Any]) -> TrainingPlan:
    fields = {f.name for f in dataclasses.fields(TrainingPlan)}
    return TrainingPlan(**{k: v for k, v in config.items() if k in fields})


def _record_keys(content: RecordDict) -> dict[str, list[str]]:
    return {name: sorted(record.keys()) for name, record in content.items()}


