import pytest
import torch

from idflux.kernels import _backend
from idflux.kernels.face_warp_ref import arcface_template
from idflux.losses.flow_matching import FlowMatchingLoss, noisy_latents, one_step_x0, sample_timesteps
from idflux.losses.identity import IdentityLoss
from sync_probe import assert_no_host_sync


class TinyRecognizer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(16))

    def forward(self, x):
        return self.net(x)


def faces(B=2, size=64):
    lm = arcface_template(112, dtype=torch.float32) * (size / 2 / 112)
    landmarks = torch.stack([lm, lm + torch.tensor([size / 2, 0.0]), lm + torch.tensor([0.0, size / 2])])
    return landmarks, torch.tensor([0, 0, 1])


def test_identity_loss_zero_for_identical_images_and_gradient_flows():
    rec = TinyRecognizer()
    rec(torch.zeros(1, 3, 112, 112))
    loss_fn = IdentityLoss(rec, weight=0.1, backend="torch")
    gt = torch.rand(2, 3, 64, 64) * 2 - 1
    lm, idx = faces()
    loss, g = loss_fn(gt.clone(), gt, lm, idx)
    assert loss.abs() < 1e-6 and g.shape == (3, 16)
    pred = (gt + 0.3 * torch.randn_like(gt)).requires_grad_()
    loss, _ = loss_fn(pred, gt, lm, idx)
    loss.backward()
    assert loss > 0 and pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in rec.parameters()), "the recogniser stays frozen"



def test_identity_loss_takes_precomputed_gt_embeddings():
    rec = TinyRecognizer()
    rec(torch.zeros(1, 3, 112, 112))
    loss_fn = IdentityLoss(rec, backend="torch")
    gt = torch.rand(2, 3, 64, 64) * 2 - 1
    pred = (gt + 0.3 * torch.randn_like(gt)).requires_grad_()
    lm, idx = faces()
    want, _ = loss_fn(pred, gt, lm, idx)
    target = loss_fn.embed(gt, lm, idx).requires_grad_()
    got, _ = loss_fn(pred, gt, lm, idx, target=target)
    torch.testing.assert_close(got, want)
    got.backward()
    assert target.grad is None, "the GT embeddings are a target, not differentiated"
    other, _ = loss_fn(pred, gt, lm, idx, target=torch.randn(3, 16))
    assert not torch.allclose(other, want), "a given target is used, not recomputed"
    with pytest.raises(ValueError, match=r"target must be \(F, D\)"):
        loss_fn(pred, gt, lm, idx, target=torch.zeros(2, 16))

def test_released_gating_scales_high_noise_faces():
    rec = TinyRecognizer()
    rec(torch.zeros(1, 3, 112, 112))
    gt = torch.rand(2, 3, 64, 64) * 2 - 1
    pred = gt + 0.5 * torch.randn_like(gt)
    lm, idx = faces()
    all_t, _ = IdentityLoss(rec, backend="torch")(pred, gt, lm, idx, torch.tensor([0.9, 0.9]))
    rel_t, _ = IdentityLoss(rec, gating="released", backend="torch")(pred, gt, lm, idx, torch.tensor([0.9, 0.9]))
    assert rel_t == pytest.approx(all_t.item() * 1e-5, rel=1e-4)
    with pytest.raises(ValueError, match="gating"):
        IdentityLoss(rec, gating="sometimes")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN landmarks
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _backend.INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)"))])
def test_invalid_faces_are_left_out_without_host_sync(backend):
    """A degenerate face, a NaN one and one with an out-of-range image: finite loss equal to the loss of
    the remaining faces, which alone carry the gradient; forward + backward never sync."""
    rec = TinyRecognizer()
    rec(torch.zeros(1, 3, 112, 112))
    gt = torch.rand(2, 3, 64, 64) * 2 - 1
    pred = (gt + 0.3 * torch.randn_like(gt)).requires_grad_()
    lm, idx = faces()
    bad_lm = torch.cat([lm, torch.full((1, 5, 2), 20.0), lm[:1] * float("nan"), lm[1:2]])
    bad_idx = torch.cat([idx, torch.tensor([1, 0, 2])])
    t = torch.tensor([0.9, 0.1])
    for gating in ("all", "released") if backend == "torch" else ("released",):  # (interpreter: ~0.5 s per loss)
        loss_fn = IdentityLoss(rec, gating=gating, backend=backend)
        want, _ = loss_fn(pred, gt, lm, idx, t)
        (want_grad,) = torch.autograd.grad(want, pred)
        out = {}

        def step():
            out["loss"], out["g"] = loss_fn(pred, gt, bad_lm, bad_idx, t)
            (out["grad"],) = torch.autograd.grad(out["loss"], pred)

        assert_no_host_sync(step)
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["grad"]).all(), f"NaN loss or gradient ({gating})"
        torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-7, msg=f"loss over the valid faces ({gating})")
        torch.testing.assert_close(out["grad"], want_grad, rtol=1e-4, atol=1e-8, msg=f"pred.grad ({gating})")
        per_face, _ = loss_fn(pred, gt, bad_lm, bad_idx, t, reduction="none")
        assert torch.all(per_face[3:] == 0) and torch.all(per_face[:3] > 0), f"per-face losses: {per_face.tolist()}"
    none_valid, _ = IdentityLoss(rec, backend=backend)(pred, gt, bad_lm[3:], bad_idx[3:])
    assert none_valid.item() == 0.0, "no valid face: loss 0"
    (grad,) = torch.autograd.grad(none_valid, pred)
    assert torch.all(grad == 0), "no valid face: no gradient"


def test_flow_matching_pieces():
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = sample_timesteps(3, 0.63, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    x_t = noisy_latents(x0, eps, t)
    v = eps - x0
    torch.testing.assert_close(one_step_x0(x_t, v, t), x0)
    assert FlowMatchingLoss()(v, x0, eps) == 0
