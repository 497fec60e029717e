"""Rectified-flow training objective of FLUX: x_t = (1 - t) x0 + t eps, target v = eps - x0."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idflux.engine.sampling import time_shift


def sample_timesteps(batch: int, mu: float, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(batch,) training times: u ~ U(0, 1) shifted by FLUX's schedule (mu ~0.63 at 512^2), float32."""
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else None)
    return time_shift(mu, u).float().to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps with t broadcast over the non-batch dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def one_step_x0(x_t: torch.Tensor, v_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The one-step estimate x0_hat = x_t - t v_hat (what the identity loss decodes)."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype) * v_hat


class FlowMatchingLoss(nn.Module):
    """MSE between the predicted velocity and eps - x0 (fp32 reduction)."""

    def forward(self, v_hat: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(v_hat.float(), (noise - x0).float())
