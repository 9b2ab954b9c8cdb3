"""The ``LinearOperator`` contract and its algebra (adjoint, composition, scaling, sums).

Every physics operator of fedrecon is an ``nn.Module`` whose per-sample parameters (masks,
coil maps, angles) are buffers, so ``.to(device)`` and ``state_dict`` carry them. Inputs have
any number of leading batch dimensions followed by ``domain_shape``; outputs end with
``range_shape``. Complex data is native ``torch.complex64/128``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._checks import complex_dtype_of, real_dtype_of


class LinearOperator(nn.Module):
    """A linear map ``A: X -> Y`` on batched tensors.

    Subclasses set ``domain_shape``, ``range_shape`` (trailing, non-batch shapes),
    ``domain_complex``/``range_complex`` and implement :meth:`A` and :meth:`A_adjoint`;
    they override :meth:`A_normal` where ``A^H A`` has a cheaper form.
    ``batch_shape`` is the shape of the per-sample parameters (``()`` when the operator is
    the same for every sample); inputs broadcast against it.
    """

    domain_shape: tuple[int, ...] = ()
    range_shape: tuple[int, ...] = ()
    domain_complex: bool = False
    range_complex: bool = False

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return ()

    # -- the contract -------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def A_normal(self, x: Tensor) -> Tensor:
        """``A^H A x``; subclasses override where a cheaper form exists."""
        return self.A_adjoint(self.A(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    # -- algebra --------------------------------------------------------------------------
    @property
    def H(self) -> LinearOperator:
        """The adjoint as an operator (``op.H.H`` is ``op``)."""
        return AdjointOperator(self)

    def __matmul__(self, other: object) -> LinearOperator | Tensor:
        if isinstance(other, LinearOperator):
            return ComposedOperator(self, other)
        if isinstance(other, Tensor):
            return self.A(other)
        return NotImplemented

    def __mul__(self, scalar: object) -> LinearOperator:
        if isinstance(scalar, numbers.Number) or (isinstance(scalar, Tensor) and scalar.ndim == 0):
            return ScaledOperator(self, scalar)  # type: ignore[arg-type]
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, scalar: object) -> LinearOperator:
        if isinstance(scalar, numbers.Number):
            return ScaledOperator(self, 1.0 / scalar)  # type: ignore[operator]
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __add__(self, other: object) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator(self, other)
        return NotImplemented

    def __sub__(self, other: object) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator(self, ScaledOperator(other, -1.0))
        return NotImplemented

    # -- helpers --------------------------------------------------------------------------
    def _reference_tensor(self) -> Tensor | None:
        for t in self.buffers():
            if t.is_floating_point() or t.is_complex():
                return t
        for t in self.parameters():
            return t
        return None

    @property
    def device(self) -> torch.device:
        ref = self._reference_tensor()
        return ref.device if ref is not None else torch.device("cpu")

    @property
    def real_dtype(self) -> torch.dtype:
        ref = self._reference_tensor()
        return real_dtype_of(ref.dtype) if ref is not None else torch.get_default_dtype()

    def domain_dtype(self, real_dtype: torch.dtype | None = None) -> torch.dtype:
        rd = real_dtype or self.real_dtype
        return complex_dtype_of(rd) if self.domain_complex else rd

    def range_dtype(self, real_dtype: torch.dtype | None = None) -> torch.dtype:
        rd = real_dtype or self.real_dtype
        return complex_dtype_of(rd) if self.range_complex else rd

    def randn_domain(self, *batch: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal sample of shape ``(*batch, *batch_shape?, *domain_shape)``."""
        shape = (*batch, *self.domain_shape)
        return torch.randn(shape, generator=generator, device=self.device,
                           dtype=self.domain_dtype(dtype and real_dtype_of(dtype)))

    def randn_range(self, *batch: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype | None = None) -> Tensor:
        shape = (*batch, *self.range_shape)
        return torch.randn(shape, generator=generator, device=self.device,
                           dtype=self.range_dtype(dtype and real_dtype_of(dtype)))

    @torch.no_grad()
    def norm(self, n_iter: int = 100, tol: float = 1e-6, x0: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Spectral norm ``||A||_2`` by power iteration on ``A^H A``.

        Returns a tensor of shape ``batch_shape`` (a scalar for a shared operator).
        """
        x = x0 if x0 is not None else self.randn_domain(*self.batch_shape, generator=generator)
        dims = tuple(range(x.ndim - len(self.domain_shape), x.ndim))
        x = x / _vnorm(x, dims)
        lam = torch.zeros((), device=x.device, dtype=real_dtype_of(x.dtype))
        for _ in range(n_iter):
            z = self.A_normal(x)
            new = _vdot(x, z, dims).real
            nz = _vnorm(z, dims)
            x = z / torch.where(nz > 0, nz, torch.ones_like(nz))
            done = bool(((new - lam).abs() <= tol * new.abs()).all())
            lam = new
            if done:
                break
        return _squeeze(lam.clamp_min(0).sqrt(), dims)

    def domain_support(self) -> Tensor | None:
        """A real 0/1 mask broadcastable to ``(*batch, *domain_shape)`` of the pixels that
        ``A`` sees (``A x`` ignores ``x`` outside it), or ``None`` when it sees every pixel.
        Unrolled networks zero their prior's output outside it: there the data say nothing."""
        return None

    def norm_bound(self) -> float:
        """An upper bound (or a tight estimate) of ``||A||_2``, cheap to call repeatedly.

        Used to scale learned step sizes on every DC step, so it is computed once per
        instance (:meth:`_compute_norm_bound`) and cached.
        """
        cached = getattr(self, "_norm_bound_cache", None)
        if cached is None:
            cached = self._norm_bound_cache = self._compute_norm_bound()
        return cached

    def _compute_norm_bound(self) -> float:
        """Default: :meth:`norm` (30 iterations) with a 1% margin; operators with an
        analytic bound override."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        return 1.01 * float(self.norm(n_iter=30, tol=1e-4, generator=gen).max())

    def extra_repr(self) -> str:
        return f"domain={self.domain_shape}, range={self.range_shape}"


def _vdot(a: Tensor, b: Tensor, dims: Sequence[int]) -> Tensor:
    return (a.conj() * b).sum(dim=tuple(dims), keepdim=True)


def _vnorm(a: Tensor, dims: Sequence[int]) -> Tensor:
    return torch.linalg.vector_norm(a, dim=tuple(dims), keepdim=True)


def _squeeze(t: Tensor, dims: Sequence[int]) -> Tensor:
    for d in sorted(dims, reverse=True):
        t = t.squeeze(d)
    return t


def inner(a: Tensor, b: Tensor, n_dims: int) -> Tensor:
    """Inner product ``<a, b> = sum(conj(a) * b)`` over the last ``n_dims`` dimensions."""
    dims = tuple(range(a.ndim - n_dims, a.ndim)) if n_dims else ()
    return (a.conj() * b).sum(dim=dims) if dims else a.conj() * b


class AdjointOperator(LinearOperator):
    """``op.H``: swaps ``A`` and ``A_adjoint``."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__()
        self.op = op
        self.domain_shape, self.range_shape = op.range_shape, op.domain_shape
        self.domain_complex, self.range_complex = op.range_complex, op.domain_complex

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.op.batch_shape

    @property
    def H(self) -> LinearOperator:
        return self.op

    def A(self, x: Tensor) -> Tensor:
        return self.op.A_adjoint(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.op.A(y)


class ComposedOperator(LinearOperator):
    """``outer @ inner``: ``x -> outer(inner(x))``."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator) -> None:
        super().__init__()
        if tuple(outer.domain_shape) != tuple(inner.range_shape):
            raise ValueError(
                f"cannot compose: left operator's domain {outer.domain_shape} differs from "
                f"right operator's range {inner.range_shape}"
            )
        self.outer, self.inner = outer, inner
        self.domain_shape, self.range_shape = inner.domain_shape, outer.range_shape
        self.domain_complex, self.range_complex = inner.domain_complex, outer.range_complex

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(torch.broadcast_shapes(self.outer.batch_shape, self.inner.batch_shape))

    def A(self, x: Tensor) -> Tensor:
        return self.outer.A(self.inner.A(x))

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.inner.A_adjoint(self.outer.A_adjoint(y))


class ScaledOperator(LinearOperator):
    """``s * op`` for a scalar ``s`` (the normal operator is ``|s|^2 op.A_normal``)."""

    def __init__(self, op: LinearOperator, scale: complex | Tensor) -> None:
        super().__init__()
        self.op = op
        self.scale = scale
        self.domain_shape, self.range_shape = op.domain_shape, op.range_shape
        self.domain_complex, self.range_complex = op.domain_complex, op.range_complex

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.op.batch_shape

    def _conj_scale(self) -> complex | float | Tensor:
        s = self.scale
        if isinstance(s, Tensor):
            return s.conj()
        return s.conjugate() if isinstance(s, complex) else s

    def A(self, x: Tensor) -> Tensor:
        return self.scale * self.op.A(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self._conj_scale() * self.op.A_adjoint(y)

    def A_normal(self, x: Tensor) -> Tensor:
        s = self.scale
        s2 = (s.abs() ** 2) if isinstance(s, Tensor) else abs(s) ** 2
        return s2 * self.op.A_normal(x)


class SumOperator(LinearOperator):
    """``a + b`` for operators with equal domains and ranges."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        super().__init__()
        if (tuple(a.domain_shape), tuple(a.range_shape)) != (tuple(b.domain_shape), tuple(b.range_shape)):
            raise ValueError(
                f"cannot add operators with domain/range {a.domain_shape}->{a.range_shape} "
                f"and {b.domain_shape}->{b.range_shape}"
            )
        self.a, self.b = a, b
        self.domain_shape, self.range_shape = a.domain_shape, a.range_shape
        self.domain_complex = a.domain_complex or b.domain_complex
        self.range_complex = a.range_complex or b.range_complex

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(torch.broadcast_shapes(self.a.batch_shape, self.b.batch_shape))

    def A(self, x: Tensor) -> Tensor:
        return self.a.A(x) + self.b.A(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.a.A_adjoint(y) + self.b.A_adjoint(y)


class Identity(LinearOperator):
    """The identity on tensors ending with ``shape``."""

    def __init__(self, shape: Sequence[int], complex: bool = False) -> None:
        super().__init__()
        self.domain_shape = self.range_shape = tuple(int(s) for s in shape)
        self.domain_complex = self.range_complex = complex

    def A(self, x: Tensor) -> Tensor:
        return x

    def A_adjoint(self, y: Tensor) -> Tensor:
        return y

    def A_normal(self, x: Tensor) -> Tensor:
        return x
