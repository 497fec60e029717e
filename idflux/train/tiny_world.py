"""The tiny world: every model of the ``tiny`` preset trained from scratch on synthetic people.

``python -m idflux.train.tiny_world build`` retrains every shipped file under
``idflux/assets/tiny/`` in stages, each recorded in ``manifest.json`` (seed, steps, wall seconds,
measured metrics, sha256 of every file it wrote):

- ``recognizer``: a small IResNet (56-pixel input pooled from the 112-pixel ``face_warp`` crops at
  the exact synthetic landmarks) trained with an ArcFace additive angular margin on training
  identities, with colour, blur, noise and landmark jitter; verification (ROC AUC, TAR at FAR 1e-3,
  top-1 identification) on identities never seen in training.
- ``text``: the CLIP-like and T5-like text encoders and their character tokenizers, seeded random
  (FLUX keeps them frozen; nothing trains them), and the SigLIP-branch stand-in (a seeded random
  one-layer SigLIP tower, a fixed function of the face pixels).
- ``vae``: a small ``AutoencoderKL`` (x8, 8 latent channels) trained on scene crops, faces weighted;
  PSNR on held-out scenes; latent shift and scale measured on training scenes.
- ``transformer``: a small ``FluxTransformer2DModel`` trained with rectified flow (velocity target,
  FLUX's shifted timesteps) on VAE latents of multi-person scenes and their captions through the
  text encoders, no identity conditioning; the EMA weights are shipped and stay frozen.
- ``adapters``: identity adapters trained on the frozen world through the real four-phase trainer
  (:func:`idflux.train.trainer.train`): flow matching only, + ID loss, + ID loss + InfoNCE (the
  shipped ``adapter.safetensors``).

A stage whose record is in the manifest is skipped unless ``--force``; every file is written to a
temporary name and renamed, the manifest last, so a killed build resumes at the stage it was in.
``python -m idflux.train.tiny_world eval`` measures the world on the held-out MultiID-Bench
(:mod:`idflux.train.tiny_world_eval`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import idflux

#: Where the shipped world lives (inside the package, so an installed copy finds it).
ASSETS = Path(idflux.__file__).resolve().parent / "assets" / "tiny"

#: The world's constants: every stage and the evaluation read them from here.
WORLD = {
    "size": 192,  # 12 x 12 tokens of 16 pixels; a face box spans 4-9 tokens across
    "face_scale": 0.9,  # head size passed to render_scene
    "max_faces": 4,
    "train_seed": 1,  # identities every stage trains on
    "n_train_ids": 400,
    "heldout_seed": 2,  # identities no stage ever trains on: recogniser verification, the bench
    "n_heldout_ids": 100,
    "text_tokens": 64,
}

STAGES = ("recognizer", "text", "vae", "transformer", "adapters")
#: Fraction of each stage's data actually rendered (``--smoke`` shrinks it to check the build quickly).
DATA_SCALE = 1.0


def _n(count: int) -> int:
    return max(16, int(round(count * DATA_SCALE)))


# ------------------------------------------------------------------------------------------ the files

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _save_pretrained(model, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in (a killed stage leaves the old one)."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_manifest(root: Path = ASSETS) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return {"world": WORLD, "stages": {}}
    return json.loads(path.read_text())


def _record(root: Path, stage: str, info: dict, files: list[Path]) -> dict:
    manifest = load_manifest(root)
    manifest["world"] = WORLD
    manifest["machine"] = _machine()
    info = dict(info)
    info["files"] = {str(Path(f).relative_to(root)): {"sha256": sha256(f), "bytes": Path(f).stat().st_size}
                     for f in sorted(files)}
    manifest["stages"][stage] = info
    _atomic_json(Path(root) / "manifest.json", manifest)
    return info


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def _log(msg: str) -> None:
    print(f"[tiny-world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ the data

def identities(kind: str):
    """The world's training (``"train"``) or held-out (``"heldout"``) identities."""
    from idflux.train.synthetic import SyntheticIdentities

    if kind == "train":
        return SyntheticIdentities(WORLD["n_train_ids"], seed=WORLD["train_seed"])
    if kind == "heldout":
        return SyntheticIdentities(WORLD["n_heldout_ids"], seed=WORLD["heldout_seed"])
    raise ValueError(f"identities: kind must be 'train' or 'heldout', got {kind!r}")


def _place(rng) -> str:
    return ("in a park", "in a studio", "at a street corner", "in a living room", "on a beach")[rng.integers(5)]


_COUNT = ("no people", "one person", "two people", "three people", "four people")


def plain_prompt(n: int, rng) -> str:
    """A prompt naming the head count and a place, nothing of the people's looks (the evaluation's prompts)."""
    return f"a photo of {_COUNT[n]} {_place(rng)}"


def render_scenes(synth, n: int, seed: int, tag: int, *, max_faces: int | None = None, size: int | None = None):
    """``n`` scenes of 1..max_faces distinct people of ``synth``: images (n, S, S, 3) uint8, per scene
    boxes, landmarks, ids and its caption (synthetic caption, plain prompt, count only or empty)."""
    size = size or WORLD["size"]
    max_faces = max_faces or WORLD["max_faces"]
    images = np.empty((n, size, size, 3), np.uint8)
    boxes, landmarks, ids, captions = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, tag, i])
        k = int(rng.integers(1, max_faces + 1))
        who = rng.choice(len(synth), k, replace=False)
        image, b, lm, who = synth.render_scene(rng, who, size, face_scale=WORLD["face_scale"])
        images[i] = image
        boxes.append(b), landmarks.append(lm), ids.append(who)
        r = rng.random()
        if r < 0.5:
            captions.append(synth.caption(who, rng))
        elif r < 0.75:
            captions.append(plain_prompt(len(who), rng))
        elif r < 0.9:
            captions.append(_COUNT[len(who)])
        else:
            captions.append("")
    return images, boxes, landmarks, ids, captions


def face_crops(images: np.ndarray, landmarks: list, size: int = 112, jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The 112-pixel ``face_warp`` crops (F, 3, size, size) in [-1, 1] of every face, in scene order,
    at the exact landmarks (``jitter`` > 0: moved by a random similarity, as a detector's error)."""
    from idflux.kernels import face_warp

    g = torch.Generator().manual_seed(seed)
    out = []
    for first in range(0, len(images), 64):
        imgs = torch.from_numpy(images[first:first + 64]).permute(0, 3, 1, 2).float()
        lms = [torch.as_tensor(landmarks[i], dtype=torch.float32) for i in range(first, min(first + 64, len(images)))]
        index = torch.cat([torch.full((len(lm),), j, dtype=torch.long) for j, lm in enumerate(lms)])
        lm = torch.cat(lms)
        if jitter > 0:
            centre = lm.mean(1, keepdim=True)
            scale = 1 + jitter * 0.05 * torch.randn(len(lm), 1, 1, generator=g)
            ang = jitter * math.radians(4) * torch.randn(len(lm), generator=g)
            rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
            width = (lm[:, 1] - lm[:, 0]).norm(dim=-1).view(-1, 1, 1)
            shift = jitter * 0.08 * width * torch.randn(len(lm), 1, 2, generator=g)
            lm = centre + scale * (lm - centre) @ rot.transpose(1, 2) + shift
        out.append(face_warp(imgs, lm, index, size=size, value_range=(0.0, 255.0)))
    return torch.cat(out).clamp(-1, 1)


def reference_crops(images: np.ndarray, boxes: list, ref_size: int = 64) -> torch.Tensor:
    """The faces as the tiny preset sees a reference: ``square_face_crop`` of the box at ``ref_size``
    (as MultiIDDataset's references), then warped to 112 with the ArcFace template in the square (as
    ``TrainModel.identity_inputs`` and ``CenterFaceDetector`` do). (F, 3, 112, 112) in [-1, 1]."""
    from idflux.engine.faces import square_face_crop
    from idflux.kernels import face_warp
    from idflux.kernels.face_warp_ref import arcface_template

    crops = [square_face_crop(images[i], b, out_size=ref_size) for i in range(len(images)) for b in boxes[i]]
    out = []
    lm = arcface_template(112, dtype=torch.float32) * ref_size / 112
    for first in range(0, len(crops), 256):
        x = torch.from_numpy(np.stack(crops[first:first + 256])).permute(0, 3, 1, 2).float()
        out.append(face_warp(x, lm[None].expand(len(x), 5, 2).contiguous(), torch.arange(len(x)), value_range=(0.0, 255.0)))
    return torch.cat(out).clamp(-1, 1)


def augment_crops(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour (per-channel gain, brightness, contrast), blur (down-up sampling, as a decoder's) and noise."""
    n = x.shape[0]
    gain = 1 + 0.08 * torch.randn(n, 3, 1, 1, generator=g)
    bright = 0.1 * torch.randn(n, 1, 1, 1, generator=g)
    contrast = 1 + 0.1 * torch.randn(n, 1, 1, 1, generator=g)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    x = (x + 1) * gain - 1 + bright
    factor = torch.randint(1, 4, (1,), generator=g).item()
    if factor > 1:
        s = x.shape[-1]
        x = F.interpolate(F.interpolate(x, size=s // factor, mode="area"), size=s, mode="bilinear", align_corners=False)
    x = x + 0.03 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def gallery_crops(folder: Path, ref_size: int = 64) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A MultiID-2M gallery (``folder/<name>/*.jpg`` + json ``bboxes``) as reference-style crops:
    (names sorted, crops (K, 3, 112, 112), ids (K,) = the name's position, the dataset's ids)."""
    from PIL import Image

    names, images, boxes, ids = [], [], [], []
    for person in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        jpgs = sorted(person.glob("*.jpg"))
        if not jpgs:
            continue
        for jpg in jpgs:
            meta = json.loads(jpg.with_suffix(".json").read_text())
            images.append(np.asarray(Image.open(jpg).convert("RGB")))
            boxes.append([meta["bboxes"][0]])
            ids.append(len(names))
        names.append(person.name)
    if not names:
        raise FileNotFoundError(f"gallery {folder}: no <name>/*.jpg reference images")
    return names, reference_crops(images, boxes, ref_size), torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def embed(recognizer, crops: torch.Tensor, batch: int = 256) -> torch.Tensor:
    p = next(recognizer.parameters())
    return torch.cat([recognizer(crops[i:i + batch].to(p.device, p.dtype)).float().cpu() for i in range(0, len(crops), batch)])


def pixel_gallery_bank(folder: Path, recognizer, ref_size: int = 64):
    """InfoNCE negatives from pixels: the recogniser's embeddings of every gallery image's face."""
    from idflux.losses import NegativeBank

    names, crops, ids = gallery_crops(folder, ref_size)
    return NegativeBank.from_arrays(embed(recognizer, crops), ids, names)


# ------------------------------------------------------------------------------------ (a) recogniser

def recognizer_config():
    from idflux.engine.iresnet import IResNetConfig

    return IResNetConfig(layers=(1, 1, 1, 1), width=16, embedding_dim=64, input_size=112, downsample=2)


def verification(emb: torch.Tensor, labels: torch.Tensor, gallery_per_id: int = 2) -> dict:
    """ROC AUC and TAR at FAR 1e-3 over all pairs of ``emb`` (cosine), and top-1 identification of
    the remaining faces against the mean of each identity's first ``gallery_per_id`` faces."""
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    same = labels[:, None] == labels[None, :]
    iu = torch.triu_indices(len(e), len(e), 1)
    s, m = sim[iu[0], iu[1]], same[iu[0], iu[1]]
    gen, imp = s[m], s[~m]
    order = torch.cat([gen, imp]).argsort()
    ranks = torch.empty(len(order), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(order) + 1, dtype=torch.float64)
    auc = (ranks[: len(gen)].sum() - len(gen) * (len(gen) + 1) / 2) / (len(gen) * len(imp))
    thr = torch.quantile(imp.double(), 1 - 1e-3) if len(imp) <= 16_000_000 else imp.double().sort().values[int(len(imp) * (1 - 1e-3))]
    tar = (gen.double() > thr).double().mean()
    gal_rows, probe_rows, gal_labels = [], [], []
    for lab in labels.unique():
        rows = (labels == lab).nonzero().flatten()
        gal_rows.append(F.normalize(e[rows[:gallery_per_id]].mean(0), dim=-1))
        gal_labels.append(lab)
        probe_rows.append(rows[gallery_per_id:])
    gal = torch.stack(gal_rows)
    probes = torch.cat(probe_rows)
    pred = torch.stack(gal_labels)[(e[probes] @ gal.T).argmax(1)]
    top1 = (pred == labels[probes]).double().mean()
    return {"roc_auc": float(auc), "tar_at_far_1e-3": float(tar), "threshold_far_1e-3": float(thr),
            "top1_identification": float(top1), "identities": int(len(gal)), "faces": int(len(e))}


def cross_identification(ref: torch.Tensor, faces: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 identification of each face (landmark crop) against one gallery vector per identity made
    from the mean of its reference-style crops, and the ROC AUC of reference-face pairs."""
    r, f = F.normalize(ref.float(), dim=-1), F.normalize(faces.float(), dim=-1)
    uniq = labels.unique()
    gal = F.normalize(torch.stack([r[labels == u].mean(0) for u in uniq]), dim=-1)
    top1 = (uniq[(f @ gal.T).argmax(1)] == labels).double().mean()
    sim = (r @ f.T).flatten()
    same = (labels[:, None] == labels[None, :]).flatten()
    gen, imp = sim[same], sim[~same]
    auc = (gen[:, None] > imp[None, ::max(1, len(imp) // 20000)]).double().mean()
    return {"top1_identification": float(top1), "roc_auc": float(auc), "identities": int(len(uniq))}


def stage_recognizer(root: Path, steps: int = 500, seed: int = 11) -> dict:
    from idflux.engine.iresnet import IResNet

    t0 = time.time()
    torch.manual_seed(seed)
    train_ids = identities("train")
    imgs, boxes, lms, ids, _ = render_scenes(train_ids, _n(3600), seed, 0xA1, max_faces=3)
    # Faces at their landmarks (generated and GT faces) and as references (square crops, template).
    crops = torch.cat([face_crops(imgs, lms, jitter=1.0, seed=seed), reference_crops(imgs, boxes)])
    labels = torch.as_tensor(np.concatenate(ids), dtype=torch.long).repeat(2)
    del imgs
    held = identities("heldout")
    himgs, hboxes, hlms, hids, _ = render_scenes(held, _n(400), seed, 0xA2, max_faces=3)
    hcrops = face_crops(himgs, hlms, jitter=1.0, seed=seed + 1)
    hrefs = reference_crops(himgs, hboxes)
    hlabels = torch.as_tensor(np.concatenate(hids), dtype=torch.long)
    _log(f"recognizer: {len(crops)} training crops of {len(train_ids)} identities, {len(hcrops)} held-out "
         f"({time.time() - t0:.0f} s)")
    net = IResNet(recognizer_config())
    weight = nn.Parameter(torch.randn(len(train_ids), net.config.embedding_dim) * 0.01)
    opt = torch.optim.AdamW([*net.parameters(), weight], lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    s_scale, margin = 30.0, 0.3
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        rows = torch.randint(0, len(crops), (128,), generator=g)
        x = augment_crops(crops[rows], g)
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)  # a mirrored face (its landmark order is not used here)
        cos = F.linear(F.normalize(net(x)), F.normalize(weight)).clamp(-1 + 1e-6, 1 - 1e-6)
        y = labels[rows]
        theta = torch.acos(cos.gather(1, y[:, None]))
        target = torch.where(theta + margin < math.pi, torch.cos(theta + margin), cos.gather(1, y[:, None]) - margin)
        logits = s_scale * cos.scatter(1, y[:, None], target)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"recognizer step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    net.eval()
    with torch.no_grad():
        emb = torch.cat([net(hcrops[i:i + 256]) for i in range(0, len(hcrops), 256)])
        ref = torch.cat([net(hrefs[i:i + 256]) for i in range(0, len(hrefs), 256)])
    metrics = verification(emb, hlabels)
    metrics["reference_to_face"] = cross_identification(ref, emb, hlabels)
    _log(f"recognizer held-out: {metrics}")
    folder = root / "recognizer"
    _atomic_json(folder / "config.json", asdict(net.config))
    _save_tensors(folder / "model.safetensors", net.state_dict())
    return _record(root, "recognizer", {"seed": seed, "steps": steps, "batch": 128, "loss": "ArcFace (s 30, m 0.3)",
                                        "train_identities": len(train_ids), "train_crops": len(crops),
                                        "heldout": metrics, "wall_s": round(time.time() - t0, 1)}, _files(folder))


def load_recognizer(root: Path = ASSETS):
    """The shipped pixel recogniser (frozen, eval): (N, 3, 112, 112) RGB in [-1, 1] -> (N, 64)."""
    from safetensors.torch import load_file

    from idflux.engine.iresnet import IResNet, IResNetConfig

    folder = Path(root) / "recognizer"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layers"] = tuple(cfg["layers"])
    net = IResNet(IResNetConfig(**cfg))
    net.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ (b) text + SigLIP

def stage_text(root: Path, seed: int = 12) -> dict:
    """Seeded-random text encoders, their tokenizers and the SigLIP-branch stand-in, saved as files."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from idflux.engine.faces import SiglipFaceEncoder
    from idflux.engine.loading import char_tokenizer

    t0 = time.time()
    clip_tok, t5_tok = char_tokenizer(77), char_tokenizer(WORLD["text_tokens"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                            bos_token_id=0, eos_token_id=2, pad_token_id=0))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16))
        siglip = SiglipFaceEncoder.tiny(hidden_size=32, num_tokens=16)
    written = []
    for name, obj in (("text_encoder", clip), ("tokenizer", clip_tok), ("text_encoder_2", t5), ("tokenizer_2", t5_tok)):
        _save_pretrained(obj, root / name)
        written += _files(root / name)
    folder = root / "siglip"
    _save_pretrained(siglip.model, folder)
    siglip.processor.save_pretrained(str(folder))
    written += _files(folder)
    return _record(root, "text", {"seed": seed, "steps": 0, "trained": False,
                                  "note": "seeded random and frozen (FLUX never trains its text encoders); the SigLIP "
                                          "stand-in is a seeded random one-layer tower on 64-pixel face crops",
                                  "wall_s": round(time.time() - t0, 1)}, written)


# ------------------------------------------------------------------------------------------ (c) VAE

def vae_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
                         sample_size=WORLD["size"], mid_block_add_attention=False)


def _face_weight(n: int, size: int, boxes: list) -> torch.Tensor:
    w = torch.ones(n, 1, size, size)
    for i, bs in enumerate(boxes):
        for x0, y0, x1, y1 in bs:
            w[i, :, max(int(y0), 0):int(math.ceil(y1)), max(int(x0), 0):int(math.ceil(x1))] = 4.0
    return w


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR (dB) of images in [-1, 1]."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def stage_vae(root: Path, steps: int = 1200, seed: int = 13, crop: int = 80, batch: int = 12) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    imgs, boxes, _, _, _ = render_scenes(identities("train"), _n(2400), seed, 0xB1)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    w_all = _face_weight(len(imgs), WORLD["size"], boxes)
    himgs, _, _, _, _ = render_scenes(identities("heldout"), _n(64), seed, 0xB2)
    hx = torch.from_numpy(himgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    S = WORLD["size"]
    vae.train()
    for step in range(steps):
        rows = torch.randint(0, len(x_all), (batch,), generator=g)
        oy, ox = (torch.randint(0, (S - crop) // 8 + 1, (2,), generator=g) * 8).tolist()
        x = x_all[rows, :, oy:oy + crop, ox:ox + crop]
        w = w_all[rows, :, oy:oy + crop, ox:ox + crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        err = (rec - x)
        loss = (w * (err.abs() + err.pow(2))).mean() / w.mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i:i + 32]).latent_dist.mode() for i in range(0, min(256, len(x_all)), 32)])
        shift, scale = float(lat.mean()), float(1 / lat.std())
        rec = torch.cat([vae.decode(vae.encode(hx[i:i + 16]).latent_dist.mode()).sample for i in range(0, len(hx), 16)])
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
    p = psnr(rec.clamp(-1, 1), hx)
    metrics = {"psnr_db_mean": float(p.mean()), "psnr_db_min": float(p.min()), "heldout_scenes": len(hx)}
    _log(f"vae held-out: {metrics}, shift {shift:.4f} scale {scale:.4f}")
    _save_pretrained(vae, root / "vae")
    return _record(root, "vae", {"seed": seed, "steps": steps, "batch": batch, "crop": crop, "heldout": metrics,
                                 "shift_factor": shift, "scaling_factor": scale, "wall_s": round(time.time() - t0, 1)},
                   _files(root / "vae"))


# ---------------------------------------------------------------------------------- (d) transformer

def transformer_model():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=32,
                                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                                  guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def _text_parts(root: Path):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).eval()
    t5 = T5EncoderModel.from_pretrained(str(root / "text_encoder_2"), local_files_only=True).eval()
    clip_tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    t5_tok = AutoTokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True)
    return clip, clip_tok, t5, t5_tok


@torch.no_grad()
def encode_prompts(root: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    clip, clip_tok, t5, t5_tok = _text_parts(root)
    states, pooled = [], []
    for i in range(0, len(prompts), 256):
        p = prompts[i:i + 256]
        ids = clip_tok(p, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        pooled.append(clip(ids).pooler_output)
        ids = t5_tok(p, padding="max_length", max_length=WORLD["text_tokens"], truncation=True, return_tensors="pt").input_ids
        states.append(t5(ids).last_hidden_state)
    return torch.cat(states), torch.cat(pooled)


def load_vae(root: Path = ASSETS):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(Path(root) / "vae"), local_files_only=True).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 32):
        x = torch.from_numpy(images[i:i + 32]).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = vae.encode(x).latent_dist.mode()
        out.append((lat - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)


def stage_transformer(root: Path, steps: int = 4000, seed: int = 14, batch: int = 16, n_scenes: int = 6000,
                      lr: float = 1e-3, ema_decay: float = 0.999) -> dict:
    from idflux.engine.flux import image_ids, pack_latents
    from idflux.engine.sampling import sampling_mu
    from idflux.losses import noisy_latents, sample_timesteps

    t0 = time.time()
    torch.manual_seed(seed)
    imgs, _, _, _, captions = render_scenes(identities("train"), _n(n_scenes), seed, 0xC1)
    vae = load_vae(root)
    x0_all = pack_latents(encode_latents(vae, imgs))
    del imgs
    txt_all, pooled_all = encode_prompts(root, captions)
    _log(f"transformer: {len(x0_all)} scenes encoded ({time.time() - t0:.0f} s); tokens {tuple(x0_all.shape[1:])}")
    model = transformer_model()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    S = WORLD["size"]
    h = S // 16
    img_ids = image_ids(h, h)
    txt_ids = torch.zeros(WORLD["text_tokens"], 3)
    mu = sampling_mu(S, S)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(0, len(x0_all), (batch,), generator=g)
        x0 = x0_all[rows]
        noise = torch.randn(x0.shape, generator=g)
        t = sample_timesteps(batch, mu, generator=g)
        x_t = noisy_latents(x0, noise, t)
        v = model(hidden_states=x_t, encoder_hidden_states=txt_all[rows], pooled_projections=pooled_all[rows],
                  timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, p in model.state_dict().items():
                ema[k].mul_(d).add_(p, alpha=1 - d)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            _log(f"transformer step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    model.load_state_dict(ema)
    model.eval()
    _save_pretrained(model, root / "transformer")
    return _record(root, "transformer", {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay,
                                         "scenes": n_scenes, "target": "velocity (noise - x0), FLUX-shifted t",
                                         "final_loss_mean_last_200": float(np.mean(losses[-200:])),
                                         "wall_s": round(time.time() - t0, 1)}, _files(root / "transformer"))


# ------------------------------------------------------------------------------------------- driver

def build(root: Path = ASSETS, stages=STAGES, force: bool = False, steps: dict | None = None) -> dict:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = steps or {}
    fns = {"recognizer": stage_recognizer, "text": stage_text, "vae": stage_vae, "transformer": stage_transformer}
    if "adapters" in stages:
        from idflux.train.tiny_world_adapters import stage_adapters

        fns["adapters"] = stage_adapters
    for stage in stages:
        if stage not in fns:
            raise ValueError(f"--stages: unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    for stage in stages:
        if stage in load_manifest(root)["stages"] and not force:
            _log(f"{stage}: done already (manifest), skipped; --force rebuilds it")
            continue
        _log(f"{stage}: building")
        kw = {"steps": steps[stage]} if stage in steps else {}
        info = fns[stage](root, **kw)
        _log(f"{stage}: done in {info['wall_s']} s")
    return load_manifest(root)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idflux.train.tiny_world",
                                     description="Build (train from scratch) or evaluate the tiny world.")
    sub = parser.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="train every tiny-world model (resumable by stage)")
    b.add_argument("--out", default=str(ASSETS), help=f"world folder (default {ASSETS})")
    b.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    b.add_argument("--force", action="store_true", help="rebuild stages the manifest lists as done")
    b.add_argument("--steps", action="append", default=[], metavar="STAGE=N", help="override a stage's step count")
    b.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    b.add_argument("--smoke", action="store_true", help="2%% of the data (checks the build end to end; not a world to ship)")
    e = sub.add_parser("eval", help="evaluate the shipped world on the held-out MultiID-Bench")
    e.add_argument("--world", default=str(ASSETS))
    e.add_argument("--out", default="idflux/bench_perf/results/tiny_world")
    e.add_argument("--cases", type=int, default=60, help="bench cases (1-4 held-out people each)")
    e.add_argument("--threads", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "eval", "demo", "-h", "--help"):
        argv = ["build", *argv]  # plain `python -m idflux.train.tiny_world [options]` builds
    d = sub.add_parser("demo", help="train an adapter on the shipped world through the four-phase trainer, "
                                    "then write the loss plot, a held-out sample sheet and summary.json")
    d.add_argument("--out", default="runs/tiny", help="run folder (replaced)")
    d.add_argument("--steps", type=int, default=180, help="optimizer steps over the four phases (default 180)")
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--samples", type=int, default=240, help="synthetic training samples to write (default 240)")
    d.add_argument("--identities", type=int, default=200, help="training identities they show (default 200)")
    d.add_argument("--world", default=None, help=f"world folder (default the shipped {ASSETS})")
    d.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "build":
        steps = {}
        for item in args.steps:
            name, _, n = item.partition("=")
            if name not in STAGES or not n.isdigit():
                parser.error(f"--steps {item!r}: expected STAGE=N with STAGE in {', '.join(STAGES)}")
            steps[name] = int(n)
        global DATA_SCALE
        if args.smoke:
            DATA_SCALE = 0.02
        build(Path(args.out), [s for s in args.stages.split(",") if s], args.force, steps)
        return 0
    if args.cmd == "demo":
        from idflux.train.tiny_world_adapters import run_demo

        run_demo(Path(args.out), steps=args.steps, batch_size=args.batch_size, n_samples=args.samples,
                 n_identities=args.identities, world=Path(args.world) if args.world else None)
        return 0
    from idflux.train.tiny_world_eval import evaluate_world

    evaluate_world(Path(args.world), Path(args.out), n_cases=args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
