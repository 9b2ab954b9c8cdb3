"""The privacy pipeline that :class:`~fedrecon.runners.SimulationRunner` runs when given
``privacy=UpdatePipeline(cfg)``.

Site side (:meth:`UpdatePipeline.at_site`, right after ``Site.fit``): the update becomes a
change of the GLOBAL tensors; with DP it is clipped to ``C`` and, with distributed noise,
noised. Server side (:meth:`UpdatePipeline.aggregate`): validation (reject and log, the
round goes on), then either the strategy gets the accepted individual updates (validation
only) or one aggregate -- the (weighted) sum of the updates over their total weight, formed
by secure aggregation when enabled (the server code path then holds only masked vectors
and the unmasked sum) and noised centrally under central DP -- passed to
``strategy.aggregate`` as a single ``kind="delta"`` update. Without DP the sites weight
their update by their example count before masking and the total weight rides along as
one more masked coordinate, so the server learns the total but no site's count; with DP
every site weighs 1 (a weight would scale the sensitivity).

In this in-process simulation the boundary between a site and the server is the object
boundary: :class:`~.secagg.SecAggClient` objects hold the plain vectors,
:class:`~.secagg.SecAggServer` receives messages only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedrecon.federated import ServerState, SiteUpdate, StateDict, Strategy, check_update
from fedrecon.federated.strategy import example_weights

from .config import PrivacyConfig, PrivacyConfigError
from .dp import PrivacyAccountant, clip_update
from .secagg import SecureSum, secure_sum
from .validation import ValidationConfig, update_delta, validate_updates

__all__ = ["AGGREGATE_ID", "PipelineResult", "UpdatePipeline"]

log = logging.getLogger(__name__)

#: ``site_id`` of the single update a strategy gets on the aggregate path.
AGGREGATE_ID = "<aggregate>"


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


@dataclass
class PipelineResult:
    """What the runner records from one round."""

    state: ServerState
    rejected: dict[str, str] = field(default_factory=dict)
    epsilon: float | None = None
    bytes_sent: dict[str, int] = field(default_factory=dict)  # per site, on the wire
    secure_sum: SecureSum | None = None


class UpdatePipeline:
    """Site-side transforms and the server's aggregation path for one run.

    Parameters
    ----------
    config
        A :class:`PrivacyConfig` or its TOML table.
    seed
        Seeds the DP noise (per site and round, so a resumed run draws the same noise).
        A deployment would draw it from the OS CSPRNG; seeded noise is for simulation.
    on_secure_sum
        Called with every round's :class:`~.secagg.SecureSum` (the server's view), for audits.
    """

    def __init__(self, config: PrivacyConfig | Mapping[str, Any], *, seed: int = 0,
                 on_secure_sum: Callable[[SecureSum], None] | None = None) -> None:
        self.config = config if isinstance(config, PrivacyConfig) else PrivacyConfig.from_dict(config)
        self.seed = seed
        self.on_secure_sum = on_secure_sum
        dp = self.config.dp
        self.clip_norm = dp.clip_norm if dp is not None else math.inf
        self.accountant = PrivacyAccountant(dp.delta) if dp is not None else None
        self._clip_bits: dict[str, float] = {}
        self._n_sampled = 0

    @property
    def masks_updates(self) -> bool:
        return self.config.secure_aggregation is not None

    def check_strategy(self, strategy: Strategy) -> None:
        if self.config.aggregates_sums and strategy.needs_individual_updates:
            raise PrivacyConfigError(
                f"strategy '{strategy.name}' needs each site's individual update, but [privacy] "
                f"secure aggregation / DP give the server only the aggregate")

    # -- site side --------------------------------------------------------------------------
    def at_site(self, round: int, update: SiteUpdate, start: Mapping[str, Tensor], *,
                n_sampled: int) -> SiteUpdate:
        """The update as it leaves the site (before masking): a delta, clipped and noised."""
        self._n_sampled = n_sampled
        if not self.config.aggregates_sums:
            return update
        try:
            delta = update_delta(update, start)
        except KeyError:
            return update  # wrong keys: the server's check rejects it
        dp = self.config.dp
        if dp is not None and all(bool(torch.isfinite(t).all()) for t in delta.values()
                                  if t.is_floating_point()):
            delta, norm = clip_update(delta, self.clip_norm)
            bit = float(norm <= self.clip_norm)
            if dp.noise == "distributed":
                g = torch.Generator().manual_seed(_seed(self.seed, "dp", update.site_id, round))
                std = dp.update_noise_multiplier * self.clip_norm / math.sqrt(n_sampled)
                delta = {k: (v + std * torch.randn(v.shape, generator=g, dtype=torch.float64)
                             .to(v.dtype) if v.is_floating_point() else v)
                         for k, v in delta.items()}
                if dp.adaptive_clip:
                    bit += dp.count_noise_multiplier / math.sqrt(n_sampled) * float(
                        torch.randn((), generator=g, dtype=torch.float64))
            self._clip_bits[update.site_id] = bit
        return SiteUpdate(update.site_id, update.round, delta, "delta", update.num_examples,
                          dict(update.metrics))

    # -- server side ------------------------------------------------------------------------
    def aggregate(self, round: int, strategy: Strategy, updates: Sequence[SiteUpdate], *,
                  missing: Sequence[str], names: Sequence[str],
                  shapes: Mapping[str, torch.Size]) -> PipelineResult:
        self.check_strategy(strategy)
        server = strategy._require_state()
        val = self.config.validation
        if val is None and not self.masks_updates:
            for u in updates:  # the runner's default gate: a bad update stops the run
                check_update(u, names, shapes)
            accepted, rejected = list(updates), {}
        else:
            # under secure aggregation the sites run the structural checks before masking
            rule = val if val is not None else ValidationConfig(norm_rule=False)
            accepted, rejected = validate_updates(updates, names, shapes, server.for_site, rule)
        for sid, reason in rejected.items():
            log.warning("round %d: update of site '%s' rejected: %s", round, sid, reason)
        skipped = list(missing) + sorted(rejected)
        if not self.config.aggregates_sums:
            return PipelineResult(strategy.aggregate(round, accepted, missing=skipped), rejected,
                                  bytes_sent={u.site_id: u.nbytes for u in accepted})
        if not accepted:
            return PipelineResult(strategy.aggregate(round, [], missing=skipped), rejected,
                                  self._epsilon())
        start = server.global_state
        dp = self.config.dp
        weights = [1.0] * len(accepted) if dp is not None else example_weights(accepted)
        vectors = {}
        for u, w in zip(accepted, weights):
            delta = update_delta(u, start)
            flat = torch.cat([delta[k].reshape(-1).double() for k in names]).numpy()
            extra = [w, self._clip_bits.pop(u.site_id, 0.0)]
            vectors[u.site_id] = np.concatenate([w * flat, extra])
        result = PipelineResult(server, rejected)
        if self.masks_updates:
            # each site checks its vector before masking: a value beyond the fixed-point range
            # would be clipped inside the secure sum and the mean silently wrong
            limit = self.config.secure_aggregation.clip_range
            for sid, v in vectors.items():
                peak = float(np.abs(v).max(initial=0.0))
                if not peak <= limit:
                    raise ValueError(
                        f"round {round}: site '{sid}' would send a value of {peak:.6g} (its "
                        f"update times its example count, or the count itself) beyond secure "
                        f"aggregation's clip_range {limit:g}, which the secure sum would clip; "
                        f"raise 'clip_range' in the secure_aggregation settings")
            # a site dropped by the runner shared its keys and then vanished mid-round
            dims = next(iter(vectors.values())).size
            everyone = dict(vectors) | {s: np.zeros(dims) for s in missing}
            res = secure_sum(everyone, round=round, config=self.config.secure_aggregation,
                             drop_after_sharing=list(missing))
            if res.clipped:
                log.warning("round %d: %d values beyond secure aggregation's clip_range %g "
                            "were clipped", round, res.clipped, self.config.secure_aggregation.clip_range)
            if self.on_secure_sum is not None:
                self.on_secure_sum(res)
            total = res.total
            result.secure_sum = res
            result.bytes_sent = {s: int(y.nbytes) for s, y in res.view.masked.items()}
        else:
            total = np.sum(list(vectors.values()), axis=0)
            result.bytes_sent = {u.site_id: u.nbytes for u in accepted}
        summed, total_weight, count = total[:-2], float(total[-2]), float(total[-1])
        m = len(accepted)
        if dp is not None:
            summed, count = self._dp_server(round, summed, count, m)
            total_weight = float(m)
        mean = torch.from_numpy(summed / total_weight)
        tensors: StateDict = {}
        offset = 0
        for k in names:
            ref = start[k]
            part = mean[offset: offset + ref.numel()].reshape(ref.shape)
            offset += ref.numel()
            tensors[k] = part.to(ref.dtype) if ref.is_floating_point() else part.round().to(ref.dtype)
        pseudo = SiteUpdate(AGGREGATE_ID, round, tensors, "delta",
                            max(1, int(round_half(total_weight))))
        result.state = strategy.aggregate(round, [pseudo], missing=skipped)
        result.epsilon = self._epsilon()
        return result

    def _dp_server(self, round: int, summed: np.ndarray, count: float,
                   m: int) -> tuple[np.ndarray, float]:
        dp = self.config.dp
        assert dp is not None and self.accountant is not None
        rng = np.random.default_rng(_seed(self.seed, "dp-server", round))
        if dp.noise == "central":
            summed = summed + rng.normal(0.0, dp.update_noise_multiplier * self.clip_norm,
                                         summed.shape)
            count = count + rng.normal(0.0, dp.count_noise_multiplier) if dp.adaptive_clip else count
            z = dp.noise_multiplier
        else:  # the sites' noise: m of the n sampled answered
            z = dp.noise_multiplier * math.sqrt(m / max(self._n_sampled, m))
        self.accountant.step(z)
        if dp.adaptive_clip:
            fraction = count / m
            self.clip_norm *= math.exp(-dp.clip_lr * (fraction - dp.target_quantile))
        return summed, count

    def _epsilon(self) -> float | None:
        return self.accountant.epsilon() if self.accountant is not None else None

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm,
                "accountant": self.accountant.state_dict() if self.accountant else None}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        self.clip_norm = float(data["clip_norm"])
        if self.accountant is not None and data["accountant"] is not None:
            self.accountant.load_state_dict(data["accountant"])


def round_half(x: float) -> float:
    return math.floor(x + 0.5)
