"""Training losses: flow matching, GT-aligned identity loss, contrastive (InfoNCE) loss."""

from idflux.losses.contrastive import ContrastiveLoss
from idflux.losses.negative_bank import NegativeBank

__all__ = ["ContrastiveLoss", "NegativeBank"]
