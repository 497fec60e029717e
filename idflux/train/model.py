"""What a training run holds: frozen FLUX parts and face models, the trainable adapter, the losses,
and the per-step loss computation (flow matching + GT-aligned identity + contrastive)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from idflux.engine.adapter import IdentityAdapter, RegionLayout, flux_dev_adapter, tiny_adapter
from idflux.engine.lowvram import to_device
from idflux.engine.faces import SiglipFaceEncoder
from idflux.engine.flux import flux_forward, image_ids, pack_latents, unpack_latents
from idflux.engine.iresnet import IResNet, iresnet_tiny
from idflux.engine.loading import FluxParts, load_flux, tiny_flux_parts
from idflux.engine.regions import boxes_to_membership
from idflux.kernels.face_warp import face_warp_valid
from idflux.engine.sampling import sampling_mu
from idflux.losses import ContrastiveLoss, FlowMatchingLoss, IdentityLoss, NegativeBank, noisy_latents, one_step_x0, sample_timesteps
from idflux.train.config import TrainConfig


@dataclass
class TrainBatch:
    """One micro-batch in the form the step needs.

    images: (B, 3, S, S) in [-1, 1]; prompts: B strings; boxes: per image a list of (x1, y1, x2, y2)
    in pixels of the S x S frame, one per face, in face order; landmarks: (F, 5, 2) GT landmarks of
    all faces (pixels); image_index: (F,) image of each face; ids: (F,) identity ids; gt_embeddings:
    (F, D) stored embeddings of the GT faces (contrastive positives) or None to recompute them with
    the recogniser; ref_images: F uint8 (H, W, 3) reference face crops, in face order.
    """

    images: torch.Tensor
    prompts: list
    boxes: list
    landmarks: torch.Tensor
    image_index: torch.Tensor
    ids: torch.Tensor
    gt_embeddings: torch.Tensor | None
    ref_images: list


def init_adapter(adapter: IdentityAdapter, path) -> None:
    """Load ``--adapter-init`` weights into ``adapter``: idflux's format (its config must match the
    preset's) or the released ``withanyone.safetensors``; a missing file or a mismatch is an error."""
    from safetensors import safe_open

    from idflux.engine.weights import load_adapter, load_released_adapter

    with safe_open(str(path), framework="pt") as f:
        ours = (f.metadata() or {}).get("format") == "idflux-adapter"
    if not ours:
        load_released_adapter(adapter, path)
        return
    loaded = load_adapter(path)
    if loaded.cfg != adapter.cfg:
        raise ValueError(f"--adapter-init {path} holds an adapter of config {loaded.cfg}, the preset needs {adapter.cfg}")
    adapter.load_state_dict(loaded.state_dict())


class TrainModel(nn.Module):
    """Frozen parts + trainable adapter; ``adapter`` is the only module with trainable parameters."""

    def __init__(self, parts: FluxParts, adapter: IdentityAdapter, recognizer: nn.Module, siglip: SiglipFaceEncoder,
                 cfg: TrainConfig, bank: NegativeBank | None = None):
        super().__init__()
        self.parts, self.cfg = parts, cfg
        self.transformer, self.vae, self.clip, self.t5 = parts.transformer, parts.vae, parts.clip, parts.t5
        self.adapter = adapter
        self.recognizer = recognizer.eval().requires_grad_(False)
        self.siglip = siglip.eval().requires_grad_(False)
        for m in (self.transformer, self.vae, self.clip, self.t5):
            m.requires_grad_(False).eval()
        self.flow_loss = FlowMatchingLoss()
        self.id_loss = IdentityLoss(self.recognizer, weight=cfg.id_weight, gating=cfg.id_gating)
        self.embed_dim = self._embed_dim()
        if bank is None:
            bank = NegativeBank.fifo(max(cfg.num_negatives, 1), self.embed_dim)
        self.cl_loss = ContrastiveLoss(bank, tau=cfg.tau, weight=cfg.cl_weight, num_negatives=cfg.num_negatives)

    def train(self, mode: bool = True) -> "TrainModel":
        """Only the adapter and the loss modules switch mode: frozen parts stay in eval (no dropout)."""
        super().train(mode)
        for m in (self.transformer, self.vae, self.clip, self.t5, self.recognizer, self.siglip):
            m.eval()
        return self

    def _embed_dim(self) -> int:
        with torch.no_grad():
            p = next(self.recognizer.parameters())
            return self.recognizer(torch.zeros(1, 3, 112, 112, device=p.device, dtype=p.dtype)).shape[-1]

    @classmethod
    def build(cls, cfg: TrainConfig) -> "TrainModel":
        torch.manual_seed(cfg.seed)
        if cfg.preset == "tiny":
            from idflux.engine.loading import tiny_world_available

            if cfg.flux != "random" and (cfg.flux or tiny_world_available()):
                return cls._build_tiny_world(cfg)
            parts = tiny_flux_parts(cfg.seed)  # flux="random" or no world built: random models, for fast tests
            adapter = IdentityAdapter(tiny_adapter())
            recognizer = IResNet(iresnet_tiny(embedding_dim=adapter.cfg.arc_dim))
            siglip = SiglipFaceEncoder.tiny(hidden_size=adapter.cfg.siglip_dim, num_tokens=adapter.cfg.siglip_tokens)
            if cfg.adapter_init:
                init_adapter(adapter, cfg.adapter_init)
            return cls(parts, adapter, recognizer, siglip, cfg)
        if cfg.preset != "flux-dev":
            raise ValueError(f"preset must be 'tiny' or 'flux-dev', got {cfg.preset!r}")
        missing = [n for n in ("flux", "face_models", "siglip") if not getattr(cfg, n)]
        if missing:
            raise ValueError(f"the flux-dev preset needs local paths for {missing} (nothing is downloaded)")
        from pathlib import Path

        dtype = torch.bfloat16
        parts = load_flux(cfg.flux, dtype=dtype)
        adapter = IdentityAdapter(flux_dev_adapter())
        if cfg.adapter_init:
            init_adapter(adapter, cfg.adapter_init)
        recognizer = IResNet.from_onnx(Path(cfg.face_models) / "glintr100.onnx")
        siglip = SiglipFaceEncoder.from_pretrained(cfg.siglip)
        bank = NegativeBank.from_gallery(Path(cfg.data) / "ref") if cfg.data and (Path(cfg.data) / "ref").is_dir() else None
        return cls(parts, adapter, recognizer, siglip, cfg, bank)

    @classmethod
    def _build_tiny_world(cls, cfg: TrainConfig) -> "TrainModel":
        """The trained tiny world (``cfg.flux``: its folder, default the shipped one): frozen backbone,
        VAE, text encoders, pixel recogniser and SigLIP stand-in from files; the adapter sized for them
        (from ``cfg.adapter_init`` when given, an idflux adapter file); InfoNCE negatives are the
        recogniser's embeddings of the gallery's pixels (``<data>/ref``) when there is one."""
        from pathlib import Path

        from idflux.engine.loading import load_tiny_world

        world = load_tiny_world(cfg.flux)
        torch.manual_seed(cfg.seed)
        adapter = IdentityAdapter(world.adapter_config)
        if cfg.adapter_init:
            from idflux.engine.weights import load_adapter

            init = load_adapter(cfg.adapter_init)
            if init.cfg != adapter.cfg:
                raise ValueError(f"adapter_init {cfg.adapter_init}: its config {init.cfg} does not fit the tiny world's "
                                 f"{adapter.cfg}")
            adapter.load_state_dict(init.state_dict())
        bank = None
        gallery = Path(cfg.data) / "ref" if cfg.data else None
        if gallery is not None and gallery.is_dir():
            from idflux.train.tiny_world import pixel_gallery_bank

            bank = pixel_gallery_bank(gallery, world.recognizer)
        model = cls(world.parts, adapter, world.recognizer, world.siglip, cfg, bank)
        model.tiny_world = world.root  # what `idflux train` draws its held-out sample sheet with
        return model

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        ids = p.clip_tokenizer(prompts, padding="max_length", max_length=p.clip_tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        ids = to_device(ids, device)
        pooled = self.clip(ids).pooler_output
        ids = p.t5_tokenizer(prompts, padding="max_length", max_length=p.max_text_tokens, truncation=True,
                             return_tensors="pt").input_ids
        return self.t5(to_device(ids, device)).last_hidden_state, pooled

    @torch.no_grad()
    def identity_inputs(self, batch: TrainBatch, device, dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per image (B, R, arc_dim) ArcFace embeddings and (B, R, T, D) SigLIP tokens of its faces'
        references, padded with zeros to the largest face count R (padded references own keys that no
        token attends to).

        Faces are in image order (as ``collate`` lays them out), so each face's (image, slot) comes
        from the boxes' counts on the host: no read-back of device tensors. The reference crops
        (square faces) are aligned by one ``face_warp`` call for all of them when they share a size.
        """
        from idflux.kernels import face_warp
        from idflux.kernels.face_warp_ref import arcface_template

        B = batch.images.shape[0]
        counts = [len(b) for b in batch.boxes]
        R = max(max(counts, default=0), 1)
        if not batch.ref_images:  # no faces, no references: the SigLIP branch is off
            return torch.zeros(B, R, self.adapter.cfg.arc_dim, device=device, dtype=dtype), None, R
        refs = [torch.from_numpy(r.copy()).permute(2, 0, 1).float() for r in batch.ref_images]
        groups = {}  # reference crops by size: one face_warp call per size (one in practice)
        for f, r in enumerate(refs):
            groups.setdefault(tuple(r.shape), []).append(f)
        crops, order = [], []
        for shape, faces in groups.items():
            side = float(min(shape[1:]))
            lm = (arcface_template(112, dtype=torch.float32) * side / 112)[None].expand(len(faces), 5, 2)
            images = to_device(torch.stack([refs[f] for f in faces]), device)
            crops.append(face_warp(images, to_device(lm.contiguous(), device), to_device(torch.arange(len(faces)), device),
                                   value_range=(0.0, 255.0), check=False))  # template landmarks: valid by construction
            order += faces
        if len(crops) == 1:
            crops = crops[0]
        else:  # several sizes: back to face order
            crops = torch.cat(crops)[to_device(torch.tensor(order).argsort(), device)]
        arc = self.recognizer(crops.to(dtype))
        sig = self.siglip(list(batch.ref_images))
        # flat slot of face f: image * R + its position among the image's faces
        slot = to_device(torch.tensor([b * R + j for b, n in enumerate(counts) for j in range(n)]), device)
        arc_b = torch.zeros(B * R, arc.shape[-1], device=device, dtype=dtype).index_copy_(0, slot, arc.to(dtype))
        sig_b = torch.zeros(B * R, *sig.shape[1:], device=device, dtype=dtype).index_copy_(0, slot, sig.to(device, dtype))
        return arc_b.view(B, R, -1), sig_b.view(B, R, *sig.shape[1:]), R

    def forward(self, batch: TrainBatch, sample_seeds: list[int], step_seed: int) -> dict[str, torch.Tensor]:
        """DDP's entry point: the losses of one micro-batch (see :meth:`losses`)."""
        return self.losses(batch, sample_seeds, step_seed)

    def losses(self, batch: TrainBatch, sample_seeds: list[int], step_seed: int) -> dict[str, torch.Tensor]:
        """Losses of this process's micro-batch, scaled so that DDP's gradient average gives the
        gradient of the global batch's loss (see :mod:`idflux.train.trainer`).

        sample_seeds: one seed per sample (noise and t depend on the sample, not on the process
        count); step_seed: the negative draws' seed (identical on every process).
        Returns {"loss": to backpropagate, "diff", "id", "cl": global values for logging}.
        """
        from idflux.train import distributed as D

        cfg = self.cfg
        device = batch.images.device
        dtype = next(self.transformer.parameters()).dtype
        size = batch.images.shape[-1]
        B = batch.images.shape[0]
        world = torch.distributed.get_world_size() if D.active() else 1
        with torch.no_grad():
            lat = self.vae.encode(batch.images.to(dtype)).latent_dist.mode()
            lat = (lat - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
        h, w = lat.shape[-2:]
        x0 = pack_latents(lat)
        mu = sampling_mu(size, size)
        noise, t = [], []
        for seed in sample_seeds:
            g = torch.Generator().manual_seed(seed)
            noise.append(torch.randn(x0.shape[1:], generator=g))
            t.append(sample_timesteps(1, mu, generator=g))
        noise = to_device(torch.stack(noise).to(dtype), device)
        t = to_device(torch.cat(t), device)
        x_t = noisy_latents(x0, noise, t)
        txt, pooled = self.encode_text(batch.prompts, device)
        arc, sig, R = self.identity_inputs(batch, device, dtype)
        # The layout is built and checked on the host (from the boxes), then copied: no read-back.
        layout = RegionLayout.from_membership(boxes_to_membership([[tuple(bx) for bx in boxes] for boxes in batch.boxes],
                                                                  size, size), R).to(device)
        ctx = self.adapter.prepare(arc, sig, layout)
        img_ids = image_ids(h // 2, w // 2, device=device, dtype=dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=device, dtype=dtype)
        guidance = torch.full((B,), cfg.guidance, device=device, dtype=dtype)
        v_hat = flux_forward(self.transformer, x_t, txt.to(dtype), pooled.to(dtype), t.to(dtype), img_ids, txt_ids, guidance,
                             adapter=self.adapter, adapter_ctx=ctx, checkpoint=cfg.grad_checkpointing)
        l_diff = self.flow_loss(v_hat, x0, noise)  # mean over this process's equal share of the batch
        out = {"loss": l_diff, "diff": D.all_sum(l_diff.detach()) / world}
        n_faces = batch.landmarks.shape[0]
        if D.active():  # every process takes the same branch: the global count decides (one sync)
            n_faces = int(D.all_sum(torch.tensor(float(n_faces), device=device)).item())
        if n_faces > 0:
            x0_hat = unpack_latents(one_step_x0(x_t, v_hat, t), h, w)
            pred = self.vae.decode(x0_hat / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)).sample
            # Faces whose landmarks cannot be aligned get loss 0 (no host sync); the means count the others.
            valid = face_warp_valid(batch.landmarks, batch.image_index, B, transform=self.id_loss.transform,
                                    backend=self.id_loss.backend)
            pos, gt_emb = batch.gt_embeddings, None
            if pos is None or pos.shape[-1] != self.embed_dim:
                with torch.no_grad():  # positives in the recogniser's own space (stored ones have another size)
                    pos = gt_emb = self.id_loss.embed(batch.images.float(), batch.landmarks, batch.image_index)
            per_face, g = self.id_loss(pred.float().clamp(-1, 1), batch.images.float(), batch.landmarks, batch.image_index, t,
                                       reduction="none", valid=valid, target=gt_emb)  # GT faces embedded once
            n_valid = D.all_sum(valid.sum().float()).clamp_min(1)
            l_id = per_face.sum() * world / n_valid
            # In-batch negatives over the global batch: every process computes the same global loss;
            # the gather's backward brings each process world x its rows' gradient, DDP divides by world.
            g_all = D.gather_rows(g.float(), grad=True)
            pos_all = D.gather_rows(to_device(pos, device).float())
            ids_all = D.gather_rows(to_device(batch.ids, device))
            gen = torch.Generator().manual_seed(step_seed)
            l_cl = self.cl_loss(g_all, pos_all, ids_all, generator=gen, valid=D.gather_rows(valid.to(torch.uint8)).bool())
            out["loss"] = out["loss"] + l_id + l_cl
            out.update(id=D.all_sum(per_face.detach().sum()) / n_valid, cl=l_cl.detach())
        return out
