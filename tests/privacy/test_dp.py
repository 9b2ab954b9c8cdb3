"""DP-FedAvg: the accountant against closed forms (the exact Gaussian-DP curve and the
classic RDP conversion), clipping, the noise actually added, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedrecon.federated import FedAvg, SiteUpdate
from fedrecon.privacy import (
    DPConfig,
    PrivacyAccountant,
    PrivacyConfig,
    UpdatePipeline,
    clip_update,
    update_norm,
)


def _exact_epsilon(z: float, rounds: int, delta: float) -> float:
    """T Gaussian mechanisms of multiplier z are mu-GDP with mu = sqrt(T)/z (Dong, Roth, Su
    2019); its tight (eps, delta) curve (Balle & Wang 2018) solved for eps."""
    mu = math.sqrt(rounds) / z

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 500.0)


def _classic_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """min_alpha T alpha / (2 z^2) + log(1/delta) / (alpha - 1) (Mironov 2017, Prop. 3)."""
    alphas = np.linspace(1.01, 2000, 400000)
    return float(np.min(rounds * alphas / (2 * z * z) + math.log(1 / delta) / (alphas - 1)))


@pytest.mark.parametrize("z,rounds", [(1.0, 10), (2.0, 50), (0.8, 5)])
def test_accountant_lies_between_exact_and_classic_bounds(z, rounds):
    acc = PrivacyAccountant(1e-5)
    for _ in range(rounds):
        eps = acc.step(z)
    exact = _exact_epsilon(z, rounds, 1e-5)
    classic = _classic_rdp_epsilon(z, rounds, 1e-5)
    assert exact <= eps <= classic * 1.0001
    assert eps < 1.4 * exact  # RDP is an upper bound, but not a loose one here


def test_accountant_edge_cases():
    acc = PrivacyAccountant(1e-5)
    assert acc.epsilon() == 0.0
    assert acc.step(0.0) == math.inf  # no noise: no privacy
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant(0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPConfig(clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        DPConfig(clip_norm=1.0, noise_multiplier=4.0, adaptive_clip=True, count_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="unknown key"):
        DPConfig.from_dict({"clip_norm": 1.0, "noise_multiplier": 1.0, "sigma": 2})


def test_clip_update_bounds_the_norm():
    d = {"a": torch.full((10,), 3.0), "b": torch.full((2, 2), -4.0), "n": torch.tensor(7)}
    clipped, n0 = clip_update(d, 1.0)
    assert n0 == pytest.approx(math.sqrt(90 + 64))
    assert update_norm(clipped) == pytest.approx(1.0)
    assert torch.equal(clipped["n"], d["n"])
    same, _ = clip_update(d, 100.0)
    assert all(torch.equal(same[k], d[k]) for k in d)


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4000,), value)}


def _aggregate(pipe: UpdatePipeline, deltas: list[float], round: int = 0) -> torch.Tensor:
    strat = FedAvg()
    strat.initialize(_state(0.0), [f"s{i}" for i in range(len(deltas))])
    ups = [pipe.at_site(round, SiteUpdate(f"s{i}", round, _state(v), "weights", 1), _state(0.0),
                        n_sampled=len(deltas)) for i, v in enumerate(deltas)]
    res = pipe.aggregate(round, strat, ups, missing=[], names=["w"], shapes={"w": torch.Size([4000])})
    return res.state.global_state["w"], res


def test_central_noise_has_the_calibrated_std_and_clipped_mean():
    C, z = 0.5, 2.0
    pipe = UpdatePipeline(PrivacyConfig(dp=DPConfig(clip_norm=C, noise_multiplier=z)), seed=3)
    # site updates with norms 0.02*sqrt(4000)=1.26 > C: each is clipped to C
    w, res = _aggregate(pipe, [0.02, 0.02, 0.02, 0.02])
    clipped_value = C / math.sqrt(4000)
    expected_mean = clipped_value  # uniform mean of four equal clipped updates
    std = float((w - expected_mean).std())
    assert std == pytest.approx(z * C / 4, rel=0.05)  # sum noise z C, divided by m = 4
    assert float(w.mean()) == pytest.approx(expected_mean, abs=4 * z * C / 4 / math.sqrt(4000))
    assert res.epsilon == pytest.approx(PrivacyAccountant(1e-5).step(z))


def test_adaptive_clipping_moves_towards_the_target_quantile():
    # norms of the 5 sites' updates: 0.1 .. 0.5 (x sqrt(4000)); median = 0.3 sqrt(4000)
    cfg = DPConfig(clip_norm=0.05, noise_multiplier=0.0, adaptive_clip=True, clip_lr=0.5,
                   target_quantile=0.5)
    pipe = UpdatePipeline(PrivacyConfig(dp=cfg))
    for r in range(60):
        _aggregate(pipe, [0.1, 0.2, 0.3, 0.4, 0.5], round=r)
    median = 0.3 * math.sqrt(4000)
    assert 0.2 * math.sqrt(4000) < pipe.clip_norm < 0.4 * math.sqrt(4000)
    assert abs(math.log(pipe.clip_norm / median)) < math.log(4 / 3)


def test_adaptive_noise_split_costs_exactly_z():
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.0, adaptive_clip=True, count_noise_multiplier=5.0)
    zd, sb = cfg.update_noise_multiplier, cfg.count_noise_multiplier
    assert (zd**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(1.0)
    assert zd > 1.0
