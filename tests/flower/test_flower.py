"""fedrecon on a real Flower federation (SuperLink and SuperNodes as processes on 127.0.0.1):
metrics and checkpoints, the message audit, and the same global prior as the embedded
runner."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from fedrecon.models import Scope
from fedrecon.runners import SimulationRunner, read_metrics
from fedrecon.runners.flower import FlowerRunConfig
from fedrecon.runners.site_config import build_site, model_factory, with_runtime

sys.path.insert(0, str(Path(__file__).parent))
from _federation import RUN_CONFIG, federation


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    """One Flower run of 2 rounds, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("flower")
    t0 = time.perf_counter()
    with federation(root) as (fed, sites):
        try:
            status = fed.run(root / "run", RUN_CONFIG, timeout=150.0)
        except BaseException:
            print(fed.log_tail())
            raise
        if status["state"] != "finished":
            print(fed.log_tail())
    return {"root": root, "run_dir": root / "run", "sites": sites, "status": status,
            "seconds": time.perf_counter() - t0}


def test_run_writes_metrics_and_checkpoints(flower_run):
    assert flower_run["status"]["state"] == "finished", flower_run["status"]
    run_dir = flower_run["run_dir"]
    used = json.loads((run_dir / "config.json").read_text())  # the overrides reached the run
    assert used["model"]["chans"] == 4 and used["strategy_kwargs"]["local_steps"] == 2
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["completed_rounds"] == 2 and ckpt["site_ids"] == ["ct0", "ct1"]
    records = read_metrics(run_dir)
    assert [(r["round"], r["site"]) for r in records] == [(0, "ct0"), (0, "ct1"),
                                                        (1, "ct0"), (1, "ct1")]
    assert all(r["participated"] and not r["dropped"] and r["loss"] is not None
               for r in records)
    assert all(r["psnr"] is not None for r in records if r["round"] == 1)
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] == r["bytes_sent"] for r in records)
    # LOCAL state on each site's own disk, not with the server
    for cfg in flower_run["sites"]:
        local = torch.load(Path(cfg.runtime.state_dir) / "local" / f"{cfg.name}.pt",
                           weights_only=False)
        assert local["round"] == 1 and local["local"]


def test_no_local_tensor_in_any_message(flower_run):
    cfg = FlowerRunConfig.from_run_config(RUN_CONFIG)
    model = model_factory(cfg.model, complex_images=False, init_seed=0)()
    partition = cfg.build_strategy().partition
    global_names = set(partition.names(model, Scope.GLOBAL))
    local_names = set(model.state_dict()) - global_names
    assert local_names and global_names
    lines = [json.loads(s) for s in (flower_run["run_dir"] / "messages.jsonl").read_text()
             .splitlines()]
    kinds = {(m["direction"], m["type"]) for m in lines}
    assert {("to_site", "train"), ("from_site", "train"), ("to_site", "evaluate"),
            ("from_site", "evaluate"), ("from_site", "query.describe")} <= kinds
    for m in lines:
        for record, keys in m["records"].items():
            assert not set(keys) & local_names, (m["type"], m["direction"], record)
        if m["type"] == "train" and m["direction"] == "from_site":
            assert set(m["records"]["update"]) == global_names
        if m["direction"] == "to_site" and "global" in m["records"]:
            assert set(m["records"]["global"]) == global_names


def test_same_global_prior_as_embedded_runner(flower_run, tmp_path):
    cfg = FlowerRunConfig.from_run_config(RUN_CONFIG)
    strategy = cfg.build_strategy()
    sites = [build_site(with_runtime(s, state_dir=str(tmp_path / s.name)), cfg.model,
                        init_seed=cfg.seed, partition=strategy.partition)
             for s in flower_run["sites"]]
    runner = SimulationRunner(sites, strategy, rounds=cfg.num_server_rounds,
                              run_dir=tmp_path / "embedded", seed=cfg.seed,
                              min_sites=cfg.min_sites, eval_every=cfg.eval_every,
                              progress=False)
    embedded = runner.run().global_state
    ckpt = torch.load(flower_run["run_dir"] / "checkpoint.pt", weights_only=False)
    flower = ckpt["strategy"]["global_state"]
    assert set(flower) == set(embedded)
    initial = strategy.partition.global_state(model_factory(cfg.model, complex_images=False,
                                                            init_seed=cfg.seed)())
    assert any(not torch.equal(initial[k], embedded[k]) for k in embedded)  # it trained
    for k in embedded:
        torch.testing.assert_close(flower[k], embedded[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same records, up to timing
    fl = read_metrics(flower_run["run_dir"])
    em = read_metrics(tmp_path / "embedded")
    for a, b in zip(fl, em):
        assert (a["round"], a["site"], a["num_examples"]) == (b["round"], b["site"],
                                                              b["num_examples"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if b["psnr"] is not None:
            assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-5)
