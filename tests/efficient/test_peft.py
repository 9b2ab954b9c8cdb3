"""PEFT of a frozen pretrained prior through the model factory, and prior checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedrecon.efficient import (
    apply_peft,
    film_partition,
    load_prior_checkpoint,
    save_prior_checkpoint,
)
from fedrecon.models import ModelConfig, Partition, Role, Scope, build_model, parameter_roles


def _cfg(**kw) -> ModelConfig:
    base = dict(n_iter=2, chans=4, num_pools=1, norm="group")
    return ModelConfig(**(base | kw))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(_cfg(), complex_images=False)
    with torch.no_grad():
        for p in model.priors.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return save_prior_checkpoint(model, tmp_path / "prior.pt", config=_cfg())


def test_pretrained_weights_are_loaded_and_frozen_under_lora(ckpt: Path) -> None:
    saved = torch.load(ckpt, weights_only=False)["prior_state"]
    model = build_model(_cfg(pretrained=str(ckpt), peft="lora", lora_rank=2), complex_images=False)
    state = model.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(state[f"priors.{k}"], v)  # same names after wrapping
    roles = parameter_roles(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {roles[n] for n in trainable} == {Role.PEFT, Role.DC}
    part = Partition.default()
    sent = part.names(model, Scope.GLOBAL)
    assert sent and all(".lora." in n for n in sent)
    assert not any(k in sent for k in saved)
    frozen = [k for k, r in roles.items() if r is Role.FROZEN]
    assert not frozen  # frozen tensors are buffers, not parameters
    assert not any(k.startswith("priors.") and ".lora." not in k for k in part.local_state(model))


def test_bias_and_film_methods(ckpt: Path) -> None:
    bias = build_model(_cfg(pretrained=str(ckpt), peft="bias"), complex_images=False)
    sent = Partition.default().names(bias, Scope.GLOBAL)
    assert sent and all(n.endswith("tuned.bias") for n in sent)
    film = build_model(_cfg(pretrained=str(ckpt), peft="film", cond_dim=3), complex_images=False)
    assert Partition.default().names(film, Scope.GLOBAL) == []  # FiLM local: nothing sent
    shared = film_partition().names(film, Scope.GLOBAL)
    assert shared and all(".film." in n for n in shared)


def test_shared_prior_checkpoint_initializes_every_iteration(tmp_path: Path) -> None:
    shared = build_model(_cfg(share_weights=True), complex_images=False)
    path = save_prior_checkpoint(shared, tmp_path / "shared.pt")
    model = build_model(_cfg(n_iter=3, pretrained=str(path)), complex_images=False)
    for prior in model.priors:
        torch.testing.assert_close(prior.state_dict(), shared.priors[0].state_dict())


def test_checkpoint_errors(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"\[model\] pretrained.*does not exist"):
        build_model(_cfg(pretrained=str(tmp_path / "nope.pt")), complex_images=False)
    with pytest.raises(ValueError, match="lacks tensors"):
        build_model(_cfg(num_pools=2, pretrained=str(ckpt)), complex_images=False)
    with pytest.raises(ValueError, match="other shapes"):
        build_model(_cfg(chans=8, pretrained=str(ckpt)), complex_images=False)
    with pytest.raises(ValueError, match="has tensors this model lacks"):
        build_model(_cfg(n_iter=1, pretrained=str(ckpt)), complex_images=False)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a prior checkpoint"):
        build_model(_cfg(pretrained=str(tmp_path / "other.pt")), complex_images=False)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="'peft'.*needs key 'pretrained'"):
        ModelConfig.from_dict({"peft": "lora"})
    with pytest.raises(ValueError, match="'peft' must be"):
        ModelConfig.from_dict({"peft": "prompt", "pretrained": "x"})
    with pytest.raises(ValueError, match="'cond_dim'"):
        ModelConfig.from_dict({"peft": "film", "pretrained": "x"})
    with pytest.raises(ValueError, match="'lora_rank' must be >= 1"):
        ModelConfig.from_dict({"lora_rank": 0})
    with pytest.raises(ValueError, match="did you mean 'lora_rank'"):
        ModelConfig.from_dict({"lora_rnak": 2})
    with pytest.raises(ValueError, match="'chans'.*multiple of 'heads'"):
        ModelConfig.from_dict({"prior": "swin", "chans": 6, "heads": 4})
    assert ModelConfig() == ModelConfig.from_dict({})  # defaults unchanged


def test_swin_prior_with_lora_through_the_factory(tmp_path: Path) -> None:
    cfg = _cfg(prior="swin", chans=8, depth=2, heads=2, window=4)
    path = save_prior_checkpoint(build_model(cfg, complex_images=True), tmp_path / "swin.pt")
    model = build_model(ModelConfig(**(cfg.__dict__ | {"pretrained": str(path), "peft": "lora"})),
                        complex_images=True)
    sent = Partition.default().names(model, Scope.GLOBAL)
    assert any(".attn.qkv.lora." in n for n in sent) and all(".lora." in n for n in sent)
    x = torch.randn(1, 12, 12, dtype=torch.complex64)
    assert model.priors[0](x).shape == x.shape


def test_apply_peft_errors() -> None:
    model = build_model(_cfg(), complex_images=False)
    with pytest.raises(ValueError, match="'method'"):
        apply_peft(model, "prompt")
    with pytest.raises(ValueError, match="cond_dim > 0"):
        apply_peft(build_model(_cfg(), complex_images=False), "film")
    apply_peft(model, "lora")
    with pytest.raises(ValueError, match="already frozen"):
        apply_peft(model, "lora")
