"""fedrecon on Flower (flwr 1.42): a ServerApp over a fedrecon ``Strategy`` and a ClientApp
over a fedrecon ``Site``. The only module of fedrecon that imports ``flwr``.

The server's round loop is :class:`FlowerServer`; it does what
:class:`~fedrecon.runners.SimulationRunner` does, over Flower's ``Grid`` instead of
in-process calls: sample sites with the same seeded RNG, ``strategy.configure``, send each
sampled site its GLOBAL tensors and :class:`~fedrecon.federated.TrainingPlan`, gate every
reply with :func:`~fedrecon.federated.check_update`, ``strategy.aggregate(round, updates,
missing=...)``, evaluate, append ``metrics.jsonl`` records (:data:`RECORD_FIELDS`) and
atomically write ``checkpoint.pt``. A site that does not answer within ``round-timeout``
(or whose SuperNode goes offline) is *missing*: the round completes with the others when at
least ``min-sites`` answered, and the strategy is told who was missing.

Messages (name-keyed arrays only, no positional lists):

======================  ========================================  ==========================
message type            server -> site                            site -> server
======================  ========================================  ==========================
``query.describe``      nothing                                   ``site`` config: site id,
                                                                  example count, modality,
                                                                  public protocol vector
``train``               ``global`` arrays, ``plan`` config         ``update`` arrays (GLOBAL
                                                                  only, via ``make_update``),
                                                                  ``update_meta``, ``metrics``
``evaluate``            ``global`` arrays, ``eval`` config         ``metrics``
======================  ========================================  ==========================

Every message's record keys are appended to ``messages.jsonl`` in the run folder (an audit
trail: a test proves from it that no LOCAL tensor ever travelled).

The ClientApp builds its site from the SuperNode's ``--node-config site-config=<file>``
(:mod:`fedrecon.runners.site_config`) and the run's model settings. Flower starts one
ClientApp process per message, and its ``Context.state`` lives in the SuperNode's memory for
one run only (SecAgg+ keeps its per-round protocol state there); LOCAL state must outlive a
SuperNode restart and the run, so everything a site keeps between rounds lives on the
site's own disk under its ``state_dir``: LOCAL tensors in a
:class:`~fedrecon.federated.DiskStore` and the training loader's RNG state. A SuperNode
that is restarted continues where it stopped (the server maps a site's new node id to its
site id when it describes itself again).

Optional secure aggregation (``secure-aggregation = true``): each round's training runs
Flower's ``SecAggPlusWorkflow`` (four message exchanges: setup, key sharing, masked vectors,
unmasking; ``secaggplus_mod`` on the sites keeps the protocol's state in Flower's
``Context.state``). The server learns only the example-weighted average of the sites'
GLOBAL tensors (clipped to ``secagg.clipping-range`` and quantized), which the strategy
aggregates as one update; strategies that need each site's own update
(``needs_individual_updates``) are refused. Per-site losses and example counts still travel
in the clear, as Flower's FitRes metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrecon.federated import (
    ServerState,
    SiteUpdate,
    Strategy,
    TrainingPlan,
    check_update,
    make_strategy,
    site_seed,
    state_nbytes,
)
from fedrecon.federated.store import atomic_torch_save
from fedrecon.models import ModelConfig, Scope
from fedrecon.train import seed_everything

from .checkpoint import loader_generators
from .simulation import RECORD_FIELDS, RoundFailed, append_records
from .site_config import build_site, load_site_config, model_factory

__all__ = [
    "FlowerRunConfig",
    "FlowerServer",
    "arrays_to_state",
    "client_app",
    "server_app",
    "state_to_arrays",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
NODE_CONFIG_KEY = "site-config"  # --node-config 'site-config="/path/site.toml"'
_POLL_S = 0.2                    # how often the server pulls replies
_LIVENESS_S = 2.0                # how often it checks that waited-for nodes are online


# -- the run's configuration ([tool.flwr.app.config], overridable with flwr run -c) --------
@dataclass(frozen=True)
class FlowerRunConfig:
    """The run configuration, parsed strictly from Flower's flat ``run_config``.

    Top-level keys use dashes (``num-server-rounds``); ``strategy.*`` keys go to
    :func:`~fedrecon.federated.make_strategy` (``strategy.name`` picks it), ``model.*``
    to :class:`~fedrecon.models.ModelConfig`, ``secagg.*`` to the SecAgg+ workflow.
    """

    run_dir: str = ""
    num_server_rounds: int = 2
    modality: str = "ct"
    seed: int = 0
    fraction: float = 1.0
    min_sites: int = 1
    expected_sites: int = 0
    eval_every: int = 1
    eval_split: str = "val"
    round_timeout: float = 600.0
    connect_timeout: float = 300.0
    resume: bool = False
    secure_aggregation: bool = False
    strategy_name: str = "fedavg"
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    secagg_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FlowerRunConfig:
        plain = {f.name: f for f in dataclasses.fields(cls)
                 if f.name not in ("strategy_name", "strategy_kwargs", "model", "secagg_kwargs")}
        kw: dict[str, Any] = {}
        strategy: dict[str, Any] = {}
        model: dict[str, Any] = {}
        secagg: dict[str, Any] = {}
        for key, value in config.items():
            head, _, rest = key.partition(".")
            if rest and head in ("strategy", "model", "secagg"):
                {"strategy": strategy, "model": model, "secagg": secagg}[head][
                    rest.replace("-", "_")] = value
                continue
            name = key.replace("-", "_")
            if name not in plain:
                raise ValueError(f"run config: unknown key '{key}' (valid: "
                                 f"{', '.join(n.replace('_', '-') for n in plain)}, "
                                 f"strategy.*, model.*, secagg.*)")
            want = type(plain[name].default)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"run config: key '{key}' must be {want.__name__}; "
                                 f"got {value!r}")
            kw[name] = value
        name = strategy.pop("name", "fedavg")
        cfg = cls(**kw, strategy_name=name, strategy_kwargs=strategy,
                  model=ModelConfig.from_dict(model, "run config model.*"),
                  secagg_kwargs=secagg)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.modality not in ("ct", "mri"):
            raise ValueError(f"run config: 'modality' must be 'ct' or 'mri'; got "
                             f"{self.modality!r}")
        if self.num_server_rounds < 0 or self.min_sites < 1 or self.eval_every < 1:
            raise ValueError("run config: need num-server-rounds >= 0, min-sites >= 1, "
                             "eval-every >= 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"run config: 'fraction' must lie in (0, 1]; got {self.fraction}")
        if self.round_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("run config: 'round-timeout' and 'connect-timeout' must be > 0")

    def build_strategy(self) -> Strategy:
        return make_strategy(self.strategy_name, **self.strategy_kwargs)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = dataclasses.asdict(self.model)
        return out


# -- records <-> name-keyed tensors ------------------------------------------------------------
def state_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Name-keyed tensors as an ``ArrayRecord`` (CPU copies, names kept)."""
    return ArrayRecord({k: _array(v) for k, v in state.items()})


def _array(t: torch.Tensor) -> Any:
    from flwr.app import Array

    return Array(t.detach().to("cpu").contiguous().numpy())


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` back to name-keyed tensors (writable copies)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def _plan_to_config(round: int, site_id: str, plan: TrainingPlan) -> ConfigRecord:
    values = {k: v for k, v in dataclasses.asdict(plan).items() if v is not None}
    return ConfigRecord({"round": round, "site-id": site_id, **values})


def _plan_from_config(config: Mapping[str, Any]) -> TrainingPlan:
    fields = {f.name for f in dataclasses.fields(TrainingPlan)}
    return TrainingPlan(**{k: v for k, v in config.items() if k in fields})


def _record_keys(content: RecordDict) -> dict[str, list[str]]:
    return {name: sorted(record.keys()) for name, record in content.items()}


# -- server ----------------------------------------------------------------------------------
@dataclass
class _SiteInfo:
    node_id: int
    num_examples: int
    protocol: list[float]


class FlowerServer:
    """The round loop of a Flower run, over a fedrecon :class:`~fedrecon.federated.Strategy`.

    Files in ``run_dir`` (as :class:`~fedrecon.runners.SimulationRunner`):
    ``metrics.jsonl``, ``checkpoint.pt`` (atomic, after every round), ``config.json``, plus
    ``messages.jsonl`` (record keys of every message, both ways) and ``status.json``
    (``running`` / ``finished`` / ``failed``).
    """

    def __init__(self, grid: Grid, config: FlowerRunConfig,
                 context: Context | None = None) -> None:
        if not config.run_dir:
            raise ValueError("run config: 'run-dir' (the server's output folder) is required")
        self.grid = grid
        self.config = config
        self.context = context
        self.run_dir = Path(config.run_dir)
        self.strategy = config.build_strategy()
        if config.secure_aggregation and self.strategy.needs_individual_updates:
            raise ValueError(f"strategy '{self.strategy.name}' needs each site's update; it "
                             f"cannot run with secure aggregation (secure-aggregation = true)")
        reference = model_factory(config.model, complex_images=config.modality == "mri",
                                  init_seed=config.seed)()
        self.global_names = self.strategy.partition.names(reference, Scope.GLOBAL)
        own = reference.state_dict()
        self.global_shapes = {k: own[k].shape for k in self.global_names}
        self._initial = {k: own[k].detach().clone() for k in self.global_names}
        self.sites: dict[str, _SiteInfo] = {}
        self._asked: set[int] = set()
        self._describing: dict[str, int] = {}  # open describe questions: message id -> node
        self._rng = np.random.default_rng(config.seed)
        self.completed_rounds = 0
        self._metrics = self.run_dir / "metrics.jsonl"
        self._ckpt = self.run_dir / "checkpoint.pt"

    # -- public ------------------------------------------------------------------------------
    def run(self) -> ServerState:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._status("running")
        try:
            if self.config.resume and self._ckpt.exists():
                self._restore()
            else:
                self._start_fresh()
            for r in range(self.completed_rounds, self.config.num_server_rounds):
                self._run_round(r)
        except BaseException as err:
            self._status("failed", error=f"{type(err).__name__}: {err}")
            raise
        self._status("finished")
        return self.strategy._require_state()

    # -- sites ----------------------------------------------------------------------------
    def _discover(self, want: int, timeout: float) -> None:
        """Ask every connected node not yet asked to describe itself, and take the answers
        that came, until ``want`` sites are known or ``timeout`` seconds passed. Questions
        stay open across calls, so a SuperNode that joins or restarts (a new node id) is
        mapped to its site at the start of a later round."""
        deadline = time.monotonic() + timeout
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in self._asked]
            if fresh:
                msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.describe",
                                group_id="describe", ttl=self.config.connect_timeout + 3600.0)
                        for n in fresh]
                for n, m in zip(fresh, msgs):
                    self._audit(m, n, "to_site")
                for n, mid in zip(fresh, self.grid.push_messages(msgs)):
                    self._asked.add(n)
                    if mid:
                        self._describing[mid] = n
            if self._describing:
                for reply in self.grid.pull_messages(list(self._describing)):
                    n = self._describing.pop(reply.metadata.reply_to_message_id, None)
                    if n is not None and not reply.has_error():
                        self._audit(reply, n, "from_site")
                        self._add_site(n, reply.content["site"])
            if len(self.sites) >= want or time.monotonic() >= deadline:
                return
            time.sleep(_POLL_S)

    def _add_site(self, node_id: int, info: Mapping[str, Any]) -> None:
        sid = str(info["site-id"])
        if info["modality"] != self.config.modality:
            raise ValueError(f"site '{sid}' (node {node_id}) is a {info['modality']} site; "
                             f"this run is {self.config.modality}")
        if sid in self.sites and self.sites[sid].node_id != node_id:
            log.info("site '%s' is back as node %d", sid, node_id)
        self.sites[sid] = _SiteInfo(node_id, int(info["num-examples"]), list(info["protocol"]))

    def _start_fresh(self) -> None:
        if self._ckpt.exists():
            raise FileExistsError(f"{self._ckpt} exists: set run config 'resume = true' to "
                                  f"continue that run, or use another run-dir")
        open(self.run_dir / "messages.jsonl", "w", encoding="utf-8").close()
        want = max(self.config.expected_sites, self.config.min_sites)
        self._discover(want, self.config.connect_timeout)
        if len(self.sites) < self.config.min_sites:
            raise RoundFailed(f"only {len(self.sites)} site(s) connected within "
                              f"{self.config.connect_timeout} s; min-sites is "
                              f"{self.config.min_sites}")
        site_ids = sorted(self.sites)
        protocols = {s: torch.tensor(self.sites[s].protocol) for s in site_ids
                     if self.sites[s].protocol}
        self.strategy.initialize(self._initial, site_ids, protocols)
        with open(self._metrics, "w", encoding="utf-8"):
            pass
        (self.run_dir / "config.json").write_text(json.dumps(
            {**self.config.as_dict(), "runner": "flower", "sites": site_ids}, indent=2) + "\n",
            encoding="utf-8")
        self._commit(0)

    def _restore(self) -> None:
        ckpt = torch.load(self._ckpt, map_location="cpu", weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("runner") != "flower":
            raise ValueError(f"{self._ckpt}: not a checkpoint of a Flower run")
        if ckpt["strategy_name"] != self.strategy.name:
            raise ValueError(f"{self._ckpt}: the run used strategy '{ckpt['strategy_name']}'; "
                             f"got '{self.strategy.name}'")
        self.strategy.load_state_dict(ckpt["strategy"])
        self.completed_rounds = int(ckpt["completed_rounds"])
        self._rng.bit_generator.state = ckpt["runner_rng"]
        with open(self._metrics, "r+b") as f:
            f.truncate(int(ckpt["metrics_bytes"]))
        self._discover(len(self.strategy.site_ids), self.config.connect_timeout)
        log.info("resumed %s after %d rounds", self.run_dir, self.completed_rounds)

    # -- one round --------------------------------------------------------------------------
    def _sample(self) -> list[str]:
        """The same draws as the embedded runner's (choice, then one uniform per sampled site
        for its simulated dropouts), so a seed samples the same sites in both runners."""
        ids = self.strategy.site_ids
        n = min(len(ids), max(self.config.min_sites, math.ceil(self.config.fraction * len(ids))))
        picked = np.sort(self._rng.choice(len(ids), size=n, replace=False))
        self._rng.random(n)
        return [ids[i] for i in picked]

    def _run_round(self, r: int) -> None:
        t_round = time.perf_counter()
        self._discover(0, 0.0)  # pick up SuperNodes that joined or restarted
        sampled = self._sample()
        instructions = self.strategy.configure(r, sampled)
        rows = {sid: {k: None for k in RECORD_FIELDS} | {
            "round": r, "site": sid, "strategy": self.strategy.name,
            "sampled": sid in instructions, "participated": False, "dropped": False,
            "bytes_sent": 0,
            "bytes_received": state_nbytes(instructions[sid].global_state)
            if sid in instructions else 0} for sid in self.strategy.site_ids}
        if self.config.secure_aggregation:
            updates, answered = self._secure_train(r, instructions)
        else:
            updates, answered = self._train(r, instructions)
        missing = [s for s in sampled if s not in answered]
        for sid in missing:
            rows[sid]["dropped"] = True
        for sid, meta in answered.items():
            rows[sid].update(participated=True, **meta)
        if len(answered) < self.config.min_sites:
            raise RoundFailed(f"round {r}: {len(answered)} of {len(sampled)} sampled sites "
                              f"answered (< min-sites={self.config.min_sites}; missing: "
                              f"{missing}); the checkpoint of round {r - 1} in {self.run_dir} "
                              f"is intact: resume with 'resume = true'")
        state = self.strategy.aggregate(r, updates, missing=missing)
        if (r + 1) % self.config.eval_every == 0 or r + 1 == self.config.num_server_rounds:
            for sid, m in self._evaluate(r, state).items():
                rows[sid].update(m)
        self._write_records(rows.values())
        self._commit(r + 1)
        log.info("round %d/%d: %d/%d sites answered (missing %s) in %.1f s", r + 1,
                 self.config.num_server_rounds, len(answered), len(sampled), missing,
                 time.perf_counter() - t_round)

    def _train(self, r: int, instructions: Mapping[str, Any]
               ) -> tuple[list[SiteUpdate], dict[str, dict[str, Any]]]:
        msgs: dict[int, Message] = {}
        for sid, ins in instructions.items():
            if sid in self.sites:
                content = RecordDict({"global": state_to_arrays(ins.global_state),
                                      "plan": _plan_to_config(r, sid, ins.plan)})
                msgs[self.sites[sid].node_id] = self._message(content, sid, "train", r)
        replies = self._exchange(msgs, self.config.round_timeout, f"round {r} train")
        updates: list[SiteUpdate] = []
        answered: dict[str, dict[str, Any]] = {}
        for sid in self.strategy.site_ids:  # a fixed order: the aggregation's float sums
            node = self.sites.get(sid)
            if node is None or node.node_id not in replies:
                continue
            content = replies[node.node_id].content
            meta = content["update_meta"]
            update = SiteUpdate(str(meta["site-id"]), int(meta["round"]),
                                arrays_to_state(content["update"]), str(meta["kind"]),
                                int(meta["num-examples"]), dict(content["metrics"]))
            if update.site_id != sid or update.round != r:
                raise ValueError(f"round {r}: node {node.node_id} ('{sid}') answered for site "
                                 f"'{update.site_id}', round {update.round}")
            check_update(update, self.global_names, self.global_shapes)
            updates.append(update)
            answered[sid] = {"num_examples": update.num_examples,
                             "loss": update.metrics.get("loss"), "bytes_sent": update.nbytes,
                             "fit_seconds": update.metrics.get("fit_seconds")}
        return updates, answered

    def _evaluate(self, r: int, state: ServerState) -> dict[str, dict[str, Any]]:
        split = self.config.eval_split
        msgs: dict[int, Message] = {}
        for sid in self.strategy.site_ids:
            if sid in self.sites:
                content = RecordDict({"global": state_to_arrays(state.for_site(sid)),
                                      "eval": ConfigRecord({"round": r, "site-id": sid,
                                                            "split": split,
                                                            "seed": self.config.seed})})
                msgs[self.sites[sid].node_id] = self._message(content, sid, "evaluate", r)
        replies = self._exchange(msgs, self.config.round_timeout, f"round {r} evaluate")
        out = {}
        for sid, info in self.sites.items():
            if info.node_id in replies:
                m = replies[info.node_id].content["metrics"]
                out[sid] = {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]),
                            "nmse": float(m["nmse"]), "eval_split": split,
                            "eval_seconds": float(m["eval_seconds"])}
        return out

    # -- secure aggregation -------------------------------------------------------------------
    def _secure_train(self, r: int, instructions: Mapping[str, Any]
                      ) -> tuple[list[SiteUpdate], dict[str, dict[str, Any]]]:
        """One round's training under Flower's SecAgg+ workflow: the result is a single
        update, the example-weighted average of the answering sites' GLOBAL tensors."""
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server import ServerConfig
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        online = set(self.grid.get_node_ids())
        names = self.global_names
        fit_ins = {}
        for sid, ins in instructions.items():
            if sid in self.sites and self.sites[sid].node_id in online:
                node = self.sites[sid].node_id
                params = ndarrays_to_parameters([ins.global_state[n].numpy() for n in names])
                proxy = GridClientProxy(node, self.grid, self.grid.run.run_id)
                fit_ins[sid] = (proxy, FitIns(params, dict(_plan_to_config(r, sid, ins.plan))))
        adapter = _SecAggStrategy(list(fit_ins.values()))
        context = self.context
        if context is None:
            raise RuntimeError("secure aggregation needs the ServerApp's Context")
        legacy = LegacyContext(context, ServerConfig(num_rounds=self.config.num_server_rounds),
                               adapter, SimpleClientManager())
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: r})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = state_to_arrays(
            self.strategy._require_state().global_state)
        # max_weight: the largest example count, so the weights w/max_weight are <= 1 but not
        # tiny (Flower quantizes w/max_weight * params: its default 1000 costs ~1e-3 precision)
        largest = max((self.sites[s].num_examples for s in fit_ins), default=1)
        kw = {"num_shares": 1.0, "reconstruction_threshold": 1.0,
              "max_weight": float(max(largest, 1))}
        kw.update(self.config.secagg_kwargs)
        workflow = SecAggPlusWorkflow(**kw, timeout=self.config.round_timeout)
        workflow(_AuditedGrid(self.grid, self), legacy)
        answered: dict[str, dict[str, Any]] = {}
        if not adapter.results:
            return [], answered
        arrays = parameters_to_ndarrays(adapter.results[0][1].parameters)
        tensors = {n: torch.from_numpy(np.array(a, copy=True)).to(self._initial[n].dtype)
                   for n, a in zip(names, arrays)}
        total = 0
        for _, res in adapter.results:
            sid = str(res.metrics["site-id"])
            total += res.num_examples
            answered[sid] = {"num_examples": res.num_examples, "loss": res.metrics.get("loss"),
                             "bytes_sent": state_nbytes(tensors),
                             "fit_seconds": res.metrics.get("fit_seconds")}
        kind = next(iter(instructions.values())).plan.send
        update = SiteUpdate("secure-aggregate", r, tensors, kind, total)
        check_update(update, self.global_names, self.global_shapes)
        return [update], answered

    # -- messaging --------------------------------------------------------------------------
    def _message(self, content: RecordDict, site_id: str, kind: str, r: int) -> Message:
        ttl = self.config.round_timeout + 60.0
        return Message(content, dst_node_id=self.sites[site_id].node_id, message_type=kind,
                       group_id=str(r), ttl=ttl)

    def _exchange(self, msgs: Mapping[int, Message], timeout: float,
                  what: str) -> dict[int, Message]:
        """Send ``node id -> message``; return the error-free replies by node id that came
        within ``timeout`` seconds. A node that goes offline is not waited for."""
        online = set(self.grid.get_node_ids())
        for n in sorted(set(msgs) - online):
            log.warning("%s: node %d is offline; not waiting for it", what, n)
        nodes = [n for n in msgs if n in online]
        if not nodes:
            return {}
        for n in nodes:
            self._audit(msgs[n], n, "to_site")
        ids = list(self.grid.push_messages([msgs[n] for n in nodes]))
        pending = {mid: n for mid, n in zip(ids, nodes) if mid}
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + _LIVENESS_S
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                n = pending.pop(reply.metadata.reply_to_message_id, None)
                if n is None:
                    continue
                if reply.has_error():
                    log.warning("%s: node %d answered with an error: %s", what, n, reply.error)
                    continue
                self._audit(reply, n, "from_site")
                replies[n] = reply
            if pending and time.monotonic() >= next_check:
                online = set(self.grid.get_node_ids())
                for mid, n in list(pending.items()):
                    if n not in online:
                        log.warning("%s: node %d went offline", what, n)
                        del pending[mid]
                next_check = time.monotonic() + _LIVENESS_S
            if pending:
                time.sleep(_POLL_S)
        if pending:
            log.warning("%s: no answer from node(s) %s within %.0f s", what,
                        sorted(pending.values()), timeout)
        return replies

    def _audit(self, msg: Message, node_id: int, direction: str) -> None:
        site = next((s for s, i in self.sites.items() if i.node_id == node_id), None)
        line = {"direction": direction, "node": node_id, "site": site,
                "type": msg.metadata.message_type, "group": msg.metadata.group_id,
                "records": _record_keys(msg.content), "time": time.time()}
        with open(self.run_dir / "messages.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    # -- files ------------------------------------------------------------------------------
    def _write_records(self, rows: Any) -> None:
        append_records(self._metrics, rows)

    def _commit(self, completed: int) -> None:
        ckpt = {"format": CHECKPOINT_FORMAT, "runner": "flower",
                "completed_rounds": completed, "strategy_name": self.strategy.name,
                "strategy": self.strategy.state_dict(), "site_ids": list(self.strategy.site_ids),
                "config": self.config.as_dict(), "runner_rng": self._rng.bit_generator.state,
                "metrics_bytes": self._metrics.stat().st_size}
        atomic_torch_save(ckpt, self._ckpt)
        self.completed_rounds = completed

    def _status(self, state: str, **extra: Any) -> None:
        path = self.run_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"state": state, "completed_rounds": self.completed_rounds,
                                   "time": time.time(), **extra}) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class _AuditedGrid:
    """A ``Grid`` that records the keys of every message it pushes and pulls (for the
    SecAgg+ workflow, which talks to the grid itself)."""

    def __init__(self, grid: Grid, server: FlowerServer) -> None:
        self._grid = grid
        self._server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        for m in messages:
            self._server._audit(m, m.metadata.dst_node_id, "to_site")
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(self._grid.pull_messages(message_ids))
        for m in replies:
            if not m.has_error():
                self._server._audit(m, m.metadata.src_node_id, "from_site")
        return replies

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        ids = {i for i in self.push_messages(messages) if i}
        deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        out = []
        while ids and time.monotonic() < deadline:
            for reply in self.pull_messages(list(ids)):
                ids.discard(reply.metadata.reply_to_message_id)
                out.append(reply)
            if ids:
                time.sleep(_POLL_S)
        return out


def _secagg_strategy_base() -> type:
    from flwr.server.strategy import Strategy as LegacyStrategy

    return LegacyStrategy


class _SecAggStrategy(_secagg_strategy_base()):  # type: ignore[misc]
    """The legacy-strategy face the SecAgg+ workflow needs: it hands out the fedrecon
    strategy's instructions and keeps the securely aggregated result."""

    def __init__(self, fit_ins: list[tuple[Any, Any]]) -> None:
        self.fit_ins = fit_ins
        self.results: list[tuple[Any, Any]] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.fit_ins

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.results = list(results)
        return (self.results[0][1].parameters if self.results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    FlowerServer(grid, FlowerRunConfig.from_run_config(context.run_config), context).run()


# -- client ----------------------------------------------------------------------------------
class _NodeSite:
    """The site of this SuperNode, rebuilt in every ClientApp process from its own files."""

    def __init__(self, context: Context) -> None:
        path = context.node_config.get(NODE_CONFIG_KEY)
        if not isinstance(path, str) or not path:
            raise ValueError(f"SuperNode has no node config '{NODE_CONFIG_KEY}' (start it with "
                             f"--node-config '{NODE_CONFIG_KEY}=\"/path/site.toml\"')")
        self.config = load_site_config(path)
        self.run = FlowerRunConfig.from_run_config(context.run_config)
        if self.config.spec.modality != self.run.modality:
            raise ValueError(f"{path}: site '{self.config.name}' is "
                             f"{self.config.spec.modality}; the run is {self.run.modality}")
        if self.config.runtime.torch_threads:
            torch.set_num_threads(self.config.runtime.torch_threads)
        self.site = build_site(self.config, self.run.model, init_seed=self.run.seed,
                               partition=self.run.build_strategy().partition)
        self._rng_path = Path(self.config.runtime.state_dir) / "loader_rng.pt"

    def restore_loader_rng(self) -> None:
        if self._rng_path.exists():
            states = torch.load(self._rng_path, weights_only=False)
            for gen, state in zip(loader_generators(self.site.train_loader), states):
                gen.set_state(state)

    def save_loader_rng(self) -> None:
        atomic_torch_save([g.get_state() for g in loader_generators(self.site.train_loader)],
                          self._rng_path)


client_app = ClientApp()


@client_app.query("describe")
def _describe(msg: Message, context: Context) -> Message:
    node = _NodeSite(context)
    protocol = node.site.protocol
    info = ConfigRecord({"site-id": node.site.site_id, "num-examples": node.site.num_examples,
                         "modality": node.config.spec.modality,
                         "protocol": [float(v) for v in protocol] if protocol is not None
                         else []})
    return Message(RecordDict({"site": info}), reply_to=msg)


def site_fit(node: _NodeSite, msg: Message) -> SiteUpdate:
    """Run the site's ``fit`` on a train message (also used by the SecAgg+ path)."""
    from fedrecon.federated import SiteInstructions

    plan_cfg = msg.content["plan"]
    if plan_cfg["site-id"] != node.site.site_id:
        raise ValueError(f"instructions for site '{plan_cfg['site-id']}' reached site "
                         f"'{node.site.site_id}'")
    instructions = SiteInstructions(int(plan_cfg["round"]), node.site.site_id,
                                    arrays_to_state(msg.content["global"]),
                                    _plan_from_config(plan_cfg))
    node.restore_loader_rng()
    t0 = time.perf_counter()
    update = node.site.fit(instructions)
    node.save_loader_rng()
    update.metrics["fit_seconds"] = time.perf_counter() - t0
    return update


def _secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of the SecAgg+ workflow only."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _secure_fit(msg: Message, context: Context) -> Message:
    """The SecAgg+ workflow's training step: Flower's FitIns/FitRes layout (a list of
    arrays in the order of the GLOBAL names), which ``secaggplus_mod`` then masks."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedrecon.federated import SiteInstructions

    node = _NodeSite(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    if cfg["site-id"] != node.site.site_id:
        raise ValueError(f"instructions for site '{cfg['site-id']}' reached site "
                         f"'{node.site.site_id}'")
    names = node.site.partition.names(node.site.model_factory(), Scope.GLOBAL)
    arrays = parameters_to_ndarrays(fitins.parameters)
    start = {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)}
    node.restore_loader_rng()
    t0 = time.perf_counter()
    update = node.site.fit(SiteInstructions(int(cfg["round"]), node.site.site_id, start,
                                            _plan_from_config(cfg)))
    node.save_loader_rng()
    metrics = {"site-id": update.site_id, "fit_seconds": time.perf_counter() - t0,
               **{k: float(v) for k, v in update.metrics.items()}}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [update.tensors[n].numpy() for n in names]), update.num_examples, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


@client_app.train(mods=[_secagg_when_asked])
def _train(msg: Message, context: Context) -> Message:
    if "plan" not in msg.content:
        return _secure_fit(msg, context)
    update = site_fit(_NodeSite(context), msg)  # make_update inside: GLOBAL tensors only
    meta = ConfigRecord({"site-id": update.site_id, "round": update.round, "kind": update.kind,
                         "num-examples": update.num_examples})
    return Message(RecordDict({"update": state_to_arrays(update.tensors), "update_meta": meta,
                               "metrics": MetricRecord(dict(update.metrics))}), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    node = _NodeSite(context)
    cfg = msg.content["eval"]
    seed_everything(site_seed(int(cfg["seed"]), f"eval/{node.site.site_id}", int(cfg["round"])))
    t0 = time.perf_counter()
    m = node.site.evaluate(arrays_to_state(msg.content["global"]), split=str(cfg["split"]))
    metrics = {k: float(m[k]) for k in ("psnr", "ssim", "nmse")}
    metrics["eval_seconds"] = time.perf_counter() - t0
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
