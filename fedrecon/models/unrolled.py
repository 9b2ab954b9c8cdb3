"""``Unrolled``: alternate a learned prior and a site-local data-consistency step.

``forward(y, op, x0=None, protocol=None)`` takes the site's operator at call time, so one
model class serves every site and both modalities::

    x_0 = x0 or FBP(y) (CT) or A^H y (MRI)
    z_k = prior_k(x_k, protocol) * S      # GLOBAL: shared by the federation
                                          # (S: op.domain_support(), e.g. coil-map support)
    x_{k+1} = dc(z_k, y, op, k)           # LOCAL: the site's physics and step sizes
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedrecon.operators import (
    FanBeam2D,
    LinearOperator,
    MultiCoilMRI,
    ParallelBeam2D,
    fbp,
    is_short_scan,
)

__all__ = ["Unrolled", "default_x0"]


def default_x0(op: LinearOperator, y: Tensor) -> Tensor:
    """The classical starting point: FBP for CT projectors (Parker-weighted for a short fan
    scan), the adjoint otherwise."""
    if isinstance(op, (ParallelBeam2D, FanBeam2D)):
        return fbp(op, y, filter="hann", parker=is_short_scan(op))
    return op.A_adjoint(y)


class Unrolled(nn.Module):
    """An unrolled reconstruction network.

    Parameters
    ----------
    dc
        A DC layer (:class:`~fedrecon.models.dc.GradientDC` or ``ProximalDC``) with ``n_iter``
        per-iteration parameters.
    prior
        The learned prior, ``prior(x, cond) -> x`` (e.g. :class:`ImagePrior` around a U-Net).
    n_iter
        Number of unrolled iterations (cascades).
    share_weights
        One prior for all iterations (MoDL) or an independent copy per iteration (VarNet).
    estimator
        Optional coil-sensitivity network (:class:`~fedrecon.models.sensitivity.SensitivityNet`,
        role ``ESTIMATOR``): for a multi-coil MRI operator, its maps replace the operator's.
    checkpointing
        Recompute each iteration in the backward pass instead of storing its activations
        (memory for time; useful at 320x320 with many cascades).
    """

    def __init__(self, dc: nn.Module, prior: nn.Module, n_iter: int, share_weights: bool = True,
                 checkpointing: bool = False, estimator: nn.Module | None = None) -> None:
        super().__init__()
        self.estimator = estimator
        if n_iter < 1:
            raise ValueError(f"argument 'n_iter' must be >= 1; got {n_iter}")
        dc_iters = getattr(dc, "n_iter", None)
        if dc_iters is not None and dc_iters < n_iter:
            raise ValueError(f"argument 'n_iter' ({n_iter}) exceeds the number of iterations "
                             f"the DC layer has parameters for ({dc_iters}); build "
                             f"{type(dc).__name__}(n_iter={n_iter}, ...)")
        self.n_iter = n_iter
        self.share_weights = share_weights
        self.checkpointing = checkpointing
        self.dc = dc
        n_priors = 1 if share_weights else n_iter
        self.priors = nn.ModuleList([prior] + [copy.deepcopy(prior) for _ in range(n_priors - 1)])

    def _iteration(self, k: int, x: Tensor, y: Tensor, op: LinearOperator,
                   protocol: Tensor | None) -> Tensor:
        prior = self.priors[0 if self.share_weights else k]
        z = prior(x, protocol)
        support = op.domain_support()
        if support is not None:  # outside it the data cannot correct the prior
            z = z * support.to(device=z.device, dtype=z.real.dtype)
        return self.dc(z, y, op, k)

    def forward(self, y: Tensor, op: LinearOperator, x0: Tensor | None = None,
                protocol: Tensor | None = None) -> Tensor:
        """Reconstruct ``(B, *op.domain_shape)`` images from measurements ``(B, *op.range_shape)``."""
        if self.estimator is not None and isinstance(op, MultiCoilMRI):
            # learned coil maps from the slice's own ACS lines replace the given ones
            op = MultiCoilMRI(self.estimator(y, op.mask), op.mask)
        x = default_x0(op, y) if x0 is None else x0
        for k in range(self.n_iter):
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._iteration, k, x, y, op, protocol, use_reentrant=False)
            else:
                x = self._iteration(k, x, y, op, protocol)
        return x
