"""Audit of the unrolled networks against independent references: dense solves, gradcheck,
hand computations; odd sizes, float64, tied parameters, argument errors."""

from __future__ import annotations

import pytest
import torch
from fedrecon.operators import (
    FanBeam2D,
    MultiCoilMRI,
    ParallelBeam2D,
    RandomMask,
    SingleCoilMRI,
    birdcage_maps,
)

from fedrecon.models import (
    DnCNN,
    GradientDC,
    ImagePrior,
    ModelConfig,
    Partition,
    ProximalDC,
    SensitivityNet,
    UNet,
    Unrolled,
    build_model,
    parameter_roles,
    state_roles,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

H, W = 6, 5  # odd, non-square


def _tiny_mri(batch: int = 2, coils: int = 2):
    mask = torch.stack([RandomMask([0.4], [2])((H, W), seed=s).mask for s in range(batch)])
    maps = birdcage_maps(coils, (H, W), dtype=torch.complex128).expand(batch, coils, H, W)
    op = MultiCoilMRI(maps.contiguous(), mask[:, None].double())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, H, W, dtype=torch.complex128, generator=gen)
    y = op(x) + 0.1 * torch.randn(batch, coils, H, W, dtype=torch.complex128, generator=gen)
    return op, y


def _dense_matrix(op, b: int) -> torch.Tensor:
    """A of sample ``b`` as a dense matrix, column by column."""
    n = H * W
    batch = op.coil_maps.shape[0]
    cols = []
    for j in range(n):
        e = torch.zeros(batch, n, dtype=torch.complex128)
        e[b, j] = 1
        cols.append(op.A(e.reshape(batch, H, W))[b].reshape(-1))
    return torch.stack(cols, 1)


def _random_net(net: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, std)
    return net


# -- DC layers against hand computations and a dense solve -------------------------------
def test_proximal_dc_equals_dense_solve_multicoil_batch() -> None:
    op, y = _tiny_mri()
    z = torch.randn(2, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    dc = ProximalDC(1, init_lambda=0.3, cg_iters=60).double()
    out = dc(z, y, op, 0)
    lam = float(dc.penalty(0).detach()) * op.norm_bound() ** 2
    for b in range(2):
        a = _dense_matrix(op, b)
        lhs = a.conj().T @ a + lam * torch.eye(H * W, dtype=torch.complex128)
        rhs = a.conj().T @ y[b].reshape(-1) + lam * z[b].reshape(-1)
        direct = torch.linalg.solve(lhs, rhs).reshape(H, W)
        torch.testing.assert_close(out[b], direct, rtol=1e-10, atol=1e-12)


def test_gradient_dc_is_one_hand_computed_gradient_step() -> None:
    op, y = _tiny_mri()
    z = torch.randn(2, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))
    dc = GradientDC(2, init_step=0.7).double()
    a = _dense_matrix(op, 1)
    eta = float(dc.step(1).detach()) / op.norm_bound() ** 2
    zb = z[1].reshape(-1)
    expected = (zb - eta * a.conj().T @ (a @ zb - y[1].reshape(-1))).reshape(H, W)
    torch.testing.assert_close(dc(z, y, op, 1)[1], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,kw", [(GradientDC, "init_step"), (ProximalDC, "init_lambda")])
@pytest.mark.parametrize("value", [1e-6, 0.05, 1.0, 100.0, 500.0])
def test_dc_initial_values_are_what_was_asked(cls, kw: str, value: float) -> None:
    # softplus^{-1} overflowed in float32 above ~88: an initial step of 100 became inf
    dc = cls(1, **{kw: value})
    got = dc.step(0) if cls is GradientDC else dc.penalty(0)
    assert torch.isfinite(got)
    assert float(got.detach()) == pytest.approx(value, rel=1e-6)


# -- gradients of the whole unrolled network ---------------------------------------------
@pytest.mark.parametrize("dc_name", ["gradient", "proximal"])
def test_unrolled_mri_gradcheck_with_phase_alignment(dc_name: str) -> None:
    """The global-phase rotation depends on the input: detaching it gave wrong gradients for
    the measurements and for the DC parameters of every iteration but the last."""
    op, y = _tiny_mri(batch=1, coils=1)
    net = _random_net(DnCNN(2, 2, depth=2, features=2)).double()
    dc = (GradientDC(2) if dc_name == "gradient" else ProximalDC(2, cg_iters=2)).double()
    model = Unrolled(dc, ImagePrior(net, align_phase=True), 2)
    yy = y.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: model(v, op), (yy,), atol=1e-6, fast_mode=True)
    name = "dc.raw_step" if dc_name == "gradient" else "dc.raw_lambda"
    raw = model.get_parameter(name).detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda r: torch.func.functional_call(model, {name: r}, (y, op)), (raw,), atol=1e-6)


def test_unrolled_ct_gradcheck_unet_odd_size() -> None:
    op = ParallelBeam2D((7, 9), n_angles=6).double()
    net = _random_net(UNet(1, 1, chans=2, num_pools=1, norm="none"), std=0.2).double()
    model = Unrolled(ProximalDC(2, cg_iters=2).double(), ImagePrior(net), 2)
    x = torch.randn(1, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = op(x).requires_grad_(True)
    x0 = op.A_adjoint(y.detach())
    assert torch.autograd.gradcheck(lambda v: model(v, op, x0=x0), (y,), atol=1e-6)


# -- shapes and dtypes --------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(15, 22), (33, 40), (9, 17)])
def test_unet_accepts_sizes_that_are_not_multiples(hw: tuple[int, int]) -> None:
    net = UNet(2, 3, chans=2, num_pools=3).eval()
    out = net(torch.randn(1, 2, *hw))
    assert out.shape == (1, 3, *hw)


def test_unet_rejects_images_smaller_than_its_depth() -> None:
    with pytest.raises(ValueError, match=r"smaller than 2\*\*num_pools = 8"):
        UNet(2, 2, chans=2, num_pools=3)(torch.randn(1, 2, 7, 12))
    with pytest.raises(ValueError, match="1 x 1 bottleneck"):  # not torch's message from deep inside
        ImagePrior(UNet(2, 2, chans=2, num_pools=3))(torch.randn(1, 8, 5, dtype=torch.complex64))
    assert UNet(2, 2, chans=2, num_pools=3, norm="group")(torch.randn(1, 2, 8, 8)).shape[-2:] == (8, 8)


def test_image_prior_keeps_the_data_precision_and_undoes_normalization_exactly() -> None:
    """complex128 data through an untrained (identity) float32 prior comes back unchanged:
    the residual and the normalization are not rounded to float32."""
    prior = ImagePrior(UNet(2, 2, chans=2, num_pools=2), align_phase=False)
    x = torch.randn(2, 15, 22, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    x = 1e3 * x + 5.0
    out = prior(x)
    assert out.dtype == torch.complex128
    torch.testing.assert_close(out, x, rtol=1e-14, atol=0)


def test_image_prior_normalizes_each_sample_on_its_own() -> None:
    """A flat image's output does not depend on the other images of the batch."""
    net = DnCNN(1, 1, depth=2, features=3)
    with torch.no_grad():
        net.tail.bias.fill_(0.1)
    prior = ImagePrior(net)
    flat = torch.ones(1, 8, 8)
    loud = 1e6 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5))
    alone = prior(flat)
    together = prior(torch.cat([flat, loud]))[:1]
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


def test_image_prior_rejects_a_protocol_batch_of_the_wrong_size() -> None:
    prior = ImagePrior(UNet(2, 2, chans=2, num_pools=1, cond_dim=3))
    with pytest.raises(ValueError, match="argument 'cond' has 2 protocol vectors for 3 images"):
        prior(torch.randn(3, 8, 8, dtype=torch.complex64), torch.ones(2, 3))


def _operators():
    mask = RandomMask([0.3], [2])((15, 22), seed=0).mask
    yield ParallelBeam2D((15, 22), n_angles=8).double(), False
    yield FanBeam2D((15, 22), n_angles=8, source_distance=60.0,
                    detector_distance=30.0).double(), False
    yield SingleCoilMRI(mask[None].double(), image_size=(15, 22)), True
    maps = birdcage_maps(2, (15, 22), dtype=torch.complex128)[None]
    yield MultiCoilMRI(maps, mask[None, None].double()), True


@pytest.mark.parametrize("dc", ["gradient", "proximal"])
def test_float64_models_on_odd_sizes_batch_one(dc: str) -> None:
    for op, cplx in _operators():
        model = build_model(ModelConfig(dc=dc, n_iter=2, chans=2, num_pools=2, cg_iters=2,
                                        cond_dim=2), complex_images=cplx).double()
        dtype = torch.complex128 if cplx else torch.float64
        x = torch.randn(1, 15, 22, dtype=dtype, generator=torch.Generator().manual_seed(6))
        out = model(op(x), op, protocol=torch.tensor([[4.0, 0.1]]))
        assert out.shape == x.shape and out.dtype == dtype, type(op).__name__
        assert torch.isfinite(torch.view_as_real(out) if cplx else out).all()


# -- construction errors ----------------------------------------------------------------
def test_unrolled_rejects_a_dc_layer_with_too_few_iterations() -> None:
    with pytest.raises(ValueError, match=r"argument 'n_iter' \(3\).*\(2\)"):
        Unrolled(GradientDC(2), ImagePrior(DnCNN(2, 2, depth=2, features=2)), 3)


# -- roles and partition --------------------------------------------------------------
def test_a_tensor_shared_by_two_roles_is_rejected() -> None:
    """A LOCAL estimator weight tied into the GLOBAL prior would leave under its alias."""
    est = SensitivityNet(chans=2, num_pools=1)
    model = Unrolled(GradientDC(2), ImagePrior(DnCNN(2, 2, depth=2, features=2)), 2,
                     estimator=est)
    model.priors[0].net.head = est.refine.net.down[0].conv1
    with pytest.raises(ValueError, match="shared by .*estimator.*prior"):
        Partition.default().global_state(model)


def test_tied_parameters_have_one_role_each_and_every_state_key_a_role() -> None:
    model = Unrolled(GradientDC(2), ImagePrior(DnCNN(2, 2, depth=3, features=2)), 2)
    net = model.priors[0].net
    net.tail = net.head  # one module registered under two names (2 -> 2 channels)
    roles = parameter_roles(model)
    assert sorted(roles) == sorted(n for n, _ in model.named_parameters())
    assert set(state_roles(model)) == set(model.state_dict())
    part = Partition.default()
    sent = part.global_state(model)
    kept = part.local_state(model)
    assert set(sent) | set(kept) == set(model.state_dict())
    assert not set(sent) & set(kept)
