"""A deployment-like federation (slow): TLS, SuperNode authentication (an unregistered node
is refused), and a SuperNode killed in the middle of a round (the run completes with the
other site). Run with ``make test-slow`` or ``pytest -m slow tests/flower``."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from fedrecon.runners import read_metrics
from fedrecon.runners.flower_cli import TLSFiles, run_command, wait_for_status
from fedrecon.runners.site_config import site_config_to_toml

sys.path.insert(0, str(Path(__file__).parent))
from _federation import RUN_CONFIG, Federation, federation, write_ct_site

ROOT = Path(__file__).resolve().parents[2]


def _make_certificates():
    spec = importlib.util.spec_from_file_location("make_certificates",
                                                  ROOT / "scripts" / "make_certificates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_certificates


def _wait_for_line(path: Path, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                m = json.loads(line)
                if predicate(m):
                    return m
        time.sleep(0.3)
    raise TimeoutError(f"{path}: no such message within {timeout} s")


@pytest.mark.slow
def test_tls_auth_and_a_site_killed_mid_round(tmp_path):
    certs = _make_certificates()(tmp_path / "certs", nodes=["ct0", "ct1", "ct2"])
    fed = Federation(tmp_path, tls=TLSFiles.from_dir(tmp_path / "certs"), supernode_auth=True)
    run_dir = tmp_path / "run"
    try:
        fed.start_superlink()
        for k in (0, 1):  # ct2 is never registered
            res = fed.register(certs[f"nodes/ct{k}.pub"])
            assert res.returncode == 0, res.stdout + res.stderr
        for k in range(3):
            cfg = write_ct_site(tmp_path, k)
            path = tmp_path / f"ct{k}.toml"
            path.write_text(site_config_to_toml(cfg))
            fed.start_site(f"ct{k}", path, auth_key=certs[f"nodes/ct{k}"])
        config = {**RUN_CONFIG, "min-sites": 1, "expected-sites": 2, "round-timeout": 45.0,
                  "run-dir": str(run_dir)}
        res = fed.flwr(run_command(config))
        assert res.returncode == 0, res.stdout + res.stderr
        # kill ct1's SuperNode (and its ClientApp) once round 0's instructions are out
        _wait_for_line(run_dir / "messages.jsonl",
                       lambda m: m["type"] == "train" and m["direction"] == "to_site", 120.0)
        time.sleep(1.0)
        fed.kill("ct1", signal.SIGKILL)
        status = wait_for_status(run_dir, 300.0)
        assert status["state"] == "finished", (status, fed.log_tail())
        sites = json.loads((run_dir / "config.json").read_text())["sites"]
        assert sites == ["ct0", "ct1"]  # the unregistered ct2 never joined
        records = {(r["round"], r["site"]): r for r in read_metrics(run_dir)}
        for r in (0, 1):
            assert records[r, "ct0"]["participated"]
            assert records[r, "ct1"]["dropped"] and not records[r, "ct1"]["participated"]
        assert records[1, "ct0"]["psnr"] is not None
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
        assert ckpt["completed_rounds"] == 2
        ct2_log = (fed.logs / "ct2.log").read_text(errors="replace")
        assert "SuperNode ID" not in ct2_log, ct2_log[-2000:]
    except BaseException:
        print(fed.log_tail())
        raise
    finally:
        fed.stop()


@pytest.mark.slow
def test_secure_aggregation_gives_the_plain_fedavg_prior(tmp_path):
    """SecAgg+ (Flower's workflow): the server sees only masked vectors, and the aggregate
    equals the embedded runner's FedAvg to quantization precision."""
    from fedrecon.models import Scope
    from fedrecon.runners import SimulationRunner
    from fedrecon.runners.flower import FlowerRunConfig
    from fedrecon.runners.site_config import build_site, with_runtime

    config = {**RUN_CONFIG, "num-server-rounds": 1, "eval-every": 1,
              "secure-aggregation": True}
    with federation(tmp_path) as (fed, sites):
        status = fed.run(tmp_path / "run", config, timeout=300.0)
        assert status["state"] == "finished", (status, fed.log_tail())
    cfg = FlowerRunConfig.from_run_config(config)
    strategy = cfg.build_strategy()
    embedded_sites = [build_site(with_runtime(s, state_dir=str(tmp_path / "emb" / s.name)),
                                 cfg.model, init_seed=cfg.seed, partition=strategy.partition)
                      for s in sites]
    expected = SimulationRunner(embedded_sites, strategy, rounds=1, run_dir=tmp_path / "emb",
                                seed=cfg.seed, min_sites=2, progress=False).run().global_state
    got = torch.load(tmp_path / "run" / "checkpoint.pt",
                     weights_only=False)["strategy"]["global_state"]
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=2e-5, msg=k)
    records = read_metrics(tmp_path / "run")
    assert all(r["participated"] and r["psnr"] is not None for r in records)
    # no site's tensors in the clear: masked vectors only (and never a LOCAL name)
    model = embedded_sites[0].model_factory()
    global_names = set(strategy.partition.names(model, Scope.GLOBAL))
    local_names = set(model.state_dict()) - global_names
    lines = [json.loads(s) for s in (tmp_path / "run" / "messages.jsonl").read_text().splitlines()]
    for m in lines:
        keys = {k for ks in m["records"].values() for k in ks}
        assert not keys & local_names
        if m["direction"] == "from_site" and m["type"] == "train":
            assert not keys & global_names, m


def _journal(state_dir: Path) -> list[dict]:
    path = state_dir / "journal.jsonl"
    return [json.loads(s) for s in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("auth", [True, False], ids=["node-auth", "no-auth"])
def test_a_restarted_site_continues_from_its_own_disk(tmp_path, auth):
    """ct1's SuperNode is SIGKILLed after round 0 and started again at once with the same
    site config. With SuperNode authentication its node id is bound to its key and flwr
    1.42's SuperLink refuses to activate it while the killed one still counts as online
    (until its heartbeat expires): it is started through ``fedrecon flower-site``, which
    starts it again until it is activated. Without, it comes back as a new node, which the
    server maps to ct1 at the start of a round. Either way it takes part in later rounds,
    and every fit it makes starts from exactly the LOCAL state and loader RNG it saved last
    (its journal chains), the first one after the restart from what was on its disk at the
    kill."""
    from fedrecon.runners.flower import persisted_state

    certs = _make_certificates()(tmp_path / "certs", nodes=["ct0", "ct1"]) if auth else {}
    fed = Federation(tmp_path, tls=TLSFiles.from_dir(tmp_path / "certs") if auth else None,
                     supernode_auth=auth)
    run_dir = tmp_path / "run"
    rounds = 7  # ct1 is back at most ~70 s after the kill (60 s heartbeat window + restart)
    try:
        fed.start_superlink()
        for k in (0, 1) if auth else ():
            res = fed.register(certs[f"nodes/ct{k}.pub"])
            assert res.returncode == 0, res.stdout + res.stderr
        tomls = {}
        for k in (0, 1):
            cfg = write_ct_site(tmp_path, k)
            tomls[cfg.name] = tmp_path / f"ct{k}.toml"
            tomls[cfg.name].write_text(site_config_to_toml(cfg))
            fed.start_site(cfg.name, tomls[cfg.name], auth_key=certs.get(f"nodes/ct{k}"),
                           launcher=auth and cfg.name == "ct1")
        state1 = tmp_path / "ct1" / "state"
        config = {**RUN_CONFIG, "num-server-rounds": rounds, "eval-every": rounds,
                  "min-sites": 1, "expected-sites": 2, "round-timeout": 40.0,
                  "run-dir": str(run_dir)}
        res = fed.flwr(run_command(config))
        assert res.returncode == 0, res.stdout + res.stderr
        # kill ct1 (its SuperNode, SuperExec and any ClientApp) once round 0 is committed
        deadline = time.monotonic() + 180.0
        while not (run_dir / "status.json").exists() or json.loads(
                (run_dir / "status.json").read_text())["completed_rounds"] < 1:
            assert time.monotonic() < deadline, fed.log_tail()
            time.sleep(0.2)
        fed.kill("ct1", signal.SIGKILL)
        t_kill = time.time()
        at_kill = persisted_state(state1, "ct1")
        before = _journal(state1)
        assert before and at_kill == before[-1]["saved"]  # nothing half-written
        fed.start_site("ct1", tomls["ct1"], auth_key=certs.get("nodes/ct1"), launcher=auth)
        status = wait_for_status(run_dir, 400.0)
        assert status["state"] == "finished", (status, fed.log_tail())

        records = {(r["round"], r["site"]): r for r in read_metrics(run_dir)}
        assert records[0, "ct1"]["participated"] and records[0, "ct0"]["participated"]
        journal = _journal(state1)
        after = [j for j in journal if j["time"] > t_kill]
        assert after, fed.log_tail()
        # the first fit after the restart starts from what was on disk at the kill ...
        assert after[0]["loaded"] == at_kill
        assert after[0]["loaded"]["round"] == before[-1]["round"]
        # ... and every fit from the state the previous one saved (rounds only grow)
        for prev, cur in itertools.pairwise(journal):
            assert cur["loaded"] == prev["saved"], (prev, cur)
            assert cur["round"] > prev["round"] and not cur["repeat"], (prev, cur)
        # the server got ct1's updates after the restart
        back = [r for r in range(rounds) if records[r, "ct1"]["participated"]
                and r > before[-1]["round"]]
        assert back, [(r, records[r, "ct1"]) for r in range(rounds)]
        assert set(back) <= {j["round"] for j in after}
        assert rounds - 1 in back and records[rounds - 1, "ct1"]["psnr"] is not None
        final = torch.load(state1 / "local" / "ct1.pt", weights_only=False)
        assert final["round"] == journal[-1]["round"] == rounds - 1
        assert persisted_state(state1, "ct1") == journal[-1]["saved"]
        assert torch.load(run_dir / "checkpoint.pt",
                          weights_only=False)["completed_rounds"] == rounds
        print(f"ct1 killed after round {before[-1]['round']}, back in rounds {back}")
    except BaseException:
        print(fed.log_tail())
        raise
    finally:
        fed.stop()


@pytest.mark.slow
def test_resume_after_the_federation_was_stopped(tmp_path):
    """``resume = true`` after the server stopped in the middle of round 2: the run folder
    holds the checkpoint of 2 rounds while the sites have already trained round 2 (made
    exactly so: the run's files are copied when round 1 is committed, the run goes on
    through round 2, then SuperLink, ServerApp and SuperNodes are all stopped and the copy is
    put back). A new federation (new SuperLink, new node ids) on the same folders continues
    with rounds 2 and 3; the sites repeat round 2 from the state they had before it. The
    result is that of an uninterrupted 4-round run: the global prior and the records equal
    the embedded runner's 4 rounds (which equals an uninterrupted Flower run:
    tests/flower/test_flower.py)."""
    import shutil

    from fedrecon.runners import SimulationRunner
    from fedrecon.runners.flower import FlowerRunConfig
    from fedrecon.runners.site_config import build_site, with_runtime

    run_dir = tmp_path / "run"
    saved = tmp_path / "run_after_2"
    first = {**RUN_CONFIG, "num-server-rounds": 3, "eval-every": 2}
    with federation(tmp_path) as (fed, sites):
        started = time.time()
        res = fed.flwr(run_command({**first, "run-dir": str(run_dir)}))
        assert res.returncode == 0, res.stdout + res.stderr
        deadline = time.monotonic() + 300.0
        while True:  # copy the run's files while the checkpoint says 2 rounds
            assert time.monotonic() < deadline, fed.log_tail()
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if json.loads((run_dir / "status.json").read_text())["completed_rounds"] >= 2:
                    shutil.copytree(run_dir, saved)
                    break
            time.sleep(0.1)
        status = wait_for_status(run_dir, 300.0, since=started)
        assert status["state"] == "finished", (status, fed.log_tail())
    assert torch.load(saved / "checkpoint.pt", weights_only=False)["completed_rounds"] == 2
    shutil.rmtree(run_dir)
    shutil.copytree(saved, run_dir)
    resumed = {**first, "num-server-rounds": 4, "resume": True}
    with federation(tmp_path) as (fed, _):
        status = fed.run(run_dir, resumed, timeout=300.0)
        assert status["state"] == "finished", (status, fed.log_tail())
        assert status["completed_rounds"] == 4
        # a resume must not change what the run computes
        bad = fed.run(tmp_path / "run", {**resumed, "strategy.lr": 1e-2}, timeout=120.0)
        assert bad["state"] == "failed" and "strategy_kwargs" in bad["error"], bad
    records = read_metrics(run_dir)
    assert [(r["round"], r["site"]) for r in records] == [
        (r, s) for r in range(4) for s in ("ct0", "ct1")]
    assert all(r["participated"] for r in records)
    for cfg in sites:
        journal = _journal(Path(cfg.runtime.state_dir))
        assert [(j["round"], j["repeat"]) for j in journal] == [
            (0, False), (1, False), (2, False), (2, True), (3, False)]
        assert len({j["run_key"] for j in journal}) == 1
        first_try, again = journal[2], journal[3]
        assert again["loaded"] == first_try["loaded"] == journal[1]["saved"]
        assert again["saved"] == first_try["saved"]  # the same training, bit for bit
        assert journal[4]["loaded"] == again["saved"]

    cfg = FlowerRunConfig.from_run_config({**resumed, "run-dir": str(run_dir)})
    strategy = cfg.build_strategy()
    embedded_sites = [build_site(with_runtime(s, state_dir=str(tmp_path / "emb" / s.name)),
                                 cfg.model, init_seed=cfg.seed, partition=strategy.partition)
                      for s in sites]
    expected = SimulationRunner(embedded_sites, strategy, rounds=4, run_dir=tmp_path / "emb",
                                seed=cfg.seed, min_sites=cfg.min_sites,
                                eval_every=cfg.eval_every, progress=False).run().global_state
    got = torch.load(run_dir / "checkpoint.pt", weights_only=False)["strategy"]["global_state"]
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(records, read_metrics(tmp_path / "emb")):
        assert (a["round"], a["site"]) == (b["round"], b["site"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert (a["psnr"] is None) == (b["psnr"] is None)
        if b["psnr"] is not None:
            assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-5)
