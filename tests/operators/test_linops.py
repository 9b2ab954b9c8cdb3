"""MatrixOperator, Diagonal and FiniteDifference2D: contract checks, sigpy convention, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrecon.operators import (
    OPERATOR_REGISTRY,
    Diagonal,
    FiniteDifference2D,
    MatrixOperator,
    make_operator,
)

LINOPS = ["matrix", "matrix_complex_batched", "diagonal", "diagonal_mask_batched",
          "finite_difference_2d", "finite_difference_2d_complex"]


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.conj() * b).sum()


def _samples(op, n: int = 2, seed: int = 0):
    gen = torch.Generator(device=op.device).manual_seed(seed)
    dt = torch.float64
    x = op.randn_domain(n, *op.batch_shape, generator=gen, dtype=dt)
    y = op.randn_range(n, *op.batch_shape, generator=gen, dtype=dt)
    return x, y


@pytest.mark.parametrize("name", LINOPS)
def test_registered(name: str) -> None:
    assert name in OPERATOR_REGISTRY


@pytest.mark.parametrize("name", LINOPS)
def test_contract(name: str, device: torch.device) -> None:
    op = make_operator(name, device=device, dtype=torch.float64)
    x, y = _samples(op)
    x, y = x.to(device), y.to(device)
    ax, aty = op.A(x), op.A_adjoint(y)
    assert ax.shape == y.shape and aty.shape == x.shape
    assert ax.device.type == device.type and ax.is_complex() == op.range_complex
    # adjoint (dot-product) test
    torch.testing.assert_close(_inner(ax, y), _inner(x, aty), rtol=1e-10, atol=1e-10)
    # normal operator
    torch.testing.assert_close(op.A_normal(x), op.A_adjoint(ax), rtol=1e-10, atol=1e-10)
    # linearity
    x2 = _samples(op, seed=1)[0].to(device)
    torch.testing.assert_close(op.A(2.5 * x - x2), 2.5 * ax - op.A(x2), rtol=1e-10, atol=1e-10)
    # autograd VJP equals the adjoint
    xr = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(op.A(xr), xr, grad_outputs=y)
    torch.testing.assert_close(vjp, aty, rtol=1e-10, atol=1e-10)
    # batch invariance: sample by sample equals batched
    torch.testing.assert_close(op.A(x[1]), ax[1], rtol=1e-12, atol=1e-12)
    # norm exists and is positive
    assert float(op.norm(n_iter=50).max()) > 0


@pytest.mark.parametrize("name", LINOPS)
def test_device_move(name: str, device: torch.device) -> None:
    op = make_operator(name, dtype=torch.float64).to(device)
    assert op.device.type == device.type
    x = op.randn_domain(*op.batch_shape, dtype=torch.float64)
    assert x.device.type == device.type
    assert op.A(x).device.type == device.type


def test_matrix_operator_matches_matmul() -> None:
    gen = torch.Generator().manual_seed(0)
    mat = torch.randn(3, 5, 4, generator=gen, dtype=torch.complex128)
    op = MatrixOperator(mat)
    assert op.batch_shape == (3,) and op.domain_shape == (4,) and op.range_shape == (5,)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.complex128)
    ref = torch.einsum("bmn,abn->abm", mat, x)
    torch.testing.assert_close(op.A(x), ref)
    # a real matrix applied to complex vectors promotes instead of failing
    real = MatrixOperator(mat.real)
    torch.testing.assert_close(real.A(x), torch.einsum("bmn,abn->abm", mat.real.to(x.dtype), x))


def test_diagonal_normal_and_real_mask_on_complex() -> None:
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    op = Diagonal(mask, complex=True)
    assert op.domain_complex and op.range_complex
    x = torch.randn(3, 2, 2, dtype=torch.complex128)
    torch.testing.assert_close(op.A_normal(x), mask * x)
    w = torch.randn(2, 2, dtype=torch.complex128)
    torch.testing.assert_close(Diagonal(w).A_normal(x), w.abs() ** 2 * x)


def test_finite_difference_matches_sigpy() -> None:
    sp = pytest.importorskip("sigpy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)) + 1j * rng.standard_normal((5, 7))
    ref = sp.linop.FiniteDifference(x.shape)(x)
    out = FiniteDifference2D((5, 7), complex=True).A(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    y = rng.standard_normal((2, 5, 7))
    ref_adj = sp.linop.FiniteDifference(x.shape).H(y)
    out_adj = FiniteDifference2D((5, 7)).A_adjoint(torch.from_numpy(y))
    np.testing.assert_allclose(out_adj.numpy(), ref_adj, rtol=1e-12, atol=1e-12)


def test_finite_difference_norm_bound() -> None:
    op = FiniteDifference2D((8, 8), dtype=torch.float64)
    # the checkerboard attains ||D||^2 = 8 on even sizes
    assert float(op.norm(n_iter=500, tol=1e-12)) == pytest.approx(8**0.5, rel=1e-3)


def test_validation_errors_name_argument_and_shape() -> None:
    with pytest.raises(ValueError, match=r"'x'.*\(\.\.\., 4\)"):
        MatrixOperator(torch.randn(5, 4)).A(torch.randn(3))
    with pytest.raises(ValueError, match=r"'y'.*\(\.\.\., 2, 6, 5\)"):
        FiniteDifference2D((6, 5)).A_adjoint(torch.randn(6, 5))
    with pytest.raises(ValueError, match="'matrix'"):
        MatrixOperator(torch.randn(4))
    with pytest.raises(ValueError, match="'complex'"):
        Diagonal(torch.randn(3, dtype=torch.complex64), complex=False)
    with pytest.raises(ValueError, match="'image_size'"):
        FiniteDifference2D((0, 3))
