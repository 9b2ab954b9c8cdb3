"""Server-side validation of received updates: reject a bad update, log why, go on.

Checks, in order: the gate of :func:`~fedrecon.federated.check_update` (keys, shapes, kind,
non-finite values), then a norm rule -- an update whose norm (of its change of the GLOBAL
tensors) lies more than ``mad_threshold`` robust standard deviations above the median of
the round's norms is rejected. The robust standard deviation is ``1.4826 * MAD`` (the
median absolute deviation, scaled to the normal's sigma). Only the high side is rejected:
an unusually small update cannot dominate an average, and a site that barely trained is
not an attack. With fewer than ``min_updates`` updates the norm rule is skipped (a median of
two is not a reference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from fedrecon.federated import SiteUpdate, StateDict, check_update

from .dp import update_norm

__all__ = ["ValidationConfig", "validate_updates", "update_delta"]


@dataclass(frozen=True)
class ValidationConfig:
    norm_rule: bool = True
    mad_threshold: float = 5.0
    min_updates: int = 3

    def __post_init__(self) -> None:
        if not self.mad_threshold > 0:
            raise ValueError(f"ValidationConfig: 'mad_threshold' must be > 0; got {self.mad_threshold}")
        if self.min_updates < 3:
            raise ValueError(f"ValidationConfig: 'min_updates' must be >= 3; got {self.min_updates}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "[privacy.validation]") -> ValidationConfig:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (valid: {', '.join(valid)})")
        return cls(**data)


def update_delta(update: SiteUpdate, start: Mapping[str, torch.Tensor]) -> StateDict:
    """The update as a change of the GLOBAL tensors (``weights - start`` or the delta)."""
    if update.kind == "delta":
        return dict(update.tensors)
    return {k: v - start[k].to(v.dtype) for k, v in update.tensors.items()}


def validate_updates(updates: Sequence[SiteUpdate], names: Sequence[str],
                     shapes: Mapping[str, torch.Size], start_for: Callable[[str], StateDict],
                     config: ValidationConfig) -> tuple[list[SiteUpdate], dict[str, str]]:
    """``(accepted, {site id: reason})``; ``start_for(site)`` is what the site received."""
    accepted: list[SiteUpdate] = []
    rejected: dict[str, str] = {}
    for u in updates:
        try:
            check_update(u, names, shapes)
        except ValueError as err:  # PartitionViolation is a ValueError too
            rejected[u.site_id] = f"invalid: {err}"
            continue
        accepted.append(u)
    if config.norm_rule and len(accepted) >= config.min_updates:
        norms = np.array([update_norm(update_delta(u, start_for(u.site_id))) for u in accepted])
        med = float(np.median(norms))
        sigma = 1.4826 * float(np.median(np.abs(norms - med)))
        sigma = max(sigma, 1e-6 * med, 1e-12)
        keep = []
        for u, n in zip(accepted, norms):
            z = (n - med) / sigma
            if z > config.mad_threshold:
                rejected[u.site_id] = (f"norm {n:.4g} is {z:.1f} robust sigmas above the round's "
                                       f"median {med:.4g} (limit {config.mad_threshold})")
            else:
                keep.append(u)
        accepted = keep
    return accepted, rejected
