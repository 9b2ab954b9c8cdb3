"""SimulationRunner: rounds, sampling and dropouts, the server-side gate, metrics records,
checkpoints, resume after a crash (in-process and after a real SIGKILL), 100+ virtual sites
with bounded memory, and the local / centralized baselines."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import acquisition, make_ct_sites, tiny_model_factory, write_ct_files
from fedrecon.datasets import CTSliceDataset, collate_ct_samples

from fedrecon.federated import FedAvg, PartitionViolation, Site, SiteUpdate
from fedrecon.models import ModelConfig, build_model
from fedrecon.runners import (
    RECORD_FIELDS,
    LocalOnly,
    RoundFailed,
    RoundRobinLoader,
    RoundStore,
    SimulationRunner,
    centralized_runner,
    read_metrics,
)

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_files(tmp_path_factory.mktemp("ct"), 3)


def _strategy(**kw) -> FedAvg:
    return FedAvg(local_steps=kw.pop("local_steps", 2), lr=3e-3, **kw)


def _run(ct_files, run_dir, n_sites=3, rounds=3, **kw) -> SimulationRunner:
    sites = make_ct_sites(ct_files, n_sites)
    runner = SimulationRunner(sites, _strategy(), rounds=rounds, run_dir=run_dir, seed=1,
                              progress=False, **kw)
    runner.run()
    return runner


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=1e-6, msg=k)


def _assert_one_record_per_site_per_round(run_dir: Path, site_ids, rounds: int) -> None:
    recs = read_metrics(run_dir)
    keys = [(r["round"], r["site"]) for r in recs]
    assert sorted(keys) == sorted((r, s) for r in range(rounds) for s in site_ids)


# -- one run -----------------------------------------------------------------------------------
def test_run_writes_records_checkpoint_and_versioned_store(ct_files, tmp_path, caplog):
    seen: list[SiteUpdate] = []
    with caplog.at_level(logging.INFO, logger="fedrecon.runners.simulation"):
        runner = _run(ct_files, tmp_path / "run", rounds=2, on_update=seen.append)
    recs = read_metrics(tmp_path / "run")
    assert len(recs) == 2 * 3
    for rec in recs:
        assert set(rec) == set(RECORD_FIELDS)
        assert rec["participated"] and rec["sampled"] and not rec["dropped"]
        assert rec["loss"] > 0 and rec["psnr"] > 0 and 0 < rec["ssim"] <= 1 and rec["nmse"] > 0
        assert rec["fit_seconds"] > 0 and rec["eval_split"] == "val"
    # bytes: the update's tensors up, the instructions' global_state down (same GLOBAL set)
    by_key = {(r["round"], r["site"]): r for r in recs}
    for u in seen:
        assert by_key[(u.round, u.site_id)]["bytes_sent"] == u.nbytes > 0
        assert by_key[(u.round, u.site_id)]["bytes_received"] == u.nbytes
    # one clean line per round
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert len(lines) == 2 and "3/3 sites answered" in lines[0]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["completed_rounds"] == 2 and ckpt["site_ids"] == ["ct0", "ct1", "ct2"]
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"} and "runner_rng" in ckpt
    assert set(ckpt["loader_rng"]) == {"ct0", "ct1", "ct2"}
    _assert_states_equal(ckpt["strategy"]["global_state"], runner.strategy.state.global_state)
    assert ckpt["metrics_bytes"] == (tmp_path / "run" / "metrics.jsonl").stat().st_size
    # LOCAL state: one trusted version per site (the last round's), nothing LOCAL-free
    for sid in ("ct0", "ct1", "ct2"):
        assert runner.store.versions(sid) == [2]
        assert set(runner.store.get(sid)["local"]) == {"dc.raw_step"}
    assert not list((tmp_path / "run").glob("**/*.tmp"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rounds"] == 2


def test_same_seed_same_run(ct_files, tmp_path):
    a = _run(ct_files, tmp_path / "a", rounds=2, fraction=0.5, drop_prob=0.3, retries=5)
    b = _run(ct_files, tmp_path / "b", rounds=2, fraction=0.5, drop_prob=0.3, retries=5)
    _assert_states_equal(a.strategy.state.global_state, b.strategy.state.global_state)
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds") and k != "time"}
    assert [strip(r) for r in read_metrics(tmp_path / "a")] == \
           [strip(r) for r in read_metrics(tmp_path / "b")]


class SpyFedAvg(FedAvg):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[tuple[int, list[str], list[str]]] = []

    def aggregate(self, round, updates, missing=()):
        self.calls.append((round, [u.site_id for u in updates], list(missing)))
        return super().aggregate(round, updates, missing)


def _fake_sites(n: int, batch, factory=None, **kw) -> list[Site]:
    """Sites with one in-memory batch as training and validation data."""
    factory = factory or tiny_model_factory()
    return [Site(f"s{i:03d}", model_factory=factory, train_loader=[batch], val_loader=[batch],
                 **kw) for i in range(n)]


@pytest.fixture(scope="module")
def ct_batch(ct_files):
    ds = CTSliceDataset(ct_files[:1], acquisition(0), seed=0)
    return collate_ct_samples([ds[0]])


def test_sampling_dropouts_and_missing(ct_batch, tmp_path):
    sites = _fake_sites(10, ct_batch)
    strategy = SpyFedAvg(local_steps=1)
    runner = SimulationRunner(sites, strategy, rounds=4, run_dir=tmp_path, fraction=0.3,
                              min_sites=2, drop_prob=0.3, retries=20, eval_every=2,
                              progress=False, seed=3)
    runner.run()
    recs = read_metrics(tmp_path)
    assert len(recs) == 4 * 10
    any_dropped = False
    for r, answered, missing in strategy.calls:
        rows = [x for x in recs if x["round"] == r]
        sampled = [x["site"] for x in rows if x["sampled"]]
        assert len(sampled) == 3  # max(2, ceil(0.3 * 10))
        assert sorted(answered + missing) == sampled and len(answered) >= 2
        assert sorted(x["site"] for x in rows if x["dropped"]) == missing
        assert sorted(x["site"] for x in rows if x["participated"]) == answered
        for x in rows:
            if not x["sampled"]:
                assert x["bytes_received"] == 0 and x["loss"] is None
            if x["dropped"]:
                assert x["bytes_sent"] == 0 and x["bytes_received"] > 0
        any_dropped |= bool(missing)
        evaluated = [x for x in rows if x["psnr"] is not None]
        assert len(evaluated) == (10 if r in (1, 3) else 0)  # eval_every=2
    assert any_dropped


def test_round_fails_when_too_few_sites_answer(ct_batch, tmp_path):
    runner = SimulationRunner(_fake_sites(3, ct_batch), FedAvg(local_steps=1), rounds=2,
                              run_dir=tmp_path, min_sites=3, drop_prob=0.9, retries=2,
                              progress=False)
    with pytest.raises(RoundFailed, match=r"min_sites=3 .* 3 tries"):
        runner.run()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["completed_rounds"] == 0
    assert read_metrics(tmp_path) == []


def test_arguments_are_checked(ct_batch, tmp_path):
    sites = _fake_sites(2, ct_batch)
    with pytest.raises(ValueError, match="min_sites"):
        SimulationRunner(sites, FedAvg(), rounds=1, run_dir=tmp_path, min_sites=3)
    with pytest.raises(ValueError, match="fraction"):
        SimulationRunner(sites, FedAvg(), rounds=1, run_dir=tmp_path, fraction=0)
    with pytest.raises(ValueError, match="partition"):
        SimulationRunner(sites, FedAvg(partition=FedAvg().partition.with_local("norm")),
                         rounds=1, run_dir=tmp_path)
    runner = SimulationRunner(sites, FedAvg(local_steps=1), rounds=1, run_dir=tmp_path,
                              progress=False)
    runner.run()
    with pytest.raises(FileExistsError, match="resume"):
        SimulationRunner(_fake_sites(2, ct_batch), FedAvg(), rounds=1, run_dir=tmp_path).run()
    with pytest.raises(ValueError, match="sites"):
        SimulationRunner.resume(tmp_path, _fake_sites(3, ct_batch), FedAvg())


def test_server_gate_refuses_a_local_tensor(ct_batch, tmp_path):
    sites = _fake_sites(2, ct_batch)
    honest_fit = sites[1].fit

    def leaky_fit(instructions):
        update = honest_fit(instructions)
        tensors = dict(update.tensors) | {"dc.raw_step": torch.zeros(2)}
        return dataclasses.replace(update, tensors=tensors)

    sites[1].fit = leaky_fit
    runner = SimulationRunner(sites, FedAvg(local_steps=1), rounds=1, run_dir=tmp_path,
                              progress=False)
    with pytest.raises(PartitionViolation, match="dc.raw_step"):
        runner.run()


# -- many sites ----------------------------------------------------------------------------------
def test_hundred_sites_hold_one_model_at_a_time(ct_batch, tmp_path):
    base = lambda: build_model(ModelConfig(n_iter=1, chans=2, num_pools=1), complex_images=False)
    alive: weakref.WeakSet = weakref.WeakSet()
    built = [0]

    def factory():
        model = base()
        alive.add(model)
        built[0] += 1
        return model

    peak = [0]

    def on_update(update):  # no gc.collect(): refcounting alone must free each model
        peak[0] = max(peak[0], len(alive))

    sites = _fake_sites(120, ct_batch, factory=factory)
    runner = SimulationRunner(sites, FedAvg(local_steps=1), rounds=2, run_dir=tmp_path,
                              fraction=0.5, eval_every=2, progress=False, on_update=on_update)
    state = runner.run()
    gc.collect()
    assert built[0] >= 120 and peak[0] <= 1 and len(alive) == 0
    recs = read_metrics(tmp_path)
    assert len(recs) == 2 * 120 and sum(r["participated"] for r in recs) == 2 * 60
    assert all(r["psnr"] is not None for r in recs if r["round"] == 1)
    trained = {r["site"] for r in recs if r["participated"]}
    assert sorted(runner.store.site_ids()) == sorted(trained)
    assert all(len(runner.store.versions(s)) == 1 for s in trained)
    assert all(torch.isfinite(v).all() for v in state.global_state.values())


# -- crash and resume ----------------------------------------------------------------------------
class Crash(Exception):
    pass


def test_resume_after_crash_mid_round_in_process(ct_files, tmp_path):
    reference = _run(ct_files, tmp_path / "ref", rounds=3)

    def crash_in_round_1(update):  # the first site of round 1 has already written its state
        if update.round == 1:
            raise Crash

    with pytest.raises(Crash):
        _run(ct_files, tmp_path / "run", rounds=3, on_update=crash_in_round_1)
    assert 2 in RoundStore(tmp_path / "run" / "sites").versions("ct0")  # uncommitted
    runner = SimulationRunner.resume(tmp_path / "run", make_ct_sites(ct_files, 3), _strategy(),
                                     progress=False)
    assert runner.completed_rounds == 1
    runner.run()
    _assert_states_equal(runner.strategy.state.global_state, reference.strategy.state.global_state)
    _assert_one_record_per_site_per_round(tmp_path / "run", ["ct0", "ct1", "ct2"], 3)
    for sid in ("ct0", "ct1", "ct2"):
        _assert_states_equal(runner.store.get(sid)["local"], reference.store.get(sid)["local"])


def test_run_until_round_then_resume_extends(ct_files, tmp_path):
    reference = _run(ct_files, tmp_path / "ref", rounds=3)
    sites = make_ct_sites(ct_files, 3)
    SimulationRunner(sites, _strategy(), rounds=2, run_dir=tmp_path / "run", seed=1,
                     progress=False).run(until_round=1)
    runner = SimulationRunner.resume(tmp_path / "run", make_ct_sites(ct_files, 3), _strategy(),
                                     rounds=3, progress=False)
    runner.run()
    _assert_states_equal(runner.strategy.state.global_state, reference.strategy.state.global_state)
    _assert_one_record_per_site_per_round(tmp_path / "run", ["ct0", "ct1", "ct2"], 3)


def test_resume_after_sigkill_matches_uninterrupted_run(ct_files, tmp_path):
    data = ct_files[0].parent
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    child = subprocess.Popen([sys.executable, str(HERE / "_kill_child.py"), str(data),
                              str(run_dir), "3", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "blocked").exists():
            if child.poll() is not None:
                raise AssertionError(f"child exited early: {child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "child did not reach round 2"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    # killed inside round 2: rounds 0-1 committed; site ct0 already wrote its round-2 state
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["completed_rounds"] == 2
    assert 3 in RoundStore(run_dir / "sites").versions("ct0")
    resumed = SimulationRunner.resume(run_dir, make_ct_sites(ct_files, 3), _strategy(),
                                      progress=False)
    resumed.run()
    reference = _run(ct_files, tmp_path / "ref", rounds=3)
    _assert_states_equal(resumed.strategy.state.global_state, reference.strategy.state.global_state)
    _assert_one_record_per_site_per_round(run_dir, ["ct0", "ct1", "ct2"], 3)
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds") and k != "time"}
    assert [strip(r) for r in read_metrics(run_dir)] == \
           [strip(r) for r in read_metrics(tmp_path / "ref")]


# -- baselines -----------------------------------------------------------------------------------
def test_local_only_never_mixes_sites(ct_files, tmp_path):
    sites = make_ct_sites(ct_files, 3)
    strategy = LocalOnly(local_steps=2, lr=3e-3)
    runner = SimulationRunner(sites, strategy, rounds=2, run_dir=tmp_path, progress=False)
    initial = {k: v.clone() for k, v in sites[0].initial_global_state().items()}
    runner.run()
    state = strategy.state
    assert set(state.personalized) == {"ct0", "ct1", "ct2"}
    name = next(k for k in initial if k.endswith("weight"))
    own = [state.for_site(s)[name] for s in ("ct0", "ct1", "ct2")]
    assert not torch.equal(own[0], own[1]) and not torch.equal(own[1], own[2])
    # each site's state is what a site trained alone reaches: equal to a 1-site run
    alone = SimulationRunner(make_ct_sites(ct_files, 1), LocalOnly(local_steps=2, lr=3e-3),
                             rounds=2, run_dir=tmp_path / "alone", progress=False)
    alone.run()
    _assert_states_equal(alone.strategy.state.for_site("ct0"), state.for_site("ct0"))
    _assert_one_record_per_site_per_round(tmp_path, ["ct0", "ct1", "ct2"], 2)


def test_round_robin_loader_alternates_sites():
    loader = RoundRobinLoader([["a0", "a1", "a2"], ["b0"], ["c0", "c1"]])
    assert list(loader) == ["a0", "b0", "c0", "a1", "c1", "a2"] and len(loader) == 6


def test_centralized_baseline_trains_one_model_on_pooled_data(ct_files, tmp_path):
    sites = make_ct_sites(ct_files, 3)
    sources: list[int] = []
    runner = centralized_runner(sites, rounds=2, run_dir=tmp_path, local_steps=2, lr=3e-3,
                                progress=False)
    pooled = runner.sites["pooled"]
    loader = pooled.train_loader
    honest_iter = type(loader).__iter__

    def spy_iter(self):
        for batch in honest_iter(self):
            sources.append(self.last_source)
            yield batch

    type(loader).__iter__ = spy_iter
    try:
        runner.run()
    finally:
        type(loader).__iter__ = honest_iter
    assert runner.strategy.local_steps == 2 * 3  # the steps of a federated round, all sites
    assert sources[:6] == [0, 1, 2, 0, 1, 2]
    recs = read_metrics(tmp_path)
    assert sorted((r["round"], r["site"]) for r in recs) == sorted(
        (r, s) for r in range(2) for s in ("pooled", "ct0", "ct1", "ct2"))
    for r in recs:
        if r["site"] == "pooled":
            assert r["participated"] and r["loss"] > 0 and r["psnr"] is None
        else:
            assert r["psnr"] > 0 and not r["participated"]
    again = centralized_runner(make_ct_sites(ct_files, 3), rounds=3, run_dir=tmp_path,
                               local_steps=2, lr=3e-3, resume=True, progress=False)
    assert again.completed_rounds == 2
    again.run()
    assert len(read_metrics(tmp_path)) == 3 * 4


def test_one_site_fedavg_equals_local_training(ct_files, tmp_path):
    """With one site, FedAvg is local training: the same GLOBAL tensors after 3 rounds, to
    the bit (the aggregation path adds nothing)."""
    states = {}
    for name, cls in (("fedavg", FedAvg), ("local", LocalOnly)):
        runner = SimulationRunner(make_ct_sites(ct_files, 1), cls(local_steps=2, lr=3e-3),
                                  rounds=3, run_dir=tmp_path / name, progress=False)
        states[name] = runner.run().for_site("ct0")
    assert states["fedavg"].keys() == states["local"].keys()
    for k, v in states["fedavg"].items():
        assert torch.equal(v, states["local"][k]), k
