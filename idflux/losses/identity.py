"""GT-aligned identity loss: landmarks of the ground truth warp both images, ArcFace compares them.

Decoded prediction (B, 3, H, W) and ground truth, both in [-1, 1] (the released code fed the
generated image in [0, 255] and the GT in [-1, 1]; here both go through one ``face_warp`` call
each with the same ``value_range``), are cropped to 112x112 at every face's GT landmarks in one
launch, embedded by the frozen recogniser (differentiable to its input), and compared:
``L_ID = mean over faces of (1 - cos(g, t))``. Faces are matched by construction: face f of the
batch is cropped from image ``image_index[f]`` at its own landmarks in both images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idflux.kernels import face_warp

GATINGS = ("all", "released")


class IdentityLoss(nn.Module):
    """weight * mean_f (1 - cos(ArcFace(warp(pred)), ArcFace(warp(gt)))).

    Args:
        recognizer: frozen ArcFace module, (F, 3, 112, 112) in [-1, 1] -> (F, D).
        weight: loss weight (paper: 0.1).
        gating: "all" (every noise level, as the paper says) or "released" (x 1e-5 for faces whose
            image has t > 0.6, as the released code does).
        transform / interpolation: passed to :func:`idflux.kernels.face_warp` ("similarity" and
            "bilinear" by default; the released code used "affine" and "bicubic").
        backend: face_warp backend.
    """

    def __init__(self, recognizer: nn.Module, *, weight: float = 0.1, gating: str = "all", transform: str = "similarity",
                 interpolation: str = "bilinear", backend: str = "auto"):
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"IdentityLoss: gating must be one of {GATINGS}, got {gating!r}")
        self.recognizer = recognizer.eval().requires_grad_(False)
        self.weight, self.gating = float(weight), gating
        self.transform, self.interpolation, self.backend = transform, interpolation, backend

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        crops = face_warp(images, landmarks, image_index, transform=self.transform, interpolation=self.interpolation,
                          value_range=(-1.0, 1.0), backend=self.backend)
        return self.recognizer(crops.to(next(self.recognizer.parameters()).dtype))

    def forward(self, pred: torch.Tensor, gt: torch.Tensor, landmarks: torch.Tensor, image_index: torch.Tensor,
                t: torch.Tensor | None = None, *, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weighted loss: mean over faces, or per face (F,) with reduction="none",
        embeddings of the generated faces (F, D) for the contrastive loss)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"IdentityLoss: reduction must be 'mean' or 'none', got {reduction!r}")
        if landmarks.shape[0] == 0:
            zero = pred.sum() * 0.0
            return (zero if reduction == "mean" else pred.new_zeros(0)), pred.new_zeros(0, 1)
        g = self.embed(pred, landmarks, image_index)
        with torch.no_grad():
            target = self.embed(gt, landmarks, image_index)
        per_face = 1.0 - F.cosine_similarity(g.float(), target.float(), dim=-1, eps=1e-6)
        if self.gating == "released" and t is not None:
            per_face = per_face * torch.where(t[image_index] > 0.6, 1e-5, 1.0).to(per_face.dtype)
        return self.weight * (per_face.mean() if reduction == "mean" else per_face), g
