"""Benchmark of ``cosine_infonce``: per-row negatives gathered by index from a gallery bank.

Providers:
- ``triton``: the public ``cosine_infonce(backend="triton")`` (CUDA only; includes the argument
  checks, whose neg_index range check is one host sync per call).
- ``triton_nocheck``: the same with ``check=False`` (no host sync), as ``ContrastiveLoss`` calls it.
- ``ref``: the PyTorch reference (gathers an fp32 (N, M, D) tensor).
- ``gathered_ce``: the released way: gather negatives[neg_index] into an (N, M, D) tensor in the
  input dtype (timed), ``F.normalize`` + ``bmm`` + ``F.cross_entropy`` on fp32 logits.
- ``compile_ref``: ``torch.compile(cosine_infonce_ref, dynamic=True)`` (CUDA only: on the CPU the
  first compile takes ~15 s on 2 cores, too long for the CPU demo).

Modes fwd, bwd, fwd+bwd (gradients to g and pos). CUDA sweep: N in {8, 64, 256}, M in
{4096, 65536}, D = 512, bf16 and fp32, gallery of K = max(2M, 8192) rows; then a bank shared by
every row (no neg_index: the row-tiled kernel from 16 rows on; ``gathered_ce`` is then plain
normalise + matmul + cross-entropy) at N in {64, 256}, M in {4096, 65536}, bf16. Providers that gather
are left out where the fp32 (N, M, D) tensor would pass 12 GiB (N = 256, M = 65536): they would
not fit an 80 GB card with their backward. bytes = bank rows read (N*M*D*elt) + g and pos
(+ their gradients for bwd and fwd+bwd); flops = 2*N*M*D per pass over the candidates (similarities in
the forward, the softmax-weighted sum in the backward).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from idflux.bench_perf.harness import MODES, Case, Goal, mode_fns
from idflux.kernels import _backend
from idflux.kernels.cosine_infonce import cosine_infonce
from idflux.kernels.cosine_infonce_ref import EPS, cosine_infonce_ref

OP = "cosine_infonce"
TAU = 0.1
SUMMARY = [("ref", "gathered_ce"), ("triton", "gathered_ce"), ("triton", "compile_ref"),
           ("triton_nocheck", "gathered_ce"), ("triton_nocheck", "compile_ref")]
_GOAL_CASE = (("N", 64), ("M", 4096), ("bank", "gallery"))
# Issue #4's goals at N = 64, M = 4096 (per-row gallery draws, the released recipe), each dtype.
GOALS = [
    Goal(4, ">= 5x the released way (gathered (N, M, D) + cross_entropy)", OP, p, "gathered_ce", "fwd+bwd", "speedup", 5.0,
         _GOAL_CASE) for p in ("triton_nocheck", "triton")
] + [Goal(4, ">= 100x less extra memory than the released way", OP, "triton", "gathered_ce", "fwd+bwd", "memory", 100.0,
          _GOAL_CASE)]
# Providers with no host sync: also timed from a CUDA-graph replay (device time).
CAPTURABLE = {"triton_nocheck", "ref", "gathered_ce", "compile_ref"}
GATHER_LIMIT_BYTES = 12 * 2**30
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gathered_ce(g, pos, negatives, neg_index, tau=TAU):
    """The released formulation: an explicit (N, M, D) negatives tensor, normalise, bmm, cross-entropy
    (neg_index None: a shared bank, normalise + matmul + cross-entropy)."""
    u = F.normalize(g, dim=-1, eps=EPS)
    v = F.normalize(pos, dim=-1, eps=EPS)
    s_pos = (u * v).sum(-1, keepdim=True)
    if neg_index is None:
        s_neg = u @ F.normalize(negatives, dim=-1, eps=EPS).T
    else:
        negs = F.normalize(negatives[neg_index], dim=-1, eps=EPS)  # (N, M, D)
        s_neg = torch.bmm(negs, u[:, :, None]).squeeze(-1)
    logits = torch.cat([s_pos, s_neg], dim=1).float() / tau
    return F.cross_entropy(logits, torch.zeros(g.shape[0], dtype=torch.long, device=g.device))


_compiled_ref = None


def _compile_ref():
    global _compiled_ref  # one compiled graph per dtype for the whole sweep (dynamic shapes)
    if _compiled_ref is None:
        _compiled_ref = torch.compile(cosine_infonce_ref, dynamic=True)
    return _compiled_ref


def _sizes(device: torch.device, quick: bool):
    """(N, M, D, dtype name, shared bank) of the sweep."""
    if device.type == "cuda":
        Ns, Ms, dts = ((8, 64), (4096,), ("bf16",)) if quick else ((8, 64, 256), (4096, 65536), ("bf16", "fp32"))
        gallery = [(N, M, 512, dt, False) for dt in dts for M in Ms for N in Ns]
        shared = [] if quick else [(N, M, 512, "bf16", True) for M in (4096, 65536) for N in (64, 256)]
        return gallery + shared
    if quick:
        return [(4, 256, 64, "fp32", False)]
    return [(8, 4096, 512, "fp32", False), (64, 1024, 512, "fp32", False)]


def _providers(device: torch.device, gathered_fp32_bytes: int) -> list[str]:
    out = []
    if device.type == "cuda" and _backend.triton_usable(device):
        out += ["triton", "triton_nocheck"]
    if gathered_fp32_bytes <= GATHER_LIMIT_BYTES:
        out += ["ref", "gathered_ce"] + (["compile_ref"] if device.type == "cuda" else [])
    return out


GOAL_PROVIDERS = {"triton_nocheck", "triton", "gathered_ce"}


def goal_cases(device: torch.device) -> Iterator[Case]:
    """Issue 17's cosine_infonce goal case: N 64, M 4096, D 512, per-row gallery indices (bf16 on CUDA)."""
    dt = "bf16" if device.type == "cuda" else "fp32"
    return cases(device, False, sizes=[(64, 4096, 512, dt, False)], providers=GOAL_PROVIDERS, modes={"fwd", "fwd+bwd"})


def cases(device: torch.device, quick: bool, *, sizes=None, providers=None, modes=None) -> Iterator[Case]:
    """Yield the Cases of one size and provider at a time (their tensors are freed before the next);
    ``sizes`` ((N, M, D, dtype name, shared bank), ...), ``providers`` and ``modes`` restrict the sweep."""
    for N, M, D, dt, shared in sizes or _sizes(device, quick):
        dtype = _DTYPES[dt]
        K = M if shared else max(2 * M, 8192)
        gen = torch.Generator(device=device).manual_seed(0)
        pos = torch.randn(N, D, device=device, generator=gen).to(dtype)
        g = (pos.float() + torch.randn(N, D, device=device, generator=gen)).to(dtype).requires_grad_()
        pos.requires_grad_()
        bank = torch.randn(K, D, device=device, generator=gen).to(dtype)
        neg_index = None if shared else torch.randint(0, K, (N, M), device=device, generator=gen)
        elt = bank.element_size()
        io = 2 * N * D * elt
        shape = {"N": N, "M": M, "D": D, "K": K, "bank": "shared" if shared else "gallery"}
        forwards = {
            "triton": lambda: cosine_infonce(g, pos, bank, neg_index=neg_index, tau=TAU, backend="triton"),
            "triton_nocheck": lambda: cosine_infonce(g, pos, bank, neg_index=neg_index, tau=TAU, backend="triton", check=False),
            "ref": lambda: cosine_infonce_ref(g, pos, bank, neg_index=neg_index, tau=TAU),
            "gathered_ce": lambda: gathered_ce(g, pos, bank, neg_index),
            "compile_ref": lambda: _compile_ref()(g, pos, bank, neg_index=neg_index, tau=TAU),
        }
        note = "a bank shared by every row; tau=0.1" if shared else "neg_index into a gallery bank; tau=0.1"
        read = (K * D * elt) if shared else N * M * D * elt  # a shared bank need only be read once
        for provider in _providers(device, N * M * 4 if shared else N * M * D * 4):
            if providers is not None and provider not in providers:
                continue
            fns = mode_fns(forwards[provider], [g, pos])
            for mode in MODES if modes is None else [m for m in MODES if m in modes]:
                passes = 2 if mode == "fwd+bwd" else 1
                # fwd: the candidate rows once + g, pos; bwd: the rows again + g, pos read and their
                # gradients written; fwd+bwd: one read of the rows (the bound of a fused pass) + both
                nbytes = read + io * (2 if mode != "fwd" else 1)
                yield Case(op=OP, provider=provider, mode=mode, shape=shape, dtype=dt, fn=fns[mode],
                           flops=2.0 * N * M * D * passes, bytes=nbytes, note=note, graph=provider in CAPTURABLE)
            del fns
