"""In-process federated simulation: every site in one process, seeded, checkpointed per round.

A round: sample ``max(min_sites, ceil(fraction * n))`` sites with the runner's RNG, drop each
sampled site with probability ``drop_prob`` (a dropped site receives its instructions but
never answers, and does no work), let the others ``fit``, gate every received
:class:`~fedrecon.federated.SiteUpdate` with :func:`~fedrecon.federated.check_update`, and
``strategy.aggregate(round, updates, missing=dropped)``. Every ``eval_every`` rounds (and
after the last) each site is evaluated with ``strategy.state.for_site(site_id)``.

Files in ``run_dir``:

- ``sites/``: the sites' LOCAL state, round-versioned (:class:`.checkpoint.RoundStore`);
  the runner installs this store on every site, so a site holds no model between rounds
  and 100+ virtual sites cost one model at a time.
- ``checkpoint.pt``: written atomically after every round (and before round 0): committed
  rounds, ``strategy.state_dict()``, runner RNG, Python/NumPy/torch RNG states, the states
  of the loaders' own ``torch.Generator`` s, the run's config, the sites' seeds and the
  length of ``metrics.jsonl`` at commit time.
- ``metrics.jsonl``: one record per site per round (see :data:`RECORD_FIELDS`), appended,
  flushed and fsynced before the checkpoint. :meth:`SimulationRunner.resume` truncates it
  to the committed length, so a redone round is never recorded twice.
- ``config.json``: the runner's settings, for people.
- ``communication.json``: bytes sent/received per site and in all (rewritten after ``run``).

Resume guarantee: a run killed at any point (even mid-write) and resumed with sites and a
strategy rebuilt from the same config ends with the same server state and the same
metrics (up to timing fields) as an uninterrupted run. This holds when site randomness
comes from :func:`~fedrecon.federated.site_seed` (``Site.fit`` reseeds every round) and from
the loaders' ``generator`` s or the global torch RNG, which the checkpoint carries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrecon.federated import (
    ServerState,
    Site,
    SiteUpdate,
    Strategy,
    check_update,
    site_seed,
    state_nbytes,
)
from fedrecon.federated.store import atomic_torch_save, atomic_write_text
from fedrecon.models import Scope
from fedrecon.train import seed_everything

from .checkpoint import CHECKPOINT_FORMAT, RoundStore, capture_rng, loader_generators, restore_rng

__all__ = [
    "RECORD_FIELDS",
    "Evaluator",
    "RoundFailed",
    "RunnerConfig",
    "SimulationRunner",
    "read_metrics",
]

log = logging.getLogger(__name__)

#: The keys of every ``metrics.jsonl`` record (values ``null`` where they do not apply).
RECORD_FIELDS = (
    "round",           # int, 0-based
    "site",            # site id
    "strategy",        # strategy.name
    "sampled",         # bool: the server sent instructions this round
    "participated",    # bool: the site trained and its update was aggregated
    "dropped",         # bool: sampled but did not answer (simulated straggler)
    "num_examples",    # int or null: the update's example count
    "loss",            # float or null: mean training loss of the round's local steps
    "psnr", "ssim", "nmse",  # float or null: evaluation on eval_split (null: not evaluated)
    "eval_split",      # "val"/"test" or null
    "bytes_sent",      # int: serialized tensor bytes of the site's update (0 if none)
    "bytes_received",  # int: tensor bytes of the instructions' global_state (0 if not sampled)
    "fit_seconds", "eval_seconds",  # float or null: wall time of fit / evaluate
    "epsilon",         # float or null: DP epsilon so far (``privacy`` with DP), same for all sites
    "rejected",        # str or null: why the server rejected the site's update (``privacy``)
    "time",            # float: Unix time the record was written
)

#: ``(server state, split) -> metrics`` for one site; the default calls ``Site.evaluate``.
Evaluator = Callable[[ServerState, str], Mapping[str, float]]


class RoundFailed(RuntimeError):
    """Fewer than ``min_sites`` sampled sites answered in every try of a round."""


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """The settings stored in the checkpoint; a resumed run uses these."""

    rounds: int
    seed: int = 0
    fraction: float = 1.0
    min_sites: int = 1
    drop_prob: float = 0.0
    eval_every: int = 1
    eval_split: str = "val"
    retries: int = 0

    def validate(self, n_sites: int) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"argument 'rounds' must be an integer >= 1; got {self.rounds!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"argument 'fraction' must lie in (0, 1]; got {self.fraction}")
        if not 1 <= self.min_sites <= n_sites:
            raise ValueError(f"argument 'min_sites' must lie in [1, {n_sites}] (the number of "
                             f"sites); got {self.min_sites}")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"argument 'drop_prob' must lie in [0, 1); got {self.drop_prob}")
        if self.eval_every < 1:
            raise ValueError(f"argument 'eval_every' must be >= 1; got {self.eval_every}")
        if self.retries < 0:
            raise ValueError(f"argument 'retries' must be >= 0; got {self.retries}")


def _clean(value: Any) -> Any:
    """JSON-safe: floats that are not finite become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_records(path: Path, rows: Any) -> None:
    """Append ``rows`` (dicts) to the JSON-lines file ``path`` with a common time stamp,
    non-finite floats as ``null``, flushed and fsynced (both runners' metrics.jsonl)."""
    now = time.time()
    lines = "".join(json.dumps({k: _clean(v) for k, v in row.items()} | {"time": now}) + "\n"
                    for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``. A line that is not a JSON record (a run
    killed mid-append leaves a torn last line until it is resumed) is an error naming the
    file and the line."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not a JSON record ({err}); a run "
                                 f"killed mid-write is repaired by resuming it") from err
    return records


def _check_site_id(site_id: Any) -> None:
    """Site ids name folders of the run (``sites/<id>/``)."""
    if (not isinstance(site_id, str) or not site_id or "/" in site_id or "\0" in site_id
            or site_id.startswith(".")):
        raise ValueError(f"argument 'sites': site id {site_id!r} cannot name a folder; use a "
                         f"non-empty string without '/' and without a leading '.'")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``. A damaged file (unreadable, truncated, not a checkpoint) is
    an :class:`OSError` naming it; a checkpoint of another format a :class:`ValueError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, empty, not a torch file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {first}); "
                      f"restore a copy or start the run again") from err
    if not isinstance(ckpt, dict):
        raise OSError(f"{path}: not a fedrecon checkpoint (a {type(ckpt).__name__}, not a dict)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:  # a file of another version: not damage
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')!r}; this runner "
                         f"reads format {CHECKPOINT_FORMAT}")
    missing = sorted(set(_CHECKPOINT_KEYS) - set(ckpt))
    if missing:
        raise OSError(f"{path}: damaged checkpoint, it lacks {missing}")
    return ckpt


_CHECKPOINT_KEYS = ("completed_rounds", "strategy_name", "strategy", "site_ids", "config",
                    "runner_rng", "rng", "loader_rng", "metrics_bytes")


class SimulationRunner:
    """Run a federation of in-process sites under one strategy.

    Parameters
    ----------
    sites
        The sites (unique ids). The runner replaces each site's ``store`` with its
        round-versioned store under ``run_dir/sites`` (LOCAL state a site already had is
        imported as its starting state).
    strategy
        Any :class:`~fedrecon.federated.Strategy`; initialized here unless it already has a
        state. Sites must use the strategy's partition.
    rounds
        Rounds of the run (numbered ``0 .. rounds - 1``).
    run_dir
        Output folder; a fresh run refuses a folder that holds a checkpoint (use
        :meth:`resume`).
    seed
        Seeds the initial model, site sampling and dropouts.
    fraction, min_sites
        ``max(min_sites, ceil(fraction * n))`` sites are sampled per round.
    drop_prob
        Probability that a sampled site does not answer (seeded).
    retries
        When fewer than ``min_sites`` answer, sample again (new draw of the seeded RNG) up to
        this many times, then raise :class:`RoundFailed`. The last checkpoint stays intact.
    eval_every, eval_split
        Evaluate every site every ``eval_every`` rounds and after the last round.
    progress
        tqdm bars over rounds and over the sites of a round.
    on_update
        Called with every :class:`SiteUpdate` as received, before the server-side check
        (an audit hook; it must not modify the update).
    evaluators
        ``site id -> Evaluator``, replacing the default ``Site.evaluate`` (the centralized
        baseline evaluates its pooled model on each site's data this way). Ids that are not
        training sites get records of their own.
    privacy
        A :class:`fedrecon.privacy.UpdatePipeline` (clipping/noise at the sites, validation,
        secure aggregation, DP accounting), or ``None``: the plain path. With secure
        aggregation ``on_update`` sees nothing (the server holds no individual update); use
        the pipeline's ``on_secure_sum``.
    compression
        A :class:`fedrecon.efficient.UpdateCompressor` (top-k with error feedback, int8), or
        ``None``. It runs after the privacy pipeline's site-side step; the server decodes
        the bytes into a dense delta. With it, ``bytes_sent``/``bytes_received`` are the
        serialized message sizes. Refuses secure aggregation.
    """

    def __init__(self, sites: Sequence[Site], strategy: Strategy, *, rounds: int,
                 run_dir: str | os.PathLike, seed: int = 0, fraction: float = 1.0,
                 min_sites: int = 1, drop_prob: float = 0.0, eval_every: int = 1,
                 eval_split: str = "val", retries: int = 0, progress: bool = True,
                 on_update: Callable[[SiteUpdate], None] | None = None,
                 evaluators: Mapping[str, Evaluator] | None = None,
                 privacy: Any | None = None, compression: Any | None = None) -> None:
        if not sites:
            raise ValueError("argument 'sites' is empty")
        ids = [s.site_id for s in sites]
        for sid in ids:
            _check_site_id(sid)
        if len(set(ids)) != len(ids):
            twice = sorted({s for s in ids if ids.count(s) > 1})
            raise ValueError(f"argument 'sites': site ids must be unique; {twice} appear more "
                             f"than once")
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise ValueError(f"argument 'run_dir': {run_dir} is a file, not a folder")
        self.config = RunnerConfig(rounds, seed, fraction, min_sites, drop_prob, eval_every,
                                   eval_split, retries)
        self.config.validate(len(sites))
        for s in sites:
            if s.partition != strategy.partition:
                raise ValueError(f"site '{s.site_id}' uses partition {s.partition} but the "
                                 f"strategy uses {strategy.partition}; they must match")
        self.sites: dict[str, Site] = {s.site_id: s for s in sites}
        self.strategy = strategy
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.on_update = on_update
        self.privacy = privacy  # fedrecon.privacy.UpdatePipeline (duck-typed: no upward import)
        if privacy is not None:
            privacy.check_strategy(strategy)
        self.compression = compression  # fedrecon.efficient.UpdateCompressor (duck-typed)
        if compression is not None:
            compression.check_privacy(privacy)
        self.store = RoundStore(self.run_dir / "sites")
        self.evaluators: dict[str, Evaluator] = dict(evaluators) if evaluators is not None else {
            sid: self._site_evaluator(site) for sid, site in self.sites.items()}
        self.completed_rounds = 0
        self._rng = np.random.default_rng(seed)
        self._started = False
        self._interrupted = False  # a round raised: redo it from the checkpoint
        self._metrics_path = self.run_dir / "metrics.jsonl"
        self._ckpt_path = self.run_dir / "checkpoint.pt"
        reference = sites[0].model_factory()
        self._global_names = strategy.partition.names(reference, Scope.GLOBAL)
        own = reference.state_dict()
        self._global_shapes = {k: own[k].shape for k in self._global_names}
        del reference, own

    # -- public -----------------------------------------------------------------------------
    @property
    def n_sampled(self) -> int:
        n = len(self.sites)
        return min(n, max(self.config.min_sites, math.ceil(self.config.fraction * n)))

    def run(self, until_round: int | None = None) -> ServerState:
        """Run until ``until_round`` rounds are complete (default: all ``rounds``); returns
        the server state. May be called again to continue."""
        end = self.config.rounds if until_round is None else int(until_round)
        if not 0 <= end <= self.config.rounds:
            raise ValueError(f"argument 'until_round' must lie in [0, {self.config.rounds}]; "
                             f"got {until_round}")
        if self._started and self.completed_rounds > self.config.rounds:
            raise ValueError(f"argument 'rounds' ({self.config.rounds}) is below the "
                             f"{self.completed_rounds} rounds this run has completed; a run "
                             f"can only be extended")
        if not self._started:
            self._start_fresh()
        elif self._interrupted:
            # a round that raised (Ctrl-C, a site's error) left the RNGs advanced, the
            # strategy possibly half-updated and uncommitted LOCAL versions on disk: start
            # again from the last checkpoint, exactly as a resume would
            self._restore(_load_checkpoint(self._ckpt_path))
        from tqdm.auto import tqdm

        bar = tqdm(range(self.completed_rounds, end), desc="rounds", disable=not self.progress,
                   initial=self.completed_rounds, total=end, position=0)
        for r in bar:
            try:
                self._run_round(r)
            except BaseException:
                self._interrupted = True
                raise
        bar.close()
        self._write_totals()
        return self.strategy._require_state()

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, sites: Sequence[Site], strategy: Strategy, *,
               rounds: int | None = None, progress: bool = True,
               on_update: Callable[[SiteUpdate], None] | None = None,
               evaluators: Mapping[str, Evaluator] | None = None,
               privacy: Any | None = None, compression: Any | None = None) -> SimulationRunner:
        """Continue the run in ``run_dir`` from its last checkpoint.

        ``sites`` and ``strategy`` are rebuilt by the caller from the run's config; their
        state comes from the checkpoint. ``rounds`` may extend the run. Uncommitted LOCAL
        state versions are deleted and ``metrics.jsonl`` is cut to the committed records.
        Other sites (or their order), another strategy, other site seeds or GLOBAL tensors of
        another model/partition are a :class:`ValueError` naming what differs; a damaged
        checkpoint or a ``metrics.jsonl`` shorter than committed an :class:`OSError` naming
        the file. Nothing is changed on disk before these checks pass.
        """
        run_dir = Path(run_dir)
        path = run_dir / "checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        ckpt = _load_checkpoint(path)
        ids = [s.site_id for s in sites]
        if ids != ckpt["site_ids"]:
            run_ids = list(ckpt["site_ids"])
            missing = [s for s in run_ids if s not in ids]
            extra = [s for s in ids if s not in run_ids]
            why = (f"missing {missing}, not in the run {extra}" if missing or extra else
                   "the same sites in another order (the order fixes the sampling)")
            raise ValueError(f"{path}: the run has sites {run_ids}; got {ids}: {why}")
        if strategy.name != ckpt["strategy_name"]:
            raise ValueError(f"{path}: the run used strategy '{ckpt['strategy_name']}'; got "
                             f"'{strategy.name}'")
        seeds = ckpt.get("site_seeds") or {}
        differ = {s.site_id: (seeds[s.site_id], getattr(s, "seed", None)) for s in sites
                  if s.site_id in seeds and seeds[s.site_id] != getattr(s, "seed", None)}
        if differ:
            raise ValueError(f"{path}: the sites' seed differs from the run's (site: (run, "
                             f"got)): {differ}")
        config = RunnerConfig(**ckpt["config"])
        if rounds is not None:
            config = dataclasses.replace(config, rounds=rounds)
        kw = dataclasses.asdict(config)
        runner = cls(sites, strategy, run_dir=run_dir, progress=progress, on_update=on_update,
                     evaluators=evaluators, privacy=privacy, compression=compression, **kw)
        runner._check_global_state(path, ckpt["strategy"].get("global_state"))
        runner._restore(ckpt)
        if config != RunnerConfig(**ckpt["config"]):  # extended: config.json says so now
            runner._write_config()
        return runner

    # -- setup ------------------------------------------------------------------------------
    def _site_evaluator(self, site: Site) -> Evaluator:
        return lambda state, split: site.evaluate(state.for_site(site.site_id), split=split)

    def _install_store(self, import_existing: bool) -> None:
        for sid, site in self.sites.items():
            old = site.store
            if old is self.store:
                continue
            if import_existing and not isinstance(old, RoundStore):
                existing = old.get(sid)
                if existing is not None:
                    self.store.put_initial(sid, existing)
            site.store = self.store

    def _check_global_state(self, path: Path, state: Any) -> None:
        """The checkpoint's GLOBAL tensors must be this model's under this partition."""
        if not isinstance(state, Mapping):
            raise OSError(f"{path}: damaged checkpoint, the strategy state has no global_state")
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        ours = {k: tuple(v) for k, v in self._global_shapes.items()}
        if theirs != ours:
            only_run = sorted(set(theirs) - set(ours))[:5]
            only_now = sorted(set(ours) - set(theirs))[:5]
            shapes = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])[:5]
            raise ValueError(f"{path}: the run's GLOBAL tensors do not match this model and "
                             f"partition (only in the run: {only_run}; only here: {only_now}; "
                             f"other shape: {shapes})")

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a write that a kill interrupted (the rename never happened)."""
        for pattern in (".checkpoint.pt.*.tmp", ".config.json.tmp", ".communication.json.tmp",
                        "communication.json.tmp"):
            for p in self.run_dir.glob(pattern):
                p.unlink(missing_ok=True)

    def _start_fresh(self) -> None:
        if self._ckpt_path.exists():
            raise FileExistsError(f"{self._ckpt_path} exists: resume the run with "
                                  f"SimulationRunner.resume(...) or use another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        # no checkpoint: every LOCAL version here (even version 0) is a leftover of another
        # run, which the sites must not start from
        self.store.rollback(-1)
        self._install_store(import_existing=True)
        if self.strategy.state is None:
            seed_everything(self.config.seed)
            init = next(iter(self.sites.values())).initial_global_state()
            protocols = {sid: s.protocol for sid, s in self.sites.items() if s.protocol is not None}
            self.strategy.initialize(init, list(self.sites), protocols)
        with open(self._metrics_path, "w", encoding="utf-8"):
            pass
        self._write_config()
        self._started = True
        self._commit(0)

    def _write_config(self) -> None:
        atomic_write_text(self.run_dir / "config.json", json.dumps(
            {**dataclasses.asdict(self.config), "strategy": self.strategy.name,
             "sites": list(self.sites)}, indent=2) + "\n")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        committed = int(ckpt["metrics_bytes"])
        size = self._metrics_path.stat().st_size if self._metrics_path.is_file() else None
        if size is None or size < committed:
            # truncate() would pad the file with NUL bytes: records are lost, say so
            raise OSError(f"{self._metrics_path}: {'missing' if size is None else f'{size} bytes'}"
                          f" but the checkpoint committed {committed} bytes of records; "
                          f"restore the file or start the run again")
        self._remove_stale_temp_files()
        self.strategy.load_state_dict(ckpt["strategy"])
        self.completed_rounds = int(ckpt["completed_rounds"])
        if self.privacy is not None and ckpt.get("privacy") is not None:
            self.privacy.load_state_dict(ckpt["privacy"])
        self._rng.bit_generator.state = ckpt["runner_rng"]
        restore_rng(ckpt["rng"])
        for sid, states in ckpt["loader_rng"].items():
            if sid in self.sites:
                for gen, state in zip(loader_generators(self.sites[sid].train_loader), states):
                    gen.set_state(state)
        removed = self.store.rollback(self.completed_rounds)
        # reads see the committed LOCAL state (an evaluation right after resume included)
        self.store.set_round(self.completed_rounds - 1)
        self._install_store(import_existing=False)
        with open(self._metrics_path, "r+b") as f:
            f.truncate(committed)
            f.flush()
            os.fsync(f.fileno())
        self._started = True
        self._interrupted = False
        log.info("resumed %s after round %d (%d uncommitted local-state files dropped)",
                 self.run_dir, self.completed_rounds - 1, removed)

    # -- one round --------------------------------------------------------------------------
    def _sample(self, round: int) -> tuple[list[str], list[str]]:
        ids = list(self.sites)
        for attempt in range(self.config.retries + 1):
            picked = np.sort(self._rng.choice(len(ids), size=self.n_sampled, replace=False))
            sampled = [ids[i] for i in picked]
            drops = self._rng.random(len(sampled)) < self.config.drop_prob
            dropped = [s for s, d in zip(sampled, drops) if d]
            if len(sampled) - len(dropped) >= self.config.min_sites:
                return sampled, dropped
            log.warning("round %d try %d: %d of %d sampled sites answered (< min_sites=%d)",
                        round, attempt, len(sampled) - len(dropped), len(sampled),
                        self.config.min_sites)
        raise RoundFailed(
            f"round {round}: fewer than min_sites={self.config.min_sites} of the "
            f"{len(sampled)} sampled sites answered in {self.config.retries + 1} tries "
            f"(drop_prob={self.config.drop_prob}); the checkpoint of round {round - 1} in "
            f"{self.run_dir} is intact. Raise 'retries' or lower 'drop_prob'/'min_sites'.")

    def _run_round(self, r: int) -> None:
        from tqdm.auto import tqdm

        t_round = time.perf_counter()
        self.store.set_round(r)
        sampled, dropped = self._sample(r)
        answering = [s for s in sampled if s not in set(dropped)]
        instructions = self.strategy.configure(r, sampled)
        rows: dict[str, dict[str, Any]] = {}
        for sid in list(self.sites) + [e for e in self.evaluators if e not in self.sites]:
            received = state_nbytes(instructions[sid].global_state) if sid in instructions else 0
            if self.compression is not None and sid in instructions:
                received = self.compression.downlink_nbytes(instructions[sid])
            rows[sid] = {k: None for k in RECORD_FIELDS} | {
                "round": r, "site": sid, "strategy": self.strategy.name,
                "sampled": sid in instructions, "participated": False,
                "dropped": sid in dropped, "bytes_sent": 0, "bytes_received": received}
        updates: list[SiteUpdate] = []
        for sid in tqdm(answering, desc=f"round {r} fit", leave=False, disable=not self.progress,
                        position=1):
            t0 = time.perf_counter()
            update = self.sites[sid].fit(instructions[sid])
            fit_s = time.perf_counter() - t0
            if self.privacy is not None:  # --- privacy hook: site-side clip/noise ---
                update = self.privacy.at_site(r, update, instructions[sid].global_state,
                                              n_sampled=len(sampled))
            nbytes = update.nbytes
            if self.compression is not None:  # --- compression hook: encode, wire, decode ---
                update, nbytes = self.compression.transmit(
                    r, update, instructions[sid].global_state, self.sites[sid].store)
            if self.on_update is not None and not (self.privacy and self.privacy.masks_updates):
                self.on_update(update)
            if update.site_id != sid or update.round != r:
                raise ValueError(f"round {r}: site '{sid}' answered with an update for site "
                                 f"'{update.site_id}', round {update.round}")
            if self.privacy is None:
                check_update(update, self._global_names, self._global_shapes)
            updates.append(update)
            rows[sid].update(participated=True, num_examples=update.num_examples,
                             loss=update.metrics.get("loss"), bytes_sent=nbytes,
                             fit_seconds=fit_s)
        if self.privacy is None:
            state = self.strategy.aggregate(r, updates, missing=dropped)
        else:  # --- privacy hook: validation, secure sum, DP noise and accounting ---
            result = self.privacy.aggregate(r, self.strategy, updates, missing=dropped,
                                            names=self._global_names, shapes=self._global_shapes)
            state = result.state
            for sid, reason in result.rejected.items():
                rows[sid].update(participated=False, rejected=reason)
            for sid, nbytes in result.bytes_sent.items():
                if self.compression is None:  # compressed: the message size stands
                    rows[sid]["bytes_sent"] = nbytes
            for row in rows.values():
                row["epsilon"] = result.epsilon
        del updates, instructions
        if (r + 1) % self.config.eval_every == 0 or r + 1 == self.config.rounds:
            split = self.config.eval_split
            for sid, evaluate in tqdm(self.evaluators.items(), desc=f"round {r} eval",
                                      leave=False, disable=not self.progress, position=1):
                seed_everything(site_seed(self.config.seed, f"eval/{sid}", r))
                t0 = time.perf_counter()
                m = evaluate(state, split)
                rows[sid].update(psnr=float(m["psnr"]), ssim=float(m["ssim"]),
                                 nmse=float(m["nmse"]), eval_split=split,
                                 eval_seconds=time.perf_counter() - t0)
        self._write_records(rows.values())
        self._commit(r + 1)
        self._log_round(r, rows, len(sampled), len(dropped), time.perf_counter() - t_round)

    def _write_totals(self) -> None:
        """``communication.json``: bytes sent/received per site and in all, over the
        committed rounds (the per-run total of the ``metrics.jsonl`` byte fields)."""
        per_site: dict[str, dict[str, int]] = {}
        for rec in read_metrics(self.run_dir):
            site = per_site.setdefault(rec["site"], {"bytes_sent": 0, "bytes_received": 0})
            site["bytes_sent"] += int(rec["bytes_sent"] or 0)
            site["bytes_received"] += int(rec["bytes_received"] or 0)
        totals = {"rounds": self.completed_rounds,
                  "bytes_sent": sum(v["bytes_sent"] for v in per_site.values()),
                  "bytes_received": sum(v["bytes_received"] for v in per_site.values()),
                  "per_site": per_site}
        atomic_write_text(self.run_dir / "communication.json", json.dumps(totals, indent=2) + "\n")

    def _write_records(self, rows: Any) -> None:
        append_records(self._metrics_path, rows)

    def _commit(self, completed: int) -> None:
        """Atomically write the checkpoint of ``completed`` rounds; then drop old versions."""
        loader_rng = {sid: [g.get_state() for g in loader_generators(s.train_loader)]
                      for sid, s in self.sites.items()}
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "completed_rounds": completed,
            "strategy_name": self.strategy.name,
            "strategy": self.strategy.state_dict(),
            "site_ids": list(self.sites),
            "site_seeds": {sid: getattr(s, "seed", None) for sid, s in self.sites.items()},
            "config": dataclasses.asdict(self.config),
            "runner_rng": self._rng.bit_generator.state,
            "rng": capture_rng(),
            "loader_rng": {k: v for k, v in loader_rng.items() if v},
            "metrics_bytes": self._metrics_path.stat().st_size,
        }
        if self.privacy is not None:
            ckpt["privacy"] = self.privacy.state_dict()
        atomic_torch_save(ckpt, self._ckpt_path)
        self.completed_rounds = completed
        self.store.prune(completed)

    def _log_round(self, r: int, rows: Mapping[str, dict[str, Any]], n_sampled: int,
                   n_dropped: int, seconds: float) -> None:
        def mean(key: str) -> float:
            vals = [row[key] for row in rows.values() if row[key] is not None]
            return float(np.mean(vals)) if vals else float("nan")

        up = sum(row["bytes_sent"] for row in rows.values())
        down = sum(row["bytes_received"] for row in rows.values())
        log.info("round %d/%d: %d/%d sites answered (%d dropped) | loss %.4g | psnr %.2f dB "
                 "ssim %.4f | %.2f MB up %.2f MB down | %.1f s", r + 1, self.config.rounds,
                 n_sampled - n_dropped, n_sampled, n_dropped, mean("loss"), mean("psnr"),
                 mean("ssim"), up / 1e6, down / 1e6, seconds)
