"""The runner's privacy hook: secure aggregation reproduces plain FedAvg (0 and 1 dropped
sites), epsilon reaches metrics.jsonl, incompatible strategies are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "runners"))
from _common import make_ct_sites, write_ct_files

from fedrecon.federated import STRATEGIES, FedAdam, FedAvg, SiteUpdate, make_strategy
from fedrecon.privacy import (
    PrivacyAccountant,
    PrivacyConfig,
    PrivacyConfigError,
    SecAggConfig,
    UpdatePipeline,
    check_privacy_compatibility,
    sum_compatible_strategies,
)
from fedrecon.runners import SimulationRunner, read_metrics

SHAPES = {"a": torch.Size([3, 50]), "b": torch.Size([7])}


def _updates(n: int) -> list[SiteUpdate]:
    g = torch.Generator().manual_seed(1)
    return [SiteUpdate(f"s{i}", 0, {k: torch.randn(s, generator=g) for k, s in SHAPES.items()},
                       "weights", 2 + 3 * i) for i in range(n)]


@pytest.mark.parametrize("dropped", [[], ["s1"]])
@pytest.mark.parametrize("cls", [FedAvg, FedAdam])
def test_secure_aggregate_equals_plain_strategy(cls, dropped):
    start = {k: torch.zeros(s) for k, s in SHAPES.items()}
    ups = _updates(4)
    answered = [u for u in ups if u.site_id not in dropped]
    plain, secure = cls(), cls()
    plain.initialize(start, [u.site_id for u in ups])
    secure.initialize(start, [u.site_id for u in ups])
    ref = plain.aggregate(0, answered, missing=dropped).global_state
    seen = []
    pipe = UpdatePipeline(PrivacyConfig(secure_aggregation=SecAggConfig()), on_secure_sum=seen.append)
    sent = [pipe.at_site(0, u, start, n_sampled=4) for u in answered]
    res = pipe.aggregate(0, secure, sent, missing=dropped, names=list(SHAPES), shapes=SHAPES)
    # stated bound: n 2^-(f+1) / W per coordinate (+ float32 rounding of the result)
    bound = SecAggConfig().sum_error_bound(4) / sum(u.num_examples for u in answered) + 1e-6
    for k in SHAPES:
        assert (res.state.global_state[k] - ref[k]).abs().max() <= bound
    (view,) = seen
    assert view.dropped == dropped and view.survivors == [u.site_id for u in answered]
    for u in answered:  # the server held masked uint64 vectors, never the update
        assert view.view.masked[u.site_id].dtype == np.uint64


def test_runner_with_secure_aggregation_and_a_dropout_matches_fedavg(tmp_path):
    files = write_ct_files(tmp_path / "data", 3)
    kw = {"rounds": 2, "progress": False, "seed": 4, "drop_prob": 0.3}
    plain = SimulationRunner(make_ct_sites(files, 3), FedAvg(local_steps=1), run_dir=tmp_path / "p", **kw)
    sums = []
    secure = SimulationRunner(make_ct_sites(files, 3), FedAvg(local_steps=1), run_dir=tmp_path / "s",
                              privacy=UpdatePipeline({"secure_aggregation": {}}, on_secure_sum=sums.append),
                              **kw)
    a, b = plain.run(), secure.run()
    assert any(s.dropped for s in sums)  # seed 4 drops a site mid-round
    for k in a.global_state:
        assert torch.allclose(a.global_state[k], b.global_state[k], atol=2e-6, rtol=0)
    rec_p, rec_s = read_metrics(tmp_path / "p"), read_metrics(tmp_path / "s")
    for rp, rs in zip(rec_p, rec_s):
        assert rp["dropped"] == rs["dropped"] and rs["epsilon"] is None
        assert rs["psnr"] == pytest.approx(rp["psnr"], abs=1e-3)


def test_runner_records_epsilon_every_round_and_resumes_the_accountant(tmp_path):
    files = write_ct_files(tmp_path / "data", 3)
    cfg = {"dp": {"clip_norm": 0.5, "noise_multiplier": 1.2, "delta": 1e-5}}
    runner = SimulationRunner(make_ct_sites(files, 3), FedAvg(local_steps=1), rounds=3,
                              run_dir=tmp_path / "r", progress=False, privacy=UpdatePipeline(cfg))
    runner.run(until_round=2)
    again = SimulationRunner.resume(tmp_path / "r", make_ct_sites(files, 3), FedAvg(local_steps=1),
                                    progress=False, privacy=UpdatePipeline(cfg))
    again.run()
    acc = PrivacyAccountant(1e-5)
    expected = [acc.step(1.2) for _ in range(3)]
    recs = read_metrics(tmp_path / "r")
    for r in range(3):
        eps = [x["epsilon"] for x in recs if x["round"] == r]
        assert len(eps) == 3 and eps == pytest.approx([expected[r]] * 3)
    assert expected[0] < expected[1] < expected[2]


def test_compatibility_is_declared_and_refused_by_name():
    cfg = {"secure_aggregation": {}}
    ok = sum_compatible_strategies()
    for name in ("fedavg", "partial", "fedprox", "fedbn", "fedadam", "fedyogi", "ditto", "fedrep"):
        assert name in ok
        check_privacy_compatibility(name, cfg)
    for name in ("similarity", "hypernetwork", "local", "median", "trimmed_mean", "multi_krum"):
        assert STRATEGIES[name].needs_individual_updates
        with pytest.raises(PrivacyConfigError, match=f"strategy '{name}'.*secure_aggregation"):
            check_privacy_compatibility(name, cfg)
        with pytest.raises(PrivacyConfigError, match="dp"):
            check_privacy_compatibility(name, {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}})
        check_privacy_compatibility(name, {"validation": {}})  # validation works with all
    with pytest.raises(PrivacyConfigError, match="individual"):
        UpdatePipeline(cfg).check_strategy(make_strategy("median"))


def test_privacy_config_errors_name_the_key():
    with pytest.raises(PrivacyConfigError, match="unknown key.*'secagg'"):
        PrivacyConfig.from_dict({"secagg": {}})
    with pytest.raises(PrivacyConfigError, match=r"\[privacy\]\.secure_aggregation: unknown key"):
        PrivacyConfig.from_dict({"secure_aggregation": {"bits": 3}})
    with pytest.raises(PrivacyConfigError, match="missing key"):
        PrivacyConfig.from_dict({"dp": {"clip_norm": 1.0}})
    with pytest.raises(PrivacyConfigError, match="norm_rule"):
        PrivacyConfig.from_dict({"secure_aggregation": {}, "validation": {}})
    with pytest.raises(PrivacyConfigError, match="distributed"):
        PrivacyConfig.from_dict({"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0,
                                        "noise": "distributed"}})
    with pytest.raises(PrivacyConfigError, match="unknown strategy"):
        check_privacy_compatibility("fedavgg", {})


def test_values_beyond_the_secure_range_are_refused_not_clipped():
    """A weighted update beyond ``clip_range`` would be clipped inside the secure sum (a wrong
    mean with a log line); it is refused by name before masking, and a range wide enough
    gives the plain FedAvg mean."""
    start = {k: torch.zeros(s) for k, s in SHAPES.items()}
    ups = _updates(3)
    ups[2].tensors["a"][0, 0] = 40.0  # times 8 examples: 320 > 256
    strategy = FedAvg()
    strategy.initialize(start, [u.site_id for u in ups])
    pipe = UpdatePipeline(PrivacyConfig(secure_aggregation=SecAggConfig(clip_range=256.0)))
    sent = [pipe.at_site(0, u, start, n_sampled=3) for u in ups]
    with pytest.raises(ValueError, match=r"site 's2'.*clip_range 256"):
        pipe.aggregate(0, strategy, sent, missing=[], names=list(SHAPES), shapes=SHAPES)
    wide = UpdatePipeline(PrivacyConfig(secure_aggregation=SecAggConfig(clip_range=512.0)))
    sent = [wide.at_site(0, u, start, n_sampled=3) for u in ups]
    res = wide.aggregate(0, strategy, sent, missing=[], names=list(SHAPES), shapes=SHAPES)
    weights = torch.tensor([float(u.num_examples) for u in ups])
    ref = sum(w * u.tensors["a"] for w, u in zip(weights, ups)) / weights.sum()
    assert (res.state.global_state["a"] - ref).abs().max() <= 1e-4
