"""Contrastive image-text training: config, data, the accelerate loop with exact resume,
evaluation (zero-shot and retrieval) and plots."""

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate, retrieval_recall
from .loop import Trainer, TrainResult, train
from .sampler import EpochSampler
from .sources import open_pair_source

__all__ = [
    "CheckpointError",
    "EpochSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "list_checkpoints",
    "load_checkpoint",
    "open_pair_source",
    "retrieval_recall",
    "save_checkpoint",
    "train",
]
