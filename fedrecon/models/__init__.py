"""fedrecon.models: unrolled networks = site-local data consistency + a learned prior."""

from .dc import DC_LAYERS, GradientDC, ProximalDC
from .factory import ModelConfig, build_model
from .priors import DnCNN, FiLM, ImagePrior, UNet, squash_protocol
from .roles import Partition, Role, Scope, parameter_roles, state_roles
from .sensitivity import SensitivityNet, acs_coil_maps, acs_region
from .unrolled import Unrolled, default_x0

__all__ = [name for name in dir() if not name.startswith("_")]
