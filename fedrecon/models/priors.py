"""Learned priors: a fastMRI-style U-Net, a DnCNN-style residual CNN, FiLM conditioning,
and the image adapter that feeds them complex MRI or real CT images.

Every module declares its role (see :mod:`fedrecon.models.roles`): the networks are
``PRIOR``, FiLM generators ``CONDITIONING``, the adapter ``ADAPTER``; torch's normalization
layers are ``NORM`` wherever they sit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .roles import Role

__all__ = ["FiLM", "UNet", "DnCNN", "ImagePrior", "squash_protocol"]


def squash_protocol(protocol: Tensor) -> Tensor:
    """``sign(v) * log1p(|v|)``: protocol vectors mix scales (accelerations ~4, distances
    ~500 mm, log10 I0 ~5); this keeps them all O(1) without a fitted normalizer."""
    return torch.sign(protocol) * torch.log1p(protocol.abs())


class FiLM(nn.Module):
    """Feature-wise affine modulation ``(1 + gamma(c)) * h + beta(c)`` from a protocol vector.

    The last layer starts at zero, so an untrained FiLM is the identity.
    """

    role = Role.CONDITIONING

    def __init__(self, cond_dim: int, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            return h
        gamma, beta = self.net(squash_protocol(cond).to(h.dtype)).chunk(2, dim=-1)
        return h * (1 + gamma[..., None, None]) + beta[..., None, None]


def _unit_phase(total: Tensor) -> Tensor:
    """``total / |total|`` (1 where ``total == 0``), with finite gradients everywhere."""
    mag = total.abs()
    ok = mag > 0
    safe = torch.where(ok, mag, torch.ones_like(mag))
    return torch.where(ok, total / safe, torch.ones_like(total))


def _zero_init(conv: nn.Conv2d) -> None:
    """Start the residual prior at the identity: the unrolled net then begins as the
    classical iteration (gradient steps or CG from FBP / A^H y) and learns from there."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"argument 'norm' must be 'instance', 'batch', 'group' or 'none'; got {kind!r}")


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, drop: float, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none")
        self.norm2 = _norm(norm, cout)
        self.drop = nn.Dropout2d(drop) if drop > 0 else nn.Identity()
        self.film = FiLM(cond_dim, cout) if cond_dim > 0 else None

    def forward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        h = self.drop(F.leaky_relu(self.norm1(self.conv1(x)), 0.2))
        h = self.norm2(self.conv2(h))
        if self.film is not None:
            h = self.film(h, cond)
        return self.drop(F.leaky_relu(h, 0.2))


class UNet(nn.Module):
    """U-Net in the fastMRI style: (conv-norm-LeakyReLU) x 2 per level, average-pool down,
    transposed-conv up, skip concatenation, a 1x1 output conv.

    Parameters
    ----------
    in_chans, out_chans
        Channels of ``(B, in_chans, H, W)`` in and ``(B, out_chans, H, W)`` out; ``H`` and ``W``
        must be at least ``2**num_pools``. Other sizes than multiples of ``2**num_pools`` are
        handled as in fastMRI (the upsampled features are padded to the skip's size);
        :class:`ImagePrior` pads to a multiple instead.
    chans
        Channels of the first level (doubling per level).
    cond_dim
        Length of the protocol vector for FiLM conditioning (0: none).
    """

    role = Role.PRIOR

    def __init__(self, in_chans: int = 2, out_chans: int = 2, chans: int = 16, num_pools: int = 3,
                 drop_prob: float = 0.0, norm: str = "instance", cond_dim: int = 0) -> None:
        super().__init__()
        self.num_pools = num_pools
        self.norm_kind = norm
        self.down = nn.ModuleList([_ConvBlock(in_chans, chans, norm, drop_prob, cond_dim)])
        ch = chans
        for _ in range(num_pools - 1):
            self.down.append(_ConvBlock(ch, 2 * ch, norm, drop_prob, cond_dim))
            ch *= 2
        self.bottleneck = _ConvBlock(ch, 2 * ch, norm, drop_prob, cond_dim)
        self.up_conv = nn.ModuleList()
        self.up_block = nn.ModuleList()
        for _ in range(num_pools):
            self.up_conv.append(nn.Sequential(nn.ConvTranspose2d(2 * ch, ch, 2, stride=2, bias=False),
                                              _norm(norm, ch), nn.LeakyReLU(0.2)))
            self.up_block.append(_ConvBlock(2 * ch, ch, norm, drop_prob, cond_dim))
            ch //= 2
        self.out = nn.Conv2d(chans, out_chans, 1)
        _zero_init(self.out)

    @property
    def size_multiple(self) -> int:
        return 2**self.num_pools

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        size = tuple(x.shape[-2:])
        if min(size) < self.size_multiple:
            raise ValueError(f"UNet: input of {size} px is smaller than 2**num_pools = "
                             f"{self.size_multiple} px")
        if self.norm_kind == "instance" and max(size) < 2 * self.size_multiple:
            raise ValueError(f"UNet: input of {size} px leaves a 1 x 1 bottleneck after "
                             f"num_pools = {self.num_pools} poolings, where instance norm is "
                             f"undefined; use a smaller 'num_pools' or larger images")
        skips = []
        h = x
        for block in self.down:
            h = block(h, cond)
            skips.append(h)
            h = F.avg_pool2d(h, 2)
        h = self.bottleneck(h, cond)
        for up, block in zip(self.up_conv, self.up_block):
            skip = skips.pop()
            h = up(h)
            # odd sizes: pooling dropped the last row/column; restore it at the same edge
            dh, dw = skip.shape[-2] - h.shape[-2], skip.shape[-1] - h.shape[-1]
            if dh or dw:
                h = F.pad(h, (0, dw, 0, dh), mode="replicate")
            h = block(torch.cat([h, skip], dim=1), cond)
        return self.out(h)


class DnCNN(nn.Module):
    """DnCNN-style CNN: conv-ReLU, ``depth - 2`` x (conv-norm-ReLU), conv (Zhang et al. 2017)."""

    role = Role.PRIOR

    def __init__(self, in_chans: int = 2, out_chans: int = 2, depth: int = 8, features: int = 32,
                 norm: str = "none", cond_dim: int = 0) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"argument 'depth' must be >= 2; got {depth}")
        self.head = nn.Conv2d(in_chans, features, 3, padding=1)
        self.body = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.films = nn.ModuleList()
        for _ in range(depth - 2):
            self.body.append(nn.Conv2d(features, features, 3, padding=1, bias=norm == "none"))
            self.norms.append(_norm(norm, features))
            if cond_dim > 0:
                self.films.append(FiLM(cond_dim, features))
        self.tail = nn.Conv2d(features, out_chans, 3, padding=1)
        _zero_init(self.tail)

    size_multiple = 1

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = F.relu(self.head(x))
        for i, (conv, norm) in enumerate(zip(self.body, self.norms)):
            h = norm(conv(h))
            if len(self.films):
                h = self.films[i](h, cond)
            h = F.relu(h)
        return self.tail(h)


class ImagePrior(nn.Module):
    """Adapter around a CNN: complex/real images in and out, per-sample normalization, padding,
    and a residual connection, so one network class serves MRI and CT.

    ``forward(x, cond)``: ``x`` is ``(B, H, W)`` complex (MRI: 2 channels real/imag) or real
    (CT: 1 channel); the output has the same shape and dtype. Each sample is normalized to
    zero mean and unit standard deviation per channel before the network and restored after,
    so the prior sees the same scale at every site whatever the data's units.

    With ``align_phase`` (complex images only) each sample is first rotated by its global
    phase ``angle(sum x)`` and rotated back afterwards. An MRI image's global phase is
    arbitrary (receiver phase, random per slice); without the alignment the network must
    learn every rotation of each image from the data, and a small network trained on a few
    volumes learns slowly and generalizes poorly to unseen phases.
    """

    role = Role.ADAPTER

    def __init__(self, net: nn.Module, *, residual: bool = True, normalize: bool = True,
                 align_phase: bool = True) -> None:
        super().__init__()
        self.net = net
        self.residual = residual
        self.normalize = normalize
        self.align_phase = align_phase

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        lead = x.shape[:-2]
        h, w = x.shape[-2:]
        flat = x.reshape(-1, h, w)
        rot = None
        if self.align_phase and flat.is_complex():
            # not detached: the rotation depends on x, and the DC parameters of earlier
            # iterations (and the coil-map estimator) get their gradient through it
            rot = _unit_phase(flat.sum(dim=(-2, -1), keepdim=True))
            flat = flat * rot.conj()
        # (B, C, H, W) in the data's precision; only the network runs in its own dtype, so
        # a float32 prior does not round complex128 data on the residual path
        chans = torch.view_as_real(flat).permute(0, 3, 1, 2) if flat.is_complex() else flat[:, None]
        if self.normalize:
            mean = chans.mean(dim=(-2, -1), keepdim=True)
            scale = chans.abs().amax(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-12)
            std = chans.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6 * scale)  # per sample
            inp = (chans - mean) / std
        else:
            inp = chans
        param = next(self.net.parameters(), None)
        if param is not None and inp.dtype != param.dtype:
            inp = inp.to(param.dtype)  # e.g. complex128 data through a float32 network
        m = int(getattr(self.net, "size_multiple", 1))
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            inp = F.pad(inp, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect"
                        if min(h, w) > max(ph, pw) else "constant")
        c = None
        if cond is not None:
            c = cond.reshape(-1, cond.shape[-1]).to(inp.dtype)
            if c.shape[0] == 1 and inp.shape[0] > 1:
                c = c.expand(inp.shape[0], -1)
            elif c.shape[0] != inp.shape[0]:
                raise ValueError(f"argument 'cond' has {c.shape[0]} protocol vectors for "
                                 f"{inp.shape[0]} images; expected 1 or {inp.shape[0]}")
        out = self.net(inp, c)
        if out.shape[-2:] != inp.shape[-2:]:
            raise ValueError(f"{type(self.net).__name__} changed the image size from "
                             f"{tuple(inp.shape[-2:])} to {tuple(out.shape[-2:])}")
        out = out[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w].to(chans.dtype)
        # (inp + out) * std + mean == chans + out * std, without the round trip's rounding
        if self.normalize:
            out = chans + out * std if self.residual else out * std + mean
        elif self.residual:
            out = chans + out
        if flat.is_complex():
            out = torch.view_as_complex(out.permute(0, 2, 3, 1).contiguous())
            if rot is not None:
                out = out * rot
        else:
            out = out[:, 0].to(x.dtype)
        return out.reshape(*lead, h, w)
