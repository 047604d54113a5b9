"""Distillation from a dense teacher to a spiking student: the SBDS loss and MAR's two-stage
trainer (stage 1: Transformer → dense SSM; stage 2: dense SSM → spiking MAR)."""

from .losses import FeatureProjection, SBDSLoss, SBDSTerms, kl_divergence, sbds_loss
from .trainer import DistillConfig, DistillObjective, Teacher, distill, transfer_weights

__all__ = [
    "DistillConfig",
    "DistillObjective",
    "FeatureProjection",
    "SBDSLoss",
    "SBDSTerms",
    "Teacher",
    "distill",
    "kl_divergence",
    "sbds_loss",
    "transfer_weights",
]
