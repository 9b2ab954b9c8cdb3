"""The fused SENSE kernels (operators/_sense_kernels.py) and the CUDA-side folding of the FFT's
scale into the mask, against a complex128 reference written from the definitions (``A = M
fft2c(S x)``), with and without the split path, for per-sample and shared coil maps, and
through autograd: the Triton kernels through Triton's interpreter on the CPU, the CPU
(numba) kernels as they run. The Triton kernels run compiled on a GPU in test_mri.py,
test_mri_split.py and test_contract.py (``-m cuda``)."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
from fedrecon.operators import _cpu_spmm

SCRIPT = textwrap.dedent('''
    import os, torch
    from fedrecon.operators import MultiCoilMRI, SingleCoilMRI
    from fedrecon.operators import mri as M
    from fedrecon.operators import _sense_kernels as TM

    D = (-2, -1)
    c64 = torch.complex64

    def fft2c(z):
        return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=D), norm="ortho"), dim=D)

    def ifft2c(k):
        return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=D), norm="ortho"), dim=D)

    def rel(a, b):
        return float((a.to(b.dtype) - b).abs().norm() / b.abs().norm())

    triton_path = os.environ.get("TRITON_INTERPRET") == "1"  # else the numba kernels
    calls = {}
    for name in ("_launch_product", "_launch_combine", "_launch_scatter", "cpu_combine",
                 "cpu_product", "cpu_mask", "cpu_gather_columns", "cpu_scatter_columns"):
        def counted(*a, _f=getattr(TM, name), _n=name, **k):
            out = _f(*a, **k)
            calls[_n] = calls.get(_n, 0) + (out is not None)
            return out
        setattr(TM, name, counted)

    gen = torch.Generator().manual_seed(0)
    H, W, C, B = 16, 20, 3, 2
    fold_orig, no_graph_orig = M._CartesianMRI._fold, M._no_graph
    for fold in (False, True):
        # the CUDA rule (unnormalised FFTs, scale in the mask) forced on the CPU
        M._CartesianMRI._fold = (lambda self, t: self._fast) if fold else fold_orig
        # as on CUDA: no CPU scratch-buffer path (it would run before the fused kernels)
        M._no_graph = (lambda *t: False) if fold else no_graph_orig
        for split in ("off", "auto", "on"):
            os.environ["FEDRECON_MRI_SPLIT"] = split
            for lead in ((B,), ()):
                maps = torch.randn(*lead, C, H, W, dtype=torch.complex128, generator=gen)
                mask = (torch.rand(W, generator=gen) < 0.3).double()
                mask[W // 2] = 1.0
                mask = mask * (0.5 + torch.rand(W, generator=gen, dtype=torch.float64))
                # the operator holds complex64 maps and a float32 mask: the reference uses them
                maps, mask = maps.to(c64).to(torch.complex128), mask.float().double()
                op = MultiCoilMRI(maps.to(c64), mask.float())
                assert op.kspace_path() == ("split" if split == "on" else "full")
                x = torch.randn(B, H, W, dtype=torch.complex128, generator=gen)
                y = torch.randn(B, C, H, W, dtype=torch.complex128, generator=gen)
                m = mask.view(W)
                a_ref = m * fft2c(maps * x[:, None])
                ah_ref = (maps.conj() * ifft2c(m * y)).sum(-3)
                an_ref = (maps.conj() * ifft2c(m * m * fft2c(maps * x[:, None]))).sum(-3)
                before = dict(calls)
                assert rel(op.A(x.to(c64)), a_ref) < 1e-5, (fold, split, lead)
                assert rel(op.A_adjoint(y.to(c64)), ah_ref) < 1e-5, (fold, split, lead)
                assert rel(op.A_normal(x.to(c64)), an_ref) < 1e-5, (fold, split, lead)
                n = {k: calls.get(k, 0) - before.get(k, 0) for k in calls}
                scratch = not fold  # the CPU's scratch-buffer paths (no autograd graph)
                # A and A^H on the sampled columns only (at most half of them are sampled here)
                columns = scratch and split != "off" and int((mask != 0).sum()) <= W // 2
                if triton_path and not scratch:
                    assert n["_launch_product"] == n["_launch_combine"] == 2, n
                # the torch split path (A and A^H) where the CPU's sampled-columns paths do not run
                scatters = 0 if columns else 2 if split == "on" and triton_path else 0
                assert n.get("_launch_scatter", 0) == scatters, n
                # the numba passes around scipy's FFT in A^H and A^H A
                assert n.get("cpu_combine", 0) == (2 if scratch else 0), n
                assert n.get("cpu_mask", 0) == ((1 if columns else 2) if scratch else 0), n
                # A^H A, and A on the sampled columns
                assert n.get("cpu_product", 0) == ((1 + columns) if scratch else 0), n
                # A^H and A on the sampled columns: one gather and one scatter each
                assert n.get("cpu_gather_columns", 0) == n.get("cpu_scatter_columns", 0) == 2 * columns, n
                # autograd: the gradient of Re<A x, y> in x is A^H y, of Re<A^H y, x> in y is A x
                xg = x.to(c64).requires_grad_()
                (op.A(xg) * y.to(c64).conj()).real.sum().backward()
                assert rel(xg.grad, ah_ref) < 1e-5
                yg = y.to(c64).requires_grad_()
                (op.A_adjoint(yg) * x.to(c64).conj()).real.sum().backward()
                assert rel(yg.grad, a_ref) < 1e-5
                # complex128: torch's path under Triton, numba's on the CPU
                assert rel(op.A(x), a_ref) < 1e-12 and rel(op.A_adjoint(y), ah_ref) < 1e-12
                # single coil: the scatter (split) and the folded scale
                sc = SingleCoilMRI(mask.float(), (H, W))
                assert rel(sc.A(x.to(c64)), m * fft2c(x)) < 1e-5
                assert rel(sc.A_adjoint(x.to(c64)), ifft2c(m * x)) < 1e-5
                assert rel(sc.A_normal(x.to(c64)), ifft2c(m * m * fft2c(x))) < 1e-5
    # maps that need a gradient: torch's path, same numbers
    M._CartesianMRI._fold, M._no_graph = fold_orig, no_graph_orig
    maps = torch.randn(B, C, H, W, dtype=c64, generator=gen).requires_grad_()
    op = MultiCoilMRI(maps, torch.ones(W))
    before = dict(calls)
    x = torch.randn(B, H, W, dtype=c64, generator=gen)
    op.A(x).abs().sum().backward()
    assert calls == before and maps.grad is not None
    print("ok")
''')


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_fused_sense_kernels_in_the_interpreter(run_interpreted):
    run_interpreted(SCRIPT)


@pytest.mark.skipif(not _cpu_spmm.available(), reason="numba is not installed")
def test_fused_sense_kernels_on_the_cpu(run_interpreted):
    run_interpreted(SCRIPT, interpret=False)


def test_switch_off_keeps_torch_passes(monkeypatch):
    import torch
    from fedrecon.operators import MultiCoilMRI, _sense_kernels

    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 3, 8, 10, dtype=torch.complex64, generator=gen)
    op = MultiCoilMRI(maps, torch.ones(10))
    y = torch.randn(2, 3, 8, 10, dtype=torch.complex64, generator=gen)
    assert (_sense_kernels.cpu_combine(maps, y, check=True) is not None) == _cpu_spmm.available()
    fused = op.A_adjoint(y)
    monkeypatch.setenv(_sense_kernels.ENV_VAR, "off")
    assert _sense_kernels.cpu_combine(maps, y, check=True) is None
    torch.testing.assert_close(op.A_adjoint(y), fused, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _cpu_spmm.available(), reason="numba is not installed")
def test_cpu_passes_broadcast_against_torch():
    """The CPU product with batched maps and one shared image (and the reverse), the CPU mask
    with a per-sample and a shared mask, in place and into a fresh tensor."""
    import torch
    from fedrecon.operators import _sense_kernels
    from fedrecon.operators.mri import _checkerboard

    gen = torch.Generator().manual_seed(2)
    chk = _checkerboard(8, 10, 1.0, torch.float64, torch.device("cpu"))
    for maps_lead, x_lead in (((2,), ()), ((), (2,)), ((2,), (2,))):
        maps = torch.randn(*maps_lead, 3, 8, 10, dtype=torch.complex128, generator=gen)
        x = torch.randn(*x_lead, 8, 10, dtype=torch.complex128, generator=gen)
        out = torch.empty(2, 3, 8, 10, dtype=torch.complex128)
        assert _sense_kernels.cpu_product(maps, x, True, out) is out
        torch.testing.assert_close(out, maps * (x * chk).unsqueeze(-3), rtol=1e-13, atol=1e-13)
    y = torch.randn(2, 3, 8, 10, dtype=torch.complex64, generator=gen)
    for m in (torch.rand(2, 1, 1, 10, generator=gen), torch.rand(1, 8, 10, generator=gen)):
        m = m.to(torch.complex64)
        torch.testing.assert_close(_sense_kernels.cpu_mask(y, m), y * m)
        inplace = y.clone()
        assert _sense_kernels.cpu_mask(inplace, m, out=inplace) is inplace
        torch.testing.assert_close(inplace, y * m)
    # a mask that would add dims, or maps of another batch: not taken
    assert _sense_kernels.cpu_mask(y[0], torch.rand(2, 1, 8, 10).to(torch.complex64)) is None
    assert _sense_kernels.cpu_product(torch.randn(3, 3, 8, 10, dtype=torch.complex64), y[:, 0],
                                      True, torch.empty(2, 3, 8, 10, dtype=torch.complex64)) is None
