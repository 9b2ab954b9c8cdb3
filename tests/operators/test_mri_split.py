"""The paths of column masks (``FEDRECON_MRI_SPLIT``) against the full path.

- ``A^H A`` with FFTs along ``W`` only (a mask whose rows are all the same commutes with
  the FFT along ``H``): ``auto`` (the default) and ``on``;
- ``A^H`` on the sampled columns with the CPU's numba passes (no autograd graph, even sizes):
  ``auto`` and ``on``;
- the torch split path of ``A`` and ``A^H`` (FFT along ``H`` over the sampled columns only;
  measured slower than the full path on an H200 and on the CPU): ``on`` only.

The reference is always the full path (``off``) on the same device.
"""

from __future__ import annotations

import pytest
import torch
from fedrecon.operators import MultiCoilMRI, SingleCoilMRI, _cpu_spmm, mri

CDTYPES = [torch.complex64, torch.complex128]
SHAPES = [(16, 20), (15, 12), (9, 7)]  # even/even (checkerboard path), odd/even, odd/odd
MASKS = ["W", "batched", "HW-equal-rows"]
MODES = ["auto", "on"]


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
def paths(monkeypatch):
    """``paths.mode(m)`` sets ``FEDRECON_MRI_SPLIT``; ``paths.taken()`` returns and clears
    the list of column-mask paths run since: ``"split"`` (torch's split path), ``"columns"``
    (the CPU's ``A`` or ``A^H`` on the sampled columns), ``"w_only"`` (``A^H A`` along ``W``)."""
    log: list[str] = []
    split, adjoint, forward, normal = (
        mri._CartesianMRI._split, mri.MultiCoilMRI._adjoint_columns,
        mri.MultiCoilMRI._forward_columns, mri._CartesianMRI._normal_mask)

    def counted_split(self, *args, **kwargs):
        log.append("split")
        return split(self, *args, **kwargs)

    def counted(fn):
        def run(self, *args, **kwargs):
            out = fn(self, *args, **kwargs)
            if out is not None:
                log.append("columns")
            return out
        return run

    def counted_normal(self, *args, **kwargs):
        out = normal(self, *args, **kwargs)
        if out[1]:
            log.append("w_only")
        return out

    monkeypatch.setattr(mri._CartesianMRI, "_split", counted_split)
    monkeypatch.setattr(mri.MultiCoilMRI, "_adjoint_columns", counted(adjoint))
    monkeypatch.setattr(mri.MultiCoilMRI, "_forward_columns", counted(forward))
    monkeypatch.setattr(mri._CartesianMRI, "_normal_mask", counted_normal)

    class Paths:
        @staticmethod
        def mode(value: str) -> None:
            monkeypatch.setenv(mri.SPLIT_ENV_VAR, value)

        @staticmethod
        def taken() -> list[str]:
            out = list(log)
            log.clear()
            return out

    return Paths()


def _columns_path(op, device) -> bool:
    """Whether ``A`` and ``A^H`` (no graph) take the CPU's sampled-columns paths for this
    test's masks."""
    return (isinstance(op, MultiCoilMRI) and torch.device(device).type == "cpu" and op._fast
            and _cpu_spmm.available())


def _all_paths(op, paths, device, fns, mode):
    """``([fn()] on the full path, [fn()] under ``mode``, [paths taken per fn])``."""
    paths.mode("off")
    assert op.kspace_path(device) == "full"
    ref = [fn() for fn in fns]
    assert paths.taken() == []
    paths.mode(mode)
    assert op.kspace_path(device) == ("split" if mode == "on" else "full")
    out, taken = [], []
    for fn in fns:
        out.append(fn())
        taken.append(paths.taken())
    return ref, out, taken


def _expected(op, device, mode) -> list[list[str]]:
    """The paths ``A``, ``A^H`` and ``A^H A`` take (no autograd graph) for a column mask."""
    split = ["split"] if mode == "on" else []
    columns = ["columns"] if _columns_path(op, device) else split
    return [columns, columns, ["w_only"]]


def _every_case(test):
    """Parametrize ``test`` over every mode, shape, mask kind and dtype."""
    for name, values in (("mode", MODES), ("shape", SHAPES), ("kind", MASKS), ("dtype", CDTYPES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


# -- (a)-(d): the split path equals the full path ------------------------------------------
@_every_case
def test_multicoil_split_matches_full(kind, shape, dtype, mode, device, paths):
    h, w = shape
    maps = _crandn(2, 4, h, w, dtype=dtype, seed=1)
    op = MultiCoilMRI(maps, _column_mask(kind, h, w, dtype)).to(device)
    x = _crandn(2, h, w, dtype=dtype, seed=2).to(device)
    y = _crandn(2, 4, h, w, dtype=dtype, seed=3).to(device)
    ref, out, taken = _all_paths(op, paths, device, [lambda: op.A(x), lambda: op.A_adjoint(y),
                                                     lambda: op.A_normal(x)], mode)
    assert taken == _expected(op, device, mode)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype
        assert _rel(a, b) < _tol(dtype)
    # unsampled columns are exactly zero in A x
    assert (out[0][..., op.mask.reshape(-1, w).abs().sum(0) == 0] == 0).all()


@_every_case
def test_singlecoil_split_matches_full(kind, shape, dtype, mode, device, paths):
    h, w = shape
    mask = _column_mask(kind, h, w, dtype)
    if kind == "batched":
        mask = mask[:, 0]  # (B, 1, W)
    op = SingleCoilMRI(mask, image_size=shape).to(device)
    x = _crandn(2, h, w, dtype=dtype, seed=4).to(device)
    ref, out, taken = _all_paths(op, paths, device, [lambda: op.A(x), lambda: op.A_adjoint(x),
                                                     lambda: op.A_normal(x)], mode)
    assert taken == _expected(op, device, mode)
    for a, b in zip(out, ref):
        assert _rel(a, b) < _tol(dtype)


@pytest.mark.parametrize("mode", MODES)
def test_real_input_and_broadcast_batch(mode, device, paths):
    """A real image is promoted; a per-sample mask broadcasts over shared coil maps; a mask
    with fewer per-sample dims than the data broadcasts on the sampled-columns path."""
    maps = _crandn(3, 16, 20, dtype=torch.complex128, seed=5)
    op = MultiCoilMRI(maps, _column_mask("batched", 16, 20, torch.complex128)).to(device)
    x = torch.randn(16, 20, dtype=torch.float64, generator=_gen(6)).to(device)
    ref, out, taken = _all_paths(op, paths, device, [lambda: op.A(x), lambda: op.A_normal(x)],
                                 mode)
    assert taken == [["split"] if mode == "on" else [], ["w_only"]]
    assert out[0].shape == (2, 3, 16, 20)
    for a, b in zip(out, ref):
        assert _rel(a, b) < 1e-12
    # (3, 2) samples, a mask per second index (2, 1, 1, W) shared along the first
    maps = _crandn(3, 2, 4, 16, 20, dtype=torch.complex128, seed=7)
    op = MultiCoilMRI(maps, _column_mask("batched", 16, 20, torch.complex128)).to(device)
    y = _crandn(3, 2, 4, 16, 20, dtype=torch.complex128, seed=8).to(device)
    ref, out, taken = _all_paths(op, paths, device, [lambda: op.A_adjoint(y)], mode)
    assert taken == [_expected(op, device, mode)[1]]
    assert _rel(out[0], ref[0]) < 1e-12


# -- (e), (f): fallbacks ---------------------------------------------------------------------
def _assert_full_path(op, x, y, device, paths):
    """With the split path switched on, ``op`` still takes the full one for ``A`` and
    ``A^H``: the same results bit for bit, no column path. Returns ``A x``."""
    paths.mode("off")
    ref = op.A(x), op.A_adjoint(y)
    paths.mode("on")
    assert op.kspace_path(device) == "full"
    torch.testing.assert_close(op.A(x), ref[0], rtol=0, atol=0)
    torch.testing.assert_close(op.A_adjoint(y), ref[1], rtol=0, atol=0)
    assert paths.taken() == []
    return ref[0]


@pytest.mark.parametrize("dtype", CDTYPES)
def test_2d_random_mask_falls_back(dtype, device, paths):
    h, w = 16, 20
    rdtype = torch.float32 if dtype == torch.complex64 else torch.float64
    mask = (torch.rand(h, w, generator=_gen(7)) < 0.2).to(rdtype)
    op = MultiCoilMRI(_crandn(3, h, w, dtype=dtype, seed=8), mask).to(device)
    assert mri._column_support(op.mask, w) is None  # not column-structured
    x = _crandn(h, w, dtype=dtype, seed=9).to(device)
    _assert_full_path(op, x, _crandn(3, h, w, dtype=dtype, seed=10).to(device), device, paths)
    paths.mode("off")
    ref = op.A_normal(x)
    paths.mode("auto")  # nor A^H A along W only: the mask's rows differ
    torch.testing.assert_close(op.A_normal(x), ref, rtol=0, atol=0)
    assert paths.taken() == []


def test_mask_above_threshold_falls_back(device, paths, monkeypatch):
    h, w = 16, 20
    mask = torch.zeros(w, dtype=torch.float64)
    mask[_columns(w, 14, 10)] = 1.0  # 70% of the columns
    op = MultiCoilMRI(_crandn(3, h, w, dtype=torch.complex128, seed=11), mask).to(device)
    assert mri._column_support(op.mask, w).numel() == 14
    x = _crandn(h, w, dtype=torch.complex128, seed=12).to(device)
    y = _crandn(3, h, w, dtype=torch.complex128, seed=13).to(device)
    ref = _assert_full_path(op, x, y, device, paths)
    # A^H A along W only needs no sparsity
    paths.mode("off")
    ref_normal = op.A_normal(x)
    paths.mode("auto")
    assert _rel(op.A_normal(x), ref_normal) < 1e-12 and paths.taken() == ["w_only"]
    monkeypatch.setattr(mri, "SPLIT_MAX_FRACTION", 0.8)  # read at call time
    assert op.kspace_path(device) == "full"  # auto: no torch split path
    op.A_adjoint(y)
    assert paths.taken() == (["columns"] if _columns_path(op, device) else [])
    paths.mode("on")
    assert op.kspace_path(device) == "split"
    assert _rel(op.A(x), ref) < 1e-12


def test_switch_modes_and_learned_mask(monkeypatch, paths):
    op = MultiCoilMRI(_crandn(2, 8, 6, dtype=torch.complex128, seed=13),
                      torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.float64))
    for env, mode in (("", "auto"), ("auto", "auto"), ("ON", "on"), ("1", "on"), ("off", "off"),
                      ("0", "off"), ("No", "off")):
        monkeypatch.setenv(mri.SPLIT_ENV_VAR, env)
        assert mri.split_mode() == mode
    monkeypatch.delenv(mri.SPLIT_ENV_VAR)
    assert mri.split_mode() == "auto"
    assert op.kspace_path("cpu") == op.kspace_path("cuda") == "full"  # the default
    monkeypatch.setenv(mri.SPLIT_ENV_VAR, "on")
    assert op.kspace_path() == "split"
    y = _crandn(2, 8, 6, dtype=torch.complex128, seed=14)
    x = _crandn(8, 6, dtype=torch.complex128, seed=15)
    op.A_adjoint(y), op.A_normal(x)
    assert paths.taken() == (["columns"] if _columns_path(op, "cpu") else ["split"]) + ["w_only"]
    op.mask.requires_grad_(True)  # a learned mask: no split path, no sampled-columns path
    assert op.kspace_path() == "full"
    with torch.no_grad():
        op.A_adjoint(y)
    assert paths.taken() == []
    # A^H A along W only still holds (and is differentiable in the mask)
    xg = x.clone().requires_grad_(True)
    loss = op.A_normal(xg).abs().square().sum()
    gx, gm = torch.autograd.grad(loss, (xg, op.mask))
    assert paths.taken() == ["w_only"]
    monkeypatch.setenv(mri.SPLIT_ENV_VAR, "off")
    ref = torch.autograd.grad(op.A_normal(xg).abs().square().sum(), (xg, op.mask))
    assert _rel(gx, ref[0]) < 1e-12 and _rel(gm, ref[1]) < 1e-12


# -- (g), (h): autograd and adjointness on the column paths ----------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(16, 20), (15, 12)])
def test_gradients_match_full_path(shape, mode, device, paths):
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

    paths.mode("off")
    ref = grads()
    paths.mode(mode)
    out = grads()
    assert paths.taken() == (["split"] if mode == "on" else []) + ["w_only"] + (
        ["split"] if mode == "on" else [])
    for a, b in zip(out, ref):
        assert _rel(a, b) < 1e-12
    # the gradient of <A x, y> is A^H y
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(op.A(xg), xg, y)
    assert _rel(g, op.A_adjoint(y)) < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("single", [False, True])
def test_adjoint_dot_product_on_column_paths(shape, single, mode, device, paths):
    h, w = shape
    dtype = torch.complex128
    mask = _column_mask("batched", h, w, dtype)
    if single:
        op = SingleCoilMRI(mask[:, 0], image_size=shape).to(device)
    else:
        op = MultiCoilMRI(_crandn(2, 3, h, w, dtype=dtype, seed=17), mask).to(device)
    paths.mode(mode)
    x = _crandn(2, *op.domain_shape, dtype=dtype, seed=18).to(device)
    y = _crandn(2, *op.range_shape, dtype=dtype, seed=19).to(device)
    lhs = (op.A(x).conj() * y).sum()
    rhs = (x.conj() * op.A_adjoint(y)).sum()
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    assert _rel(op.A_normal(x), op.A_adjoint(op.A(x))) < 1e-12
    expected = _expected(op, device, mode)
    assert paths.taken() == [p for ps in expected for p in ps] + expected[0] + expected[1]


# -- (i): in-place mask changes are noticed --------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_inplace_mask_change_is_noticed(mode, device, paths):
    h, w = 16, 20
    dtype = torch.complex128
    maps = _crandn(3, h, w, dtype=dtype, seed=20)
    op = MultiCoilMRI(maps, _column_mask("HW-equal-rows", h, w, dtype, seed=0)).to(device)
    x = _crandn(h, w, dtype=dtype, seed=21).to(device)
    y = _crandn(3, h, w, dtype=dtype, seed=22).to(device)
    paths.mode(mode)

    def all_three(o):
        return o.A(x), o.A_adjoint(y), o.A_normal(x)

    all_three(op)  # detection and gathered masks memoised
    with torch.no_grad():  # other columns, same storage
        op.mask.copy_(_column_mask("HW-equal-rows", h, w, dtype, seed=5).to(device))
    fresh = MultiCoilMRI(maps.to(device), op.mask.clone())
    for a, b in zip(all_three(op), all_three(fresh)):
        assert _rel(a, b) < 1e-12
    paths.taken()
    with torch.no_grad():  # rows no longer equal: the full path again
        op.mask[..., 3, :] = 1.0
    assert op.kspace_path(device) == "full"
    got = all_three(op)
    assert paths.taken() == []
    paths.mode("off")
    for a, b in zip(got, all_three(op)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- (j): random cases, every setting against the 2D path ------------------------------------
def _random_case(seed: int):
    """An operator and inputs drawn at random: odd and even sizes, both dtypes, masks of
    columns (weighted, per sample, all or none sampled), 2D masks, scalar masks; single- and
    multi-coil; per-sample, shared and two-level batches."""
    import random

    rng = random.Random(seed)
    gen = _gen(1000 + seed)
    h, w = rng.choice([4, 5, 8, 9, 16, 17]), rng.choice([4, 6, 7, 12, 15, 20])
    dtype = rng.choice(CDTYPES)
    rdtype = torch.float32 if dtype == torch.complex64 else torch.float64
    weights = (0.3 + torch.rand(w, generator=gen, dtype=rdtype)) * (
        torch.rand(w, generator=gen) < rng.choice([0.2, 0.4, 0.7]))
    kind = rng.choice(["W", "HW-equal-rows", "2D", "per-sample", "scalar", "all", "none"])
    mask = {"W": weights, "HW-equal-rows": weights.expand(h, w).clone(),
            "2D": (torch.rand(h, w, generator=gen) < 0.3).to(rdtype),
            "per-sample": torch.stack([weights, weights.flip(0)]).view(2, 1, 1, w),
            "scalar": torch.full((1, 1), 0.7, dtype=rdtype),
            "all": torch.ones(w, dtype=rdtype), "none": torch.zeros(w, dtype=rdtype)}[kind]
    if rng.random() < 0.25:  # single coil
        op = SingleCoilMRI(mask[:, 0] if kind == "per-sample" else mask, image_size=(h, w))
        lead = (2,) if kind == "per-sample" else ()
        x = _crandn(*lead, h, w, dtype=dtype, seed=seed)
        return op, x, _crandn(*lead, h, w, dtype=dtype, seed=seed + 1)
    maps_lead = rng.choice([(), (2,), (3, 2), (1,)])
    maps = torch.randn(*maps_lead, rng.choice([1, 3]), h, w, dtype=dtype, generator=gen)
    op = MultiCoilMRI(maps, mask)
    lead = op.batch_shape
    return (op, _crandn(*lead, h, w, dtype=dtype, seed=seed),
            _crandn(*lead, *op.range_shape, dtype=dtype, seed=seed + 1))


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_match_the_2d_path(seed, monkeypatch):
    op, x, y = _random_case(seed)
    grad = seed % 3 == 0  # through autograd (A^H A along W only; torch's split path)
    out = {}
    for mode in ("off", "auto", "on"):
        monkeypatch.setenv(mri.SPLIT_ENV_VAR, mode)
        xg = x.clone().requires_grad_(grad)
        res = [op.A(xg), op.A_adjoint(y), op.A_normal(xg)]
        if grad:
            res.append(torch.autograd.grad(res[2].abs().square().sum(), xg)[0])
        out[mode] = [r.detach() for r in res]
    for mode in ("auto", "on"):
        for a, b in zip(out[mode], out["off"]):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert (a - b).abs().max() <= 10 * _tol(a.dtype) * max(float(b.abs().max()), 1e-30)
