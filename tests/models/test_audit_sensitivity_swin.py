"""Audit of the learned coil-sensitivity estimator (E2E VarNet style) and of the Swin prior,
against independent references written here: a brute-force ACS run, a numpy RSS-normalized
ACS estimate, a brute-force shifted-window mask and relative-position index (Liu et al.
2021), and a loop-by-loop window attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedrecon.efficient.peft import film_partition
from fedrecon.efficient.transformer import (
    RelativePositionBias,
    SwinBlock,
    SwinPrior,
    _merge,
    _partition,
    _shift_mask,
)
from fedrecon.models import (
    ImagePrior,
    ModelConfig,
    Partition,
    Role,
    Scope,
    SensitivityNet,
    acs_coil_maps,
    acs_region,
    build_model,
)

# --------------------------------------------------------------------------- sensitivity


def _ref_run(sampled: list[bool]) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous sampled run through index ``N // 2`` (empty if unsampled)."""
    c = len(sampled) // 2
    if not sampled[c]:
        return c, c
    lo, hi = c, c + 1
    while lo > 0 and sampled[lo - 1]:
        lo -= 1
    while hi < len(sampled) and sampled[hi]:
        hi += 1
    return lo, hi


def _ref_box(mask2d: np.ndarray) -> np.ndarray:
    h, w = mask2d.shape
    on = mask2d != 0
    c0, c1 = _ref_run(list(on[h // 2, :]))
    r0, r1 = _ref_run(list(on[:, w // 2]))
    box = np.zeros((h, w), dtype=np.float32)
    box[r0:r1, c0:c1] = 1
    return box


def _fastmri_band(w: int, n: int) -> torch.Tensor:
    """fastMRI's centre band (``pad = (W - n + 1) // 2``), as the project's masks place it."""
    m = torch.zeros(w)
    pad = (w - n + 1) // 2
    m[pad:pad + n] = 1
    return m


@pytest.mark.parametrize(("w", "n"), [(16, 6), (16, 7), (15, 6), (15, 7), (9, 2), (9, 1)])
def test_acs_region_fastmri_bands_even_odd(w: int, n: int) -> None:
    """Every fastMRI band is found exactly (the odd-W/even-n band sits one column right of
    the centre; it used to be shifted one column left: an unsampled column in, a sampled one
    out)."""
    cols = _fastmri_band(w, n)
    cols[0] = 1  # an isolated line far from the centre is not ACS
    mask = cols.view(1, 1, 1, w)
    box = acs_region(mask, (5, w))
    want = _ref_box(cols.expand(5, w).numpy())
    assert want.sum() == 5 * n
    np.testing.assert_array_equal(box[0].numpy(), want)


def test_acs_region_asymmetric_weighted_bool_and_batched() -> None:
    w, h = 20, 6
    masks = []
    m = _fastmri_band(w, 6)
    m[m.nonzero()[-1] + 1] = 1  # an accelerated line adjacent to the band, on one side
    masks.append(m)
    m = _fastmri_band(w, 6)
    m[m.nonzero()[0] - 1] = 1  # ... on the other side
    masks.append(m)
    m = _fastmri_band(w, 8) * torch.linspace(0.2, 3.0, w)  # weights, not 0/1
    masks.append(m)
    m = torch.zeros(w)
    m[w // 2] = 1  # a single centre line
    masks.append(m)
    batch = torch.stack(masks).view(len(masks), 1, 1, w)
    box = acs_region(batch, (h, w))
    for i, mi in enumerate(masks):
        want = _ref_box(mi.expand(h, w).numpy())
        np.testing.assert_array_equal(box[i].numpy(), want, err_msg=f"sample {i}")
        sampled = (mi != 0).expand(h, w).numpy()
        assert not (box[i].numpy().astype(bool) & ~sampled).any()  # only sampled columns
    torch.testing.assert_close(acs_region(batch != 0, (h, w)), box)  # a boolean mask
    # a 2D mask with an off-centre calibration box (odd rows, asymmetric about the centre)
    m2 = torch.zeros(1, 1, 11, 14)
    m2[..., 4:8, 5:10] = 1
    m2[..., 0, 0] = m2[..., 10, 13] = 1
    np.testing.assert_array_equal(acs_region(m2, (11, 14))[0].numpy(), _ref_box(m2[0, 0].numpy()))


def _np_acs_maps(k: np.ndarray, box: np.ndarray) -> np.ndarray:
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k * box, axes=(-2, -1)), norm="ortho"),
                          axes=(-2, -1))
    rss = np.sqrt((np.abs(img) ** 2).sum(axis=-3, keepdims=True))
    return img / rss


def test_acs_coil_maps_match_numpy_and_unit_rss() -> None:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 3, 8, 9)) + 1j * rng.standard_normal((2, 3, 8, 9))
    mask = np.zeros((2, 1, 1, 9))
    mask[0, ..., 3:7] = 1  # asymmetric about the centre column 4
    mask[1, ..., 4:6] = 1
    maps = acs_coil_maps(torch.from_numpy(k * mask), torch.from_numpy(mask))
    assert maps.dtype == torch.complex128
    for b in range(2):
        want = _np_acs_maps(k[b] * mask[b], _ref_box(np.broadcast_to(mask[b, 0], (8, 9))))
        np.testing.assert_allclose(maps[b].numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(maps.abs().square().sum(1).numpy(), 1.0, atol=1e-12)


def test_maps_of_a_sample_do_not_depend_on_the_batch() -> None:
    """The RSS floor was relative to the whole batch's largest RSS: a quiet sample next to a
    loud one got maps far from unit RSS."""
    torch.manual_seed(0)
    k = torch.randn(2, 3, 8, 8, dtype=torch.complex128)
    k[0] *= 1e-10
    k[1] *= 1e5
    mask = torch.zeros(1, 1, 1, 8)
    mask[..., 2:6] = 1
    both = acs_coil_maps(k * mask, mask)
    for b in range(2):
        alone = acs_coil_maps(k[b:b + 1] * mask, mask)
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.abs().square().sum(1), torch.ones(2, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_zero_rss_gives_zero_maps_and_finite_gradients(dtype: torch.dtype) -> None:
    """A sample (or pixels) with no signal: zero maps, and no NaN gradient through the RSS
    square root (d sqrt / d x is infinite at 0)."""
    torch.manual_seed(0)
    k = torch.randn(2, 3, 8, 8, dtype=dtype)
    k[1] = 0  # e.g. a padded sample
    k.requires_grad_(True)
    mask = torch.zeros(1, 1, 1, 8)
    mask[..., 2:6] = 1
    maps = acs_coil_maps(k * mask, mask)
    assert torch.isfinite(torch.view_as_real(maps)).all()
    assert torch.equal(maps[1], torch.zeros_like(maps[1]))
    (maps.real.sum() + 2 * maps.imag.sum()).backward()
    assert torch.isfinite(torch.view_as_real(k.grad)).all()
    net = SensitivityNet(chans=4, num_pools=1)
    for p in net.parameters():  # a non-trivial U-Net, as after training
        torch.nn.init.normal_(p, std=0.1)
    if dtype == torch.complex128:
        net = net.double()
    out = net(k.detach() * mask, mask)
    out.real.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_one_coil_float64_and_gradcheck() -> None:
    torch.manual_seed(0)
    k = torch.randn(1, 1, 6, 6, dtype=torch.complex128)
    mask = torch.zeros(1, 1, 1, 6)
    mask[..., 2:5] = 1
    maps = acs_coil_maps(k * mask, mask)
    img = _np_acs_maps(k.numpy() * mask.numpy(), _ref_box(np.ones((6, 1)) * mask[0, 0].numpy()))
    np.testing.assert_allclose(maps.numpy(), img, rtol=1e-10, atol=1e-12)  # the pure phase
    torch.testing.assert_close(maps.abs(), torch.ones(1, 1, 6, 6, dtype=torch.float64))
    net = SensitivityNet(chans=2, num_pools=1).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    kk = torch.randn(1, 2, 4, 4, dtype=torch.complex128)
    m4 = torch.zeros(1, 1, 1, 4)
    m4[..., 1:4] = 1
    assert net(kk, m4).dtype == torch.complex128
    assert torch.autograd.gradcheck(lambda x: acs_coil_maps(x, m4), (kk.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: net(x, m4), (kk.clone().requires_grad_(),),
                                    atol=1e-5)


@pytest.mark.parametrize("prior", ["unet", "swin"])
def test_estimator_never_global(prior: str) -> None:
    model = build_model(ModelConfig(n_iter=1, chans=4, num_pools=1, depth=1, heads=2, window=4,
                                    prior=prior, sens_net=True, sens_chans=2),
                        complex_images=True)
    est = [k for k in model.state_dict() if k.startswith("estimator.")]
    assert est
    for part in (Partition.default(), film_partition(), Partition.default().with_local(Role.NORM)):
        glob = set(part.names(model, Scope.GLOBAL))
        assert not glob & set(est)
        assert not set(part.global_state(model)) & set(est)


# --------------------------------------------------------------------------- Swin


def test_partition_and_merge_are_exact_inverses_and_ordered() -> None:
    b, h, wd, c, w = 2, 6, 9, 2, 3
    x = torch.arange(b * h * wd * c, dtype=torch.float64).view(b, h, wd, c)
    parts = _partition(x, w)
    assert parts.shape == (b * (h // w) * (wd // w), w * w, c)
    i = 0
    for bi in range(b):
        for r in range(h // w):
            for q in range(wd // w):
                want = x[bi, r * w:(r + 1) * w, q * w:(q + 1) * w].reshape(w * w, c)
                assert torch.equal(parts[i], want)
                i += 1
    assert torch.equal(_merge(parts, w, b, h, wd), x)


def _region(i: int, n: int, w: int, s: int) -> int:
    """Swin's three slices (0, -w), (-w, -s), (-s, None) of the shifted image."""
    return 0 if i < n - w else (1 if i < n - s else 2)


@pytest.mark.parametrize(("h", "wd", "w", "s"), [(8, 12, 4, 2), (6, 6, 3, 1), (4, 8, 4, 2)])
def test_shift_mask_blocks_exactly_the_wrapped_pairs(h: int, wd: int, w: int, s: int) -> None:
    """Brute force in original coordinates: two tokens of a shifted window may attend iff
    neither of the two axes wraps between them (they are neighbours in the unshifted image)."""
    got = _shift_mask(h, wd, w, s, torch.device("cpu"))
    nwc = wd // w
    assert got.shape == ((h // w) * nwc, w * w, w * w)
    for win in range(got.shape[0]):
        r0, c0 = (win // nwc) * w, (win % nwc) * w
        for a in range(w * w):
            for b in range(w * w):
                ya, xa, yb, xb = r0 + a // w, c0 + a % w, r0 + b // w, c0 + b % w
                # original rows/cols of the rolled tokens: they attend iff not wrapped apart
                oya, oyb = (ya + s) % h, (yb + s) % h
                oxa, oxb = (xa + s) % wd, (xb + s) % wd
                same = oya - oyb == ya - yb and oxa - oxb == xa - xb
                assert same == (_region(ya, h, w, s) == _region(yb, h, w, s)
                                and _region(xa, wd, w, s) == _region(xb, wd, w, s))
                assert bool(got[win, a, b]) == same, (win, a, b)


@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_relative_position_index_is_the_papers(w: int) -> None:
    rpb = RelativePositionBias(heads=2, window=w)
    n = w * w
    want = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dy, dx = i // w - j // w, i % w - j % w
            want[i, j] = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
    assert torch.equal(rpb.index, want)
    bias = rpb()
    assert bias.shape == (2, n, n)
    for i in range(n):
        for j in range(n):
            assert torch.equal(bias[:, i, j], rpb.table[want[i, j]])


def _ref_block(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """A Swin block token by token: each token attends to the tokens of its (shifted)
    window that are its neighbours in the unshifted image, with the paper's bias."""
    b, h, wd, c = x.shape
    w, s = blk.window, blk.shift
    heads = blk.attn.heads
    hd = c // heads
    y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    table = blk.attn.rel_bias.table
    out = torch.zeros_like(x)
    for bi in range(b):
        for py in range(h):
            for px in range(wd):
                ry, rx = (py - s) % h, (px - s) % wd  # rolled coordinates
                keys = []
                for qy in range(h):
                    for qx in range(wd):
                        sy, sx = (qy - s) % h, (qx - s) % wd
                        if sy // w != ry // w or sx // w != rx // w:
                            continue  # another window
                        if s and (_region(sy, h, w, s) != _region(ry, h, w, s)
                                  or _region(sx, wd, w, s) != _region(rx, wd, w, s)):
                            continue  # wrapped around the border
                        keys.append((qy, qx, (ry % w - sy % w + w - 1) * (2 * w - 1)
                                     + (rx % w - sx % w + w - 1)))
                for hh in range(heads):
                    sl = slice(hh * hd, (hh + 1) * hd)
                    qv = q[bi, py, px, sl]
                    logits = torch.stack([qv @ k[bi, qy, qx, sl] / math.sqrt(hd) + table[idx, hh]
                                          for qy, qx, idx in keys])
                    att = torch.softmax(logits, 0)
                    out[bi, py, px, sl] = sum(a * v[bi, qy, qx, sl]
                                              for a, (qy, qx, _) in zip(att, keys, strict=True))
    x = x + out @ blk.attn.proj.weight.T + blk.attn.proj.bias
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_matches_token_by_token_reference(shift: int) -> None:
    torch.manual_seed(0)
    blk = SwinBlock(dim=4, heads=2, window=4, shift=shift, mlp_ratio=2.0).double()
    with torch.no_grad():
        blk.attn.rel_bias.table.normal_()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _ref_block(blk, x), rtol=1e-10, atol=1e-10)


def test_swin_prior_no_wraparound_leak() -> None:
    """Cyclic shift + mask is local: the far corner never reaches the opposite corner (the
    convolutions zero-pad; an unmasked roll would carry (15, 15) to (0, 0) in one block)."""
    torch.manual_seed(0)
    net = SwinPrior(1, 1, dim=4, depth=2, heads=2, window=4).double()
    for p in net.out.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    y = net(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    (g,) = torch.autograd.grad(y[0, 0, 0, 0], x)
    assert g[0, 0, 15, 15] == 0 and g[0, 0, 14:, 14:].abs().sum() == 0
    assert g[0, 0, :3, :3].abs().sum() > 0  # the neighbourhood does reach it
    (g,) = torch.autograd.grad(net(x)[0, 0, 15, 15], x)
    assert g[0, 0, :2, :2].abs().sum() == 0


@pytest.mark.parametrize(("h", "w", "complex_"), [(10, 13, True), (5, 7, False), (3, 2, False)])
def test_swin_through_image_prior_pads_and_crops_exactly(h: int, w: int, complex_: bool) -> None:
    """Non-multiple sizes: the adapter pads (reflect, or zeros when too small) to the window
    and crops back exactly; 1-channel real (CT) and 2-channel complex (MRI), float64."""
    torch.manual_seed(0)
    ch = 2 if complex_ else 1
    net = SwinPrior(ch, ch, dim=4, depth=2, heads=2, window=4).double()
    for p in net.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    prior = ImagePrior(net, align_phase=False)
    x = torch.randn(2, h, w, dtype=torch.complex128 if complex_ else torch.float64)
    out = prior(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    chans = torch.view_as_real(x).permute(0, 3, 1, 2) if complex_ else x[:, None]
    mean = chans.mean(dim=(-2, -1), keepdim=True)
    std = chans.std(dim=(-2, -1), keepdim=True)
    inp = (chans - mean) / std
    ph, pw = (-h) % 4, (-w) % 4
    mode = "reflect" if min(h, w) > max(ph, pw) else "constant"
    padded = F.pad(inp, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)
    with torch.no_grad():
        res = net(padded)[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    want = chans + res * std
    want = torch.view_as_complex(want.permute(0, 2, 3, 1).contiguous()) if complex_ else want[:, 0]
    torch.testing.assert_close(out.detach(), want, rtol=1e-10, atol=1e-10)
