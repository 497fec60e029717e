"""face_warp: the reference against insightface norm_crop, kornia and grid_sample; the Triton kernels
against the reference (interpreter on CPU, compiled on CUDA); validation."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from idflux.bench_perf.bench_face_warp import grid_sample_warp, kornia_warp
from idflux.kernels._backend import HAS_TRITON, INTERPRET
from idflux.kernels.face_warp import face_warp, face_warp_matrices, face_warp_valid
from idflux.kernels.face_warp_ref import arcface_template, face_warp_ref, fit_matrices_ref
from sync_probe import assert_no_host_sync, host_syncs

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "data" / "face_landmarks.json").read_text())
INTERPS = ("bilinear", "bicubic")
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton with TRITON_INTERPRET=1")


def random_landmarks(n, height, width, generator, spread=0.5, noise=1.0):
    """Template faces under random similarities, centres anywhere in [-spread, 1 + spread] of the image
    (so some crops leave the image), plus pixel noise (the fit is then not exact)."""
    t = arcface_template(112, dtype=torch.float64) - 56
    scale = (0.1 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)) * min(height, width) / 56
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5) * 1.5
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    centre = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * (1 + 2 * spread) - spread) * torch.tensor([width, height])
    lmk = t @ rot.transpose(1, 2) * scale[:, None, None] + centre[:, None]
    return (lmk + noise * torch.randn(lmk.shape, generator=generator, dtype=torch.float64)).float()


def random_problem(batch, channels, height, width, faces, dtype=torch.float32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, channels, height, width, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    lmk = random_landmarks(faces, height, width, g, **kw)
    index = torch.randint(0, batch, (faces,), generator=g)
    return images, lmk, index


# ---------------------------------------------------------------- insightface norm_crop (OpenCV) oracle

def _photo(name):
    if name == "astronaut":
        return pytest.importorskip("skimage.data").astronaut()
    insightface = pytest.importorskip("insightface")
    import cv2

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


def _cv2_crops(img, faces, interpolation, size=112):
    """insightface ``norm_crop`` (bilinear); for bicubic, its matrix with cv2 INTER_CUBIC."""
    pytest.importorskip("insightface")
    import cv2
    from insightface.utils.face_align import estimate_norm, norm_crop

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skimage's deprecated tform.estimate inside insightface
        for lmk in faces:
            lmk = np.asarray(lmk, np.float32)
            if interpolation == "bilinear":
                out.append(norm_crop(img, lmk, image_size=size))
            else:
                m = estimate_norm(lmk, size)
                out.append(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_CUBIC, borderValue=0.0))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).double()


def _assert_close_255(ours, theirs, name, mean_tol=2.0, max_tol=10.0):
    """ours in [-1, 1] (clipped: cv2 saturates uint8) vs a uint8 crop; OpenCV's 1/32-pixel tolerance."""
    ours255 = (ours.double().clamp(-1, 1) + 1) * 127.5
    diff = (ours255 - theirs).abs()
    assert diff.mean() <= mean_tol and diff.max() <= max_tol, f"{name}: mean {diff.mean():.3f}, max {diff.max():.2f} (0..255)"


@pytest.mark.parametrize("interpolation", INTERPS)
@pytest.mark.parametrize("photo", ["astronaut", "t1"])
def test_matches_insightface_norm_crop(photo, interpolation):
    img = _photo(photo)
    faces = FIXTURE[photo]
    theirs = _cv2_crops(img, faces, interpolation)
    images = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    index = torch.zeros(len(faces), dtype=torch.long)
    ours = face_warp(images, torch.tensor(faces), index, value_range=(0.0, 255.0), interpolation=interpolation, backend="torch")
    _assert_close_255(ours, theirs, f"{photo} crops")
    # the same photo given in [-1, 1], fp64
    ours = face_warp(images.double() / 127.5 - 1, torch.tensor(faces), index, interpolation=interpolation, backend="torch")
    _assert_close_255(ours, theirs, f"{photo} crops from [-1, 1] input")


def test_norm_crop_224_and_face_partly_outside():
    img = _photo("astronaut")
    lmk = np.asarray(FIXTURE["astronaut"][0])
    for size, cut in ((224, None), (112, 228)):
        part = img if cut is None else img[60:, :cut]  # the right half of the face is cut off
        shifted = lmk - (0 if cut is None else np.array([0, 60]))
        theirs = _cv2_crops(np.ascontiguousarray(part), [shifted], "bilinear", size)
        images = torch.from_numpy(np.ascontiguousarray(part)).permute(2, 0, 1)[None].float()
        ours = face_warp(images, torch.tensor(shifted[None]), torch.tensor([0]), size=size, value_range=(0, 255), backend="torch")
        _assert_close_255(ours, theirs, f"crop size={size} cut={cut}")
        if cut is not None:
            outside = (theirs == 0).all(1)
            assert outside[:, :, -20:].all(), "test set-up: the crop should leave the image on the right"
            assert (ours[:, :, :, -20:] == -1).all(), "outside the image must be exactly -1"


# ---------------------------------------------------------------- the fit

def test_similarity_matrix_matches_skimage():
    skt = pytest.importorskip("skimage.transform")
    g = torch.Generator().manual_seed(3)
    lmk = random_landmarks(16, 300, 400, g, noise=3.0).double()
    for size in (112, 160, 50):
        dst = arcface_template(size).numpy()
        ours = face_warp_matrices(lmk, size=size)
        for f in range(lmk.shape[0]):
            tform = skt.SimilarityTransform.from_estimate(lmk[f].numpy(), dst)
            expected = np.linalg.inv(tform.params)[:2]
            np.testing.assert_allclose(ours[f].numpy(), expected, rtol=1e-9, atol=1e-9, err_msg=f"similarity face {f} size {size}")


def test_affine_matrix_matches_lstsq():
    # (skimage's AffineTransform.estimate is a total least-squares fit through an SVD: a different estimator)
    g = torch.Generator().manual_seed(4)
    lmk = random_landmarks(16, 300, 400, g, noise=3.0).double()
    dst = arcface_template(112).numpy()
    ours = face_warp_matrices(lmk, transform="affine")
    for f in range(lmk.shape[0]):
        src = np.concatenate([lmk[f].numpy(), np.ones((5, 1))], 1)
        sol = np.linalg.lstsq(src, dst, rcond=None)[0].T  # landmarks -> template, (2, 3)
        expected = np.linalg.inv(np.concatenate([sol, [[0, 0, 1]]]))[:2]
        np.testing.assert_allclose(ours[f].numpy(), expected, rtol=1e-9, atol=1e-9, err_msg=f"affine face {f}")


@pytest.mark.parametrize("size", [112, 64, 7, 224])
@pytest.mark.parametrize("transform", ["similarity", "affine"])
def test_template_landmarks_give_identity(size, transform):
    m = face_warp_matrices(arcface_template(size)[None], size=size, transform=transform)
    torch.testing.assert_close(m, torch.eye(2, 3, dtype=torch.float64)[None], atol=1e-9, rtol=0, msg="identity matrix")
    lmk = arcface_template(size, dtype=torch.float32)[None]
    images = torch.rand(2, 3, size, size) * 2 - 1
    for interp in INTERPS:
        crops = face_warp(images, lmk.expand(2, 5, 2), torch.tensor([1, 0]), size=size, transform=transform, interpolation=interp, backend="torch")
        torch.testing.assert_close(crops, images.flip(0), atol=1e-4, rtol=0, msg=f"identity crop {interp}")


# ---------------------------------------------------------------- kornia and grid_sample oracles

@pytest.mark.parametrize("interpolation", INTERPS)
@pytest.mark.parametrize("transform", ["similarity", "affine"])
def test_matches_kornia_and_grid_sample(interpolation, transform):
    images, lmk, index = random_problem(3, 3, 37, 53, 6)
    m = face_warp_matrices(lmk, size=20, transform=transform)
    ours = face_warp(images, lmk, index, size=20, transform=transform, interpolation=interpolation, backend="torch")
    assert (ours == -1).any() and (ours > -1).any(), "test set-up: some crops must leave the image"
    for ac in (False, True):
        gs = grid_sample_warp(images, m, index, 20, interpolation, align_corners=ac)
        torch.testing.assert_close(ours, gs, atol=2e-4, rtol=0, msg=f"vs grid_sample align_corners={ac}")
    pytest.importorskip("kornia")
    torch.testing.assert_close(ours, kornia_warp(images, m, index, 20, interpolation), atol=2e-4, rtol=0, msg="vs kornia")


@pytest.mark.parametrize("interpolation", INTERPS)
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (17, 33)])
def test_tiny_and_odd_images_and_gradient_vs_grid_sample(hw, interpolation):
    h, w = hw
    images, lmk, index = random_problem(2, 3, h, w, 3, seed=h * w)
    lmk = lmk if h > 3 else lmk * 0 + arcface_template(112, dtype=torch.float32) * (3 * min(h, w) / 112) - 1
    images.requires_grad_(True)
    ours = face_warp(images, lmk, index, size=9, interpolation=interpolation, backend="torch")
    theirs_in = images.detach().clone().requires_grad_(True)
    theirs = grid_sample_warp(theirs_in, face_warp_matrices(lmk, size=9), index, 9, interpolation)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg="crops")
    grad = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, images, grad)
    (g_theirs,) = torch.autograd.grad(theirs, theirs_in, grad)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-4, rtol=1e-4, msg="images.grad")


# ---------------------------------------------------------------- semantics

def test_faces_per_image_and_images_without_faces():
    images, lmk, _ = random_problem(3, 3, 40, 48, 5)
    index = torch.tensor([2, 0, 2, 2, 0])  # image 1 has no face
    images.requires_grad_(True)
    crops = face_warp(images, lmk, index, size=24, backend="torch")
    for f in range(5):
        single = face_warp(images[index[f] : index[f] + 1], lmk[f : f + 1], torch.tensor([0]), size=24, backend="torch")
        torch.testing.assert_close(crops[f : f + 1], single, atol=2e-5, rtol=0, msg=f"face {f} alone")
    (grad,) = torch.autograd.grad(crops, images, torch.randn_like(crops))
    assert (grad[1] == 0).all(), "an image without faces gets a zero gradient"
    assert (grad[0] != 0).any() and (grad[2] != 0).any()


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (0.0, 255.0), (-3.0, 5.0)])
def test_value_range(value_range):
    images, lmk, index = random_problem(2, 3, 30, 30, 3)
    lo, hi = value_range
    expected = face_warp(images, lmk, index, size=16, backend="torch")
    scaled = (images + 1) / 2 * (hi - lo) + lo
    got = face_warp(scaled, lmk, index, size=16, value_range=value_range, backend="torch")
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1, hi - lo), rtol=0, msg=f"crops value_range={value_range}")


def test_strides_dtypes_and_empty():
    images, lmk, index = random_problem(2, 3, 24, 20, 3)
    expected = face_warp(images, lmk, index, size=16, interpolation="bicubic", backend="torch")
    junk = torch.full_like(images, float("nan"))  # a read outside the view would show as NaN
    for name, view in (("channels_last", images.contiguous(memory_format=torch.channels_last)),
                       ("step-2 view", torch.stack([images, junk], -1).flatten(-2)[..., ::2]),
                       ("transposed view", images.transpose(2, 3).contiguous().transpose(2, 3))):
        got = face_warp(view, lmk, index, size=16, interpolation="bicubic", backend="torch")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=name)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        got = face_warp(images.to(dtype), lmk, index, size=16, interpolation="bicubic", backend="torch")
        assert got.dtype == dtype, f"crops dtype {got.dtype} for {dtype} images"
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0, msg=f"crops {dtype}")
    empty = face_warp(images, lmk[:0], index[:0], size=16)
    assert empty.shape == (0, 3, 16, 16) and empty.dtype == images.dtype


@pytest.mark.parametrize("interpolation", INTERPS)
def test_gradcheck_reference_float64(interpolation):
    images, lmk, index = random_problem(2, 2, 6, 7, 3, dtype=torch.float64, seed=5, spread=0.2)
    m, _ = fit_matrices_ref(lmk.double(), 5)
    images.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: face_warp_ref(x, m, index, 5, interpolation, (-1.0, 2.0)), (images,))
    assert torch.autograd.gradcheck(lambda x: face_warp(x, lmk, index, size=5, interpolation=interpolation, backend="torch"), (images,))


# ---------------------------------------------------------------- validation

def _bad_cases():
    with torch.random.fork_rng():  # built at collection time: seed it without moving the global RNG
        torch.manual_seed(1234)
        images, lmk, index = random_problem(2, 3, 20, 20, 2)
    line = torch.stack([torch.arange(5.0), 2 * torch.arange(5.0)], -1)
    ok = dict(images=images, landmarks=lmk, image_index=index)
    return [
        ("images", dict(ok, images=images[0])),
        ("images", dict(ok, images=images.to(torch.uint8))),
        ("images", dict(ok, images=images[:, :, :0])),
        ("landmarks", dict(ok, landmarks=lmk[:, :4])),
        ("landmarks", dict(ok, landmarks=lmk.flatten(1))),
        ("image_index", dict(ok, image_index=index[:1])),
        ("image_index", dict(ok, image_index=index.float())),
        ("image_index", dict(ok, image_index=torch.tensor([0, 2]))),
        ("image_index", dict(ok, image_index=torch.tensor([-1, 0]))),
        ("landmarks", dict(ok, landmarks=lmk.index_put((torch.tensor([0]), torch.tensor([2]), torch.tensor([1])),
                                                         torch.tensor(float("nan"))))),
        ("landmarks", dict(ok, landmarks=lmk.clone().index_fill_(0, torch.tensor([1]), float("inf")))),
        ("landmarks", dict(ok, landmarks=torch.stack([lmk[0], torch.full((5, 2), 7.0)]))),
        ("landmarks", dict(ok, landmarks=torch.stack([lmk[0], line + 3]))),
        ("size", dict(ok, size=0)),
        ("size", dict(ok, size=3.5)),
        ("transform", dict(ok, transform="projective")),
        ("interpolation", dict(ok, interpolation="nearest")),
        ("value_range", dict(ok, value_range=(1.0, 1.0))),
        ("value_range", dict(ok, value_range=(1.0, -1.0))),
        ("value_range", dict(ok, value_range=(0.0, float("inf")))),
        ("backend", dict(ok, backend="cuda")),
        ("check", dict(ok, check=0)),
        ("check", dict(ok, check="no")),
    ]


# Bad values (not shapes, dtypes or options) that only check=True reads back and refuses.
_VALUE_ONLY = {7, 8, 9, 10, 11, 12}


@pytest.mark.parametrize("argname,kwargs", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_value_error_naming_the_argument(argname, kwargs):
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("images", "landmarks", "image_index")]
    with pytest.raises(ValueError, match=argname):
        face_warp(*args, **kwargs)


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_check_false_keeps_shape_dtype_and_option_checks(i):
    argname, kwargs = _bad_cases()[i]
    assert (argname in ("image_index", "landmarks")) or i not in _VALUE_ONLY, "test set-up: _VALUE_ONLY indices"
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("images", "landmarks", "image_index")]
    kwargs.setdefault("check", False)
    if i in _VALUE_ONLY:  # a defined result instead: that face is black
        crops = face_warp(*args, size=8, **kwargs)
        assert torch.isfinite(crops).all() and (crops == -1).flatten(1).all(1).any(), f"case {i}: no black crop"
    else:
        with pytest.raises(ValueError, match=argname):
            face_warp(*args, **kwargs)


def test_degenerate_and_nearly_degenerate_landmarks():
    good = arcface_template(112, dtype=torch.float32)
    for name, bad in (("all equal", torch.full((5, 2), 500.0)), ("collinear", good * torch.tensor([1.0, 0.0])),
                      ("nearly collinear", good * torch.tensor([1.0, 1e-3]))):
        with pytest.raises(ValueError, match="landmarks"):
            face_warp_matrices(bad[None])
        assert fit_matrices_ref(bad[None])[1].all(), name
    # a near-profile face (eigenvalue ratio ~0.24) and a squashed one are still fine, and finite
    for lmk in (torch.tensor(FIXTURE["t1"][4]), good * torch.tensor([1.0, 0.1])):
        for transform in ("similarity", "affine"):
            assert torch.isfinite(face_warp_matrices(lmk[None], transform=transform)).all()
    with pytest.raises(ValueError, match="landmarks"):
        face_warp_matrices(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="size"):
        face_warp_matrices(good[None], size=0)
    with pytest.raises(ValueError, match="transform"):
        face_warp_matrices(good[None], transform="rigid")
    assert face_warp_matrices(good[:0].reshape(0, 5, 2)).shape == (0, 2, 3)
    assert math.isclose(float(face_warp_matrices(good[None] * 2)[0, 0, 0]), 2.0, rel_tol=1e-6)


# ---------------------------------------------------------------- Triton kernels

def _triton_vs_reference(images, lmk, index, size, transform, interpolation, grad_out=None):
    """(crops, images.grad) of backend="triton" and of the reference, with one shared upstream gradient."""
    x = images.detach().clone().requires_grad_(True)
    y = images.detach().clone().requires_grad_(True)
    out_t = face_warp(x, lmk, index, size=size, transform=transform, interpolation=interpolation, backend="triton")
    out_r = face_warp(y, lmk, index, size=size, transform=transform, interpolation=interpolation, backend="torch")
    grad_out = torch.randn(out_r.shape, dtype=torch.float32).to(out_r) if grad_out is None else grad_out
    (g_t,) = torch.autograd.grad(out_t, x, grad_out)
    (g_r,) = torch.autograd.grad(out_r, y, grad_out)
    return out_t, out_r, g_t, g_r


@needs_interpreter
@pytest.mark.parametrize("transform", ["similarity", "affine"])
@pytest.mark.parametrize("interpolation", INTERPS)
def test_triton_interpreter_matches_reference(interpolation, transform):
    images, lmk, index = random_problem(2, 3, 24, 20, 3, seed=11)
    out_t, out_r, g_t, g_r = _triton_vs_reference(images, lmk, index, 16, transform, interpolation)
    assert out_t.shape == (3, 3, 16, 16) and out_t.dtype == torch.float32
    assert (out_r == -1).any(), "test set-up: some crop pixels must lie outside the image"
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=0, msg="crops")
    torch.testing.assert_close(g_t, g_r, atol=1e-4, rtol=1e-4, msg="images.grad")


@needs_interpreter
def test_triton_interpreter_size_112_strides_and_index_dtype(monkeypatch):
    # Faces of a few pixels blown up to 112: their gather windows would span ~100 x 100 crop pixels,
    # so the checked call (BWD = "auto") picks the scatter backward; the gather path's large windows
    # are covered at a smaller size below (test_gather_backward_...).
    fw = _face_warp_module()
    assert fw.BWD == "auto"
    gathered = []
    monkeypatch.setattr(fw, "_backward_gather", lambda *a: gathered.append(1) or 1 / 0)
    images, lmk, index = random_problem(2, 3, 24, 20, 3, seed=12)
    junk = torch.full_like(images, float("nan"))
    view = torch.stack([images, junk], -1).flatten(-2)[..., ::2]  # W stride 2, NaN between the pixels
    lmk = torch.stack([lmk, lmk], 1)[:, 0].double()  # float64, non-contiguous landmarks
    grad_out = torch.randn(1, 1, 1, 1).expand(3, 3, 112, 112)  # stride-0 upstream gradient
    out_t, out_r, g_t, g_r = _triton_vs_reference(view, lmk, index.int(), 112, "similarity", "bicubic", grad_out)
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=0, msg="crops (size 112, strided)")
    torch.testing.assert_close(g_t, g_r, atol=1e-3, rtol=1e-4, msg="images.grad (size 112, stride-0 grad_out)")


@needs_interpreter
def test_triton_fit_matches_reference_fit_and_flags():
    from idflux.kernels.face_warp import _fit_triton

    g = torch.Generator().manual_seed(13)
    good = arcface_template(112, dtype=torch.float32)
    lmk = torch.cat([random_landmarks(37, 900, 1200, g, noise=2.0),
                     torch.stack([torch.full((5, 2), 300.0), good * torch.tensor([1.0, 0.0]) + 5, good * torch.tensor([1.0, 1e-4]),
                                  good.flip(0) * torch.tensor([-1.0, 1.0])])])
    for transform in ("similarity", "affine"):
        for size in (112, 33):
            m_t, flag_t = _fit_triton(lmk, size, transform)
            m_r, flag_r = fit_matrices_ref(lmk, size, transform)
            assert flag_t.tolist() == flag_r.tolist(), f"degenerate flags {transform} size {size}"
            assert flag_t[-4:-1].all() and not flag_t[:37].any()
            ok = ~flag_r
            torch.testing.assert_close(m_t[ok], m_r[ok], atol=2e-3, rtol=1e-4, msg=f"matrices {transform} size {size}")
            assert torch.isfinite(m_t).all(), "degenerate faces must still give finite matrices"


def test_auto_takes_torch_on_cpu_and_triton_path_validates():
    images, lmk, index = random_problem(1, 3, 20, 20, 2)
    auto = face_warp(images, lmk, index, size=16)
    torch.testing.assert_close(auto, face_warp(images, lmk, index, size=16, backend="torch"), atol=0, rtol=0)
    if HAS_TRITON and INTERPRET:
        with pytest.raises(ValueError, match="landmarks"):  # validation also runs on the Triton path
            face_warp(images, torch.stack([lmk[0], torch.zeros(5, 2)]), index, backend="triton")


def _low_precision_check(out_t, out_r, g_t, g_r, out_32, g_32, name):
    """The kernel's low-precision error is <= 2x (forward) / 3x (gradient) the reference's own (+ 3e-4: the
    Triton fit runs in fp32, sample points move by ~1e-4 px at 1024^2 against the float64 fit)."""
    for what, ours, ref, exact, factor in (("crops", out_t, out_r, out_32, 2), ("images.grad", g_t, g_r, g_32, 3)):
        err_t = (ours.float() - exact).abs().max().item()
        err_r = (ref.float() - exact).abs().max().item()
        assert err_t <= factor * err_r + 3e-4, f"{name} {what}: triton error {err_t:.2e} vs reference {err_r:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transform", ["similarity", "affine"])
@pytest.mark.parametrize("interpolation", INTERPS)
def test_triton_cuda_matches_reference(interpolation, transform):
    images, lmk, index = random_problem(4, 3, 257, 311, 9, seed=21)
    images, lmk, index = images.cuda(), lmk.cuda(), index.cuda()
    grad_out = torch.randn(9, 3, 112, 112, device="cuda")
    out_t, out_r, g_t, g_r = _triton_vs_reference(images, lmk, index, 112, transform, interpolation, grad_out)
    # fp32 Triton fit vs float64 reference fit: ~1e-4 px apart, up to ~3e-4 on random-noise images
    torch.testing.assert_close(out_t, out_r, atol=1e-3, rtol=0, msg="crops fp32")
    torch.testing.assert_close(g_t, g_r, atol=2e-3, rtol=1e-3, msg="images.grad fp32")
    for dtype in (torch.float16, torch.bfloat16):
        low = _triton_vs_reference(images.to(dtype), lmk, index, 112, transform, interpolation, grad_out.to(dtype))
        assert low[0].dtype == dtype and low[2].dtype == dtype
        _low_precision_check(*low, out_r, g_r, f"{dtype}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_large_image_channels_last():
    images, lmk, index = random_problem(2, 3, 1024, 1024, 8, seed=22)
    images = images.cuda().contiguous(memory_format=torch.channels_last)
    out_t, out_r, g_t, g_r = _triton_vs_reference(images, lmk.cuda(), index.cuda(), 112, "similarity", "bicubic")
    torch.testing.assert_close(out_t, out_r, atol=1e-3, rtol=0, msg="crops 1024^2")
    torch.testing.assert_close(g_t, g_r, atol=2e-3, rtol=1e-3, msg="images.grad 1024^2")


# ---------------------------------------------------------------- check=False: invalid faces, no sync

BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
# The interpreter's numpy warns about the NaN/inf landmarks of the invalid faces (the fit flags them).
nan_ok = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _invalid_problem():
    """Two 3 x 20 x 24 images, 8 faces: 0, 3, 7 valid; 1 NaN, 2 inf, 4 all-equal, 5 collinear landmarks,
    6 image_index out of range (B); 5 and 6 are the only faces of image 1 besides valid face 7."""
    images, lmk, _ = random_problem(2, 3, 20, 24, 8, seed=31, spread=0.1)
    good = arcface_template(112, dtype=torch.float32) * 0.15 + 2
    lmk[1, 2, 0] = float("nan")
    lmk[2, 4, 1] = float("inf")
    lmk[4] = 9.0
    lmk[5] = good * torch.tensor([1.0, 0.0]) + 4
    index = torch.tensor([0, 1, 0, 1, 1, 1, 2, 0])
    valid = torch.tensor([True, False, False, True, False, False, False, True])
    return images, lmk, index, valid


@nan_ok
@pytest.mark.parametrize("interpolation", INTERPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_invalid_faces_are_black_with_no_gradient(backend, interpolation):
    images, lmk, index, valid = _invalid_problem()
    assert face_warp_valid(lmk, index, 2, size=12, backend=backend).tolist() == valid.tolist(), "face_warp_valid"
    assert face_warp_valid(lmk, index.clamp(max=1), 2, size=12, backend=backend)[6], "face 6: only its index is bad"
    x = images.clone().requires_grad_(True)
    crops = face_warp(x, lmk, index, size=12, interpolation=interpolation, backend=backend, check=False)
    grad_out = torch.randn(crops.shape)
    (grad,) = torch.autograd.grad(crops, x, grad_out)
    assert torch.isfinite(crops).all() and torch.isfinite(grad).all(), "NaN/inf in crops or images.grad"
    assert (crops[~valid] == -1).all(), "invalid faces must be exactly -1"
    # the valid faces alone, with check=True: same crops, and the whole image gradient
    y = images.clone().requires_grad_(True)
    want = face_warp(y, lmk[valid], index[valid], size=12, interpolation=interpolation, backend=backend)
    (want_grad,) = torch.autograd.grad(want, y, grad_out[valid])
    assert (want > -1).any(), "test set-up: the valid crops must see the image"
    # (not bit-exact: the reference's batched matmul rounds differently for another number of faces)
    torch.testing.assert_close(crops[valid], want, rtol=0, atol=1e-5, msg="crops of the valid faces")
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5, msg="images.grad: invalid faces add nothing")
    with pytest.raises(ValueError, match="image_index|landmarks"):
        face_warp(images, lmk, index, size=12, backend=backend)  # check=True refuses the same input


@nan_ok
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_invalid_face_reads_nothing(backend):
    """An invalid face's crop is -1 even when the image holds inf/NaN, and an empty batch works."""
    images, lmk, index, valid = _invalid_problem()
    images[:, :, :3, :3] = float("inf")
    images[:, :, 3:6, :3] = float("nan")
    crops = face_warp(images, lmk, index, size=12, backend=backend, check=False)
    assert (crops[~valid] == -1).all(), "invalid faces next to inf/NaN pixels"
    empty = images[:0].clone().requires_grad_(True)
    crops = face_warp(empty, lmk, index, size=6, backend=backend, check=False)
    assert crops.shape == (8, 3, 6, 6) and (crops == -1).all(), "no image: every face is black"
    (grad,) = torch.autograd.grad(crops.sum(), empty)
    assert grad.shape == empty.shape
    assert not face_warp_valid(lmk, index, 0, backend=backend).any()


@nan_ok
@pytest.mark.parametrize("interpolation", INTERPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_never_syncs(backend, interpolation):
    images, lmk, index, valid = _invalid_problem()
    x = images.clone().requires_grad_(True)

    def step():
        crops = face_warp(x, lmk, index, size=12, interpolation=interpolation, backend=backend, check=False)
        crops.backward(torch.ones_like(crops))
        face_warp_valid(lmk, index, 2, size=12, backend=backend)

    assert_no_host_sync(step)
    assert x.grad is not None and (x.grad != 0).any(), "the probed step ran backward"
    # positive control: check=True reads the flags back once
    lmk_ok, index_ok = lmk[valid], index[valid]  # (boolean masking itself syncs: outside the probe)
    found = host_syncs(lambda: face_warp(images, lmk_ok, index_ok, size=12, backend=backend))
    assert [op for op, _ in found] == ["Tensor.tolist"] and "face_warp.py" in found[0][1], f"check=True syncs: {found}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("interpolation", INTERPS)
def test_triton_cuda_check_false_matches_cpu_and_never_syncs(interpolation):
    """On the GPU, CUDA's own sync detector (set_sync_debug_mode) must stay silent too."""
    images, lmk, index, valid = _invalid_problem()
    x = images.cuda().requires_grad_(True)
    lmk_d, index_d, grad_out = lmk.cuda(), index.cuda(), torch.randn(8, 3, 12, 12, device="cuda")

    def step():
        crops = face_warp(x, lmk_d, index_d, size=12, interpolation=interpolation, backend="triton", check=False)
        (grad,) = torch.autograd.grad(crops, x, grad_out)
        return crops, grad, face_warp_valid(lmk_d, index_d, 2, size=12, backend="triton")

    step()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops, grad, ok = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_no_host_sync(step)
    assert ok.cpu().tolist() == valid.tolist(), "face_warp_valid on CUDA"
    assert (crops[~valid.cuda()] == -1).all() and torch.isfinite(grad).all(), "invalid faces on CUDA"
    y = images.cuda().requires_grad_(True)
    want = face_warp(y, lmk_d[valid.cuda()], index_d[valid.cuda()], size=12, interpolation=interpolation, backend="triton")
    (want_grad,) = torch.autograd.grad(want, y, grad_out[valid.cuda()])
    torch.testing.assert_close(crops[valid.cuda()], want, rtol=0, atol=1e-6, msg="crops of the valid faces (CUDA)")
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5, msg="images.grad (CUDA)")


def test_face_warp_valid_arguments():
    _, lmk, index, valid = _invalid_problem()
    assert face_warp_valid(lmk, index, 2).dtype == torch.bool
    assert face_warp_valid(lmk[:0], index[:0], 2).shape == (0,)
    assert face_warp_valid(lmk.double(), index.int(), 2, transform="affine").tolist() == valid.tolist()
    for kwargs, argname in ((dict(n_images=-1), "n_images"), (dict(n_images=2.0), "n_images"), (dict(n_images=True), "n_images"),
                            (dict(landmarks=lmk[:, :4]), "landmarks"), (dict(image_index=index[:3]), "image_index"),
                            (dict(image_index=index.float()), "image_index"), (dict(size=0), "size"),
                            (dict(transform="rigid"), "transform"), (dict(backend="cuda"), "backend"),
                            (dict(image_index=index.to("meta")), "image_index")):
        args = dict(dict(landmarks=lmk, image_index=index, n_images=2), **kwargs)
        with pytest.raises(ValueError, match=argname):
            face_warp_valid(args.pop("landmarks"), args.pop("image_index"), args.pop("n_images"), **args)


def _face_warp_module():
    import importlib

    return importlib.import_module("idflux.kernels.face_warp")  # the module (the package exports the function)


@needs_interpreter
@pytest.mark.parametrize("interpolation", INTERPS)
@pytest.mark.parametrize("case", ["downsampled", "upsampled", "overlapping_and_outside"])
def test_gather_backward_matches_scatter_and_reference(monkeypatch, interpolation, case):
    """The default backward gathers per pixel tile; it must equal the atomic scatter and autograd of
    the reference: faces larger than the crop (small windows), smaller (windows of ~10 crop pixels),
    overlapping faces, faces partly outside, an image with no face."""
    fw = _face_warp_module()
    g = torch.Generator().manual_seed(5)
    if case == "downsampled":  # faces of 8-48 pixels into 8 x 8 crops
        images = random_problem(2, 3, 40, 72, 1, seed=21)[0]
        lmk, index, size = random_landmarks(3, 40, 72, g), torch.tensor([0, 0, 0]), 8
    elif case == "upsampled":  # faces of ~16 and ~22 pixels into 32 x 32 crops: windows of ~10 crop pixels
        images = random_problem(1, 3, 30, 34, 1, seed=22)[0]
        t = arcface_template(112, dtype=torch.float32)
        lmk = torch.stack([t * 0.14 + torch.tensor([3.0, 2.0]), (t - 56) * 0.2 @ torch.tensor([[0.96, 0.28], [-0.28, 0.96]]) + 20])
        index, size = torch.tensor([0, 0]), 32
    else:
        images, _, _ = random_problem(3, 2, 30, 26, 1, seed=23)
        lmk = random_landmarks(4, 30, 26, g)
        lmk[1] = lmk[0] + 1.5   # overlaps face 0
        lmk[2] = lmk[2] - 12.0  # partly off the image
        index, size = torch.tensor([2, 2, 0, 2]), 12  # image 1 has no face
    monkeypatch.setattr(fw, "BWD", "gather")
    out_t, out_r, g_gather, g_ref = _triton_vs_reference(images, lmk, index, size, "similarity", interpolation)
    torch.testing.assert_close(g_gather, g_ref, atol=1e-4, rtol=1e-4, msg="gather vs reference autograd")
    monkeypatch.setattr(fw, "BWD", "scatter")
    grad_out = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1))
    x = images.clone().requires_grad_()
    (g_scatter,) = torch.autograd.grad(face_warp(x, lmk, index, size=size, interpolation=interpolation, backend="triton"), x, grad_out)
    monkeypatch.setattr(fw, "BWD", "gather")
    x = images.clone().requires_grad_()
    (g_gather,) = torch.autograd.grad(face_warp(x, lmk, index, size=size, interpolation=interpolation, backend="triton"), x, grad_out)
    torch.testing.assert_close(g_gather, g_scatter, atol=1e-5, rtol=1e-5, msg="gather vs scatter")
    if case == "overlapping_and_outside":
        assert torch.equal(g_gather[1], torch.zeros_like(g_gather[1])), "an image without faces gets exactly 0"


def test_gather_table_windows_cover_every_tap():
    """Window half-widths from the inverse matrix: every crop pixel whose sample point lies within the
    tap support of a pixel is inside that pixel's window (checked by brute force)."""
    fw = _face_warp_module()
    g = torch.Generator().manual_seed(3)
    lmk = random_landmarks(3, 40, 40, g)
    for size, bicubic in ((12, True), (30, False), (30, True)):
        m = face_warp_matrices(lmk, size=size).float()
        table = fw._gather_table(m, size, bicubic)
        s = 2.0 if bicubic else 1.0
        u, v = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="xy")
        for f in range(3):
            x = m[f, 0, 0] * u + m[f, 0, 1] * v + m[f, 0, 2]
            y = m[f, 1, 0] * u + m[f, 1, 1] * v + m[f, 1, 2]
            assert table[f, 10] <= x.min() - s + 1e-4 and table[f, 11] >= x.max() + s - 1e-4, "footprint x"
            assert table[f, 12] <= y.min() - s + 1e-4 and table[f, 13] >= y.max() + s - 1e-4, "footprint y"
            for px, py in ((3, 5), (17, 20), (25, 11)):
                near = ((x - px).abs() < s) & ((y - py).abs() < s)
                if not near.any():
                    continue
                uc = table[f, 6] * (px - table[f, 2]) + table[f, 7] * (py - table[f, 5])
                vc = table[f, 8] * (px - table[f, 2]) + table[f, 9] * (py - table[f, 5])
                ru, rv = table[f, 14], table[f, 15]
                du = u[near] - torch.ceil(uc - ru)  # the kernel visits du in [0, floor(2 ru)]
                dv = v[near] - torch.ceil(vc - rv)
                assert (du >= 0).all() and (du <= torch.floor(2 * ru)).all(), "u window"
                assert (dv >= 0).all() and (dv <= torch.floor(2 * rv)).all(), "v window"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_backward_cuda_is_deterministic_and_matches_scatter(monkeypatch, dtype):
    fw = _face_warp_module()
    images, lmk, index = random_problem(4, 3, 512, 512, 8, seed=31)
    images, lmk, index = images.cuda().to(dtype), lmk.cuda(), index.cuda()
    grad_out = torch.randn(8, 3, 112, 112, device="cuda", dtype=dtype)

    def grad():
        x = images.clone().requires_grad_()
        return torch.autograd.grad(face_warp(x, lmk, index, interpolation="bicubic"), x, grad_out)[0]

    a, b = grad(), grad()
    assert a.dtype == dtype and torch.equal(a, b), "gather backward must be bitwise deterministic"
    monkeypatch.setattr(fw, "BWD", "scatter")
    c = grad()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a.float(), c.float(), **tol)


@needs_interpreter
def test_auto_backward_gathers_unless_a_checked_call_finds_a_large_window(monkeypatch):
    fw = _face_warp_module()
    calls = []
    real = fw._backward_gather
    monkeypatch.setattr(fw, "_backward_gather", lambda *a: calls.append("gather") or real(*a))
    images = torch.rand(1, 3, 40, 40) * 2 - 1
    t = arcface_template(112, dtype=torch.float32)
    big, tiny = (t - 56) * 0.3 + 20, (t - 56) * 0.05 + 20  # ~34 px and ~6 px faces, 32 x 32 crops

    def backward(lmk, check):
        x = images.clone().requires_grad_()
        out = face_warp(x, lmk[None], torch.tensor([0]), size=32, interpolation="bicubic", backend="triton", check=check)
        out.sum().backward()
        return x.grad

    for lmk, check, want in ((big, True, ["gather"]), (tiny, True, []), (tiny, False, ["gather"])):
        calls.clear()
        backward(lmk, check)
        assert calls == want, f"face {'tiny' if lmk is tiny else 'big'}, check={check}: {calls}"


@needs_interpreter
@pytest.mark.parametrize("transform", ["similarity", "affine"])
def test_fit_launch_writes_status_index_and_backward_table(transform):
    """The one fit launch of the Triton path: per-face status, the clean image index, the all-outside
    matrix for invalid faces under check=False, and the gather table, equal to its host twin."""
    fw = _face_warp_module()
    g = torch.Generator().manual_seed(5)
    lmk = random_landmarks(6, 300, 200, g)
    lmk[1, 2, 0] = float("nan")                      # non-finite landmarks
    lmk[2] = 40.0                                    # all points equal: degenerate
    index = torch.tensor([0, 1, 1, 2, -1, 1])        # face 3: image 2 of 2, face 4: negative
    for size, bicubic in ((112, False), (17, True)):
        for outside in (False, True):
            m, status, index32, table = fw._prepare_triton(lmk, index, 2, size, transform, bicubic, outside)
            assert status.tolist() == [0, 2, 3, 1, 1, 0], "status per face"
            assert index32.dtype == torch.int32 and index32.tolist() == [0, 1, 1, 0, 0, 1], "clean image index"
            want_m, _ = fit_matrices_ref(lmk, size, transform)
            ok = status == 0
            torch.testing.assert_close(m[ok], want_m[ok].float(), atol=2e-3, rtol=1e-4, msg="matrices of valid faces")
            if outside:
                assert (m[~ok] == -8.0).all(), "invalid faces get the all-outside matrix"
            finite = torch.isfinite(m).flatten(1).all(1)
            torch.testing.assert_close(table[finite], fw._gather_table(m[finite], size, bicubic), atol=1e-5, rtol=1e-6,
                                       msg=f"table (size {size}, bicubic {bicubic}, outside {outside})")
    assert face_warp_valid(lmk, index, 2, backend="triton").tolist() == [True, False, False, False, False, True]
    assert face_warp_valid(lmk, index, 2, backend="torch").tolist() == [True, False, False, False, False, True]


@needs_interpreter
def test_triton_interpreter_refuses_bf16():
    """The interpreter computes bf16 wrongly (issue 15): backend="triton" on CPU refuses it, naming why."""
    images, lmk, index = random_problem(1, 3, 20, 20, 2)
    with pytest.raises(ValueError, match="face_warp.*interpreter.*bf16"):
        face_warp(images.bfloat16(), lmk, index, size=8, backend="triton")
    with pytest.raises(ValueError, match="face_warp.*interpreter.*bf16"):
        face_warp(images, lmk.bfloat16(), index, size=8, backend="triton")
    with pytest.raises(ValueError, match="face_warp_valid.*interpreter.*bf16"):
        face_warp_valid(lmk.bfloat16(), index, 1, backend="triton")
    assert face_warp(images.bfloat16(), lmk, index, size=8).dtype == torch.bfloat16  # auto: the reference


def test_launch_plan_at_the_goal_shape():
    """Issue 17: 8 images 1024^2, two faces each, bicubic 112^2 crops, bf16, on a 132-SM part."""
    from idflux.kernels.face_warp import launch_plan
    plan = launch_plan(8, 1024, 1024, 16, 112, "bicubic", torch.bfloat16, 132)
    assert plan["fwd"]["grid"] == (16, 98) and plan["bwd"]["grid"] == (8 * 16 * 64,) and plan["fit"]["grid"] == (1,)
    # enough programs for every SM: the forward about two waves of resident programs, the backward many
    assert plan["fwd"]["programs_per_sm"] >= plan["fwd"]["resident_per_sm"]
    assert plan["bwd"]["programs_per_sm"] > 8
    # the forward reads the footprint (16 taps per crop pixel at most), far less than the images
    assert plan["read_bytes"] == 16 * 3 * 112 * 112 * 16 * 2 < plan["grad_bytes"] == 8 * 3 * 1024 * 1024 * 2
    assert launch_plan(8, 1024, 1024, 16, 112, "bilinear", torch.float32, 132)["fwd"]["grid"] == (16, 25)
    with pytest.raises(ValueError, match="interpolation"):
        launch_plan(8, 64, 64, 1, interpolation="nearest")
