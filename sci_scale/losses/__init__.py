"""Losses: the structural contrastive loss and the aux-loss gradient attachment."""

from sci_scale.losses.aux import AttachAuxLoss, attach_aux_loss
from sci_scale.losses.scl import SCLOutput, Temperature, alpha_at, supervised_contrastive_loss

__all__ = [
    "AttachAuxLoss",
    "SCLOutput",
    "Temperature",
    "alpha_at",
    "attach_aux_loss",
    "supervised_contrastive_loss",
]
