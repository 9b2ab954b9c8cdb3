"""Pretrain a prior centrally and save it as a checkpoint that every site loads.

The operator of a federation may hold data it can use centrally (a public or synthetic
set). :func:`pretrain_prior` trains a whole unrolled network on it (its DC layers too:
they are needed to train the prior in context, but they stay out of the checkpoint, because
each site learns its own). :func:`save_prior_checkpoint` writes the priors' tensors
atomically; ``[model] pretrained = "path"`` makes :func:`~fedrecon.models.build_model` call
:func:`load_prior_checkpoint` on every model it builds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedrecon.federated.store import atomic_torch_save
from fedrecon.models import Role, state_roles
from fedrecon.train import TrainResult, train_local

__all__ = ["PRIOR_CHECKPOINT_FORMAT", "pretrain_prior", "save_prior_checkpoint",
           "load_prior_checkpoint", "read_prior_checkpoint"]

PRIOR_CHECKPOINT_FORMAT = "fedrecon-prior/1"


def _priors(model: nn.Module) -> nn.ModuleList:
    priors = getattr(model, "priors", None)
    if not isinstance(priors, nn.ModuleList):
        raise ValueError(f"argument 'model': {type(model).__name__} has no 'priors' list "
                         f"(expected an Unrolled network)")
    return priors


def pretrain_prior(model: nn.Module, loader: Iterable, *, steps: int, lr: float = 1e-3,
                   amp: bool = False, device: str | torch.device = "cpu",
                   seed: int | None = 0, progress: bool = False, **train_kwargs: Any) -> TrainResult:
    """Train ``model`` (an :class:`~fedrecon.models.Unrolled`) on central data.

    ``amp`` runs the forward pass under CUDA autocast with a gradient scaler (CUDA only,
    see :func:`~fedrecon.train.train_local`); ``train_kwargs`` go to it too (``loss``,
    ``op_factory``, ``grad_clip``).
    """
    return train_local(model, loader, steps=steps, lr=lr, amp=amp, device=device, seed=seed,
                       progress=progress, **train_kwargs)


def save_prior_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                          config: Any | None = None,
                          meta: Mapping[str, Any] | None = None) -> Path:
    """Write the tensors of ``model.priors`` (keys ``"<iteration>.net...."``) atomically.

    ``config`` (a :class:`~fedrecon.models.ModelConfig`) is stored for the error messages of a
    mismatched load; ``meta`` for people (data, steps, validation PSNR).
    """
    state = {k: v.detach().cpu().clone() for k, v in _priors(model).state_dict().items()}
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return atomic_torch_save({"format": PRIOR_CHECKPOINT_FORMAT, "prior_state": state,
                              "model_config": cfg, "meta": dict(meta or {})}, path)


def read_prior_checkpoint(path: str | os.PathLike, where: str = "[model] pretrained") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{where}: {path} is not a readable torch checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRIOR_CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{where}: {path} is not a prior checkpoint (format {got!r}, expected "
                         f"{PRIOR_CHECKPOINT_FORMAT!r}; write one with scripts/pretrain_prior.py)")
    return ckpt


def _broadcast(state: Mapping[str, Tensor], n_priors: int) -> dict[str, Tensor]:
    """A checkpoint of one shared prior (keys ``0.*``) initializes every iteration's prior."""
    if n_priors == 1 or any(not k.startswith("0.") for k in state):
        return dict(state)
    return {f"{i}.{k[2:]}": v for i in range(n_priors) for k, v in state.items()}


def load_prior_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                          where: str = "[model] pretrained") -> None:
    """Load a prior checkpoint into ``model.priors``, before any PEFT wrapping.

    Every checkpoint tensor must exist in the model with the same shape, and every prior
    tensor of the model must be in the checkpoint, except FiLM generators (role
    ``conditioning``: a prior pretrained without FiLM gets fresh, identity FiLM layers).
    Errors name ``where``, the file and the offending keys.
    """
    ckpt = read_prior_checkpoint(path, where)
    priors = _priors(model)
    state = _broadcast(ckpt["prior_state"], len(priors))
    own = priors.state_dict()
    roles = {k.removeprefix("priors."): r for k, r in state_roles(model).items()
             if k.startswith("priors.")}
    hint = f" (the checkpoint was saved from [model] {ckpt['model_config']})" if ckpt.get(
        "model_config") else ""
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{where}: {path} has tensors this model lacks: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}{hint}")
    missing = sorted(k for k in set(own) - set(state) if roles.get(k) is not Role.CONDITIONING)
    if missing:
        raise ValueError(f"{where}: {path} lacks tensors of this model: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}{hint}")
    bad = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
           for k in state if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{where}: {path} has tensors of other shapes: {bad[:3]}{hint}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
