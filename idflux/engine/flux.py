"""FLUX transformer forward with the identity adapter after every block.

The backbone is diffusers' ``FluxTransformer2DModel`` (frozen); this module runs its blocks in
order and adds the adapter's residual to the image tokens after each of the double- and
single-stream blocks (in single-stream blocks only the image part of ``[txt; img]``). Also the
latent packing (2x2 patches, row-major token grid) and the position ids FLUX expects.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from idflux.engine.adapter import IdentityAdapter
from idflux.engine.profiling import nvtx_range


def tiny_flux_transformer(*, in_channels: int = 16, seed: int = 0) -> FluxTransformer2DModel:
    """A random FLUX of 1 double + 2 single blocks, width 64 (4 heads x 16): runs on a CPU in ms."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, (h/2)(w/2), 4C) tokens, row-major over the 2x2 patch grid."""
    B, C, h, w = latents.shape
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for an (h, w) latent."""
    B, _, C4 = tokens.shape
    x = tokens.view(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C4 // 4, h, w)


def image_ids(grid_h: int, grid_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(grid_h * grid_w, 3) RoPE position ids of the image tokens: (0, row, col)."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(grid_h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device, dtype=dtype)[None, :]
    return ids.view(-1, 3)


def flux_forward(transformer: FluxTransformer2DModel, hidden_states, encoder_hidden_states, pooled, timestep, img_ids, txt_ids,
                 guidance=None, *, adapter: IdentityAdapter | None = None, adapter_ctx: dict | None = None,
                 checkpoint: bool = False) -> torch.Tensor:
    """One FLUX evaluation with the adapter's residual after every block.

    hidden_states: (B, N, in_channels) packed latent tokens; encoder_hidden_states: (B, L, joint_dim);
    pooled: (B, pooled_dim); timestep, guidance: (B,) in [0, 1] and guidance scale; img_ids (N, 3),
    txt_ids (L, 3). ``adapter_ctx`` comes from ``adapter.prepare`` (once per generation).
    ``checkpoint`` recomputes each block in the backward (training memory).
    Returns the predicted velocity (B, N, out_channels).
    """
    t = transformer
    x = t.x_embedder(hidden_states)
    dtype = x.dtype
    ts = timestep.to(dtype) * 1000
    temb = (t.time_text_embed(ts, pooled) if guidance is None or not t.config.guidance_embeds
            else t.time_text_embed(ts, guidance.to(dtype) * 1000, pooled))
    txt = t.context_embedder(encoder_hidden_states)
    rope = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    use_adapter = adapter is not None and adapter_ctx is not None
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    for i, block in enumerate(blocks):
        with nvtx_range(f"flux.block{i}"):
            if checkpoint and torch.is_grad_enabled():
                txt, x = torch.utils.checkpoint.checkpoint(block, x, txt, temb, rope, use_reentrant=False)
            else:
                txt, x = block(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
        if use_adapter:
            with nvtx_range(f"adapter.block{i}"):
                x = adapter.apply(i, x, adapter_ctx)
    x = t.norm_out(x, temb)
    return t.proj_out(x)
