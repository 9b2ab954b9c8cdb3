"""Iterative solvers for linear inverse problems on :class:`LinearOperator` s.

- :func:`conjugate_gradient`: batched CG for ``(N + damping I) x = b`` with ``N`` Hermitian
  positive (semi)definite, differentiable by plain autograd (the data-consistency block of
  MoDL-style networks);
- :func:`cg_sense`: Tikhonov-regularized least squares ``min 0.5||Ax - y||^2 + lam/2 ||x||^2``
  (CG-SENSE when ``A`` is a multi-coil MRI operator);
- :func:`tv_reconstruction`: ``min 0.5||Ax - y||^2 + lam TV(x)`` by PDHG (Chambolle-Pock).

Batch convention: a tensor is ``(*batch, *domain_shape)``; every leading sample is an
independent problem with its own step sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import (
    as_int,
    check_finite_number,
    check_positive,
    check_tensor,
    check_trailing_shape,
    real_dtype_of,
)
from .base import LinearOperator
from .linops import FiniteDifference2D

__all__ = ["cg_sense", "conjugate_gradient", "total_variation", "tv_reconstruction"]


def _sqnorm(a: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``||a||^2`` over ``dims`` (kept), real."""
    a2 = a.real**2 + a.imag**2 if a.is_complex() else a * a
    return a2.sum(dim=dims, keepdim=True)


def _rdot(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Re <a, b>`` over ``dims`` (kept)."""
    if a.is_complex() or b.is_complex():
        return (a.conj() * b).real.sum(dim=dims, keepdim=True)
    return (a * b).sum(dim=dims, keepdim=True)


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, else 0, with finite gradients everywhere.

    Dividing by a placeholder 1 where ``not ok`` keeps the discarded branch finite, so its
    zero gradient is not ``0 * inf = nan``.
    """
    safe = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, num / safe, torch.zeros_like(num))


def _check_iterations(n_iter: int, tol: float, owner: str) -> None:
    try:
        as_int("n_iter", n_iter, minimum=0)
        if check_finite_number("tol", tol) < 0:
            raise ValueError(f"argument 'tol' must be >= 0; got {tol!r}")
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None


def conjugate_gradient(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor | None = None,
    n_iter: int = 10,
    tol: float = 0.0,
    damping: float | Tensor = 0.0,
    n_domain_dims: int | None = None,
) -> Tensor:
    """Solve ``(normal + damping * I) x = rhs`` by conjugate gradients, sample by sample.

    Parameters
    ----------
    normal : callable
        ``x -> N x`` with ``N`` Hermitian positive (semi)definite, e.g. ``op.A_normal``.
    rhs : Tensor
        Shape ``(*batch, *domain)``, real or complex; ``domain`` is the last
        ``n_domain_dims`` dimensions.
    x0 : Tensor, optional
        Initial guess, shape of ``rhs`` (default zeros).
    n_iter : int
        Maximum number of iterations (each applies ``normal`` once).
    tol : float
        Relative residual ``||r|| <= tol * ||rhs||`` at which a sample stops updating; when
        ``tol > 0`` and every sample has converged the loop exits early. Each check reads
        the residual on the host (a device sync); under autograd the graph then covers the
        iterations actually performed. ``tol = 0`` runs exactly ``n_iter`` iterations.
    damping : float or Tensor
        ``lambda >= 0``; a scalar or a tensor broadcastable to ``batch`` (e.g. ``(B,)``), and
        may require grad (a learnable MoDL weight).
    n_domain_dims : int, optional
        Number of trailing dimensions forming one sample's vector (over which inner products
        are reduced). Default ``max(rhs.ndim - 1, 1)``: all dimensions but the first.

    Returns
    -------
    Tensor
        ``x``, shape of ``rhs``. Differentiable w.r.t. ``rhs``, ``x0``, ``damping`` (and any
        parameters inside ``normal``) through the iterations.

    Notes
    -----
    A sample whose residual has reached ``max(tol, eps)`` relative to ``||rhs||`` (or is
    exactly zero) is frozen: its step sizes are set to 0 by a division that is guarded in
    both the forward and backward pass, so converged samples never produce NaN.
    """
    check_tensor("rhs", rhs)
    n = max(rhs.ndim - 1, 1) if n_domain_dims is None else int(n_domain_dims)
    if not 1 <= n <= rhs.ndim:
        raise ValueError(
            f"conjugate_gradient: argument 'n_domain_dims' must be in [1, rhs.ndim={rhs.ndim}]; "
            f"got {n}"
        )
    if x0 is not None:
        check_trailing_shape("x0", x0, tuple(rhs.shape), owner="conjugate_gradient")
    _check_iterations(n_iter, tol, "conjugate_gradient")
    dims = tuple(range(rhs.ndim - n, rhs.ndim))
    if isinstance(damping, Tensor) and damping.ndim > 0:
        damping = damping.reshape(*damping.shape, *([1] * n))
    use_damping = isinstance(damping, Tensor) or damping != 0

    def apply(v: Tensor) -> Tensor:
        out = normal(v)
        return out + damping * v if use_damping else out

    eps = torch.finfo(real_dtype_of(rhs.dtype)).eps
    with torch.no_grad():
        threshold = max(float(tol), eps) ** 2 * _sqnorm(rhs, dims)

    if x0 is None:
        x = torch.zeros_like(rhs)
        r = rhs
    else:
        x = x0
        r = rhs - apply(x0)
    p = r
    rs = _sqnorm(r, dims)
    for _ in range(int(n_iter)):
        # Boolean masks carry no gradient; only the guarded divisions below do.
        active = rs.detach() > threshold
        if tol > 0 and not bool(active.any()):
            break
        ap = apply(p)
        pap = _rdot(p, ap, dims)
        alpha = _safe_div(rs, pap, active & (pap.detach() > 0))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _sqnorm(r, dims)
        beta = _safe_div(rs_new, rs, active)
        p = r + beta * p
        rs = rs_new
    return x


def cg_sense(op: LinearOperator, y: Tensor, lam: float | Tensor = 0.0, n_iter: int = 30,
             x0: Tensor | None = None, tol: float = 0.0) -> Tensor:
    """Regularized least squares ``min_x 0.5||A x - y||^2 + lam/2 ||x||^2`` by CG.

    Solves the normal equations ``(A^H A + lam I) x = A^H y`` (CG-SENSE for a multi-coil
    MRI operator; the objective of ``sigpy.mri.app.SenseRecon`` with ``lamda=lam``).

    Parameters
    ----------
    op : LinearOperator
        ``A``; its ``A_normal`` is used.
    y : Tensor
        Measurements, shape ``(*batch, *op.range_shape)``.
    lam : float or Tensor
        Tikhonov weight, scalar or broadcastable to ``batch``.
    n_iter, x0, tol
        As in :func:`conjugate_gradient`.

    Returns
    -------
    Tensor
        ``x``, shape ``(*batch, *op.domain_shape)``.
    """
    check_trailing_shape("y", y, op.range_shape, owner="cg_sense")
    rhs = op.A_adjoint(y)
    return conjugate_gradient(op.A_normal, rhs, x0=x0, n_iter=n_iter, tol=tol, damping=lam,
                              n_domain_dims=len(op.domain_shape))


def _tv_of_gradient(g: Tensor, isotropic: bool) -> Tensor:
    """Pointwise TV density of ``g = D x`` of shape ``(..., 2, H, W)`` -> ``(..., H, W)``."""
    g2 = g.real**2 + g.imag**2 if g.is_complex() else g * g
    if isotropic:
        return g2.sum(dim=-3).sqrt()
    return g2.sqrt().sum(dim=-3)


def total_variation(x: Tensor, isotropic: bool = False) -> Tensor:
    """Total variation of images ``(..., H, W)`` -> ``(...)``, circular forward differences.

    Anisotropic: ``sum |x - roll_H(x)| + |x - roll_W(x)|`` (modulus for complex images, as
    ``sigpy.mri.app.TotalVariationRecon``); isotropic: ``sum sqrt(|d_H|^2 + |d_W|^2)``.
    """
    grad = FiniteDifference2D(tuple(x.shape[-2:]), complex=x.is_complex()).A(x)
    return _tv_of_gradient(grad, isotropic).sum(dim=(-2, -1))


def _project_dual(v: Tensor, bound: float, isotropic: bool) -> Tensor:
    """Projection onto ``{|v| <= bound}`` pointwise (anisotropic) or per pixel (isotropic)."""
    mag = _tv_of_gradient(v, True).unsqueeze(-3) if isotropic else v.abs()
    return v / torch.clamp(mag / bound, min=1.0)


def tv_reconstruction(
    op: LinearOperator,
    y: Tensor,
    lam: float,
    n_iter: int = 200,
    isotropic: bool = False,
    step: float | None = None,
    x0: Tensor | None = None,
    return_history: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Total-variation reconstruction ``min_x 0.5||A x - y||^2 + lam TV(x)`` by PDHG.

    Chambolle-Pock on ``K = [A; s D]`` with ``D`` = :class:`FiniteDifference2D` on the last two
    domain dimensions and both terms dualized, so any ``LinearOperator`` works (real CT
    images or complex MRI images). ``s = ||A||`` (power iteration, :meth:`LinearOperator.norm`)
    puts the two blocks on one scale; with ``L^2 = 1.01 (||A||^2 + 8 s^2) >= ||K||^2`` the
    steps are ``tau = sigma = 1 / L``, so ``tau sigma ||K||^2 < 1``.

    Parameters
    ----------
    op : LinearOperator
        ``A`` with ``domain_shape`` ending in ``(H, W)``.
    y : Tensor
        Measurements ``(*batch, *op.range_shape)``.
    lam : float
        TV weight ``>= 0``.
    n_iter : int
        PDHG iterations (each applies ``A`` and ``A^H`` once).
    isotropic : bool
        False: ``TV = sum |d_H| + |d_W|`` (sigpy's ``TotalVariationRecon`` objective);
        True: ``sum sqrt(|d_H|^2 + |d_W|^2)``.
    step : float, optional
        Primal step ``tau``; the dual step is ``1 / (tau L^2)``. Default ``tau = 1 / L``.
    x0 : Tensor, optional
        Initial image ``(*batch, *op.domain_shape)`` (default zeros).
    return_history : bool
        Also return the objective after each iteration, shape ``(n_iter, *batch)``.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        The image ``(*batch, *op.domain_shape)`` (and the objective history).

    Notes
    -----
    Plain tensor code: autograd records every iteration if ``y`` requires grad; call it
    under ``torch.no_grad()`` when only the reconstruction is needed.
    """
    check_trailing_shape("y", y, op.range_shape, owner="tv_reconstruction")
    if len(op.domain_shape) < 2:
        raise ValueError(
            "tv_reconstruction: argument 'op' must have a domain_shape ending with (H, W); "
            f"got {op.domain_shape}"
        )
    if not lam >= 0:
        raise ValueError(f"tv_reconstruction: argument 'lam' must be >= 0; got {lam}")
    _check_iterations(n_iter, 0.0, "tv_reconstruction")
    if step is not None:
        check_positive("step", step)
    grad = FiniteDifference2D(op.domain_shape[-2:], complex=op.domain_complex)
    backproj = op.A_adjoint(y)
    x = torch.zeros_like(backproj) if x0 is None else x0
    if x0 is not None:
        check_trailing_shape("x0", x0, tuple(backproj.shape), owner="tv_reconstruction")

    gen = torch.Generator(device=op.device).manual_seed(0)
    norm_a = float(op.norm(n_iter=100, tol=1e-7, generator=gen).max())
    s = norm_a if norm_a > 0 else 1.0
    lipschitz_sq = 1.01 * (norm_a**2 + 8.0 * s**2)  # >= ||K||^2, with a margin for the estimate
    # Balanced steps tau = sigma = 1/L (Chambolle & Pock 2011). sigma = 1, tau = 1/L^2 (sigpy's
    # choice) is invariant to rescaling the problem but crawls on ill-conditioned operators:
    # measured on 45-view parallel CT, 128 px, 300 iterations: 25.6 dB vs 41.9 dB.
    tau = 1.0 / math.sqrt(lipschitz_sq) if step is None else float(step)
    sigma = 1.0 / (tau * lipschitz_sq)
    bound = lam / s  # the dual of (lam/s)||.||_1 on s D x is the ball of radius lam/s

    u = torch.zeros_like(op.A(x))  # dual of the data term
    v = torch.zeros_like(grad.A(x))  # dual of the TV term
    x_bar = x
    history = []
    for _ in range(int(n_iter)):
        # prox of sigma f1*, f1 = 0.5||. - y||^2:  (q - sigma y) / (1 + sigma)
        u = (u + sigma * (op.A(x_bar) - y)) / (1.0 + sigma)
        if lam > 0:  # with lam = 0 the TV dual stays 0
            v = _project_dual(v + (sigma * s) * grad.A(x_bar), bound, isotropic)
        x_new = x - tau * (op.A_adjoint(u) + s * grad.A_adjoint(v))
        x_bar = 2.0 * x_new - x
        x = x_new
        if return_history:
            history.append(_tv_objective(op, x, y, lam, isotropic))
    if return_history:
        return x, torch.stack(history)
    return x


def _tv_objective(op: LinearOperator, x: Tensor, y: Tensor, lam: float,
                  isotropic: bool) -> Tensor:
    """``0.5||A x - y||^2 + lam TV(x)`` per sample, shape ``batch``."""
    res = op.A(x) - y
    rdims = tuple(range(res.ndim - len(op.range_shape), res.ndim))
    res2 = res.real**2 + res.imag**2 if res.is_complex() else res * res
    data = 0.5 * (res2.sum(dim=rdims) if rdims else res2)
    tv = total_variation(x, isotropic)
    extra = tuple(range(tv.ndim - (len(op.domain_shape) - 2), tv.ndim))
    if extra:
        tv = tv.sum(dim=extra)
    return data + lam * tv
