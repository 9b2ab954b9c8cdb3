"""Parameter-efficient federation of a frozen pretrained prior.

:func:`apply_peft` rewrites the prior networks of a model in place: every leaf layer of a
``PRIOR`` network becomes a :class:`~.layers.FrozenLayer` (role ``FROZEN``: never trained,
never sent), and the method decides what stays trainable:

- ``"lora"``: conv/linear layers get low-rank adapters (role ``PEFT``, GLOBAL by default);
- ``"bias"``: layers with a bias train it alone (role ``PEFT``);
- ``"film"``: nothing inside the prior; only the FiLM generators (role ``CONDITIONING``)
  train. Share them with ``film_partition()``, or keep them LOCAL (the default partition)
  for a per-site modulation that costs no bytes at all.

The DC layers are untouched (LOCAL, trained as always).
"""

from __future__ import annotations

from torch import nn

from fedrecon.models import Partition, Role, parameter_roles

from .layers import LORA_TYPES, BiasTunedLayer, FrozenLayer, LoRALayer

__all__ = ["PEFT_METHODS", "apply_peft", "film_partition", "count_parameters"]

PEFT_METHODS = ("lora", "bias", "film")


def _is_prior(module: nn.Module) -> bool:
    return getattr(type(module), "role", None) == Role.PRIOR


def _find_priors(module: nn.Module, seen: set[int] | None = None) -> list[nn.Module]:
    """The outermost modules of role ``PRIOR``, as :func:`~fedrecon.models.parameter_roles`
    sees them: a sealed subtree (a coil-sensitivity estimator's U-Net) keeps its own role and
    is not a prior, however its modules are declared."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return []
    seen.add(id(module))
    if _is_prior(module):
        return [module]
    if getattr(type(module), "role", None) is not None and getattr(type(module), "role_sealed", False):
        return []
    return [p for child in module.children() for p in _find_priors(child, seen)]


def _has_tensors(module: nn.Module) -> bool:
    return bool(module._parameters) or bool(module._buffers)


def _wrap(layer: nn.Module, method: str, rank: int, scale: float) -> nn.Module:
    if method == "lora" and isinstance(layer, LORA_TYPES):
        return LoRALayer(layer, rank, scale)
    if method == "bias" and isinstance(getattr(layer, "bias", None), nn.Parameter):
        return BiasTunedLayer(layer)
    return FrozenLayer(layer)


def _freeze(module: nn.Module, path: str, method: str, rank: int, scale: float) -> None:
    for name, child in list(module.named_children()):
        full = f"{path}.{name}" if path else name
        if getattr(type(child), "role", None) == Role.CONDITIONING:
            continue  # FiLM generators stay trainable (and LOCAL unless the partition shares them)
        if isinstance(child, FrozenLayer):
            raise ValueError(f"apply_peft: '{full}' is already frozen (PEFT applied twice?)")
        if any(True for _ in child.children()):
            if child._parameters:
                raise ValueError(f"apply_peft: module '{full}' ({type(child).__name__}) holds "
                                 f"parameters and submodules; move its parameters into a leaf "
                                 f"module so it can be frozen")
            _freeze(child, full, method, rank, scale)
        elif _has_tensors(child):
            setattr(module, name, _wrap(child, method, rank, scale))


def apply_peft(model: nn.Module, method: str, *, rank: int = 4, scale: float = 1.0) -> nn.Module:
    """Freeze the prior networks of ``model`` and add ``method``'s trainable tensors.

    Parameters
    ----------
    model
        Any fedrecon model (an :class:`~fedrecon.models.Unrolled`); its modules of role
        ``PRIOR`` are rewritten. Load the pretrained weights *before* calling this.
    method
        ``"lora"``, ``"bias"`` or ``"film"``.
    rank, scale
        LoRA rank and the scale of the low-rank product (``W + scale * up @ down``).

    Returns ``model``. Raises ``ValueError`` when nothing would be trainable in the prior
    (``"film"`` on a prior without FiLM, ``"bias"`` on one without biases).
    """
    if method not in PEFT_METHODS:
        raise ValueError(f"argument 'method' must be one of {PEFT_METHODS}; got {method!r}")
    priors = _find_priors(model)
    if not priors:
        raise ValueError(f"apply_peft: {type(model).__name__} has no module of role 'prior'")
    for prior in priors:
        if _has_tensors(prior):
            raise ValueError(f"apply_peft: prior {type(prior).__name__} holds parameters of its "
                             f"own; move them into a leaf module so they can be frozen")
        _freeze(prior, "", method, rank, scale)
    roles = parameter_roles(model)
    wanted = Role.CONDITIONING if method == "film" else Role.PEFT
    if not any(r is wanted for r in roles.values()):
        hint = "build it with cond_dim > 0" if method == "film" else "it has no bias to tune"
        raise ValueError(f"apply_peft: method '{method}' leaves no trainable tensor in the "
                         f"prior ({hint})")
    left = [n for n, r in roles.items() if r in (Role.PRIOR, Role.NORM)
            and not n.startswith("dc.")]
    if left:
        raise ValueError(f"apply_peft: parameters left unfrozen in the prior: {left[:5]}")
    return model


def film_partition() -> Partition:
    """DC layers and estimators LOCAL; FiLM generators (and any PEFT tensors) shared."""
    return Partition(frozenset({Role.DC, Role.ESTIMATOR}))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Number of tensor entries per role (parameters and buffers), e.g. to report how much
    of the prior is frozen."""
    from fedrecon.models import state_roles

    counts: dict[str, int] = {}
    state = model.state_dict()
    for name, role in state_roles(model).items():
        if name in state:
            counts[role.value] = counts.get(role.value, 0) + state[name].numel()
    return counts
