"""A site's mixture of a personal expert and the shared (global) expert.

``MixtureOfExperts(personal, shared, alpha)(y, op) = alpha * personal(y, op) + (1 - alpha) *
shared(y, op)``, with one scalar gate ``alpha`` per site chosen on the site's own held-out
data by :func:`fit_mixture_weight`. The gate never leaves the site (it is computed at the
site, from its data, whenever the site builds its evaluation model).

Zec, Mogren, Ryan, Hebert, Mogren, "Federated learning using a mixture of experts",
arXiv:2010.02056 (2020); Peterson, Kanani, Marathe, "Private Federated Learning with Domain
Adaptation", NeurIPS 2019 FL workshop (a private expert and the general model, gated per
user). Both learn the gate by gradient on the client's training data; here it is one scalar
picked on the validation split, because a personal expert always looks better on the data
it was trained on (it would take the whole weight there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from fedrecon.metrics import psnr
from fedrecon.train.batching import OpFactory, prepare_batch, to_target_space

__all__ = ["MixtureOfExperts", "fit_mixture_weight"]

#: gate values tried by :func:`fit_mixture_weight` (0: the shared expert alone, 1: personal)
GRID: tuple[float, ...] = tuple(i / 20 for i in range(21))


class MixtureOfExperts(nn.Module):
    """``alpha * personal + (1 - alpha) * shared`` on the networks' outputs (complex images
    for MRI, so the magnitude is taken after mixing, as for any reconstruction)."""

    def __init__(self, personal: nn.Module, shared: nn.Module, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"argument 'alpha' must be in [0, 1]; got {alpha}")
        self.personal = personal
        self.shared = shared
        self.alpha = float(alpha)

    def forward(self, y: Tensor, op: nn.Module, protocol: Tensor | None = None) -> Tensor:
        if self.alpha == 1.0:
            return self.personal(y, op, protocol=protocol)
        if self.alpha == 0.0:
            return self.shared(y, op, protocol=protocol)
        a = self.personal(y, op, protocol=protocol)
        return torch.lerp(self.shared(y, op, protocol=protocol), a, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.2f}"


@torch.no_grad()
def fit_mixture_weight(personal: nn.Module, shared: nn.Module, loader: Iterable, *,
                       op_factory: OpFactory | None = None,
                       device: torch.device | str = "cpu",
                       grid: Sequence[float] = GRID) -> tuple[float, dict[float, float]]:
    """The gate in ``grid`` with the best mean PSNR over the slices of ``loader``.

    Returns ``(alpha, {alpha: mean PSNR})``. Both experts run once per batch; every gate is
    scored on their outputs. Ties go to the larger gate (the personal expert).
    """
    if not grid or any(not 0.0 <= g <= 1.0 for g in grid):
        raise ValueError(f"argument 'grid' must be non-empty values in [0, 1]; got {list(grid)}")
    dev = torch.device(device)
    personal.eval()
    shared.eval()
    sums = dict.fromkeys(grid, 0.0)
    n = 0
    for batch in loader:
        prep = prepare_batch(batch, dev, op_factory)
        if prep.target is None:
            raise ValueError("fit_mixture_weight: the loader's batches need targets")
        a = personal(prep.y, prep.op, protocol=prep.protocol)
        b = shared(prep.y, prep.op, protocol=prep.protocol)
        tgt = prep.target.float()
        for g in grid:
            out = to_target_space(torch.lerp(b, a, g), prep).float()
            sums[g] += float(psnr(out, tgt, prep.max_value).sum())
        n += tgt.shape[0]
    if n == 0:
        raise ValueError("fit_mixture_weight: argument 'loader' yielded no batches")
    scores = {g: s / n for g, s in sums.items()}
    best = max(sorted(grid, reverse=True), key=lambda g: scores[g])
    return best, scores
