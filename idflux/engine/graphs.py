"""CUDA-graph replay of a step function: one capture, then every call is a copy-in and a replay.

A denoising step of FLUX with the adapter launches hundreds of kernels (57 blocks, 114 region
cross-attentions, their norms and projections); at small sizes the Python and launch work per
kernel costs more than the kernels. Nothing in the step syncs with the host once the layout has
been seen (``region_attention`` checks and plans a layout on its first call only), so the step can
be captured once and replayed: the kernels run back to back with no host work between them.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


class GraphedStep:
    """``fn(*inputs)`` captured in a CUDA graph on the first call, replayed on later calls.

    The inputs of later calls are copied into the captured ones (same shapes, dtypes and device),
    so everything else ``fn`` reads (weights, the adapter context, text states) must stay the same
    tensors. The returned tensor is the graph's output buffer: it is overwritten by the next call,
    so consume (or clone) it first; ``x = x + dt * v`` does.

    Two eager warm-up calls on a side stream come first: they compile the Triton kernels and let
    ``region_attention`` check and plan its layouts (host syncs, which a capture cannot hold). If
    the capture still fails (an operation that syncs or allocates on the host), a warning says so
    and every call runs eagerly instead.

    Example:
        >>> step = GraphedStep(lambda x, t: model(x, t))   # doctest: +SKIP
        >>> v = step(x, t)                                 # captures, then replays
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1 (the first calls compile and plan), got {warmup}")
        self.fn, self.warmup = fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None
        self.eager = False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fn(*inputs)
        if self.graph is None:
            return self._capture(inputs)
        for static, x in zip(self.inputs, inputs):
            if static.shape != x.shape or static.dtype != x.dtype or static.device != x.device:
                raise ValueError(f"GraphedStep: inputs must keep the captured shape/dtype/device "
                                 f"{tuple(static.shape)} {static.dtype} {static.device}, got "
                                 f"{tuple(x.shape)} {x.dtype} {x.device}; build a new GraphedStep")
            static.copy_(x)
        self.graph.replay()
        return self.output

    def _capture(self, inputs) -> torch.Tensor:
        if not inputs or any(not isinstance(x, torch.Tensor) or x.device.type != "cuda" for x in inputs):
            raise ValueError("GraphedStep: CUDA graphs need CUDA tensor inputs; run the step eagerly on other devices")
        device = inputs[0].device
        self.inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.fn(*self.inputs)
        except RuntimeError as err:
            warnings.warn(f"GraphedStep: CUDA-graph capture failed, running eagerly instead ({err})", RuntimeWarning,
                          stacklevel=3)
            torch.cuda.synchronize(device)
            self.eager, self.inputs = True, []
            return self.fn(*inputs)
        self.graph, self.output = graph, output
        return self(*inputs)
