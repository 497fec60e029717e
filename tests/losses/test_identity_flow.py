import pytest
import torch

from idflux.kernels.face_warp_ref import arcface_template
from idflux.losses.flow_matching import FlowMatchingLoss, noisy_latents, one_step_x0, sample_timesteps
from idflux.losses.identity import IdentityLoss


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


def test_flow_matching_pieces():
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = sample_timesteps(3, 0.63, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    x_t = noisy_latents(x0, eps, t)
    v = eps - x0
    torch.testing.assert_close(one_step_x0(x_t, v, t), x0)
    assert FlowMatchingLoss()(v, x0, eps) == 0
