"""Flow-matching Euler sampler with FLUX's resolution-dependent time shift."""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm


def flux_mu(n_tokens: float, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Shift parameter mu, linear in the image token count: 256 -> 0.5, 4096 -> 1.15."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (n_tokens - base_tokens)


def sampling_mu(height: int, width: int, *, released_parity: bool = False) -> float:
    """mu for an image of ``height`` x ``width`` pixels.

    By default from the true token count (H/16)(W/16). ``released_parity`` reproduces the released
    inference, which passes the floor-divided ``(W/8)(H/8) // 256`` instead (mu ~0.47 at 1024^2;
    at 720^2 it is 31, not 31.64), for parity with its images.
    """
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ValueError(f"sampling_mu: height and width must be positive multiples of 16, got {height}x{width}")
    n = (height // 8) * (width // 8) // 256 if released_parity else (height // 16) * (width // 16)
    return flux_mu(n)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """t' = e^mu / (e^mu + 1/t - 1), written as e^mu t / (e^mu t + 1 - t): exact 0 and 1 at the ends."""
    t = t.double()
    a = math.exp(mu) * t
    return a / (a + (1.0 - t))


def schedule(steps: int, mu: float) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 down to 0: linspace(1, 0, steps+1) shifted by mu."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return time_shift(mu, torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, times: torch.Tensor,
                 *, progress: bool = True,
                 callback: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = times[0] (noise) to times[-1]: x += (t_next - t) * v.

    ``callback(i, t, x)`` runs after step i (t its start time, x the new state); a tensor it
    returns replaces x (diffusers' ``callback_on_step_end`` convention).
    """
    x = noise
    steps = range(len(times) - 1)
    for i in tqdm(steps, desc="denoising", disable=not progress, leave=False):
        t, t_next = float(times[i]), float(times[i + 1])
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        v = velocity(x, tt)
        x = x + (t_next - t) * v.to(x.dtype)
        if callback is not None:
            replaced = callback(i, t, x)
            if replaced is not None:
                x = replaced
    return x
