"""A plain-PyTorch local training loop and evaluation (no Lightning in the core)."""

from __future__ import annotations

import numbers
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from fedrecon.metrics import nmse, psnr, ssim

from .batching import OpFactory, Prepared, prepare_batch, to_target_space

__all__ = ["LOSSES", "TrainResult", "seed_everything", "train_local", "evaluate_model",
           "reconstruct"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _l1(x: Tensor, t: Tensor, dr: Tensor) -> Tensor:
    return ((x - t).abs().flatten(1).mean(1) / dr).mean()


def _mse(x: Tensor, t: Tensor, dr: Tensor) -> Tensor:
    return ((x - t).square().flatten(1).mean(1) / dr**2).mean()


def _ssim_loss(x: Tensor, t: Tensor, dr: Tensor) -> Tensor:
    return 1.0 - ssim(x, t, dr).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "l1": _l1, "mse": _mse, "ssim": _ssim_loss,
}


@dataclass
class TrainResult:
    steps: int
    examples: int
    mean_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def _cycle(loader: Iterable) -> Iterator:
    while True:
        yielded = False
        for item in loader:
            yielded = True
            yield item
        if not yielded:
            raise ValueError("argument 'loader' yielded no batches")


def _check_same_shape(out: Tensor, prepared: Prepared) -> None:
    """Losses and metrics broadcast: a reconstruction of another size than its target must
    be an error, not a silently wrong number."""
    if prepared.target is not None and out.shape != prepared.target.shape:
        raise ValueError(f"the reconstruction in target space has shape {tuple(out.shape)} but "
                         f"the target has {tuple(prepared.target.shape)} (files "
                         f"{prepared.fnames[:3]}; crop size {prepared.crop_size})")


def reconstruct(model: nn.Module, prepared: Prepared) -> Tensor:
    """Run ``model`` on a prepared batch; returns the image in target space."""
    x = model(prepared.y, prepared.op, protocol=prepared.protocol)
    return to_target_space(x, prepared)


def train_local(model: nn.Module, loader: Iterable, *, steps: int | None = None,
                epochs: int | None = None, optimizer: torch.optim.Optimizer | None = None,
                lr: float = 1e-3, loss: str | Callable[[Tensor, Tensor, Tensor], Tensor] = "l1",
                op_factory: OpFactory | None = None, grad_clip: float | None = 1.0,
                amp: bool = False, channels_last: bool = False, seed: int | None = None,
                device: torch.device | str | None = None,
                regularizer: Callable[[nn.Module], Tensor] | None = None,
                progress: bool = False) -> TrainResult:
    """Train ``model`` on the batches of ``loader`` for ``steps`` batches or ``epochs`` passes.

    Each batch's operator is built here from its own parameters (``op_factory`` overrides
    the default, see :func:`~fedrecon.train.batching.prepare_batch`). Losses compare the
    reconstruction with the target, both divided by the sample's data range. ``regularizer``
    adds a term of the model (FedProx's proximal term, Ditto's pull to the global model).
    ``amp`` and ``channels_last`` take effect on CUDA only.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of 'steps' and 'epochs'")
    for name, count in (("steps", steps), ("epochs", epochs)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral)
                                  or count < 1):
            raise ValueError(f"argument '{name}' must be >= 1 (an int); got {count!r}")
    loss_fn = LOSSES[loss] if isinstance(loss, str) and loss in LOSSES else loss
    if isinstance(loss_fn, str) or not callable(loss_fn):
        raise ValueError(f"argument 'loss' must be one of {sorted(LOSSES)} or a callable; got {loss!r}")
    # a negative max norm would flip every gradient (clip_grad_norm_ scales by max_norm / norm)
    if grad_clip is not None and not (isinstance(grad_clip, numbers.Real) and grad_clip >= 0):
        raise ValueError(f"argument 'grad_clip' must be None or a number >= 0 (0 or None: no "
                         f"clipping); got {grad_clip!r}")
    if seed is not None:
        seed_everything(seed)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    cuda = dev.type == "cuda"
    if channels_last and cuda:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    model.train()
    if steps is not None:
        batches: Iterable = (b for _, b in zip(range(steps), _cycle(loader)))
        total = steps
    else:
        batches = (b for _ in range(epochs or 0) for b in loader)
        total = None
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc="local steps", leave=False)
    losses: list[float] = []
    examples = 0
    t0 = time.perf_counter()
    for batch in batches:
        prep = prepare_batch(batch, dev, op_factory)
        if prep.target is None:
            raise ValueError("training needs targets; this batch has none (test/challenge files?)")
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=amp and cuda):
            out = reconstruct(model, prep)
            _check_same_shape(out, prep)
            # at least float32 (AMP's half outputs), and a float64 model keeps its precision
            dtype = torch.promote_types(out.dtype, torch.float32)
            value = loss_fn(out.to(dtype), prep.target.to(dtype), prep.max_value.to(dtype))
            if regularizer is not None:
                value = value + regularizer(model)
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite training loss at step {len(losses)} "
                                     f"(files {prep.fnames[:3]})")
        scaler.scale(value).backward()
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
        losses.append(float(value.detach()))
        examples += prep.y.shape[0]
    if not losses:
        raise ValueError("argument 'loader' yielded no batches")
    return TrainResult(len(losses), examples, float(np.mean(losses)), losses[-1],
                       time.perf_counter() - t0, losses)


@torch.no_grad()
def evaluate_model(model: nn.Module | Callable[[Prepared], Tensor], loader: Iterable, *,
                   op_factory: OpFactory | None = None,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM/NMSE over slices (data range: the volume's max for MRI, the slice's
    max for CT). ``model`` may be a callable ``Prepared -> image`` (a classical baseline).
    ``device``: default the model's (the CPU for a callable or a model without parameters)."""
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else "cpu"
    dev = torch.device(device)
    if isinstance(model, nn.Module):
        model.eval()
    rows: dict[str, list[float]] = {"psnr": [], "ssim": [], "nmse": []}
    for batch in loader:
        prep = prepare_batch(batch, dev, op_factory)
        if prep.target is None:
            raise ValueError("evaluation needs targets; this batch has none")
        out = reconstruct(model, prep) if isinstance(model, nn.Module) else model(prep)
        _check_same_shape(out, prep)
        out, tgt = out.float(), prep.target.float()
        rows["psnr"] += psnr(out, tgt, prep.max_value).tolist()
        rows["ssim"] += ssim(out, tgt, prep.max_value).tolist()
        rows["nmse"] += nmse(out, tgt).tolist()
    if not rows["psnr"]:
        raise ValueError("argument 'loader' yielded no batches")
    return {k: float(np.mean(v)) for k, v in rows.items()} | {"n": float(len(rows["psnr"]))}
