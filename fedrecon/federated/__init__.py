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
from .mixture import MixtureOfExperts, fit_mixture_weight
from .site import Site, site_seed
from .store import DiskStore, LocalStore, MemoryStore, atomic_torch_save
from .strategy import FedAvg, ServerState, Strategy, apply_updates, example_weights

# --- strategies (owned by the strategies work) ---
from .strategies import (
    STRATEGIES,
    Ditto,
    FedBN,
    FedProx,
    FedRep,
    Mixture,
    PartialSharing,
    make_strategy,
    strategy_kwargs,
)
from .strategies_adaptive import FedAdam, FedOpt, FedYogi
from .strategies_hypernetwork import Hypernetwork, SiteHypernetwork, global_names_with_roles
from .strategies_personalized import LocalOnly, SimilarityWeighted, similarity_weights

# --- robust aggregation (owned by the privacy work) ---
from .strategies_robust import CoordinateMedian, MultiKrum, TrimmedMean, krum_scores

__all__ = [name for name in dir() if not name.startswith("_")]
