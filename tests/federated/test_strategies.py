"""Strategies: exact aggregation rules on hand-made states, server optimizers, personalization,
partial participation, and a 2-site CT mini-run of every registered strategy with an audit of
every message a site sends."""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from fedrecon.federated import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedYogi,
    Hypernetwork,
    LocalOnly,
    MemoryStore,
    PartitionViolation,
    SimilarityWeighted,
    Site,
    SiteUpdate,
    check_update,
    global_names_with_roles,
    make_strategy,
    make_update,
)
from fedrecon.models import ModelConfig, Partition, Role, Scope, build_model

torch.set_num_threads(1)


# -- hand-made name-keyed states ----------------------------------------------------------------
def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prior.conv.weight": scale * torch.randn(2, 3, generator=g, dtype=torch.float64),
        "prior.conv.bias": scale * torch.randn(3, generator=g, dtype=torch.float64),
        "prior.norm.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def _update(site: str, tensors: dict[str, torch.Tensor], n: int, kind: str = "weights",
            round: int = 0) -> SiteUpdate:
    return SiteUpdate(site, round, {k: v.clone() for k, v in tensors.items()}, kind, n)


def _init(strategy, state, sites=("a", "b", "c"), protocols=None):
    strategy.initialize(state, list(sites), protocols)
    return strategy


def test_fedavg_identity_and_exact_example_weighting():
    # float32 model state (what sites send): float64 accumulation makes the identity exact
    model = build_model(ModelConfig(n_iter=2, chans=4, num_pools=2), complex_images=False)
    w = Partition.default().global_state(model)
    w = {k: v + 0.1 * torch.randn_like(v) for k, v in w.items()}
    out = _init(FedAvg(), w).aggregate(0, [_update("a", w, 3), _update("b", w, 7), _update("c", w, 1)])
    for k in w:
        assert torch.equal(out.global_state[k], w[k])
    s0 = _state(0)
    out = _init(FedAvg(), s0).aggregate(0, [_update("a", s0, 3), _update("b", s0, 7)])
    for k in s0:  # float64: identity up to one rounding of the weights
        torch.testing.assert_close(out.global_state[k], s0[k], rtol=0, atol=1e-15)
    s1, s2 = _state(1), _state(2)
    strat = _init(FedAvg(), s0)
    out = strat.aggregate(0, [_update("a", s1, 1), _update("b", s2, 3)])
    for k in ("prior.conv.weight", "prior.conv.bias"):
        expected = 0.25 * s1[k] + 0.75 * s2[k]
        torch.testing.assert_close(out.global_state[k], expected, rtol=0, atol=1e-15)
    assert int(out.global_state["prior.norm.num_batches_tracked"]) == 2  # integers: max


def test_weights_and_delta_updates_give_the_same_fedavg():
    s0, s1, s2 = _state(0), _state(1), _state(2)
    by_weights = _init(FedAvg(), s0).aggregate(0, [_update("a", s1, 2), _update("b", s2, 5)])
    deltas = [{k: s[k] - s0[k] for k in s0} for s in (s1, s2)]
    by_delta = _init(FedAvg(), s0).aggregate(
        0, [_update("a", deltas[0], 2, "delta"), _update("b", deltas[1], 5, "delta")])
    for k in ("prior.conv.weight", "prior.conv.bias"):
        torch.testing.assert_close(by_weights.global_state[k], by_delta.global_state[k],
                                   rtol=0, atol=1e-14)


def test_updates_carry_global_keys_only_and_local_keys_are_refused():
    model = build_model(ModelConfig(n_iter=2, chans=4, num_pools=2), complex_images=False)
    part = Partition.default()
    start = part.global_state(model)
    update = make_update(model, part, site_id="a", round=0, start=start, kind="delta",
                         num_examples=1)
    assert set(update.tensors) == set(part.names(model, Scope.GLOBAL))
    assert "dc.raw_step" in part.names(model, Scope.LOCAL)
    assert "dc.raw_step" not in update.tensors
    # a site misconfigured to share everything: the server's check refuses its message
    leaky = make_update(model, Partition(frozenset()), site_id="a", round=0, start={},
                        kind="weights", num_examples=1)
    with pytest.raises(PartitionViolation, match="dc.raw_step"):
        check_update(leaky, part.names(model, Scope.GLOBAL))
    forged = SiteUpdate("a", 0, {**update.tensors, "dc.raw_step": torch.zeros(2)}, "delta", 1)
    with pytest.raises(PartitionViolation, match="dc.raw_step"):
        check_update(forged, part.names(model, Scope.GLOBAL))
    # FedAvg touches exactly the keys it was initialized with
    strat = _init(FedAvg(), start, ["a"])
    out = strat.aggregate(0, [update])
    assert set(out.global_state) == set(start)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_server_optimizer_step_matches_hand_computation(cls):
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-3
    s0, s1, s2 = _state(0), _state(1), _state(2)
    strat = _init(cls(eta=eta, beta1=b1, beta2=b2, tau=tau), s0)
    out = strat.aggregate(0, [_update("a", s1, 1), _update("b", s2, 3)])
    for k in ("prior.conv.weight", "prior.conv.bias"):
        delta = 0.25 * (s1[k] - s0[k]) + 0.75 * (s2[k] - s0[k])
        m = (1 - b1) * delta
        v0 = torch.full_like(delta, tau**2)
        if cls is FedAdam:
            v = b2 * v0 + (1 - b2) * delta**2
        else:
            v = v0 - (1 - b2) * delta**2 * torch.sign(v0 - delta**2)
        torch.testing.assert_close(out.global_state[k], s0[k] + eta * m / (v.sqrt() + tau),
                                   rtol=0, atol=1e-13)
    assert int(out.global_state["prior.norm.num_batches_tracked"]) == 2


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_server_optimizer_state_dict_round_trip_continues_identically(cls):
    s0 = _state(0)
    a = _init(cls(eta=0.1), s0)
    a.aggregate(0, [_update("a", _state(1), 1), _update("b", _state(2), 2)])
    saved = copy.deepcopy(a.state_dict())
    b = cls(eta=0.1)
    b.load_state_dict(saved)
    assert set(saved["server_optimizer"]["m"]) == {"prior.conv.weight", "prior.conv.bias"}
    second = [_update("a", _state(3), 1), _update("b", _state(4), 2)]
    out_a = a.aggregate(1, second)
    out_b = b.aggregate(1, copy.deepcopy(second))
    for k in s0:
        assert torch.equal(out_a.global_state[k], out_b.global_state[k])


def test_training_plans():
    s0 = _state(0)
    prox = _init(make_strategy("fedprox", mu=0.3, local_steps=4, lr=1e-2), s0).configure(0, ["a"])["a"]
    assert (prox.plan.prox_mu, prox.plan.local_steps, prox.plan.lr) == (0.3, 4, 1e-2)
    ditto = _init(make_strategy("ditto", personal_lambda=0.5), s0).configure(0, ["a", "b"])
    assert all(i.plan.personal_lambda == 0.5 for i in ditto.values())
    rep = _init(make_strategy("fedrep", local_first_steps=7, local_steps=3), s0).configure(0, ["b"])["b"]
    assert (rep.plan.local_first_steps, rep.plan.local_steps) == (7, 3)
    assert make_strategy("fedbn").partition.scope(Role.NORM) is Scope.LOCAL
    assert make_strategy("fedbn").partition.scope(Role.DC) is Scope.LOCAL
    assert make_strategy("partial", local_roles=["dc", "adapter"]).partition.local == {Role.DC, Role.ADAPTER}


def test_make_strategy_errors_name_the_key():
    with pytest.raises(ValueError, match="did you mean 'fedavg'"):
        make_strategy("fedavgg")
    with pytest.raises(ValueError, match="'muu'.*did you mean 'mu'"):
        make_strategy("fedprox", muu=0.1)
    with pytest.raises(ValueError, match="'mu'"):
        make_strategy("fedavg", mu=0.1)


# -- similarity ----------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["distance", "cosine"])
def test_similarity_pulls_towards_the_similar_site(metric):
    s0 = _state(0)
    near = {k: (v + 0.1 if v.is_floating_point() else v) for k, v in s0.items()}
    far = {k: (v - 5.0 if v.is_floating_point() else v) for k, v in s0.items()}
    strat = _init(SimilarityWeighted(metric=metric, temperature=0.5), s0)
    out = strat.aggregate(0, [_update("a", near, 1), _update("b", far, 1), _update("c", near, 1)])
    w = out.personalized["c"]["prior.conv.weight"]
    dist_a = (w - near["prior.conv.weight"]).norm()
    dist_b = (w - far["prior.conv.weight"]).norm()
    assert dist_a < dist_b
    assert strat.last_weights["c"]["a"] > strat.last_weights["c"]["b"]
    assert not torch.equal(out.personalized["a"]["prior.conv.weight"],
                           out.personalized["b"]["prior.conv.weight"])


# -- partial participation --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_empty_updates_leave_the_state_unchanged(name):
    s0 = _state(0)
    protocols = {s: torch.tensor([float(i), 2.0]) for i, s in enumerate("abc")}
    strat = _init(make_strategy(name), s0, protocols=protocols)
    before = copy.deepcopy(strat.state)
    after = strat.aggregate(0, [], missing=["a", "b"])
    for k in s0:
        assert torch.equal(after.global_state[k], before.global_state[k])
    assert after.personalized.keys() == before.personalized.keys()
    for s in before.personalized:
        for k in s0:
            assert torch.equal(after.personalized[s][k], before.personalized[s][k])


@pytest.mark.parametrize("cls", [LocalOnly, SimilarityWeighted])
def test_missing_sites_keep_their_personalized_state(cls):
    s0 = _state(0)
    strat = _init(cls(), s0)
    strat.aggregate(0, [_update("a", _state(1), 1), _update("b", _state(2), 1),
                        _update("c", _state(3), 1)])
    kept = copy.deepcopy(strat.state.personalized["c"])
    out = strat.aggregate(1, [_update("a", _state(4), 1), _update("b", _state(5), 1)], missing=["c"])
    for k in s0:
        assert torch.equal(out.personalized["c"][k], kept[k])
    assert not torch.equal(out.personalized["a"]["prior.conv.weight"],
                           kept["prior.conv.weight"])


def test_local_only_keeps_each_sites_own_weights():
    s0, s1 = _state(0), _state(1)
    out = _init(LocalOnly(), s0).aggregate(0, [_update("a", s1, 1)])
    assert torch.equal(out.personalized["a"]["prior.conv.weight"], s1["prior.conv.weight"])
    assert torch.equal(out.global_state["prior.conv.weight"], s0["prior.conv.weight"])
    assert "b" not in out.personalized


# -- hypernetwork ------------------------------------------------------------------------------
def _protocols():
    return {"a": torch.tensor([16.0, 0.0, 5.0]), "b": torch.tensor([64.0, 1.0, 4.0]),
            "c": torch.tensor([32.0, 0.0, 6.0])}


def test_hypernetwork_personalizes_learns_and_generates_for_new_sites():
    s0 = _state(0)
    strat = _init(Hypernetwork(hidden=8, hn_lr=0.5), s0, protocols=_protocols())
    assert strat.targets == ["prior.conv.bias"]  # default: 1-D floating tensors
    before = {k: v.clone() for k, v in strat.hypernet.state_dict().items()}
    ups = []
    for site, shift in (("a", 1.0), ("b", -1.0)):
        new = {k: v.clone() for k, v in strat.state.for_site(site).items()}
        new["prior.conv.bias"] = new["prior.conv.bias"] + shift
        ups.append(_update(site, new, 1))
    out = strat.aggregate(0, ups, missing=["c"])
    after = strat.hypernet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ba, bb = out.personalized["a"]["prior.conv.bias"], out.personalized["b"]["prior.conv.bias"]
    assert not torch.allclose(ba, bb)
    assert (ba - bb).mean() > 0  # each site moved towards its own update
    # non-target tensors are the FedAvg consensus at every site
    for s in "abc":
        assert torch.equal(out.personalized[s]["prior.conv.weight"], out.global_state["prior.conv.weight"])
    new_site = strat.state_for_new_site(torch.tensor([128.0, 1.0, 3.0]))
    assert new_site.keys() == s0.keys()
    assert all(new_site[k].shape == s0[k].shape and new_site[k].dtype == s0[k].dtype for k in s0)
    # checkpoint round trip reproduces the generated states
    other = Hypernetwork(hidden=8, hn_lr=0.5)
    other.load_state_dict(copy.deepcopy(strat.state_dict()))
    torch.testing.assert_close(other.state_for_new_site(torch.tensor([128.0, 1.0, 3.0])), new_site)


def test_hypernetwork_learned_embeddings():
    s0 = _state(0)
    strat = _init(Hypernetwork(embedding="learned", embed_dim=4, hidden=0), s0)
    ups = [_update("a", {**s0, "prior.conv.bias": s0["prior.conv.bias"] + 1}, 1),
           _update("b", {**s0, "prior.conv.bias": s0["prior.conv.bias"] - 1}, 1)]
    out = strat.aggregate(0, ups)
    assert not torch.allclose(out.personalized["a"]["prior.conv.bias"], out.personalized["b"]["prior.conv.bias"])
    assert strat.state_for_new_site().keys() == s0.keys()
    with pytest.raises(ValueError, match="protocol"):
        _init(Hypernetwork(), s0)  # embedding='protocol' without protocols


def test_hypernetwork_server_update_is_the_vjp_of_the_site_changes():
    # affine hypernetwork theta(e) = base + W e / sqrt(d): the update has a closed form
    s0 = _state(0)
    protocols = _protocols()
    lr = 0.3
    strat = _init(Hypernetwork(targets=["prior.conv.bias"], hidden=0, hn_lr=lr), s0,
                  protocols=protocols)
    with torch.no_grad():
        strat.hypernet.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    strat._regenerate()
    W0 = strat.hypernet.head.weight.detach().clone()
    base0 = strat.hypernet.base.detach().clone()
    weights = {"a": 1.0, "b": 3.0}
    changes, ups = {}, []
    for i, site in enumerate(weights):
        start = strat.state.for_site(site)
        new = {k: v.clone() for k, v in start.items()}
        new["prior.conv.bias"] = start["prior.conv.bias"] + torch.tensor([1.0, -2.0, 0.5]) * (i + 1)
        changes[site] = start["prior.conv.bias"] - new["prior.conv.bias"]
        ups.append(_update(site, new, int(weights[site])))
    strat.aggregate(0, ups)
    scale = 1 / math.sqrt(3)
    grad_W = sum(weights[s] / 4 * torch.outer(changes[s], torch.sign(p.double()) * torch.log1p(p.double().abs())) * scale
                 for s, p in protocols.items() if s in weights)
    grad_base = sum(weights[s] / 4 * changes[s] for s in weights)
    torch.testing.assert_close(strat.hypernet.head.weight.detach(), W0 - lr * grad_W, rtol=0, atol=1e-12)
    torch.testing.assert_close(strat.hypernet.base.detach(), base0 - lr * grad_base, rtol=0, atol=1e-12)
    # and autograd agrees with finite differences of the server objective
    e = torch.sign(protocols["a"].double()) * torch.log1p(protocols["a"].double().abs())

    def objective(w: torch.Tensor) -> torch.Tensor:
        return ((base0 + w @ e * scale) * changes["a"]).sum()

    assert torch.autograd.gradcheck(objective, (W0.clone().requires_grad_(),))


# -- end-to-end: every registered strategy on a 2-site CT mini-run -----------------------------------
_SIZE = 16


@pytest.fixture(scope="module")
def ct_sites_data():
    from fedrecon.datasets import (
        CTAcquisition,
        CTSliceDataset,
        collate_ct_samples,
        write_phantom_volumes,
    )

    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp())
    files = write_phantom_volumes(tmp, n_volumes=2, n_slices=2, image_size=_SIZE, seed=0)
    data = {}
    for i, views in enumerate((8, 12)):
        acq = CTAcquisition(geometry="parallel", n_views=views, image_size=(_SIZE, _SIZE),
                            pixel_spacing=25, det_spacing=25)
        ds = CTSliceDataset(files[i:i + 1], acq)
        data[f"s{i}"] = (collate_ct_samples([ds[j] for j in range(len(ds))]), acq.protocol_vector())
    return data


def _model_factory(cond_dim: int = 0):
    return lambda: build_model(ModelConfig(n_iter=2, chans=4, num_pools=2, norm="group",
                                           cond_dim=cond_dim), complex_images=False)


def _run(strategy, data, factory, rounds=((0, ("s0", "s1")), (1, ("s0",)))):
    """Run ``rounds`` (round, answering sites); returns the sites and every update sent."""
    sites = {sid: Site(sid, model_factory=factory, train_loader=[batch], val_loader=[batch],
                       partition=strategy.partition, store=MemoryStore(), protocol=proto,
                       num_examples=batch.target.shape[0])
             for sid, (batch, proto) in data.items()}
    strategy.initialize(sites["s0"].initial_global_state(), list(sites),
                        {sid: s.protocol for sid, s in sites.items()})
    sent = []
    for rnd, answering in rounds:
        instructions = strategy.configure(rnd, list(sites))
        updates = [sites[s].fit(instructions[s]) for s in answering]
        sent += [(sites[u.site_id], u) for u in updates]
        strategy.aggregate(rnd, updates, missing=[s for s in sites if s not in answering])
    return sites, sent


def _audit(site, update, data):
    model = site.model_factory()
    global_names = site.partition.names(model, Scope.GLOBAL)
    assert list(update.tensors) == global_names
    for name in site.partition.names(model, Scope.LOCAL):
        assert name not in update.tensors
    assert "dc.raw_step" not in update.tensors
    forbidden = set()
    for batch, _ in data.values():
        for t in (batch.sinogram, batch.target):
            forbidden |= {tuple(t.shape), tuple(t.shape[1:])}
    assert not any(tuple(t.shape) in forbidden for t in update.tensors.values())
    check_update(update, global_names, {k: v.shape for k, v in model.state_dict().items()})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_end_to_end_and_sends_only_global_tensors(name, ct_sites_data):
    strategy = make_strategy(name, local_steps=2, lr=3e-3)
    sites, sent = _run(strategy, ct_sites_data, _model_factory())
    assert len(sent) == 3
    for site, update in sent:
        _audit(site, update, ct_sites_data)
    for sid, site in sites.items():
        metrics = site.evaluate(strategy.state.for_site(sid))
        assert math.isfinite(metrics["psnr"])
    if name == "fedbn":
        assert not any(".norm" in k for _, u in sent for k in u.tensors)


def test_hypernetwork_generates_film_parameters_end_to_end(ct_sites_data):
    factory = _model_factory(cond_dim=8)
    partition = Partition(frozenset({Role.DC, Role.ESTIMATOR}))  # FiLM (conditioning) GLOBAL
    targets = global_names_with_roles(factory(), partition, [Role.CONDITIONING])
    assert targets
    strategy = Hypernetwork(targets=targets, local_steps=2, lr=3e-3, partition=partition)
    _, sent = _run(strategy, ct_sites_data, factory, rounds=((0, ("s0", "s1")),))
    for site, update in sent:
        _audit(site, update, ct_sites_data)
        assert set(targets) <= set(update.tensors)
    p0, p1 = (strategy.state.personalized[s] for s in ("s0", "s1"))
    assert any(not torch.equal(p0[k], p1[k]) for k in targets)
    unseen = strategy.state_for_new_site(ct_sites_data["s1"][1] * 2)
    model = factory()
    partition.load_global(model, unseen)  # right keys and shapes for a fresh site
