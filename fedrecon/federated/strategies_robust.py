"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, multi-Krum.

Each treats every answering site as one vote (example counts are ignored: a weight is
what a malicious site would inflate) and needs the individual updates, so none of them
works under secure aggregation (``needs_individual_updates``). Integer tensors take the
sites' maximum, as in FedAvg.

- Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018 (coordinate-wise median and trimmed mean).
- Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017 (Krum, multi-Krum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .messages import SiteUpdate, StateDict
from .strategy import ServerState, Strategy

__all__ = ["CoordinateMedian", "MultiKrum", "TrimmedMean", "krum_scores"]


def _combine(states: Sequence[StateDict], reduce: Callable[[Tensor], Tensor]) -> StateDict:
    """``reduce`` over the stacked floating tensors ``(N, ...)``; integers take the max."""
    out: StateDict = {}
    for k, ref in states[0].items():
        stacked = torch.stack([s[k] for s in states])
        if ref.is_floating_point():
            out[k] = reduce(stacked.double()).to(ref.dtype)
        else:
            out[k] = stacked.amax(dim=0)
    return out


class _Robust(Strategy):
    needs_individual_updates = True

    def _reduce(self, stacked: Tensor) -> Tensor:
        raise NotImplementedError

    def _select(self, new: list[StateDict]) -> list[StateDict]:
        return new

    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        state = self._require_state()
        if not updates:
            return state
        new = self._select(self._new_weights(updates))
        self.state = ServerState(_combine(new, self._reduce), {})
        return self.state


class CoordinateMedian(_Robust):
    """Every coordinate is the median of the sites' values (the mean of the two middle ones
    for an even count). Tolerates fewer than half of the sites being malicious."""

    name = "median"

    def _reduce(self, stacked: Tensor) -> Tensor:
        s = stacked.sort(dim=0).values
        n = s.shape[0]
        return 0.5 * (s[(n - 1) // 2] + s[n // 2])


class TrimmedMean(_Robust):
    """Every coordinate drops its ``floor(trim_fraction * n)`` largest and smallest values
    and averages the rest.

    Parameters
    ----------
    trim_fraction
        In ``[0, 0.5)``; at least the number of malicious sites over ``n``.
    """

    name = "trimmed_mean"

    def __init__(self, *, trim_fraction: float = 0.2, **base: Any) -> None:
        super().__init__(**base)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"argument 'trim_fraction' must lie in [0, 0.5); got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def _reduce(self, stacked: Tensor) -> Tensor:
        n = stacked.shape[0]
        k = math.floor(self.trim_fraction * n)
        if n - 2 * k < 1:
            k = (n - 1) // 2
        return stacked.sort(dim=0).values[k:n - k].mean(dim=0)


def krum_scores(vectors: Tensor, byzantine: int) -> Tensor:
    """Krum score of each row of ``(N, D)``: the sum of squared distances to its
    ``N - byzantine - 2`` nearest other rows (at least 1)."""
    n = vectors.shape[0]
    d = torch.cdist(vectors, vectors).square()
    d.fill_diagonal_(float("inf"))
    k = min(max(n - byzantine - 2, 1), n - 1)
    return d.topk(k, dim=1, largest=False).values.sum(dim=1)


class MultiKrum(_Robust):
    """Average of the ``select`` sites with the lowest Krum scores.

    Parameters
    ----------
    byzantine
        ``f``, the number of malicious sites tolerated (Krum's guarantee needs
        ``n > 2f + 2``; with fewer sites the neighbourhood shrinks to 1 and the rule is a
        heuristic).
    select
        ``m``: sites averaged (default ``n - f``; ``1`` is plain Krum).
    """

    name = "multi_krum"

    def __init__(self, *, byzantine: int = 1, select: int | None = None, **base: Any) -> None:
        super().__init__(**base)
        if byzantine < 0:
            raise ValueError(f"argument 'byzantine' must be >= 0; got {byzantine}")
        if select is not None and select < 1:
            raise ValueError(f"argument 'select' must be >= 1; got {select}")
        self.byzantine = byzantine
        self.select = select
        self.last_selected: list[int] = []

    def _select(self, new: list[StateDict]) -> list[StateDict]:
        n = len(new)
        if n <= 2:
            self.last_selected = list(range(n))
            return new
        keys = [k for k, v in new[0].items() if v.is_floating_point()]
        vectors = torch.stack([torch.cat([s[k].reshape(-1).double() for k in keys]) for s in new])
        m = min(n, self.select if self.select is not None else max(n - self.byzantine, 1))
        # stable: equal scores go to the earlier site, whatever the sort's internals
        order = krum_scores(vectors, self.byzantine).argsort(stable=True)[:m]
        self.last_selected = sorted(int(i) for i in order)
        return [new[i] for i in self.last_selected]

    def _reduce(self, stacked: Tensor) -> Tensor:
        return stacked.mean(dim=0)
