"""Small generic linear operators: dense matrices, diagonals and 2-D finite differences.

These are building blocks (the gradient of total variation, a sampling mask) and references
for tests (a dense matrix whose normal equations ``torch.linalg.solve`` can solve exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import as_image_size, check_tensor, check_trailing_shape, complex_dtype_of
from .base import LinearOperator
from .registry import register_operator

__all__ = ["Diagonal", "FiniteDifference2D", "MatrixOperator"]


def _promote(a: Tensor, x: Tensor) -> Tensor:
    """``a`` cast to the common dtype of ``a`` and ``x`` (matmul does not promote)."""
    return a.to(torch.promote_types(a.dtype, x.dtype))


class MatrixOperator(LinearOperator):
    """A dense matrix acting on vectors: ``(..., N) -> (..., M)``.

    Parameters
    ----------
    matrix : Tensor
        Shape ``(*batch_shape, M, N)``, real or complex. Leading dimensions are per-sample
        matrices: an input ``(..., *batch_shape, N)`` is multiplied sample by sample.
    """

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        check_tensor("matrix", matrix)
        if matrix.ndim < 2 or not (matrix.is_floating_point() or matrix.is_complex()):
            raise ValueError(
                "MatrixOperator: argument 'matrix' must be a floating-point tensor of shape "
                f"(..., M, N); got {tuple(matrix.shape)} {matrix.dtype}"
            )
        self.register_buffer("matrix", matrix)
        self.range_shape = (int(matrix.shape[-2]),)
        self.domain_shape = (int(matrix.shape[-1]),)
        self.domain_complex = self.range_complex = matrix.is_complex()

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.matrix.shape[:-2])

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("x", x, self.domain_shape, owner="MatrixOperator.A")
        return (_promote(self.matrix, x) @ x.unsqueeze(-1)).squeeze(-1)

    def A_adjoint(self, y: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("y", y, self.range_shape, owner="MatrixOperator.A_adjoint")
        return (_promote(self.matrix, y).mH @ y.unsqueeze(-1)).squeeze(-1)


class Diagonal(LinearOperator):
    """Elementwise multiplication ``x -> w * x`` (a mask, a weighting, a phase).

    Parameters
    ----------
    weights : Tensor
        Shape ``(*batch_shape, *domain_shape)``, real or complex.
    batch_dims : int
        How many leading dimensions of ``weights`` are per-sample (``batch_shape``);
        the remaining ones are ``domain_shape`` (= ``range_shape``).
    complex : bool, optional
        Whether the operator acts on complex data. Defaults to ``weights.is_complex()``;
        a real mask on complex k-space needs ``complex=True``.
    """

    def __init__(self, weights: Tensor, batch_dims: int = 0,
                 complex: bool | None = None) -> None:  # noqa: A002
        super().__init__()
        check_tensor("weights", weights)
        if not 0 <= batch_dims <= weights.ndim:
            raise ValueError(
                f"Diagonal: argument 'batch_dims' must be in [0, weights.ndim={weights.ndim}]; "
                f"got {batch_dims}"
            )
        if weights.is_complex() and complex is False:
            raise ValueError("Diagonal: argument 'complex' must be True for complex 'weights'")
        self.register_buffer("weights", weights)
        self._batch_dims = int(batch_dims)
        self.domain_shape = self.range_shape = tuple(int(s) for s in weights.shape[batch_dims:])
        is_complex = weights.is_complex() if complex is None else bool(complex)
        self.domain_complex = self.range_complex = is_complex

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.weights.shape[: self._batch_dims])

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("x", x, self.domain_shape, owner="Diagonal.A")
        return self.weights * x

    def A_adjoint(self, y: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("y", y, self.range_shape, owner="Diagonal.A_adjoint")
        return self.weights.conj() * y

    def A_normal(self, x: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("x", x, self.domain_shape, owner="Diagonal.A_normal")
        w = self.weights
        return (w.real**2 + w.imag**2 if w.is_complex() else w * w) * x


class FiniteDifference2D(LinearOperator):
    """Circular forward differences along H and W: ``(..., H, W) -> (..., 2, H, W)``.

    ``out[..., 0, :, :] = x - roll(x, 1, dim=-2)`` and ``out[..., 1, :, :] = x - roll(x, 1,
    dim=-1)``: the convention of ``sigpy.linop.FiniteDifference`` (so TV objectives can be
    compared with sigpy). The adjoint is ``sum_k d_k - roll(d_k, -1)`` and ``||A||^2 <= 8``.

    Parameters
    ----------
    image_size : int or (int, int)
        ``(H, W)``.
    complex : bool
        Whether the operator acts on complex images.
    device, dtype : optional
        Where :meth:`randn_domain` and :meth:`norm` create their tensors (the operator has
        no parameters; a zero-size buffer records them and moves with ``.to()``).
    """

    def __init__(self, image_size: int | Sequence[int], complex: bool = False,  # noqa: A002
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        h, w = as_image_size("image_size", image_size)
        self.domain_shape = (h, w)
        self.range_shape = (2, h, w)
        self.domain_complex = self.range_complex = bool(complex)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype, device=device),
                             persistent=False)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("x", x, self.domain_shape, owner="FiniteDifference2D.A")
        return torch.stack((x - x.roll(1, dims=-2), x - x.roll(1, dims=-1)), dim=-3)

    def A_adjoint(self, y: Tensor) -> Tensor:  # noqa: N802
        check_trailing_shape("y", y, self.range_shape, owner="FiniteDifference2D.A_adjoint")
        dh, dw = y[..., 0, :, :], y[..., 1, :, :]
        return (dh - dh.roll(-1, dims=-2)) + (dw - dw.roll(-1, dims=-1))


# -- registry factories: small defaults for the contract suite -------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@register_operator("matrix")
def _matrix_factory(*, device: torch.device, dtype: torch.dtype, m: int = 6, n: int = 4,
                    batch: Sequence[int] = (), complex: bool = False,  # noqa: A002
                    seed: int = 0) -> MatrixOperator:
    cdtype = complex_dtype_of(dtype) if complex else dtype
    mat = torch.randn((*batch, m, n), generator=_gen(seed), dtype=cdtype)
    return MatrixOperator(mat.to(device))


@register_operator("matrix_complex_batched")
def _matrix_complex_batched_factory(*, device: torch.device, dtype: torch.dtype,
                                    **params: object) -> MatrixOperator:
    params = {"batch": (3,), "complex": True, **params}
    return _matrix_factory(device=device, dtype=dtype, **params)  # type: ignore[arg-type]


@register_operator("diagonal")
def _diagonal_factory(*, device: torch.device, dtype: torch.dtype,
                      shape: Sequence[int] = (5, 4), complex: bool = True,  # noqa: A002
                      seed: int = 0) -> Diagonal:
    cdtype = complex_dtype_of(dtype) if complex else dtype
    w = torch.randn(tuple(shape), generator=_gen(seed), dtype=cdtype)
    return Diagonal(w.to(device))


@register_operator("diagonal_mask_batched")
def _diagonal_mask_factory(*, device: torch.device, dtype: torch.dtype, batch: int = 2,
                           shape: Sequence[int] = (6, 5), seed: int = 0) -> Diagonal:
    mask = (torch.rand((batch, *shape), generator=_gen(seed)) > 0.5).to(dtype)
    return Diagonal(mask.to(device), batch_dims=1, complex=True)


@register_operator("finite_difference_2d")
def _finite_difference_factory(*, device: torch.device, dtype: torch.dtype,
                               image_size: int | Sequence[int] = (6, 5),
                               complex: bool = False) -> FiniteDifference2D:  # noqa: A002
    return FiniteDifference2D(image_size, complex=complex, device=device, dtype=dtype)


@register_operator("finite_difference_2d_complex")
def _finite_difference_complex_factory(*, device: torch.device, dtype: torch.dtype,
                                       image_size: int | Sequence[int] = (5, 6)
                                       ) -> FiniteDifference2D:
    return FiniteDifference2D(image_size, complex=True, device=device, dtype=dtype)
