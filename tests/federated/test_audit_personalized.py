"""Audit of the personalized strategies against hand re-derivations from the papers, on a
tiny linear "reconstruction" model trained by real :class:`Site` objects:

Ditto (Li et al. 2021, Alg. 1), FedRep (Collins et al. 2021, Alg. 1), FedBN (Li et al. 2021),
partial sharing, similarity weighting (FedAMP/FedFomo as documented), the hypernetwork's
server step (pFedHN, Shamsian et al. 2021, eq. 4), the mixture's gate, and resume.

The references below never call the code under test: Adam, the losses, the Jacobians and the
softmax weights are written out here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from fedrecon.federated import (
    Ditto,
    FedBN,
    FedRep,
    Hypernetwork,
    LocalOnly,
    MemoryStore,
    PartialSharing,
    SimilarityWeighted,
    Site,
    SiteUpdate,
    make_strategy,
    similarity_weights,
)
from fedrecon.models import Partition, Role

torch.set_num_threads(1)

DIM = 4
LR = 0.05


# -- a tiny linear model with one tensor per role ------------------------------------------------
class _Prior(nn.Module):
    role = Role.PRIOR

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))


class _Norm(nn.Module):
    role = Role.NORM

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))


class _Adapter(nn.Module):
    role = Role.ADAPTER

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, dtype=torch.float64))


class _DC(nn.Module):
    role = Role.DC

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, dtype=torch.float64))


class Tiny(nn.Module):
    """``out = gain * (scale * (y . w + b) + shift)``, shaped like a (B, 1, 1) image."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.prior = _Prior()
        self.norm = _Norm()
        self.adapter = _Adapter()
        self.dc = _DC()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.prior.weight.copy_(0.3 * torch.randn(DIM, generator=g, dtype=torch.float64))
            self.prior.bias.fill_(0.1)
            self.norm.scale.fill_(0.9)
            self.adapter.shift.fill_(0.05)
            self.dc.gain.fill_(1.1)

    def forward(self, y, op, protocol=None):
        return _forward(dict(self.named_parameters()), y)


def _forward(p: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    out = p["dc.gain"] * (p["norm.scale"] * (y @ p["prior.weight"] + p["prior.bias"])
                          + p["adapter.shift"])
    return out.reshape(-1, 1, 1)


@dataclass
class _Batch:  # what prepare_batch needs of a CT batch (the operator comes from op_factory)
    sinogram: torch.Tensor
    target: torch.Tensor
    protocol: torch.Tensor
    fname: list
    slice_num: list


def _batches(seed: int, n: int = 2, b: int = 3) -> list[_Batch]:
    g = torch.Generator().manual_seed(100 + seed)
    true_w = torch.randn(DIM, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        y = torch.randn(b, DIM, generator=g, dtype=torch.float64)
        target = (2.0 + y @ true_w + 0.1 * torch.randn(b, generator=g, dtype=torch.float64))
        out.append(_Batch(y, target.abs().reshape(b, 1, 1) + 0.5, torch.zeros(b, 2),
                          ["f"] * b, list(range(b))))
    return out


def _site(sid: str, seed: int, partition: Partition, num_examples: int) -> Site:
    return Site(sid, model_factory=Tiny, train_loader=_batches(seed), val_loader=_batches(seed),
                partition=partition, store=MemoryStore(), op_factory=lambda b, d: nn.Identity(),
                loss="mse", grad_clip=None, num_examples=num_examples)


# -- the reference: loss and Adam written out ------------------------------------------------------
def _loss(p: dict[str, torch.Tensor], batch: _Batch) -> torch.Tensor:
    out = _forward(p, batch.sinogram)
    dr = batch.target.flatten(1).amax(1)
    return ((out - batch.target).square().flatten(1).mean(1) / dr**2).mean()


def _adam(params: dict[str, torch.Tensor], batches: list[_Batch], steps: int,
          trainable: set[str], reg=None) -> dict[str, torch.Tensor]:
    """``steps`` steps of Adam (Kingma & Ba; torch's defaults) on ``trainable``, cycling
    ``batches`` from the first; the others fixed."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    p = {k: v.detach().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(p[k]) for k in trainable}
    v = {k: torch.zeros_like(p[k]) for k in trainable}
    for t in range(1, steps + 1):
        batch = batches[(t - 1) % len(batches)]
        leaves = {k: x.clone().requires_grad_(k in trainable) for k, x in p.items()}
        value = _loss(leaves, batch) + (reg(leaves) if reg is not None else 0.0)
        keys = sorted(trainable)
        grads = torch.autograd.grad(value, [leaves[k] for k in keys])
        for k, g in zip(keys, grads):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            p[k] = p[k] - LR * m_hat / (v_hat.sqrt() + eps)
    return p


def _init_params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in Tiny().named_parameters()}


ALL = set(_init_params())


def _close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _run_round(strategy, sites: dict[str, Site], rnd: int, answering) -> dict[str, SiteUpdate]:
    instructions = strategy.configure(rnd, list(answering))
    updates = {s: sites[s].fit(instructions[s]) for s in answering}
    strategy.aggregate(rnd, list(updates.values()),
                       missing=[s for s in sites if s not in answering])
    return updates


def _sites(partition: Partition, counts=(("a", 3), ("b", 1))) -> dict[str, Site]:
    return {sid: _site(sid, i, partition, n) for i, (sid, n) in enumerate(counts)}


def _global_keys(partition: Partition) -> set[str]:
    model = Tiny()
    return set(partition.global_state(model))


def _avg(states: list[dict[str, torch.Tensor]], weights: list[float], keys) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(w * s[k] for w, s in zip(weights, states)) / total for k in keys}


# -- Ditto -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_ditto_matches_algorithm_1_over_two_rounds_with_partial_participation(lam):
    partition = Partition.default()  # DC local; prior, norm, adapter global
    g_keys = _global_keys(partition)
    sites = _sites(partition)
    strat = Ditto(personal_lambda=lam, local_steps=3, lr=LR, partition=partition)
    strat.initialize(sites["a"].initial_global_state(), list(sites))
    w0 = _init_params()

    def pull(anchor):
        return lambda p: 0.5 * lam * sum((p[k] - anchor[k]).square().sum() for k in g_keys)

    # round 0: both sites; the personal model starts from the received model
    ups = _run_round(strat, sites, 0, ["a", "b"])
    w, v = {}, {}
    for s in "ab":
        batches = sites[s].train_loader
        w[s] = _adam(w0, batches, 3, ALL)
        v[s] = _adam(w0, batches, 3, ALL, reg=pull(w0))
        assert set(ups[s].tensors) == g_keys  # the personal model never travels
        for k in g_keys:
            _close(ups[s].tensors[k], w[s][k])
        _close(sites[s].store.get(s)["personal"], v[s])
    consensus = _avg([w["a"], w["b"]], [3, 1], g_keys)  # example-weighted FedAvg
    for k in g_keys:
        _close(strat.state.global_state[k], consensus[k])

    # round 1: only 'a'; its personal model continues from round 0 and is pulled to w^1
    v_b = copy.deepcopy(sites["b"].store.get("b")["personal"])
    _run_round(strat, sites, 1, ["a"])
    start = {**consensus, "dc.gain": w["a"]["dc.gain"]}  # its own LOCAL DC layer
    w_a = _adam(start, sites["a"].train_loader, 3, ALL)
    v_a = _adam(v["a"], sites["a"].train_loader, 3, ALL, reg=pull(consensus))
    _close(sites["a"].store.get("a")["personal"], v_a)
    for k in g_keys:
        _close(strat.state.global_state[k], w_a[k])
    _close(sites["a"].store.get("a")["local"]["dc.gain"], w_a["dc.gain"])
    # 'b' was not sampled: its personal model is untouched
    _close(sites["b"].store.get("b")["personal"], v_b, atol=0)
    # evaluation uses the personal model
    evaluated = sites["a"].evaluation_model(strat.state.for_site("a")).state_dict()
    _close(evaluated, v_a)


# -- FedRep ------------------------------------------------------------------------------------
def test_fedrep_trains_head_then_body_and_averages_only_the_body():
    partition = Partition.from_names(["dc", "adapter"])  # head: DC and adapter
    head = {"dc.gain", "adapter.shift"}
    body = ALL - head
    sites = _sites(partition)
    strat = FedRep(local_first_steps=2, local_steps=3, lr=LR, partition=partition)
    strat.initialize(sites["a"].initial_global_state(), list(sites))
    assert set(strat.state.global_state) == body
    ups = _run_round(strat, sites, 0, ["a", "b"])
    p = {}
    for s in "ab":
        batches = sites[s].train_loader
        after_head = _adam(_init_params(), batches, 2, head)  # body frozen
        p[s] = _adam(after_head, batches, 3, body)  # then head frozen (fresh optimizer)
        assert set(ups[s].tensors) == body
        for k in body:
            _close(ups[s].tensors[k], p[s][k])
        for k in head:
            _close(sites[s].store.get(s)["local"][k], p[s][k])
    consensus = _avg([p["a"], p["b"]], [3, 1], body)
    for k in body:
        _close(strat.state.global_state[k], consensus[k])
    # round 1 ('a' only) starts from the consensus body and a's own head
    _run_round(strat, sites, 1, ["a"])
    start = {**consensus, **{k: p["a"][k] for k in head}}
    ref = _adam(_adam(start, sites["a"].train_loader, 2, head), sites["a"].train_loader, 3, body)
    for k in body:
        _close(strat.state.global_state[k], ref[k])
    for k in head:
        _close(sites["a"].store.get("a")["local"][k], ref[k])
        _close(sites["b"].store.get("b")["local"][k], p["b"][k], atol=0)


# -- FedBN and partial sharing ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fedbn", "partial"])
def test_local_roles_stay_at_the_site_and_the_rest_is_example_weighted(kind):
    if kind == "fedbn":
        strat = FedBN(local_steps=2, lr=LR)
        local = {"dc.gain", "norm.scale"}  # the default partition plus NORM
    else:
        strat = PartialSharing(local_steps=2, lr=LR, partition=Partition.from_names(["adapter"]))
        local = {"adapter.shift"}  # DC becomes GLOBAL under this partition
    shared = ALL - local
    sites = _sites(strat.partition, counts=(("a", 2), ("b", 5), ("c", 1)))
    strat.initialize(sites["a"].initial_global_state(), list(sites))
    assert set(strat.state.global_state) == shared
    ups = _run_round(strat, sites, 0, ["a", "b", "c"])
    p = {s: _adam(_init_params(), sites[s].train_loader, 2, ALL) for s in sites}
    for s in sites:
        assert set(ups[s].tensors) == shared
    consensus = _avg([p[s] for s in "abc"], [2, 5, 1], shared)
    for k in shared:
        _close(strat.state.global_state[k], consensus[k])
    # round 1 at 'c': the consensus over its own LOCAL tensors, which are carried over
    _run_round(strat, sites, 1, ["c"])
    ref = _adam({**consensus, **{k: p["c"][k] for k in local}}, sites["c"].train_loader, 2, ALL)
    for k in local:
        _close(sites["c"].store.get("c")["local"][k], ref[k])
        _close(sites["a"].store.get("a")["local"][k], p["a"][k], atol=0)
    for k in shared:
        _close(strat.state.global_state[k], ref[k])


# -- similarity weighting -------------------------------------------------------------------------
def _np_states(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)} for _ in range(n)]


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_flat(s: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([s["w"].ravel(), s["b"].ravel()])


def _to_torch(s):
    return {k: torch.from_numpy(v.copy()) for k, v in s.items()}


@pytest.mark.parametrize("metric", ["distance", "cosine"])
def test_similarity_weighting_matches_its_docstring_over_two_rounds(metric):
    temperature = 0.3
    start = _np_states(1, 0)[0]
    strat = SimilarityWeighted(metric=metric, temperature=temperature)
    strat.initialize(_to_torch(start), ["a", "b", "c", "d"])
    ref_personal: dict[str, dict[str, np.ndarray]] = {}
    ref_global = start
    for rnd, (ids, counts) in enumerate(((["a", "b", "c"], [1, 4, 2]), (["b", "c"], [3, 1]))):
        new = _np_states(len(ids), 10 + rnd)
        ups = [SiteUpdate(s, rnd, _to_torch(n), "weights", c) for s, n, c in zip(ids, new, counts)]
        out = strat.aggregate(rnd, ups, missing=["a"] if rnd else [])
        x = np.stack([_np_flat(n) for n in new])
        if metric == "distance":
            d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
            off = d[~np.eye(len(ids), dtype=bool)].mean()
            a = _np_softmax(-d / (temperature * off))
        else:  # the round's updates, each from what that site was sent
            sent = [ref_personal.get(s, ref_global) for s in ids]
            u = x - np.stack([_np_flat(s) for s in sent])
            u = u / np.linalg.norm(u, axis=1, keepdims=True)
            a = _np_softmax(u @ u.T / temperature)
        for i, s in enumerate(ids):
            ref_personal[s] = {k: sum(a[i, j] * new[j][k] for j in range(len(ids))) for k in start}
        ref_global = {k: sum(c * n[k] for c, n in zip(counts, new)) / sum(counts) for k in start}
        for s, ref in ref_personal.items():  # 'a' keeps its round-0 state in round 1
            for k in start:
                np.testing.assert_allclose(out.personalized[s][k].numpy(), ref[k], rtol=0, atol=1e-12)
        for k in start:
            np.testing.assert_allclose(out.global_state[k].numpy(), ref_global[k], rtol=0, atol=1e-12)
        assert "d" not in out.personalized
        # configure sends each site its own state, the consensus to a site never heard from
        sent = strat.configure(rnd + 1, ["a", "d"])
        np.testing.assert_allclose(sent["a"].global_state["b"].numpy(), ref_personal["a"]["b"], atol=1e-12)
        np.testing.assert_allclose(sent["d"].global_state["b"].numpy(), ref_global["b"], atol=1e-12)


# -- hypernetwork ---------------------------------------------------------------------------------
def _theta(phi: dict[str, torch.Tensor], e: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
    """``base + W2 silu(W1 e + b1) / sqrt(hidden)``, split into the target tensors."""
    h = e @ phi["W1"].T + phi["b1"]
    h = h * torch.sigmoid(h)
    flat = phi["base"] + (phi["W2"] @ h) / math.sqrt(phi["W2"].shape[1])
    out, i = {}, 0
    for k, shape in shapes.items():
        n = math.prod(shape)
        out[k] = flat[i:i + n].reshape(shape)
        i += n
    return out


@pytest.mark.parametrize("embedding", ["protocol", "learned"])
def test_hypernetwork_step_is_the_pfedhn_chain_rule_and_survives_a_resume(embedding):
    g = torch.Generator().manual_seed(3)
    start = {"w": torch.randn(2, 3, generator=g, dtype=torch.float64),
             "b": torch.randn(3, generator=g, dtype=torch.float64),
             "c": torch.randn(4, generator=g, dtype=torch.float64)}
    shapes = {"w": (2, 3), "b": (3,)}
    ids = ["a", "b", "c"]
    protocols = {"a": torch.tensor([16.0, 0.0, 5.0]), "b": torch.tensor([64.0, 1.0, -4.0]),
                 "c": torch.tensor([32.0, 2.0, 6.0])}
    lr = 0.4
    kw = {"targets": ["w", "b"], "embedding": embedding, "embed_dim": 3, "hidden": 5,
          "hn_lr": lr, "seed": 7}
    strat = Hypernetwork(**kw)
    strat.initialize(start, ids, protocols)
    net = strat.hypernet
    phi = {"W1": net.body[0].weight, "b1": net.body[0].bias, "W2": net.head.weight, "base": net.base}
    phi = {k: v.detach().clone() for k, v in phi.items()}
    if embedding == "protocol":
        emb = {s: torch.sign(p.double()) * torch.log1p(p.double().abs()) for s, p in protocols.items()}
    else:
        emb = {s: strat.embeddings.weight[i].detach().clone() for i, s in enumerate(ids)}

    for rnd, (answering, counts) in enumerate(((["a", "b"], [1, 3]), (["c", "a"], [2, 2]))):
        if rnd == 1:  # resume from a checkpoint into a fresh strategy
            saved = copy.deepcopy(strat.state_dict())
            strat = Hypernetwork(**kw)
            strat.load_state_dict(saved)
        sent = strat.configure(rnd, answering)
        ups, changes = [], {}
        for j, (s, n) in enumerate(zip(answering, counts)):
            theta = _theta(phi, emb[s], shapes)
            for k in shapes:  # the site receives h_phi(e_s) over the targets
                _close(sent[s].global_state[k], theta[k], atol=1e-12)
            new = {k: v + 0.1 * (j + 1) * torch.randn(v.shape, generator=g, dtype=torch.float64)
                   for k, v in sent[s].global_state.items()}
            changes[s] = {k: sent[s].global_state[k] - new[k] for k in shapes}  # old - new
            ups.append(SiteUpdate(s, rnd, new, "weights", n))
        out = strat.aggregate(rnd, ups, missing=[s for s in ids if s not in answering])
        # phi <- phi - lr * sum_i p_i (d theta_i / d phi)^T (theta_old - theta_new)
        grads = {k: torch.zeros_like(v) for k, v in phi.items()}
        emb_grads = {}
        for s, n in zip(answering, counts):
            p_i = n / sum(counts)
            names = list(phi)
            flat_change = torch.cat([changes[s][k].reshape(-1) for k in shapes])

            def flat_theta(*args, s=s, names=names):
                th = _theta(dict(zip(names, args[:-1])), args[-1], shapes)
                return torch.cat([th[k].reshape(-1) for k in shapes])

            jac = torch.autograd.functional.jacobian(flat_theta, (*[phi[k] for k in names], emb[s]))
            for k, J in zip(names, jac[:-1]):
                grads[k] += p_i * torch.tensordot(flat_change, J, dims=1)
            emb_grads[s] = p_i * torch.tensordot(flat_change, jac[-1], dims=1)
        phi = {k: v - lr * grads[k] for k, v in phi.items()}
        if embedding == "learned":
            emb = {s: e - lr * emb_grads[s] if s in emb_grads else e for s, e in emb.items()}
        consensus = {k: sum(n * u.tensors[k] for n, u in zip(counts, ups)) / sum(counts)
                     for k in start}
        for s in ids:  # every known site, answered or not, gets h_phi(e_s) over the targets
            theta = _theta(phi, emb[s], shapes)
            for k in shapes:
                _close(out.personalized[s][k], theta[k], atol=1e-12)
            _close(out.personalized[s]["c"], consensus["c"], atol=1e-12)
        _close(out.global_state, consensus, atol=1e-12)
        new_site = strat.state_for_new_site(
            protocols["a"] * 2 if embedding == "protocol" else None)
        e_new = (torch.sign(2 * protocols["a"].double()) * torch.log1p(2 * protocols["a"].double().abs())
                 if embedding == "protocol" else torch.stack(list(emb.values())).mean(0))
        for k in shapes:
            _close(new_site[k], _theta(phi, e_new, shapes)[k], atol=1e-12)


def test_hypernetwork_resume_refuses_another_embedding_kind():
    """A checkpoint of learned embeddings loaded into embedding='protocol' (protocol vectors
    as long as the embeddings) used to resume silently without its embeddings."""
    start = {"b": torch.zeros(3, dtype=torch.float64)}
    protocols = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([3.0, 2.0, 1.0])}
    learned = Hypernetwork(embedding="learned", embed_dim=3, hidden=4)
    learned.initialize(start, ["a", "b"], protocols)
    with pytest.raises(ValueError, match="embedding"):
        Hypernetwork(embedding="protocol", hidden=4).load_state_dict(copy.deepcopy(learned.state_dict()))
    protocol = Hypernetwork(embedding="protocol", embed_dim=3, hidden=4)
    protocol.initialize(start, ["a", "b"], protocols)
    with pytest.raises(ValueError, match="embedding"):
        Hypernetwork(embedding="learned", embed_dim=3, hidden=4).load_state_dict(
            copy.deepcopy(protocol.state_dict()))


# -- arguments -------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name, kwargs, key", [
    ("similarity", {"temperature": NAN}, "temperature"),
    ("similarity", {"temperature": INF}, "temperature"),
    ("similarity", {"temperature": 0.0}, "temperature"),
    ("ditto", {"personal_lambda": NAN}, "personal_lambda"),
    ("ditto", {"personal_lambda": INF}, "personal_lambda"),
    ("ditto", {"personal_lambda": None}, "personal_lambda"),
    ("mixture", {"personal_lambda": NAN}, "personal_lambda"),
    ("mixture", {"personal_lambda": -1.0}, "personal_lambda"),
    ("fedrep", {"local_first_steps": 2.5}, "local_first_steps"),
    ("fedrep", {"local_first_steps": -1}, "local_first_steps"),
    ("hypernetwork", {"hn_lr": NAN}, "hn_lr"),
    ("hypernetwork", {"hn_lr": INF}, "hn_lr"),
    ("hypernetwork", {"hn_lr": 0.0}, "hn_lr"),
    ("hypernetwork", {"hidden": 2.5}, "hidden"),
    ("hypernetwork", {"embed_dim": 0}, "embed_dim"),
    ("hypernetwork", {"embed_dim": 1.5}, "embed_dim"),
    ("hypernetwork", {"targets": "prior.conv.bias"}, "targets"),
])
def test_bad_arguments_are_refused_naming_them(name, kwargs, key):
    with pytest.raises((TypeError, ValueError), match=f"'{key}'"):
        make_strategy(name, **kwargs)


def test_similarity_weights_refuses_a_bad_temperature():
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (NAN, 0.0, -1.0):
        with pytest.raises(ValueError, match="'temperature'"):
            similarity_weights(x, metric="distance", temperature=t)


def test_good_arguments_still_pass():
    make_strategy("similarity", temperature=1)  # a TOML int
    make_strategy("ditto", personal_lambda=0)
    make_strategy("fedrep", local_first_steps=np.int64(3))
    make_strategy("hypernetwork", hn_lr=np.float64(0.1), hidden=0, embed_dim=2,
                  targets=("prior.conv.bias",))


# -- mixture -------------------------------------------------------------------------------------
def _np_psnr(out: np.ndarray, target: np.ndarray) -> np.ndarray:
    mse = ((out - target) ** 2).reshape(len(target), -1).mean(1)
    peak = target.reshape(len(target), -1).max(1)
    return 10 * np.log10(peak**2 / mse)


def test_mixture_gate_is_the_best_validation_psnr_of_the_trained_experts():
    from fedrecon.federated import Mixture, MixtureOfExperts

    partition = Partition.default()
    g_keys = _global_keys(partition)
    sites = _sites(partition)
    strat = Mixture(personal_lambda=0.2, local_steps=3, lr=LR, partition=partition)
    strat.initialize(sites["a"].initial_global_state(), list(sites))
    _run_round(strat, sites, 0, ["a", "b"])
    w0 = _init_params()
    w = {s: _adam(w0, sites[s].train_loader, 3, ALL) for s in "ab"}
    consensus = _avg([w["a"], w["b"]], [3, 1], g_keys)
    for s in "ab":
        personal = _adam(w0, sites[s].train_loader, 3, ALL,
                         reg=lambda p: 0.1 * sum((p[k] - w0[k]).square().sum() for k in g_keys))
        shared = {**consensus, "dc.gain": w[s]["dc.gain"]}
        scores = {}
        for alpha in [i / 20 for i in range(21)]:
            vals = []
            for batch in sites[s].val_loader:
                mix = (alpha * _forward(personal, batch.sinogram)
                       + (1 - alpha) * _forward(shared, batch.sinogram))
                vals += list(_np_psnr(mix.detach().float().numpy(), batch.target.float().numpy()))
            scores[alpha] = float(np.mean(vals))
        ref_alpha = max(sorted(scores, reverse=True), key=scores.get)  # ties: the larger gate
        model = sites[s].evaluation_model(strat.state.for_site(s))
        assert isinstance(model, MixtureOfExperts)
        assert model.alpha == pytest.approx(ref_alpha)
        for alpha, v in scores.items():
            assert model.scores[alpha] == pytest.approx(v, abs=1e-3)


# -- resume of the server-side personalized states --------------------------------------------------
@pytest.mark.parametrize("cls", [LocalOnly, SimilarityWeighted])
def test_resume_continues_identically(cls, tmp_path):
    start = _to_torch(_np_states(1, 0)[0])
    a = cls()
    a.initialize(start, ["a", "b", "c"])
    a.aggregate(0, [SiteUpdate(s, 0, _to_torch(n), "weights", i + 1)
                    for i, (s, n) in enumerate(zip("abc", _np_states(3, 1)))])
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    b = cls()
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    second = [SiteUpdate(s, 1, _to_torch(n), "delta", 2) for s, n in zip("ab", _np_states(2, 2))]
    out_a = a.aggregate(1, copy.deepcopy(second), missing=["c"])
    out_b = b.aggregate(1, copy.deepcopy(second), missing=["c"])
    assert out_a.personalized.keys() == out_b.personalized.keys() == {"a", "b", "c"}
    for s in out_a.personalized:
        _close(out_a.personalized[s], out_b.personalized[s], atol=0)
    _close(out_a.global_state, out_b.global_state, atol=0)
