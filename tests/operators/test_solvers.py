"""conjugate_gradient, cg_sense and tv_reconstruction against dense solves and sigpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrecon.operators import (
    Diagonal,
    LinearOperator,
    MatrixOperator,
    cg_sense,
    conjugate_gradient,
    total_variation,
    tv_reconstruction,
)
from fedrecon.operators.base import Identity


def _hpd(batch: int, n: int, dtype: torch.dtype, seed: int = 0, cond_shift: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=gen, dtype=dtype)
    return a.mH @ a / n + cond_shift * torch.eye(n, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_cg_matches_dense_solve(dtype: torch.dtype, device: torch.device) -> None:
    n = 12
    mat = _hpd(3, n, dtype).to(device)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(3, n, generator=gen, dtype=dtype).to(device)
    op = MatrixOperator(mat)
    x = conjugate_gradient(op.A, b, n_iter=60)
    ref = torch.linalg.solve(mat, b)
    assert float((x - ref).abs().max()) < 1e-8
    # damping, per sample
    lam = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64, device=device)
    x = conjugate_gradient(op.A, b, n_iter=60, damping=lam)
    ref = torch.linalg.solve(mat + lam[:, None, None] * torch.eye(n, device=device), b)
    assert float((x - ref).abs().max()) < 1e-8


def test_cg_multi_dim_domain_and_x0() -> None:
    # domain (4, 5) solved with a diagonal normal operator; x0 already near the answer
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(2, 4, 5, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: w * v, b, x0=b / w + 1e-3, n_iter=30, n_domain_dims=2)
    torch.testing.assert_close(x, b / w, rtol=1e-10, atol=1e-10)


def test_cg_converged_sample_gives_no_nan() -> None:
    mat = _hpd(3, 8, torch.float64)
    b = torch.randn(3, 8, dtype=torch.float64)
    b[0] = 0.0  # converged before the first iteration
    b[1] = mat[1, :, 0] * 3.0  # a 1-D Krylov space: converged after one iteration
    b = b.requires_grad_(True)
    lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    op = MatrixOperator(mat)
    x = conjugate_gradient(op.A, b, n_iter=40, damping=lam)
    assert torch.isfinite(x).all()
    assert float(x[0].detach().abs().max()) == 0.0
    ref = torch.linalg.solve(mat + 0.1 * torch.eye(8, dtype=torch.float64), b.detach())
    torch.testing.assert_close(x.detach(), ref, rtol=1e-9, atol=1e-9)
    gb, glam = torch.autograd.grad(x.square().sum(), (b, lam))
    assert torch.isfinite(gb).all() and torch.isfinite(glam).all()


def test_cg_tol_stops_early() -> None:
    calls = []
    w = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)

    def normal(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return w * v

    b = torch.ones(2, 3, dtype=torch.float64)
    x = conjugate_gradient(normal, b, n_iter=50, tol=1e-10)
    torch.testing.assert_close(x, b / w)
    assert len(calls) == 1  # a multiple of the identity: one step per sample suffices


def test_cg_gradcheck_rhs_damping_x0() -> None:
    mat = _hpd(2, 4, torch.float64, cond_shift=0.5)
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, 1.0], dtype=torch.float64, requires_grad=True)
    op = MatrixOperator(mat)

    def f(b, x0, lam):
        return conjugate_gradient(op.A, b, x0=x0, n_iter=3, damping=lam)

    assert torch.autograd.gradcheck(f, (b, x0, lam))


def test_cg_gradient_matches_implicit_gradient() -> None:
    # x = (M + lam I)^-1 b:  dL/db = (M + lam I)^-1 g,  dL/dlam = -<(M + lam I)^-1 g, x>
    mat = _hpd(2, 6, torch.complex128)
    b = torch.randn(2, 6, dtype=torch.complex128, requires_grad=True)
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    x = conjugate_gradient(MatrixOperator(mat).A, b, n_iter=40, damping=lam)
    target = torch.randn(2, 6, dtype=torch.complex128)
    loss = (x - target).abs().square().sum()
    gb, glam = torch.autograd.grad(loss, (b, lam))
    system = mat + 0.2 * torch.eye(6)
    xs = torch.linalg.solve(system, b.detach())
    g = 2 * (xs - target)  # PyTorch's conjugate Wirtinger convention: dL/dconj(x) * 2
    gb_ref = torch.linalg.solve(system, g)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-7, atol=1e-8)
    glam_ref = -(gb_ref.conj() * xs).real.sum()
    torch.testing.assert_close(glam, glam_ref, rtol=1e-7, atol=1e-8)


def test_cg_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'n_domain_dims'"):
        conjugate_gradient(lambda v: v, torch.ones(2, 3), n_domain_dims=3)
    with pytest.raises(ValueError, match="'x0'"):
        conjugate_gradient(lambda v: v, torch.ones(2, 3), x0=torch.ones(3, 3))


def test_cg_sense_matches_dense_normal_equations() -> None:
    # multi-coil-like: A = stack_c (M F S_c) as one dense complex matrix
    gen = torch.Generator().manual_seed(0)
    n, coils = 16, 3
    f = torch.fft.fft(torch.eye(n, dtype=torch.complex128), norm="ortho")
    maps = torch.randn(coils, n, generator=gen, dtype=torch.complex128)
    mask = (torch.rand(n, generator=gen) > 0.5).to(torch.float64)
    a = torch.cat([mask[:, None] * f @ torch.diag(maps[c]) for c in range(coils)], dim=0)
    op = MatrixOperator(a)
    y = torch.randn(2, coils * n, generator=gen, dtype=torch.complex128)
    lam = 0.05
    x = cg_sense(op, y, lam=lam, n_iter=100)
    ref = torch.linalg.solve(a.mH @ a + lam * torch.eye(n), (a.mH @ y.T)).T
    assert float((x - ref).abs().max() / ref.abs().max()) < 1e-8


def test_cg_sense_matches_sigpy_sense_recon() -> None:
    sp_mri_app = pytest.importorskip("sigpy.mri.app")
    try:
        from fedrecon.operators import MultiCoilMRI
    except ImportError:
        pytest.skip("MultiCoilMRI not available")
    rng = np.random.default_rng(0)
    coils, h, w = 4, 16, 12
    mps = rng.standard_normal((coils, h, w)) + 1j * rng.standard_normal((coils, h, w))
    mask = (rng.random((h, w)) < 0.4).astype(np.float64)
    y = (rng.standard_normal((coils, h, w)) + 1j * rng.standard_normal((coils, h, w))) * mask
    lam = 0.01
    ref = sp_mri_app.SenseRecon(y, mps, lamda=lam, weights=mask, max_iter=40,
                                show_pbar=False).run()
    op = MultiCoilMRI(torch.from_numpy(mps), torch.from_numpy(mask))
    x = cg_sense(op, torch.from_numpy(y), lam=lam, n_iter=40).numpy()
    assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-3


class _MaskedFFT(LinearOperator):
    """Single-coil Cartesian MRI for this test: ``M * fft2c(x)``, sigpy's centered ortho FFT."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.domain_shape = self.range_shape = tuple(mask.shape)
        self.domain_complex = self.range_complex = True

    def A(self, x):  # noqa: N802
        k = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=(-2, -1)),
                                              dim=(-2, -1), norm="ortho"), dim=(-2, -1))
        return self.mask * k

    def A_adjoint(self, y):  # noqa: N802
        y = self.mask * y
        return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(y, dim=(-2, -1)),
                                                  dim=(-2, -1), norm="ortho"), dim=(-2, -1))


def _piecewise_constant(h: int, w: int) -> torch.Tensor:
    img = torch.zeros(h, w, dtype=torch.float64)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
    img[h // 2 :, : w // 3] = 0.5
    return img


def _objective(op, x, y, lam, isotropic=False) -> float:
    res = op.A(x) - y
    return float(0.5 * res.abs().square().sum() + lam * total_variation(x, isotropic).sum())


def test_tv_objective_matches_sigpy_total_variation_recon() -> None:
    sp_mri_app = pytest.importorskip("sigpy.mri.app")
    h, w = 16, 16
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(h, w, generator=gen) < 0.5).to(torch.float64)
    mask[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2] = 1.0
    op = _MaskedFFT(mask)
    truth = _piecewise_constant(h, w).to(torch.complex128)
    noise = 0.05 * torch.randn(h, w, generator=gen, dtype=torch.complex128)
    y = op.A(truth) + mask * noise
    lam = 0.02
    ref = sp_mri_app.TotalVariationRecon(
        y.numpy(), np.ones((1, h, w), dtype=np.complex128), lamda=lam, weights=mask.numpy(),
        max_iter=1000, show_pbar=False).run()
    x, hist = tv_reconstruction(op, y, lam, n_iter=400, return_history=True)
    ours = _objective(op, x, y, lam)
    theirs = _objective(op, torch.from_numpy(ref), y, lam)
    assert ours <= theirs * (1 + 1e-4)
    assert hist.shape == (400,)
    assert float(hist[-1]) == pytest.approx(ours, rel=1e-10)
    # our objective is sigpy's: 0.5||sqrt(W) F x - sqrt(W) y||^2 + lam ||G x||_1
    sp = pytest.importorskip("sigpy")
    xn = x.numpy()
    res = mask.numpy() * sp.fft(xn, axes=(-2, -1)) - y.numpy()
    sigpy_obj = 0.5 * np.sum(np.abs(res) ** 2) + lam * np.sum(
        np.abs(sp.linop.FiniteDifference(xn.shape)(xn)))
    assert sigpy_obj == pytest.approx(ours, rel=1e-12)


def test_tv_batched_operator_and_isotropic() -> None:
    # per-sample masks: each sample solves its own problem
    gen = torch.Generator().manual_seed(1)
    h, w = 12, 12
    masks = (torch.rand(2, h, w, generator=gen) < 0.6).to(torch.float64)
    op = Diagonal(masks, batch_dims=1)  # denoising-inpainting, real images
    truth = _piecewise_constant(h, w)
    y = masks * (truth + 0.1 * torch.randn(2, h, w, generator=gen, dtype=torch.float64))
    for iso in (False, True):
        xb = tv_reconstruction(op, y, 0.05, n_iter=600, isotropic=iso)
        x1 = tv_reconstruction(Diagonal(masks[1]), y[1], 0.05, n_iter=600, isotropic=iso)
        assert xb.shape == (2, h, w) and not xb.is_complex()
        obj_b = _objective(Diagonal(masks[1]), xb[1], y[1], 0.05, iso)
        obj_1 = _objective(Diagonal(masks[1]), x1, y[1], 0.05, iso)
        assert obj_b == pytest.approx(obj_1, rel=1e-3)


def test_tv_denoising_improves_psnr(device: torch.device) -> None:
    h, w = 32, 32
    gen = torch.Generator().manual_seed(2)
    truth = _piecewise_constant(h, w)
    noisy = truth + 0.15 * torch.randn(h, w, generator=gen, dtype=torch.float64)
    op = Identity((h, w))
    x = tv_reconstruction(op, noisy.to(device), lam=0.1, n_iter=200)

    def psnr(a: torch.Tensor) -> float:
        return float(10 * torch.log10(1.0 / (a.cpu() - truth).square().mean()))

    assert x.device.type == device.type
    assert psnr(x) > psnr(noisy) + 5.0


def test_tv_lam_zero_is_least_squares() -> None:
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x = tv_reconstruction(Identity((6, 5)), y, lam=0.0, n_iter=300)
    torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'lam'"):
        tv_reconstruction(Identity((6, 5)), y, lam=-1.0)
    with pytest.raises(ValueError, match="'op'"):
        tv_reconstruction(MatrixOperator(torch.eye(3)), torch.ones(3), lam=0.1)


def test_cg_modl_style_batched_damping_on_registry_operator() -> None:
    # a batched MRI operator (or a dense one) with a learnable per-sample damping (B,)
    from fedrecon.operators import OPERATOR_REGISTRY, make_operator

    name = "multicoil_mri_batched" if "multicoil_mri_batched" in OPERATOR_REGISTRY else "matrix"
    op = make_operator(name, dtype=torch.float64, **({} if "mri" in name else {"batch": (2,)}))
    (batch,) = op.batch_shape
    rhs = op.randn_domain(batch, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    lam = torch.tensor([0.5, 2.0, 1.0, 3.0][:batch], dtype=torch.float64, requires_grad=True)
    nd = len(op.domain_shape)
    x = conjugate_gradient(op.A_normal, rhs, n_iter=8, damping=lam, n_domain_dims=nd)
    assert x.shape == rhs.shape and x.dtype == rhs.dtype
    g_rhs, g_lam = torch.autograd.grad(x.abs().square().sum(), (rhs, lam))
    assert torch.isfinite(g_rhs).all() and torch.isfinite(g_lam).all()
    assert g_lam.shape == (batch,) and bool((g_lam < 0).all())  # more damping, smaller x
    # sample b with the scalar damping lam[b] gives the same iterates
    for b in range(batch):
        xb = conjugate_gradient(op.A_normal, rhs.detach(), n_iter=8, damping=float(lam[b].detach()),
                                n_domain_dims=nd)
        torch.testing.assert_close(x.detach()[b], xb[b], rtol=1e-10, atol=1e-10)
