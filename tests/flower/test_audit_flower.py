"""Audit of the Flower deployment, in process: exact round trips of the messages, the run
config and CLI checks, and the server's round loop over a fake ``Grid`` (sites answering,
failing or sending what they must not)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedrecon.runners import flower_cli
from fedrecon.runners.flower import FlowerRunConfig, arrays_to_state, state_to_arrays
from fedrecon.runners.flower_server import FlowerServer
from fedrecon.runners.simulation import RoundFailed

sys.path.insert(0, str(Path(__file__).parent))
from _federation import RUN_CONFIG, ct_node_context


@pytest.fixture
def task_identity(monkeypatch):
    """Messages can be built only inside a Flower task: pose as one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _over_the_wire(record):
    """``record`` deflated to bytes and inflated again, as Flower ships it."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    rd = RecordDict({"r": record})
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(rd).items()}
    return inflate_object_from_contents(rd.object_id, contents)["r"]


# -- messages ------------------------------------------------------------------------------
def test_arrays_round_trip_every_dtype_exactly():
    g = torch.Generator().manual_seed(0)
    state = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.complex64,
               torch.complex128, torch.int64, torch.int8, torch.uint8, torch.bool):
        name = str(dt).removeprefix("torch.")
        state[f"z.{name}"] = (torch.randn(3, 2, generator=g) * 7).to(dt)
        state[f"a.{name}.empty"] = torch.zeros(0, 4, dtype=dt)
        state[f"m.{name}.scalar"] = torch.tensor(2.75).to(dt)
    state["conj"] = torch.randn(4, dtype=torch.complex64, generator=g).conj()  # a conj view
    state["neg"] = torch._neg_view(torch.randn(4, generator=g))                 # a neg view
    state["strided"] = torch.randn(4, 4, generator=g).t()[1:, ::2]
    for record in (state_to_arrays(state), _over_the_wire(state_to_arrays(state))):
        back = arrays_to_state(record)
        assert list(back) == list(state)  # names and their order
        for k, v in state.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            assert back[k].is_contiguous() and not back[k].is_conj() and not back[k].is_neg()
            want = v.resolve_conj().resolve_neg()
            # bit for bit: compare the bytes, not the values (nan, -0.0)
            assert back[k].view(-1).view(torch.uint8).tolist() == \
                want.contiguous().view(-1).view(torch.uint8).tolist(), k
    # values bfloat16 holds exactly (8 significant bits), by hand
    bf = arrays_to_state(_over_the_wire(state_to_arrays(
        {"x": torch.tensor([1.0, -0.5, 256.0, 0.15625, 3.0 * 2.0**100])
         .to(torch.bfloat16)})))["x"]
    assert bf.dtype == torch.bfloat16
    assert bf.double().tolist() == [1.0, -0.5, 256.0, 0.15625, 3.0 * 2.0**100]


# -- run config ----------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "match"), [
    ("round-timeout", math.nan, "'round-timeout' must be a finite number of seconds > 0; got nan"),
    ("round-timeout", math.inf, "'round-timeout' must be a finite number of seconds > 0; got inf"),
    ("connect-timeout", math.nan, "'connect-timeout' must be a finite"),
    ("connect-timeout", 0.0, "'connect-timeout' must be a finite"),
    ("expected-sites", -1, "'expected-sites' must be >= 0; got -1"),
    ("min-sites", 0, "'min-sites' must be >= 1; got 0"),
    ("eval-every", 0, "'eval-every' must be >= 1; got 0"),
    ("num-server-rounds", -2, "'num-server-rounds' must be >= 0; got -2"),
    ("eval-split", "validation", "'eval-split' must be 'train', 'val' or 'test'; got 'validation'"),
])
def test_run_config_refuses_bad_values_naming_the_key(key, value, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        FlowerRunConfig.from_run_config({**RUN_CONFIG, key: value})


def test_a_bad_run_config_still_writes_a_failed_status(tmp_path):
    """The ServerApp fails before its round loop (bad config): ``status.json`` says so, so
    that ``flower-run --wait`` ends instead of waiting for its --timeout; the completed
    rounds of the run before (a refused resume) stand."""
    from fedrecon.runners.flower import _server_main

    run_dir = tmp_path / "run"
    context = Context(1, 0, {}, RecordDict(), {**RUN_CONFIG, "run-dir": str(run_dir),
                                                 "eval-every": 0})
    with pytest.raises(ValueError, match="eval-every"):
        _server_main(None, context)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "'eval-every' must be >= 1" in status["error"]
    assert status["completed_rounds"] == 0

    (run_dir / "status.json").write_text(json.dumps({"state": "finished",
                                                     "completed_rounds": 3, "time": 0.0}))
    context = Context(1, 0, {}, RecordDict(), {**RUN_CONFIG, "run-dir": str(run_dir),
                                                 "strategy.name": "no-such-strategy"})
    with pytest.raises(Exception):  # noqa: B017 (whatever make_strategy raises)
        _server_main(None, context)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["completed_rounds"] == 3
    assert status["time"] > 0.0


# -- CLI ------------------------------------------------------------------------------------
@pytest.fixture
def no_exec(monkeypatch):
    """flower_cli's subprocess runner replaced: the commands it would have run."""
    calls: list[list[str]] = []

    def fake(cmd, env):
        calls.append(list(cmd))
        return 0

    monkeypatch.setattr(flower_cli, "_exec", fake)
    return calls


def test_flower_run_wait_without_run_dir_starts_nothing(tmp_path, no_exec, capsys):
    rc = flower_cli.main(["flower-run", "--superlink", "127.0.0.1:1", "--insecure", "--wait",
                          "--flwr-home", str(tmp_path), "-c", "num-server-rounds=3"])
    assert rc == 2 and no_exec == []  # refused before a run was started
    assert "--wait needs --run-config run-dir" in capsys.readouterr().err


def test_flower_run_wait_timeout_is_an_exit_code(tmp_path, no_exec, capsys):
    rc = flower_cli.main(["flower-run", "--superlink", "127.0.0.1:1", "--insecure", "--wait",
                          "--timeout", "0.05", "--flwr-home", str(tmp_path),
                          "-c", f"run-dir={tmp_path / 'run'}"])
    assert rc == 1 and len(no_exec) == 1
    assert "did not finish within" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["=5", " =5", "run-dir=2024-01-01", "lr=[1, 2]",
                                  "strategy={a = 1}", "seed=1\nmin-sites = 2", "novalue"])
def test_run_config_overrides_are_single_scalars(text):
    with pytest.raises(argparse.ArgumentTypeError, match="run config override"):
        flower_cli._parse_override(text)


def test_run_config_overrides_parse_as_toml_or_bare_strings():
    assert flower_cli._parse_override("strategy.lr=1e-3") == ("strategy.lr", 0.001)
    assert flower_cli._parse_override(" seed =7") == ("seed", 7)
    assert flower_cli._parse_override("resume=true") == ("resume", True)
    assert flower_cli._parse_override("run-dir=/tmp/a b") == ("run-dir", "/tmp/a b")
    assert flower_cli._parse_override('modality="mri"') == ("modality", "mri")


@pytest.mark.parametrize("argv", [
    ["flower-server", "--insecure", "--port", "70000"],
    ["flower-server", "--insecure", "--port", "0"],
    ["flower-server", "--insecure", "--port", "x"],
    ["flower-site", "--site-config", "s.toml", "--superlink", "h:1", "--insecure",
     "--port", "-1"],
    ["flower-site", "--site-config", "s.toml", "--superlink", "h:1", "--insecure",
     "--activation-wait", "nan"],
    ["flower-run", "--superlink", "h:1", "--insecure", "--timeout", "-5"],
])
def test_cli_numbers_are_checked_by_the_parser(argv, no_exec, capsys):
    with pytest.raises(SystemExit) as exc:
        flower_cli.main(argv)
    assert exc.value.code == 2 and no_exec == []
    err = capsys.readouterr().err
    assert "expected a port number in 1..65535" in err or "expected a finite number" in err


def test_cli_config_errors_exit_2_with_a_message(tmp_path, no_exec, capsys):
    rc = flower_cli.main(["flower-site", "--site-config", str(tmp_path / "missing.toml"),
                          "--superlink", "h:1", "--insecure"])
    assert rc == 2 and no_exec == []
    assert "missing.toml: site configuration file not found" in capsys.readouterr().err
    rc = flower_cli.main(["flower-server", "--certificates", str(tmp_path)])
    assert rc == 2 and no_exec == []
    assert "ca.crt: missing" in capsys.readouterr().err


# -- the server's round loop over a fake Grid -------------------------------------------------
class FakeGrid:
    """A ``Grid`` whose nodes answer in process: ``nodes[node_id](message)`` returns the
    reply's content (a ``RecordDict``), an ``Error``, or ``None`` (no answer)."""

    def __init__(self, nodes: dict[int, Callable[[Message], object]]) -> None:
        self.nodes = nodes
        self.run = SimpleNamespace(run_id=1)
        self._ids = itertools.count()
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            m.metadata.__dict__["_message_id"] = mid  # what the SuperLink does
            out = self.nodes[m.metadata.dst_node_id](m)
            if isinstance(out, Error):
                self._replies[mid] = Message(error=out, reply_to=m)
            elif out is not None:
                self._replies[mid] = Message(out, reply_to=m)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]


def fake_site(site_id: str, num_examples: int, offset: float, *,
              train: Callable[[Message], object] | None = None):
    """A site that answers ``describe``, trains to ``received + offset`` (GLOBAL tensors
    only, float32) and evaluates to fixed metrics."""

    def answer(msg: Message):
        kind = msg.metadata.message_type
        if kind == "query.describe":
            return RecordDict({"site": ConfigRecord({
                "site-id": site_id, "num-examples": num_examples, "modality": "ct",
                "protocol": []})})
        if kind == "train":
            if train is not None:
                return train(msg)
            plan = msg.content["plan"]
            received = arrays_to_state(msg.content["global"])
            return RecordDict({
                "update": state_to_arrays({k: v + offset for k, v in received.items()}),
                "update_meta": ConfigRecord({"site-id": site_id, "round": plan["round"],
                                             "kind": "weights",
                                             "num-examples": num_examples}),
                "metrics": MetricRecord({"loss": offset})})
        if kind == "evaluate":
            return RecordDict({"metrics": MetricRecord({"psnr": 30.0, "ssim": 0.9,
                                                        "nmse": 0.01, "eval_seconds": 0.1})})
        raise AssertionError(kind)

    return answer


def _server(tmp_path, grid, **config) -> FlowerServer:
    cfg = FlowerRunConfig.from_run_config({
        **RUN_CONFIG, "num-server-rounds": 1, "eval-every": 1, "round-timeout": 5.0,
        "connect-timeout": 5.0, "run-dir": str(tmp_path / "run"), **config})
    return FlowerServer(grid, cfg)


def test_fake_federation_weights_by_examples_without_the_failed_site(tmp_path,
                                                                     task_identity):
    """3 sites, one failing: the round completes with the other two, weighted by their
    example counts (a weighted mean computed here in numpy), the failed one recorded as
    dropped."""
    grid = FakeGrid({11: fake_site("ct0", 3, 1.0), 12: fake_site("ct1", 1, -2.0),
                     13: fake_site("ct2", 50, 100.0, train=lambda m: Error(7, "boom"))})
    server = _server(tmp_path, grid, **{"expected-sites": 3})
    initial = {k: v.clone() for k, v in server._initial.items()}
    final = server.run().global_state
    for k, v in initial.items():
        want = (3 * (v.double().numpy() + 1.0) + 1 * (v.double().numpy() - 2.0)) / 4
        np.testing.assert_allclose(final[k].double().numpy(), want, rtol=0, atol=1e-6)
        assert final[k].dtype == v.dtype
    records = {r["site"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                         .read_text().splitlines())}
    assert records["ct2"]["dropped"] and not records["ct2"]["participated"]
    assert [records[s]["num_examples"] for s in ("ct0", "ct1")] == [3, 1]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"


def test_a_failed_round_names_each_missing_site_and_why(tmp_path, task_identity):
    grid = FakeGrid({11: fake_site("ct0", 3, 1.0),
                     12: fake_site("ct1", 1, 1.0, train=lambda m: Error(7, "disk full"))})
    server = _server(tmp_path, grid, **{"min-sites": 2})
    with pytest.raises(RoundFailed, match=r"missing: ct1 \(error: disk full\)"):
        server.run()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "disk full" in status["error"]


def test_sites_that_fail_to_describe_themselves_are_named(tmp_path, task_identity):
    grid = FakeGrid({11: lambda m: Error(0, "site.toml: site configuration file not found")})
    server = _server(tmp_path, grid, **{"connect-timeout": 0.3, "min-sites": 1})
    with pytest.raises(RoundFailed, match="node 11 answered with an error: site.toml: site "
                                          "configuration file not found"):
        server.run()


def test_an_update_of_another_dtype_is_refused(tmp_path, task_identity):
    """A site answering float64 tensors for the float32 model: refused (the aggregate would
    otherwise take the dtype of whichever update came first)."""
    def train64(msg):
        received = arrays_to_state(msg.content["global"])
        return RecordDict({
            "update": state_to_arrays({k: v.double() for k, v in received.items()}),
            "update_meta": ConfigRecord({"site-id": "ct0", "round": 0, "kind": "weights",
                                         "num-examples": 2}),
            "metrics": MetricRecord({"loss": 0.0})})

    grid = FakeGrid({11: fake_site("ct0", 2, 0.0, train=train64)})
    server = _server(tmp_path, grid, **{"min-sites": 1, "expected-sites": 1})
    with pytest.raises(ValueError, match="has dtype torch.float64, expected torch.float32"):
        server.run()
    assert not json.loads((tmp_path / "run" / "status.json").read_text())["completed_rounds"]


# -- the ClientApp ---------------------------------------------------------------------------
def test_a_site_refuses_an_evaluation_meant_for_another_site(tmp_path, task_identity):
    """The node now runs ct0 while the server still maps it to ct1: ct0's metrics must not
    be recorded as ct1's."""
    from fedrecon.runners.flower import _evaluate

    context, _ = ct_node_context(tmp_path)
    server = _server(tmp_path, FakeGrid({}))

    def msg(site_id):
        m = Message(RecordDict({"global": state_to_arrays(server._initial),
                                "eval": ConfigRecord({"round": 0, "site-id": site_id,
                                                      "split": "val", "seed": 0})}),
                    dst_node_id=1, message_type="evaluate", group_id="0", ttl=60.0)
        m.metadata.__dict__["_message_id"] = "e1"
        return m

    with pytest.raises(ValueError, match="evaluation for site 'ct1' reached site 'ct0'"):
        _evaluate(msg("ct1"), context)
    reply = _evaluate(msg("ct0"), context)
    assert set(reply.content["metrics"]) == {"psnr", "ssim", "nmse", "eval_seconds"}


def test_a_site_refuses_a_stale_train_message_of_its_run(tmp_path):
    """A train message of an earlier round of the same run, delivered after a later one:
    refused, and the site's LOCAL state left as it was; the same round number of another
    run is a new fit."""
    from fedrecon.federated import SiteInstructions, TrainingPlan
    from fedrecon.runners.flower import _NodeSite, persisted_state

    context, cfg = ct_node_context(tmp_path)
    node = _NodeSite(context)
    state_dir = Path(cfg.runtime.state_dir)
    start = node.site.initial_global_state()
    plan = TrainingPlan(local_steps=1, lr=1e-3)

    def fit(r, key):
        return node.fit(SiteInstructions(r, "ct0", start, plan), run_key=key)

    fit(0, "a")
    fit(2, "a")
    after_2 = persisted_state(state_dir, "ct0")
    with pytest.raises(ValueError, match="train message of round 1 of run a, after this site "
                                         "trained round 2"):
        fit(1, "a")
    assert persisted_state(state_dir, "ct0") == after_2 and after_2["round"] == 2
    fit(1, "b")
    assert persisted_state(state_dir, "ct0")["round"] == 1
