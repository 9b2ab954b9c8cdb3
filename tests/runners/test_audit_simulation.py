"""Audit of the embedded runner: resume in every way a user can reach it (split runs, an
interrupted ``run()`` called again, evaluation straight after resume), refusal of a run
folder from another config, damaged files, stale files, argument checks, and the LOCAL
state of each site checked against a hand count on a minimal model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import acquisition, make_ct_sites, tiny_model_factory, write_ct_files
from fedrecon.datasets import CTSliceDataset, collate_ct_samples

from fedrecon.federated import FedAvg, Partition, Site
from fedrecon.models import ModelConfig, build_model
from fedrecon.runners import (
    RoundFailed,
    RoundStore,
    SimulationRunner,
    centralized_runner,
    read_metrics,
)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_files(tmp_path_factory.mktemp("ct_audit"), 3)


@pytest.fixture(scope="module")
def ct_batch(ct_files):
    ds = CTSliceDataset(ct_files[:1], acquisition(0), seed=0)
    return collate_ct_samples([ds[0]])


def _strategy() -> FedAvg:
    return FedAvg(local_steps=1, lr=3e-3)


KW = {"seed": 5, "fraction": 0.67, "drop_prob": 0.3, "retries": 20, "progress": False}


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.endswith("seconds") and k != "time"}


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=1e-6, msg=k)


def _assert_same_run(run: SimulationRunner, ref: SimulationRunner, ids=("ct0", "ct1", "ct2")):
    _assert_states_equal(run.strategy.state.global_state, ref.strategy.state.global_state)
    for sid in ids:
        a, b = run.store.get(sid), ref.store.get(sid)
        assert (a is None) == (b is None), sid
        if a is not None:
            _assert_states_equal(a["local"], b["local"])
    got = [_strip(r) for r in read_metrics(run.run_dir)]
    assert got == [_strip(r) for r in read_metrics(ref.run_dir)]


@pytest.fixture(scope="module")
def reference(ct_files, tmp_path_factory) -> SimulationRunner:
    """An uninterrupted 3-round run with sampling and dropouts (one thread, as the tests:
    module fixtures run before the autouse ``one_thread``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = SimulationRunner(make_ct_sites(ct_files, 3), _strategy(), rounds=3,
                                  run_dir=tmp_path_factory.mktemp("ref") / "run", **KW)
        runner.run()
    finally:
        torch.set_num_threads(before)
    return runner


# -- resume ----------------------------------------------------------------------------------
def test_split_run_with_sampling_and_dropouts_equals_uninterrupted(ct_files, tmp_path,
                                                                   reference):
    """Run 1 round (a run of 1 round), then resume with 3: sampling and dropout streams,
    global and LOCAL states and the records equal the uninterrupted run's."""
    SimulationRunner(make_ct_sites(ct_files, 3), _strategy(), rounds=3,
                     run_dir=tmp_path, **KW).run(until_round=1)
    runner = SimulationRunner.resume(tmp_path, make_ct_sites(ct_files, 3), _strategy(),
                                     progress=False)
    assert runner.completed_rounds == 1
    runner.run()
    _assert_same_run(runner, reference)


def test_evaluation_right_after_resume_uses_the_committed_local_state(ct_files, tmp_path,
                                                                      reference):
    """``fedrecon evaluate`` resumes a finished run and evaluates without running a round:
    each site must reconstruct with the LOCAL state it trained, not its initial one."""
    SimulationRunner(make_ct_sites(ct_files, 3), _strategy(), rounds=3,
                     run_dir=tmp_path, **KW).run()
    sites = make_ct_sites(ct_files, 3)
    runner = SimulationRunner.resume(tmp_path, sites, _strategy(), progress=False)
    runner.run()  # nothing left to run
    state = runner.strategy.state
    for site in sites:
        trained = reference.store.get(site.site_id)
        if trained is None:  # never sampled: nothing to compare
            continue
        _assert_states_equal(runner.store.get(site.site_id)["local"], trained["local"])
        model = site.evaluation_model(state.for_site(site.site_id))
        own = model.state_dict()
        for k, v in trained["local"].items():
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_run_called_again_after_an_interrupted_round_equals_uninterrupted(ct_files, tmp_path,
                                                                          reference):
    """Ctrl-C inside a round (in a notebook), then ``runner.run()`` again on the same object:
    the round is redone from the last checkpoint, as a resume would."""
    state = {"armed": True}

    def interrupt(update):
        if update.round == 1 and state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt

    runner = SimulationRunner(make_ct_sites(ct_files, 3), _strategy(), rounds=3,
                              run_dir=tmp_path, on_update=interrupt, **KW)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert runner.completed_rounds == 1
    runner.run()
    _assert_same_run(runner, reference)


def test_stale_files_of_another_run_are_not_picked_up(ct_files, tmp_path, reference):
    """A run folder whose checkpoint was deleted (a user restarting from scratch) still holds
    LOCAL state files; a fresh run must not start from them."""
    junk = RoundStore(tmp_path / "sites")
    for sid in ("ct0", "ct1", "ct2"):
        junk.put_initial(sid, {"local": {"dc.raw_step": torch.full((2,), 3.0)}})
    (tmp_path / f".checkpoint.pt.{'x' * 8}.tmp").write_bytes(b"half")
    runner = SimulationRunner(make_ct_sites(ct_files, 3), _strategy(), rounds=3,
                              run_dir=tmp_path, **KW)
    runner.run()
    _assert_same_run(runner, reference)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_resume_removes_a_half_written_checkpoint_temp_file(ct_files, tmp_path):
    SimulationRunner(make_ct_sites(ct_files, 2), _strategy(), rounds=1, run_dir=tmp_path,
                     progress=False).run()
    stale = tmp_path / ".checkpoint.pt.abcd1234.tmp"  # SIGKILL inside atomic_torch_save
    stale.write_bytes(b"half a checkpoint")
    SimulationRunner.resume(tmp_path, make_ct_sites(ct_files, 2), _strategy(), progress=False)
    assert not stale.exists()


# -- a run folder of another config ------------------------------------------------------------
@pytest.fixture()
def one_round(ct_batch, tmp_path) -> Path:
    SimulationRunner(_fake_sites(2, ct_batch), FedAvg(local_steps=1), rounds=1,
                     run_dir=tmp_path / "run", progress=False).run()
    return tmp_path / "run"


def _fake_sites(n: int, batch, factory=None, **kw) -> list[Site]:
    factory = factory or tiny_model_factory()
    return [Site(f"s{i:03d}", model_factory=factory, train_loader=[batch], val_loader=[batch],
                 **kw) for i in range(n)]


def test_resume_refuses_sites_with_another_seed(one_round, ct_batch):
    with pytest.raises(ValueError, match=r"seed.*s000"):
        SimulationRunner.resume(one_round, _fake_sites(2, ct_batch, seed=7), FedAvg(),
                                progress=False)


def test_resume_refuses_another_partition_or_model(one_round, ct_batch):
    """The run's GLOBAL tensors must be this model's: a resume under another partition or
    architecture is refused before anything is touched, naming the tensors."""
    partition = Partition.default().with_local("prior")
    with pytest.raises(ValueError, match=r"GLOBAL.*only in the run: \['priors"):
        SimulationRunner.resume(one_round, _fake_sites(2, ct_batch, partition=partition),
                                FedAvg(partition=partition), progress=False)
    wider = lambda: build_model(ModelConfig(n_iter=2, chans=6, num_pools=1),
                                complex_images=False)
    with pytest.raises(ValueError, match=r"other shape: \['priors"):
        SimulationRunner.resume(one_round, _fake_sites(2, ct_batch, factory=wider), FedAvg(),
                                progress=False)
    before = (one_round / "metrics.jsonl").read_bytes()
    SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(), progress=False)
    assert (one_round / "metrics.jsonl").read_bytes() == before


def test_resume_names_the_sites_that_differ(one_round, ct_batch):
    sites = _fake_sites(3, ct_batch)
    with pytest.raises(ValueError, match="s002"):
        SimulationRunner.resume(one_round, sites[1:], FedAvg(), progress=False)
    with pytest.raises(ValueError, match="order"):
        SimulationRunner.resume(one_round, sites[:2][::-1], FedAvg(), progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not_a_dict"])
def test_damaged_checkpoint_names_the_file(one_round, ct_batch, damage):
    ckpt = one_round / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "not_a_dict":
        torch.save([1, 2, 3], ckpt)
    else:
        ckpt.write_bytes({"garbage": b"not a checkpoint", "truncated": data[: len(data) // 2],
                          "empty": b""}[damage])
    with pytest.raises(OSError, match="checkpoint.pt"):
        SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(), progress=False)


def test_metrics_shorter_than_the_checkpoint_says_is_an_error(one_round, ct_batch):
    """Truncating "up" would pad the file with NUL bytes."""
    path = one_round / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(OSError, match="metrics.jsonl"):
        SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(), progress=False)
    assert b"\0" not in path.read_bytes()


def test_a_torn_metrics_line_names_the_file(one_round):
    path = one_round / "metrics.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"round": 1, "si')  # killed mid-append
    with pytest.raises(ValueError, match=r"metrics.jsonl.*line 3"):
        read_metrics(one_round)


def test_damaged_local_state_names_the_file(one_round, ct_batch):
    path = one_round / "sites" / "s000" / "000001.pt"
    path.write_bytes(path.read_bytes()[:20])
    runner = SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(local_steps=1),
                                     rounds=2, progress=False)
    with pytest.raises(OSError, match="000001.pt"):
        runner.run()


# -- arguments --------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument(ct_batch, tmp_path):
    sites = _fake_sites(2, ct_batch)
    for rounds in (0, -1):
        with pytest.raises(ValueError, match="'rounds'"):
            SimulationRunner(sites, FedAvg(), rounds=rounds, run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="'sites'"):
        SimulationRunner([], FedAvg(), rounds=1, run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="s000"):
        SimulationRunner(sites + _fake_sites(1, ct_batch), FedAvg(), rounds=1,
                         run_dir=tmp_path / "r")
    bad = _fake_sites(1, ct_batch)[0]
    bad.site_id = "a/b"
    with pytest.raises(ValueError, match="a/b"):
        SimulationRunner([bad], FedAvg(), rounds=1, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing created for a refused run
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"'run_dir'.*file"):
        SimulationRunner(sites, FedAvg(), rounds=1, run_dir=file)
    with pytest.raises(ValueError, match="'sites'"):
        centralized_runner([], rounds=1, run_dir=tmp_path / "c", local_steps=1)


def test_resume_to_fewer_rounds_than_completed_is_refused(one_round, ct_batch):
    runner = SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(local_steps=1),
                                     progress=False)
    runner.run(until_round=1)
    SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(local_steps=1),
                            rounds=3, progress=False).run(until_round=2)
    short = SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(local_steps=1),
                                    rounds=1, progress=False)
    with pytest.raises(ValueError, match=r"'rounds'.*2"):
        short.run()


# -- sampling ----------------------------------------------------------------------------------
def test_one_site_that_always_drops_fails_with_a_clear_error(ct_batch, tmp_path):
    runner = SimulationRunner(_fake_sites(1, ct_batch), FedAvg(local_steps=1), rounds=1,
                              run_dir=tmp_path, drop_prob=0.999, retries=1, fraction=0.1,
                              progress=False)
    with pytest.raises(RoundFailed, match="drop_prob"):
        runner.run()
    assert read_metrics(tmp_path) == []


# -- LOCAL state, hand-counted -------------------------------------------------------------------
class _Counter(nn.Module):
    """A LOCAL (dc) buffer counting the training forward passes of this site."""

    role = "dc"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()))


class _Gain(nn.Module):
    role = "prior"

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))


class _Minimal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dc = _Counter()
        self.prior = _Gain()

    def forward(self, y, op, protocol=None):
        if self.training:
            with torch.no_grad():
                self.dc.count += 1
        return self.prior.w * self.dc.scale * op.A_adjoint(y)


def test_local_state_stays_and_persists_hand_count(ct_batch, tmp_path):
    """Each site's LOCAL counter equals local_steps x the rounds it took part in (read from
    the records), never travels in an update, and survives a resume."""
    steps = 2
    seen = []
    sites = [Site(f"h{i}", model_factory=_Minimal, train_loader=[ct_batch],
                  val_loader=[ct_batch]) for i in range(4)]
    kw = {"seed": 2, "fraction": 0.5, "drop_prob": 0.25, "retries": 20, "progress": False}
    SimulationRunner(sites, FedAvg(local_steps=steps, lr=1e-2), rounds=4, run_dir=tmp_path,
                     on_update=seen.append, **kw).run(until_round=2)
    sites = [Site(f"h{i}", model_factory=_Minimal, train_loader=[ct_batch],
                  val_loader=[ct_batch]) for i in range(4)]
    runner = SimulationRunner.resume(tmp_path, sites, FedAvg(local_steps=steps, lr=1e-2),
                                     on_update=seen.append, progress=False)
    runner.run()
    for u in seen:
        assert set(u.tensors) == {"prior.w"}
    recs = read_metrics(tmp_path)
    assert sorted((r["round"], r["site"]) for r in recs) == sorted(
        (r, s.site_id) for r in range(4) for s in sites)
    for site in sites:
        took_part = sum(r["participated"] for r in recs if r["site"] == site.site_id)
        kept = runner.store.get(site.site_id)
        count = 0.0 if kept is None else float(kept["local"]["dc.count"])
        assert count == steps * took_part, site.site_id
        model = site.evaluation_model(runner.strategy.state.for_site(site.site_id))
        assert float(model.dc.count) == steps * took_part
    assert sum(r["participated"] for r in recs) >= 4


def test_checkpoint_records_site_seeds_and_json_is_complete(one_round):
    ckpt = torch.load(one_round / "checkpoint.pt", weights_only=False)
    assert ckpt["site_seeds"] == {"s000": 0, "s001": 0}
    cfg = json.loads((one_round / "config.json").read_text())
    assert cfg["sites"] == ["s000", "s001"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_checkpoint_rename_is_made_durable(one_round, ct_batch, monkeypatch):
    """After ``os.replace`` the folder itself is fsynced: without it a power cut can leave
    the old directory entry (or none) although the data was synced."""
    synced: list[str] = []
    honest = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return honest(fd)

    monkeypatch.setattr(os, "fsync", spy)
    runner = SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(local_steps=1),
                                     rounds=2, progress=False)
    runner.run()
    assert str(one_round.resolve()) in synced  # the checkpoint's folder
    assert str((one_round / "sites" / "s000").resolve()) in synced  # a site's LOCAL state


def test_a_hidden_folder_in_the_store_does_not_break_the_run(one_round, ct_batch):
    """``sites/.ipynb_checkpoints`` (Jupyter) or ``.DS_Store`` folders used to crash every
    commit: the store took them for site ids and refused their names."""
    (one_round / "sites" / ".ipynb_checkpoints").mkdir()
    runner = SimulationRunner.resume(one_round, _fake_sites(2, ct_batch), FedAvg(local_steps=1),
                                     rounds=2, progress=False)
    runner.run()
    assert runner.completed_rounds == 2
    assert runner.store.site_ids() == ["s000", "s001"]
    assert json.loads((one_round / "config.json").read_text())["rounds"] == 2


def test_local_state_of_another_model_names_the_site_and_tensor(ct_batch):
    from fedrecon.federated import MemoryStore

    store = MemoryStore()
    store.put("s000", {"local": {"dc.other_step": torch.zeros(3)}})
    site = _fake_sites(1, ct_batch, store=store)[0]
    with pytest.raises(ValueError, match=r"s000.*dc.other_step"):
        site.build_model()
    store.put("s000", {"local": {"dc.raw_step": torch.zeros(7)}})
    with pytest.raises(ValueError, match=r"s000.*dc.raw_step"):
        site.evaluation_model()
