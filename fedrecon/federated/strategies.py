"""The strategy registry and the strategies that differ from FedAvg only in their
partition or their :class:`TrainingPlan`: partial sharing, FedProx, FedBN, Ditto, FedRep.

Server optimizers live in :mod:`.strategies_adaptive`; server-side personalization in
:mod:`.strategies_personalized` and :mod:`.strategies_hypernetwork`.

Sites must be built with the strategy's ``partition`` (``strategy.partition``): it is what
decides which tensors a site sends.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Iterable
from typing import Any

from fedrecon.models import Partition, Role

from .messages import TrainingPlan
from .strategies_adaptive import FedAdam, FedYogi
from .strategies_hypernetwork import Hypernetwork
from .strategies_personalized import LocalOnly, SimilarityWeighted, check_number
from .strategies_robust import CoordinateMedian, MultiKrum, TrimmedMean  # robust (privacy work)
from .strategy import FedAvg, Strategy

__all__ = [
    "STRATEGIES",
    "Ditto",
    "FedBN",
    "FedProx",
    "FedRep",
    "Mixture",
    "PartialSharing",
    "make_strategy",
    "strategy_kwargs",
]


class PartialSharing(FedAvg):
    """FedAvg over the GLOBAL part of a configurable partition; the rest stays at the site.

    The default partition is fedrecon's basic split (DC, conditioning, estimators local; the
    prior shared). Other splits: ``Partition.from_names(["dc", "adapter"])`` keeps the
    adapters/heads local too (FedPer: Arivazhagan et al., "Federated Learning with
    Personalization Layers", 2019); LG-FedAvg (Liang et al., "Think Locally, Act Globally:
    Federated Learning with Local and Global Representations", 2020) keeps the
    representation-side roles local instead.
    """

    name = "partial"


class FedProx(FedAvg):
    """FedAvg aggregation; each site adds ``mu/2 ||w - w_round_start||^2`` on the GLOBAL
    parameters to its loss.

    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020.
    """

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, **base: Any) -> None:
        super().__init__(**base)
        if mu < 0:
            raise ValueError(f"argument 'mu' must be >= 0; got {mu}")
        self.mu = mu

    def plan(self, round: int, site_id: str) -> TrainingPlan:
        return dataclasses.replace(super().plan(round, site_id), prox_mu=self.mu)


class FedBN(FedAvg):
    """FedAvg with the normalization layers (affine parameters and running statistics)
    kept at each site.

    Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via Local
    Batch Normalization", ICLR 2021. ``Role.NORM`` is added to whatever ``partition`` is
    given. Note: ``InstanceNorm2d`` without affine parameters (the U-Net default) has no
    tensors, so FedBN equals FedAvg there; use ``norm="batch"`` or ``"group"``.
    """

    name = "fedbn"

    def __init__(self, *, partition: Partition | None = None, **base: Any) -> None:
        super().__init__(partition=(partition or Partition.default()).with_local(Role.NORM), **base)


class Ditto(FedAvg):
    """FedAvg for the global model; each site also trains a personal model (kept LOCAL)
    pulled towards the received global model by ``personal_lambda/2 ||v - w||^2`` and
    evaluates with it (:meth:`Site.evaluate`).

    Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021.
    """

    name = "ditto"

    def __init__(self, *, personal_lambda: float = 0.1, **base: Any) -> None:
        super().__init__(**base)
        check_number("personal_lambda", personal_lambda, low=0)
        self.personal_lambda = personal_lambda

    def plan(self, round: int, site_id: str) -> TrainingPlan:
        return dataclasses.replace(super().plan(round, site_id),
                                   personal_lambda=self.personal_lambda)


class Mixture(Ditto):
    """Ditto's training (a FedAvg global model and a personal model per site, pulled to the
    global one by ``personal_lambda``) with a mixture-of-experts reconstruction: each site
    reconstructs with ``alpha * personal(y) + (1 - alpha) * global(y)``, one gate ``alpha``
    per site fitted on the site's own validation split (:mod:`fedrecon.federated.mixture`).
    A site the others cannot help keeps its personal expert (``alpha = 1``); a site the
    consensus serves better leans on it. With the default ``personal_lambda = 0`` the
    personal expert is exactly the model the site would train alone (same seeds, same
    batches), as in the papers' private experts. The gate is refitted whenever the site
    builds its evaluation model, so a mixture's *validation* metrics (``metrics.jsonl``) are
    in-sample for that one number; compare methods on the test split.

    Zec, Mogren, Ryan, Hebert, Mogren, "Federated learning using a mixture of experts",
    arXiv:2010.02056 (2020); Peterson, Kanani, Marathe, "Private Federated Learning with
    Domain Adaptation", NeurIPS 2019 FL workshop.
    """

    name = "mixture"

    def __init__(self, *, personal_lambda: float = 0.0, **base: Any) -> None:
        super().__init__(personal_lambda=personal_lambda, **base)

    def plan(self, round: int, site_id: str) -> TrainingPlan:
        return dataclasses.replace(super().plan(round, site_id), mixture=True)


class FedRep(FedAvg):
    """Each round a site first trains its LOCAL parts (the "head": DC layers, conditioning,
    and whatever else the partition keeps local) with the shared part frozen, for
    ``local_first_steps``; then ``local_steps`` on the shared part with the LOCAL parts
    frozen; the shared part is FedAvg'd.

    Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
    Personalized Federated Learning", ICML 2021.
    """

    name = "fedrep"

    def __init__(self, *, local_first_steps: int = 10, **base: Any) -> None:
        super().__init__(**base)
        check_number("local_first_steps", local_first_steps, low=0, integer=True)
        self.local_first_steps = local_first_steps

    def plan(self, round: int, site_id: str) -> TrainingPlan:
        return dataclasses.replace(super().plan(round, site_id),
                                   local_first_steps=self.local_first_steps, train_local=False)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, PartialSharing, FedProx, FedBN, FedAdam, FedYogi, Ditto, Mixture, FedRep,
                Hypernetwork, SimilarityWeighted, LocalOnly,
                CoordinateMedian, TrimmedMean, MultiKrum)  # robust: strategies_robust.py
}


def strategy_kwargs(cls: type[Strategy]) -> list[str]:
    """Keyword arguments ``cls`` accepts (its own and those it forwards to its bases)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" \
                    and p.name not in names:
                names.append(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _unknown(kind: str, key: str, valid: Iterable[str]) -> ValueError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ValueError(f"unknown {kind} '{key}'{hint} (valid: {', '.join(valid)})")


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy by name.

    ``local_roles`` (role names, e.g. ``["dc", "adapter"]``) is accepted as a config-friendly
    spelling of ``partition=Partition.from_names(local_roles)``. Unknown names and keyword
    arguments are errors that name the key and suggest the closest valid one.
    """
    if name not in STRATEGIES:
        raise _unknown("strategy", name, STRATEGIES)
    cls = STRATEGIES[name]
    if "local_roles" in kwargs:
        if "partition" in kwargs:
            raise ValueError(f"strategy '{name}': give 'partition' or 'local_roles', not both")
        kwargs["partition"] = Partition.from_names(kwargs.pop("local_roles"))
    valid = strategy_kwargs(cls)
    for key in kwargs:
        if key not in valid:
            raise _unknown(f"argument for strategy '{name}':", key, valid + ["local_roles"])
    return cls(**kwargs)
