"""Server-side adaptive optimizers over the averaged pseudo-gradient: FedAdam and FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2). Each round the server forms the example-weighted
average of the sites' changes ``Delta = sum_i p_i (w_i - x)`` and treats it as a (negative)
gradient:

    m <- beta1 m + (1 - beta1) Delta
    v <- beta2 v + (1 - beta2) Delta^2                       (Adam)
    v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)           (Yogi)
    x <- x + eta m / (sqrt(v) + tau)

with ``m_{-1} = 0``, ``v_{-1} = tau^2`` and no bias correction, as in the paper.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .messages import SiteUpdate, StateDict, weighted_average
from .strategy import ServerState, Strategy, example_weights

__all__ = ["FedAdam", "FedOpt", "FedYogi"]


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class FedOpt(Strategy):
    """Base of the server optimizers: FedAvg's pseudo-gradient, an adaptive server step.

    Parameters
    ----------
    eta
        Server learning rate.
    beta1, beta2
        Decay of the first and second moments.
    tau
        Adaptivity (the denominator's floor); ``v`` starts at ``tau**2``.
    average_only
        Names of GLOBAL tensors that are example-weighted averaged instead of stepped
        (running statistics of BatchNorm, whose variance a server step could drive negative).
        Integer tensors are always taken as the sites' maximum, as in FedAvg.
    **base
        ``local_steps``, ``lr``, ``partition`` of :class:`Strategy`.
    """

    name = "fedopt"

    def __init__(self, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, average_only: Collection[str] = (), **base: Any) -> None:
        super().__init__(**base)
        if eta <= 0 or tau <= 0 or not (0 <= beta1 < 1) or not (0 <= beta2 < 1):
            raise ValueError(f"{type(self).__name__}: need eta > 0, tau > 0 and 0 <= beta < 1; "
                             f"got eta={eta}, tau={tau}, beta1={beta1}, beta2={beta2}")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.average_only = frozenset(average_only)
        self.m: StateDict = {}
        self.v: StateDict = {}

    def initialize(self, global_state: Mapping[str, Tensor], site_ids: Sequence[str],
                   protocols: Mapping[str, Tensor] | None = None) -> None:
        super().initialize(global_state, site_ids, protocols)
        unknown = sorted(self.average_only - set(global_state))
        if unknown:
            raise ValueError(f"{type(self).__name__}: 'average_only' names tensors that are not "
                             f"in the GLOBAL state: {unknown[:5]}")
        self.m, self.v = {}, {}
        for k, x in global_state.items():
            if self._stepped(k, x):
                self.m[k] = torch.zeros_like(x)
                self.v[k] = torch.full_like(x, self.tau**2)

    def _stepped(self, name: str, x: Tensor) -> bool:
        return _is_float(x) and not x.is_complex() and name not in self.average_only

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def aggregate(self, round: int, updates: Sequence[SiteUpdate],
                  missing: Sequence[str] = ()) -> ServerState:
        state = self._require_state()
        if not updates:
            return state
        weights = example_weights(updates)
        new_weights = self._new_weights(updates)
        averaged = weighted_average(new_weights, weights)
        x = state.global_state
        deltas = [{k: w[k] - x[k] for k in self.m} for w in new_weights]
        delta = weighted_average(deltas, weights) if self.m else {}
        out: StateDict = {}
        for k, xk in x.items():
            if k not in self.m:
                out[k] = averaged[k]
                continue
            d = delta[k]
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * d
            self.v[k] = self._second_moment(self.v[k], d)
            out[k] = xk + self.eta * self.m[k] / (self.v[k].sqrt() + self.tau)
        self.state = ServerState(out, {})
        return self.state

    def state_dict(self) -> dict[str, Any]:
        data = super().state_dict()
        data["server_optimizer"] = {"m": dict(self.m), "v": dict(self.v)}
        return data

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        super().load_state_dict(data)
        moments = data["server_optimizer"]
        self.m = dict(moments["m"])
        self.v = dict(moments["v"])


class FedAdam(FedOpt):
    """FedAdam: Adam on the server over the averaged pseudo-gradient.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """

    name = "fedadam"

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta.square()


class FedYogi(FedOpt):
    """FedYogi: Yogi's additive, sign-controlled second moment on the server.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Yogi: Zaheer et al.,
    "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018).
    """

    name = "fedyogi"

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        d2 = delta.square()
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
