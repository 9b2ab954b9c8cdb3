"""What travels between a site and the server, and the one place that enforces the Partition.

A :class:`SiteUpdate` may carry only tensors whose role the site's :class:`Partition`
marks GLOBAL. :func:`make_update` is the only constructor the sites use, and it refuses
anything else; :func:`check_update` is what the server-side code runs on receipt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedrecon.models import Partition, Scope

__all__ = [
    "PartitionViolation",
    "SiteInstructions",
    "SiteUpdate",
    "StateDict",
    "TrainingPlan",
    "check_update",
    "make_update",
    "state_nbytes",
    "weighted_average",
]

StateDict = dict[str, Tensor]


class PartitionViolation(ValueError):
    """A message would carry a tensor that must stay at the site."""


@dataclass(frozen=True)
class TrainingPlan:
    """What a site does in one round (decided by the strategy's ``configure``).

    Attributes
    ----------
    local_steps
        Optimizer steps on the site's data (all trainable parameters).
    lr
        Learning rate of the site's Adam optimizer (fresh every round).
    prox_mu
        FedProx: adds ``mu/2 ||w - w_round_start||^2`` over the GLOBAL parameters.
    personal_lambda
        Ditto: also train a personal model (kept LOCAL) with ``lambda/2 ||v - w||^2`` to the
        received global model, on the same seed and batches as the round's global steps; the
        site evaluates with its personal model. ``None``: no personal model.
    mixture
        Evaluate with a mixture of experts, ``alpha * personal(y) + (1 - alpha) * global(y)``,
        ``alpha`` fitted per site on its validation split (needs ``personal_lambda``).
    local_first_steps
        FedRep: steps on the LOCAL parameters only (GLOBAL frozen) before ``local_steps``.
    train_global
        ``False`` freezes the GLOBAL parameters during ``local_steps`` (e.g. local-only heads).
    train_local
        ``False`` freezes the LOCAL parameters during ``local_steps`` (FedRep's second phase
        updates only the shared representation).
    send
        ``"weights"`` (the new GLOBAL tensors) or ``"delta"`` (new minus received).
    """

    local_steps: int
    lr: float = 1e-3
    prox_mu: float = 0.0
    personal_lambda: float | None = None
    mixture: bool = False
    local_first_steps: int = 0
    train_global: bool = True
    train_local: bool = True
    send: str = "weights"

    def __post_init__(self) -> None:
        if self.local_steps < 0 or self.local_first_steps < 0:
            raise ValueError("TrainingPlan: 'local_steps' and 'local_first_steps' must be >= 0")
        if not (self.train_global or self.train_local) and self.local_steps:
            raise ValueError("TrainingPlan: 'local_steps' > 0 with nothing trainable")
        if self.send not in ("weights", "delta"):
            raise ValueError(f"TrainingPlan: 'send' must be 'weights' or 'delta'; got {self.send!r}")
        if self.prox_mu < 0 or (self.personal_lambda is not None and self.personal_lambda < 0):
            raise ValueError("TrainingPlan: 'prox_mu' and 'personal_lambda' must be >= 0")
        if self.mixture and self.personal_lambda is None:
            raise ValueError("TrainingPlan: 'mixture' needs a personal model ('personal_lambda')")


@dataclass(frozen=True)
class SiteInstructions:
    """Server -> site: the GLOBAL tensors to start from (personalized where the strategy
    personalizes) and the training plan."""

    round: int
    site_id: str
    global_state: StateDict
    plan: TrainingPlan


@dataclass(frozen=True)
class SiteUpdate:
    """Site -> server. ``tensors`` holds GLOBAL tensors only (weights or deltas, see ``kind``)."""

    site_id: str
    round: int
    tensors: StateDict
    kind: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.tensors)


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def make_update(model: nn.Module, partition: Partition, *, site_id: str, round: int,
                start: Mapping[str, Tensor], kind: str, num_examples: int,
                metrics: Mapping[str, float] | None = None) -> SiteUpdate:
    """Build the site's update from ``model``: exactly its GLOBAL tensors, detached on CPU.

    ``start`` is what the site received this round (needed for ``kind="delta"``).
    """
    names = partition.names(model, Scope.GLOBAL)
    state = model.state_dict()
    tensors: StateDict = {}
    for name in names:
        value = state[name].detach().to("cpu", copy=True)
        if kind == "delta":
            if name not in start:
                raise PartitionViolation(f"site '{site_id}': no received value for '{name}' to "
                                         f"compute a delta")
            value = value - start[name].to("cpu")
        tensors[name] = value
    update = SiteUpdate(site_id, round, tensors, kind, int(num_examples), dict(metrics or {}))
    check_update(update, names)
    return update


def check_update(update: SiteUpdate, allowed: Sequence[str],
                 shapes: Mapping[str, torch.Size] | None = None) -> None:
    """Refuse an update with a key outside ``allowed`` (the GLOBAL names), a missing key, a
    wrong shape or a non-finite value. Raises :class:`PartitionViolation` / ``ValueError``."""
    allowed_set = set(allowed)
    extra = sorted(set(update.tensors) - allowed_set)
    if extra:
        raise PartitionViolation(f"update from site '{update.site_id}' carries non-GLOBAL "
                                 f"tensors: {extra[:5]}")
    missing = sorted(allowed_set - set(update.tensors))
    if missing:
        raise ValueError(f"update from site '{update.site_id}' lacks GLOBAL tensors: {missing[:5]}")
    if update.kind not in ("weights", "delta"):
        raise ValueError(f"update from site '{update.site_id}': kind must be 'weights' or 'delta'")
    if update.num_examples < 0:
        raise ValueError(f"update from site '{update.site_id}': negative example count")
    for name, t in update.tensors.items():
        if shapes is not None and name in shapes and t.shape != shapes[name]:
            raise ValueError(f"update from site '{update.site_id}': '{name}' has shape "
                             f"{tuple(t.shape)}, expected {tuple(shapes[name])}")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"update from site '{update.site_id}': '{name}' has NaN/Inf")


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """``sum_i w_i s_i / sum_i w_i`` key by key (float64 accumulation; integer buffers such as
    BatchNorm's ``num_batches_tracked`` take the maximum)."""
    if not states:
        raise ValueError("weighted_average: no states")
    if len(states) != len(weights):
        raise ValueError("weighted_average: one weight per state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weighted_average: weights must sum to > 0; got {list(weights)}")
    keys = list(states[0])
    for s in states[1:]:
        if s.keys() != states[0].keys():  # as sets: the order of a received dict is not part of it
            raise ValueError(f"weighted_average: states have different keys: "
                             f"{sorted(set(s) ^ set(keys))[:5]}")
    out: StateDict = {}
    for k in keys:
        ref = states[0][k]
        if not (ref.is_floating_point() or ref.is_complex()):
            out[k] = torch.stack([s[k] for s in states]).amax(dim=0)
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64 if not ref.is_complex() else torch.complex128)
        for s, w in zip(states, weights):
            acc += (w / total) * s[k].to(acc.dtype)
        out[k] = acc.to(ref.dtype)
    return out
