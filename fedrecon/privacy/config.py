"""The ``[privacy]`` settings of a run and which strategies they work with.

Secure aggregation and DP-FedAvg hand the strategy one aggregate (the sum of the sites'
updates, unmasked / noised) instead of the individual updates. That is enough for every
strategy whose aggregation is a weighted sum followed by a server step -- FedAvg, partial
sharing, FedProx, FedBN, FedAdam/FedYogi, Ditto, FedRep -- and impossible for those that
look at each site's update: similarity-weighted personalization, the hypernetwork, local
training, and the robust aggregators (median, trimmed mean, multi-Krum). A strategy says
which kind it is with its class attribute ``Strategy.needs_individual_updates``.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedrecon.federated import STRATEGIES

from .dp import DPConfig
from .secagg import SecAggConfig
from .validation import ValidationConfig

__all__ = ["PrivacyConfig", "PrivacyConfigError", "check_privacy_compatibility",
           "sum_compatible_strategies"]

_SECTIONS = ("secure_aggregation", "dp", "validation")


def _check_types(table: Mapping[str, Any], cls: type, where: str) -> None:
    """Refuse a value of the wrong type (a TOML string "false" is truthy, ``true`` would
    pass as the number 1) or a non-finite number, naming the key and what was expected."""
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        if key not in hints:
            continue  # unknown keys: refused by name by the section's from_dict
        hint = hints[key]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        elif isinstance(value, float):
            ok = float in allowed and math.isfinite(value)
        else:
            ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
        if not ok:
            expected = " or ".join("a finite number" if t is float else
                                   {int: "an integer", bool: "true/false", str: "a string"}.get(
                                       t, t.__name__) for t in allowed if t is not type(None))
            raise PrivacyConfigError(f"{where}.{key}: expected {expected}; got {value!r}")


class PrivacyConfigError(ValueError):
    """A ``[privacy]`` setting that cannot work (alone or with the chosen strategy)."""


@dataclass(frozen=True)
class PrivacyConfig:
    """Which of secure aggregation, DP-FedAvg and server-side validation a run uses
    (``None``: off)."""

    secure_aggregation: SecAggConfig | None = None
    dp: DPConfig | None = None
    validation: ValidationConfig | None = None

    def __post_init__(self) -> None:
        if self.secure_aggregation is not None and self.validation is not None \
                and self.validation.norm_rule:
            raise PrivacyConfigError(
                "[privacy]: 'validation' with norm_rule = true needs each site's update norm, "
                "which secure aggregation hides; set validation.norm_rule = false (sites then "
                "check keys, shapes and finiteness before masking)")
        if self.dp is not None and self.dp.noise == "distributed" and self.secure_aggregation is None:
            raise PrivacyConfigError(
                "[privacy.dp]: noise = 'distributed' without secure_aggregation gives each "
                "site's update only 1/sqrt(n) of the noise in the open; use noise = 'central' "
                "or enable [privacy.secure_aggregation]")

    @property
    def aggregates_sums(self) -> bool:
        """The strategy gets one aggregate, not the individual updates."""
        return self.secure_aggregation is not None or self.dp is not None

    @property
    def enabled(self) -> bool:
        return any(getattr(self, k) is not None for k in _SECTIONS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "[privacy]") -> PrivacyConfig:
        """From a TOML table: sub-tables ``secure_aggregation``, ``dp``, ``validation`` (a
        sub-table present, even empty, turns the feature on; ``dp`` needs ``clip_norm`` and
        ``noise_multiplier``). Unknown keys are errors."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise PrivacyConfigError(f"{where}: unknown key(s) {unknown} (valid: "
                                     f"{', '.join(_SECTIONS)})")
        for key, value in data.items():
            if not isinstance(value, Mapping):
                raise PrivacyConfigError(f"{where}.{key}: expected a table, got {type(value).__name__}")
        try:
            section = f"{where}.secure_aggregation"
            sa = data.get("secure_aggregation")
            if sa is not None:
                valid = ("threshold", "frac_bits", "clip_range")
                bad = sorted(set(sa) - set(valid))
                if bad:
                    raise PrivacyConfigError(f"{section}: unknown key(s) {bad} "
                                             f"(valid: {', '.join(valid)})")
                _check_types(sa, SecAggConfig, section)
                sa = SecAggConfig(**sa)
            section = f"{where}.dp"
            dp = None
            if "dp" in data:
                _check_types(data["dp"], DPConfig, section)
                dp = DPConfig.from_dict(data["dp"], section)
            section = f"{where}.validation"
            val = None
            if "validation" in data:
                _check_types(data["validation"], ValidationConfig, section)
                val = ValidationConfig.from_dict(data["validation"], section)
        except PrivacyConfigError:
            raise
        except (TypeError, ValueError) as err:
            msg = str(err)  # the sections' own messages may already name where they are
            raise PrivacyConfigError(msg if msg.startswith(section) else f"{section}: {msg}") from None
        return cls(sa, dp, val)


def sum_compatible_strategies() -> list[str]:
    """Registered strategies that work with secure aggregation and DP-FedAvg."""
    return sorted(n for n, cls in STRATEGIES.items() if not cls.needs_individual_updates)


def check_privacy_compatibility(strategy_name: str,
                                privacy_cfg: PrivacyConfig | Mapping[str, Any] | None) -> PrivacyConfig:
    """Refuse a strategy that needs individual updates together with secure aggregation or
    DP-FedAvg (:class:`PrivacyConfigError` naming both); returns the parsed config."""
    cfg = privacy_cfg if isinstance(privacy_cfg, PrivacyConfig) else PrivacyConfig.from_dict(privacy_cfg)
    if strategy_name not in STRATEGIES:
        raise PrivacyConfigError(f"unknown strategy '{strategy_name}' (valid: "
                                 f"{', '.join(STRATEGIES)})")
    if cfg.aggregates_sums and STRATEGIES[strategy_name].needs_individual_updates:
        features = [k for k in ("secure_aggregation", "dp") if getattr(cfg, k) is not None]
        raise PrivacyConfigError(
            f"strategy '{strategy_name}' needs each site's individual update, but "
            f"[privacy] {' and '.join(features)} give(s) the server only the aggregate; "
            f"use one of: {', '.join(sum_compatible_strategies())}")
    return cfg
