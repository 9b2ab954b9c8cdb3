"""The quarter-turn path of the CPU kernel (operators/ct.py ``_QuarterTurn``): square images
whose views pair up pi/2 apart run from half the matrix, 16 lanes per pass. Checked against
the float64 dense system matrix, the matched adjoint, autograd, every batch layout, and the
fallback wherever the symmetry does not hold."""

from __future__ import annotations

import math

import pytest
import torch
from fedrecon.operators import FanBeam2D, ParallelBeam2D, _cpu_spmm, ct
from fedrecon.operators.ct import clear_projector_cache

pytestmark = pytest.mark.skipif(not _cpu_spmm.available(), reason="numba is not installed")


def _symmetric():
    return {
        "parallel": ParallelBeam2D(12, n_angles=10, backend="sparse"),
        "parallel-offset": ParallelBeam2D(11, n_angles=6, det_count=19, det_spacing=0.8,
                                          det_offset=0.6, backend="sparse"),
        # pairs found in any order: 2.0 + pi/2 listed first, its partner last
        "shuffled": ParallelBeam2D(9, torch.tensor([2.0 + math.pi / 2, 0.3, 0.3 + math.pi / 2,
                                                    2.0], dtype=torch.float64), det_count=15,
                                  backend="sparse"),
        "fan": FanBeam2D(12, n_angles=12, det_count=31, source_distance=40.0,
                         detector_distance=30.0, backend="sparse"),
    }


def _asymmetric():
    return {
        "odd-views": ParallelBeam2D(12, n_angles=9, backend="sparse"),
        "non-square": ParallelBeam2D((12, 13), n_angles=10, backend="sparse"),
        "non-uniform": ParallelBeam2D(12, torch.tensor([0.0, 0.3, 1.0, 2.0]), backend="sparse"),
        "fan-non-square": FanBeam2D((12, 15), n_angles=12, det_count=31, source_distance=40.0,
                                    detector_distance=30.0, backend="sparse"),
    }


@pytest.fixture
def kernel_on(cpu_kernel, monkeypatch):
    """The CPU kernel (both chunk layouts) with the quarter-turn path on."""
    monkeypatch.setattr(ct, "QUARTER_TURN", True)
    return cpu_kernel


def _quarter(op, dtype=torch.float32):
    mat = op.matrices(dtype)[0]
    return ct._quarter_turn(op.geometry, mat, torch.zeros(mat.shape[1], 8, dtype=dtype))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("name", list(_symmetric()))
@pytest.mark.parametrize("batch", [(), (1,), (3,), (8,), (13,), (2, 5)])
def test_matches_dense_float64(dense_ref, kernel_on, name, batch):
    op = _symmetric()[name]
    assert _quarter(op) is not None and _quarter(op, torch.float64) is not None
    x = torch.randn(*batch, *op.domain_shape, dtype=torch.float64)
    y = torch.randn(*batch, *op.range_shape, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        ax, aty = op.A(x.to(dtype)), op.A_adjoint(y.to(dtype))
        assert ax.dtype == aty.dtype == dtype
        assert ax.shape == (*batch, *op.range_shape)
        assert aty.shape == (*batch, *op.domain_shape)
        assert _rel(ax, dense_ref(op, x, False)) < tol
        assert _rel(aty, dense_ref(op, y, True)) < tol


@pytest.mark.parametrize("name", list(_asymmetric()))
def test_fallback_where_no_symmetry(dense_ref, kernel_on, name):
    op = _asymmetric()[name]
    assert ct._quarter_pairs(op.geometry) is None
    assert _quarter(op) is None
    x = torch.randn(3, *op.domain_shape, dtype=torch.float64)
    y = torch.randn(3, *op.range_shape, dtype=torch.float64)
    assert _rel(op.A(x), dense_ref(op, x, False)) < 1e-12
    assert _rel(op.A_adjoint(y), dense_ref(op, y, True)) < 1e-12


def test_verification_rejects_a_broken_matrix(kernel_on):
    """Paired views whose rows are not rotated copies (one entry changed) are refused."""
    op = _symmetric()["parallel"]
    mat = op.matrices(torch.float64)[0]
    assert ct._QuarterTurn.build(op.geometry, mat) is not None
    vals = mat.values().clone()
    vals[vals.numel() - 5] *= 1.001  # a row of the second half
    broken = torch.sparse_csr_tensor(mat.crow_indices(), mat.col_indices(), vals, mat.shape)
    assert ct._QuarterTurn.build(op.geometry, broken) is None


def test_same_as_plain_path_and_off_switch(kernel_on, monkeypatch):
    op = _symmetric()["fan"]
    x = torch.randn(11, *op.domain_shape)
    y = torch.randn(11, *op.range_shape)
    ours = op.A(x), op.A_adjoint(y)
    monkeypatch.setattr(ct, "QUARTER_TURN", False)
    assert _quarter(op) is None
    plain = op.A(x), op.A_adjoint(y)
    monkeypatch.setattr(ct, "QUARTER_TURN", True)
    monkeypatch.setenv(_cpu_spmm.ENV_VAR, "off")
    assert _quarter(op) is None  # FEDRECON_CPU_SPMM=off: torch's product
    torch_path = op.A(x), op.A_adjoint(y)
    for a, b, c in zip(ours, plain, torch_path, strict=True):
        assert _rel(a, b.double()) < 2e-6
        assert _rel(a, c.double()) < 2e-6


def test_non_contiguous_and_empty(dense_ref, kernel_on):
    op = _symmetric()["parallel"]
    x = torch.randn(*op.domain_shape[::-1], 6, dtype=torch.float64).permute(2, 1, 0)
    assert not x.is_contiguous()
    assert _rel(op.A(x), dense_ref(op, x, False)) < 1e-12
    y = torch.randn(4, *op.range_shape, dtype=torch.float64)[::2]
    assert _rel(op.A_adjoint(y), dense_ref(op, y, True)) < 1e-12
    yt = torch.randn(*op.range_shape, 3, dtype=torch.float32).permute(2, 0, 1)
    assert _rel(op.A_adjoint(yt), dense_ref(op, yt, True)) < 2e-6
    assert op.A_adjoint(torch.zeros(0, 3, *op.range_shape)).shape == (0, 3, *op.domain_shape)
    assert op.A(torch.zeros(0, *op.domain_shape)).shape == (0, *op.range_shape)


@pytest.mark.parametrize("name", ["parallel", "fan"])
def test_adjoint_dot_product(kernel_on, assert_adjoint, name):
    op = _symmetric()[name]
    assert _quarter(op, torch.float64) is not None
    assert_adjoint(op)


def test_gradcheck_and_double_backward(monkeypatch):
    monkeypatch.delenv(_cpu_spmm.ENV_VAR, raising=False)
    monkeypatch.setattr(_cpu_spmm, "MIN_NNZ", 0)
    monkeypatch.setattr(_cpu_spmm, "CHUNK_BYTES", 5 * 8 * 8)
    monkeypatch.setattr(ct, "QUARTER_TURN", True)
    clear_projector_cache()
    op = ParallelBeam2D(6, n_angles=6, det_count=9, backend="sparse")
    assert _quarter(op, torch.float64) is not None
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op.A, (x,))
    assert torch.autograd.gradcheck(op.A_adjoint, (y,))
    assert torch.autograd.gradgradcheck(lambda t: op.A(t).pow(2).sum(), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op.A_adjoint(t).pow(2).sum(), (y,))
    clear_projector_cache()


def test_env_switch(kernel_on, monkeypatch):
    op = _symmetric()["parallel"]
    monkeypatch.setenv(ct.QUARTER_ENV_VAR, "off")
    assert _quarter(op) is None
    monkeypatch.setenv(ct.QUARTER_ENV_VAR, "on")
    assert _quarter(op) is not None
