"""fedrecon.runners: the embedded simulation runner (and, later, Flower)."""

from .baselines import LocalOnly, RoundRobinLoader, centralized_runner
from .checkpoint import RoundStore
from .simulation import RECORD_FIELDS, RoundFailed, RunnerConfig, SimulationRunner, read_metrics

__all__ = [
           "RECORD_FIELDS",
           "LocalOnly",
           "RoundFailed",
           "RoundRobinLoader",
           "RoundStore",
           "RunnerConfig",
           "SimulationRunner",
           "centralized_runner",
           "read_metrics",
]
