"""The Flower server side of a fedrecon run: :class:`FlowerServer` drives rounds over a
Flower ``Grid`` with a fedrecon :class:`~fedrecon.federated.Strategy` (records, checkpoints,
stragglers), and the SecAgg+ adapter to Flower's legacy strategy API."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedrecon.federated import (
    ServerState,
    SiteUpdate,
    check_update,
    state_nbytes,
)
from fedrecon.federated.store import atomic_torch_save, atomic_write_text
from fedrecon.models import Scope

from .flower_messages import (
    _LIVENESS_S,
    _POLL_S,
    _TTL_SLACK_S,
    CHECKPOINT_FORMAT,
    FlowerRunConfig,
    _plan_to_config,
    _record_keys,
    arrays_to_state,
    state_to_arrays,
)
from .simulation import RECORD_FIELDS, RoundFailed, append_records
from .site_config import model_factory

log = logging.getLogger(__name__)

#: Run-config fields a resumed run must share with its checkpoint (FlowerRunConfig names).
RESUME_FIXED = ("modality", "seed", "fraction", "min_sites", "secure_aggregation",
                "strategy_name", "strategy_kwargs", "model", "secagg_kwargs")


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
        # open describe questions: message id -> (node, when asked)
        self._describing: dict[str, tuple[int, float]] = {}
        self._failures: dict[int, str] = {}  # node -> why it gave no reply (last exchange)
        self._describe_errors: dict[int, str] = {}  # node -> error of its describe reply
        self._rng = np.random.default_rng(config.seed)
        self.run_key = secrets.token_hex(8)  # this run's name for the sites; kept on resume
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
            self._status("running")
            for r in range(self.completed_rounds, self.config.num_server_rounds):
                self._run_round(r)
        except BaseException as err:
            self._status("failed", error=f"{type(err).__name__}: {err}")
            raise
        self._status("finished")
        return self.strategy._require_state()

    # -- sites ----------------------------------------------------------------------------
    def _discover(self, want: int, timeout: float, *, settle: bool = False) -> None:
        """Ask every connected node not yet asked to describe itself, and take the answers
        that came, until ``want`` sites are known or ``timeout`` seconds passed.

        Questions stay open across calls. With ``settle``, also wait for the answers of
        nodes asked less than ``connect-timeout`` seconds ago (a SuperNode that joined or
        restarted without SuperNode authentication has a new node id: its site is known only
        once it answered, and the round's messages must go to the new id, not to the old
        one, which the SuperLink counts as online until its heartbeat expires); a node that
        never answers delays rounds for ``connect-timeout`` seconds once."""
        deadline = time.monotonic() + timeout
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in self._asked]
            if fresh:
                msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.describe",
                                group_id="describe", ttl=self.config.connect_timeout + 3600.0)
                        for n in fresh]
                for n, m in zip(fresh, msgs):
                    self._audit(m, n, "to_site")
                asked_at = time.monotonic()
                for n, mid in zip(fresh, self.grid.push_messages(msgs)):
                    self._asked.add(n)
                    if mid:
                        self._describing[mid] = (n, asked_at)
            if self._describing:
                for reply in self.grid.pull_messages(list(self._describing)):
                    n, _ = self._describing.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                    if n is not None and reply.has_error():
                        log.warning("node %d could not describe its site: %s", n, reply.error)
                        self._describe_errors[n] = reply.error.reason
                    elif n is not None:
                        self._audit(reply, n, "from_site")
                        self._add_site(n, reply.content["site"])
            now = time.monotonic()
            waiting = settle and any(now < t + self.config.connect_timeout
                                     for _, t in self._describing.values())
            if not waiting and (len(self.sites) >= want or now >= deadline):
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
            errors = "".join(f"; node {n} answered with an error: {e}"
                             for n, e in sorted(self._describe_errors.items()))
            raise RoundFailed(f"only {len(self.sites)} site(s) connected within "
                              f"{self.config.connect_timeout} s; min-sites is "
                              f"{self.config.min_sites}{errors}")
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
        # what a resumed run may change: its length, waits and evaluation schedule, not what
        # it computes
        now = self.config.as_dict()
        changed = sorted(k for k in RESUME_FIXED if ckpt["config"].get(k) != now.get(k))
        if changed:
            had = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in changed)
            raise ValueError(f"{self._ckpt}: 'resume = true' with other {', '.join(changed)} "
                             f"than the run had ({had})")
        self.strategy.load_state_dict(ckpt["strategy"])
        self.completed_rounds = int(ckpt["completed_rounds"])
        self._rng.bit_generator.state = ckpt["runner_rng"]
        self.run_key = str(ckpt.get("run_key") or self.run_key)
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
        self._failures = {}
        self._discover(0, 0.0, settle=True)  # SuperNodes that joined or restarted
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
                              f"{self._why(missing)}); the checkpoint of round {r - 1} in "
                              f"{self.run_dir} is intact: resume with 'resume = true'")
        state = self.strategy.aggregate(r, updates, missing=missing)
        if (r + 1) % self.config.eval_every == 0 or r + 1 == self.config.num_server_rounds:
            for sid, m in self._evaluate(r, state).items():
                rows[sid].update(m)
        self._write_records(rows.values())
        self._commit(r + 1)
        self._status("running")  # with the new completed_rounds
        log.info("round %d/%d: %d/%d sites answered (missing %s) in %.1f s", r + 1,
                 self.config.num_server_rounds, len(answered), len(sampled), missing,
                 time.perf_counter() - t_round)

    def _why(self, missing: list[str]) -> str:
        """The missing sites, each with why it gave no reply, as far as the server knows."""
        def why(sid: str) -> str:
            if sid not in self.sites:
                return "not connected"
            return self._failures.get(self.sites[sid].node_id, "no answer")

        return ", ".join(f"{sid} ({why(sid)})" for sid in missing) or "none"

    def _train(self, r: int, instructions: Mapping[str, Any]
               ) -> tuple[list[SiteUpdate], dict[str, dict[str, Any]]]:
        msgs: dict[int, Message] = {}
        for sid, ins in instructions.items():
            if sid in self.sites:
                content = RecordDict({"global": state_to_arrays(ins.global_state),
                                      "plan": _plan_to_config(r, sid, ins.plan,
                                                              self.run_key)})
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
            for name, t in update.tensors.items():  # the aggregate takes the first's dtype
                if t.dtype != self._initial[name].dtype:
                    raise ValueError(f"round {r}: update from site '{sid}': '{name}' has dtype "
                                     f"{t.dtype}, expected {self._initial[name].dtype}")
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
                fit_ins[sid] = (proxy, FitIns(params, dict(_plan_to_config(
                    r, sid, ins.plan, self.run_key))))
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
        # the round waits round-timeout s for replies; a message must not outlive that by
        # much: a SuperNode restarted after the round gave up on it would still pull it and
        # train on a stale instruction (its LOCAL state moving on for a reply nobody reads)
        ttl = self.config.round_timeout + _TTL_SLACK_S
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
        self._failures = {n: "offline" for n in msgs if n not in online}
        if not nodes:
            return {}
        for n in nodes:
            self._audit(msgs[n], n, "to_site")
        ids = list(self.grid.push_messages([msgs[n] for n in nodes]))
        pending = {mid: n for mid, n in zip(ids, nodes) if mid}
        self._failures.update({n: "not delivered" for mid, n in zip(ids, nodes) if not mid})
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
                    self._failures[n] = f"error: {reply.error.reason}"
                    continue
                self._audit(reply, n, "from_site")
                replies[n] = reply
            if pending and time.monotonic() >= next_check:
                online = set(self.grid.get_node_ids())
                for mid, n in list(pending.items()):
                    if n not in online:
                        log.warning("%s: node %d went offline", what, n)
                        self._failures[n] = "went offline"
                        del pending[mid]
                next_check = time.monotonic() + _LIVENESS_S
            if pending:
                time.sleep(_POLL_S)
        if pending:
            log.warning("%s: no answer from node(s) %s within %.0f s", what,
                        sorted(pending.values()), timeout)
        for n in pending.values():
            self._failures[n] = f"no answer within {timeout:g} s"
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
                "run_key": self.run_key,
                "metrics_bytes": self._metrics.stat().st_size}
        atomic_torch_save(ckpt, self._ckpt)
        self.completed_rounds = completed

    def _status(self, state: str, **extra: Any) -> None:
        write_status(self.run_dir, state, self.completed_rounds, **extra)


def write_status(run_dir: str | os.PathLike, state: str, completed_rounds: int,
                 **extra: Any) -> None:
    """``run_dir/status.json`` (atomic): the state, the completed rounds and the time."""
    atomic_write_text(Path(run_dir) / "status.json",
                      json.dumps({"state": state, "completed_rounds": completed_rounds,
                                  "time": time.time(), **extra}) + "\n")


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


