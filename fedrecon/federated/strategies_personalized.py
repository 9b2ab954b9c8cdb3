"""Server-side personalization without a model: local training and similarity-weighted
aggregation. Both keep one GLOBAL state per site in ``ServerState.personalized``; a site
that was sampled but did not answer (``missing``), or was not sampled, keeps its own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .messages import SiteUpdate, weighted_average
from .strategy import ServerState, Strategy, example_weights

__all__ = ["LocalOnly", "SimilarityWeighted", "similarity_weights"]


class LocalOnly(Strategy):
    """No aggregation: every site trains alone (the baseline every federated result is
    compared with). A site's personalized state is its own latest GLOBAL tensors; the
    consensus ``global_state`` stays the initial one.

    The comparison baseline of the personalization literature, e.g. Li et al., "Ditto: Fair
    and Robust Federated Learning Through Personalization", ICML 2021 (its "local" rows).
    """

    name = "local"
    needs_individual_updates = True

    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        state = self._require_state()
        if not updates:
            return state
        personalized = dict(state.personalized)
        for u, w in zip(updates, self._new_weights(updates)):
            personalized[u.site_id] = w
        self.state = ServerState(state.global_state, personalized)
        return self.state


def check_number(name: str, value: Any, *, low: float, strict: bool = False,
                 integer: bool = False) -> None:
    """Refuse a ``value`` of argument ``name`` that is not a finite number ``>= low`` (``> low``
    when ``strict``; an int when ``integer``): NaN passes every ``<``/``<=`` test and would
    only show up rounds later as NaN states or a non-finite training loss."""
    kind = numbers.Integral if integer else numbers.Real
    ok = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        what = "an int" if integer else "a finite number"
        raise ValueError(f"argument '{name}' must be {what} {'>' if strict else '>='} {low:g}; "
                         f"got {value!r}")


def _flat(state: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])


def similarity_weights(vectors: Tensor, *, metric: str, temperature: float) -> Tensor:
    """Row-stochastic ``(N, N)`` mixing weights from ``(N, D)`` vectors.

    ``"distance"``: ``softmax_j(-d_ij / (T * mean_{k != l} d_kl))`` with ``d`` the squared
    Euclidean distance (normalized, so ``T`` does not depend on the model's size);
    ``"cosine"``: ``softmax_j(cos_ij / T)``.
    """
    check_number("temperature", temperature, low=0, strict=True)
    n = vectors.shape[0]
    if metric == "distance":
        d = torch.cdist(vectors, vectors).square()
        off = d[~torch.eye(n, dtype=torch.bool)]
        scale = off.mean() if off.numel() and float(off.mean()) > 0 else torch.tensor(1.0, dtype=d.dtype)
        logits = -d / (temperature * scale)
    elif metric == "cosine":
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
        logits = unit @ unit.T / temperature
    else:
        raise ValueError(f"argument 'metric' must be 'distance' or 'cosine'; got {metric!r}")
    return torch.softmax(logits, dim=1)


class SimilarityWeighted(Strategy):
    """Each site gets its own aggregate of the sites' new weights, weighted by how similar
    their models (``metric="distance"``, FedAMP-style attention on model distance) or their
    round updates (``metric="cosine"``, FedFomo-style affinity of update directions) are.

    Huang et al., "Personalized Cross-Silo Federated Learning on Non-IID Data" (FedAMP),
    AAAI 2021; Zhang et al., "Personalized Federated Learning with First Order Model
    Optimization" (FedFomo), ICLR 2021.

    Site ``i`` that answered gets ``sum_j a_ij w_j`` over the sites ``j`` that answered this
    round (``a`` from :func:`similarity_weights`, self included); the consensus
    ``global_state`` (for sites that never answered) is the example-weighted FedAvg.

    Parameters
    ----------
    metric
        ``"distance"`` (between new weights) or ``"cosine"`` (between updates).
    temperature
        Softmax temperature; lower concentrates each site's aggregate on its nearest peers.
        ``cosine`` similarities lie in [-1, 1], so ``temperature=0.1`` is a sensible start.
    """

    name = "similarity"
    needs_individual_updates = True

    def __init__(self, *, metric: str = "distance", temperature: float = 1.0, **base: Any) -> None:
        super().__init__(**base)
        if metric not in ("distance", "cosine"):
            raise ValueError(f"argument 'metric' must be 'distance' or 'cosine'; got {metric!r}")
        check_number("temperature", temperature, low=0, strict=True)
        self.metric = metric
        self.temperature = temperature
        self.last_weights: dict[str, dict[str, float]] = {}  # for logging: site -> peer -> a_ij

    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        state = self._require_state()
        if not updates:
            return state
        new = self._new_weights(updates)
        keys = [k for k, v in new[0].items() if v.is_floating_point()]
        if self.metric == "distance":
            vectors = torch.stack([_flat(w, keys) for w in new])
        else:
            vectors = torch.stack([_flat(w, keys) - _flat(state.for_site(u.site_id), keys)
                                   for u, w in zip(updates, new)])
        a = similarity_weights(vectors, metric=self.metric, temperature=self.temperature)
        personalized = dict(state.personalized)
        ids = [u.site_id for u in updates]
        self.last_weights = {}
        for i, site in enumerate(ids):
            row = [float(x) for x in a[i]]
            personalized[site] = weighted_average(new, row)
            self.last_weights[site] = dict(zip(ids, row))
        consensus = weighted_average(new, example_weights(updates))
        self.state = ServerState(consensus, personalized)
        return self.state
