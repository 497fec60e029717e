"""CUDA-graph replay of the denoising step: same images as eager, clear errors where it cannot run."""

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from idflux.engine.graphs import GraphedStep  # noqa: E402
from idflux.engine.pipeline import GenerateSettings, Pipeline  # noqa: E402

CUDA = torch.cuda.is_available()


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        Pipeline.tiny(backend="torch", cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensor inputs"):
        GraphedStep(lambda x: x * 2)(torch.ones(3))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda x: x, warmup=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graphed_step_replays_new_inputs_and_checks_shapes():
    w = torch.randn(8, 8, device="cuda")
    step = GraphedStep(lambda x, t: torch.tanh(x @ w) * t[:, None])
    for seed in range(3):  # capture on the first call, replays after
        g = torch.Generator(device="cuda").manual_seed(seed)
        x, t = torch.randn(4, 8, device="cuda", generator=g), torch.rand(4, device="cuda", generator=g)
        torch.testing.assert_close(step(x, t).clone(), torch.tanh(x @ w) * t[:, None])
    assert step.graph is not None and not step.eager
    with pytest.raises(ValueError, match="keep the captured shape"):
        step(torch.randn(5, 8, device="cuda"), torch.rand(5, device="cuda"))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graphed_generation_equals_eager():
    settings = GenerateSettings(prompt="two people", boxes=[(0, 0, 32, 64), (32, 0, 64, 64)], size=64, steps=4, seed=3)
    images = []
    for graph in (False, True):
        pipe = Pipeline.tiny(device="cuda", backend="auto", cuda_graph=graph)
        cfg = pipe.adapter.cfg
        g = torch.Generator().manual_seed(0)
        arc, sig = torch.randn(2, cfg.arc_dim, generator=g), torch.randn(2, cfg.siglip_tokens, cfg.siglip_dim, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture (eager fallback) fails the test
            images.append(pipe.generate(settings, arc, sig, progress=False))
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=1e-5)
