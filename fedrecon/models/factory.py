"""Build an unrolled network from a small, validated config (the ``[model]`` table)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .dc import GradientDC, ProximalDC
from .priors import DnCNN, ImagePrior, UNet
from .unrolled import Unrolled

__all__ = ["ModelConfig", "build_model"]


@dataclass(frozen=True)
class ModelConfig:
    """Defaults are sized for 64-128 px images on a CPU. Larger priors: a wide U-Net
    (``chans=32, num_pools=4``: ~7.8M parameters per prior; ``chans=64``: ~31M) or
    ``prior="swin"`` (``chans=384, depth=16``: ~20M; ``chans=512``: ~36M)."""

    dc: str = "gradient"  # gradient (VarNet/LEARN) | proximal (MoDL)
    prior: str = "unet"  # unet | dncnn | swin (transformer: chans = width, depth = blocks)
    n_iter: int = 5
    share_weights: bool = False
    chans: int = 12  # U-Net first-level channels / DnCNN features
    num_pools: int = 3  # U-Net depth
    depth: int = 6  # DnCNN depth
    norm: str = "instance"  # instance | batch | group | none
    cond_dim: int = 0  # protocol-vector length for FiLM conditioning (0: none)
    init_step: float = 1.0  # GradientDC: eta_0 * ||A||^2
    init_lambda: float = 0.05  # ProximalDC: lambda_0 / ||A||^2
    cg_iters: int = 8
    checkpointing: bool = False
    sens_net: bool = False  # MRI: learned coil maps from each slice's ACS (E2E VarNet style)
    sens_chans: int = 8
    heads: int = 4  # swin: attention heads (chans must be a multiple)
    window: int = 8  # swin: attention window side in pixels
    pretrained: str = ""  # prior checkpoint (scripts/pretrain_prior.py) loaded into every model
    peft: str = "none"  # none | lora | bias | film: freeze the pretrained prior, train only these
    lora_rank: int = 4
    lora_scale: float = 1.0  # W + lora_scale * up @ down

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "[model]") -> ModelConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"{where}: unknown key '{key}'{hint} (valid: {', '.join(fields)})")
            expected = type(fields[key].default)
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"{where}: key '{key}' must be {expected.__name__}; got {value!r}")
        cfg = cls(**{k: (float(v) if type(fields[k].default) is float else v) for k, v in data.items()})
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "[model]") -> None:
        if self.dc not in ("gradient", "proximal"):
            raise ValueError(f"{where}: key 'dc' must be 'gradient' or 'proximal'; got {self.dc!r}")
        if self.prior not in ("unet", "dncnn", "swin"):
            raise ValueError(f"{where}: key 'prior' must be 'unet', 'dncnn' or 'swin'; got {self.prior!r}")
        for key in ("n_iter", "chans", "num_pools", "depth", "cg_iters", "heads", "window",
                    "lora_rank", "sens_chans"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: key '{key}' must be >= 1; got {getattr(self, key)}")
        if self.prior == "swin" and self.chans % self.heads:
            raise ValueError(f"{where}: key 'chans' ({self.chans}) must be a multiple of 'heads' "
                             f"({self.heads}) for prior 'swin'")
        if self.peft not in ("none", "lora", "bias", "film"):
            raise ValueError(f"{where}: key 'peft' must be 'none', 'lora', 'bias' or 'film'; "
                             f"got {self.peft!r}")
        if self.peft != "none" and not self.pretrained:
            raise ValueError(f"{where}: key 'peft' = {self.peft!r} freezes the prior, so it needs "
                             f"key 'pretrained' (a checkpoint from scripts/pretrain_prior.py)")
        if self.peft == "film" and self.cond_dim < 1:
            raise ValueError(f"{where}: key 'peft' = 'film' trains only FiLM layers: set key "
                             f"'cond_dim' >= 1")


def build_model(cfg: ModelConfig | None = None, *, complex_images: bool) -> Unrolled:
    """An :class:`Unrolled` network for complex (MRI) or real (CT) images."""
    cfg = cfg or ModelConfig()
    cfg.validate()
    chans = 2 if complex_images else 1
    net: nn.Module
    if cfg.prior == "unet":
        net = UNet(chans, chans, chans=cfg.chans, num_pools=cfg.num_pools, norm=cfg.norm,
                   cond_dim=cfg.cond_dim)
    elif cfg.prior == "swin":
        from fedrecon.efficient.transformer import SwinPrior  # optional: imported when asked for

        net = SwinPrior(chans, chans, dim=cfg.chans, depth=cfg.depth, heads=cfg.heads,
                        window=cfg.window, cond_dim=cfg.cond_dim)
    else:
        net = DnCNN(chans, chans, depth=cfg.depth, features=cfg.chans,
                    norm=cfg.norm if cfg.norm != "instance" else "none", cond_dim=cfg.cond_dim)
    dc: nn.Module
    if cfg.dc == "gradient":
        dc = GradientDC(cfg.n_iter, cfg.init_step)
    else:
        dc = ProximalDC(cfg.n_iter, cfg.init_lambda, cfg.cg_iters)
    estimator = None
    if cfg.sens_net:
        if not complex_images:
            raise ValueError("[model]: key 'sens_net' applies to (complex) MRI images only")
        from .sensitivity import SensitivityNet

        estimator = SensitivityNet(cfg.sens_chans)
    model = Unrolled(dc, ImagePrior(net), cfg.n_iter, share_weights=cfg.share_weights,
                     checkpointing=cfg.checkpointing, estimator=estimator)
    if cfg.pretrained:
        from fedrecon.efficient.pretrain import load_prior_checkpoint

        load_prior_checkpoint(model, cfg.pretrained)
    if cfg.peft != "none":
        from fedrecon.efficient.peft import apply_peft

        apply_peft(model, cfg.peft, rank=cfg.lora_rank, scale=cfg.lora_scale)
    return model
