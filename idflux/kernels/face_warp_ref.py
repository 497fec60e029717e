"""PyTorch reference for ``face_warp``: fit the ArcFace alignment matrices, then gather-sample the crops.

Pure math on valid input (the checks live in :mod:`idflux.kernels.face_warp`). It is the CPU path,
the oracle of the Triton kernels and a benchmark provider.

Conventions (those of insightface ``norm_crop`` = skimage ``SimilarityTransform`` + ``cv2.warpAffine``):

- The transform is estimated in norm_crop's direction, landmarks -> template (``tform.estimate(lmk,
  dst)``), and inverted; the returned (F, 2, 3) matrix maps crop (template) pixels to image pixels.
  For "affine" the least-squares fit is therefore the landmarks -> template one, inverted (not the
  template -> landmarks least-squares fit, which differs when the five points do not fit exactly).
- Integer pixel coordinates are pixel centres; crop pixel (u, v) samples image point M @ [u, v, 1].
- Taps outside the image read black (``value_range[0]``), tap by tap, like cv2 ``BORDER_CONSTANT``.
- Bicubic is Keys' kernel with a = -0.75 (cv2 ``INTER_CUBIC``, torch ``grid_sample`` bicubic).
- Output = 2 * (sample - lo) / (hi - lo) - 1, i.e. (x255 - 127.5) / 127.5 on the 0..255 scale.
"""

from __future__ import annotations

import torch

# insightface.utils.face_align.arcface_dst: left eye, right eye, nose, left and right mouth corners.
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041),
)
CUBIC_A = -0.75
# Degenerate landmarks (shared with the Triton fit kernel). With the centred landmarks' 2x2 covariance
# (eigenvalues l_min <= l_max, trace t = l_min + l_max):
#   all points (nearly) equal: t <= MIN_SPREAD * (1 + max|coordinate|^2)  (fp32 rounding noise stays below);
#   collinear: l_min / l_max < MIN_EIGEN_RATIO, tested as 4 det < t^2 * 4 r / (1 + r)^2 (no square root);
#   no usable fit: the landmark/template correlation of the fitted linear part is below MIN_CORRELATION
#   (similarity: |cross term| <= MIN_CORRELATION * sqrt(t * t_template); affine: |det B| <=
#   MIN_CORRELATION * sqrt(det C * det C_template)), which would make the matrix singular.
MIN_SPREAD = 1e-10
MIN_EIGEN_RATIO = 1e-3
MIN_CORRELATION = 1e-6


def arcface_template(size: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """(5, 2) ArcFace template scaled to a ``size`` x ``size`` crop (pixels, x then y).

    Cached per (size, device, dtype): building it on a GPU is a host-to-device copy, which waits
    for the device; the cached tensor is shared, treat it as read-only."""
    key = (int(size), str(torch.device(device) if device is not None else torch.device("cpu")), dtype)
    cached = _TEMPLATES.get(key)
    if cached is None:
        cached = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64, device=device).mul(size / 112.0).to(dtype)
        _TEMPLATES[key] = cached
    return cached


_TEMPLATES: dict = {}


def fit_matrices_ref(landmarks: torch.Tensor, size: int = 112, transform: str = "similarity") -> tuple[torch.Tensor, torch.Tensor]:
    """Crop -> image matrices (F, 2, 3) and a degenerate flag (F,) bool, from landmarks (F, 5, 2).

    Computed in float64; matrices are float64 for float64 landmarks, float32 otherwise. Rows of
    degenerate faces are finite but meaningless.
    """
    src = landmarks.detach().to(torch.float64)
    dst = arcface_template(size, src.device).expand_as(src)
    src_mean, dst_mean = src.mean(1), dst.mean(1)
    s, d = src - src_mean[:, None], dst - dst_mean[:, None]
    sxx, syy, sxy = (s[..., 0] ** 2).sum(1), (s[..., 1] ** 2).sum(1), (s[..., 0] * s[..., 1]).sum(1)
    trace, det = sxx + syy, sxx * syy - sxy**2
    r = MIN_EIGEN_RATIO
    degenerate = (trace <= MIN_SPREAD * (1 + src.abs().amax((1, 2)) ** 2)) | (4 * det < trace**2 * (4 * r / (1 + r) ** 2))
    if transform == "similarity":
        # Umeyama in 2-D without SVD: landmarks -> template is [[a, -b], [b, a]] with a = p / trace,
        # b = q / trace; its inverse [[a, b], [-b, a]] / (a^2 + b^2) maps the crop to the image.
        p = (d * s).sum((1, 2))
        q = (d[..., 1] * s[..., 0] - d[..., 0] * s[..., 1]).sum(1)
        degenerate |= p**2 + q**2 <= MIN_CORRELATION**2 * trace * (d**2).sum((1, 2))
        den = torch.where(degenerate, 1.0, p**2 + q**2)
        a, b = p * trace / den, q * trace / den
        lin = torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], -2)
    else:
        # Least squares landmarks -> template: L = B^T C^-1 with C = sum s s^T, B = sum s d^T; the
        # crop -> image linear part is its inverse C B^-T.
        b = s.transpose(1, 2) @ d
        det_b = b[:, 0, 0] * b[:, 1, 1] - b[:, 0, 1] * b[:, 1, 0]
        dxx, dyy, dxy = (d[..., 0] ** 2).sum(1), (d[..., 1] ** 2).sum(1), (d[..., 0] * d[..., 1]).sum(1)
        degenerate |= det_b.abs() <= MIN_CORRELATION * (det.clamp_min(0) * (dxx * dyy - dxy**2)).sqrt()
        det_b = torch.where(degenerate, 1.0, det_b)
        inv_bt = torch.stack([torch.stack([b[:, 1, 1], -b[:, 1, 0]], -1), torch.stack([-b[:, 0, 1], b[:, 0, 0]], -1)], -2)
        cov = torch.stack([torch.stack([sxx, sxy], -1), torch.stack([sxy, syy], -1)], -2)
        lin = cov @ inv_bt / det_b[:, None, None]
    shift = src_mean - (lin @ dst_mean[..., None])[..., 0]
    matrices = torch.cat([lin, shift[..., None]], -1)
    return matrices.to(torch.float64 if landmarks.dtype == torch.float64 else torch.float32), degenerate


def _tap_weight(dist: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Filter weight at signed distance ``dist`` between the sample point and a tap."""
    t = dist.abs()
    if interpolation == "bilinear":
        return (1 - t).clamp_min(0)
    a = CUBIC_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def face_warp_ref(
    images: torch.Tensor,
    matrices: torch.Tensor,
    image_index: torch.Tensor,
    size: int = 112,
    interpolation: str = "bilinear",
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Crops (F, C, size, size) in ``images.dtype`` of images (B, C, H, W) through matrices (F, 2, 3).

    Accumulates in fp32 (float64 for float64 images); differentiable in ``images``.
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    ct = torch.float64 if images.dtype == torch.float64 else torch.float32
    img = images.to(ct)
    B, C, H, W = img.shape
    F = matrices.shape[0]
    r = torch.arange(size, device=img.device, dtype=ct)
    v, u = torch.meshgrid(r, r, indexing="ij")
    grid = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones_like(u).reshape(-1)])  # (3, S*S)
    xy = matrices.to(device=img.device, dtype=ct) @ grid  # (F, 2, S*S)
    # Far-away points only need to stay far away: the clamp keeps the integer tap indices small.
    x, y = xy[:, 0].clamp(-3, W + 2)[..., None], xy[:, 1].clamp(-3, H + 2)[..., None]  # (F, S*S, 1)
    taps = torch.tensor((0, 1) if interpolation == "bilinear" else (-1, 0, 1, 2), device=img.device, dtype=ct)
    ys, xs = y.floor() + taps, x.floor() + taps  # (F, S*S, T): tap rows and columns
    # Separable weights; a tap outside the image weighs 0, so it reads black (value_range[0]) below.
    wy = _tap_weight(y - ys, interpolation) * ((ys >= 0) & (ys < H))
    wx = _tap_weight(x - xs, interpolation) * ((xs >= 0) & (xs < W))
    w = (wy[..., :, None] * wx[..., None, :]).flatten(2)  # (F, S*S, T*T)
    # Every tap of every crop pixel and channel comes out of one index_select of the flat image, and
    # its backward is one index_add into the image gradient (a gather per tap would cost the
    # backward one image-sized buffer per tap). Taps last: the weighted sum reduces contiguous memory.
    itype = torch.int32 if img.numel() < 2**31 else torch.int64  # int32: half the index traffic
    base = image_index.to(img.device, itype)[:, None, None, None] * (C * H * W)
    pixel = base + ys.clamp(0, H - 1).to(itype)[..., :, None] * W + xs.clamp(0, W - 1).to(itype)[..., None, :]
    channel = torch.arange(C, device=img.device, dtype=itype)[:, None] * (H * W)
    index = pixel.flatten(2)[:, :, None, :] + channel  # (F, S*S, C, T*T)
    taps_val = img.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)
    w = w[:, :, None, :]
    acc = (taps_val * w).sum(-1) - lo * w.sum(-1)  # sum of w * (value - lo): (F, S*S, C)
    out = acc * (2.0 / (hi - lo)) - 1.0
    return out.transpose(1, 2).reshape(F, C, size, size).to(images.dtype)
