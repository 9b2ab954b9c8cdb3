"""k-space sampling masks: fastMRI's 1D Cartesian mask functions and 2D variable-density masks.

The 1D mask functions reproduce fastMRI's ``MaskFunc`` family column for column
(``fastmri/data/subsample.py``): one ``np.random.RandomState(seed)`` per mask function,
``__call__(shape, offset=None, seed=None)`` reseeds it temporarily when ``seed`` is given
(an int or a tuple of ints such as ``tuple(map(ord, fname))``, so every slice of a volume
gets the same mask), and the random draws happen in fastMRI's order.

Our k-space is complex ``(..., H, W)`` (no trailing 2), so the phase-encode columns are the
**last** dim: ``num_cols = shape[-1]`` where fastMRI uses ``shape[-2]``.

Every mask function returns a :class:`SampledMask` ``(mask, num_low_frequencies)`` with a
float32 ``mask`` that broadcasts against k-space of ``shape``: ``[1] * (len(shape) - 1) + [W]``
for the 1D functions, ``[1] * (len(shape) - 2) + [H, W]`` for the 2D ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SampledMask",
    "CartesianMask",
    "RandomMask",
    "EquispacedMask",
    "EquispacedFractionMask",
    "MagicMask",
    "MagicFractionMask",
    "VariableDensityMask2D",
    "PoissonDiscMask",
]

Seed = Union[int, Sequence[int], None]


class SampledMask(NamedTuple):
    """A sampled mask and the number of fully sampled low-frequency columns.

    Attributes
    ----------
    mask : Tensor
        float32, broadcastable to the k-space ``shape`` it was sampled for.
    num_low_frequencies : int
        Width (in columns) of the fully sampled centre (the ACS region).
    """

    mask: Tensor
    num_low_frequencies: int


@contextlib.contextmanager
def _temp_seed(rng: np.random.RandomState, seed: Seed) -> Iterator[None]:
    """Reseed ``rng`` for the block and restore its state afterwards (no-op for ``None``)."""
    if seed is None:
        yield
        return
    state = rng.get_state()
    rng.seed(seed if isinstance(seed, (int, np.integer)) else tuple(int(s) for s in seed))
    try:
        yield
    finally:
        rng.set_state(state)


def _check_shape(shape: Sequence[int], min_ndim: int, owner: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < min_ndim or min(shape[-min_ndim:]) < 1:
        want = "(..., W)" if min_ndim == 1 else "(..., H, W)"
        raise ValueError(f"{owner}: argument 'shape' must be a k-space shape {want} with "
                         f"positive sizes; got {shape}")
    return shape


def _as_list(name: str, values: float | Sequence[float], owner: str) -> list[float]:
    out = [values] if isinstance(values, (int, float, np.number)) else list(values)
    if not out:
        raise ValueError(f"{owner}: argument '{name}' must not be empty")
    return out


class CartesianMask:
    """Base of the 1D Cartesian (column) masks: a fully sampled centre plus outer columns.

    Parameters
    ----------
    center_fractions : float or sequence of float
        Fraction of the columns kept at the centre of k-space.
    accelerations : float or sequence of float
        Undersampling factors, paired with ``center_fractions``; one pair is chosen uniformly
        at random per call.
    allow_any_combination : bool
        Choose the fraction and the acceleration independently (lengths may then differ).
    seed : int, optional
        Seed of the mask function's own ``np.random.RandomState``.
    """

    def __init__(self, center_fractions: float | Sequence[float],
                 accelerations: float | Sequence[float], allow_any_combination: bool = False,
                 seed: int | None = None) -> None:
        owner = type(self).__name__
        self.center_fractions = _as_list("center_fractions", center_fractions, owner)
        self.accelerations = _as_list("accelerations", accelerations, owner)
        if len(self.center_fractions) != len(self.accelerations) and not allow_any_combination:
            raise ValueError(
                f"{owner}: arguments 'center_fractions' ({len(self.center_fractions)} values) "
                f"and 'accelerations' ({len(self.accelerations)} values) must have the same "
                "length unless allow_any_combination=True"
            )
        for f in self.center_fractions:
            if not 0 <= f <= 1:
                raise ValueError(f"{owner}: 'center_fractions' must lie in [0, 1]; got {f}")
        for a in self.accelerations:
            if not a >= 1:
                raise ValueError(f"{owner}: 'accelerations' must be >= 1; got {a}")
        self.allow_any_combination = allow_any_combination
        self.rng = np.random.RandomState(seed)

    def __call__(self, shape: Sequence[int], offset: int | None = None,
                 seed: Seed = None) -> SampledMask:
        """Sample a mask for k-space of ``shape`` ``(..., H, W)`` (columns: the last dim).

        Parameters
        ----------
        shape : sequence of int
            k-space shape; only ``shape[-1]`` (the number of columns) and ``len(shape)``
            matter.
        offset : int, optional
            First sampled column of the equispaced masks (drawn at random when ``None``).
        seed : int or tuple of int, optional
            Temporary seed, e.g. ``tuple(map(ord, fname))`` for one mask per volume.

        Returns
        -------
        SampledMask
            ``mask`` of shape ``[1] * (len(shape) - 1) + [W]`` (float32) and
            ``num_low_frequencies``.
        """
        shape = _check_shape(shape, 1, type(self).__name__)
        with _temp_seed(self.rng, seed):
            center, accel, num_low = self._sample(shape[-1], offset)
        mask = np.maximum(center, accel).astype(np.float32)
        out_shape = [1] * (len(shape) - 1) + [shape[-1]]
        return SampledMask(torch.from_numpy(mask.reshape(out_shape)), int(num_low))

    # -- fastMRI's steps, in its order of random draws --------------------------------------
    def _choose_acceleration(self) -> tuple[float, float]:
        if self.allow_any_combination:
            return self.rng.choice(self.center_fractions), self.rng.choice(self.accelerations)
        choice = self.rng.randint(len(self.center_fractions))
        return self.center_fractions[choice], self.accelerations[choice]

    def _sample(self, num_cols: int, offset: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        center_fraction, acceleration = self._choose_acceleration()
        num_low = round(num_cols * center_fraction)
        center = _center_mask(num_cols, num_low)
        accel = self._acceleration_mask(num_cols, acceleration, offset, num_low)
        return center, np.asarray(accel, dtype=np.float32), num_low

    def _acceleration_mask(self, num_cols: int, acceleration: float, offset: int | None,
                           num_low: int) -> np.ndarray:
        raise NotImplementedError


def _center_mask(num_cols: int, num_low: int) -> np.ndarray:
    mask = np.zeros(num_cols, dtype=np.float32)
    pad = (num_cols - num_low + 1) // 2
    mask[pad : pad + num_low] = 1
    return mask


def _int_acceleration(acceleration: float, owner: str) -> int:
    if float(acceleration) != int(acceleration):
        raise ValueError(f"{owner}: 'accelerations' must be integers; got {acceleration}")
    return int(acceleration)


class RandomMask(CartesianMask):
    """fastMRI's ``RandomMaskFunc``: outer columns kept independently with probability
    ``(W / acc - n_low) / (W - n_low)``, so ``W / acc`` columns are expected in total."""

    def _acceleration_mask(self, num_cols: int, acceleration: float, offset: int | None,
                           num_low: int) -> np.ndarray:
        prob = (num_cols / acceleration - num_low) / (num_cols - num_low)
        return self.rng.uniform(size=num_cols) < prob


class EquispacedMask(CartesianMask):
    """fastMRI's ``EquiSpacedMaskFunc``: every ``acc``-th column from ``offset``, plus the
    centre (so the realised acceleration is below ``acc``). Accelerations must be integers."""

    def _acceleration_mask(self, num_cols: int, acceleration: float, offset: int | None,
                           num_low: int) -> np.ndarray:
        acc = _int_acceleration(acceleration, type(self).__name__)
        if offset is None:
            offset = self.rng.randint(0, high=round(acc))
        mask = np.zeros(num_cols, dtype=np.float32)
        mask[offset::acc] = 1
        return mask


class EquispacedFractionMask(CartesianMask):
    """fastMRI's ``EquispacedMaskFractionFunc``: columns at a spacing adjusted so that, with
    the centre, a fraction ``1 / acc`` of the columns is sampled (positions rounded, as
    fastMRI does, so the spacing is not always exactly even)."""

    def _acceleration_mask(self, num_cols: int, acceleration: float, offset: int | None,
                           num_low: int) -> np.ndarray:
        adjusted = (acceleration * (num_low - num_cols)) / (num_low * acceleration - num_cols)
        if offset is None:
            offset = self.rng.randint(0, high=round(adjusted))
        mask = np.zeros(num_cols)
        samples = np.around(np.arange(offset, num_cols - 1, adjusted)).astype(np.uint)
        mask[samples] = 1.0
        return mask


class MagicMask(CartesianMask):
    """fastMRI's ``MagicMaskFunc`` (Defazio 2019): equispaced with different offsets on the
    two halves of k-space, exploiting conjugate symmetry. Accelerations must be integers."""

    def _acceleration_mask(self, num_cols: int, acceleration: float, offset: int | None,
                           num_low: int) -> np.ndarray:
        acc = _int_acceleration(acceleration, type(self).__name__)
        if offset is None:
            offset = self.rng.randint(0, high=acc)
        if offset % 2 == 0:
            offset_pos, offset_neg = offset + 1, offset + 2
        else:
            offset_pos, offset_neg = offset + 2, offset - 1
        pos = np.zeros((num_cols + 1) // 2, dtype=np.float32)
        neg = np.zeros(num_cols - (num_cols + 1) // 2, dtype=np.float32)
        if acc > 0:
            pos[offset_pos::acc] = 1
            neg[offset_neg::acc] = 1
        return np.fft.fftshift(np.concatenate((pos, np.flip(neg))))


class MagicFractionMask(MagicMask):
    """fastMRI's ``MagicMaskFractionFunc``: :class:`MagicMask` with the spacing adjusted to
    meet ``W / acc`` columns in total (the centre is bounded to ``[1, W / acc]`` columns)."""

    def _sample(self, num_cols: int, offset: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        fraction, acceleration = self._choose_acceleration()
        num_low = round(num_cols * fraction)
        target = round(num_cols / acceleration)
        num_low = max(min(num_low, target), 1)
        rest = target - num_low
        adjusted = round(num_cols / rest) if rest > 0 else 0
        center = _center_mask(num_cols, num_low)
        accel = self._acceleration_mask(num_cols, adjusted, offset, num_low)
        return center, accel, num_low


# -- 2D masks ------------------------------------------------------------------------------
def _calib_slices(size: tuple[int, int], calib: tuple[int, int]) -> tuple[slice, slice]:
    """The centred calibration box (sigpy's placement: ``int(n/2 - c/2) : int(n/2 + c/2)``)."""
    return tuple(slice(int(n / 2 - c / 2), int(n / 2 + c / 2))  # type: ignore[return-value]
                 for n, c in zip(size, calib))


def _as_pair(name: str, value: int | Sequence[int], owner: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(f"{owner}: argument '{name}' must be an int or a pair >= 0; got {value}")
    return int(pair[0]), int(pair[1])


class _Mask2D:
    def __init__(self, acceleration: float, calib_size: int | Sequence[int],
                 seed: int | None) -> None:
        owner = type(self).__name__
        if not acceleration > 1:
            raise ValueError(f"{owner}: argument 'acceleration' must be > 1; got {acceleration}")
        self.acceleration = float(acceleration)
        self.calib_size = _as_pair("calib_size", calib_size, owner)
        self.rng = np.random.RandomState(seed)

    def __call__(self, shape: Sequence[int], seed: Seed = None) -> SampledMask:
        """Sample an ``(H, W)`` mask for k-space of ``shape`` ``(..., H, W)``.

        Returns
        -------
        SampledMask
            float32 ``mask`` of shape ``[1] * (len(shape) - 2) + [H, W]``;
            ``num_low_frequencies`` is the calibration box width (columns).
        """
        shape = _check_shape(shape, 2, type(self).__name__)
        size = (shape[-2], shape[-1])
        with _temp_seed(self.rng, seed):
            mask = self._sample(size)
        mask = mask.astype(np.float32).reshape([1] * (len(shape) - 2) + list(size))
        return SampledMask(torch.from_numpy(mask), min(self.calib_size[1], size[1]))

    def _sample(self, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError


class VariableDensityMask2D(_Mask2D):
    """Random 2D mask with density ``(1 - r)^power`` (``r`` in ``[0, 1]`` from the centre to
    the corner) and a fully sampled centred calibration box.

    Each point outside the box is kept independently with probability ``min(1, s * pdf)``,
    ``s`` chosen so that ``H * W / acceleration`` points are expected in total.

    Parameters
    ----------
    acceleration : float
        Target ``H * W / n_sampled`` (> 1).
    calib_size : int or (int, int)
        Calibration box ``(h, w)``.
    power : float
        Polynomial decay of the density.
    seed : int, optional
        Seed of the mask function's ``RandomState``; ``__call__(shape, seed=...)`` reseeds it
        temporarily (per-volume masks).
    """

    def __init__(self, acceleration: float, calib_size: int | Sequence[int] = 16,
                 power: float = 2.0, seed: int | None = None) -> None:
        super().__init__(acceleration, calib_size, seed)
        self.power = float(power)

    def _sample(self, size: tuple[int, int]) -> np.ndarray:
        h, w = size
        ky = (np.arange(h) - h // 2) / max(h / 2, 1)
        kx = (np.arange(w) - w // 2) / max(w / 2, 1)
        r = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / np.sqrt(2)
        pdf = np.clip(1 - r, 0, None) ** self.power
        calib = np.zeros(size, dtype=bool)
        calib[_calib_slices(size, self.calib_size)] = True
        pdf[calib] = 0
        need = h * w / self.acceleration - calib.sum()
        if need > np.count_nonzero(pdf):
            raise ValueError(f"{type(self).__name__}: acceleration {self.acceleration} is too "
                             f"low to reach with power={self.power} on {size}")
        lo, hi = 0.0, 1.0
        while np.minimum(1, hi * pdf).sum() < need:
            hi *= 2
        for _ in range(60):  # bisection on the scale of the density
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.minimum(1, mid * pdf).sum() < need else (lo, mid)
        prob = np.minimum(1, hi * pdf)
        return (self.rng.uniform(size=size) < prob) | calib


class PoissonDiscMask(_Mask2D):
    """Variable-density Poisson-disc mask (``sigpy.mri.poisson``) with a calibration box.

    The mask function's ``RandomState`` draws the integer seed given to sigpy, so masks are
    reproducible per ``seed`` (int or tuple) like the other mask functions; numpy's global
    random state is left as it was.

    Parameters
    ----------
    acceleration : float
        Target acceleration (> 1); sigpy meets it to within ``tol``.
    calib_size : int or (int, int)
        Calibration box ``(h, w)``.
    crop_corner : bool
        Leave the k-space corners out (sigpy's option).
    seed : int, optional
        Seed of the mask function's ``RandomState``.
    tol : float
        Tolerance on the realised acceleration.
    """

    def __init__(self, acceleration: float, calib_size: int | Sequence[int] = 16,
                 crop_corner: bool = True, seed: int | None = None, tol: float = 0.1) -> None:
        super().__init__(acceleration, calib_size, seed)
        self.crop_corner = crop_corner
        self.tol = float(tol)

    def _sample(self, size: tuple[int, int]) -> np.ndarray:
        import sigpy.mri  # heavy (numba); imported only when a Poisson mask is drawn

        seed = int(self.rng.randint(0, 2**31 - 1))
        return sigpy.mri.poisson(size, self.acceleration, calib=self.calib_size,
                                 dtype=np.float32, crop_corner=self.crop_corner, seed=seed,
                                 tol=self.tol)
