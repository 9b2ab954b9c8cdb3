"""Runs of the simulation runner with a LoRA-adapted pretrained prior and with compression."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "runners"))
from _common import make_ct_sites, write_ct_files  # noqa: E402

from fedrecon.efficient import RESIDUAL_KEY, UpdateCompressor, save_prior_checkpoint  # noqa: E402
from fedrecon.federated import FedAvg, SiteInstructions, SiteUpdate, state_nbytes  # noqa: E402
from fedrecon.models import ModelConfig, Partition, Role, Scope, build_model, state_roles  # noqa: E402
from fedrecon.privacy import PrivacyConfig, UpdatePipeline  # noqa: E402
from fedrecon.privacy.config import SecAggConfig  # noqa: E402
from fedrecon.runners import SimulationRunner, read_metrics  # noqa: E402

BASE = dict(n_iter=2, chans=4, num_pools=1)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_files(tmp_path_factory.mktemp("ct"), 2)


@pytest.fixture(scope="module")
def prior_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**BASE), complex_images=False)
    with torch.no_grad():
        for p in model.priors.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_prior_checkpoint(model, tmp_path_factory.mktemp("prior") / "prior.pt")


def _sites(ct_files, cfg: ModelConfig | None = None):
    sites = make_ct_sites(ct_files, 2)
    if cfg is not None:
        for s in sites:
            s.model_factory = lambda: build_model(cfg, complex_images=False)
    return sites


def _strategy() -> FedAvg:
    return FedAvg(local_steps=2, lr=3e-3)


def test_lora_run_sends_only_adapters_and_keeps_the_prior_frozen(ct_files, prior_ckpt, tmp_path):
    cfg = ModelConfig(**BASE, pretrained=str(prior_ckpt), peft="lora", lora_rank=1)
    seen: list[SiteUpdate] = []
    sites = _sites(ct_files, cfg)
    runner = SimulationRunner(sites, _strategy(), rounds=2, run_dir=tmp_path, seed=1,
                              progress=False, on_update=seen.append)
    runner.run()
    model = build_model(cfg, complex_images=False)
    roles = state_roles(model)
    peft = {k for k, r in roles.items() if r is Role.PEFT}
    assert len(seen) == 4 and peft
    for u in seen:
        assert set(u.tensors) == peft  # only adapter tensors, in every message
    frozen = {k: v for k, v in model.state_dict().items() if roles[k] is Role.FROZEN}
    trained = sites[0].evaluation_model(runner.strategy.state.for_site("ct0")).state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0)
    assert any(float(trained[k].abs().max()) > 0 for k in peft if k.endswith("lora.up"))
    full = state_nbytes(Partition.default().global_state(build_model(ModelConfig(**BASE),
                                                                     complex_images=False)))
    assert all(r["bytes_sent"] < full / 3 for r in read_metrics(tmp_path))


def test_compressed_run_records_exact_message_bytes_and_totals(ct_files, tmp_path):
    blobs: dict[tuple[str, int], bytes] = {}
    comp = UpdateCompressor({"method": "topk", "fraction": 0.1},
                            on_message=lambda s, r, b: blobs.__setitem__((s, r), b))
    runner = SimulationRunner(_sites(ct_files), _strategy(), rounds=2, run_dir=tmp_path, seed=1,
                              progress=False, compression=comp)
    runner.run()
    recs = read_metrics(tmp_path)
    assert len(recs) == 4
    names = runner._global_names
    dense = sum(runner._global_shapes[k].numel() * 4 for k in names)
    for rec in recs:
        assert rec["bytes_sent"] == len(blobs[(rec["site"], rec["round"])])
        # the message's length depends on names, shapes and the plan, not on the values
        like = {k: torch.zeros(runner._global_shapes[k]) for k in names}
        downlink = SiteInstructions(rec["round"], rec["site"], like, runner.strategy.plan(0, "ct0"))
        assert rec["bytes_received"] == len(UpdateCompressor.encode_instructions(downlink)) > dense
        assert rec["bytes_sent"] < dense / 2
    totals = json.loads((tmp_path / "communication.json").read_text())
    assert totals["bytes_sent"] == sum(len(b) for b in blobs.values())
    assert totals["bytes_received"] == sum(r["bytes_received"] for r in recs)
    assert totals["per_site"]["ct0"]["bytes_sent"] == len(blobs[("ct0", 0)]) + len(blobs[("ct0", 1)])
    residual = runner.store.get("ct0")[RESIDUAL_KEY]
    assert set(residual) <= set(names) and any(float(v.abs().max()) > 0 for v in residual.values())
    assert set(runner.store.get("ct0")["local"]) == set(
        Partition.default().names(_sites(ct_files)[0].model_factory(), Scope.LOCAL))


class Crash(Exception):
    pass


def test_resume_with_error_feedback_matches_uninterrupted_run(ct_files, tmp_path):
    def comp(**kw) -> UpdateCompressor:
        return UpdateCompressor({"method": "topk_int8", "fraction": 0.2}, **kw)

    ref = SimulationRunner(_sites(ct_files), _strategy(), rounds=3, run_dir=tmp_path / "ref",
                           seed=1, progress=False, compression=comp())
    ref.run()

    def crash(update):  # ct0 has already written its round-1 residual
        if update.round == 1:
            raise Crash

    with pytest.raises(Crash):
        SimulationRunner(_sites(ct_files), _strategy(), rounds=3, run_dir=tmp_path / "run", seed=1,
                         progress=False, compression=comp(), on_update=crash).run()
    runner = SimulationRunner.resume(tmp_path / "run", _sites(ct_files), _strategy(),
                                     progress=False, compression=comp())
    runner.run()
    a, b = runner.strategy.state.global_state, ref.strategy.state.global_state
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    for sid in ("ct0", "ct1"):
        for k, v in ref.store.get(sid)[RESIDUAL_KEY].items():
            torch.testing.assert_close(runner.store.get(sid)[RESIDUAL_KEY][k], v, rtol=0, atol=1e-6)
    # the messages carry the site's metrics (train_seconds: its digits vary run to run)
    for x, y in zip(read_metrics(tmp_path / "run"), read_metrics(tmp_path / "ref"), strict=True):
        assert abs(x["bytes_sent"] - y["bytes_sent"]) <= 8


def test_compression_refuses_secure_aggregation(ct_files, tmp_path):
    with pytest.raises(ValueError, match=r"\[compression\].*secure aggregation"):
        SimulationRunner(_sites(ct_files), _strategy(), rounds=1, run_dir=tmp_path, progress=False,
                         privacy=UpdatePipeline(PrivacyConfig(secure_aggregation=SecAggConfig())),
                         compression=UpdateCompressor({"method": "topk"}))
