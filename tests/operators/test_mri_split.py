"""The split-FFT path of column masks (``FEDRECON_MRI_SPLIT``) against the full path.

The split path is opt-in (``on``; measured slower than the full path on an H200 and on the
CPU). The reference is always the full path (``off``, the default) on the same device.
"""

from __future__ import annotations

import pytest
import torch
from fedrecon.operators import MultiCoilMRI, SingleCoilMRI, mri

CDTYPES = [torch.complex64, torch.complex128]
SHAPES = [(16, 20), (15, 12), (9, 7)]  # even/even (checkerboard path), odd/even, odd/odd
MASKS = ["W", "batched", "HW-equal-rows"]


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.complex64 else 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _crandn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=_gen(seed))


def _columns(w: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(w, generator=_gen(seed))[:max(1, n)]


def _column_mask(kind: str, h: int, w: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A weighted mask that samples whole columns, at most 2/5 of them (under the threshold)."""
    rdtype = torch.float32 if dtype == torch.complex64 else torch.float64
    weights = 0.5 + torch.rand(w, dtype=rdtype, generator=_gen(seed + 100))
    if kind == "batched":  # (B, 1, 1, W), different columns per sample
        mask = torch.zeros(2, 1, 1, w, dtype=rdtype)
        for b in range(2):
            cols = _columns(w, w // 5, seed + b)
            mask[b, ..., cols] = weights[cols]
        assert not torch.equal(mask[0], mask[1])
        return mask
    mask = torch.zeros(w, dtype=rdtype)
    cols = _columns(w, w // 4, seed)
    mask[cols] = weights[cols]
    return mask.expand(h, w).clone() if kind == "HW-equal-rows" else mask


@pytest.fixture
def split_on(device, monkeypatch):
    """``split_on()`` selects the split path, ``split_on.off()`` the full path;
    ``split_on.calls`` counts the split path's runs."""
    split = mri._CartesianMRI._split

    def counted(self, *args, **kwargs):
        switch.calls += 1
        return split(self, *args, **kwargs)

    monkeypatch.setattr(mri._CartesianMRI, "_split", counted)

    class Switch:
        calls = 0

        def __call__(self) -> None:
            monkeypatch.setenv(mri.SPLIT_ENV_VAR, "on")

        @staticmethod
        def off() -> None:
            monkeypatch.setenv(mri.SPLIT_ENV_VAR, "off")

    switch = Switch()
    return switch


def _both_paths(op, split_on, device, fns):
    """``[fn()]`` on the full path, then on the split path (asserting it is taken)."""
    split_on.off()
    assert op.kspace_path(device) == "full"
    ref = [fn() for fn in fns]
    assert split_on.calls == 0
    split_on()
    assert op.kspace_path(device) == "split"
    out = [fn() for fn in fns]
    assert split_on.calls == len(fns)
    return ref, out


# -- (a)-(d): the split path equals the full path ------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", CDTYPES)
def test_multicoil_split_matches_full(kind, shape, dtype, device, split_on):
    h, w = shape
    maps = _crandn(2, 4, h, w, dtype=dtype, seed=1)
    op = MultiCoilMRI(maps, _column_mask(kind, h, w, dtype)).to(device)
    x = _crandn(2, h, w, dtype=dtype, seed=2).to(device)
    y = _crandn(2, 4, h, w, dtype=dtype, seed=3).to(device)
    ref, out = _both_paths(op, split_on, device,
                           [lambda: op.A(x), lambda: op.A_adjoint(y), lambda: op.A_normal(x)])
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype
        assert _rel(a, b) < _tol(dtype)
    # unsampled columns are exactly zero in A x
    assert (out[0][..., op.mask.reshape(-1, w).abs().sum(0) == 0] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", CDTYPES)
def test_singlecoil_split_matches_full(kind, shape, dtype, device, split_on):
    h, w = shape
    mask = _column_mask(kind, h, w, dtype)
    if kind == "batched":
        mask = mask[:, 0]  # (B, 1, W)
    op = SingleCoilMRI(mask, image_size=shape).to(device)
    x = _crandn(2, h, w, dtype=dtype, seed=4).to(device)
    ref, out = _both_paths(op, split_on, device,
                           [lambda: op.A(x), lambda: op.A_adjoint(x), lambda: op.A_normal(x)])
    for a, b in zip(out, ref):
        assert _rel(a, b) < _tol(dtype)


def test_real_input_and_broadcast_batch(device, split_on):
    """A real image is promoted; a per-sample mask broadcasts over shared coil maps."""
    maps = _crandn(3, 16, 20, dtype=torch.complex128, seed=5)
    op = MultiCoilMRI(maps, _column_mask("batched", 16, 20, torch.complex128)).to(device)
    x = torch.randn(16, 20, dtype=torch.float64, generator=_gen(6)).to(device)
    ref, out = _both_paths(op, split_on, device, [lambda: op.A(x), lambda: op.A_normal(x)])
    assert out[0].shape == (2, 3, 16, 20)
    for a, b in zip(out, ref):
        assert _rel(a, b) < 1e-12


# -- (e), (f): fallbacks ---------------------------------------------------------------------
def _assert_full_path(op, x, device, split_on):
    """With the split path switched on, ``op`` still takes the full one: same ``A x`` bit for
    bit, no split call. Returns ``A x``."""
    split_on.off()
    ref = op.A(x)
    split_on()
    assert op.kspace_path(device) == "full"
    torch.testing.assert_close(op.A(x), ref, rtol=0, atol=0)
    assert split_on.calls == 0
    return ref


@pytest.mark.parametrize("dtype", CDTYPES)
def test_2d_random_mask_falls_back(dtype, device, split_on):
    h, w = 16, 20
    rdtype = torch.float32 if dtype == torch.complex64 else torch.float64
    mask = (torch.rand(h, w, generator=_gen(7)) < 0.2).to(rdtype)
    op = MultiCoilMRI(_crandn(3, h, w, dtype=dtype, seed=8), mask).to(device)
    assert mri._column_support(op.mask, w) is None  # not column-structured
    _assert_full_path(op, _crandn(h, w, dtype=dtype, seed=9).to(device), device, split_on)


def test_mask_above_threshold_falls_back(device, split_on, monkeypatch):
    h, w = 16, 20
    mask = torch.zeros(w, dtype=torch.float64)
    mask[_columns(w, 14, 10)] = 1.0  # 70% of the columns
    op = MultiCoilMRI(_crandn(3, h, w, dtype=torch.complex128, seed=11), mask).to(device)
    assert mri._column_support(op.mask, w).numel() == 14
    x = _crandn(h, w, dtype=torch.complex128, seed=12).to(device)
    ref = _assert_full_path(op, x, device, split_on)
    monkeypatch.setattr(mri, "SPLIT_MAX_FRACTION", 0.8)  # read at call time
    assert op.kspace_path(device) == "split"
    assert _rel(op.A(x), ref) < 1e-12


def test_switch_modes_and_learned_mask(monkeypatch):
    op = MultiCoilMRI(_crandn(2, 8, 6, dtype=torch.complex128, seed=13),
                      torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.float64))
    for env, mode in (("", "off"), ("auto", "off"), ("ON", "on"), ("1", "on"), ("off", "off"),
                      ("0", "off")):
        monkeypatch.setenv(mri.SPLIT_ENV_VAR, env)
        assert mri.split_mode() == mode
    monkeypatch.delenv(mri.SPLIT_ENV_VAR)
    assert op.kspace_path("cpu") == op.kspace_path("cuda") == "full"  # the default
    monkeypatch.setenv(mri.SPLIT_ENV_VAR, "on")
    assert op.kspace_path() == "split"
    op.mask.requires_grad_(True)  # a learned mask keeps the full path
    assert op.kspace_path() == "full"


# -- (g), (h): autograd and adjointness on the split path ------------------------------------
@pytest.mark.parametrize("shape", [(16, 20), (15, 12)])
def test_gradients_match_full_path(shape, device, split_on):
    h, w = shape
    dtype = torch.complex128
    maps = _crandn(2, 3, h, w, dtype=dtype, seed=14).to(device)
    op = MultiCoilMRI(maps, _column_mask("batched", h, w, dtype)).to(device)
    x = _crandn(2, h, w, dtype=dtype, seed=15).to(device)
    y = _crandn(2, 3, h, w, dtype=dtype, seed=16).to(device)

    def grads():
        xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        mg = op.coil_maps.clone().requires_grad_(True)
        opg = MultiCoilMRI(mg, op.mask)
        loss = (opg.A(xg).conj() * y).real.sum() + opg.A_normal(xg).abs().square().sum()
        loss = loss + (opg.A_adjoint(yg).conj() * x).imag.sum()
        return torch.autograd.grad(loss, (xg, yg, mg))

    split_on.off()
    ref = grads()
    split_on()
    assert op.kspace_path(device) == "split"
    for a, b in zip(grads(), ref):
        assert _rel(a, b) < 1e-12
    # the gradient of <A x, y> is A^H y
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(op.A(xg), xg, y)
    assert _rel(g, op.A_adjoint(y)) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("single", [False, True])
def test_adjoint_dot_product_on_split_path(shape, single, device, split_on):
    h, w = shape
    dtype = torch.complex128
    mask = _column_mask("batched", h, w, dtype)
    if single:
        op = SingleCoilMRI(mask[:, 0], image_size=shape).to(device)
    else:
        op = MultiCoilMRI(_crandn(2, 3, h, w, dtype=dtype, seed=17), mask).to(device)
    split_on()
    assert op.kspace_path(device) == "split"
    x = _crandn(2, *op.domain_shape, dtype=dtype, seed=18).to(device)
    y = _crandn(2, *op.range_shape, dtype=dtype, seed=19).to(device)
    lhs = (op.A(x).conj() * y).sum()
    rhs = (x.conj() * op.A_adjoint(y)).sum()
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    assert _rel(op.A_normal(x), op.A_adjoint(op.A(x))) < 1e-12


# -- (i): in-place mask changes are noticed --------------------------------------------------
def test_inplace_mask_change_is_noticed(device, split_on):
    h, w = 16, 20
    dtype = torch.complex128
    maps = _crandn(3, h, w, dtype=dtype, seed=20)
    op = MultiCoilMRI(maps, _column_mask("HW-equal-rows", h, w, dtype, seed=0)).to(device)
    x = _crandn(h, w, dtype=dtype, seed=21).to(device)
    y = _crandn(3, h, w, dtype=dtype, seed=22).to(device)
    split_on()
    op.A(x), op.A_adjoint(y), op.A_normal(x)  # detection and gathered masks memoised
    with torch.no_grad():  # other columns, same storage
        op.mask.copy_(_column_mask("HW-equal-rows", h, w, dtype, seed=5).to(device))
    fresh = MultiCoilMRI(maps.to(device), op.mask.clone())
    assert op.kspace_path(device) == "split"
    for a, b in ((op.A(x), fresh.A(x)), (op.A_adjoint(y), fresh.A_adjoint(y)),
                 (op.A_normal(x), fresh.A_normal(x))):
        assert _rel(a, b) < 1e-12
    split_on.off()
    ref = op.A(x)
    split_on()
    assert _rel(op.A(x), ref) < 1e-12
    with torch.no_grad():  # rows no longer equal: the full path again
        op.mask[..., 3, :] = 1.0
    assert op.kspace_path(device) == "full"
    split_on.off()
    ref = op.A(x)
    split_on()
    torch.testing.assert_close(op.A(x), ref, rtol=0, atol=0)
