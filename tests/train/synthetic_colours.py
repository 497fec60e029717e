"""Shared by the synthetic-data tests: which palette colour a rendered pixel shows."""

import numpy as np


def nearest_colour(pixel, candidates: dict) -> str:
    """Name of the candidate colour closest to ``pixel`` up to a brightness factor in [0.5, 1.6] (the lighting)."""
    pixel = np.asarray(pixel, np.float64)
    best, best_d = None, np.inf
    for name, colour in candidates.items():
        c = np.asarray(colour, np.float64)
        f = np.clip(pixel @ c / max(c @ c, 1e-9), 0.5, 1.6)
        d = np.linalg.norm(pixel - f * c)
        if d < best_d:
            best, best_d = name, d
    return best
