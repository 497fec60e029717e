"""The dual-branch identity adapter: ID-token embedders and one region cross-attention per FLUX block.

Two branches add a residual to the image tokens after every one of FLUX's blocks:
- ArcFace branch: the raw 512-d ArcFace embedding of each reference -> MLP -> 8 tokens.
- SigLIP branch: 256 SigLIP tokens of the face crop -> per-token MLP, plus 8 ArcFace tokens from
  the branch's own ArcFace MLP: 264 tokens per reference, ordered [256 SigLIP ; 8 ArcFace].
Each cross-attention module: LayerNorm on the ID tokens (K/V side), LayerNorm on the image tokens,
bias-free ``to_q`` / ``to_kv`` / ``to_out``, no RoPE, no gate. Image tokens attend only to the
references whose box holds them (:func:`idflux.kernels.region_attention_packed`). Because
``to_out`` has no bias, tokens outside every box receive exactly zero, so only in-box tokens go
through norm, ``to_q``, attention and ``to_out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from idflux.engine.lowvram import to_device
from idflux.engine.profiling import nvtx_range
from idflux.kernels import region_attention_packed
from idflux.kernels.region_attention import checked_layout
from idflux.kernels.region_attention_ref import dense_mask_from_membership


@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of the identity adapter."""

    hidden: int = 3072
    """FLUX hidden size (image-token width)."""
    heads: int = 24
    """Attention heads of each cross-attention module."""
    head_dim: int = 64
    """Width of one head (inner width = heads * head_dim)."""
    n_blocks: int = 57
    """Cross-attention modules per branch: one after each FLUX block (19 double + 38 single)."""
    arc_dim: int = 512
    """ArcFace embedding width (antelopev2 glintr100)."""
    arc_tokens: int = 8
    """Tokens the ArcFace MLP makes from one embedding."""
    arc_mlp_ratio: int = 4
    """Hidden width of the ArcFace MLP, in multiples of ``hidden``."""
    siglip_dim: int = 768
    """SigLIP vision-token width (siglip-base-patch16-256)."""
    siglip_tokens: int = 256
    """SigLIP tokens per reference face."""

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def sig_tokens_per_ref(self) -> int:
        return self.siglip_tokens + self.arc_tokens


def flux_dev_adapter() -> AdapterConfig:
    """The released WithAnyone adapter for FLUX.1-dev (2.78 B parameters)."""
    return AdapterConfig()


def tiny_adapter() -> AdapterConfig:
    """A few-kilobyte adapter for the tiny FLUX preset (3 blocks, width 64)."""
    return AdapterConfig(hidden=64, heads=4, head_dim=8, n_blocks=3, arc_dim=32, arc_tokens=8, arc_mlp_ratio=2,
                         siglip_dim=24, siglip_tokens=16)


class ArcFaceEmbedder(nn.Sequential):
    """(..., arc_dim) ArcFace embedding -> (..., arc_tokens, hidden) ID tokens."""

    def __init__(self, cfg: AdapterConfig):
        width = cfg.arc_mlp_ratio * cfg.hidden
        super().__init__(nn.Linear(cfg.arc_dim, width), nn.GELU(), nn.LayerNorm(width),
                         nn.Linear(width, cfg.arc_tokens * cfg.hidden))
        self.tokens, self.hidden = cfg.arc_tokens, cfg.hidden

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return super().forward(emb).unflatten(-1, (self.tokens, self.hidden))


class SiglipEmbedder(nn.Sequential):
    """(..., siglip_tokens, siglip_dim) SigLIP tokens -> (..., siglip_tokens, hidden), per token."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__(nn.Linear(cfg.siglip_dim, cfg.hidden), nn.GELU(), nn.LayerNorm(cfg.hidden),
                         nn.Linear(cfg.hidden, cfg.hidden))


@dataclass
class RegionLayout:
    """Where the identity tokens of each image apply; fixed for a whole generation.

    membership: (B, N) int64 bitmask over image tokens; b_idx, t_idx: the in-box tokens (T,), by
    image, then by membership pattern, then in grid order; packed_membership: (T,); n_refs:
    references per image (R); rows: (T,) the in-box tokens' rows of the (B * N, hidden) flattened
    image tokens (``b_idx * N + t_idx``).
    """

    membership: torch.Tensor
    b_idx: torch.Tensor
    t_idx: torch.Tensor
    packed_membership: torch.Tensor
    n_refs: int
    rows: torch.Tensor | None = None
    host: "RegionLayout | None" = None
    """The CPU layout this one was copied from (:meth:`to`): its values are checked instead of the
    device tensors', so preparing a layout never waits for the GPU."""

    def __post_init__(self):
        if self.rows is None:
            self.rows = self.b_idx * self.membership.shape[1] + self.t_idx

    def to(self, device) -> "RegionLayout":
        """This layout on ``device``, built here on the host (from boxes, without reading anything
        back) and copied through pinned memory without waiting for the GPU; ``host`` keeps the
        source for the value checks."""
        if self.membership.device == torch.device(device):
            return self
        moved = (to_device(t, device) for t in (self.membership, self.b_idx, self.t_idx, self.packed_membership))
        return RegionLayout(*moved, self.n_refs, to_device(self.rows, device), host=self)

    @classmethod
    def from_membership(cls, membership: torch.Tensor, n_refs: int) -> "RegionLayout":
        b_idx, t_idx = (membership != 0).nonzero(as_tuple=True)
        pattern = membership[b_idx, t_idx]
        # Tokens of one (image, pattern) side by side: the reference path attends on slices of them
        # (no gathers), and the kernels' tile plan finds them already grouped.
        order = torch.argsort(pattern, stable=True)
        order = order[torch.argsort(b_idx[order], stable=True)]
        return cls(membership, b_idx[order], t_idx[order], pattern[order], n_refs)

    def ref_offsets(self, tokens_per_ref: int) -> torch.Tensor:
        """(B, R+1) key spans when every reference has ``tokens_per_ref`` tokens."""
        B = self.membership.shape[0]
        return (torch.arange(self.n_refs + 1, device=self.membership.device) * tokens_per_ref).expand(B, -1).contiguous()

    def checked_offsets(self, tokens_per_ref: int) -> torch.Tensor:
        """:meth:`ref_offsets`, with the packed layout (membership, image index, these offsets)
        checked and remembered by region_attention: from the ``host`` copies when the layout has
        them, so the first attention call reads nothing back."""
        offsets = self.ref_offsets(tokens_per_ref)
        host = None
        if self.host is not None:
            host = (self.host.packed_membership, self.host.b_idx, self.host.ref_offsets(tokens_per_ref))
        checked_layout(self.packed_membership, offsets, self.n_refs * tokens_per_ref, self.membership.shape[0],
                       image_index=self.b_idx, host=host)
        return offsets


class IdentityCrossAttention(nn.Module):
    """One region cross-attention module (one per FLUX block per branch)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm_id = nn.LayerNorm(cfg.hidden)
        self.norm_img = nn.LayerNorm(cfg.hidden)
        self.to_q = nn.Linear(cfg.hidden, cfg.inner, bias=False)
        self.to_kv = nn.Linear(cfg.hidden, 2 * cfg.inner, bias=False)
        self.to_out = nn.Linear(cfg.inner, cfg.hidden, bias=False)

    def project_kv(self, id_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nkv, hidden) ID tokens -> K, V each (B, heads, Nkv, head_dim). Computed once per generation."""
        kv = self.to_kv(self.norm_id(id_tokens)).unflatten(-1, (2, self.heads, self.head_dim))
        return kv[..., 0, :, :].transpose(1, 2), kv[..., 1, :, :].transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layout: RegionLayout,
                ref_offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """x: (T, hidden) the in-box image tokens, in ``layout``'s (b_idx, t_idx) order -> their residual (T, hidden)."""
        return self.to_out(self.attend(x, kv, layout, ref_offsets, backend=backend))

    def attend(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layout: RegionLayout,
               ref_offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """:meth:`forward` before ``to_out``: the attention output (T, heads * head_dim)."""
        q = self.to_q(self.norm_img(x)).unflatten(-1, (self.heads, self.head_dim))
        k, v = kv
        with nvtx_range("kernel.region_attention"):
            o = region_attention_packed(q, k.to(q.dtype), v.to(q.dtype), layout.packed_membership, layout.b_idx, ref_offsets,
                                        scale=1.0 / math.sqrt(self.head_dim), backend=backend)
        return o.flatten(1)

    def forward_dense(self, img: torch.Tensor, id_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The released formulation: every token through norm/to_q, SDPA with a dense boolean mask
        (B, heads or 1, N, Nkv), to_out. Rows with no allowed key return 0 (torch >= 2.5 semantics)."""
        q = self.to_q(self.norm_img(img)).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.project_kv(id_tokens)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        o = o.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return self.to_out(o.transpose(1, 2).flatten(2))


class IdentityAdapter(nn.Module):
    """Both branches: embedders and ``n_blocks`` cross-attention modules each.

    Usage per generation: ``ctx = adapter.prepare(arc_emb, siglip_tokens, layout)`` once, then
    ``img = adapter.apply(i, img, ctx)`` after FLUX block i at every step (K/V reused).
    """

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.arc_embed = ArcFaceEmbedder(cfg)       # ArcFace branch
        self.sig_arc_embed = ArcFaceEmbedder(cfg)   # SigLIP branch's own ArcFace tokens
        self.sig_embed = SiglipEmbedder(cfg)
        self.arc_blocks = nn.ModuleList(IdentityCrossAttention(cfg) for _ in range(cfg.n_blocks))
        self.sig_blocks = nn.ModuleList(IdentityCrossAttention(cfg) for _ in range(cfg.n_blocks))

    def id_tokens(self, arc_emb: torch.Tensor, siglip_tokens: torch.Tensor | None):
        """arc_emb (B, R, arc_dim), siglip_tokens (B, R, siglip_tokens, siglip_dim) or None ->
        ArcFace-branch tokens (B, R*8, hidden) and SigLIP-branch tokens (B, R*264, hidden) or None."""
        B, R = arc_emb.shape[:2]
        arc = self.arc_embed(arc_emb).flatten(1, 2)
        if siglip_tokens is None:
            return arc, None
        sig = torch.cat([self.sig_embed(siglip_tokens), self.sig_arc_embed(arc_emb)], dim=2)  # (B, R, 264, hidden)
        return arc, sig.flatten(1, 2)

    def prepare(self, arc_emb, siglip_tokens, layout: RegionLayout, *, id_weight: float = 1.0, siglip_weight: float = 1.0,
                backend: str = "auto") -> dict:
        """Everything that stays fixed during a generation: K/V of all modules of both branches."""
        arc, sig = self.id_tokens(arc_emb, siglip_tokens)
        ctx = {
            "layout": layout, "backend": backend,
            "arc": [blk.project_kv(arc) for blk in self.arc_blocks], "arc_offsets": layout.checked_offsets(self.cfg.arc_tokens),
            "id_weight": id_weight, "siglip_weight": siglip_weight,
        }
        if sig is not None and siglip_weight != 0:
            ctx["sig"] = [blk.project_kv(sig) for blk in self.sig_blocks]
            ctx["sig_offsets"] = layout.checked_offsets(self.cfg.sig_tokens_per_ref)
        return ctx

    def apply(self, index: int, img: torch.Tensor, ctx: dict) -> torch.Tensor:
        """img (B, N, hidden) after FLUX block ``index`` -> img + id_weight * CA_arc + siglip_weight * CA_sig."""
        layout: RegionLayout = ctx["layout"]
        if layout.b_idx.numel() == 0:
            return img
        flat = img.flatten(0, 1)
        x = flat.index_select(0, layout.rows)  # (T, hidden): the only tokens that get a residual
        arc_blk, weight = self.arc_blocks[index], ctx["id_weight"]
        res = arc_blk.to_out(arc_blk.attend(x, ctx["arc"][index], layout, ctx["arc_offsets"], backend=ctx["backend"]))
        if "sig" in ctx:
            sig_blk = self.sig_blocks[index]
            o = sig_blk.attend(x, ctx["sig"][index], layout, ctx["sig_offsets"], backend=ctx["backend"])
            if _plain_linear(sig_blk.to_out):
                # id_weight * res + siglip_weight * to_out(o) in one op (fewer launches per block).
                res = torch.addmm(res, o, sig_blk.to_out.weight.t(), beta=weight, alpha=ctx["siglip_weight"])
            else:  # a wrapped or hooked to_out (LoRA, sharding, hooks) must run as a module
                res = weight * res + ctx["siglip_weight"] * sig_blk.to_out(o)
            weight = 1.0
        # index_add over unique rows: the same sums as index_put(accumulate=True), about 5x faster on the CPU.
        return flat.index_add(0, layout.rows, res.to(img.dtype), alpha=weight).view_as(img)

    def apply_dense(self, index: int, img: torch.Tensor, arc_emb, siglip_tokens, membership: torch.Tensor, *,
                    id_weight: float = 1.0, siglip_weight: float = 1.0) -> torch.Tensor:
        """The released formulation of :meth:`apply` (dense mask, every token computed, K/V recomputed)."""
        arc, sig = self.id_tokens(arc_emb, siglip_tokens)
        R = arc_emb.shape[1]
        offs = torch.arange(R + 1, device=img.device) * self.cfg.arc_tokens
        mask = dense_mask_from_membership(membership, offs.expand(img.shape[0], -1), arc.shape[1])[:, None]
        out = img + id_weight * self.arc_blocks[index].forward_dense(img, arc, mask)
        if sig is not None and siglip_weight != 0:
            offs = torch.arange(R + 1, device=img.device) * self.cfg.sig_tokens_per_ref
            mask = dense_mask_from_membership(membership, offs.expand(img.shape[0], -1), sig.shape[1])[:, None]
            out = out + siglip_weight * self.sig_blocks[index].forward_dense(img, sig, mask)
        return out


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear that calling would not change: no subclass, no hooks, no bias (its weight can be
    used directly)."""
    return type(m) is nn.Linear and m.bias is None and not (m._forward_hooks or m._forward_pre_hooks)


# ---------------------------------------------------------------------------------------------
# Released checkpoint names <-> ours
# ---------------------------------------------------------------------------------------------

_MODULE_MAP = [("ipa_arc.", "arc_blocks."), ("ipa_sig.", "sig_blocks."), ("arcface_in_arc.", "arc_embed."),
               ("arcface_in_sig.", "sig_arc_embed."), ("siglip_in_sig.", "sig_embed.")]
_LEAF_MAP = {"norm1": "norm_id", "norm2": "norm_img"}
#: Training-only tensors the released merged file may carry; inference skips them by name.
RELEASED_TRAINING_ONLY = ("siglip_in_arc.",)


def released_to_ours(name: str) -> str | None:
    """Map a released checkpoint key to ours; None for a known training-only key; KeyError otherwise."""
    if name.startswith(RELEASED_TRAINING_ONLY):
        return None
    for src, dst in _MODULE_MAP:
        if name.startswith(src):
            parts = (dst + name[len(src):]).split(".")
            return ".".join(_LEAF_MAP.get(p, p) for p in parts)
    raise KeyError(name)


def ours_to_released(name: str) -> str:
    inverse = {v: k for k, v in _LEAF_MAP.items()}
    for src, dst in _MODULE_MAP:
        if name.startswith(dst):
            parts = (src + name[len(dst):]).split(".")
            return ".".join(inverse.get(p, p) for p in parts)
    raise KeyError(name)
