"""GT-aligned identity loss: landmarks of the ground truth warp both images, ArcFace compares them.

Decoded prediction (B, 3, H, W) and ground truth, both in [-1, 1] (the released code fed the
generated image in [0, 255] and the GT in [-1, 1]; here both go through one ``face_warp`` call
each with the same ``value_range``), are cropped to 112x112 at every face's GT landmarks in one
launch, embedded by the frozen recogniser (differentiable to its input), and compared:
``L_ID = mean over faces of (1 - cos(g, t))``. Faces are matched by construction: face f of the
batch is cropped from image ``image_index[f]`` at its own landmarks in both images.

The crops use ``face_warp(..., check=False)``, so the loss never syncs with the host: a face with
unusable landmarks (NaN/inf, degenerate) or an image_index outside the batch is not an error but is
left out (weight 0, not counted in the mean; see :func:`idflux.kernels.face_warp.face_warp_valid`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idflux.kernels.face_warp import face_warp, face_warp_valid

GATINGS = ("all", "released")


class IdentityLoss(nn.Module):
    """weight * mean_f (1 - cos(ArcFace(warp(pred)), ArcFace(warp(gt)))) over the valid faces.

    A face that :func:`~idflux.kernels.face_warp.face_warp_valid` calls invalid (NaN/inf or degenerate
    landmarks, image_index outside [0, B)) gets loss 0, no gradient, and does not count in the mean;
    with no valid face the loss is 0. No host sync.

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
                          value_range=(-1.0, 1.0), backend=self.backend, check=False)
        return self.recognizer(crops.to(next(self.recognizer.parameters()).dtype))

    def forward(self, pred: torch.Tensor, gt: torch.Tensor, landmarks: torch.Tensor, image_index: torch.Tensor,
                t: torch.Tensor | None = None, *, reduction: str = "mean",
                valid: torch.Tensor | None = None, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weighted loss: mean over valid faces, or per face (F,) with reduction="none", 0 for
        invalid faces; embeddings of the generated faces (F, D) for the contrastive loss: those of
        invalid faces embed an all-black crop, mask them with ``face_warp_valid``). ``valid``: that
        mask (F,) bool if the caller already has it (same landmarks, index, transform, backend).
        ``target``: the GT faces' embeddings (F, D), ``self.embed(gt, landmarks, image_index)``, if the
        caller computed them already (e.g. as contrastive positives); not differentiated."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"IdentityLoss: reduction must be 'mean' or 'none', got {reduction!r}")
        if landmarks.shape[0] == 0:
            zero = pred.sum() * 0.0
            return (zero if reduction == "mean" else pred.new_zeros(0)), pred.new_zeros(0, 1)
        g = self.embed(pred, landmarks, image_index)
        if target is None:
            with torch.no_grad():
                target = self.embed(gt, landmarks, image_index)
        elif target.shape != g.shape:
            raise ValueError(f"IdentityLoss: target must be (F, D) = {tuple(g.shape)} like the recognizer's "
                             f"embeddings of the faces, got {tuple(target.shape)}")
        target = target.detach()
        if valid is None:  # callers that need the mask themselves pass it (one fit, not two)
            valid = face_warp_valid(landmarks, image_index, pred.shape[0], transform=self.transform, backend=self.backend)
        per_face = 1.0 - F.cosine_similarity(g.float(), target.float(), dim=-1, eps=1e-6)
        if self.gating == "released" and t is not None:
            image_t = t[torch.where(valid, image_index, 0)]  # an out-of-range index must not be gathered
            per_face = per_face * torch.where(image_t > 0.6, 1e-5, 1.0).to(per_face.dtype)
        # where, not a product: an excluded face contributes exactly 0 and no gradient, whatever its value.
        per_face = torch.where(valid, per_face, 0.0)
        if reduction == "none":
            return self.weight * per_face, g
        return self.weight * (per_face.sum() / valid.sum().clamp_min(1)), g
