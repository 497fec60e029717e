"""Seeded differential fuzz of face_warp: Triton (the interpreter on CPU) against the PyTorch
reference, crops and the image gradient (issue 15).

Each case is one call over several faces: random image sizes (odd included), crop sizes, landmarks
anywhere (partly or wholly outside the image, blown up or shrunk, rotated) and, with check=False,
invalid faces (NaN, all points equal, collinear, image_index out of range), bilinear/bicubic,
similarity/affine, fp32/fp16 (bf16: the torch path, which the interpreter refuses). check=True
cases must raise the same error on both backends when a face is invalid. ``IDFLUX_FUZZ_CASES`` sets the number of cases (default 200: about 20-35 s on a 2-core CPU).
"""

import os

import pytest
import torch

from idflux.kernels._backend import HAS_TRITON, INTERPRET
from idflux.kernels.face_warp import face_warp, face_warp_valid
from idflux.kernels.face_warp_ref import arcface_template

CASES = int(os.environ.get("IDFLUX_FUZZ_CASES", "200"))
pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton with TRITON_INTERPRET=1")


def draw_case(seed: int) -> dict:
    gen = torch.Generator().manual_seed(10_000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    B, C = pick([1, 2, 3]), pick([1, 3])
    H, W = pick([1, 5, 17, 24, 33]), pick([1, 6, 19, 32, 40])
    F = pick([1, 3, 5])
    size = pick([4, 7, 12, 16])
    t = arcface_template(112, dtype=torch.float64) - 56
    scale = (0.05 + 0.8 * rand(F)) * max(H, W) / 56
    angle = (rand(F) - 0.5) * 3.0
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    centre = (rand(F, 2) * 2.0 - 0.5) * torch.tensor([W, H])  # from half an image outside to half beyond
    lmk = t @ rot.transpose(1, 2) * scale[:, None, None] + centre[:, None]
    lmk = lmk + pick([0.0, 0.5, 2.0]) * torch.randn(lmk.shape, generator=gen, dtype=torch.float64)
    index = torch.randint(0, B, (F,), generator=gen)
    check = pick([True, False])
    invalid = pick([None, None, "nan", "equal", "collinear", "index"])
    if invalid is not None:
        f = int(torch.randint(F, (1,), generator=gen))
        if invalid == "nan":
            lmk[f, 2, 1] = float("nan")
        elif invalid == "equal":
            lmk[f] = lmk[f, 0]
        elif invalid == "collinear":
            lmk[f, :, 1] = 3.0
        else:
            index[f] = pick([-1, B])
    images = rand(B, C, H, W) * 2 - 1
    return {"images": images, "lmk": lmk.float(), "index": index, "size": size, "check": check, "invalid": invalid,
            "transform": pick(["similarity", "affine"]), "interpolation": pick(["bilinear", "bicubic"]),
            "dtype": pick([torch.float32, torch.float16, torch.bfloat16]),
            "grad": torch.randn(F, C, size, size, generator=gen, dtype=torch.float64)}


def run(case, backend, dtype):
    x = case["images"].to(dtype).requires_grad_()
    out = face_warp(x, case["lmk"], case["index"], size=case["size"], transform=case["transform"],
                    interpolation=case["interpolation"], backend=backend, check=case["check"])
    (grad,) = torch.autograd.grad(out, x, case["grad"].to(out.dtype))
    return out.detach().double(), grad.double()


def describe(seed, case):
    keys = ("size", "check", "invalid", "transform", "interpolation", "dtype")
    return f"seed {seed}: images {tuple(case['images'].shape)}, {case['lmk'].shape[0]} faces, " + \
           ", ".join(f"{k}={case[k]}" for k in keys)


def _compare(what, dtype, tol, got, want, case):
    """Forward and image gradient of Triton (``got``) against the reference (``want``)."""
    if dtype == torch.float16:
        # judged against PyTorch's own fp16 error (both measured against float64 on the same fp16 inputs):
        # a pixel that many taps reach accumulates rounding in either backend, in different orders
        exact = run({**case, "images": case["images"].to(dtype).double()}, "torch", torch.float64)
        for name, a, b, e in zip(("crops", "images.grad"), got, want, exact):
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: {name} not finite"
            ours, torch_own = (a - e).abs().max().item(), (b - e).abs().max().item()
            floor = 1e-3 * e.abs().max().clamp_min(1.0).item()
            assert ours <= 3 * torch_own + floor, f"{what}: {name} error {ours:.3g} vs PyTorch's own fp16 error {torch_own:.3g}"
    else:
        for name, a, b in zip(("crops", "images.grad"), got, want):
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: {name} not finite"
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().clamp_min(1.0).item(), msg=f"{what}: {name}")


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_triton_matches_reference(seed):
    case = draw_case(seed)
    what, dtype = describe(seed, case), case["dtype"]
    if case["check"] and case["invalid"] is not None:
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match="image_index|landmarks"):
                run(case, backend, torch.float32)
        return
    want = run(case, "torch", dtype)
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match="bf16"):
            run(case, "triton", dtype)
        got, tol = run({**case, "images": case["images"].to(dtype).double()}, "torch", torch.float32), 2e-2
    else:
        got, tol = run(case, "triton", dtype), (1e-4 if dtype == torch.float32 else 1e-2)
    try:
        _compare(what, dtype, tol, got, want, case)
    except AssertionError as exc:
        # Known defect, tracked in docs/kernels/face_warp.md: for a face whose five landmarks span under
        # 2 image pixels (a blow-up of ~100x and more), the Triton backward (gather and scatter alike)
        # differs from autograd of the reference while the forward matches. Only that regime, and only
        # the image gradient, is let through (as xfail); every other mismatch fails.
        extent = (case["lmk"].amax(1) - case["lmk"].amin(1)).amax(1)
        if "images.grad" in str(exc) and bool((extent < 2).any()):
            pytest.xfail(f"known sub-pixel-face backward defect: {exc}")
        raise
    if not case["check"]:  # invalid faces: exactly -1 crops on both backends
        valid = face_warp_valid(case["lmk"], case["index"], case["images"].shape[0], size=case["size"],
                                transform=case["transform"], backend="triton")
        assert torch.all(got[0][~valid] == -1) and torch.all(want[0][~valid] == -1), f"{what}: invalid faces not black"


def test_fuzz_draws_cover_the_cases_that_matter():
    seen = set()
    for seed in range(max(CASES, 40)):
        c = draw_case(seed)
        seen |= {str(c["invalid"]), c["transform"], c["interpolation"], str(c["dtype"]), f"check={c['check']}"}
    want = {"None", "nan", "equal", "collinear", "index", "similarity", "affine", "bilinear", "bicubic",
            "torch.float32", "torch.float16", "torch.bfloat16", "check=True", "check=False"}
    assert want <= seen, f"draws miss {want - seen}"
