"""Unrolled networks: shapes, dtypes, gradient flow, DC behaviour, roles and partition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedrecon.models import (
    DnCNN,
    GradientDC,
    ImagePrior,
    ModelConfig,
    Partition,
    ProximalDC,
    Role,
    Scope,
    UNet,
    Unrolled,
    build_model,
    parameter_roles,
    state_roles,
)
from fedrecon.operators import MultiCoilMRI, ParallelBeam2D, RandomMask, birdcage_maps, shepp_logan

N = 32


def _mri_problem(device, batch=2, dtype=torch.complex64):
    x = shepp_logan(N, dtype=torch.float64).to(dtype).to(device)
    x = torch.stack([x * (1 + 0.5j * k) for k in range(batch)])
    maps = birdcage_maps(4, (N, N), dtype=dtype, device=device).expand(batch, 4, N, N)
    mask = torch.stack([RandomMask([0.1], [4])((N, N), seed=s).mask for s in range(batch)])
    op = MultiCoilMRI(maps.contiguous(), mask[:, None].to(device))
    return op, op(x), x


def _ct_problem(device, batch=2):
    op = ParallelBeam2D(N, n_angles=24).to(device)
    x = shepp_logan(N).to(device).expand(batch, N, N).contiguous()
    return op, op(x), x


COMBOS = list(itertools.product(["gradient", "proximal"], ["unet", "dncnn"], ["mri", "ct"]))


@pytest.mark.parametrize("dc,prior,modality", COMBOS)
def test_shapes_dtypes_and_gradient_flow(dc: str, prior: str, modality: str,
                                         device: torch.device) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dc=dc, prior=prior, n_iter=2, chans=4, num_pools=2, depth=3, cond_dim=3,
                      cg_iters=3)
    model = build_model(cfg, complex_images=modality == "mri").to(device)
    with torch.no_grad():  # leave the identity initialization so every layer sees gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    op, y, x = _mri_problem(device) if modality == "mri" else _ct_problem(device)
    protocol = torch.tensor([[4.0, 0.08, 4.0], [8.0, 0.04, 4.0]], device=device)
    out = model(y, op, protocol=protocol)
    assert out.shape == x.shape and out.dtype == x.dtype
    loss = (out - x).abs().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # the DC parameters, the prior and the FiLM conditioning all receive signal
    grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters()}
    assert any(v > 0 for n, v in grads.items() if n.startswith("dc."))
    assert any(v > 0 for n, v in grads.items() if ".net." in n and "film" not in n)
    assert any(v > 0 for n, v in grads.items() if "film" in n and n.endswith("net.2.weight"))


def test_double_precision_input_through_float32_prior() -> None:
    model = build_model(ModelConfig(n_iter=1, chans=4, num_pools=2), complex_images=True)
    op, y, x = _mri_problem("cpu", dtype=torch.complex128)
    out = model(y, op)
    assert out.dtype == torch.complex128


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_gradient_dc_step_reduces_residual(modality: str) -> None:
    op, y, x = _mri_problem("cpu") if modality == "mri" else _ct_problem("cpu")
    z = torch.zeros_like(x)
    dc = GradientDC(n_iter=1, init_step=1.0)
    before = torch.linalg.vector_norm(op(z) - y)
    after = torch.linalg.vector_norm(op(dc(z, y, op, 0)) - y)
    assert after < 0.95 * before


def test_proximal_dc_matches_direct_solution() -> None:
    torch.manual_seed(0)
    op = ParallelBeam2D(12, n_angles=10, det_count=17).double()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    y = op(x) + 0.1 * torch.randn(2, 10, 17, dtype=torch.float64)
    z = torch.randn(2, 12, 12, dtype=torch.float64)
    dc = ProximalDC(n_iter=1, init_lambda=0.05, cg_iters=200).double()
    out = dc(z, y, op, 0)
    mat, _ = op.matrices(torch.float64)
    a = mat.to_dense()
    lam = float(dc.penalty(0).detach()) * op.norm_bound() ** 2
    lhs = a.T @ a + lam * torch.eye(144, dtype=torch.float64)
    rhs = (a.T @ y.reshape(2, -1).T + lam * z.reshape(2, -1).T)
    direct = torch.linalg.solve(lhs, rhs).T.reshape(2, 12, 12)
    assert torch.allclose(out, direct, rtol=1e-6, atol=1e-8)


def test_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    op, y, x = _ct_problem("cpu")
    cfg = ModelConfig(n_iter=3, chans=4, num_pools=2)
    a = build_model(cfg, complex_images=False)
    b = build_model(ModelConfig(**{**cfg.__dict__, "checkpointing": True}), complex_images=False)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        (m(y, op) - x).square().mean().backward()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7), na


def test_untrained_prior_is_the_identity() -> None:
    # zero-initialized output layers: an untrained network is the classical iteration
    for net in (UNet(2, 2, chans=4, num_pools=2), DnCNN(2, 2, depth=3, features=4)):
        prior = ImagePrior(net)
        x = torch.randn(2, 16, 16, dtype=torch.complex64)
        assert torch.allclose(prior(x), x, atol=1e-5)


def test_film_is_identity_at_initialization() -> None:
    torch.manual_seed(0)
    net = UNet(2, 2, chans=4, num_pools=2, cond_dim=3)
    torch.nn.init.normal_(net.out.weight, 0, 0.1)
    plain = UNet(2, 2, chans=4, num_pools=2, cond_dim=0)
    plain_state = {k: v for k, v in net.state_dict().items() if "film" not in k}
    plain.load_state_dict(plain_state)
    x = torch.randn(2, 2, 16, 16)
    cond = torch.tensor([[4.0, 0.08, 8.0], [8.0, 0.04, 15.0]])
    assert torch.allclose(net(x, cond), plain(x), atol=1e-6)


def test_image_prior_pads_odd_sizes_and_keeps_scale_equivariance() -> None:
    torch.manual_seed(0)
    net = UNet(2, 2, chans=4, num_pools=2)
    torch.nn.init.normal_(net.out.weight, 0, 0.1)
    prior = ImagePrior(net).eval()
    x = torch.randn(3, 19, 23, dtype=torch.complex64)
    out = prior(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x, atol=1e-3)
    # per-sample normalization: the prior commutes with a positive rescaling of its input
    assert torch.allclose(prior(7.0 * x), 7.0 * out, rtol=1e-4, atol=1e-5)


def test_every_parameter_has_a_role_and_dc_is_local() -> None:
    configs = [ModelConfig(dc=d, prior=p, norm=n, cond_dim=c, n_iter=2, chans=4, num_pools=2)
               for d in ("gradient", "proximal") for p in ("unet", "dncnn")
               for n in ("instance", "batch", "group") for c in (0, 3)]
    part = Partition.default()
    for cfg in configs:
        for cplx in (True, False):
            model = build_model(cfg, complex_images=cplx)
            roles = parameter_roles(model)
            assert set(roles) == {n for n, _ in model.named_parameters()}
            local = set(part.names(model, Scope.LOCAL))
            for name, role in state_roles(model).items():
                if role == Role.DC:
                    assert name in local, name
                if role in (Role.PRIOR,):
                    assert name not in local, name
            if cfg.cond_dim:
                assert any(r == Role.CONDITIONING for r in roles.values())
            if cfg.norm in ("batch", "group") and cfg.prior == "unet":
                assert any(r == Role.NORM for r in roles.values())
            assert all(k not in local for k in part.global_state(model))


def test_partition_fedbn_and_load_global() -> None:
    model = build_model(ModelConfig(norm="batch", n_iter=2, chans=4, num_pools=2), complex_images=False)
    fedbn = Partition.default().with_local(Role.NORM)
    g = fedbn.global_state(model)
    assert not any("running_mean" in k for k in g)
    other = build_model(ModelConfig(norm="batch", n_iter=2, chans=4, num_pools=2), complex_images=False)
    fedbn.load_global(other, g)
    for k, v in g.items():
        assert torch.equal(other.state_dict()[k], v)
    with pytest.raises(ValueError, match="not GLOBAL"):
        fedbn.load_global(other, {**g, "dc.raw_step": torch.zeros(2)})
    with pytest.raises(ValueError, match="unknown role"):
        Partition.from_names(["dcc"])


def test_unrolled_without_a_role_is_rejected() -> None:
    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, cond=None):
            return x * (1 + self.w)

    model = Unrolled(GradientDC(2), Bare(), 2)
    with pytest.raises(ValueError, match="no declared role"):
        parameter_roles(model)


def test_model_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown key 'n_iters'.*did you mean 'n_iter'"):
        ModelConfig.from_dict({"n_iters": 3})
    with pytest.raises(ValueError, match="'chans' must be int"):
        ModelConfig.from_dict({"chans": "wide"})
    assert ModelConfig.from_dict({"init_step": 2}).init_step == 2.0


def test_dncnn_depth_validation() -> None:
    with pytest.raises(ValueError, match="'depth'"):
        DnCNN(depth=1)
    assert math.isfinite(float(DnCNN(depth=2)(torch.zeros(1, 2, 8, 8)).detach().sum()))


def test_image_prior_is_equivariant_to_a_global_phase() -> None:
    """``align_phase``: prior(e^{i phi} x) = e^{i phi} prior(x) (the receiver phase is arbitrary)."""
    from fedrecon.models.priors import ImagePrior, UNet

    torch.manual_seed(0)
    net = UNet(2, 2, chans=4, num_pools=1)
    torch.nn.init.normal_(net.out.weight, std=0.1)  # not the identity
    x = torch.randn(3, 16, 16, dtype=torch.complex64) + 0.5
    rot = torch.exp(1j * torch.tensor([0.3, 2.0, -2.5]))[:, None, None].to(torch.complex64)
    aligned = ImagePrior(net).eval()
    torch.testing.assert_close(aligned(x * rot), aligned(x) * rot, rtol=1e-4, atol=1e-5)
    plain = ImagePrior(net, align_phase=False).eval()
    assert not torch.allclose(plain(x * rot), plain(x) * rot, rtol=1e-4, atol=1e-5)
