"""The ``Strategy`` interface and FedAvg, the reference implementation.

A strategy is a pure function of its inputs plus its own state: ``configure`` says what
each sampled site does this round (starting GLOBAL tensors and a :class:`TrainingPlan`),
``aggregate`` turns the sites' updates into a new :class:`ServerState` (a consensus and,
for personalizing strategies, one GLOBAL state per site). It works on name-keyed tensors
and never learns whether it runs in-process or on Flower.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedrecon.models import Partition

from .messages import SiteInstructions, SiteUpdate, StateDict, TrainingPlan, weighted_average

__all__ = ["ServerState", "Strategy", "FedAvg", "apply_updates", "example_weights"]


@dataclass
class ServerState:
    """The consensus GLOBAL state and, where a strategy personalizes, one per site."""

    global_state: StateDict
    personalized: dict[str, StateDict] = field(default_factory=dict)

    def for_site(self, site_id: str) -> StateDict:
        return self.personalized.get(site_id, self.global_state)


def example_weights(updates: Sequence[SiteUpdate]) -> list[float]:
    """Aggregation weights: each update's example count (uniform when all counts are 0)."""
    weights = [float(max(u.num_examples, 0)) for u in updates]
    return weights if sum(weights) > 0 else [1.0] * len(updates)


def apply_updates(start: Mapping[str, Tensor], update: SiteUpdate) -> StateDict:
    """The site's new GLOBAL weights, whatever the update's kind."""
    if update.kind == "weights":
        return dict(update.tensors)
    return {k: start[k] + update.tensors[k].to(start[k].dtype) for k in update.tensors}


class Strategy(ABC):
    """Base class: holds the server state and the per-round training plan.

    Subclasses set ``name`` and override :meth:`aggregate` (and :meth:`configure`,
    :meth:`partition_for` where they need to).

    Parameters
    ----------
    local_steps, lr
        The default :class:`TrainingPlan` of every site.
    partition
        Which roles stay local. Default: DC, conditioning and estimators local.
    """

    name: ClassVar[str] = "strategy"
    needs_individual_updates: ClassVar[bool] = False  # True: incompatible with secure aggregation

    def __init__(self, *, local_steps: int = 20, lr: float = 1e-3,
                 partition: Partition | None = None) -> None:
        self.local_steps = local_steps
        self.lr = lr
        self.partition = partition or Partition.default()
        self.state: ServerState | None = None
        self.site_ids: list[str] = []
        self.protocols: dict[str, Tensor] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def initialize(self, global_state: Mapping[str, Tensor], site_ids: Sequence[str],
                   protocols: Mapping[str, Tensor] | None = None) -> None:
        """Start from the initial GLOBAL tensors; ``protocols`` are the sites' public
        protocol vectors (acquisition parameters), used by conditioning strategies."""
        self.state = ServerState({k: v.detach().clone() for k, v in global_state.items()})
        self.site_ids = list(site_ids)
        self.protocols = {k: v.detach().clone() for k, v in (protocols or {}).items()}

    def plan(self, round: int, site_id: str) -> TrainingPlan:
        return TrainingPlan(local_steps=self.local_steps, lr=self.lr)

    def configure(self, round: int, site_ids: Sequence[str]) -> dict[str, SiteInstructions]:
        """Instructions for the sites sampled this round."""
        state = self._require_state()
        return {s: SiteInstructions(round, s, state.for_site(s), self.plan(round, s))
                for s in site_ids}

    @abstractmethod
    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        """New server state from the updates of the sites that answered (``missing``: sampled
        sites that did not)."""

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (override to add server-optimizer moments etc.)."""
        state = self._require_state()
        return {"global_state": state.global_state, "personalized": state.personalized,
                "site_ids": list(self.site_ids), "protocols": self.protocols}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        self.state = ServerState(dict(data["global_state"]), {k: dict(v) for k, v in data["personalized"].items()})
        self.site_ids = list(data["site_ids"])
        self.protocols = dict(data["protocols"])

    def _require_state(self) -> ServerState:
        if self.state is None:
            raise RuntimeError(f"{type(self).__name__}: call initialize() first")
        return self.state

    def _new_weights(self, updates: Sequence[SiteUpdate]) -> list[StateDict]:
        state = self._require_state()
        return [apply_updates(state.for_site(u.site_id), u) for u in updates]

    def clone(self) -> Strategy:
        return copy.deepcopy(self)


class FedAvg(Strategy):
    """Federated averaging, weighted by example count.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017. With the default partition this is also fedrecon's "partial"
    setting (DC layers local, prior global).
    """

    name = "fedavg"

    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        state = self._require_state()
        if not updates:
            return state
        new = weighted_average(self._new_weights(updates), example_weights(updates))
        self.state = ServerState(new, {})
        return self.state


def _check_same_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    if set(a) != set(b):
        raise ValueError(f"state keys differ: {sorted(set(a) ^ set(b))[:5]}")


def zeros_like_state(state: Mapping[str, Tensor]) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in state.items()}
