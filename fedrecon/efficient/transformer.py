"""A Swin-style transformer prior (SwinIR-like: shallow conv, shifted-window attention blocks,
conv, residual), for :class:`~fedrecon.models.ImagePrior`.

Sizes (``mlp_ratio=2``, about ``8 dim^2`` per block): ``dim=192, depth=12`` is ~3.9M
parameters, ``dim=384, depth=16`` ~20M, ``dim=512, depth=16`` ~36M (tens of millions, for
GPUs); tests run ``dim=8, depth=2``. Every layer
is a plain ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm`` and attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`, so it runs under
``torch.autocast`` (AMP) and takes LoRA adapters on its linear layers.

Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCVW 2021;
Liu et al., "Swin Transformer", ICCV 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedrecon.models.priors import FiLM
from fedrecon.models.roles import Role

__all__ = ["SwinPrior"]


def _partition(x: Tensor, w: int) -> Tensor:
    """``(B, H, W, C) -> (B * nW, w*w, C)``."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _merge(x: Tensor, w: int, b: int, h: int, wd: int) -> Tensor:
    """Inverse of :func:`_partition`."""
    c = x.shape[-1]
    x = x.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


def _shift_mask(h: int, wd: int, w: int, shift: int, device: torch.device) -> Tensor:
    """``(nW, w*w, w*w)`` boolean: True where two tokens of a shifted window may attend (they
    came from the same region of the unshifted image, not wrapped around its border)."""
    ids = torch.zeros(h, wd, device=device)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    n = 0
    for hs in cuts:
        for ws in cuts:
            ids[hs, ws] = n
            n += 1
    win = _partition(ids[None, :, :, None], w)[..., 0]  # (nW, w*w)
    return win[:, :, None] == win[:, None, :]


class RelativePositionBias(nn.Module):
    """A learned ``(heads, N, N)`` attention bias by relative position within a window
    (a leaf module, so a frozen prior can wrap it like any layer)."""

    def __init__(self, heads: int, window: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)

    def forward(self) -> Tensor:
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention within ``w x w`` windows, with a learned relative-position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"argument 'dim' ({dim}) must be a multiple of 'heads' ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias = RelativePositionBias(heads, window)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x``: ``(B*nW, N, C)``; ``mask``: ``(B*nW, N, N)`` boolean or ``None``."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*nW, heads, N, hd)
        bias = self.rel_bias().to(q.dtype)[None]
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, H, W, C)``."""
        b, h, wd, _ = x.shape
        w, s = self.window, self.shift
        y = self.norm1(x)
        mask = None
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
            mask = _shift_mask(h, wd, w, s, x.device).repeat(b, 1, 1)
        y = _merge(self.attn(_partition(y, w), mask), w, b, h, wd)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinPrior(nn.Module):
    """``(B, in_chans, H, W) -> (B, out_chans, H, W)``; ``H, W`` multiples of ``window``
    (:class:`~fedrecon.models.ImagePrior` pads).

    Parameters
    ----------
    dim
        Token (channel) width.
    depth
        Number of transformer blocks; odd blocks use shifted windows.
    heads, window, mlp_ratio
        Attention heads, window side in pixels, MLP hidden width / ``dim``.
    cond_dim
        Protocol-vector length for FiLM after every block (0: none).
    """

    role = Role.PRIOR

    def __init__(self, in_chans: int = 2, out_chans: int = 2, dim: int = 96, depth: int = 6,
                 heads: int = 4, window: int = 8, mlp_ratio: float = 2.0,
                 cond_dim: int = 0) -> None:
        super().__init__()
        for key, val in (("dim", dim), ("depth", depth), ("heads", heads), ("window", window)):
            if val < 1:
                raise ValueError(f"argument '{key}' must be >= 1; got {val}")
        self.window = window
        self.embed = nn.Conv2d(in_chans, dim, 3, padding=1)
        shift = window // 2 if window > 1 else 0
        self.blocks = nn.ModuleList([SwinBlock(dim, heads, window, shift if i % 2 else 0, mlp_ratio)
                                     for i in range(depth)])
        self.films = nn.ModuleList([FiLM(cond_dim, dim) for _ in range(depth)] if cond_dim else [])
        self.norm = nn.LayerNorm(dim)
        self.body_out = nn.Conv2d(dim, dim, 3, padding=1)
        self.out = nn.Conv2d(dim, out_chans, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # the residual prior starts as the identity
        nn.init.zeros_(self.out.bias)

    @property
    def size_multiple(self) -> int:
        return self.window

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        feat = self.embed(x)
        h = feat.permute(0, 2, 3, 1)  # (B, H, W, C)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if len(self.films):
                h = self.films[i](h.permute(0, 3, 1, 2), cond).permute(0, 2, 3, 1)
        h = self.norm(h).permute(0, 3, 1, 2)
        return self.out(F.leaky_relu(self.body_out(h) + feat, 0.2))
