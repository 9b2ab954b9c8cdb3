"""MRI operators: centered FFT, SENSE and single-coil, against numpy and sigpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrecon.operators import (
    OPERATOR_REGISTRY,
    MultiCoilMRI,
    SingleCoilMRI,
    fft2c,
    ifft2c,
    make_operator,
    rss,
)

CDTYPES = [torch.complex64, torch.complex128]
SHAPES = [(16, 20), (15, 12), (9, 7)]  # even/even (checkerboard path), odd/even, odd/odd


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.complex64 else 1e-12


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _np_fft2c(x: np.ndarray) -> np.ndarray:
    ax = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=ax), norm="ortho"), axes=ax)


def _crandn(*shape: int, dtype: torch.dtype = torch.complex128, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- fft2c / ifft2c / rss ------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", CDTYPES)
def test_fft2c_matches_numpy_and_is_orthonormal(shape, dtype, device):
    x = _crandn(2, 3, *shape, dtype=dtype).to(device)
    k = fft2c(x)
    assert k.shape == x.shape and k.dtype == dtype
    assert _rel(k.cpu().numpy(), _np_fft2c(x.cpu().numpy())) < _tol(dtype)
    torch.testing.assert_close(ifft2c(k), x, rtol=_tol(dtype), atol=_tol(dtype))
    torch.testing.assert_close(fft2c(ifft2c(x)), x, rtol=_tol(dtype), atol=_tol(dtype))
    # Parseval
    torch.testing.assert_close(k.abs().square().sum(), x.abs().square().sum(),
                               rtol=_tol(dtype), atol=0)


def test_fft2c_dc_at_center():
    k = fft2c(torch.ones(6, 9, dtype=torch.complex128))
    assert k.abs().argmax().item() == 3 * 9 + 4
    assert abs(k[3, 4].real.item() - np.sqrt(54)) < 1e-12


def test_rss_complex_and_real():
    x = _crandn(2, 4, 5, 6)
    ref = np.sqrt((np.abs(x.numpy()) ** 2).sum(axis=1))
    np.testing.assert_allclose(rss(x).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(rss(x.real, dim=1).numpy(),
                               np.sqrt((x.real.numpy() ** 2).sum(axis=1)), rtol=1e-12)


# -- MultiCoilMRI against sigpy's SENSE ---------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", CDTYPES)
def test_multicoil_matches_sigpy_sense(shape, dtype):
    import sigpy.mri

    h, w = shape
    maps = _crandn(5, h, w, dtype=dtype, seed=1)
    mask = (torch.rand(w, generator=torch.Generator().manual_seed(2)) < 0.5)
    mask = mask.to(torch.float32 if dtype == torch.complex64 else torch.float64)
    op = MultiCoilMRI(maps, mask)
    sense = sigpy.mri.linop.Sense(maps.numpy(), weights=np.broadcast_to(mask.numpy(), (h, w)))
    x, y = _crandn(h, w, dtype=dtype, seed=3), _crandn(5, h, w, dtype=dtype, seed=4)
    assert _rel(op.A(x).numpy(), sense(x.numpy())) < _tol(dtype)
    assert _rel(op.A_adjoint(y).numpy(), sense.H(y.numpy())) < _tol(dtype)
    assert _rel(op.A_normal(x).numpy(), sense.N(x.numpy())) < _tol(dtype)


def test_multicoil_weighted_mask_matches_sigpy_squared_weights():
    import sigpy.mri

    h, w = 12, 10
    maps = _crandn(3, h, w, seed=5)
    mask = torch.rand(h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    op = MultiCoilMRI(maps, mask)
    sense = sigpy.mri.linop.Sense(maps.numpy(), weights=mask.numpy() ** 2)  # sigpy: sqrt(w)
    x, y = _crandn(h, w, seed=7), _crandn(3, h, w, seed=8)
    assert _rel(op.A(x).numpy(), sense(x.numpy())) < 1e-12
    assert _rel(op.A_adjoint(y).numpy(), sense.H(y.numpy())) < 1e-12
    torch.testing.assert_close(op.A_normal(x), op.A_adjoint(op.A(x)))


@pytest.mark.parametrize("shape", SHAPES)
def test_singlecoil_matches_numpy(shape, device):
    h, w = shape
    mask = (torch.rand(1, w, generator=torch.Generator().manual_seed(9)) < 0.5).double()
    op = SingleCoilMRI(mask, image_size=shape).to(device)
    x = _crandn(2, h, w, seed=10)
    ref = mask.numpy() * _np_fft2c(x.numpy())
    assert _rel(op.A(x.to(device)).cpu().numpy(), ref) < 1e-12
    ref_adj = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(mask.numpy() * x.numpy(),
                                                            axes=(-2, -1)), norm="ortho"),
                              axes=(-2, -1))
    assert _rel(op.A_adjoint(x.to(device)).cpu().numpy(), ref_adj) < 1e-12
    torch.testing.assert_close(op.A_normal(x.to(device)), op.A_adjoint(op.A(x.to(device))))


# -- shapes, batching, dtypes ----------------------------------------------------------------
@pytest.mark.parametrize("mask_shape", [(20,), (1, 20), (16, 20), (1, 16, 20), (1, 1, 20),
                                        (1, 1, 16, 20), (1, 1, 1, 20)])
def test_mask_shapes_are_equivalent(mask_shape):
    maps = _crandn(4, 16, 20, seed=11)
    cols = (torch.rand(20, generator=torch.Generator().manual_seed(12)) < 0.5).double()
    ref = MultiCoilMRI(maps, cols)
    op = MultiCoilMRI(maps, cols.expand(*mask_shape).clone())
    assert op.mask.shape[-3] == 1
    x = _crandn(16, 20, seed=13)
    torch.testing.assert_close(op.A(x).reshape(-1, 4, 16, 20)[0], ref.A(x))


def test_per_sample_maps_and_masks_match_a_loop():
    op = make_operator("multicoil_mri_batched", dtype=torch.float64)
    assert op.batch_shape == (2,) and op.domain_shape == (12, 10) and op.range_shape == (3, 12, 10)
    x, y = op.randn_domain(2), op.randn_range(2)
    ax, ahy, anx = op.A(x), op.A_adjoint(y), op.A_normal(x)
    for b in range(2):
        single = MultiCoilMRI(op.coil_maps[b], op.mask[b])
        torch.testing.assert_close(ax[b], single.A(x[b]))
        torch.testing.assert_close(ahy[b], single.A_adjoint(y[b]))
        torch.testing.assert_close(anx[b], single.A_normal(x[b]))
    # extra leading dims broadcast against batch_shape
    assert op.A(op.randn_domain(3, 2)).shape == (3, 2, 3, 12, 10)


def test_dtype_follows_the_input(device):
    maps = _crandn(3, 8, 6, dtype=torch.complex64, seed=14)
    op = MultiCoilMRI(maps, torch.ones(6)).to(device)
    x64 = _crandn(8, 6, seed=15).to(device)
    out = op.A(x64)
    assert out.dtype == torch.complex128 and out.device.type == torch.device(device).type
    torch.testing.assert_close(out, MultiCoilMRI(maps.to(torch.complex128).to(device),
                                                 torch.ones(6, dtype=torch.float64)).A(x64))
    assert op.A(x64.real.float()).dtype == torch.complex64  # real input promoted
    assert op.double().A_adjoint(op.A(x64)).dtype == torch.complex128
    assert op.A_normal(x64.to(torch.complex64)).dtype == torch.complex64


def test_adjoint_normal_and_autograd(device):
    for name in ("multicoil_mri", "multicoil_mri_odd", "singlecoil_mri"):
        op = make_operator(name, device=device, dtype=torch.float64)
        x, y = op.randn_domain(2), op.randn_range(2)
        lhs = (op.A(x).conj() * y).sum()
        rhs = (x.conj() * op.A_adjoint(y)).sum()
        assert abs(lhs - rhs) < 1e-10 * abs(lhs)
        torch.testing.assert_close(op.A_normal(x), op.A_adjoint(op.A(x)))
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(op.A(x), x, y)
        torch.testing.assert_close(grad, op.A_adjoint(y))


def test_gradient_with_respect_to_coil_maps():
    maps = _crandn(3, 8, 6, seed=16).requires_grad_(True)
    op = MultiCoilMRI(maps, torch.ones(8, 6, dtype=torch.float64))
    x = _crandn(8, 6, seed=17)
    for f in (op.A, op.A_normal, lambda v: op.A_adjoint(op.A(v))):
        (g,) = torch.autograd.grad(f(x).abs().square().sum(), maps)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda s: MultiCoilMRI(s, torch.ones(6, dtype=torch.float64))
                                    .A_normal(x), (maps,), fast_mode=True)


def test_registered_factories():
    for name in ("multicoil_mri", "multicoil_mri_batched", "multicoil_mri_odd",
                 "singlecoil_mri"):
        assert name in OPERATOR_REGISTRY
        op32 = make_operator(name)
        assert op32.A(op32.randn_domain()).dtype == torch.complex64
        op64 = make_operator(name, dtype=torch.float64)
        assert op64.A(op64.randn_domain()).dtype == torch.complex128
        assert op64.mask.dtype == torch.float64


# -- validation ----------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    maps = _crandn(3, 8, 6, seed=18)
    op = MultiCoilMRI(maps, torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'x'.*\(\.\.\., 8, 6\)"):
        op.A(torch.zeros(6, 8, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"'x'"):
        op.A_normal(torch.zeros(8, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"'y'.*\(\.\.\., 3, 8, 6\)"):
        op.A_adjoint(torch.zeros(2, 8, 6, dtype=torch.complex128))
    with pytest.raises(ValueError, match="'mask'"):
        MultiCoilMRI(maps, torch.ones(5))
    with pytest.raises(ValueError, match="'mask'"):
        MultiCoilMRI(maps, torch.ones(3, 8, 6))  # coil dim must be 1
    with pytest.raises(ValueError, match="'mask'"):
        MultiCoilMRI(maps, torch.ones(6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="'mask'"):
        MultiCoilMRI(maps[None].expand(2, 3, 8, 6), torch.ones(3, 1, 8, 6))
    with pytest.raises(ValueError, match="'coil_maps'"):
        MultiCoilMRI(maps.real, torch.ones(6))
    with pytest.raises(ValueError, match="'coil_maps'"):
        MultiCoilMRI(maps[0], torch.ones(6))
    with pytest.raises(ValueError, match="'image_size'"):
        SingleCoilMRI(torch.ones(1, 6))
    with pytest.raises(ValueError, match="'mask'"):
        SingleCoilMRI(torch.ones(4, 6), image_size=(8, 6))
    with pytest.raises(ValueError, match="'x'"):
        SingleCoilMRI(torch.ones(8, 6)).A(torch.zeros(8, 5))
