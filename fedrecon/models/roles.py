"""Parameter roles and the LOCAL/GLOBAL partition.

Every parameter (and buffer) of a fedrecon model belongs to a declared role. A module class
declares its role once, with the class attribute ``role``; a parameter's role is the role of
the innermost module that declares one, and torch's normalization layers are ``NORM``
wherever they sit. A module that also sets ``role_sealed = True`` gives its role to its
whole subtree (a coil-sensitivity estimator built from a U-Net stays ``ESTIMATOR``). A :class:`Partition` maps roles to ``LOCAL`` (stays at the site) or
``GLOBAL`` (shared with the federation); nothing is decided by name prefixes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Role", "Scope", "Partition", "parameter_roles", "state_roles"]


class Role(str, enum.Enum):
    """What a parameter does in an unrolled reconstruction network."""

    DC = "dc"  # data-consistency step sizes / penalties
    PRIOR = "prior"  # the learned regularizer's weights
    NORM = "norm"  # normalization layers (affine weights, running statistics)
    CONDITIONING = "conditioning"  # FiLM / hypernetwork outputs on the site's protocol
    ESTIMATOR = "estimator"  # coil-sensitivity estimation network
    ADAPTER = "adapter"  # input/output adapters (channel maps, heads)
    PEFT = "peft"  # parameter-efficient tuning of a frozen prior (LoRA factors, tuned biases)
    FROZEN = "frozen"  # pretrained weights no site trains (buffers loaded from a checkpoint)


class Scope(str, enum.Enum):
    LOCAL = "local"
    GLOBAL = "global"


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
)


def _module_role(module: nn.Module) -> Role | None:
    declared = getattr(type(module), "role", None)
    if declared is not None:
        return Role(declared)
    if isinstance(module, _NORM_TYPES):
        return Role.NORM
    return None


def _roles(model: nn.Module, tensors: str, aliases: bool) -> dict[str, Role]:
    """Role of every tensor by name. A tensor reachable under several names (tied weights,
    a module registered twice) keeps every name when ``aliases`` (as ``state_dict`` does)
    or only the first (as ``named_parameters`` does); its names must agree on the role, or
    a LOCAL tensor could leave the site under a GLOBAL alias."""
    roles: dict[str, Role] = {}
    first: dict[int, tuple[str, Role | None]] = {}
    # the name only: ``walk`` is a recursive closure (a reference cycle), so whatever it
    # captures lives until the garbage collector runs; the model must not be among it
    owner = type(model).__name__
    unassigned: list[str] = []

    def walk(module: nn.Module, prefix: str, inherited: Role | None,
             sealed: bool = False) -> None:
        own = None if sealed else _module_role(module)
        role = own if own is not None else inherited
        sealed = sealed or (own is not None and getattr(type(module), "role_sealed", False))
        # the registries themselves, as ``state_dict`` walks them: ``named_*`` would hide
        # the second name of a tied tensor or of a module registered twice
        items = module._parameters if tensors == "parameters" else module._buffers
        for name, tensor in items.items():
            if tensor is None:
                continue
            full = prefix + name
            seen = first.setdefault(id(tensor), (full, role))
            if seen[0] != full:
                if seen[1] != role:
                    raise ValueError(
                        f"{owner}: one tensor is shared by '{seen[0]}' (role "
                        f"{getattr(seen[1], 'value', None)}) and '{full}' (role "
                        f"{getattr(role, 'value', None)}); a shared tensor needs one role")
                if not aliases:
                    continue
            if role is None:
                unassigned.append(full)
            else:
                roles[full] = role
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{child_name}.", role, sealed)

    walk(model, "", None)
    if unassigned:
        raise ValueError(
            f"{type(model).__name__}: {len(unassigned)} {tensors} have no declared role "
            f"(set a class attribute `role` on their module): {unassigned[:5]}"
        )
    return roles


def parameter_roles(model: nn.Module) -> dict[str, Role]:
    """Role of every parameter, by its ``named_parameters`` name (each parameter once).
    Raises if one has none, or if a shared parameter is given two roles."""
    return _roles(model, "parameters", aliases=False)


def state_roles(model: nn.Module) -> dict[str, Role]:
    """Role of every ``state_dict`` entry (parameters and buffers)."""
    roles = _roles(model, "parameters", aliases=True)
    roles.update(_roles(model, "buffers", aliases=True))
    return roles


def _default_local() -> frozenset[Role]:
    return frozenset({Role.DC, Role.CONDITIONING, Role.ESTIMATOR})


@dataclass(frozen=True)
class Partition:
    """Which roles stay at the site (``local``); every other role is ``GLOBAL``.

    The default keeps DC layers, conditioning and estimators local and shares the prior,
    its normalization layers, adapters and PEFT tensors. ``FROZEN`` tensors are LOCAL
    under every partition. FedBN: ``Partition.default().with_local(Role.NORM)``.
    """

    local: frozenset[Role] = field(default_factory=_default_local)

    def __post_init__(self) -> None:
        object.__setattr__(self, "local", frozenset(Role(r) for r in self.local))

    @classmethod
    def default(cls) -> Partition:
        return cls()

    @classmethod
    def from_names(cls, local: Iterable[str]) -> Partition:
        valid = [r.value for r in Role]
        roles = []
        for name in local:
            if name not in valid:
                raise ValueError(f"unknown role {name!r} in partition; expected one of {valid}")
            roles.append(Role(name))
        return cls(frozenset(roles))

    def with_local(self, *roles: Role | str) -> Partition:
        return Partition(self.local | {Role(r) for r in roles})

    def scope(self, role: Role) -> Scope:
        # FROZEN tensors are the same pretrained checkpoint at every site and never change:
        # sending them would cost the full prior's bytes every round and carry nothing.
        return Scope.LOCAL if role in self.local or role is Role.FROZEN else Scope.GLOBAL

    def names(self, model: nn.Module, scope: Scope) -> list[str]:
        """``state_dict`` keys of ``model`` in ``scope``, in state-dict order."""
        roles = state_roles(model)
        return [k for k in model.state_dict() if self.scope(roles[k]) == scope]

    def global_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Detached copies of the GLOBAL tensors: what a site may send."""
        keep = set(self.names(model, Scope.GLOBAL))
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}

    def local_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Detached copies of the LOCAL tensors a site persists between rounds. FROZEN
        tensors are left out: the model factory loads them from the pretrained checkpoint,
        and storing them would cost a copy of the prior per site per round."""
        roles = state_roles(model)
        keep = {k for k in self.names(model, Scope.LOCAL) if roles[k] is not Role.FROZEN}
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}

    def load_global(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        """Load GLOBAL tensors into ``model``; LOCAL keys in ``state`` are an error."""
        allowed = set(self.names(model, Scope.GLOBAL))
        extra = set(state) - allowed
        if extra:
            raise ValueError(f"state has keys that are not GLOBAL for this model: {sorted(extra)[:5]}")
        missing = allowed - set(state)
        if missing:
            raise ValueError(f"state lacks GLOBAL keys: {sorted(missing)[:5]}")
        with torch.no_grad():
            own = model.state_dict()
            for k, v in state.items():
                own[k].copy_(v)
