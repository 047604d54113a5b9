"""Distillation from a dense teacher to a spiking student: the SBDS loss (the trainer follows)."""

from .losses import FeatureProjection, SBDSLoss, SBDSTerms, kl_divergence, sbds_loss

__all__ = ["FeatureProjection", "SBDSLoss", "SBDSTerms", "kl_divergence", "sbds_loss"]
