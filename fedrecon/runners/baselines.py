"""The two reference points of every federated experiment, run by the same runner.

- **local**: each site trains alone (:class:`~fedrecon.federated.LocalOnly`, a strategy
  that keeps every site's GLOBAL tensors as that site's personalized state and never mixes
  them). The sites still hand their tensors to the in-process server, which only files them
  away; the records' ``bytes_sent``/``bytes_received`` are therefore nominal for this
  baseline (a real local run would send nothing).
- **centralized**: one model trained on all sites' training data pooled
  (:func:`centralized_runner`). Batches come from one site at a time, round-robin over the
  sites' loaders, because MRI/CT batches of different sites have different shapes and
  operators. Every round runs ``local_steps * n_sites`` steps by default, the total of a
  federated round with every site sampled, and the model is evaluated on each site's data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from fedrecon.federated import FedAvg, LocalOnly, ServerState, Site
from fedrecon.train import evaluate_model
from fedrecon.train.batching import OpFactory, prepare_batch

from .simulation import Evaluator, SimulationRunner

__all__ = ["POOLED_SITE_ID", "LocalOnly", "RoundRobinLoader", "centralized_runner"]

POOLED_SITE_ID = "pooled"


class RoundRobinLoader:
    """Batches of several loaders in turn (one batch of each, then again), until all are
    exhausted: one pass is one epoch of every loader. Each batch comes from one loader, so
    it keeps its site's shapes and operator. ``last_source`` is the index of the loader the
    latest batch came from."""

    def __init__(self, loaders: Sequence[Iterable]) -> None:
        if not loaders:
            raise ValueError("RoundRobinLoader: argument 'loaders' is empty")
        self.loaders = list(loaders)
        self.last_source = -1

    def __iter__(self) -> Iterator[Any]:
        active = [(i, iter(loader)) for i, loader in enumerate(self.loaders)]
        while active:
            still = []
            for i, it in active:
                try:
                    batch = next(it)
                except StopIteration:
                    continue
                self.last_source = i
                still.append((i, it))
                yield batch
            active = still

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)  # type: ignore[arg-type]


def _dispatching_op_factory(loader: RoundRobinLoader,
                            factories: Sequence[OpFactory | None]) -> OpFactory | None:
    """The op factory of the site whose loader produced the current batch."""
    if all(f is None for f in factories):
        return None

    def factory(batch: Any, device: torch.device) -> Any:
        own = factories[loader.last_source]
        return own(batch, device) if own is not None else prepare_batch(batch, device).op

    return factory


def _split_loader(site: Site, split: str) -> Iterable:
    loader = {"val": site.val_loader, "test": site.test_loader, "train": site.train_loader}.get(split)
    if loader is None:
        raise ValueError(f"site '{site.site_id}' has no '{split}' data")
    return loader


def centralized_runner(sites: Sequence[Site], *, rounds: int, run_dir: str | os.PathLike,
                       local_steps: int, lr: float = 1e-3, steps_per_round: int | None = None,
                       resume: bool = False, **runner_kw: Any) -> SimulationRunner:
    """A :class:`SimulationRunner` that trains one model on the pooled data of ``sites``.

    The pooled "site" (id ``"pooled"``) takes its model factory, partition, device, loss and
    seed from ``sites[0]``; it trains ``steps_per_round`` steps per round (default
    ``local_steps * len(sites)``). Records: one per round for ``"pooled"`` (training) and
    one per site per round (evaluation of the pooled model on the site's ``eval_split``).
    ``runner_kw`` go to the runner (``seed``, ``eval_every``, ``progress``...).
    ``resume=True`` continues the run in ``run_dir`` (:meth:`SimulationRunner.resume`; of
    ``runner_kw`` only ``progress`` and ``on_update`` apply, the rest comes from the checkpoint).
    """
    if not sites:
        raise ValueError("argument 'sites' is empty: the centralized baseline pools the "
                         "training data of at least one site")
    first = sites[0]
    train = RoundRobinLoader([s.train_loader for s in sites])
    pooled = Site(POOLED_SITE_ID, model_factory=first.model_factory, train_loader=train,
                  partition=first.partition, device=first.device,
                  op_factory=_dispatching_op_factory(train, [s.op_factory for s in sites]),
                  loss=first.loss, grad_clip=first.grad_clip, seed=first.seed,
                  num_examples=sum(s.num_examples for s in sites))
    steps = steps_per_round if steps_per_round is not None else local_steps * len(sites)
    strategy = FedAvg(local_steps=steps, lr=lr, partition=first.partition)

    def evaluator(site: Site) -> Evaluator:
        def evaluate(state: ServerState, split: str) -> Mapping[str, float]:
            model = pooled.build_model(state.for_site(POOLED_SITE_ID))
            return evaluate_model(model, _split_loader(site, split), op_factory=site.op_factory,
                                  device=pooled.device)
        return evaluate

    evaluators = {s.site_id: evaluator(s) for s in sites}
    if resume:
        keep = {k: v for k, v in runner_kw.items() if k in ("progress", "on_update")}
        return SimulationRunner.resume(run_dir, [pooled], strategy, rounds=rounds,
                                       evaluators=evaluators, **keep)
    return SimulationRunner([pooled], strategy, rounds=rounds, run_dir=run_dir,
                            evaluators=evaluators, **runner_kw)
