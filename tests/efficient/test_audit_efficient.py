"""Audit of fedrecon.efficient: each test pins one fixed bug, against an independent
reference (exact integer arithmetic, numpy float64, the serialized bytes themselves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedrecon.efficient import (
    RESIDUAL_KEY,
    LoRALayer,
    UpdateCompressor,
    compress_tensor,
    decompress_tensor,
    save_prior_checkpoint,
)
from fedrecon.efficient.wire import EncodedTensor, Message, decode, encode
from fedrecon.federated import MemoryStore, SiteUpdate, check_update
from fedrecon.models import ModelConfig, Role, build_model, state_roles


def _wire(e: EncodedTensor) -> tuple[EncodedTensor, int]:
    blob = encode(Message({}, {"t": e}))
    return decode(blob).tensors["t"], len(blob)


# -- compression --------------------------------------------------------------------------

def test_topk_with_fraction_one_sends_float64_exactly() -> None:
    """fraction = 1 is not lossy (no error feedback), so it must not round float64 to float32."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) / 3
    back, _ = _wire(compress_tensor(t, "topk", 1.0))
    out = decompress_tensor(back)
    assert out.dtype == torch.float64
    assert np.array_equal(out.numpy(), t.numpy())
    assert back.parts[0].dtype == np.float64 and back.parts[0].size == 30
    start = {"w": torch.zeros(6, 5, dtype=torch.float64)}
    got, _ = UpdateCompressor({"method": "topk", "fraction": 1.0}).transmit(
        0, SiteUpdate("s", 0, {"w": t}, "weights", 1), start, MemoryStore())
    assert np.array_equal(got.tensors["w"].numpy(), t.numpy())


@pytest.mark.parametrize(("percent", "numel"), [(7, 100), (14, 100), (28, 50), (17, 300), (25, 36)])
def test_topk_sends_ceil_of_the_fraction_as_written(percent: int, numel: int) -> None:
    """0.07 of 100 entries is 7 (the float product 7.000000000000001 gave 8)."""
    k = -(-percent * numel // 100)  # exact integer ceil
    t = torch.randn(numel, generator=torch.Generator().manual_seed(percent)) + 10.0  # no zeros
    for method in ("topk", "topk_int8"):
        back, nbytes = _wire(compress_tensor(t, method, percent / 100))
        assert back.parts[0].size == back.parts[1].size == k
        assert int(torch.count_nonzero(decompress_tensor(back))) == k
        per_entry = 4 + (4 if method == "topk" else 1)
        empty = len(encode(Message({}, {"t": EncodedTensor(
            method, (numel,), "float32", [back.parts[0][:0], back.parts[1][:0]], back.scale)})))
        # payload + the digits of k in the header (written once per part)
        assert nbytes - empty == k * per_entry + 2 * (len(str(k)) - 1)


@pytest.mark.parametrize("method", ["int8", "topk_int8", "topk"])
def test_non_finite_update_reaches_the_server_and_leaves_no_residual(method: str) -> None:
    """int8 turned NaN/inf into a zero update (the server's finiteness check never saw it);
    top-k sent the NaN but kept a NaN residual that poisoned every later round."""
    delta = torch.tensor([0.5, float("nan"), -2.0, float("inf"), 1.0, 0.25])
    store = MemoryStore()
    comp = UpdateCompressor({"method": method, "fraction": 0.5})
    got, _ = comp.transmit(0, SiteUpdate("s", 0, {"w": delta}, "delta", 1), {"w": torch.zeros(6)},
                           store)
    w = got.tensors["w"]
    assert bool(torch.isnan(w[1])) and w[3] == float("inf")
    finite = torch.tensor([True, False, True, False, True, True])
    assert np.array_equal(w[finite].numpy(), delta[finite].numpy())
    with pytest.raises(ValueError):
        check_update(got, ["w"])
    assert bool(torch.isfinite(store.get("s")[RESIDUAL_KEY]["w"]).all())


def test_float64_beyond_float32_range_is_not_zeroed() -> None:
    t = torch.tensor([1e300, -3.0, 2.0], dtype=torch.float64)
    for method in ("int8", "topk_int8"):
        out = decompress_tensor(_wire(compress_tensor(t, method, 0.5))[0])
        assert np.array_equal(out.numpy(), t.numpy()), method


def test_compress_tensor_rejects_bad_arguments() -> None:
    t = torch.randn(10)
    for method in ("topK", "int4", ""):
        with pytest.raises(ValueError, match=r"argument 'method' must be one of"):
            compress_tensor(t, method, 0.5)
    for fraction in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"argument 'fraction' must be a number in \(0, 1\]"):
            compress_tensor(t, "topk", fraction)


def test_decompress_refuses_malformed_tensors() -> None:
    """A negative index wrapped around silently, a missing scale decoded as zeros."""
    bad = [
        EncodedTensor("topk", (4,), "float32", [np.array([-1], np.int32), np.array([5.0], np.float32)]),
        EncodedTensor("topk", (4,), "float32", [np.array([4], np.int32), np.array([5.0], np.float32)]),
        EncodedTensor("int8", (3,), "float32", [np.array([1, 2, 3], np.int8)], None),
        EncodedTensor("topk_int8", (3,), "float32", [np.array([0], np.int32), np.array([9], np.int8)],
                      float("nan")),
        EncodedTensor("dense", (2, 2), "float32", [np.zeros(3, np.float32)]),
    ]
    for e in bad:
        with pytest.raises(ValueError, match="encoded tensor"):
            decompress_tensor(e)


# -- LoRA ---------------------------------------------------------------------------------

def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def test_lora_factors_follow_the_frozen_weight_dtype() -> None:
    """Float32 factors of a float64 layer: the product was rounded to float32."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).double()
    lora = LoRALayer(layer, rank=3, scale=0.5)
    with torch.no_grad():
        lora.lora.up.normal_()
    assert lora.lora.up.dtype == lora.lora.down.dtype == torch.float64
    ref = _np64(lora.weight) + 0.5 * _np64(lora.lora.up) @ _np64(lora.lora.down)
    np.testing.assert_allclose(lora.merged_weight().detach().numpy(), ref, rtol=0, atol=1e-13)


def test_lora_merge_follows_the_wrapper_dtype() -> None:
    """After ``.double()`` the merged plain layer was float32 (and could not take the input)."""
    torch.manual_seed(1)
    lora = LoRALayer(nn.Linear(4, 3), rank=2, scale=0.25).double()
    with torch.no_grad():
        lora.lora.up.normal_()
    plain = lora.merge()
    assert plain.weight.dtype == torch.float64
    x = torch.randn(5, 4, dtype=torch.float64)
    w = _np64(lora.weight) + 0.25 * _np64(lora.lora.up) @ _np64(lora.lora.down)
    ref = x.numpy() @ w.T + _np64(lora.bias)
    np.testing.assert_allclose(plain(x).detach().numpy(), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lora(x).detach().numpy(), ref, rtol=0, atol=1e-12)


# -- PEFT ---------------------------------------------------------------------------------

def test_peft_leaves_the_sealed_sensitivity_estimator_alone(tmp_path: Path) -> None:
    """The estimator's U-Net is declared PRIOR but sealed as ESTIMATOR: it is never pretrained,
    so PEFT froze it at its random initialization."""
    base = {"n_iter": 2, "chans": 4, "num_pools": 1, "sens_net": True, "sens_chans": 4}
    torch.manual_seed(0)
    path = save_prior_checkpoint(build_model(ModelConfig(**base), complex_images=True),
                                 tmp_path / "prior.pt")
    plain = build_model(ModelConfig(**base), complex_images=True)
    for method in ("lora", "bias"):
        model = build_model(ModelConfig(**base, pretrained=str(path), peft=method),
                            complex_images=True)
        want = {n for n, _ in plain.named_parameters() if n.startswith("estimator.")}
        got = {n for n, p in model.named_parameters() if n.startswith("estimator.") and p.requires_grad}
        assert want and got == want, method
        roles = state_roles(model)
        assert all(r is Role.ESTIMATOR for n, r in roles.items() if n.startswith("estimator."))
        assert any(".lora." in n or ".tuned." in n for n in roles if n.startswith("priors."))
