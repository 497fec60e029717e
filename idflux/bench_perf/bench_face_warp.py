"""Benchmark rows for ``face_warp``: our kernel and reference against the usual ways to align faces.

Faces: ``FACES_PER_IMAGE`` faces per image, each about a quarter of the image wide, slightly rotated,
warped to 112 x 112 crops. Providers:
  ref                   ``face_warp(backend="torch")``: the PyTorch reference (fit + validation included)
  triton                ``face_warp(backend="triton")`` (CUDA only; fit + validation included)
  triton_nocheck        the same with ``check=False`` (no host sync), as ``IdentityLoss`` calls it
  triton_scatter_bwd    triton_nocheck with the other backward (atomic scatter into fp32, then a cast)
  grad_write            ``zero_()`` of an image-sized tensor in the images' dtype: the bound of the
                        backward, which must write the dense image gradient (bwd only)
  grid_sample_bicubic   ``images[image_index]`` + ``F.affine_grid`` + ``F.grid_sample`` bicubic with a
                        per-face 6-DOF affine: the released way
  grid_sample_bilinear  the same, bilinear
  kornia                ``kornia.geometry.transform.warp_affine`` on ``images[image_index]`` (if installed)
The baselines receive the matrices precomputed (their fit is not timed); ours fits every call and reads
one validation flag back to the host. Baselines run in the images' dtype (grid included).
bytes: fwd = image bytes the taps touch (about S^2 * min(|det M|, taps) pixels per face and channel) +
crops written; bwd = the dense image gradient written + the crop gradient read; fwd+bwd = both.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from idflux.bench_perf.harness import Case, Goal, mode_fns, with_setting
from idflux.kernels._backend import HAS_TRITON
from idflux.kernels.face_warp import face_warp, face_warp_matrices
from idflux.kernels.face_warp_ref import arcface_template

OP = "face_warp"
SUMMARY = [
    ("ref", "grid_sample_bicubic"), ("ref", "grid_sample_bilinear"),
    ("triton", "grid_sample_bicubic"), ("triton", "grid_sample_bilinear"), ("triton", "kornia"),
    ("triton_nocheck", "grid_sample_bicubic"), ("triton_nocheck", "grid_sample_bilinear"),
    ("triton_nocheck", "triton_scatter_bwd"), ("grad_write", "triton_nocheck"),
]
# Issue #5's goals: every batch size and image size, bicubic as released.
GOALS = [
    Goal(5, ">= 3x the released way (affine_grid + grid_sample bicubic)", OP, p, "grid_sample_bicubic", "fwd+bwd",
         "speedup", 3.0, (("interp", "bicubic"),)) for p in ("triton_nocheck", "triton")
] + [Goal(5, "backward within 2x of writing the image gradient", OP, "triton_nocheck", "grad_write", "bwd", "slowdown", 2.0)]
# Providers with no host sync: also timed from a CUDA-graph replay (device time).
CAPTURABLE = {"triton_nocheck", "triton_scatter_bwd", "grid_sample_bilinear", "grid_sample_bicubic", "grad_write"}
CROP = 112
FACES_PER_IMAGE = 2
_TAPS = {"bilinear": 4, "bicubic": 16}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grid_sample_theta(matrices: torch.Tensor, height: int, width: int, size: int, align_corners: bool) -> torch.Tensor:
    """``F.affine_grid`` thetas (F, 2, 3) equivalent to crop -> image pixel matrices (F, 2, 3)."""
    m = matrices.double()
    if align_corners:
        norm = m.new_tensor([[2 / max(width - 1, 1), 0, -1], [0, 2 / max(height - 1, 1), -1], [0, 0, 1]])
        half = (size - 1) / 2
        denorm = m.new_tensor([[half, 0, half], [0, half, half], [0, 0, 1]])
    else:
        norm = m.new_tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
        denorm = m.new_tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]])
    full = torch.cat([m, m.new_tensor([0, 0, 1]).expand(m.shape[0], 1, 3)], 1)
    return (norm @ full @ denorm)[:, :2]


def grid_sample_warp(images, matrices, image_index, size=CROP, mode="bilinear", value_range=(-1.0, 1.0), align_corners=False):
    """Crops the released way: gather one image per face, ``affine_grid`` + ``grid_sample`` (zeros padding
    on ``images - lo``, so outside is black), then ArcFace normalisation."""
    lo, hi = value_range
    src = images[image_index] - lo
    theta = grid_sample_theta(matrices, images.shape[2], images.shape[3], size, align_corners).to(images.dtype)
    grid = F.affine_grid(theta, [src.shape[0], src.shape[1], size, size], align_corners=align_corners)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    return out * (2 / (hi - lo)) - 1


def kornia_warp(images, matrices, image_index, size=CROP, mode="bilinear", value_range=(-1.0, 1.0)):
    """Crops with kornia ``warp_affine`` (image -> crop matrices, pixel-centre convention)."""
    from kornia.geometry.transform import warp_affine

    lo, hi = value_range
    full = torch.cat([matrices.double(), matrices.new_tensor([0, 0, 1], dtype=torch.float64).expand(matrices.shape[0], 1, 3)], 1)
    to_crop = torch.linalg.inv(full)[:, :2].to(images.dtype)
    out = warp_affine(images[image_index] - lo, to_crop, (size, size), mode=mode, padding_mode="zeros", align_corners=True)
    return out * (2 / (hi - lo)) - 1


def random_faces(batch: int, height: int, width: int, per_image: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks (batch * per_image, 5, 2) of faces ~width/4 wide inside the images, and their image index."""
    n = batch * per_image
    template = arcface_template(CROP, dtype=torch.float32)
    scale = width / 4 / CROP * (0.8 + 0.4 * torch.rand(n, generator=generator))
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(40)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    slot = torch.arange(n) % per_image
    centre = torch.stack([(slot + 0.5) / per_image * width, torch.full((n,), height / 2)], -1)
    lmk = (template - CROP / 2) @ rot.transpose(1, 2) * scale[:, None, None] + centre[:, None]
    return lmk, torch.arange(n) // per_image


def _touched_bytes(matrices: torch.Tensor, channels: int, interpolation: str, elem: int) -> float:
    area = (matrices[:, 0, 0] * matrices[:, 1, 1] - matrices[:, 0, 1] * matrices[:, 1, 0]).abs()
    return float(area.clamp(max=_TAPS[interpolation]).sum()) * CROP * CROP * channels * elem


GOAL_PROVIDERS = {"triton_nocheck", "triton", "grid_sample_bicubic", "grad_write"}


def goal_cases(device: torch.device) -> Iterator[Case]:
    """Issue 17's face_warp goal case: 8 images 1024^2 -> 112^2 crops, bicubic, fwd+bwd (and the
    backward against writing the image gradient), bf16 then fp32 on CUDA; fp32 at 512^2 on a CPU."""
    sweep = [(8, 1024, "bf16"), (8, 1024, "fp32")] if device.type == "cuda" else [(1, 512, "fp32")]
    return cases(device, False, sweep=sweep, interps=("bicubic",), providers=GOAL_PROVIDERS, modes={"bwd", "fwd+bwd"})


def cases(device: torch.device, quick: bool, *, sweep=None, interps=("bilinear", "bicubic"), providers=None,
          modes=None) -> Iterator[Case]:
    """CUDA: B in {1, 8, 32} at 512^2 and 1024^2 (fp32; bf16 too at 1024^2), 2 faces per image, the
    goal shapes (32 and 1 images at 1024^2) first.
    CPU: B in {1, 4} at 512^2, fp32 (``quick``: B = 1 only). ``sweep`` ((images, side, dtype name),
    ...), ``interps``, ``providers`` and ``modes`` restrict it (:func:`goal_cases`)."""
    keep = (lambda name: True) if providers is None else (lambda name: name in providers)
    if sweep is not None:
        pass
    elif device.type == "cuda":
        # The goal shapes first (a time-limited GPU run measures them before anything else).
        first = [(32, 1024, "fp32"), (32, 1024, "bf16"), (1, 1024, "fp32")]
        rest = [(b, s, "fp32") for s in (512, 1024) for b in (1, 8, 32)] + [(b, 1024, "bf16") for b in (1, 8)]
        sweep = first + [c for c in rest if c not in first]
    else:
        sweep = [(1, 512, "fp32")] + ([] if quick else [(4, 512, "fp32")])
    ours = ["ref"] + (["triton", "triton_nocheck", "triton_scatter_bwd"] if device.type == "cuda" and HAS_TRITON else [])
    try:
        import kornia  # noqa: F401

        has_kornia = True
    except ImportError:
        has_kornia = False
    gen = torch.Generator().manual_seed(0)
    for batch, side, dtype_name in sweep:
        dtype = _DTYPES[dtype_name]
        images = (torch.rand(batch, 3, side, side, generator=gen) * 2 - 1).to(device, dtype).requires_grad_(True)
        lmk, index = random_faces(batch, side, side, FACES_PER_IMAGE, gen)
        lmk, index = lmk.to(device), index.to(device)
        matrices = face_warp_matrices(lmk, size=CROP)
        elem = images.element_size()
        n_faces = lmk.shape[0]
        crop_bytes = n_faces * 3 * CROP * CROP * elem
        for interp in interps:
            shape = {"B": batch, "H": side, "W": side, "faces": n_faces, "size": CROP, "interp": interp}
            fns = {p: (lambda p=p, interp=interp: face_warp(images, lmk, index, size=CROP, interpolation=interp,
                                                            backend="torch" if p == "ref" else "triton", check=p == "triton"))
                   for p in ours}
            fns[f"grid_sample_{interp}"] = lambda interp=interp: grid_sample_warp(images, matrices, index, CROP, interp)
            if has_kornia:
                fns["kornia"] = lambda interp=interp: kornia_warp(images, matrices, index, CROP, interp)
            flops = 2 * _TAPS[interp] * n_faces * 3 * CROP * CROP
            fwd_bytes = _touched_bytes(matrices, 3, interp, elem) + crop_bytes
            bwd_bytes = images.numel() * elem + crop_bytes
            work = {"fwd": (flops, fwd_bytes), "bwd": (flops, bwd_bytes), "fwd+bwd": (2 * flops, fwd_bytes + bwd_bytes)}
            for provider, forward in fns.items():
                if not keep(provider):
                    continue
                note = "" if provider.startswith(("ref", "triton")) else "matrices precomputed"
                for mode, fn in mode_fns(forward, [images]).items():
                    if modes is not None and mode not in modes:
                        continue
                    if provider == "triton_scatter_bwd":  # the strategy is read when the backward runs
                        fn = with_setting("idflux.kernels.face_warp", "BWD", "scatter", fn)
                    yield Case(OP, provider, mode, shape, dtype_name, fn, flops=work[mode][0], bytes=work[mode][1], note=note,
                               graph=provider in CAPTURABLE)
            if keep("grad_write"):
                grad_buf = torch.empty_like(images)
                yield Case(OP, "grad_write", "bwd", shape, dtype_name, grad_buf.zero_, bytes=images.numel() * elem,
                           note="zero_() of the image gradient: the backward's bound", graph=True)
                del grad_buf
