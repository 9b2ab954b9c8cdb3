"""Wrappers that freeze a pretrained layer and add a few trainable tensors to it.

Each wrapper replaces one leaf layer (``Conv2d``, ``ConvTranspose2d``, ``Linear``, a
normalization layer) in place and keeps its ``state_dict`` names: the pretrained tensors
become ``FROZEN`` buffers under the same names (``conv1.weight`` stays ``conv1.weight``), so
no optimizer sees them and no :class:`~fedrecon.models.Partition` sends them. The trainable
part lives in a child module of role ``PEFT`` (``conv1.lora.down``, ``conv1.tuned.bias``).

The layer's own ``forward`` runs through :func:`torch.func.functional_call` with the frozen
tensors (plus the trainable change), so one wrapper serves every layer type.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedrecon.models.roles import Role

__all__ = ["FrozenLayer", "LowRank", "LoRALayer", "TunedBias", "BiasTunedLayer", "LORA_TYPES"]

#: Layer types that take a LoRA adapter (weights of two or more dims).
LORA_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class FrozenLayer(nn.Module):
    """``layer`` with every parameter and buffer held as a ``FROZEN`` buffer.

    The wrapped layer object is kept outside the module tree (a template for its
    ``forward``), always in eval mode: a frozen BatchNorm uses its running statistics.
    """

    role = Role.FROZEN

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if any(True for _ in layer.children()):
            raise ValueError(f"argument 'layer': {type(layer).__name__} has submodules; wrap its "
                             f"leaf layers instead")
        template = layer.eval()
        object.__setattr__(self, "_template", template)  # not a child: no duplicate state
        transient = getattr(layer, "_non_persistent_buffers_set", set())
        for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            self.register_buffer(name, tensor.detach(), persistent=name not in transient)

    @property
    def layer_type(self) -> type[nn.Module]:
        return type(self._template)

    def frozen_tensors(self) -> dict[str, Tensor]:
        return dict(self.named_buffers(recurse=False))

    def _call(self, tensors: dict[str, Tensor], *args: Any) -> Tensor:
        return functional_call(self._template, tensors, args)

    def forward(self, *args: Any) -> Tensor:
        return self._call(self.frozen_tensors(), *args)

    def extra_repr(self) -> str:
        return f"frozen {self._template!r}"


class LowRank(nn.Module):
    """The trainable factors of a LoRA adapter: ``delta = up @ down``, ``up`` zero at start."""

    role = Role.PEFT

    def __init__(self, out_dim: int, in_dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_dim))
        self.up = nn.Parameter(torch.zeros(out_dim, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def product(self) -> Tensor:
        return self.up @ self.down


class LoRALayer(FrozenLayer):
    """A frozen conv/linear layer plus a low-rank change of its weight (Hu et al., LoRA,
    ICLR 2022): ``W' = W + scale * up @ down``, with the weight viewed as
    ``(shape[0], prod(shape[1:]))`` (a conv kernel as out x (in*k*k), a transposed conv's as
    in x (out*k*k)). ``up`` starts at zero, so the wrapped layer starts as the pretrained one.
    """

    def __init__(self, layer: nn.Module, rank: int, scale: float = 1.0) -> None:
        if not isinstance(layer, LORA_TYPES):
            raise ValueError(f"argument 'layer': LoRA wraps {[t.__name__ for t in LORA_TYPES]}; "
                             f"got {type(layer).__name__}")
        if rank < 1:
            raise ValueError(f"argument 'rank' must be >= 1; got {rank}")
        super().__init__(layer)
        shape = self.weight.shape
        self.scale = float(scale)
        # on the frozen weight's device and in its (floating) dtype, as a trainable part of it
        self.lora = LowRank(shape[0], math.prod(shape[1:]), rank).to(
            self.weight.device, self.weight.dtype if self.weight.is_floating_point() else None)

    def merged_weight(self) -> Tensor:
        """``W + scale * up @ down`` in the weight's shape."""
        delta = self.lora.product().reshape(self.weight.shape)
        return self.weight + self.scale * delta.to(self.weight.dtype)

    def forward(self, *args: Any) -> Tensor:
        tensors = self.frozen_tensors()
        tensors["weight"] = self.merged_weight()
        return self._call(tensors, *args)

    def merge(self) -> nn.Module:
        """A plain layer (a copy of the template) with the merged weight: for export/inference."""
        import copy

        # the template stays where the layer was wrapped: move the copy to the wrapper's
        # device and dtype (after ``.to(...)``/``.double()`` of the model)
        plain = copy.deepcopy(self._template).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            for name, t in self.frozen_tensors().items():
                getattr(plain, name).copy_(t)
            plain.weight.copy_(self.merged_weight())
        return plain

    def extra_repr(self) -> str:
        return f"rank={self.lora.down.shape[0]}, scale={self.scale}, " + super().extra_repr()


class TunedBias(nn.Module):
    """A trainable bias (role ``PEFT``), initialized from the pretrained one or zero."""

    role = Role.PEFT

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(init.detach().clone())


class BiasTunedLayer(FrozenLayer):
    """A frozen layer whose bias alone is trained (BitFit, Ben Zaken et al., ACL 2022). A
    layer without a bias (a conv before a norm, a norm without affine) gets none: a bias
    before a normalization would be removed by it."""

    def __init__(self, layer: nn.Module) -> None:
        bias = getattr(layer, "bias", None)
        if not isinstance(bias, Tensor):
            raise ValueError(f"argument 'layer': {type(layer).__name__} has no bias to tune")
        super().__init__(layer)
        init = self._buffers.pop("bias")
        self.tuned = TunedBias(init)

    def forward(self, *args: Any) -> Tensor:
        tensors = self.frozen_tensors()
        tensors["bias"] = self.tuned.bias
        return self._call(tensors, *args)
