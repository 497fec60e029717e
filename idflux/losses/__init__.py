"""Training losses: flow matching, GT-aligned identity loss, contrastive (InfoNCE) loss."""

from idflux.losses.contrastive import ContrastiveLoss
from idflux.losses.flow_matching import FlowMatchingLoss, noisy_latents, one_step_x0, sample_timesteps
from idflux.losses.identity import IdentityLoss
from idflux.losses.negative_bank import NegativeBank

__all__ = ["ContrastiveLoss", "FlowMatchingLoss", "IdentityLoss", "NegativeBank", "noisy_latents", "one_step_x0",
           "sample_timesteps"]
