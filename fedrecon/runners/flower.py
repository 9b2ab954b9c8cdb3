"""fedrecon on Flower (flwr 1.42): a ServerApp over a fedrecon ``Strategy`` and a ClientApp
over a fedrecon ``Site``. It and its parts ``flower_messages`` (run config, records)
and ``flower_server`` (round loop, SecAgg+ adapter) are the only modules that import ``flwr``.

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
site's own disk under its ``state_dir``: LOCAL tensors and the training loader's RNG state,
one atomically written file per site (``local/<site>.pt``), and ``journal.jsonl``, a line
per fit with the round and digest of the state it started from and saved
(:func:`persisted_state`). A SuperNode that is restarted continues where it stopped: with
SuperNode authentication its node id is bound to its key (``fedrecon flower-site`` starts
it again while the SuperLink still counts the killed node as online); without, it has a new
node id, which the server maps to its site when the node describes itself at the start of
the next round (before that round's messages go out).

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

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrecon.federated import (
    DiskStore,
    SiteUpdate,
    site_seed,
)
from fedrecon.federated.store import atomic_torch_save
from fedrecon.models import Scope
from fedrecon.train import seed_everything

from .checkpoint import loader_generators
from .flower_messages import (
    NODE_CONFIG_KEY,
    FlowerRunConfig,
    _plan_from_config,
    arrays_to_state,
    state_to_arrays,
)
from .flower_server import FlowerServer, write_status
from .site_config import build_site, load_site_config

__all__ = [
    "FlowerRunConfig",
    "FlowerServer",
    "arrays_to_state",
    "client_app",
    "persisted_state",
    "server_app",
    "state_summary",
    "state_to_arrays",
]

log = logging.getLogger(__name__)

server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    try:
        server = FlowerServer(grid, FlowerRunConfig.from_run_config(context.run_config),
                              context)
    except BaseException as err:  # before run() writes status.json: write it here, so that
        _failed_status(context.run_config.get("run-dir"), err)  # flower-run --wait ends
        raise
    server.run()


def _failed_status(run_dir: Any, err: BaseException) -> None:
    """``status.json`` of a run that failed before its server started (a bad run config)."""
    if not isinstance(run_dir, str) or not run_dir:
        return
    try:
        path = Path(run_dir) / "status.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # a resume refused: the rounds of the run before stand
            done = int(json.loads(path.read_text(encoding="utf-8"))["completed_rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            done = 0
        write_status(run_dir, "failed", done, error=f"{type(err).__name__}: {err}")
    except OSError:
        log.exception("could not write %s/status.json", run_dir)


# -- client ----------------------------------------------------------------------------------
class _NodeStore(DiskStore):
    """The site's :class:`~fedrecon.federated.DiskStore` (``<state_dir>/local``).

    Every write also carries the training loader's RNG state (``loader_rng``) and the run's
    key (``run_key``), so the LOCAL tensors and the RNG that draws the next batches are one
    atomically written file: a SuperNode killed at any moment restarts from a consistent
    pair. ``before/<site>.pt`` keeps the state the last fit started from: a fit that repeats
    the round of the last one in the same run (a run resumed from the checkpoint of the
    round before, after the site had already trained in the unfinished round) starts from
    it, as it did the first time, instead of training that round twice.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        self.train_loader: Any = None
        self.fit_key: tuple[str, int] | None = None  # (run key, round) of the fit under way

    def _before(self, site_id: str) -> Path:  # a subfolder: not one of site_ids()
        return self.root / "before" / self._path(site_id).name

    def repeats(self, current: Mapping[str, Any] | None) -> bool:
        """Whether the fit under way repeats the one that wrote ``current``."""
        return (self.fit_key is not None and current is not None
                and current.get("run_key") is not None
                and (current["run_key"], current.get("round")) == self.fit_key)

    def get(self, site_id: str) -> dict[str, Any] | None:
        current = super().get(site_id)
        if not self.repeats(current):
            return current
        before = self._before(site_id)
        return torch.load(before, map_location="cpu", weights_only=False) \
            if before.exists() else None

    def put(self, site_id: str, state: dict[str, Any]) -> None:
        state = dict(state)
        state["loader_rng"] = [g.get_state() for g in loader_generators(self.train_loader)]
        if self.fit_key is not None:
            state["run_key"] = self.fit_key[0]
        current = super().get(site_id)
        if current is None:
            self._before(site_id).unlink(missing_ok=True)
        elif not self.repeats(current):
            self._before(site_id).parent.mkdir(exist_ok=True)
            atomic_torch_save(current, self._before(site_id))
        super().put(site_id, state)


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
        self.state_dir = Path(self.config.runtime.state_dir)
        store = _NodeStore(self.state_dir / "local")
        self.site = build_site(self.config, self.run.model, init_seed=self.run.seed,
                               partition=self.run.build_strategy().partition, store=store)
        store.train_loader = self.site.train_loader

    def restore_loader_rng(self) -> None:
        states = (self.site.store.get(self.site.site_id) or {}).get("loader_rng")
        if states is not None:
            for gen, state in zip(loader_generators(self.site.train_loader), states):
                gen.set_state(state)

    def fit(self, instructions: Any, run_key: str | None = None) -> SiteUpdate:
        """``Site.fit`` from the state on this site's disk (LOCAL tensors and loader RNG, one
        file, written again at the end of the fit; for a repeated round of run ``run_key``,
        the state before its first try: :class:`_NodeStore`), with a line in the site's own
        ``journal.jsonl``: the round, and the round and digest of the state it started from
        and of the state it saved (:func:`state_summary`)."""
        store = self.site.store
        sid = self.site.site_id
        current = DiskStore.get(store, sid)
        if (run_key and current is not None and current.get("run_key") == run_key
                and current.get("round") is not None
                and int(instructions.round) < int(current["round"])):
            # a stale message (delivered late, or out of order): the LOCAL state has moved on
            raise ValueError(f"site '{sid}': train message of round {instructions.round} of "
                             f"run {run_key}, after this site trained round "
                             f"{current['round']} of it")
        store.fit_key = (run_key, int(instructions.round)) if run_key else None
        repeat = store.repeats(current)
        loaded = state_summary(store.get(sid))
        try:
            self.restore_loader_rng()
            t0 = time.perf_counter()
            update = self.site.fit(instructions)
            update.metrics["fit_seconds"] = time.perf_counter() - t0
        finally:
            store.fit_key = None
        line = {"event": "fit", "round": int(instructions.round), "run_key": run_key,
                "repeat": repeat, "pid": os.getpid(), "time": time.time(), "loaded": loaded,
                "saved": persisted_state(self.state_dir, sid)}
        with open(self.state_dir / "journal.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return update


def persisted_state(state_dir: str | os.PathLike, site_id: str) -> dict[str, Any]:
    """What a site keeps on its disk between rounds (``<state_dir>/local/<site>.pt``),
    summarized by :func:`state_summary`."""
    return state_summary(DiskStore(Path(state_dir) / "local").get(site_id))


def state_summary(private: Mapping[str, Any] | None) -> dict[str, Any]:
    """The round a site's stored state was written in (``None`` before its first fit) and a
    SHA-256 digest of its LOCAL tensors (and personal model) and of its training loader's
    RNG state."""
    private = private or {}
    h = hashlib.sha256()
    for part in ("local", "personal"):
        for name, t in sorted((private.get(part) or {}).items()):
            h.update(f"{part}/{name}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in private.get("loader_rng") or []:
        h.update(b"loader_rng")
        h.update(t.numpy().tobytes())
    return {"round": private.get("round"), "digest": h.hexdigest()}


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
    return node.fit(instructions, run_key=str(plan_cfg.get("run-key", "")) or None)


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
    update = node.fit(SiteInstructions(int(cfg["round"]), node.site.site_id, start,
                                       _plan_from_config(cfg)),
                      run_key=str(cfg.get("run-key", "")) or None)
    metrics = {"site-id": update.site_id, **{k: float(v) for k, v in update.metrics.items()}}
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
    if cfg["site-id"] != node.site.site_id:  # else its metrics would be recorded as another's
        raise ValueError(f"evaluation for site '{cfg['site-id']}' reached site "
                         f"'{node.site.site_id}'")
    seed_everything(site_seed(int(cfg["seed"]), f"eval/{node.site.site_id}", int(cfg["round"])))
    t0 = time.perf_counter()
    m = node.site.evaluate(arrays_to_state(msg.content["global"]), split=str(cfg["split"]))
    metrics = {k: float(m[k]) for k in ("psnr", "ssim", "nmse")}
    metrics["eval_seconds"] = time.perf_counter() - t0
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

