"""fedrecon.privacy: secure aggregation, site-level DP, update validation, leakage audit.

Layering: imports :mod:`fedrecon.federated` (and, in :mod:`.audit`, models/train); the
runners take an :class:`UpdatePipeline` duck-typed and never import this package.
"""

from .config import (
    PrivacyConfig,
    PrivacyConfigError,
    check_privacy_compatibility,
    sum_compatible_strategies,
)
from .dp import DPConfig, PrivacyAccountant, clip_update, update_norm
from .pipeline import AGGREGATE_ID, PipelineResult, UpdatePipeline
from .secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    SecureAggregationError,
    SecureSum,
    ServerView,
    dequantize,
    quantize,
    secure_sum,
)
from .shamir import combine_shares, split_secret
from .validation import ValidationConfig, update_delta, validate_updates

__all__ = [name for name in dir() if not name.startswith("_")]
