"""Audit of the privacy math against independent re-derivations: Shamir over every t-subset,
exact cancellation of SecAgg's masks in fixed point, dropout limits, DP-FedAvg's per-site
clipping and noise, and the reported epsilon against an RDP computation written here from
Mironov 2017 (Gaussian mechanism: RDP alpha / (2 z^2) per round) with the RDP -> (eps, delta)
conversion of Balle et al. 2020 / Canonne, Kamath, Steinke 2020."""

from __future__ import annotations

import itertools
import math
import secrets

import numpy as np
import pytest
import torch

from fedrecon.federated import FedAvg, SiteUpdate
from fedrecon.privacy import (
    DPConfig,
    PrivacyAccountant,
    PrivacyConfig,
    SecAggConfig,
    SecureAggregationError,
    UpdatePipeline,
    clip_update,
    combine_shares,
    secure_sum,
    split_secret,
    update_norm,
)

torch.set_num_threads(1)


# -- Shamir -------------------------------------------------------------------------------
@pytest.mark.parametrize("t,n", [(2, 3), (3, 5), (4, 6)])
def test_shamir_any_t_of_n_recover_and_t_minus_one_do_not(t, n):
    secret = secrets.randbits(256)
    shares = split_secret(secret, threshold=t, xs=list(range(1, n + 1)))
    for subset in itertools.combinations(shares, t):
        assert combine_shares(list(subset)) == secret
    for subset in itertools.combinations(shares, t + 1 if t < n else t):
        assert combine_shares(list(subset)) == secret  # more points: same polynomial
    for subset in itertools.combinations(shares, t - 1):
        assert combine_shares(list(subset)) != secret
        with pytest.raises(ValueError, match="threshold"):
            combine_shares(list(subset), threshold=t)


# -- secure aggregation ------------------------------------------------------------------
def _grid_vectors(n: int, length: int, frac_bits: int, seed: int) -> dict[str, np.ndarray]:
    """Values on the fixed-point grid (exactly representable), both signs, large and small."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        ints = rng.integers(-(2**40), 2**40, size=length)
        out[f"site{i}"] = ints.astype(np.float64) / 2.0**frac_bits
    return out


@pytest.mark.parametrize("after_sharing,after_masking", [((), ()), (("site1",), ()),
                                                          (("site0", "site4"), ("site2",))])
def test_masks_cancel_exactly_on_the_fixed_point_grid(after_sharing, after_masking):
    cfg = SecAggConfig(threshold=2, frac_bits=16, clip_range=2.0**30)
    vectors = _grid_vectors(5, 64, cfg.frac_bits, seed=len(after_sharing))
    res = secure_sum(vectors, round=3, config=cfg, drop_after_sharing=after_sharing,
                     drop_after_masking=after_masking)
    survivors = [s for s in vectors if s not in after_sharing]
    assert res.survivors == survivors and res.dropped == list(after_sharing)
    # the exact integer sum, computed without the protocol
    exact = sum(np.rint(vectors[s] * 2.0**cfg.frac_bits).astype(np.int64) for s in survivors)
    assert np.array_equal(res.total, exact.astype(np.float64) / 2.0**cfg.frac_bits)


def test_sum_of_arbitrary_floats_is_within_the_stated_bound_and_masks_look_uniform():
    cfg = SecAggConfig(frac_bits=20)
    rng = np.random.default_rng(5)
    vectors = {f"s{i}": rng.normal(scale=100.0, size=500) for i in range(4)}
    res = secure_sum(vectors, round=0, config=cfg)
    plain = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(res.total - plain)) <= cfg.sum_error_bound(4)
    # a masked vector's high byte is spread over all values, whatever the small input
    hi = (res.view.masked["s0"] >> np.uint64(56)).astype(int)
    assert len(set(hi.tolist())) > 100


def test_exactly_threshold_survivors_unmask_and_one_fewer_is_refused():
    cfg = SecAggConfig(threshold=3)
    vectors = {f"s{i}": np.full(8, float(i)) for i in range(5)}
    ok = secure_sum(vectors, round=1, config=cfg, drop_after_sharing=["s0", "s1"])
    assert np.allclose(ok.total, np.full(8, 2.0 + 3.0 + 4.0))
    with pytest.raises(SecureAggregationError, match="need 3"):
        secure_sum(vectors, round=1, config=cfg, drop_after_sharing=["s0", "s1", "s2"])
    # enough masked inputs, but too few answer the unmask request
    with pytest.raises(SecureAggregationError, match="need 3"):
        secure_sum(vectors, round=1, config=cfg, drop_after_sharing=["s0", "s1"],
                   drop_after_masking=["s4"])


# -- DP-FedAvg ---------------------------------------------------------------------------
def _rdp_epsilon(zs: list[float], delta: float) -> float:
    """Composition of Gaussian mechanisms (RDP sum_i alpha / (2 z_i^2), Mironov 2017) and
    eps = rdp + log((alpha-1)/alpha) - (log delta + log alpha) / (alpha - 1), minimized over
    a dense grid of orders."""
    alphas = np.concatenate([np.linspace(1.01, 20, 20000), np.linspace(20, 2000, 20000)])
    rdp = alphas * sum(1.0 / (2 * z * z) for z in zs)
    eps = rdp + np.log1p(-1 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(np.min(eps))


@pytest.mark.parametrize("zs,delta", [([1.1] * 20, 1e-5), ([0.9, 2.0, 1.5, 3.0], 1e-6),
                                      ([5.0] * 30, 1e-5)])
def test_reported_epsilon_matches_an_independent_rdp_computation(zs, delta):
    acc = PrivacyAccountant(delta)
    for z in zs:
        eps = acc.step(z)
    ref = _rdp_epsilon(zs, delta)
    # the accountant minimizes over a coarser grid of orders: never below, barely above
    assert ref * (1 - 1e-6) <= eps <= ref * 1.03


def test_clip_update_matches_numpy_and_counts_complex_tensors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=6) + 1j * rng.normal(size=6)
    delta = {"a": torch.from_numpy(a), "b": torch.from_numpy(b), "n": torch.tensor(3)}
    norm = math.sqrt(float(np.sum(a**2) + np.sum(np.abs(b) ** 2)))
    assert update_norm(delta) == pytest.approx(norm, rel=1e-12)
    clipped, before = clip_update(delta, 0.5)
    assert before == pytest.approx(norm, rel=1e-12)
    np.testing.assert_allclose(clipped["a"].numpy(), a * 0.5 / norm, rtol=1e-12)
    np.testing.assert_allclose(clipped["b"].numpy(), b * 0.5 / norm, rtol=1e-12)
    assert update_norm(clipped) == pytest.approx(0.5, rel=1e-12)


def _run_round(cfg: PrivacyConfig, deltas: list[np.ndarray], *, missing=(), seed=0, round=0):
    ids = [f"s{i}" for i in range(len(deltas))]
    start = {"w": torch.zeros(deltas[0].size, dtype=torch.float64)}
    strat = FedAvg()
    strat.initialize(start, ids + list(missing))
    pipe = UpdatePipeline(cfg, seed=seed)
    n_sampled = len(ids) + len(missing)
    sent = [pipe.at_site(round, SiteUpdate(s, round, {"w": torch.from_numpy(d.copy())}, "weights", 10 + i),
                         start, n_sampled=n_sampled) for i, (s, d) in enumerate(zip(ids, deltas))]
    res = pipe.aggregate(round, strat, sent, missing=list(missing), names=["w"],
                         shapes={"w": torch.Size([deltas[0].size])})
    return res.state.global_state["w"].numpy(), res


@pytest.mark.parametrize("secure", [False, True])
def test_each_site_is_clipped_then_uniformly_averaged(secure):
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=50) * s for s in (0.01, 0.2, 3.0)]  # norms ~0.07, ~1.4, ~21
    C = 1.0
    cfg = PrivacyConfig(dp=DPConfig(clip_norm=C, noise_multiplier=0.0),
                        secure_aggregation=SecAggConfig() if secure else None)
    got, _ = _run_round(cfg, deltas)
    ref = np.mean([d * min(1.0, C / np.linalg.norm(d)) for d in deltas], axis=0)
    np.testing.assert_allclose(got, ref, atol=1e-8)


def test_distributed_noise_with_a_dropout_has_the_stated_std_and_epsilon():
    z, C, n = 1.5, 0.2, 4
    deltas = [np.zeros(20000) for _ in range(n - 1)]  # one sampled site drops out
    cfg = PrivacyConfig(dp=DPConfig(clip_norm=C, noise_multiplier=z, noise="distributed"),
                        secure_aggregation=SecAggConfig(frac_bits=24))
    got, res = _run_round(cfg, deltas, missing=["late"])
    m = n - 1
    # each of the m answering sites adds N(0, (z C)^2 / n); the mean divides the sum by m
    assert float(got.std()) == pytest.approx(z * C * math.sqrt(m / n) / m, rel=0.03)
    assert abs(float(got.mean())) < 5 * z * C / m / math.sqrt(got.size)
    assert res.epsilon == pytest.approx(_rdp_epsilon([z * math.sqrt(m / n)], 1e-5), rel=0.03)


def test_central_noise_std_and_epsilon_over_rounds():
    z, C = 0.8, 0.3
    cfg = PrivacyConfig(dp=DPConfig(clip_norm=C, noise_multiplier=z, delta=1e-6))
    ids = ["a", "b", "c"]
    start = {"w": torch.zeros(20000, dtype=torch.float64)}
    strat = FedAvg()
    strat.initialize(start, ids)
    pipe = UpdatePipeline(cfg, seed=9)
    for r in range(3):
        begin = strat.state.global_state["w"].clone()
        sent = [pipe.at_site(r, SiteUpdate(s, r, {"w": begin.clone()}, "weights", 1),
                             strat.state.global_state, n_sampled=3) for s in ids]
        res = pipe.aggregate(r, strat, sent, missing=[], names=["w"],
                             shapes={"w": torch.Size([20000])})
        step = res.state.global_state["w"] - begin
        assert float(step.std()) == pytest.approx(z * C / 3, rel=0.03)
    assert res.epsilon == pytest.approx(_rdp_epsilon([z] * 3, 1e-6), rel=0.03)


@pytest.mark.parametrize("secure", [False, True])
def test_adaptive_clip_follows_andrew_et_al_geometric_update(secure):
    # noiseless: C <- C exp(-eta (b - gamma)), b the fraction of updates with norm <= C
    rng = np.random.default_rng(2)
    deltas = [rng.normal(size=30) * s for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    norms = [float(np.linalg.norm(d)) for d in deltas]
    C, eta, gamma = 0.3, 0.4, 0.7
    cfg = PrivacyConfig(dp=DPConfig(clip_norm=C, noise_multiplier=0.0, adaptive_clip=True,
                                    clip_lr=eta, target_quantile=gamma, count_noise_multiplier=0.0),
                        secure_aggregation=SecAggConfig() if secure else None)
    ids = [f"s{i}" for i in range(len(deltas))]
    start = {"w": torch.zeros(30, dtype=torch.float64)}
    strat = FedAvg()
    strat.initialize(start, ids)
    pipe = UpdatePipeline(cfg)
    for r in range(6):
        begin = strat.state.global_state
        sent = [pipe.at_site(r, SiteUpdate(s, r, {"w": begin["w"] + torch.from_numpy(d)}, "weights", 1),
                             begin, n_sampled=len(ids)) for s, d in zip(ids, deltas)]
        res = pipe.aggregate(r, strat, sent, missing=[], names=["w"], shapes={"w": torch.Size([30])})
        step = res.state.global_state["w"] - begin["w"]
        ref_step = np.mean([d * min(1.0, C / n) for d, n in zip(deltas, norms)], axis=0)
        np.testing.assert_allclose(step.numpy(), ref_step, atol=1e-8)
        b = np.mean([n <= C for n in norms])
        C = C * math.exp(-eta * (b - gamma))
        assert pipe.clip_norm == pytest.approx(C, rel=1e-9)
