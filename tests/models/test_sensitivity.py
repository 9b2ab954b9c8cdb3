"""The learned coil-sensitivity estimator (E2E VarNet style): its ACS region, its classical
starting point against known maps, roles (LOCAL, sealed), and gradient flow."""

from __future__ import annotations

import pytest
import torch

from fedrecon.models import (
    ModelConfig,
    Partition,
    Role,
    Scope,
    SensitivityNet,
    acs_coil_maps,
    acs_region,
    build_model,
    parameter_roles,
)
from fedrecon.operators import MultiCoilMRI, birdcage_maps, fft2c, shepp_logan


def test_acs_region_1d_and_2d_masks() -> None:
    cols = [2, 6, 10, *range(16, 32), 37, 41, 45]  # a 16-column centre and isolated lines
    mask = torch.zeros(1, 1, 1, 48)
    mask[..., cols] = 1
    box = acs_region(mask, (40, 48))
    assert box.shape == (1, 40, 48)
    want = torch.zeros(40, 48)
    want[:, 16:32] = 1  # every row, the contiguous centre only
    assert torch.equal(box[0], want)
    m2 = torch.zeros(1, 1, 32, 32)  # a 2D mask: 8x8 calibration box and scattered samples
    m2[..., 12:20, 12:20] = 1
    m2[..., 2, 2] = m2[..., 30, 5] = m2[..., 16, 27] = 1
    want2 = torch.zeros(32, 32)
    want2[12:20, 12:20] = 1
    assert torch.equal(acs_region(m2, (32, 32))[0], want2)
    # a batch of masks: each sample its own box
    both = torch.cat([mask[..., :32], torch.ones(1, 1, 1, 32)])
    boxes = acs_region(both, (8, 32))
    assert int(boxes[0, 0].sum()) == 16 and int(boxes[1].sum()) == 8 * 32


def test_acs_maps_recover_smooth_sensitivities() -> None:
    """With smooth coil maps and a 16-column ACS, the classical estimate matches the true
    maps' magnitudes on the object (the phase of the image itself is absorbed)."""
    n = 48
    true = birdcage_maps(6, n, dtype=torch.complex128)
    image = shepp_logan(n, dtype=torch.float64).to(torch.complex128)
    k = fft2c(true * image)[None]
    mask = torch.zeros(1, 1, 1, n)
    mask[..., n // 2 - 8: n // 2 + 8] = 1
    est = acs_coil_maps(k * mask, mask)[0]
    obj = image.abs() > 0.05
    a, b = est.abs()[:, obj], true.abs()[:, obj]
    corr = float((a * b).sum() / (a.norm() * b.norm()))
    assert corr > 0.98, corr
    assert torch.allclose(est.abs().square().sum(0)[obj], torch.ones_like(a[0]), atol=1e-6)


def test_sensitivity_net_starts_as_acs_maps_and_is_local() -> None:
    torch.manual_seed(0)
    net = SensitivityNet(chans=4, num_pools=1)
    k = torch.randn(2, 4, 32, 32, dtype=torch.complex64)
    mask = torch.zeros(1, 1, 1, 32)
    mask[..., 12:20] = 1
    with torch.no_grad():
        torch.testing.assert_close(net(k * mask, mask), acs_coil_maps(k * mask, mask),
                                   rtol=1e-4, atol=1e-5)
    model = build_model(ModelConfig(n_iter=2, chans=4, num_pools=1, sens_net=True,
                                    sens_chans=4), complex_images=True)
    roles = parameter_roles(model)
    est = {k: r for k, r in roles.items() if k.startswith("estimator.")}
    assert est and set(est.values()) == {Role.ESTIMATOR}  # sealed: its U-Net is not PRIOR
    assert not set(est) & set(Partition.default().names(model, Scope.GLOBAL))
    with pytest.raises(ValueError, match="sens_net"):
        build_model(ModelConfig(sens_net=True), complex_images=False)
    with pytest.raises(ValueError, match="ACS"):
        net(k, torch.zeros(1, 1, 1, 32))


def test_unrolled_with_estimated_maps_trains_the_estimator() -> None:
    torch.manual_seed(0)
    n, c = 32, 4
    maps = birdcage_maps(c, n)
    x = shepp_logan(n).to(torch.complex64)[None].repeat(2, 1, 1)
    mask = torch.zeros(2, 1, 1, n)
    mask[..., ::3] = 1
    mask[..., 12:20] = 1
    y = MultiCoilMRI(maps, mask)(x)
    model = build_model(ModelConfig(n_iter=2, chans=4, num_pools=1, sens_net=True,
                                    sens_chans=4), complex_images=True)
    # the operator's own maps are ignored: all-ones maps give the same output
    wrong = MultiCoilMRI(torch.ones(c, n, n, dtype=torch.complex64) / c**0.5, mask)
    out = model(y, MultiCoilMRI(maps, mask))
    torch.testing.assert_close(out, model(y, wrong))
    # a UNet with a zero-initialized output layer passes gradients to that layer first
    (out.abs() - x.abs()).square().mean().backward()
    grads = [p.grad for n_, p in model.named_parameters() if n_.startswith("estimator.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
