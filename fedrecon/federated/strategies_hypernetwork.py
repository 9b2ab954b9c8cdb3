"""Hypernetwork personalization: a server-side network generates each site's values of a
chosen set of GLOBAL tensors from the site's protocol vector (or a learned site embedding).

Shamsian, Navon, Fetaya, Chechik, "Personalized Federated Learning using Hypernetworks"
(pFedHN), ICML 2021. Conditioning the generator on the site's public acquisition protocol
(views, dose, acceleration, coils) instead of only a learned client embedding is what lets
an unseen site get a state of its own.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedrecon.models import Partition, Role, Scope, squash_protocol, state_roles

from .messages import SiteUpdate, StateDict, weighted_average
from .strategies_personalized import check_number
from .strategy import ServerState, Strategy, example_weights

__all__ = ["Hypernetwork", "SiteHypernetwork", "global_names_with_roles"]


def global_names_with_roles(model: nn.Module, partition: Partition,
                            roles: Iterable[Role | str]) -> list[str]:
    """GLOBAL ``state_dict`` names of ``model`` whose role is in ``roles`` (e.g. the FiLM
    tensors, ``{Role.CONDITIONING}``, under a partition that makes conditioning GLOBAL)."""
    wanted = {Role(r) for r in roles}
    role_of = state_roles(model)
    return [k for k in partition.names(model, Scope.GLOBAL) if role_of[k] in wanted]


class SiteHypernetwork(nn.Module):
    """``theta(e) = base + head(body(e)) / sqrt(features)`` split into named tensors.

    ``body`` is ``Linear(in_dim, hidden) -> SiLU`` (the identity when ``hidden == 0``, which
    makes the map affine in ``e``). ``head`` starts at zero, so every site starts from
    ``base`` (the federation's initial values). Runs in float64.
    """

    def __init__(self, in_dim: int, base: Mapping[str, Tensor], hidden: int = 32) -> None:
        super().__init__()
        self.names = list(base)
        self.shapes = [tuple(base[k].shape) for k in self.names]
        self.body: nn.Module = (nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU())
                                if hidden > 0 else nn.Identity())
        features = hidden if hidden > 0 else in_dim
        total = sum(math.prod(s) for s in self.shapes)
        self.head = nn.Linear(features, total, bias=False)
        nn.init.zeros_(self.head.weight)
        self.base = nn.Parameter(torch.cat([base[k].detach().reshape(-1).double() for k in self.names]))
        self.scale = 1.0 / math.sqrt(features)
        self.double()

    def forward(self, e: Tensor) -> dict[str, Tensor]:
        flat = self.base + self.head(self.body(e.double())) * self.scale
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].reshape(shape)
            offset += n
        return out


class Hypernetwork(Strategy):
    """pFedHN-style personalization of a subset of the GLOBAL tensors (``targets``).

    Each site ``i`` receives ``{rest: FedAvg consensus, targets: h_phi(e_i)}`` with
    ``e_i = squash_protocol(protocol_i)`` (``embedding="protocol"``) or a learned vector per
    site (``embedding="learned"``). After a round, the sites' changes of the targets drive
    the hypernetwork (Shamsian et al. 2021, eq. 4)::

        phi <- phi - hn_lr * sum_i p_i (d theta_i / d phi)^T (theta_i_start - theta_i_new)

    with ``p_i`` the example weights; the other GLOBAL tensors are FedAvg'd. Every known
    site's personalized state is then regenerated from the new ``phi`` (a site that was
    sampled but did not answer keeps its personalization: it gets ``h_phi(e_i)``, never the
    consensus), and :meth:`state_for_new_site` generates one for an unseen protocol.

    Parameters
    ----------
    targets
        GLOBAL tensor names to generate (see :func:`global_names_with_roles`). Default: every
        1-D floating tensor (biases, normalization affine parameters; FiLM biases when
        conditioning is GLOBAL).
    embedding
        ``"protocol"`` (needs ``protocols`` for every site at :meth:`initialize`) or ``"learned"``.
    embed_dim
        Length of learned embeddings.
    hidden
        Hidden width of the hypernetwork (0: affine map of the embedding).
    hn_lr
        Server learning rate of the hypernetwork.
    seed
        Seeds the learned embeddings and the hidden layer's initialization.
    """

    name = "hypernetwork"
    needs_individual_updates = True

    def __init__(self, *, targets: Collection[str] | None = None, embedding: str = "protocol",
                 embed_dim: int = 8, hidden: int = 32, hn_lr: float = 0.5, seed: int = 0,
                 **base: Any) -> None:
        super().__init__(**base)
        if embedding not in ("protocol", "learned"):
            raise ValueError(f"argument 'embedding' must be 'protocol' or 'learned'; got {embedding!r}")
        check_number("hn_lr", hn_lr, low=0, strict=True)
        check_number("embed_dim", embed_dim, low=1, integer=True)
        check_number("hidden", hidden, low=0, integer=True)
        if isinstance(targets, str):  # list("a.b") would be its characters
            raise TypeError(f"argument 'targets' must be a collection of tensor names, not one "
                            f"string; got {targets!r}")
        self.requested_targets = None if targets is None else list(targets)
        self.embedding = embedding
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.hn_lr = hn_lr
        self.seed = seed
        self.targets: list[str] = []
        self.hypernet: SiteHypernetwork | None = None
        self.embeddings: nn.Embedding | None = None

    # -- setup -----------------------------------------------------------------------------
    def initialize(self, global_state: Mapping[str, Tensor], site_ids: Sequence[str],
                   protocols: Mapping[str, Tensor] | None = None) -> None:
        super().initialize(global_state, site_ids, protocols)
        self._build(global_state)
        self._regenerate()

    def _build(self, global_state: Mapping[str, Tensor]) -> None:
        if self.requested_targets is None:
            targets = [k for k, v in global_state.items() if v.is_floating_point() and v.ndim == 1]
        else:
            targets = list(self.requested_targets)
            unknown = [k for k in targets if k not in global_state]
            if unknown:
                raise ValueError(f"hypernetwork: 'targets' names tensors that are not GLOBAL: {unknown[:5]}")
            not_float = [k for k in targets if not global_state[k].is_floating_point()]
            if not_float:
                raise ValueError(f"hypernetwork: 'targets' must be floating tensors: {not_float[:5]}")
        if not targets:
            raise ValueError("hypernetwork: no GLOBAL tensors to generate ('targets' is empty)")
        self.targets = targets
        generator = torch.Generator().manual_seed(self.seed)
        if self.embedding == "protocol":
            absent = [s for s in self.site_ids if s not in self.protocols]
            if absent:
                raise ValueError(f"hypernetwork: embedding='protocol' needs a protocol vector for "
                                 f"every site; missing for {absent[:5]}")
            dims = {tuple(p.shape) for p in self.protocols.values()}
            if len(dims) != 1 or len(next(iter(dims))) != 1:
                raise ValueError(f"hypernetwork: protocol vectors must be 1-D of one length; got {sorted(dims)}")
            in_dim = next(iter(dims))[0]
            self.embeddings = None
        else:
            in_dim = self.embed_dim
            self.embeddings = nn.Embedding(len(self.site_ids), self.embed_dim).double()
            with torch.no_grad():
                self.embeddings.weight.copy_(torch.randn(len(self.site_ids), self.embed_dim,
                                                         generator=generator, dtype=torch.float64))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.hypernet = SiteHypernetwork(in_dim, {k: global_state[k] for k in targets}, self.hidden)

    def _parameters(self) -> list[nn.Parameter]:
        assert self.hypernet is not None
        params = list(self.hypernet.parameters())
        if self.embeddings is not None:
            params.append(self.embeddings.weight)
        return params

    def _input(self, site_id: str) -> Tensor:
        if self.embeddings is not None:
            return self.embeddings.weight[self.site_ids.index(site_id)]
        return squash_protocol(self.protocols[site_id].double())

    def _complete(self, generated: Mapping[str, Tensor]) -> StateDict:
        """The consensus with ``generated`` over the targets (cast to the GLOBAL dtypes)."""
        state = self._require_state()
        out = dict(state.global_state)
        for k, v in generated.items():
            out[k] = v.detach().to(state.global_state[k].dtype).clone()
        return out

    def _regenerate(self) -> None:
        assert self.hypernet is not None and self.state is not None
        with torch.no_grad():
            self.state.personalized = {s: self._complete(self.hypernet(self._input(s)))
                                       for s in self.site_ids}

    def state_for_new_site(self, protocol: Tensor | None = None) -> StateDict:
        """A generated GLOBAL state for a site that never trained: from its ``protocol``
        (``embedding="protocol"``) or the mean learned embedding (``embedding="learned"``)."""
        self._require_state()
        assert self.hypernet is not None
        if self.embeddings is None:
            if protocol is None:
                raise ValueError("state_for_new_site: embedding='protocol' needs the site's protocol")
            e = squash_protocol(protocol.detach().double().reshape(-1))
        else:
            if protocol is not None:
                raise ValueError("state_for_new_site: embedding='learned' takes no protocol")
            e = self.embeddings.weight.mean(dim=0)
        with torch.no_grad():
            return self._complete(self.hypernet(e))

    # -- one round --------------------------------------------------------------------------
    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        state = self._require_state()
        if not updates:
            return state
        unknown = [u.site_id for u in updates if u.site_id not in self.site_ids]
        if unknown:
            raise ValueError(f"hypernetwork: updates from sites it was not initialized with: {unknown[:5]}")
        assert self.hypernet is not None
        weights = example_weights(updates)
        total = sum(weights)
        new = self._new_weights(updates)
        params = self._parameters()
        for p in params:
            p.grad = None
        objective = torch.zeros((), dtype=torch.float64)
        for u, w, weight in zip(updates, new, weights):
            start = state.for_site(u.site_id)
            generated = self.hypernet(self._input(u.site_id))
            for k in self.targets:
                change = (start[k] - w[k]).detach().double()
                objective = objective + (weight / total) * (generated[k] * change).sum()
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= self.hn_lr * g
        self.state = ServerState(weighted_average(new, weights), {})
        self._regenerate()
        return self.state

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        data = super().state_dict()
        assert self.hypernet is not None
        data["hypernetwork"] = {
            "targets": list(self.targets),
            "params": {k: v.detach().clone() for k, v in self.hypernet.state_dict().items()},
            "embeddings": None if self.embeddings is None else self.embeddings.weight.detach().clone(),
        }
        return data

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        saved = data["hypernetwork"]
        kind = "protocol" if saved["embeddings"] is None else "learned"
        if kind != self.embedding:  # else learned embeddings would be dropped without a word
            raise ValueError(f"hypernetwork: the checkpoint was trained with embedding={kind!r}; "
                             f"this strategy has argument 'embedding'={self.embedding!r}")
        super().load_state_dict(data)
        self.requested_targets = list(saved["targets"])
        self._build(self._require_state().global_state)
        assert self.hypernet is not None
        self.hypernet.load_state_dict(saved["params"])
        if self.embeddings is not None:
            with torch.no_grad():
                self.embeddings.weight.copy_(saved["embeddings"])
