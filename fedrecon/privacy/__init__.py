"""fedrecon.privacy: secure aggregation, site-level DP, update validation, leakage audit.

Layering: imports :mod:`fedrecon.federated` (and, in :mod:`.audit`, models/train); the
runners take an :class:`UpdatePipeline` duck-typed and never import this package.

- :mod:`.secagg`, :mod:`.shamir`: SecAgg (Bonawitz et al. 2017) for the embedded runner.
- :mod:`.dp`: site-level DP-FedAvg, RDP accountant (``dp_accounting``), adaptive clipping.
- :mod:`.validation`: server-side rejection of bad updates (robust aggregators live in
  :mod:`fedrecon.federated.strategies_robust`).
- :mod:`.config`: ``[privacy]`` parsing and :func:`check_privacy_compatibility`.
- :mod:`.pipeline`: the runner hook. :mod:`.audit`: gradient-inversion leakage audit and the
  ``audit`` subcommand (:func:`.audit.register`).

Not provided: sample-level DP-SGD inside a site. It is feasible with the unrolled network
-- with a loader of batch size 1, ``train_local``'s ``grad_clip`` already clips the one
sample's gradient over all trainable parameters, so DP-SGD needs only accumulation of ``L``
such microbatches plus ``N(0, (z C)^2)`` per lot -- but it is not built: it needs a
training loop beside ``train_local``, Poisson sampling of lots (a shuffled DataLoader is not
what the RDP analysis assumes), and it excludes BatchNorm (statistics mix samples;
instance/group norm are fine). Per-sample gradients via ``torch.func.vmap`` (larger
batches) were not tried with the sparse CT projectors.
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
