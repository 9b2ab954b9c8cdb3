"""Audit of ``train_local`` / ``evaluate_model``: argument errors, gradient clipping against
a manual computation, the loss's precision for float64 models, shape checks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from fedrecon.datasets import (
    CTAcquisition,
    CTSliceDataset,
    collate_ct_samples,
    write_phantom_volumes,
)
from torch.utils.data import DataLoader

from fedrecon.models import ModelConfig, build_model
from fedrecon.train import evaluate_model, prepare_batch, reconstruct, train_local

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


@pytest.fixture(scope="module")
def ct_batch(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("audit_ct")
    files = write_phantom_volumes(root, n_volumes=1, n_slices=2, image_size=16, seed=0)
    acq = CTAcquisition(geometry="parallel", n_views=12, image_size=(16, 16), pixel_spacing=25.0,
                        det_spacing=25.0, photons=1e5)
    ds = CTSliceDataset(files, acq, seed=0)
    return next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_ct_samples)))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_iter=2, chans=2, num_pools=1), complex_images=False)
    with torch.no_grad():  # leave the identity so that every parameter gets a gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 1, "grad_clip": -1.0}, "argument 'grad_clip' must be None or a number >= 0"),
    ({"steps": 1, "grad_clip": float("nan")}, "argument 'grad_clip'"),
    ({"epochs": 0}, "argument 'epochs' must be >= 1"),
    ({"epochs": -2}, "argument 'epochs' must be >= 1"),
    ({"steps": 1.5}, "argument 'steps' must be >= 1"),
    ({"steps": 1, "loss": 3}, "argument 'loss' must be one of"),
])
def test_train_local_names_the_bad_argument(ct_batch, kwargs: dict, match: str) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        train_local(model, [ct_batch], **kwargs)
    for k, v in model.state_dict().items():  # nothing was trained before the error
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_gradient_clipping_matches_a_manual_step(ct_batch, clip: float) -> None:
    lr = 0.1
    model = _model()
    manual = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_local(model, [ct_batch], steps=1, optimizer=opt, grad_clip=clip, loss="l1")

    prep = prepare_batch(ct_batch)
    out = reconstruct(manual, prep)
    loss = ((out - prep.target).abs().flatten(1).mean(1) / prep.max_value).mean()
    params = list(manual.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    scale = min(1.0, clip / (float(norm) + 1e-6))
    if clip < 1:
        assert scale < 0.1  # the clipping really acts in this case
    for (name, p), p0, g in zip(model.named_parameters(), params, grads):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * scale * g, rtol=1e-5,
                                   atol=1e-7, msg=name)


def test_float64_model_is_trained_on_a_float64_loss(ct_batch) -> None:
    batch = dataclasses.replace(ct_batch, sinogram=ct_batch.sinogram.double())

    def op64(b, device):
        return copy.deepcopy(b.acquisition.make_operator()).double().to(device)

    seen = []

    def loss(x, t, dr):
        seen.append((x.dtype, t.dtype, dr.dtype))
        return ((x - t).square().flatten(1).mean(1) / dr**2).mean()

    model = _model().double()
    r = train_local(model, [batch], steps=2, lr=1e-3, loss=loss, op_factory=op64, seed=0)
    assert seen == [(torch.float64,) * 3] * 2
    assert r.losses[1] < r.losses[0]


def test_a_reconstruction_of_the_wrong_size_is_an_error(ct_batch) -> None:
    """(B, 1, W) broadcasts silently against a (B, H, W) target: the metric must refuse it."""
    with pytest.raises(ValueError, match=r"shape \(2, 1, 16\) but the target has \(2, 16, 16\)"):
        evaluate_model(lambda p: p.target[:, :1], [ct_batch])


def test_a_training_step_reduces_the_loss_and_is_reproducible(ct_batch) -> None:
    runs = [train_local(_model(), [ct_batch], steps=4, lr=1e-2, seed=3).losses for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0]
