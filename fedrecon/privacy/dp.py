"""Site-level differential privacy for federated averaging (DP-FedAvg).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018: each site's update (its change of the GLOBAL tensors) is clipped to L2
norm ``C``; the server averages the clipped updates with uniform weights and Gaussian noise
of standard deviation ``z C`` is added to their sum -- by the server (``noise="central"``,
a trusted aggregator) or as ``N(0, (z C)^2 / n)`` by each of the ``n`` sampled sites
(``noise="distributed"``, meant to be combined with secure aggregation, so the server only
sees the noised sum). Neighbouring federations differ in one site's whole contribution,
replaced by zero (zero-out adjacency: the set of sites, and so the number ``m`` of answering
sites the server divides by, is public), so the sum's sensitivity is ``C``. Under add/remove
adjacency the released mean, divided by the observed ``m``, would reveal whether a site took
part; the epsilon reported here does not cover that.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021): sites also report whether their update was within
``C``; the noised fraction ``b`` (noise ``sigma_b``) steers ``C <- C exp(-eta (b - gamma))``
towards the ``gamma`` quantile of the update norms. The update noise is raised to
``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that the pair costs exactly a Gaussian
mechanism of multiplier ``z`` (their Theorem 1).

Accounting: RDP (Mironov 2017) via Google's ``dp_accounting``; every round composes a
Gaussian mechanism with the round's effective multiplier (with distributed noise and ``m``
of ``n`` sampled sites answering, the sum carries ``z sqrt(m/n)``). No amplification by
subsampling is claimed: the runner samples a fixed number of sites, not Poisson, so the
reported epsilon is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

__all__ = ["DPConfig", "PrivacyAccountant", "clip_update", "update_norm"]

_NOISE = ("central", "distributed")


@dataclass(frozen=True)
class DPConfig:
    """DP-FedAvg settings (see the module docstring).

    Parameters
    ----------
    clip_norm
        ``C``: L2 bound of a site's update (the initial bound with adaptive clipping).
    noise_multiplier
        ``z``: noise std on the sum is ``z C``. 0 gives clipping only (epsilon = inf).
    delta
        The delta at which epsilon is reported.
    noise
        ``"central"`` or ``"distributed"``.
    adaptive_clip
        Adapt ``C`` to the ``target_quantile`` of the update norms with rate ``clip_lr``.
    count_noise_multiplier
        ``sigma_b`` of the noised clipped-count (adaptive clipping); must exceed ``z / 2``.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    noise: str = "central"
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"DPConfig: 'clip_norm' must be > 0; got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"DPConfig: 'noise_multiplier' must be >= 0; got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DPConfig: 'delta' must lie in (0, 1); got {self.delta}")
        if self.noise not in _NOISE:
            raise ValueError(f"DPConfig: 'noise' must be one of {_NOISE}; got {self.noise!r}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"DPConfig: 'target_quantile' must lie in (0, 1); got {self.target_quantile}")
        if not self.clip_lr > 0:
            raise ValueError(f"DPConfig: 'clip_lr' must be > 0; got {self.clip_lr}")
        if self.adaptive_clip and self.noise_multiplier > 0 and \
                not 2 * self.count_noise_multiplier > self.noise_multiplier:
            raise ValueError(f"DPConfig: adaptive clipping needs 'count_noise_multiplier' > "
                             f"noise_multiplier / 2 = {self.noise_multiplier / 2}; got "
                             f"{self.count_noise_multiplier}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "[privacy.dp]") -> DPConfig:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (valid: {', '.join(valid)})")
        missing = [k for k in ("clip_norm", "noise_multiplier") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        return cls(**data)

    @property
    def update_noise_multiplier(self) -> float:
        """``z_delta``: the multiplier of the noise on the update sum."""
        z = self.noise_multiplier
        if not self.adaptive_clip or z == 0:
            return z
        return (z**-2 - (2 * self.count_noise_multiplier) ** -2) ** -0.5


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """L2 norm over every floating (real or complex) tensor of ``delta``."""
    # abs() first: a complex tensor's .double() would drop its imaginary part
    return math.sqrt(sum(float(t.abs().double().square().sum()) for t in delta.values()
                         if _is_float(t)))


def clip_update(delta: Mapping[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """``delta * min(1, C / ||delta||)`` and the norm before clipping."""
    norm = update_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale if _is_float(v) else v) for k, v in delta.items()}, norm


class PrivacyAccountant:
    """Epsilon of the composed rounds so far, at ``delta`` (RDP, ``dp_accounting``)."""

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"argument 'delta' must lie in (0, 1); got {delta}")
        self.delta = delta
        self.multipliers: list[float] = []

    def step(self, noise_multiplier: float) -> float:
        """Compose one Gaussian round; returns the epsilon so far."""
        if noise_multiplier < 0:
            raise ValueError(f"argument 'noise_multiplier' must be >= 0; got {noise_multiplier}")
        self.multipliers.append(float(noise_multiplier))
        return self.epsilon()

    def epsilon(self) -> float:
        if not self.multipliers:
            return 0.0
        if min(self.multipliers) == 0:
            return math.inf
        from dp_accounting import dp_event
        from dp_accounting.rdp import RdpAccountant

        acc = RdpAccountant()
        for z in self.multipliers:
            acc.compose(dp_event.GaussianDpEvent(z))
        return float(acc.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "multipliers": list(self.multipliers)}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        self.delta = float(data["delta"])
        self.multipliers = [float(z) for z in data["multipliers"]]
