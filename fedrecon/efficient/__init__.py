"""fedrecon.efficient: large priors, pretraining, parameter-efficient federation (LoRA,
bias-only, FiLM-only) and update compression with exact byte accounting.

Layering: ``layers`` and ``transformer`` need only torch and ``fedrecon.models.roles`` (the
model factory imports them when a config asks for them); ``peft`` and ``pretrain`` sit
beside ``fedrecon.federated``; ``compression`` is the runner's hook, like
``fedrecon.privacy``.
"""

from .compression import (
    COMPRESSION_METHODS,
    RESIDUAL_KEY,
    CompressionConfig,
    UpdateCompressor,
    compress_tensor,
    decompress_tensor,
)
from .layers import BiasTunedLayer, FrozenLayer, LoRALayer, LowRank, TunedBias
from .peft import PEFT_METHODS, apply_peft, count_parameters, film_partition
from .pretrain import (
    PRIOR_CHECKPOINT_FORMAT,
    load_prior_checkpoint,
    pretrain_prior,
    read_prior_checkpoint,
    save_prior_checkpoint,
)
from .transformer import SwinPrior

__all__ = [name for name in dir() if not name.startswith("_")]
