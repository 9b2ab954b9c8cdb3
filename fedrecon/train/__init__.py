"""fedrecon.train: plain-PyTorch local training and evaluation of reconstruction networks."""

from .batching import Prepared, prepare_batch, to_target_space
from .loop import LOSSES, TrainResult, evaluate_model, reconstruct, seed_everything, train_local

__all__ = [name for name in dir() if not name.startswith("_")]
