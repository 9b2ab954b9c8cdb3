"""Audit of the aggregation math against plain numpy re-derivations from the papers:
FedAvg (McMahan et al. 2017), FedAdam/FedYogi (Reddi et al. 2021, Alg. 2), FedProx's
proximal term (Li et al. 2020), coordinate median / trimmed mean (Yin et al. 2018),
multi-Krum (Blanchard et al. 2017), and the message gate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedrecon.federated import (
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedYogi,
    MultiKrum,
    PartitionViolation,
    SiteUpdate,
    TrimmedMean,
    check_update,
    make_update,
    weighted_average,
)
from fedrecon.federated.site import _proximal
from fedrecon.models import Partition, Role, Scope

torch.set_num_threads(1)


def _rng_states(n: int, seed: int = 0, dtype=np.float64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=5).astype(dtype)}
            for _ in range(n)]


def _updates(states, counts, kind="weights") -> list[SiteUpdate]:
    return [SiteUpdate(f"s{i}", 0, {k: torch.from_numpy(v.copy()) for k, v in s.items()}, kind, c)
            for i, (s, c) in enumerate(zip(states, counts))]


# -- FedAvg ------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [[3, 1, 0, 6], [0, 0, 0], [7], [1, 2]])
def test_fedavg_matches_numpy_example_weighting(counts):
    states = _rng_states(len(counts))
    start = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in states[0].items()}
    strat = FedAvg()
    strat.initialize(start, [f"s{i}" for i in range(len(counts))])
    out = strat.aggregate(0, _updates(states, counts)).global_state
    w = np.asarray(counts, dtype=np.float64)
    w = np.ones_like(w) if w.sum() == 0 else w  # all-zero counts: uniform
    for k in states[0]:
        ref = sum(wi * s[k] for wi, s in zip(w, states)) / w.sum()
        assert out[k].dtype == torch.float64
        np.testing.assert_allclose(out[k].numpy(), ref, rtol=0, atol=1e-14)


def test_fedavg_zero_sample_site_has_no_influence_and_dropouts_are_ignored():
    states = _rng_states(3)
    start = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in states[0].items()}
    strat = FedAvg()
    strat.initialize(start, ["s0", "s1", "s2"])
    ups = _updates(states, [2, 0, 5])
    out = strat.aggregate(0, [ups[0], ups[1], ups[2]], missing=["s3"]).global_state
    for k in states[0]:
        ref = (2 * states[0][k] + 5 * states[2][k]) / 7
        np.testing.assert_allclose(out[k].numpy(), ref, atol=1e-14)


def test_fedavg_keeps_float64_precision_and_float32_dtype():
    # float64 differences far below float32's resolution must survive
    base = 1.0 + 2.0**-40
    s64 = [{"w": torch.full((4,), base, dtype=torch.float64)},
           {"w": torch.full((4,), 1.0, dtype=torch.float64)}]
    out = weighted_average(s64, [1.0, 3.0])
    assert out["w"].dtype == torch.float64
    assert float(out["w"][0]) == 1.0 + 2.0**-42
    s32 = [{"w": torch.full((4,), 1.5)}, {"w": torch.full((4,), 2.5)}]
    out32 = weighted_average(s32, [1.0, 1.0])
    assert out32["w"].dtype == torch.float32 and torch.equal(out32["w"], torch.full((4,), 2.0))


def test_fedavg_integer_buffers_stay_integer():
    strat = FedAvg()
    strat.initialize({"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(10)}, ["a", "b"])
    ups = [SiteUpdate("a", 0, {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(30)},
                      "weights", 1),
           SiteUpdate("b", 0, {"w": torch.full((2,), 3.0), "bn.num_batches_tracked": torch.tensor(25)},
                      "weights", 3)]
    out = strat.aggregate(0, ups).global_state
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 30  # documented: the sites' maximum
    assert torch.allclose(out["w"], torch.full((2,), 2.5))


# -- FedAdam / FedYogi -------------------------------------------------------------------
def _reddi_reference(x0, rounds, eta, beta1, beta2, tau, yogi):
    """Reddi et al. 2021, Algorithm 2, written out in numpy (no bias correction,
    m_{-1} = 0, v_{-1} = tau^2)."""
    x = {k: v.copy() for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    out = []
    for new_states, counts in rounds:
        p = np.asarray(counts, dtype=np.float64) / sum(counts)
        for k, xk in x.items():
            delta = sum(pi * (s[k] - xk) for pi, s in zip(p, new_states))
            m[k] = beta1 * m[k] + (1 - beta1) * delta
            if yogi:
                v[k] = v[k] - (1 - beta2) * delta**2 * np.sign(v[k] - delta**2)
            else:
                v[k] = beta2 * v[k] + (1 - beta2) * delta**2
            x[k] = xk + eta * m[k] / (np.sqrt(v[k]) + tau)
        out.append({k: val.copy() for k, val in x.items()})
    return out


@pytest.mark.parametrize("cls,yogi", [(FedAdam, False), (FedYogi, True)])
def test_server_optimizers_follow_reddi_algorithm_2_for_several_rounds(cls, yogi):
    eta, beta1, beta2, tau = 0.3, 0.8, 0.95, 0.05
    x0 = _rng_states(1, seed=10)[0]
    rounds = [(_rng_states(3, seed=20 + r), [1 + r, 4, 2]) for r in range(4)]
    ref = _reddi_reference(x0, rounds, eta, beta1, beta2, tau, yogi)
    strat = cls(eta=eta, beta1=beta1, beta2=beta2, tau=tau)
    strat.initialize({k: torch.from_numpy(v.copy()) for k, v in x0.items()}, ["s0", "s1", "s2"])
    for r, (states, counts) in enumerate(rounds):
        out = strat.aggregate(r, _updates(states, counts)).global_state
        for k in x0:
            np.testing.assert_allclose(out[k].numpy(), ref[r][k], rtol=1e-12, atol=1e-12)


# -- FedProx -----------------------------------------------------------------------------
def test_fedprox_term_and_gradient_are_mu_over_two_squared_distance():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    anchor = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in net.state_dict().items()}
    names = {"0.weight", "0.bias"}  # only the GLOBAL ones are pulled
    mu = 0.37
    value = _proximal(net, names, anchor, mu)(net)
    ref = 0.5 * mu * sum(float((net.state_dict()[k] - anchor[k]).square().sum()) for k in names)
    assert float(value.detach()) == pytest.approx(ref, rel=1e-6)
    value.backward()
    for k, p in net.named_parameters():
        expected = mu * (p.detach() - anchor[k]) if k in names else torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(got, expected, atol=1e-7), k


# -- robust aggregators ------------------------------------------------------------------
def _robust(cls, states, **kw):
    strat = cls(**kw)
    strat.initialize({k: torch.zeros(v.shape, dtype=torch.float64) for k, v in states[0].items()},
                     [f"s{i}" for i in range(len(states))])
    return strat, strat.aggregate(0, _updates(states, [1] * len(states))).global_state


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_coordinate_median_matches_numpy_even_and_odd(n):
    states = _rng_states(n, seed=n)
    states[-1]["b"][:] = states[0]["b"]  # ties
    _, out = _robust(CoordinateMedian, states)
    for k in states[0]:
        ref = np.median(np.stack([s[k] for s in states]), axis=0)
        np.testing.assert_allclose(out[k].numpy(), ref, atol=1e-15)


@pytest.mark.parametrize("n,beta", [(5, 0.2), (6, 0.2), (7, 0.3), (4, 0.0), (10, 0.45), (3, 0.4)])
def test_trimmed_mean_matches_brute_force(n, beta):
    states = _rng_states(n, seed=100 + n)
    states[1]["a"][0, 0] = states[2]["a"][0, 0]  # a tie
    _, out = _robust(TrimmedMean, states, trim_fraction=beta)
    k_trim = int(np.floor(beta * n))
    for k in states[0]:
        stacked = np.stack([s[k] for s in states]).reshape(n, -1)
        ref = np.empty(stacked.shape[1])
        for j in range(stacked.shape[1]):
            col = sorted(stacked[:, j])
            ref[j] = np.mean(col[k_trim:n - k_trim])
        np.testing.assert_allclose(out[k].numpy().reshape(-1), ref, atol=1e-14)


def _krum_brute_force(vectors: np.ndarray, f: int, m: int) -> list[int]:
    n = len(vectors)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:max(n - f - 2, 1)]))
    # lowest scores; ties broken by site order
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])


@pytest.mark.parametrize("n,f,m", [(7, 2, None), (7, 2, 1), (6, 1, 3), (9, 3, None), (5, 1, 2)])
def test_multi_krum_selects_like_brute_force(n, f, m):
    states = _rng_states(n, seed=7 * n + f)
    rng = np.random.default_rng(f)
    for i in rng.choice(n, size=f, replace=False):  # f outliers
        states[i] = {k: v + 50.0 * rng.normal(size=v.shape) for k, v in states[i].items()}
    strat, out = _robust(MultiKrum, states, byzantine=f, select=m)
    vectors = np.stack([np.concatenate([s[k].reshape(-1) for k in states[0]]) for s in states])
    chosen = _krum_brute_force(vectors, f, m if m is not None else n - f)
    assert strat.last_selected == chosen
    for k in states[0]:
        np.testing.assert_allclose(out[k].numpy(), np.mean([states[i][k] for i in chosen], axis=0),
                                   atol=1e-12)


def test_multi_krum_ties_are_broken_by_site_order():
    # four identical honest updates (every score ties) and one outlier; select 2
    base = _rng_states(1, seed=3)[0]
    states = [{k: v.copy() for k, v in base.items()} for _ in range(4)]
    states.append({k: v + 100.0 for k, v in base.items()})
    picks = set()
    for _ in range(5):
        strat, _ = _robust(MultiKrum, states, byzantine=1, select=2)
        picks.add(tuple(strat.last_selected))
    assert picks == {(0, 1)}


# -- messages ----------------------------------------------------------------------------
class _DC(torch.nn.Module):
    role = Role.DC

    def __init__(self) -> None:
        super().__init__()
        self.step = torch.nn.Parameter(torch.tensor(0.5))


class _Prior(torch.nn.Module):
    role = Role.PRIOR

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Linear(2, 2)
        self.bn = torch.nn.BatchNorm1d(2)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dc = _DC()
        self.prior = _Prior()


def test_local_tensor_can_never_leave_and_errors_name_it():
    net = _Net()
    part = Partition.default()
    upd = make_update(net, part, site_id="x", round=0, start={}, kind="weights", num_examples=1)
    assert "dc.step" not in upd.tensors
    assert set(upd.tensors) == set(part.names(net, Scope.GLOBAL))
    smuggled = SiteUpdate("x", 0, {**upd.tensors, "dc.step": torch.tensor(0.1)}, "weights", 1)
    with pytest.raises(PartitionViolation, match="dc.step"):
        check_update(smuggled, part.names(net, Scope.GLOBAL))
    # FedBN: the norm layer's tensors become LOCAL and are no longer sent
    bn = part.with_local(Role.NORM)
    upd_bn = make_update(net, bn, site_id="x", round=0, start={}, kind="weights", num_examples=1)
    assert not any(k.startswith("prior.bn") for k in upd_bn.tensors)
    with pytest.raises(PartitionViolation, match="prior.bn"):
        check_update(upd, bn.names(net, Scope.GLOBAL))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_update_refuses_non_finite_complex_tensors(bad):
    upd = SiteUpdate("x", 0, {"c": torch.tensor([complex(bad, 0.0), 1 + 1j])}, "weights", 1)
    with pytest.raises(ValueError, match="NaN/Inf"):
        check_update(upd, ["c"])


def test_weighted_average_all_combinations_of_two_sites_of_three():
    states = _rng_states(3, seed=42)
    tensors = [{k: torch.from_numpy(v) for k, v in s.items()} for s in states]
    for (i, j) in itertools.combinations(range(3), 2):
        out = weighted_average([tensors[i], tensors[j]], [2.0, 5.0])
        for k in states[0]:
            np.testing.assert_allclose(out[k].numpy(), (2 * states[i][k] + 5 * states[j][k]) / 7,
                                       atol=1e-14)


def test_multi_krum_equal_scores_select_the_first_sites_even_for_many_sites():
    # 20 one-hot updates: every pairwise distance is equal, so every Krum score ties and
    # the selection (hence the average) must not depend on the sort's internals
    n, m = 20, 5
    states = [{"w": np.eye(n)[i]} for i in range(n)]
    strat, out = _robust(MultiKrum, states, byzantine=3, select=m)
    assert strat.last_selected == list(range(m))
    np.testing.assert_allclose(out["w"].numpy(), np.eye(n)[:m].mean(axis=0), atol=1e-15)


def test_weighted_average_accepts_the_same_keys_in_another_order():
    a = {"x": torch.ones(2), "y": torch.zeros(3)}
    b = {"y": torch.full((3,), 4.0), "x": torch.full((2,), 3.0)}
    out = weighted_average([a, b], [1.0, 1.0])
    assert torch.equal(out["x"], torch.full((2,), 2.0))
    assert torch.equal(out["y"], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([a, {"x": torch.ones(2)}], [1.0, 1.0])
