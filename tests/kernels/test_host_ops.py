"""Host cost of the Triton paths, pinned: aten ops and launches per call (tests/op_probe.py).

On a GPU every aten op below is a launch or an allocation with several microseconds of host
overhead, which at the adapter's sizes is most of a call's time. These are the counts after a
layout's first call (layout checks and tile plan cached), inputs already in the kernels' layouts.
A change that adds host-side work fails here: make the new op pay for itself, then update the
count with the reason.
"""

import collections

import pytest
import torch

from idflux.kernels import _backend, cosine_infonce, face_warp, region_attention, region_attention_packed
from idflux.kernels.face_warp_ref import arcface_template
from op_probe import host_ops

pytestmark = pytest.mark.skipif(not _backend.INTERPRET, reason="counts Triton launches through the interpreter (CPU)")
C = collections.Counter


def _leaves(*shapes, gen):
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


@pytest.mark.parametrize("packed", [False, True])
def test_region_attention_one_launch_forward_two_launch_backward(packed):
    gen = torch.Generator().manual_seed(0)
    B, H, Nq, D = 2, 2, 40, 16
    offs = torch.tensor([[0, 8, 16], [0, 5, 16]])
    mem = torch.randint(0, 4, (B, Nq), generator=gen)
    q, k, v = _leaves((B, H, Nq, D), (B, H, 16, D), (B, H, 16, D), gen=gen)
    if packed:
        b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
        qp = q.detach()[b_idx, :, t_idx].clone().requires_grad_()
        args = (qp, k, v, mem[b_idx, t_idx], b_idx, offs)
        fn = lambda: region_attention_packed(*args, backend="triton")  # noqa: E731
    else:
        fn = lambda: region_attention(q, k, v, mem, offs, backend="triton")  # noqa: E731
    grad = torch.randn_like(fn())  # first call: layout checked and planned, cached
    kernels = {"triton:_region_attention_fwd": 1}
    # out, lse. The dense form has tokens in no box: its out (and dq) are allocated zeroed (one
    # memset each) instead of launching programs that only store zeros; the packed one has none.
    out = {"empty_like": 1} if packed else {"zeros_like": 1}
    assert host_ops(fn) == C({**out, "empty": 1, **kernels})
    kernels.update({"triton:_region_attention_bwd": 1, "triton:_region_attention_bwd_dkdv": 1})
    # + dq, dk, dv, delta; no memsets for dk/dv (the spans cover every key)
    grads = {"empty_like": 3} if packed else {"empty_like": 1, "zeros_like": 2}
    assert host_ops(lambda: fn().backward(grad)) == C({**grads, "empty": 3, **kernels})


def test_cosine_infonce_two_allocations_forward_one_launch_backward():
    gen = torch.Generator().manual_seed(0)
    N, M, K, D = 4, 50, 80, 32
    g, pos = _leaves((N, D), (N, D), gen=gen)
    bank = torch.randn(K, D, generator=gen)
    kw = dict(neg_index=torch.randint(0, K, (N, M), generator=gen), in_batch=True, ids=torch.arange(N),
              neg_ids=torch.randint(0, 6, (K,), generator=gen), backend="triton", check=False, reduction="none")
    fn = lambda: cosine_infonce(g, pos, bank, **kw)  # noqa: E731
    kernels = {"triton:_cosine_infonce_fwd_kernel": 1, "triton:_cosine_infonce_merge_kernel": 1}
    assert host_ops(fn) == C({"empty": 2, **kernels})  # partials; outputs kept for the backward
    w = torch.randn(N, generator=gen)
    # + grad_g, grad_pos, one backward launch
    assert host_ops(lambda: fn().backward(w)) == C({"empty": 4, **kernels, "triton:_cosine_infonce_bwd_kernel": 1})


def test_face_warp_two_launch_forward_one_launch_backward():
    gen = torch.Generator().manual_seed(0)
    T = torch.as_tensor(arcface_template(112), dtype=torch.float32)
    images = torch.rand(2, 3, 64, 64, generator=gen).requires_grad_()
    lmk = torch.stack([(T - T.mean(0)) * 0.4 + torch.tensor([30.0, 30.0]), (T - T.mean(0)) * 0.3 + torch.tensor([20.0, 40.0])])
    index = torch.tensor([0, 1])
    fn = lambda: face_warp(images, lmk, index, size=16, backend="triton", check=False)  # noqa: E731
    kernels = {"triton:_face_warp_fit_kernel": 1, "triton:_face_warp_fwd_kernel": 1}
    # the fit's matrices, status, safe index and backward table; the crops
    assert host_ops(fn) == C({"empty": 4, "new_empty": 1, **kernels})
    grad = torch.randn(2, 3, 16, 16, generator=gen)
    # + the image gradient, and each image's faces by one sort and one searchsorted
    assert host_ops(lambda: fn().backward(grad)) == C({"empty": 5, "new_empty": 1, **kernels, "sort": 1, "arange": 1,
                                                       "searchsorted": 1, "triton:_face_warp_bwd_gather_kernel": 1})


def test_adapter_block_both_branches_fourteen_host_ops():
    """One block of the identity adapter at generation time (K/V prepared once): the in-box rows
    out, per branch norm + to_q + region attention, the SigLIP to_out folded into one addmm, the
    residual back in with index_add."""
    from idflux.engine.adapter import IdentityAdapter, RegionLayout, tiny_adapter
    from idflux.engine.regions import boxes_to_membership

    gen = torch.Generator().manual_seed(0)
    cfg = tiny_adapter()
    adapter = IdentityAdapter(cfg).eval()
    membership = boxes_to_membership([[(0, 0, 40, 40), (20, 10, 64, 50)]], 64, 64)
    layout = RegionLayout.from_membership(membership, 2)
    img = torch.randn(1, membership.shape[1], cfg.hidden, generator=gen)
    arc = torch.randn(1, 2, cfg.arc_dim, generator=gen)
    sig = torch.randn(1, 2, cfg.siglip_tokens, cfg.siglip_dim, generator=gen)
    with torch.no_grad():
        ctx = adapter.prepare(arc, sig, layout, backend="triton")
        adapter.apply(0, img, ctx)  # the layout's first call
        ops = host_ops(lambda: adapter.apply(0, img, ctx))
    assert ops == C({"index_select": 1, "native_layer_norm": 2, "mm": 3, "addmm": 1, "index_add": 1,
                     "empty_like": 2, "empty": 2, "triton:_region_attention_fwd": 2})
