"""One registry of small operator factories.

Each operator module registers a factory under a stable name. Factories take keyword
arguments with small defaults (so ``make_operator(name)`` builds a test-sized instance),
plus ``device`` and ``dtype`` (the real dtype; complex operators use its complex twin).
The contract suite in ``tests/operators/test_contract.py`` runs over every entry, so an
operator cannot be added without being checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import LinearOperator

OperatorFactory = Callable[..., LinearOperator]
OPERATOR_REGISTRY: dict[str, OperatorFactory] = {}


def register_operator(name: str) -> Callable[[OperatorFactory], OperatorFactory]:
    """Decorator: register ``factory`` under ``name`` (names are unique)."""

    def deco(factory: OperatorFactory) -> OperatorFactory:
        if name in OPERATOR_REGISTRY:
            raise ValueError(f"operator '{name}' is already registered")
        OPERATOR_REGISTRY[name] = factory
        return factory

    return deco


def make_operator(name: str, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, **params: Any) -> LinearOperator:
    """Build the registered operator ``name`` on ``device`` with real dtype ``dtype``."""
    try:
        factory = OPERATOR_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(OPERATOR_REGISTRY))
        raise ValueError(f"unknown operator '{name}'; registered: {known}") from None
    return factory(device=torch.device(device), dtype=dtype, **params)
