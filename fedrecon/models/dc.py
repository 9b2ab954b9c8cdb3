"""Data-consistency (DC) layers. They use the site's operator and never leave the site.

A DC layer maps the prior's output ``z`` back towards the measurements ``y`` of ``op``:

- :class:`GradientDC` (VarNet / LEARN): ``x = z - eta_k A^H (A z - y)``.
- :class:`ProximalDC` (MoDL): ``x = argmin ||A x - y||^2 + lambda_k ||x - z||^2``, i.e.
  ``(A^H A + lambda_k I) x = A^H y + lambda_k z`` by a fixed number of batched CG steps.

Step sizes and penalties are learned relative to ``||A||^2`` (``op.norm_bound()``), so the
same initial values are sensible for a unit-norm MRI operator and a CT projector whose
norm is in the hundreds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrecon.operators import LinearOperator, conjugate_gradient

from .roles import Role

__all__ = ["GradientDC", "ProximalDC", "DC_LAYERS"]


def _inv_softplus(value: float) -> float:
    """``softplus^{-1}(v) = v + log(1 - exp(-v))`` in double precision: ``log(expm1(v))``
    overflows for ``v`` above ~88 in float32 (an initial step of 100 became ``inf``)."""
    value = float(value)
    return value + math.log(-math.expm1(-value))


class GradientDC(nn.Module):
    """Gradient step on ``0.5 ||A x - y||^2`` with a learned step per iteration.

    ``eta_k = softplus(raw_k) / ||A||^2``; ``init_step = 1`` is the classical ``1/L`` step.
    """

    role = Role.DC

    def __init__(self, n_iter: int, init_step: float = 1.0) -> None:
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"argument 'n_iter' must be >= 1; got {n_iter}")
        if not init_step > 0:
            raise ValueError(f"argument 'init_step' must be > 0; got {init_step}")
        self.n_iter = n_iter
        self.raw_step = nn.Parameter(torch.full((n_iter,), _inv_softplus(init_step)))

    def step(self, k: int) -> Tensor:
        return F.softplus(self.raw_step[k])

    def forward(self, z: Tensor, y: Tensor, op: LinearOperator, k: int) -> Tensor:
        eta = self.step(k) / op.norm_bound() ** 2
        return z - eta.to(z.real.dtype) * op.A_adjoint(op.A(z) - y)


class ProximalDC(nn.Module):
    """MoDL's DC: ``(A^H A + lambda_k I) x = A^H y + lambda_k z`` by ``cg_iters`` CG steps.

    ``lambda_k = softplus(raw_k) * ||A||^2`` (learned per iteration, differentiable through CG).
    """

    role = Role.DC

    def __init__(self, n_iter: int, init_lambda: float = 0.05, cg_iters: int = 8) -> None:
        super().__init__()
        if n_iter < 1 or cg_iters < 1:
            raise ValueError(f"arguments 'n_iter' and 'cg_iters' must be >= 1; got {n_iter}, {cg_iters}")
        if not init_lambda > 0:
            raise ValueError(f"argument 'init_lambda' must be > 0; got {init_lambda}")
        self.n_iter = n_iter
        self.raw_lambda = nn.Parameter(torch.full((n_iter,), _inv_softplus(init_lambda)))
        self.cg_iters = cg_iters

    def penalty(self, k: int) -> Tensor:
        return F.softplus(self.raw_lambda[k])

    def forward(self, z: Tensor, y: Tensor, op: LinearOperator, k: int) -> Tensor:
        lam = (self.penalty(k) * op.norm_bound() ** 2).to(z.real.dtype)
        rhs = op.A_adjoint(y) + lam * z
        return conjugate_gradient(op.A_normal, rhs, x0=z, n_iter=self.cg_iters, damping=lam,
                                  n_domain_dims=len(op.domain_shape))


DC_LAYERS: dict[str, type[nn.Module]] = {"gradient": GradientDC, "proximal": ProximalDC}
