"""The fused SENSE kernels (operators/_triton_mri.py) and the CUDA-side folding of the FFT's
scale into the mask, run on the CPU through Triton's interpreter, against a complex128
reference written from the definitions (``A = M fft2c(S x)``), with and without the split
path, for per-sample and shared coil maps, and through autograd. The same operators run
compiled on a GPU in test_mri_split.py / test_contract.py (``-m cuda``)."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton not installed")

SCRIPT = textwrap.dedent('''
    import os, torch
    from fedrecon.operators import MultiCoilMRI, SingleCoilMRI
    from fedrecon.operators import mri as M
    from fedrecon.operators import _triton_mri as TM

    D = (-2, -1)
    c64 = torch.complex64

    def fft2c(z):
        return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=D), norm="ortho"), dim=D)

    def ifft2c(k):
        return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=D), norm="ortho"), dim=D)

    def rel(a, b):
        return float((a.to(b.dtype) - b).abs().norm() / b.abs().norm())

    calls = {}
    for name in ("_launch_product", "_launch_combine", "_launch_scatter"):
        def counted(*a, _f=getattr(TM, name), _n=name):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a)
        setattr(TM, name, counted)

    gen = torch.Generator().manual_seed(0)
    H, W, C, B = 16, 20, 3, 2
    fold_orig, no_graph_orig = M._CartesianMRI._fold, M._no_graph
    for fold in (False, True):
        # the CUDA rule (unnormalised FFTs, scale in the mask) forced on the CPU
        M._CartesianMRI._fold = (lambda self, t: self._fast) if fold else fold_orig
        # as on CUDA: no CPU scratch-buffer path (it would run before the fused kernels)
        M._no_graph = (lambda *t: False) if fold else no_graph_orig
        for split in ("off", "on"):
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
                if fold or split == "on":  # (the CPU's scratch path takes the others)
                    assert n["_launch_product"] == n["_launch_combine"] == 2, n
                assert n.get("_launch_scatter", 0) == (3 if split == "on" else 0), n
                # autograd: the gradient of Re<A x, y> in x is A^H y, of Re<A^H y, x> in y is A x
                xg = x.to(c64).requires_grad_()
                (op.A(xg) * y.to(c64).conj()).real.sum().backward()
                assert rel(xg.grad, ah_ref) < 1e-5
                yg = y.to(c64).requires_grad_()
                (op.A_adjoint(yg) * x.to(c64).conj()).real.sum().backward()
                assert rel(yg.grad, a_ref) < 1e-5
                # complex128 and learned maps stay on torch's path
                assert rel(op.A(x), a_ref) < 1e-12
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


def test_fused_sense_kernels_in_the_interpreter(run_interpreted):
    run_interpreted(SCRIPT)
