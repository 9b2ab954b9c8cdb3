"""Audit of the imaging operators against independent references: textbook filter
responses, skimage's ``iradon``, closed-form line integrals of an ellipse along rays built
here from the documented conventions, a TV problem with a known minimiser, and argument
errors that name the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedrecon.operators import (
    ConeBeam3D,
    FanBeam2D,
    Identity,
    ParallelBeam2D,
    conjugate_gradient,
    ellipse_line_integrals,
    fbp,
    ramp_filter,
    shepp_logan,
    simulate_transmission,
    tv_reconstruction,
)

ELLIPSE = [(1.0, 0.6, 0.35, 0.15, -0.1, 25.0)]

WINDOWS = {
    "ramp": lambda f: np.ones_like(f),
    "ram-lak": lambda f: np.ones_like(f),
    "shepp-logan": np.sinc,
    "cosine": lambda f: np.cos(np.pi * f),
    "hamming": lambda f: 0.54 + 0.46 * np.cos(2 * np.pi * f),
    "hann": lambda f: 0.5 + 0.5 * np.cos(2 * np.pi * f),
}


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# -- FBP filters -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(WINDOWS))
@pytest.mark.parametrize("spacing, cutoff", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.6)])
def test_filter_response_is_the_textbook_ramp_times_window(name, spacing, cutoff):
    resp = ramp_filter(50, spacing, name, cutoff).numpy()
    f = np.arange(resp.size) / (2 * (resp.size - 1))  # cycles per sample
    g = f / cutoff
    ref = np.abs(f) / spacing * np.where(g <= 0.5, WINDOWS[name](g), 0.0)
    # the spatially discretized ramp (Kak & Slaney) differs from |f| only near DC
    assert np.abs(resp - ref)[2:].max() < 4e-3 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["ramp", "ram-lak", "shepp-logan", "cosine", "hamming", "hann"])
def test_parallel_fbp_matches_skimage_iradon(name):
    transform = pytest.importorskip("skimage.transform")
    n = 33  # odd: skimage's rotation centre, pixel n // 2, is the image centre
    x = shepp_logan(n, ellipses=ELLIPSE, dtype=torch.float64).numpy()
    degrees = np.linspace(0.0, 180.0, 45, endpoint=False)
    sino = transform.radon(x, theta=degrees, circle=True)
    op = ParallelBeam2D(n, torch.from_numpy(np.deg2rad(degrees)), det_count=sino.shape[0])
    ours = fbp(op, torch.from_numpy(sino.T.copy()), name).numpy()
    sk_name = "ramp" if name == "ram-lak" else name
    ref = transform.iradon(sino, theta=degrees, filter_name=sk_name, circle=True)
    inside = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2)) < n // 2 - 1
    # skimage samples its windows with np.hanning / np.hamming (size - 1 in the period)
    tol = 1e-10 if sk_name == "ramp" else 2e-3
    assert _rel(ours[inside], ref[inside]) < tol


def test_fbp_argument_errors_name_the_argument():
    op = ParallelBeam2D(16, n_angles=8)
    sino = torch.zeros(8, op.det_count, dtype=torch.float64)
    with pytest.raises(ValueError, match="'parker'.*FanBeam2D"):
        fbp(op, sino, parker=True)  # used to be ignored silently
    with pytest.raises(TypeError, match="'filter'"):
        fbp(op, sino, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'filter'.*hamming"):
        fbp(op, sino, "hamm")


# -- projector conventions, checked with rays built here from the docstrings ------------------
def _rays(theta, s, fan=None):
    theta = np.asarray(theta, dtype=np.float64)[:, None]
    s = np.asarray(s, dtype=np.float64)[None, :]
    r = np.stack([np.sin(theta), -np.cos(theta)], -1) * np.ones_like(s)[..., None]
    u = np.stack([np.cos(theta), np.sin(theta)], -1) * np.ones_like(s)[..., None]
    if fan is None:
        return torch.from_numpy(s[..., None] * u), torch.from_numpy(r)
    d_so, d_od = fan
    src = -d_so * r
    d = d_od * r + s[..., None] * u - src
    return torch.from_numpy(src), torch.from_numpy(d / np.linalg.norm(d, axis=-1, keepdims=True))


@pytest.mark.parametrize("kind", ["parallel", "fan"])
def test_non_square_odd_detector_matches_closed_form_and_converges(kind):
    errs = []
    for scale in (1, 2):
        h, w, ps = 24 * scale, 40 * scale, 1.0 / scale  # the same physical object
        theta = np.linspace(0.05, (2 if kind == "fan" else 1) * math.pi, 23, endpoint=False)
        nd = 2 * 25 * scale + 1  # odd detector
        ds, off = 1.3 / scale, 0.4
        s = (np.arange(nd) - (nd - 1) / 2) * ds + off
        if kind == "parallel":
            op = ParallelBeam2D((h, w), torch.from_numpy(theta), nd, ds, pixel_spacing=ps,
                                det_offset=off)
            o, d = _rays(theta, s)
        else:
            op = FanBeam2D((h, w), torch.from_numpy(theta), nd, ds, pixel_spacing=ps,
                           det_offset=off, source_distance=50.0, detector_distance=20.0)
            o, d = _rays(theta, s, fan=(50.0, 20.0))
        ref = ellipse_line_integrals(o, d, image_size=(h, w), pixel_spacing=ps, ellipses=ELLIPSE)
        x = shepp_logan((h, w), ellipses=ELLIPSE, oversample=6, dtype=torch.float64)
        errs.append(_rel(op(x), ref))
    assert errs[1] < 0.025 and errs[1] < 0.7 * errs[0], errs


# -- TV with a known minimiser ----------------------------------------------------------------
def test_tv_denoising_of_a_step_shrinks_each_plateau_by_its_jumps():
    # rows are identical, so TV(x) = H * (1D circular TV): each plateau of length n_i, bounded
    # by two jumps, moves towards the other by 2 lam / n_i (no jump vanishes for this lam)
    h, w, n1, lam = 4, 16, 6, 0.3
    y = torch.zeros(h, w, dtype=torch.float64)
    y[:, :n1] = 1.0
    expected = torch.full((h, w), 2 * lam / (w - n1), dtype=torch.float64)
    expected[:, :n1] = 1.0 - 2 * lam / n1
    for isotropic in (False, True):
        x = tv_reconstruction(Identity((h, w)), y, lam, n_iter=800, isotropic=isotropic)
        torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


# -- argument errors --------------------------------------------------------------------------
def test_geometry_arguments_are_checked_not_truncated():
    with pytest.raises(ValueError, match="'det_count'.*int"):
        ParallelBeam2D(16, n_angles=4, det_count=10.5)
    with pytest.raises(ValueError, match="'n_angles'.*int"):
        ParallelBeam2D(16, n_angles=4.5)
    with pytest.raises(ValueError, match="'det_offset'.*finite"):
        FanBeam2D(16, n_angles=4, det_offset=float("nan"), source_distance=40.0,
                  detector_distance=10.0)
    with pytest.raises(ValueError, match="'image_size'"):
        ParallelBeam2D(16.5, n_angles=4)
    # numpy integers are integers
    a = ParallelBeam2D(np.int64(12), n_angles=np.int64(5), det_count=np.int32(17))
    b = ParallelBeam2D(12, n_angles=5, det_count=17)
    assert a.geometry == b.geometry
    with pytest.raises(ValueError, match="'det_offset'.*pair"):
        ConeBeam3D(6, n_angles=3, source_distance=30.0, detector_distance=5.0, det_offset=(1.0,))
    cone = ConeBeam3D(6, n_angles=3, det_shape=(5, 7), det_spacing=np.float32(1.5),
                      source_distance=30.0, detector_distance=5.0)
    assert cone.geometry.det_spacing == (1.5, 1.5)


def test_noise_and_solver_arguments_are_checked():
    with pytest.raises(ValueError, match="'electronic_noise'"):
        simulate_transmission(torch.zeros(3, 4), 1e3, float("nan"))
    rhs = torch.ones(2, 3)
    with pytest.raises(ValueError, match="'n_iter'"):
        conjugate_gradient(lambda v: v, rhs, n_iter=-1)
    with pytest.raises(ValueError, match="'tol'"):
        conjugate_gradient(lambda v: v, rhs, tol=float("nan"))
    with pytest.raises(ValueError, match="'step'"):
        tv_reconstruction(Identity((3, 3)), torch.ones(3, 3), 0.1, step=-1.0)
