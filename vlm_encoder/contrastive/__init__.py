"""Contrastive image-text training pieces: the two-tower model and its losses."""

from .config import ContrastiveConfig
from .distributed import Gathered, gather_features
from .losses import ClipLoss, SigLipLoss
from .model import ContrastiveModel, ContrastiveOutput

__all__ = [
    "ClipLoss",
    "ContrastiveConfig",
    "ContrastiveModel",
    "ContrastiveOutput",
    "Gathered",
    "SigLipLoss",
    "gather_features",
]
