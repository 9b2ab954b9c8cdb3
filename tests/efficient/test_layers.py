"""LoRA / frozen / bias-tuned layer wrappers and the Swin-style prior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrecon.efficient import BiasTunedLayer, FrozenLayer, LoRALayer, SwinPrior
from fedrecon.models import Role, parameter_roles, state_roles


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 5, 3, padding=1), nn.ConvTranspose2d(4, 3, 2, stride=2),
                                   nn.Linear(6, 7)], ids=["conv", "convT", "linear"])
def test_lora_merged_weight_is_frozen_plus_low_rank_product(layer: nn.Module) -> None:
    torch.manual_seed(0)
    frozen = layer.weight.detach().clone()
    lora = LoRALayer(layer, rank=2, scale=0.5)
    with torch.no_grad():
        lora.lora.up.normal_()
    expected = frozen + 0.5 * (lora.lora.up @ lora.lora.down).reshape(frozen.shape)
    torch.testing.assert_close(lora.merged_weight(), expected)
    torch.testing.assert_close(lora.weight, frozen)  # the frozen tensor itself is untouched
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 5, 5)
    torch.testing.assert_close(lora(x), lora.merge()(x))
    roles = state_roles(lora)
    assert roles["weight"] is Role.FROZEN and roles["lora.up"] is Role.PEFT
    assert [n for n, _ in lora.named_parameters()] == ["lora.down", "lora.up"]


def test_lora_starts_as_the_pretrained_layer_and_trains_only_factors() -> None:
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 6, 6)
    ref = conv(x).detach()
    lora = LoRALayer(conv, rank=1)
    torch.testing.assert_close(lora(x), ref)
    lora(x).square().sum().backward()
    assert lora.lora.up.grad is not None and lora.weight.grad is None


def test_frozen_layer_keeps_names_and_eval_mode() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
    frozen = FrozenLayer(bn).train()
    assert set(frozen.state_dict()) == set(bn.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x))  # running statistics, not batch ones
    assert not list(frozen.parameters())
    with pytest.raises(ValueError, match="submodules"):
        FrozenLayer(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(nn.Linear(2, 2), rank=0)
    with pytest.raises(ValueError, match="LoRA wraps"):
        LoRALayer(nn.GroupNorm(1, 2), rank=1)


def test_bias_tuned_layer() -> None:
    lin = nn.Linear(3, 2)
    tuned = BiasTunedLayer(lin)
    assert [n for n, _ in tuned.named_parameters()] == ["tuned.bias"]
    torch.testing.assert_close(tuned.tuned.bias, lin.bias)
    with pytest.raises(ValueError, match="no bias"):
        BiasTunedLayer(nn.Conv2d(1, 1, 3, bias=False))


def test_swin_prior_shapes_roles_and_autocast() -> None:
    torch.manual_seed(0)
    net = SwinPrior(2, 2, dim=8, depth=2, heads=2, window=4, cond_dim=3)
    x = torch.randn(2, 2, 8, 12)
    cond = torch.randn(2, 3)
    assert net(x, cond).shape == x.shape
    assert torch.count_nonzero(net(x, cond)) == 0  # zero output conv: the identity residual prior
    roles = set(parameter_roles(net).values())
    assert roles == {Role.PRIOR, Role.NORM, Role.CONDITIONING}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, cond)
    assert torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="multiple of 'heads'"):
        SwinPrior(dim=6, heads=4)


def test_shifted_window_attention_does_not_wrap_around() -> None:
    """With the shift mask, a change at the left border cannot reach the right border within
    one shifted block (it would through the cyclic roll without the mask)."""
    from fedrecon.efficient.transformer import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(4, 1, window=4, shift=2, mlp_ratio=1.0).eval()
    x = torch.randn(1, 8, 8, 4)
    y = x.clone()
    y[0, :, 0] += 1.0
    diff = (block(x) - block(y)).abs().sum(-1)[0]
    assert diff[:, 6:].max() == 0

