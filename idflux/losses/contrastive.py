"""WithAnyone contrastive identity loss (InfoNCE) over in-batch and gallery negatives.

    L_CL = mean_n -log( exp(cos(g_n, t_n)/tau) / (exp(cos(g_n, t_n)/tau) + sum_j exp(cos(g_n, n_j)/tau)) )

and the training total is L_diff + 0.1 L_ID + 0.1 L_CL, so the module returns ``weight * L_CL``
with weight 0.1. The math lives in :func:`idflux.kernels.cosine_infonce`; this module only picks
the negatives (a :class:`~idflux.losses.negative_bank.NegativeBank` draw per face, plus the other
faces of the batch) and forwards the identity ids so no negative shares the face's identity.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from idflux.kernels import cosine_infonce
from idflux.losses.negative_bank import NegativeBank


class ContrastiveLoss(nn.Module):
    """weight * cosine InfoNCE of generated-face embeddings against their GT embeddings.

    bank: a NegativeBank (gallery and/or FIFO queue) the gallery negatives are drawn from, or None
        for in-batch negatives only (needs in_batch=True). Moves with ``.to()``; not in state_dict.
    tau: temperature, default 0.1. weight: loss scale, default 0.1 (the paper's L_CL weight).
    in_batch: use the other faces' positives as negatives too (identity-excluded), default True.
    num_negatives: nominal negatives per face, default 4096 (the released recipe): in-batch ones
        count first, so a face gets ``gallery_draws(N) = num_negatives - (N - 1)`` bank draws with
        in_batch (4033 at N = 64 faces, as released) and ``num_negatives`` without; never below 0.
    backend: passed to cosine_infonce ("auto" | "triton" | "torch").

    forward(g, pos, ids, generator=None): g, pos (N, D) float (gradient flows to both, never to
    the bank), ids (N,) integer identity per face (the bank's ids: ``bank.id_of(name)``),
    generator: torch.Generator on the bank's device for reproducible draws. Returns a scalar.
    In training mode, when the bank has a queue, ``pos`` (detached) and ``ids`` are pushed into it
    after the loss is computed, so the queue holds the last positives seen. An empty bank (a queue
    not yet filled) gives no gallery draws.

    Example:
        >>> bank = NegativeBank.from_arrays(torch.randn(100, 16), torch.arange(100) % 10)
        >>> loss = ContrastiveLoss(bank, num_negatives=32)
        >>> g = torch.randn(4, 16, requires_grad=True)
        >>> loss(g, torch.randn(4, 16), torch.tensor([0, 1, 2, 3])).backward()
    """

    def __init__(self, bank: NegativeBank | None = None, *, tau: float = 0.1, weight: float = 0.1,
                 in_batch: bool = True, num_negatives: int = 4096, backend: str = "auto"):
        super().__init__()
        if bank is not None and not isinstance(bank, NegativeBank):
            raise ValueError(f"ContrastiveLoss: bank must be a NegativeBank or None, got {type(bank).__name__}")
        if not isinstance(in_batch, bool):
            raise ValueError(f"ContrastiveLoss: in_batch must be True or False, got {in_batch!r}")
        if bank is None and not in_batch:
            raise ValueError("ContrastiveLoss: with bank=None the only negatives are in-batch ones; set in_batch=True or pass a bank")
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"ContrastiveLoss: tau must be a finite number > 0, got {tau!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"ContrastiveLoss: weight must be a finite number, got {weight!r}")
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
            raise ValueError(f"ContrastiveLoss: num_negatives must be an int >= 0, got {num_negatives!r}")
        self.bank = bank
        self.tau = float(tau)
        self.weight = float(weight)
        self.in_batch = in_batch
        self.num_negatives = num_negatives
        self.backend = backend

    def gallery_draws(self, num_faces: int) -> int:
        """Bank draws per face for a batch of ``num_faces`` faces (in-batch negatives count first)."""
        in_batch = num_faces - 1 if self.in_batch else 0
        return max(0, self.num_negatives - in_batch)

    def forward(self, g: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
                generator: torch.Generator | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """weight * mean over faces of the InfoNCE loss of g[n] against pos[n] and the negatives.

        valid: optional (N,) bool; faces marked False (e.g. unusable landmarks, see
        :func:`~idflux.kernels.face_warp.face_warp_valid`) are left out of the mean (their positives
        still serve as in-batch negatives of the others). The mean is over the valid faces, 0 if none.
        """
        ids = ids.to(g.device)
        if self.bank is None:
            negatives, neg_index, neg_ids = g.new_zeros(0, g.shape[-1]).detach(), None, None
        else:
            m = self.gallery_draws(g.shape[0]) if len(self.bank) else 0
            neg_index = self.bank.sample(ids, m, generator=generator, check=False)
            negatives, neg_ids = self.bank.embeddings, self.bank.ids
        # No host sync in a step: the sampler's indices are in [0, len(bank)) by construction (so
        # cosine_infonce's range check buys nothing), and a face whose identity owns the whole bank
        # draws its own rows, which neg_ids excludes (sample(check=False)).
        loss = cosine_infonce(g, pos, negatives, neg_index=neg_index, tau=self.tau, in_batch=self.in_batch,
                              ids=ids, neg_ids=neg_ids, reduction="none" if valid is not None else "mean",
                              backend=self.backend, check=False)
        if valid is not None:
            valid = valid.to(loss.device)
            loss = torch.where(valid, loss, 0.0).sum() / valid.sum().clamp_min(1)
        if self.training and self.bank is not None and self.bank.queue_capacity:
            self.bank.push(pos.detach(), ids)
        return self.weight * loss

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, weight={self.weight}, in_batch={self.in_batch}, "
                f"num_negatives={self.num_negatives}, backend={self.backend!r}")
