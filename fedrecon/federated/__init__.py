"""fedrecon.federated: sites, messages, strategies (torch only; no Flower here)."""

from fedrecon.models import Partition, Role, Scope

from .messages import (
    PartitionViolation,
    SiteInstructions,
    SiteUpdate,
    StateDict,
    TrainingPlan,
    check_update,
    make_update,
    state_nbytes,
    weighted_average,
)
from .site import Site, site_seed
from .store import DiskStore, LocalStore, MemoryStore, atomic_torch_save
from .strategy import FedAvg, ServerState, Strategy, apply_updates

# --- strategies (owned by the strategies work) ---

__all__ = [name for name in dir() if not name.startswith("_")]
