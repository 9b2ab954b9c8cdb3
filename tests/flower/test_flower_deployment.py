"""A deployment-like federation (slow): TLS, SuperNode authentication (an unregistered node
is refused), and a SuperNode killed in the middle of a round (the run completes with the
other site). Run with ``make test-slow`` or ``pytest -m slow tests/flower``."""

from __future__ import annotations

import importlib.util
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
