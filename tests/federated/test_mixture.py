"""Mixture of a personal and the shared expert: the gate is the analytic optimum on
hand-made experts, the fitted mixture is never worse than either expert on the split it was
fitted on, and its training is exactly Ditto's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "runners"))
from _common import make_ct_sites, write_ct_files

from fedrecon.federated import Ditto, Mixture, MixtureOfExperts, fit_mixture_weight
from fedrecon.runners import SimulationRunner
from fedrecon.train.batching import prepare_batch


class _Replay(nn.Module):
    """An "expert" that returns precomputed images, one per call (batch order)."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, y, op, protocol=None):
        out = self.outputs[self.calls]
        self.calls += 1
        return out


@pytest.fixture
def val_batches(tmp_path):
    site = make_ct_sites(write_ct_files(tmp_path, 1), 1)[0]
    batches = list(site.val_loader)
    targets = [prepare_batch(b, torch.device("cpu"), None).target for b in batches]
    g = torch.Generator().manual_seed(0)
    errors = [0.01 * torch.randn(t.shape, generator=g) for t in targets]
    return batches, targets, errors


def test_gate_is_the_analytic_optimum(val_batches):
    batches, targets, errors = val_batches
    # personal = t + 2e, shared = t - e/2: the mixture's error (2.5 alpha - 0.5) e is zero
    # at alpha = 0.2, and grows on either side
    personal = _Replay([t + 2 * e for t, e in zip(targets, errors)])
    shared = _Replay([t - e / 2 for t, e in zip(targets, errors)])
    alpha, scores = fit_mixture_weight(personal, shared, batches)
    assert alpha == pytest.approx(0.2)
    grid = sorted(scores)
    k = grid.index(alpha)
    assert all(scores[grid[i]] < scores[grid[i + 1]] for i in range(k))
    assert all(scores[grid[i]] > scores[grid[i + 1]] for i in range(k, len(grid) - 1))
    # the module applies the same convex combination
    mix = MixtureOfExperts(_Replay([t + 2 * e for t, e in zip(targets, errors)]),
                           _Replay([t - e / 2 for t, e in zip(targets, errors)]), alpha)
    prep = prepare_batch(batches[0], torch.device("cpu"), None)
    torch.testing.assert_close(mix(prep.y, prep.op), targets[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("exact", ["personal", "shared"])
def test_gate_picks_the_exact_expert(val_batches, exact):
    batches, targets, errors = val_batches
    good = [t.clone() for t in targets]
    bad = [t + e for t, e in zip(targets, errors)]
    personal, shared = (good, bad) if exact == "personal" else (bad, good)
    alpha, _ = fit_mixture_weight(_Replay(personal), _Replay(shared), batches)
    assert alpha == (1.0 if exact == "personal" else 0.0)


def test_gate_arguments_are_checked(val_batches):
    batches, targets, _ = val_batches
    with pytest.raises(ValueError, match="grid"):
        fit_mixture_weight(_Replay(targets), _Replay(targets), batches, grid=[0.5, 1.5])
    with pytest.raises(ValueError, match="no batches"):
        fit_mixture_weight(_Replay(targets), _Replay(targets), [])
    with pytest.raises(ValueError, match="alpha"):
        MixtureOfExperts(nn.Identity(), nn.Identity(), -0.1)


def _run(strategy, tmp_path: Path, tag: str):
    files = write_ct_files(tmp_path / f"data-{tag}", 2)
    sites = make_ct_sites(files, 2)
    runner = SimulationRunner(sites, strategy, rounds=2, run_dir=tmp_path / f"run-{tag}",
                              progress=False)
    runner.run()
    return runner


def test_mixture_trains_as_ditto_and_is_never_worse_than_its_experts(tmp_path):
    torch.set_num_threads(1)
    mix = _run(Mixture(personal_lambda=1e-3, local_steps=2, lr=3e-3), tmp_path, "mix")
    ditto = _run(Ditto(personal_lambda=1e-3, local_steps=2, lr=3e-3), tmp_path, "ditto")
    for sid, site in mix.sites.items():
        # the same training as Ditto, bit for bit: personal models and consensus
        mine, theirs = mix.store.get(sid)["personal"], ditto.store.get(sid)["personal"]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        state = mix.strategy.state.for_site(sid)
        model = site.evaluation_model(state)
        assert isinstance(model, MixtureOfExperts) and 0.0 <= model.alpha <= 1.0
        both = site.evaluate(state)["psnr"]
        personal = site.evaluate(state, personal=True)["psnr"]
        shared = site.evaluate(state, personal=False)["psnr"]
        # fitted on the validation split, so on that split it is at least as good as either
        assert both >= max(personal, shared) - 1e-9
        assert model.scores[model.alpha] == pytest.approx(both, rel=1e-6)
    for k, v in mix.strategy.state.global_state.items():
        assert torch.equal(v, ditto.strategy.state.global_state[k])


def test_personal_expert_without_pull_is_local_only_training(tmp_path):
    """lambda = 0: the personal expert sees the same seeds and batches as a local-only site,
    so it is the local-only model bit for bit, and the mixture (gate 1 allowed) can only
    match or beat local-only on the split the gate is fitted on."""
    from fedrecon.federated import LocalOnly

    torch.set_num_threads(1)
    mix = _run(Mixture(personal_lambda=0.0, local_steps=2, lr=3e-3), tmp_path, "mix0")
    local = _run(LocalOnly(local_steps=2, lr=3e-3), tmp_path, "local")
    for sid, site in mix.sites.items():
        mine = mix.store.get(sid)["personal"]
        theirs = local.sites[sid].build_model(local.strategy.state.for_site(sid)).state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k
        state = mix.strategy.state.for_site(sid)
        local_psnr = local.sites[sid].evaluate(local.strategy.state.for_site(sid))["psnr"]
        assert site.evaluate(state)["psnr"] >= local_psnr - 1e-9
