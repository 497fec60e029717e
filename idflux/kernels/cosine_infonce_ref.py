"""PyTorch reference of the cosine InfoNCE loss over a negative bank: the oracle and the CPU path.

Pure math on valid input (the checks live in :mod:`idflux.kernels.cosine_infonce`). It builds the
explicit (N, 1 + M [+ N]) logit matrix; with ``neg_index`` it gathers the (N, M, D) negatives,
which the Triton kernel never does.
"""

from __future__ import annotations

import torch

EPS = 1e-6  # cosine uses x / max(||x||, EPS): a zero vector has cosine 0 with everything, never NaN


def normalize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x / max(||x||_2, eps) over the last dim (the values of ``F.normalize``).

    A row whose norm is below eps (a zero row) gets zero gradient: x / eps has no direction, and its
    derivative I / eps (1e6) overflows fp16/bf16 when cast back to the input dtype. A NaN row stays
    NaN, value and gradient (the comparison is False for NaN)."""
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm < eps, x.detach() / eps, x / norm.clamp_min(eps))


def cosine_infonce_ref(
    g: torch.Tensor,
    pos: torch.Tensor,
    negatives: torch.Tensor,
    *,
    neg_index: torch.Tensor | None = None,
    tau: float = 0.1,
    in_batch: bool = False,
    ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """loss_n = logsumexp([s_pos, s_negs]) - s_pos with s = cos / tau; see ``cosine_infonce``.

    g, pos: (N, D); negatives: (M, D) shared, or (K, D) gathered by neg_index (N, M); an index
    outside [0, K) is an excluded candidate (the Triton kernel's rule).
    Computes in fp32 (float64 stays float64); returns (N,) for "none", else a scalar.
    """
    acc = torch.float64 if torch.float64 in (g.dtype, pos.dtype, negatives.dtype) else torch.float32
    u = normalize(g.to(acc))
    v = normalize(pos.to(acc))
    bank = normalize(negatives.to(acc))
    N = u.shape[0]

    s_pos = (u * v).sum(-1) / tau  # (N,)
    if neg_index is None:
        s_bank = u @ bank.T / tau  # (N, M)
        bank_ids = None if neg_ids is None else neg_ids[None, :].expand(N, -1)
    else:
        # An index outside [0, K) is an excluded candidate (as in the kernel): reachable only with
        # cosine_infonce(check=False), which does not read neg_index back to range-check it.
        K = bank.shape[0]
        in_range = (neg_index >= 0) & (neg_index < K)
        safe = torch.where(in_range, neg_index, 0).long()  # (a uint8 index would act as a mask)
        if K == 0:  # every index is out of range; gather from a placeholder row instead
            bank = bank.new_zeros(1, bank.shape[1])
            neg_ids = None if neg_ids is None else neg_ids.new_zeros(1)
        # An out-of-range index reads nothing, not row 0 (whose NaN would reach the gradient).
        s_bank = torch.einsum("nd,nmd->nm", u, torch.where(in_range[..., None], bank[safe], 0.0)) / tau
        bank_ids = None if neg_ids is None else neg_ids[safe]
    keep_bank = torch.ones_like(s_bank, dtype=torch.bool) if neg_index is None else in_range
    if ids is not None and bank_ids is not None:
        keep_bank = keep_bank & (bank_ids != ids[:, None])
    logits = [s_pos[:, None], s_bank.masked_fill(~keep_bank, float("-inf"))]

    if in_batch:
        s_ib = u @ v.T / tau  # (N, N): row n against the other rows' positives
        keep_ib = ~torch.eye(N, dtype=torch.bool, device=u.device)
        if ids is not None:
            keep_ib &= ids[:, None] != ids[None, :]
        logits.append(s_ib.masked_fill(~keep_ib, float("-inf")))

    # The positive is always a finite candidate, so a row with every negative excluded gives
    # logsumexp = s_pos: loss 0 and gradient 0, never NaN.
    loss = torch.logsumexp(torch.cat(logits, dim=1), dim=1) - s_pos
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
