"""Sampling masks: fastMRI's 1D mask functions column for column, and the 2D masks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrecon.operators import (
    EquispacedFractionMask,
    EquispacedMask,
    MagicFractionMask,
    MagicMask,
    PoissonDiscMask,
    RandomMask,
    SampledMask,
    VariableDensityMask2D,
)


def _load_fastmri_subsample():
    """fastmri's ``subsample.py`` loaded on its own (the package ``__init__`` needs pandas,
    h5py, lightning...; the module itself needs only numpy and torch)."""
    spec = importlib.util.find_spec("fastmri")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "subsample.py"
    if not path.exists():
        return None
    mod_spec = importlib.util.spec_from_file_location("_fastmri_subsample", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


FASTMRI = _load_fastmri_subsample()
needs_fastmri = pytest.mark.skipif(FASTMRI is None, reason="fastmri is not installed")

PAIRS = [
    (RandomMask, "RandomMaskFunc"),
    (EquispacedMask, "EquiSpacedMaskFunc"),
    (EquispacedFractionMask, "EquispacedMaskFractionFunc"),
    (MagicMask, "MagicMaskFunc"),
    (MagicFractionMask, "MagicMaskFractionFunc"),
]


@needs_fastmri
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[1] for p in PAIRS])
def test_matches_fastmri_column_for_column(ours, theirs):
    ref_cls = getattr(FASTMRI, theirs)
    configs = [([0.08], [4]), ([0.04], [8]), ([0.08, 0.04], [4, 8]), ([0.1, 0.05], [3, 6])]
    n = 0
    for cf, acc in configs:
        for init_seed in (None, 0, 7):
            ref = ref_cls(cf, acc, seed=init_seed)
            mine = ours(cf, acc, seed=init_seed)
            if init_seed is None:  # align the unseeded generators
                state = np.random.RandomState(123).get_state()
                ref.rng.set_state(state)
                mine.rng.set_state(state)
            for width in (368, 320, 37, 64):
                shapes = ((1, 640, width), (640, width), (2, 15, 10, width))
                for call in range(3):  # unseeded calls: the rng state advances identically
                    shape = shapes[call % 3]
                    m_ref, nl_ref = ref(shape + (2,))
                    m, nl = mine(shape)
                    assert nl == nl_ref
                    assert m.shape == (*[1] * (len(shape) - 1), width) and m.dtype == torch.float32
                    np.testing.assert_array_equal(m.reshape(-1).numpy(),
                                                  m_ref.reshape(-1).numpy())
                    n += 1
                for seed in (0, 42, tuple(map(ord, "file1000001.h5"))):
                    for offset in (None, 1):
                        m_ref, nl_ref = ref((1, 640, width, 2), offset=offset, seed=seed)
                        m, nl = mine((1, 640, width), offset=offset, seed=seed)
                        np.testing.assert_array_equal(m.reshape(-1).numpy(),
                                                      m_ref.reshape(-1).numpy())
                        assert nl == nl_ref
    assert n > 0


@needs_fastmri
def test_matches_fastmri_any_combination():
    ref = FASTMRI.RandomMaskFunc([0.08, 0.04, 0.02], [4, 8], allow_any_combination=True, seed=3)
    mine = RandomMask([0.08, 0.04, 0.02], [4, 8], allow_any_combination=True, seed=3)
    for _ in range(10):
        m_ref, nl_ref = ref((1, 100, 2))
        m, nl = mine((1, 100))
        np.testing.assert_array_equal(m.reshape(-1).numpy(), m_ref.reshape(-1).numpy())
        assert nl == nl_ref


def test_random_mask_matches_handwritten_reference():
    """Re-derive the columns with RandomState directly (runs without fastmri)."""
    cfs, accs = [0.08, 0.04], [4, 8]
    mask_func = RandomMask(cfs, accs, seed=5)
    for width in (368, 37):
        for seed in (1, tuple(map(ord, "file_a.h5"))):
            rng = np.random.RandomState(seed)
            i = rng.randint(2)
            num_low = round(width * cfs[i])
            prob = (width / accs[i] - num_low) / (width - num_low)
            expected = rng.uniform(size=width) < prob
            pad = (width - num_low + 1) // 2
            expected[pad : pad + num_low] = True
            got = mask_func((640, width), seed=seed)
            assert isinstance(got, SampledMask) and got.num_low_frequencies == num_low
            np.testing.assert_array_equal(got.mask[0].numpy(), expected.astype(np.float32))


def test_equispaced_mask_matches_handwritten_reference():
    mask_func = EquispacedMask([0.08], [4], seed=5)
    width = 50
    rng = np.random.RandomState(9)
    rng.randint(1)  # choose_acceleration draws even with one option
    offset = rng.randint(0, high=4)
    expected = np.zeros(width, dtype=np.float32)
    expected[offset::4] = 1
    num_low = round(width * 0.08)
    pad = (width - num_low + 1) // 2
    expected[pad : pad + num_low] = 1
    got = mask_func((1, 10, width), seed=9)
    assert got.mask.shape == (1, 1, width)
    np.testing.assert_array_equal(got.mask.reshape(-1).numpy(), expected)


@pytest.mark.parametrize("cls", [p[0] for p in PAIRS])
def test_reproducible_per_volume_and_center_sampled(cls):
    mask_func = cls([0.08], [4], seed=0)
    a = mask_func((640, 368), seed=tuple(map(ord, "file_a.h5")))
    b = mask_func((640, 368), seed=tuple(map(ord, "file_a.h5")))
    torch.testing.assert_close(a.mask, b.mask)
    masks = {tuple(mask_func((640, 368), seed=tuple(map(ord, f"file_{i}.h5"))).mask[0].tolist())
             for i in range(8)}
    assert len(masks) > 1  # different files, different masks
    pad = (368 - a.num_low_frequencies + 1) // 2
    assert a.num_low_frequencies == round(368 * 0.08)
    assert bool((a.mask[0, pad : pad + a.num_low_frequencies] == 1).all())
    # the temporary seed leaves the mask function's own stream untouched
    f1, f2 = cls([0.08], [4], seed=1), cls([0.08], [4], seed=1)
    f1((640, 368), seed=99)
    torch.testing.assert_close(f1((640, 368)).mask, f2((640, 368)).mask)


@pytest.mark.parametrize("cls, tol", [(RandomMask, 0.03), (EquispacedFractionMask, 0.02)])
@pytest.mark.parametrize("acc", [4, 8])
def test_acceleration_met_on_average(cls, tol, acc):
    mask_func = cls([0.08 if acc == 4 else 0.04], [acc], seed=0)
    fractions = [mask_func((640, 368)).mask.mean().item() for _ in range(200)]
    assert abs(np.mean(fractions) - 1 / acc) < tol / acc * 4


def test_mask_function_validation():
    with pytest.raises(ValueError, match="center_fractions"):
        RandomMask([0.08, 0.04], [4])
    with pytest.raises(ValueError, match="accelerations"):
        EquispacedMask([0.08], [2.5])((10, 64))
    with pytest.raises(ValueError, match="shape"):
        RandomMask([0.08], [4])(())


# -- 2D masks ------------------------------------------------------------------------------
def _calib_sampled(mask: np.ndarray, calib: int) -> bool:
    h, w = mask.shape
    return bool((mask[h // 2 - calib // 2 : h // 2 + calib // 2,
                      w // 2 - calib // 2 : w // 2 + calib // 2] == 1).all())


@pytest.mark.parametrize("acc", [4, 8])
def test_variable_density_mask(acc):
    mask_func = VariableDensityMask2D(acc, calib_size=12, power=2, seed=0)
    out = mask_func((96, 80))
    mask = out.mask.numpy()
    assert mask.shape == (96, 80) and out.mask.dtype == torch.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert _calib_sampled(mask, 12)
    assert abs(mask.size / mask.sum() / acc - 1) < 0.1
    # denser in the centre than at the edge
    assert mask[32:64, 27:53].mean() > mask[:16].mean()
    again = VariableDensityMask2D(acc, calib_size=12, seed=0)((96, 80)).mask
    torch.testing.assert_close(out.mask, again)
    fname = tuple(map(ord, "vol.h5"))
    torch.testing.assert_close(mask_func((2, 96, 80), seed=fname).mask[0],
                               mask_func((96, 80), seed=fname).mask)
    assert not torch.equal(mask_func((96, 80), seed=1).mask, mask_func((96, 80), seed=2).mask)


def test_poisson_disc_mask():
    state = np.random.get_state()
    mask_func = PoissonDiscMask(4, calib_size=12, seed=0)
    out = mask_func((64, 48))
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global state untouched
    mask = out.mask.numpy()
    assert mask.shape == (64, 48) and out.mask.dtype == torch.float32
    assert _calib_sampled(mask, 12)
    assert abs(mask.size / mask.sum() - 4) < 0.1 + 1e-9
    torch.testing.assert_close(PoissonDiscMask(4, calib_size=12, seed=0)((64, 48)).mask, out.mask)
    fname = tuple(map(ord, "vol.h5"))
    torch.testing.assert_close(mask_func((64, 48), seed=fname).mask,
                               mask_func((64, 48), seed=fname).mask)
    assert not torch.equal(mask_func((64, 48), seed=1).mask, mask_func((64, 48), seed=2).mask)


def test_2d_mask_validation():
    with pytest.raises(ValueError, match="acceleration"):
        VariableDensityMask2D(1.0)
    with pytest.raises(ValueError, match="calib_size"):
        PoissonDiscMask(4, calib_size=(1, 2, 3))
    with pytest.raises(ValueError, match="shape"):
        VariableDensityMask2D(4)((32,))
