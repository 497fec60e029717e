"""Differentiable ArcFace face alignment: fit the 5-point transform, warp to (F, C, size, size) crops.

Public: :func:`face_warp`, :func:`face_warp_matrices`, :func:`face_warp_valid`. Conventions are those
of insightface ``norm_crop`` (see :mod:`idflux.kernels.face_warp_ref`): the transform is estimated landmarks ->
template, as ``tform.estimate(lmk, dst)`` does, then inverted; crop pixel (u, v) samples image point
M @ [u, v, 1] with pixel centres at integer coordinates (cv2.warpAffine); taps outside the image
read black (value_range[0]); output is 2 * (x - lo) / (hi - lo) - 1 in the images' dtype, with fp32
accumulation (float64 for float64 images on the PyTorch path). Gradients flow to the images only.

Triton path (kernel -> launcher -> ``FaceWarpFunction`` -> ``face_warp``): one fit launch for all faces
(closed-form similarity / 6-DOF least squares in fp32, (F, 2, 3) matrices + a degenerate flag), one
warp launch over (face, tile of crop pixels) for all channels, and a backward that gathers: one
program per tile of image pixels maps each pixel back into the crops of the faces whose footprint
meets the tile and sums the crop gradients whose taps reach it, so the dense image gradient is
written once, in the image dtype, without atomics or an fp32 buffer, deterministically (the
atomic scatter into an fp32 buffer stays selectable: ``BWD = "scatter"``). No host sync or Python loop over faces in the kernels;
the validation in ``face_warp`` reads one flag pair back (index range, NaN/degenerate landmarks), unless
``check=False``: then invalid faces (see :func:`face_warp_valid`) get black crops and no gradient
through a device-side ``torch.where`` on their matrices, and the call never syncs.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from idflux.kernels._backend import HAS_TRITON, INTERPRET, check_interpreter_dtype, resolve_backend
from idflux.kernels.face_warp_ref import (
    CUBIC_A, MIN_CORRELATION, MIN_EIGEN_RATIO, MIN_SPREAD, face_warp_ref, fit_matrices_ref,
)

TRANSFORMS = ("similarity", "affine")
INTERPOLATIONS = ("bilinear", "bicubic")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"face_warp: size={size!r} must be an integer >= 1 (the crop side; 112 for ArcFace)")
    return size


def _check_transform(transform) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"face_warp: transform={transform!r} is not one of {TRANSFORMS}")


def _check_landmarks_shape(landmarks) -> None:
    if not isinstance(landmarks, torch.Tensor) or landmarks.dim() != 3 or tuple(landmarks.shape[1:]) != (5, 2):
        shape = tuple(landmarks.shape) if isinstance(landmarks, torch.Tensor) else type(landmarks).__name__
        raise ValueError(f"face_warp: landmarks must be a (F, 5, 2) tensor of (x, y) pixels in ArcFace order, got {shape}")
    if landmarks.dtype == torch.bool or landmarks.is_complex():
        raise ValueError(f"face_warp: landmarks must be real pixel coordinates, got dtype {landmarks.dtype}")


def _check_image_index(image_index, F: int) -> None:
    if not isinstance(image_index, torch.Tensor) or image_index.dim() != 1 or image_index.shape[0] != F:
        shape = tuple(image_index.shape) if isinstance(image_index, torch.Tensor) else type(image_index).__name__
        raise ValueError(f"face_warp: image_index must be a ({F},) tensor (one image per face), got {shape}")
    if image_index.dtype.is_floating_point or image_index.is_complex() or image_index.dtype == torch.bool:
        raise ValueError(f"face_warp: image_index must be an integer tensor, got {image_index.dtype}; use .long()")


def _check_flag(check) -> None:
    if not isinstance(check, bool):
        raise ValueError(f"face_warp: check must be True or False, got {check!r}")


def _validity(landmarks: torch.Tensor, image_index: torch.Tensor, n_images: int, matrices: torch.Tensor,
              degenerate: torch.Tensor) -> torch.Tensor:
    """(F,) bool on the device, no sync: finite landmarks, not flagged degenerate by the fit, a finite
    matrix, image_index in [0, n_images)."""
    return (~degenerate & torch.isfinite(landmarks).flatten(1).all(1) & torch.isfinite(matrices).flatten(1).all(1)
            & (image_index >= 0) & (image_index < n_images))


# Matrix of an invalid face under check=False: every crop pixel maps to x, y <= -8, which both backends
# clamp to -3, so every tap lies outside the image: exactly black (-1), no image read, no gradient.
_OUTSIDE = -8.0


def _landmark_error(landmarks: torch.Tensor, degenerate: torch.Tensor) -> ValueError:
    """The error for bad landmarks: non-finite values first, then degenerate faces (error path only)."""
    finite = torch.isfinite(landmarks).flatten(1).all(1)
    bad = (~finite).nonzero().flatten().tolist()
    if bad:
        return ValueError(f"face_warp: landmarks of faces {bad[:8]} contain NaN or inf; drop those faces before warping")
    bad = degenerate.nonzero().flatten().tolist()
    return ValueError(
        f"face_warp: landmarks of faces {bad[:8]} are degenerate (all points equal, collinear: covariance "
        f"eigenvalue ratio < {MIN_EIGEN_RATIO:g}, or no usable fit), e.g. {landmarks[bad[0]].tolist()}; "
        "pass five distinct detector points (left eye, right eye, nose, left and right mouth corners)"
    )


# ---------------------------------------------------------------------------------------------- Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Compiled kernels may only read constexpr globals (the interpreter would not complain).
    _A = tl.constexpr(CUBIC_A)
    @triton.jit
    def _finite(v):
        return (v == v) & (tl.abs(v) < float("inf"))

    @triton.jit
    def _store_matrix(ptr, m0, m1, m2, m3, m4, m5, mask):
        """The six entries of a 2 x 3 matrix per face, row-major, at ptr (one row of faces)."""
        tl.store(ptr, m0, mask=mask)
        tl.store(ptr + 1, m1, mask=mask)
        tl.store(ptr + 2, m2, mask=mask)
        tl.store(ptr + 3, m3, mask=mask)
        tl.store(ptr + 4, m4, mask=mask)
        tl.store(ptr + 5, m5, mask=mask)

    @triton.jit
    def _face_warp_fit_kernel(
        lmk_ptr, mat_ptr, flag_ptr, idx_ptr, idx_out_ptr, table_ptr,
        stride_lf, stride_lp, stride_lc, stride_idx,
        F, n_images, S, scale, min_spread, ratio_bound, min_corr,
        AFFINE: tl.constexpr, BLOCK_F: tl.constexpr, FULL: tl.constexpr, OUTSIDE: tl.constexpr,
        SUPPORT: tl.constexpr,
    ):
        """One row of BLOCK_F faces x 8 point slots (5 used): centred sums, closed-form fit, inversion.

        Without FULL: the matrices and a degenerate flag per face. With FULL, everything the warp and
        its backward need, in this one launch (no host-side tensor ops): a status per face in
        flag_ptr (0 valid, 1 image_index outside [0, n_images), 2 non-finite landmarks, 3 degenerate
        fit or non-finite matrix), the image index with out-of-range values replaced by 0, and the
        gather backward's table (see ``_gather_table``, computed here in float64 as there); with
        OUTSIDE the matrix of an invalid face is replaced by the all-outside one (_OUTSIDE)."""
        f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
        p = tl.arange(0, 8)
        live = (f < F)[:, None] & (p < 5)[None, :]
        ptr = lmk_ptr + f.to(tl.int64)[:, None] * stride_lf + p[None, :] * stride_lp
        x = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
        y = tl.load(ptr + stride_lc, mask=live, other=0.0).to(tl.float32)
        # ARCFACE_TEMPLATE, spelled out (a kernel reads constexpr scalars only); tested against the reference fit.
        tx = tl.where(p == 0, 38.2946, tl.where(p == 1, 73.5318, tl.where(p == 2, 56.0252, tl.where(p == 3, 41.5493, 70.7299))))
        ty = tl.where(p == 0, 51.6963, tl.where(p == 1, 51.5014, tl.where(p == 2, 71.7366, tl.where(p == 3, 92.3655, 92.2041))))
        tx = tl.where(live, tx[None, :] * scale, 0.0)
        ty = tl.where(live, ty[None, :] * scale, 0.0)
        mx, my = tl.sum(x, 1) / 5, tl.sum(y, 1) / 5
        dmx, dmy = tl.sum(tx, 1) / 5, tl.sum(ty, 1) / 5
        xc = tl.where(live, x - mx[:, None], 0.0)
        yc = tl.where(live, y - my[:, None], 0.0)
        dx = tl.where(live, tx - dmx[:, None], 0.0)
        dy = tl.where(live, ty - dmy[:, None], 0.0)
        sxx, syy, sxy = tl.sum(xc * xc, 1), tl.sum(yc * yc, 1), tl.sum(xc * yc, 1)
        trace = sxx + syy
        det = sxx * syy - sxy * sxy
        amax = tl.max(tl.maximum(tl.abs(x), tl.abs(y)), 1)
        bad = (trace <= min_spread * (1 + amax * amax)) | (4 * det < trace * trace * ratio_bound)
        if AFFINE:
            b00, b01 = tl.sum(xc * dx, 1), tl.sum(xc * dy, 1)
            b10, b11 = tl.sum(yc * dx, 1), tl.sum(yc * dy, 1)
            det_b = b00 * b11 - b01 * b10
            det_d = tl.sum(dx * dx, 1) * tl.sum(dy * dy, 1) - tl.sum(dx * dy, 1) * tl.sum(dx * dy, 1)
            bad = bad | (tl.abs(det_b) <= min_corr * tl.sqrt(tl.maximum(det, 0.0) * det_d))
            det_b = tl.where(bad, 1.0, det_b)
            l00, l01 = (sxx * b11 - sxy * b01) / det_b, (sxy * b00 - sxx * b10) / det_b
            l10, l11 = (sxy * b11 - syy * b01) / det_b, (syy * b00 - sxy * b10) / det_b
        else:
            pp = tl.sum(dx * xc + dy * yc, 1)
            qq = tl.sum(dy * xc - dx * yc, 1)
            norm = pp * pp + qq * qq
            bad = bad | (norm <= min_corr * min_corr * trace * tl.sum(dx * dx + dy * dy, 1))
            norm = tl.where(bad, 1.0, norm)
            l00 = pp * trace / norm
            l01 = qq * trace / norm
            l10 = -l01
            l11 = l00
        t0 = mx - (l00 * dmx + l01 * dmy)
        t1 = my - (l10 * dmx + l11 * dmy)
        fm = f < F
        if FULL:
            finite_l = tl.sum(tl.where(live & ~(_finite(x) & _finite(y)), 1, 0), 1) == 0
            finite_m = (_finite(l00) & _finite(l01) & _finite(t0) & _finite(l10) & _finite(l11) & _finite(t1))
            image = tl.load(idx_ptr + f.to(tl.int64) * stride_idx, mask=fm, other=0).to(tl.int64)
            index_ok = (image >= 0) & (image < n_images)
            status = tl.where(~index_ok, 1, tl.where(~finite_l, 2, tl.where(bad | ~finite_m, 3, 0)))
            tl.store(flag_ptr + f, status.to(tl.int8), mask=fm)
            tl.store(idx_out_ptr + f, tl.where(index_ok, image, 0).to(tl.int32), mask=fm)
            if OUTSIDE:
                ok = status == 0
                l00, l01, t0 = tl.where(ok, l00, -8.0), tl.where(ok, l01, -8.0), tl.where(ok, t0, -8.0)
                l10, l11, t1 = tl.where(ok, l10, -8.0), tl.where(ok, l11, -8.0), tl.where(ok, t1, -8.0)
        else:
            tl.store(flag_ptr + f, bad.to(tl.int8), mask=fm)
        _store_matrix(mat_ptr + f.to(tl.int64) * 6, l00, l01, t0, l10, l11, t1, fm)
        if FULL:
            a00, a01, b0 = l00.to(tl.float64), l01.to(tl.float64), t0.to(tl.float64)
            a10, a11, b1 = l10.to(tl.float64), l11.to(tl.float64), t1.to(tl.float64)
            det64 = a00 * a11 - a01 * a10
            det64 = tl.where(tl.abs(det64) > 1e-12, det64, 1.0)  # only black faces (never reached) are singular
            e = S * 1.0 - 1.0  # (a launch turns S == 1 into a constant: no tensor methods on it)
            x1, x2, x3 = b0 + a00 * e, b0 + a01 * e, b0 + (a00 + a01) * e
            y1, y2, y3 = b1 + a10 * e, b1 + a11 * e, b1 + (a10 + a11) * e
            row = table_ptr + f.to(tl.int64) * 16
            _store_matrix(row, l00, l01, t0, l10, l11, t1, fm)
            tl.store(row + 6, (a11 / det64).to(tl.float32), mask=fm)
            tl.store(row + 7, (-a01 / det64).to(tl.float32), mask=fm)
            tl.store(row + 8, (-a10 / det64).to(tl.float32), mask=fm)
            tl.store(row + 9, (a00 / det64).to(tl.float32), mask=fm)
            tl.store(row + 10, (tl.minimum(tl.minimum(b0, x1), tl.minimum(x2, x3)) - SUPPORT).to(tl.float32), mask=fm)
            tl.store(row + 11, (tl.maximum(tl.maximum(b0, x1), tl.maximum(x2, x3)) + SUPPORT).to(tl.float32), mask=fm)
            tl.store(row + 12, (tl.minimum(tl.minimum(b1, y1), tl.minimum(y2, y3)) - SUPPORT).to(tl.float32), mask=fm)
            tl.store(row + 13, (tl.maximum(tl.maximum(b1, y1), tl.maximum(y2, y3)) + SUPPORT).to(tl.float32), mask=fm)
            ru = SUPPORT * (tl.abs(a11) + tl.abs(a01)) / tl.abs(det64) + 1e-3
            rv = SUPPORT * (tl.abs(a10) + tl.abs(a00)) / tl.abs(det64) + 1e-3
            tl.store(row + 14, tl.minimum(ru, e + 1).to(tl.float32), mask=fm)
            tl.store(row + 15, tl.minimum(rv, e + 1).to(tl.float32), mask=fm)

    @triton.jit
    def _face_warp_taps(mat_ptr, idx_ptr, face, pix, H, W, S, BICUBIC: tl.constexpr):
        """For BLOCK crop pixels of one face: tap weights (BLOCK, K) with out-of-image taps zeroed, their
        (y, x) element offsets in units of the row/column strides, and the image index."""
        NT: tl.constexpr = 4 if BICUBIC else 2
        live = pix < S * S
        u = (pix % S).to(tl.float32)
        v = (pix // S).to(tl.float32)
        m = mat_ptr + face * 6
        x = tl.load(m) * u + tl.load(m + 1) * v + tl.load(m + 2)
        y = tl.load(m + 3) * u + tl.load(m + 4) * v + tl.load(m + 5)
        # Far-away points only need to stay far away: the clamp keeps the integer taps small.
        x = tl.minimum(tl.maximum(x, -3.0), W + 2.0)
        y = tl.minimum(tl.maximum(y, -3.0), H + 2.0)
        k = tl.arange(0, NT * NT)
        first = 1 if BICUBIC else 0
        xt = tl.floor(x)[:, None] + (k % NT - first).to(tl.float32)[None, :]
        yt = tl.floor(y)[:, None] + (k // NT - first).to(tl.float32)[None, :]
        tx = tl.abs(x[:, None] - xt)
        ty = tl.abs(y[:, None] - yt)
        if BICUBIC:
            wx = tl.where(tx <= 1, ((_A + 2) * tx - (_A + 3)) * tx * tx + 1,
                          tl.where(tx < 2, ((_A * tx - 5 * _A) * tx + 8 * _A) * tx - 4 * _A, 0.0))
            wy = tl.where(ty <= 1, ((_A + 2) * ty - (_A + 3)) * ty * ty + 1,
                          tl.where(ty < 2, ((_A * ty - 5 * _A) * ty + 8 * _A) * ty - 4 * _A, 0.0))
        else:
            wx = tl.maximum(1 - tx, 0.0)
            wy = tl.maximum(1 - ty, 0.0)
        valid = (xt >= 0) & (xt < W) & (yt >= 0) & (yt < H) & live[:, None]
        w = tl.where(valid, wx * wy, 0.0)
        image = tl.load(idx_ptr + face).to(tl.int64)
        return w, valid, yt.to(tl.int64), xt.to(tl.int64), image

    @triton.jit
    def _face_warp_fwd_kernel(
        img_ptr, mat_ptr, idx_ptr, out_ptr,
        stride_ib, stride_ic, stride_ih, stride_iw,
        C, H, W, S, lo, out_scale,
        BICUBIC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Program (face, tile): BLOCK crop pixels of one face, all channels; out = scale * sum w (x - lo) - 1."""
        face = tl.program_id(0).to(tl.int64)
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        w, valid, yt, xt, image = _face_warp_taps(mat_ptr, idx_ptr, face, pix, H, W, S, BICUBIC)
        wsum = tl.sum(w, 1)
        src = img_ptr + image * stride_ib + yt * stride_ih + xt * stride_iw
        dst = out_ptr + face * C * S * S + pix
        for c in range(C):
            vals = tl.load(src + c * stride_ic, mask=valid, other=0.0).to(tl.float32)
            res = (tl.sum(w * vals, 1) - lo * wsum) * out_scale - 1.0
            tl.store(dst + c * S * S, res.to(out_ptr.dtype.element_ty), mask=pix < S * S)

    @triton.jit
    def _face_warp_bwd_kernel(
        gout_ptr, mat_ptr, idx_ptr, gimg_ptr,
        stride_gf, stride_gc, stride_gh, stride_gw,
        C, H, W, S, out_scale,
        BICUBIC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Scatter-add out_scale * w * grad_out into the contiguous fp32 image gradient (atomics: faces and
        neighbouring crop pixels share image pixels)."""
        face = tl.program_id(0).to(tl.int64)
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        w, valid, yt, xt, image = _face_warp_taps(mat_ptr, idx_ptr, face, pix, H, W, S, BICUBIC)
        live = pix < S * S
        g_ptr = gout_ptr + face * stride_gf + (pix // S) * stride_gh + (pix % S) * stride_gw
        dst = gimg_ptr + image * C * H * W + yt * W + xt
        for c in range(C):
            g = tl.load(g_ptr + c * stride_gc, mask=live, other=0.0).to(tl.float32) * out_scale
            tl.atomic_add(dst + c * H * W, w * g[:, None], mask=valid, sem="relaxed")

    @triton.jit
    def _cubic(t):
        """Keys cubic weight (a = CUBIC_A) of |distance| t; 0 from 2 on."""
        return tl.where(t <= 1, ((_A + 2) * t - (_A + 3)) * t * t + 1,
                        tl.where(t < 2, ((_A * t - 5 * _A) * t + 8 * _A) * t - 4 * _A, 0.0))

    @triton.jit
    def _face_warp_bwd_gather_kernel(
        gout_ptr, table_ptr, order_ptr, start_ptr, gimg_ptr,
        stride_gf, stride_gc, stride_gh, stride_gw,
        C, H, W, S, tiles_x, tiles_per_image, out_scale,
        BICUBIC: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (image, pixel tile): the exact image gradient of TILE_H x TILE_W pixels, gathered.

        For every face of the image whose footprint meets the tile, each pixel maps back into the
        crop (inverse matrix) and visits the crop pixels whose sample point lies within the tap
        support of it, adding out_scale * w * grad_out. Every pixel is written once, in the
        image dtype (zeros where no face reaches): no atomics, no fp32 buffer, deterministic.
        table rows (16 fp32): crop -> image matrix (6), its inverse's 2x2 (4), footprint x0, x1,
        y0, y1 (tap support included), window half-widths ru, rv in crop pixels.
        """
        pid = tl.program_id(0)
        b = pid // tiles_per_image
        t = pid % tiles_per_image
        k = tl.arange(0, TILE_H * TILE_W)
        py = (t // tiles_x) * TILE_H + k // TILE_W
        px = (t % tiles_x) * TILE_W + k % TILE_W
        live = (py < H) & (px < W)
        pxf = px.to(tl.float32)
        pyf = py.to(tl.float32)
        cc = tl.arange(0, BLOCK_C)
        cmask = cc < C
        acc = tl.zeros([BLOCK_C, TILE_H * TILE_W], tl.float32)  # pixels last: contiguous stores
        tx0 = ((t % tiles_x) * TILE_W).to(tl.float32)
        ty0 = ((t // tiles_x) * TILE_H).to(tl.float32)
        for j in range(tl.load(start_ptr + b), tl.load(start_ptr + b + 1)):
            f = tl.load(order_ptr + j).to(tl.int64)
            row = table_ptr + f * 16
            fx0, fx1 = tl.load(row + 10), tl.load(row + 11)
            fy0, fy1 = tl.load(row + 12), tl.load(row + 13)
            meets = (fx1 > tx0) & (fx0 < tx0 + TILE_W - 1) & (fy1 > ty0) & (fy0 < ty0 + TILE_H - 1)
            if meets:
                m0, m1, m2 = tl.load(row), tl.load(row + 1), tl.load(row + 2)
                m3, m4, m5 = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
                i0, i1, i2, i3 = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9)
                ru = tl.load(row + 14)
                rv = tl.load(row + 15)
                uc = i0 * (pxf - m2) + i1 * (pyf - m5)
                vc = i2 * (pxf - m2) + i3 * (pyf - m5)
                # Crop pixels within the tap support of a pixel: |u - uc| <= ru, |v - vc| <= rv, at
                # most n = floor(2 r) + 1 integers per axis from ceil(c - r) on. The window is slid
                # into [0, S): the part of it inside the crop stays covered, and where r was clamped
                # (a face spanning a few image pixels, whose inverse map magnifies: uc far outside
                # the crop while every crop pixel taps this one) it covers the whole crop.
                nu = tl.floor(2 * ru).to(tl.int32) + 1
                nv = tl.floor(2 * rv).to(tl.int32) + 1
                u0 = tl.minimum(tl.maximum(tl.ceil(uc - ru).to(tl.int32), 0), tl.maximum(S - nu, 0))
                v0 = tl.minimum(tl.maximum(tl.ceil(vc - rv).to(tl.int32), 0), tl.maximum(S - nv, 0))
                g_face = gout_ptr + f * stride_gf + cc[:, None] * stride_gc
                for dv in range(0, nv):
                    v = v0 + dv
                    for du in range(0, nu):
                        u = u0 + du
                        inside = live & (u >= 0) & (u < S) & (v >= 0) & (v < S)
                        uf = u.to(tl.float32)
                        vf = v.to(tl.float32)
                        # The sample point of crop pixel (u, v), computed as the forward computes it.
                        x = m0 * uf + m1 * vf + m2
                        y = m3 * uf + m4 * vf + m5
                        x = tl.minimum(tl.maximum(x, -3.0), W + 2.0)
                        y = tl.minimum(tl.maximum(y, -3.0), H + 2.0)
                        ax = tl.abs(x - pxf)
                        ay = tl.abs(y - pyf)
                        if BICUBIC:
                            w = _cubic(ax) * _cubic(ay)
                        else:
                            w = tl.maximum(1 - ax, 0.0) * tl.maximum(1 - ay, 0.0)
                        w = tl.where(inside, w, 0.0)
                        use = inside & (w != 0)
                        g = tl.load(g_face + v.to(tl.int64)[None, :] * stride_gh + u.to(tl.int64)[None, :] * stride_gw,
                                    mask=cmask[:, None] & use[None, :], other=0.0).to(tl.float32)
                        acc += w[None, :] * g
        dst = gimg_ptr + b.to(tl.int64) * C * H * W + cc[:, None].to(tl.int64) * H * W + (py * W + px)[None, :]
        tl.store(dst, (acc * out_scale).to(gimg_ptr.dtype.element_ty), mask=cmask[:, None] & live[None, :])


def _block(bicubic: bool) -> int:
    # Interpreter: few big programs (each costs ~1 ms); GPU: ~2k taps per program.
    return (256 if bicubic else 1024) if INTERPRET else (128 if bicubic else 512)


#: Registers per thread ptxas gives the warp kernels on sm_90 (triton 3.6, bf16; ``python -m
#: idflux.bench_perf.ptx --op face_warp --regs``), rounded up to the allocation unit of 8.
_REGS = {"fit": 56, "fwd": 80, "bwd_gather": 184, "bwd_scatter": 80}
_ELEMENT = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def launch_plan(B: int, H: int, W: int, F: int, size: int = 112, interpolation: str = "bicubic",
                dtype: torch.dtype = torch.bfloat16, n_sms: int = 132, *, channels: int = 3) -> dict:
    """The GPU launches of one ``face_warp`` forward + backward (gather) on a part with ``n_sms`` SMs.

    B images (C = ``channels``, H x W), F faces, ``size`` x ``size`` crops, ``dtype`` the images'.
    Pure arithmetic, the sizing the launchers use on a GPU (the interpreter takes bigger tiles).
    Returns a dict with, per launch (``fit``, ``fwd``, ``bwd``), a dict of ``grid``, ``programs``,
    ``num_warps``, ``resident_per_sm`` (from ptxas' registers), ``programs_per_sm`` and ``waves``;
    and ``read_bytes`` (forward: at most the crops' taps, C * size^2 * taps per face; the footprint,
    not the image), ``crop_bytes`` (crops written, and read back as their gradient), ``grad_bytes``
    (the dense image gradient the backward writes once: its bound).

    Example (issue 17's goal shape: 8 images 1024^2, two faces each, bicubic 112^2 crops):
        >>> plan = launch_plan(8, 1024, 1024, 16, 112, "bicubic", torch.bfloat16, 132)
        >>> plan["fwd"]["grid"], plan["bwd"]["grid"]
        ((16, 98), (8192,))
    """
    for name, v in (("B", B), ("H", H), ("W", W), ("F", F), ("size", size), ("n_sms", n_sms), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "F" else 1):
            raise ValueError(f"launch_plan: {name} must be an int >= {0 if name == 'F' else 1}, got {v!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"launch_plan: interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
    if dtype not in _ELEMENT:
        raise ValueError(f"launch_plan: dtype must be one of {tuple(_ELEMENT)}, got {dtype!r}")
    bicubic = interpolation == "bicubic"
    block = 128 if bicubic else 512  # _block() on a GPU
    tile_h, tile_w = 16, 64  # _TILE_H, _TILE_W on a GPU

    def launch(grid, warps, regs):
        programs = math.prod(grid)
        resident = max(1, min(65536 // (regs * 32 * warps), 2048 // (32 * warps)))
        return {"grid": grid, "programs": programs, "num_warps": warps, "resident_per_sm": resident,
                "programs_per_sm": programs / n_sms, "waves": programs / (resident * n_sms)}

    elem = _ELEMENT[dtype]
    taps = 16 if bicubic else 4
    return {
        "fit": launch((-(-F // 32),), 4, _REGS["fit"]),
        "fwd": launch((F, -(-(size * size) // block)), 4, _REGS["fwd"]),
        "bwd": launch((B * -(-H // tile_h) * -(-W // tile_w),), _GATHER_WARPS, _REGS["bwd_gather"]),
        "read_bytes": F * channels * size * size * taps * elem,
        "crop_bytes": F * channels * size * size * elem,
        "grad_bytes": B * channels * H * W * elem,
    }


def _fit_triton(landmarks: torch.Tensor, size: int, transform: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, 2, 3) fp32 crop -> image matrices and (F,) bool degenerate flags, all faces in one launch."""
    matrices, flags, _, _ = _prepare_triton(landmarks, None, 0, size, transform, False, False)
    return matrices, flags.bool()


def _prepare_triton(landmarks, image_index, n_images, size, transform, bicubic, outside):
    """Everything a Triton warp needs, from one launch: (matrices (F, 2, 3) fp32, status (F,) int8
    (0 valid, 1 image_index out of range, 2 non-finite landmarks, 3 degenerate), image_index (F,)
    int32 with out-of-range values replaced by 0, gather table (F, 16) fp32). ``outside``: invalid
    faces get the all-outside matrix (black crop, no gradient), as face_warp(check=False) defines.
    With image_index None only the matrices are fitted (status = the degenerate flag)."""
    if not landmarks.dtype.is_floating_point:
        landmarks = landmarks.float()
    F, dev = landmarks.shape[0], landmarks.device
    full = image_index is not None
    matrices = torch.empty(F, 2, 3, device=dev, dtype=torch.float32)
    flags = torch.empty(F, device=dev, dtype=torch.int8)
    index_out = torch.empty(F if full else 0, device=dev, dtype=torch.int32)
    table = torch.empty((F, 16) if full else (0, 16), device=dev, dtype=torch.float32)
    index_in = image_index if full else flags
    r = MIN_EIGEN_RATIO
    block_f = 32
    _face_warp_fit_kernel[(triton.cdiv(F, block_f),)](
        landmarks, matrices, flags, index_in, index_out, table,
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2), index_in.stride(0),
        F, n_images, size, size / 112.0, MIN_SPREAD, 4 * r / (1 + r) ** 2, MIN_CORRELATION,
        AFFINE=transform == "affine", BLOCK_F=block_f, FULL=full, OUTSIDE=outside, SUPPORT=2.0 if bicubic else 1.0,
    )
    return matrices, flags, index_out, table


#: How the backward produces the image gradient: "gather" (each pixel tile gathers from the crop
#: pixels whose taps reach it: every pixel written once in the image dtype, no atomics, no fp32
#: buffer, deterministic) or "scatter" (each crop pixel adds into a zeroed fp32 gradient with
#: atomics, then a cast). A knob for tuning runs; both are tested. A pixel's window covers about
#: (2 * support * crop px per image px)^2 crop pixels: for faces blown up several times (under ~20
#: px wide for a 112 crop) the scatter does less work. "auto" (default): gather, unless the call
#: checked its input (check=True, which reads values back anyway) and found a face whose window
#: passes _GATHER_MAX_WINDOW crop pixels; check=False calls (no host read) always gather.
BWD = "auto"
_GATHER_MAX_WINDOW = 64
_TILE_H, _TILE_W = (16, 32) if INTERPRET else (16, 64)
# 8 warps for a 16 x 64 tile: with 4, ptxas spills 200-430 bytes per thread on sm_90
# (``python -m idflux.bench_perf.ptx --regs``); with 8 it needs 184-239 registers and no spills.
_GATHER_WARPS = 8


def _window_half_widths(matrices: torch.Tensor, bicubic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ru, rv) per face, float64: a pixel's taps reach the crop pixels with |u - uc| <= ru and
    |v - vc| <= rv around its inverse image (uc, vc); a hair wider than exact, against rounding."""
    m = matrices.double()
    a00, a01, a10, a11 = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    det = a00 * a11 - a01 * a10
    det = torch.where(det.abs() > 1e-12, det, torch.ones_like(det))  # only black faces (never reached) are singular
    support = 2.0 if bicubic else 1.0
    return support * (a11.abs() + a01.abs()) / det.abs() + 1e-3, support * (a10.abs() + a00.abs()) / det.abs() + 1e-3


def _gather_table(matrices: torch.Tensor, size: int, bicubic: bool) -> torch.Tensor:
    """(F, 16) fp32 per face: crop -> image matrix (6), inverse 2x2 (4), image footprint x0, x1, y0, y1
    of its sample points widened by the tap support, window half-widths ru, rv (crop pixels).

    The host twin (float64 tensor ops) of the table the fit launch writes for the gather backward
    (``_prepare_triton``): the oracle its test compares against."""
    m = matrices.double()
    a00, a01, t0 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    a10, a11, t1 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a00 * a11 - a01 * a10
    det = torch.where(det.abs() > 1e-12, det, torch.ones_like(det))  # only black faces (never reached) are singular
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    support = 2.0 if bicubic else 1.0
    e = size - 1.0  # the sample points' corners: (0, 0), (e, 0), (0, e), (e, e); no host tensor (a copy would sync)
    xs = torch.stack([t0, t0 + a00 * e, t0 + a01 * e, t0 + (a00 + a01) * e], 1)
    ys = torch.stack([t1, t1 + a10 * e, t1 + a11 * e, t1 + (a10 + a11) * e], 1)
    ru, rv = _window_half_widths(matrices, bicubic)
    cols = [a00, a01, t0, a10, a11, t1, i00, i01, i10, i11, xs.amin(1) - support, xs.amax(1) + support,
            ys.amin(1) - support, ys.amax(1) + support, ru.clamp(max=size), rv.clamp(max=size)]
    return torch.stack(cols, 1).float().contiguous()


def _backward_gather(grad_out, table, image_index, shape, dtype, bicubic, out_scale):
    """Image gradient from the crop gradient: ``table`` from the fit launch (its host twin is
    :func:`_gather_table`), image_index (F,) int32 in [0, B). The faces of each image come from one
    sort and one searchsorted."""
    B, C, H, W = shape
    size = grad_out.shape[-1]
    grad = torch.empty(shape, device=grad_out.device, dtype=dtype)
    if grad.numel() == 0:
        return grad
    sorted_index, order = torch.sort(image_index, stable=True)
    start = torch.searchsorted(sorted_index, torch.arange(B + 1, device=image_index.device, dtype=sorted_index.dtype))
    tiles_x, tiles_y = triton.cdiv(W, _TILE_W), triton.cdiv(H, _TILE_H)
    _face_warp_bwd_gather_kernel[(B * tiles_x * tiles_y,)](
        grad_out, table, order, start, grad,
        *grad_out.stride(),
        C, H, W, size, tiles_x, tiles_x * tiles_y, out_scale,
        BICUBIC=bicubic, TILE_H=_TILE_H, TILE_W=_TILE_W, BLOCK_C=max(2, triton.next_power_of_2(C)), num_warps=_GATHER_WARPS,
    )
    return grad


class FaceWarpFunction(torch.autograd.Function):
    """Triton warp: images (B, C, H, W), crop -> image matrices (F, 2, 3) fp32, image_index (F,) ->
    crops (F, C, S, S) in images.dtype; gradient to images only (gathered per pixel tile; see BWD)."""

    @staticmethod
    def forward(ctx, images, matrices, table, image_index, size, bicubic, lo, hi, bwd="gather"):
        F, C = matrices.shape[0], images.shape[1]
        out = images.new_empty(F, C, size, size)
        block = _block(bicubic)
        _face_warp_fwd_kernel[(F, triton.cdiv(size * size, block))](
            images, matrices, image_index, out,
            *images.stride(),
            C, images.shape[2], images.shape[3], size, lo, 2.0 / (hi - lo),
            BICUBIC=bicubic, BLOCK=block, num_warps=4,
        )
        ctx.save_for_backward(matrices, table, image_index)
        ctx.meta = (tuple(images.shape), images.dtype, size, bicubic, 2.0 / (hi - lo))
        ctx.bwd = bwd
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        matrices, table, image_index = ctx.saved_tensors
        shape, dtype, size, bicubic, out_scale = ctx.meta
        if (ctx.bwd if BWD == "auto" else BWD) == "gather":
            return _backward_gather(grad_out, table, image_index, shape, dtype, bicubic, out_scale), \
                None, None, None, None, None, None, None, None
        _, C, H, W = shape
        grad = torch.zeros(shape, device=grad_out.device, dtype=torch.float32)
        block = _block(bicubic)
        _face_warp_bwd_kernel[(matrices.shape[0], triton.cdiv(size * size, block))](
            grad_out, matrices, image_index, grad,
            *grad_out.stride(),
            C, H, W, size, out_scale,
            BICUBIC=bicubic, BLOCK=block, num_warps=4,
        )
        return grad.to(dtype), None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- public

def face_warp_matrices(landmarks: torch.Tensor, *, size: int = 112, transform: str = "similarity") -> torch.Tensor:
    """Crop -> image pixel matrices (F, 2, 3) for landmarks (F, 5, 2) (x, y pixels, ArcFace order).

    Crop pixel (u, v) of a ``size`` x ``size`` crop sits at image point M @ [u, v, 1]. The fit runs
    landmarks -> (ArcFace template * size / 112) as insightface's ``estimate_norm`` does ("similarity":
    Umeyama closed form; "affine": 6-DOF least squares) and is inverted here. Computed in float64 (the
    PyTorch path on every device); float64 result for float64 landmarks, float32 otherwise. Raises
    ValueError for NaN/inf or degenerate landmarks (reads them back: one host sync).

    Example:
        >>> from idflux.kernels.face_warp_ref import arcface_template
        >>> m = face_warp_matrices(arcface_template(112)[None])  # float64 in, float64 out
        >>> m.shape, bool(torch.allclose(m, torch.eye(2, 3, dtype=torch.float64)))
        (torch.Size([1, 2, 3]), True)
    """
    _check_landmarks_shape(landmarks)
    size = _check_size(size)
    _check_transform(transform)
    matrices, degenerate = fit_matrices_ref(landmarks, size, transform)
    if landmarks.shape[0] and (degenerate.any() | ~torch.isfinite(landmarks).all()).item():
        raise _landmark_error(landmarks, degenerate)
    return matrices


def face_warp_valid(
    landmarks: torch.Tensor,
    image_index: torch.Tensor,
    n_images: int,
    *,
    size: int = 112,
    transform: str = "similarity",
    backend: str = "auto",
) -> torch.Tensor:
    """Which faces ``face_warp(..., check=False)`` crops for real: (F,) bool on the landmarks' device.

    A face is valid when its landmarks are finite, the fit does not flag them degenerate (all points
    equal, collinear or no usable fit; see :mod:`idflux.kernels.face_warp_ref`), its matrix is finite
    and 0 <= image_index < n_images. Invalid faces are those ``face_warp(check=False)`` returns as
    all -1 crops with no gradient (``check=True`` raises for them). Same rule and same fit as
    ``face_warp`` with the same ``size``, ``transform`` and ``backend`` (the Triton fit runs in
    fp32, the reference fit in float64: pass face_warp's backend). No host sync.

    landmarks: (F, 5, 2) (x, y) pixels, ArcFace order. image_index: (F,) integer, same device.
    n_images: B, the number of images the faces index. size, transform, backend: as in face_warp.

    Example:
        >>> from idflux.kernels.face_warp_ref import arcface_template
        >>> lmk = torch.stack([arcface_template(112, dtype=torch.float32), torch.full((5, 2), 3.0)])
        >>> face_warp_valid(lmk, torch.tensor([0, 0]), 1).tolist()
        [True, False]
    """
    _check_landmarks_shape(landmarks)
    F = landmarks.shape[0]
    _check_image_index(image_index, F)
    if image_index.device != landmarks.device:
        raise ValueError(f"face_warp: image_index is on {image_index.device} but landmarks on {landmarks.device}; "
                         "move them to one device")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise ValueError(f"face_warp: n_images={n_images!r} must be an int >= 0 (the B of the (B, C, H, W) images)")
    size = _check_size(size)
    _check_transform(transform)
    impl = resolve_backend("face_warp", backend, landmarks.device)
    if F == 0:
        return torch.zeros(0, dtype=torch.bool, device=landmarks.device)
    if impl == "triton":  # one launch, no host-side tensor ops
        check_interpreter_dtype("face_warp_valid", landmarks.dtype, landmarks.device)
        return _prepare_triton(landmarks, image_index, n_images, size, transform, False, outside=False)[1] == 0
    matrices, degenerate = fit_matrices_ref(landmarks, size, transform)
    return _validity(landmarks, image_index, n_images, matrices, degenerate)


def face_warp(
    images: torch.Tensor,
    landmarks: torch.Tensor,
    image_index: torch.Tensor,
    *,
    size: int = 112,
    transform: str = "similarity",
    interpolation: str = "bilinear",
    value_range: tuple[float, float] = (-1.0, 1.0),
    backend: str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Aligned ArcFace crops (F, C, size, size) of the faces in ``images``.

    images: (B, C, H, W) fp16/bf16/fp32/fp64, any strides, values in ``value_range`` (lo, hi).
    landmarks: (F, 5, 2) (x, y) pixels, ArcFace order (left eye, right eye, nose, left and right
    mouth corners). image_index: (F,) integer, the image of each face, in [0, B).
    size: crop side (default 112; the template is scaled by size / 112). transform: "similarity"
    (default, as insightface ``norm_crop``) or "affine". interpolation: "bilinear" (default) or
    "bicubic" (a = -0.75). backend: "auto" | "triton" | "torch".
    check: True (default) raises ValueError for an image_index outside [0, B) and for NaN/inf or
    degenerate landmarks, which reads them back to the host (one sync per call). False never syncs
    (CUDA-graph capturable) and defines the result instead: a face that :func:`face_warp_valid` calls
    invalid (non-finite or degenerate landmarks, or image_index outside [0, B)) gets a crop of exactly
    -1 (black, "outside the image") and passes zero gradient to the images, never NaN, on both
    backends; the other faces' crops are those of check=True. Shape/dtype/device checks always run.

    Returns crops in ``images.dtype`` (fp32 arithmetic inside; the Triton path, the default for CUDA
    tensors, also fits in fp32, float64 input included) normalised as ArcFace expects, 2 * (x - lo) / (hi - lo) - 1
    (= (x255 - 127.5) / 127.5); outside the image is black, i.e. -1. Differentiable in ``images``
    (not in ``landmarks``). With check=True, validation reads ``image_index`` and the landmark fit
    back to the host (one sync per call); the kernels themselves never sync.

    Example:
        >>> from idflux.kernels.face_warp_ref import arcface_template
        >>> images = torch.rand(1, 3, 112, 112) * 2 - 1
        >>> crops = face_warp(images, arcface_template(112, dtype=torch.float32)[None], torch.tensor([0]))
        >>> crops.shape, bool(torch.allclose(crops, images, atol=1e-5))
        (torch.Size([1, 3, 112, 112]), True)
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"face_warp: images must be a (B, C, H, W) tensor, got {shape}")
    if images.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"face_warp: images must be fp16/bf16/fp32/fp64, got {images.dtype}; convert with images.float()")
    B, C, H, W = images.shape
    if H < 1 or W < 1:
        raise ValueError(f"face_warp: images must have H, W >= 1, got {tuple(images.shape)}")
    _check_landmarks_shape(landmarks)
    F = landmarks.shape[0]
    _check_image_index(image_index, F)
    for name, t in (("landmarks", landmarks), ("image_index", image_index)):
        if t.device != images.device:
            raise ValueError(f"face_warp: {name} is on {t.device} but images on {images.device}; move them to one device")
    size = _check_size(size)
    _check_transform(transform)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"face_warp: interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"face_warp: value_range={value_range!r} must be two numbers (lo, hi)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"face_warp: value_range={value_range!r} needs finite lo < hi, e.g. (-1.0, 1.0) or (0.0, 255.0)")
    _check_flag(check)
    impl = resolve_backend("face_warp", backend, images.device)
    if F == 0:
        return images.new_empty(0, C, size, size)
    if impl == "triton":
        for t in (images, landmarks):  # before any launch: the interpreter computes bf16 wrongly
            check_interpreter_dtype("face_warp", t.dtype, images.device)
        return _face_warp_triton(images, landmarks, image_index, size, transform, interpolation == "bicubic", lo, hi, check)
    matrices, degenerate = fit_matrices_ref(landmarks, size, transform)
    if check:
        flags = torch.stack([(image_index.min() < 0) | (image_index.max() >= B),
                             degenerate.any() | ~torch.isfinite(landmarks).all()]).tolist()  # the one host sync
        if flags[0]:
            raise _index_error(image_index, B)
        if flags[1]:
            raise _landmark_error(landmarks, degenerate)
        return face_warp_ref(images, matrices, image_index, size, interpolation, (lo, hi))
    valid = _validity(landmarks, image_index, B, matrices, degenerate)
    matrices = torch.where(valid[:, None, None], matrices, _OUTSIDE)
    image_index = torch.where(valid, image_index, 0)  # in range for B >= 1; never read otherwise
    if B == 0:  # no image to gather from: every face is invalid (the sum keeps the autograd link)
        return images.new_full((F, C, size, size), -1.0) + images.sum() * 0
    crops = face_warp_ref(images, matrices, image_index, size, interpolation, (lo, hi))
    # Exactly -1 even if image 0 holds inf/NaN where the outside taps are clamped to (0 * inf).
    return torch.where(valid[:, None, None, None], crops, -1.0)


def _index_error(image_index: torch.Tensor, B: int) -> ValueError:
    return ValueError(f"face_warp: image_index must lie in [0, {B}) for {B} images, got values in "
                      f"[{int(image_index.min())}, {int(image_index.max())}]")


def _face_warp_triton(images, landmarks, image_index, size, transform, bicubic, lo, hi, check):
    """The Triton path: one launch fits every face and derives its status, clean image index and
    backward table; one launch warps. check=True reads the status back (one sync) and raises;
    check=False never syncs (invalid faces were given the all-outside matrix in the fit launch)."""
    B = images.shape[0]
    matrices, status, index32, table = _prepare_triton(landmarks, image_index, B, size, transform, bicubic,
                                                       outside=not check)
    bwd = "gather"
    if check:
        flags = [(status == 1).any(), (status >= 2).any()]
        if BWD == "auto":  # read in the same sync: the backward's largest window
            window = ((2 * table[:, 14]).floor() + 1) * ((2 * table[:, 15]).floor() + 1)
            flags.append(window.max() > _GATHER_MAX_WINDOW)
        flags = torch.stack(flags).tolist()  # the one host sync
        if flags[0]:
            raise _index_error(image_index, B)
        if flags[1]:
            raise _landmark_error(landmarks, status == 3)
        if len(flags) > 2 and flags[2]:
            bwd = "scatter"
    return FaceWarpFunction.apply(images, matrices, table, index32, size, bicubic, lo, hi, bwd)

