"""The numba CPU product (operators/_cpu_spmm.py) behind the sparse CT backend: equal to the
dense float64 system matrix, matched adjoint, autograd, every batch layout."""

from __future__ import annotations

import math

import pytest
import torch
from fedrecon.operators import FanBeam2D, ParallelBeam2D, _cpu_spmm
from fedrecon.operators.ct import clear_projector_cache

pytestmark = pytest.mark.skipif(not _cpu_spmm.available(), reason="numba is not installed")


def _ops():
    return {
        "parallel": ParallelBeam2D((13, 17), n_angles=11, backend="sparse"),
        "sparse-view": ParallelBeam2D(10, torch.tensor([0.0, 0.3, math.pi / 4, 2.0]), det_count=9,
                                      det_spacing=1.3, det_offset=0.7, backend="sparse"),
        "fan": FanBeam2D((12, 15), n_angles=9, det_count=31, source_distance=40.0,
                         detector_distance=30.0, backend="sparse"),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("name", ["parallel", "sparse-view", "fan"])
@pytest.mark.parametrize("batch", [(), (3,), (8,), (13,), (2, 5)])
def test_matches_dense_float64(dense_ref, cpu_kernel, name, batch):
    op = _ops()[name]
    x = torch.randn(*batch, *op.domain_shape, dtype=torch.float64)
    y = torch.randn(*batch, *op.range_shape, dtype=torch.float64)
    mat32 = op.matrices(torch.float32)[0]
    assert _cpu_spmm.use_kernel(mat32, torch.zeros(mat32.shape[1], 8))
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        assert _rel(op.A(x.to(dtype)), dense_ref(op, x, False)) < tol
        assert _rel(op.A_adjoint(y.to(dtype)), dense_ref(op, y, True)) < tol
        assert op.A(x.to(dtype)).dtype == dtype


def test_same_as_torch_product(cpu_kernel, monkeypatch):
    """Kernel and torch's own product agree (float32, 8 lanes + a padded block)."""
    op = _ops()["fan"]
    y = torch.randn(11, *op.range_shape)
    ours = op.A_adjoint(y)
    monkeypatch.setenv(_cpu_spmm.ENV_VAR, "off")
    assert not _cpu_spmm.use_kernel(op.matrices(torch.float32)[1], y.reshape(11, -1).T)
    assert _rel(ours, op.A_adjoint(y).double()) < 2e-6


def test_non_contiguous_and_empty(dense_ref, cpu_kernel):
    op = _ops()["parallel"]
    base = torch.randn(*op.domain_shape[::-1], 6, dtype=torch.float64)
    x = base.permute(2, 1, 0)  # (6, H, W), not contiguous
    assert not x.is_contiguous()
    assert _rel(op.A(x), dense_ref(op, x, False)) < 1e-12
    y = torch.randn(4, *op.range_shape, dtype=torch.float64)[::2]
    assert _rel(op.A_adjoint(y), dense_ref(op, y, True)) < 1e-12
    empty = op.A_adjoint(torch.zeros(0, 3, *op.range_shape))
    assert empty.shape == (0, 3, *op.domain_shape)


@pytest.mark.parametrize("name", ["parallel", "fan"])
def test_adjoint_dot_product(cpu_kernel, assert_adjoint, name):
    assert_adjoint(_ops()[name])


def test_gradcheck_and_double_backward(monkeypatch):
    monkeypatch.setattr(_cpu_spmm, "MIN_NNZ", 0)
    monkeypatch.setattr(_cpu_spmm, "CHUNK_BYTES", 5 * 8 * 8)
    op = ParallelBeam2D((5, 6), n_angles=4, det_count=9, backend="sparse")
    clear_projector_cache()
    assert _cpu_spmm.use_kernel(op.matrices(torch.float64)[0], torch.zeros(30, 2, dtype=torch.float64))
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op.A, (x,))
    assert torch.autograd.gradcheck(op.A_adjoint, (y,))
    assert torch.autograd.gradgradcheck(lambda t: op.A(t).pow(2).sum(), (x,))
    clear_projector_cache()


def test_small_matrices_stay_on_torch():
    """Below ``MIN_NNZ`` (the default) nothing is compiled: torch's product runs."""
    op = ParallelBeam2D(8, n_angles=3)
    mat = op.matrices(torch.float32)[0]
    assert mat._nnz() < _cpu_spmm.MIN_NNZ
    assert not _cpu_spmm.use_kernel(mat, torch.zeros(mat.shape[1], 8))


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 30])
def test_wide_matrix_chunk_offsets(monkeypatch, chunk_bytes):
    """Columns are stored as uint16 offsets within their chunk: a matrix wider than 2^16
    columns, in tiny chunks and in chunks clamped to 2^16 columns, against torch's product."""
    monkeypatch.setattr(_cpu_spmm, "MIN_NNZ", 0)
    monkeypatch.delenv(_cpu_spmm.ENV_VAR, raising=False)
    monkeypatch.setattr(_cpu_spmm, "CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(3)
    n_rows, n_cols, nnz = 40, 200_003, 3000
    idx = torch.stack([torch.randint(0, n_rows, (nnz,), generator=gen),
                       torch.randint(0, n_cols, (nnz,), generator=gen)])
    idx[:, 0] = torch.tensor([0, n_cols - 1])  # the last column is used
    coo = torch.sparse_coo_tensor(idx, torch.randn(nnz, dtype=torch.float64, generator=gen),
                                  (n_rows, n_cols)).coalesce()
    mat = coo.to_sparse_csr()
    x = torch.randn(n_cols, 5, dtype=torch.float64, generator=gen)
    assert _cpu_spmm.use_kernel(mat, x)
    got = _cpu_spmm.matmul(mat, x)
    assert _rel(got, coo.to_dense() @ x) < 1e-12
    assert _cpu_spmm.chunked(mat)[4] <= 1 << 16


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(dense_ref, cpu_kernel, threads):
    """One row range (no parallel team) and more ranges than numba has threads give the same
    products (``_cpu_spmm.run_parallel``)."""
    op = _ops()["fan"]
    y = torch.randn(8, *op.range_shape, dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert len(_cpu_spmm._row_split(op.matrices(torch.float64)[1])) == threads + 1
        assert _rel(op.A_adjoint(y), dense_ref(op, y, True)) < 1e-12
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old
