"""Loading FLUX.1-dev's parts from the files users have, offline, and the tiny random preset built in code.

Weight sources (every one local; a Hub id is read from the local Hugging Face cache, never fetched):

- a diffusers folder (``black-forest-labs/FLUX.1-dev`` layout: ``transformer/``, ``vae/``,
  ``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` + ``tokenizer_2/`` (T5-XXL));
- BFL single files: ``flux1-dev.safetensors`` (the transformer under BFL's key names) and
  ``ae.safetensors`` (the autoencoder), with the text encoders from folders (``--clip``, ``--t5``:
  e.g. ``openai/clip-vit-large-patch14`` and a T5-XXL encoder folder, tokenizer inside);
- fp8 single files as distributed for ComfyUI (float8_e4m3fn weights, BFL or diffusers names, an
  optional ``model.diffusion_model.`` prefix, optional per-tensor ``.scale_weight``/``.weight_scale``):
  loaded straight into :class:`idflux.engine.lowvram.Fp8Linear` storage, never upcast;
- a Hub id (``black-forest-labs/FLUX.1-dev``), resolved to its snapshot in the local cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).

Every part is located before anything loads; if some are missing, one :class:`MissingWeightsError`
names them all, each with what provides it and the flag that passes it, on one line.

The transformer is read tensor by tensor from its safetensors (BFL names mapped to diffusers' with
row slices, :func:`bfl_to_diffusers_rules`) into a model built on the meta device; with ``fp8`` each
Linear is quantized as it arrives, so no full-precision copy of the transformer ever exists, on the
CPU or the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

FLUX_REPO = "black-forest-labs/FLUX.1-dev"
FLUX_SOURCE = f"the Hugging Face repo {FLUX_REPO} (diffusers layout)"

# Files each diffusers sub-folder needs: any one of each inner tuple.
_REQUIRED = {
    "transformer": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors",)),
    "text_encoder": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "text_encoder_2": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer_2": (("tokenizer.json", "spiece.model"),),
}

# part -> (what it is, what provides it, the flag that passes it)
PART_HELP = {
    "transformer": ("FLUX transformer", f"flux1-dev.safetensors (BFL or fp8) or the transformer/ folder of {FLUX_REPO}",
                    "--flux DIR|HUB_ID|FILE or --transformer FILE"),
    "vae": ("autoencoder", f"ae.safetensors or the vae/ folder of {FLUX_REPO}", "--flux DIR|HUB_ID or --ae FILE"),
    "clip": ("CLIP-L text encoder + tokenizer",
             f"a folder such as openai/clip-vit-large-patch14, or text_encoder/ + tokenizer/ of {FLUX_REPO}",
             "--flux DIR|HUB_ID or --clip DIR"),
    "t5": ("T5-XXL text encoder + tokenizer", f"a T5-XXL encoder folder, or text_encoder_2/ + tokenizer_2/ of {FLUX_REPO}",
           "--flux DIR|HUB_ID or --t5 DIR"),
}
PARTS = tuple(PART_HELP)


class MissingWeightsError(FileNotFoundError):
    """Some FLUX parts were not found; ``missing`` maps each part to why. The message is one line
    naming every missing part, what provides it and the flag to pass (nothing is downloaded)."""

    def __init__(self, missing: dict[str, str]):
        self.missing = dict(missing)
        items = [f"{part} ({why}; provided by {PART_HELP[part][1]}; pass {PART_HELP[part][2]})" if part in PART_HELP
                 else f"{part} ({why})" for part, why in self.missing.items()]
        super().__init__(f"FLUX weights incomplete, {len(items)} part(s) missing: " + "; ".join(items)
                         + " (offline: nothing is downloaded)")


def _folder_problem(folder: Path, part: str) -> str | None:
    """Why ``folder`` cannot serve as diffusers sub-folder ``part`` (None when it can)."""
    if not folder.is_dir():
        return f"{folder} not found"
    for options in _REQUIRED[part]:
        if not any((folder / name).is_file() for name in options):
            return f"{folder} lacks {' or '.join(options)}"
    return None


def require_files(root: str | Path, part: str) -> Path:
    """``root/part`` with the files its loader reads, or FileNotFoundError naming what is missing."""
    folder = Path(root) / part
    problem = _folder_problem(folder, part)
    if problem:
        raise FileNotFoundError(f"{problem} (from {FLUX_SOURCE}); nothing is downloaded offline")
    return folder


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub lays it
    out: ``models--<org>--<name>/{refs/main, snapshots/<commit>/..., blobs/}``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_hub_id(repo_id: str, *, revision: str = "main") -> Path:
    """The local snapshot folder of Hub repo ``repo_id`` from the cache (never downloads), or
    FileNotFoundError naming the cache it looked in."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends: the repo is not in this cache
        raise FileNotFoundError(f"{repo_id} is not in the local Hugging Face cache {cache} ({type(exc).__name__}); "
                                f"download it on a connected machine (hf download {repo_id}) or pass a local path") from None


def _local(value: str | Path, flag: str) -> tuple[Path | None, str | None]:
    """(path, None) for an existing path or a Hub id found in the cache; (None, why) otherwise."""
    path = Path(value).expanduser()
    if path.exists():
        return path, None
    if isinstance(value, str) and _HUB_ID.match(value) and not value.startswith((".", "/")):
        try:
            return resolve_hub_id(value), None
        except FileNotFoundError as exc:
            return None, f"{flag} {value}: {exc}"
    return None, f"{flag} {value}: no such file or folder, nor a Hub id in the local cache {hub_cache_dir()}"


@dataclass
class WeightSource:
    """Where one part loads from. kind: "diffusers" (a model folder with config.json), "single" (one
    safetensors file, BFL/ComfyUI layout), "transformers" (a text-encoder folder); ``tokenizer``: the
    tokenizer's folder (text encoders); ``config``: a diffusers config folder for a single file."""

    part: str
    kind: str
    path: Path
    tokenizer: Path | None = None
    config: Path | None = None


_SINGLE_TRANSFORMER = ("flux1-dev.safetensors", "flux1-schnell.safetensors", "flux1-dev-fp8.safetensors")


def _resolve_transformer(root: Path | None, value, flag: str) -> tuple[WeightSource | None, str]:
    config = root / "transformer" if root is not None and (root / "transformer" / "config.json").is_file() else None
    if value is not None:
        path, why = _local(value, flag)
        if path is None:
            return None, why
        if path.is_file():
            return WeightSource("transformer", "single", path, config=config), ""
        sub = path / "transformer" if (path / "transformer").is_dir() else path
        why = _folder_problem(sub, "transformer")
        return (None, f"{flag}: {why}") if why else (WeightSource("transformer", "diffusers", sub), "")
    if root is None:
        return None, "no source given"
    why = _folder_problem(root / "transformer", "transformer")
    if why is None:
        return WeightSource("transformer", "diffusers", root / "transformer"), ""
    for name in _SINGLE_TRANSFORMER:
        if (root / name).is_file():
            return WeightSource("transformer", "single", root / name, config=config), ""
    return None, f"{why}, and {root} holds no {' / '.join(_SINGLE_TRANSFORMER)}"


def _resolve_vae(root: Path | None, value, flag: str) -> tuple[WeightSource | None, str]:
    if value is not None:
        path, why = _local(value, flag)
        if path is None:
            return None, why
        if path.is_file():
            return WeightSource("vae", "single", path), ""
        sub = path / "vae" if (path / "vae").is_dir() else path
        why = _folder_problem(sub, "vae")
        return (None, f"{flag}: {why}") if why else (WeightSource("vae", "diffusers", sub), "")
    if root is None:
        return None, "no source given"
    why = _folder_problem(root / "vae", "vae")
    if why is None:
        return WeightSource("vae", "diffusers", root / "vae"), ""
    if (root / "ae.safetensors").is_file():
        return WeightSource("vae", "single", root / "ae.safetensors"), ""
    return None, f"{why}, and {root} holds no ae.safetensors"


def _resolve_text(part: str, root: Path | None, value, flag: str) -> tuple[WeightSource | None, str]:
    enc, tok = ("text_encoder", "tokenizer") if part == "clip" else ("text_encoder_2", "tokenizer_2")
    if value is not None:
        path, why = _local(value, flag)
        if path is None:
            return None, why
        if not path.is_dir():
            return None, f"{flag} {value}: not a folder (a text encoder is a folder with config.json, weights and tokenizer)"
        if (path / enc).is_dir():
            model, tokenizer = path / enc, path / tok
        elif (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
            model, tokenizer = path / "text_encoder", path / "tokenizer"
        else:
            model, tokenizer = path, path
    elif root is None:
        return None, "no source given"
    else:
        model, tokenizer = root / enc, root / tok
    problems = [p for p in (_folder_problem(model, enc), _folder_problem(tokenizer, tok)) if p]
    if problems:
        return None, (f"{flag}: " if value is not None else "") + ", ".join(problems)
    return WeightSource(part, "transformers", model, tokenizer=tokenizer), ""


def resolve_flux_sources(source: str | Path | None = None, *, transformer: str | Path | None = None,
                         ae: str | Path | None = None, clip: str | Path | None = None,
                         t5: str | Path | None = None) -> dict[str, WeightSource]:
    """Locate every FLUX part (no weights are read): ``{"transformer", "vae", "clip", "t5"} -> WeightSource``.

    source: a diffusers folder, a folder of BFL files (``flux1-dev.safetensors``, ``ae.safetensors``),
    a Hub id in the local cache, or a single transformer file. transformer / ae: a single file (BFL,
    fp8) or a diffusers folder, overriding the source's. clip / t5: a text-encoder folder (tokenizer
    inside, or the diffusers ``text_encoder[_2]/`` + ``tokenizer[_2]/`` pair) or a Hub id.
    Raises :class:`MissingWeightsError` naming every part not found, at once.
    """
    missing: dict[str, str] = {}
    root = None
    if source is not None:
        path, why = _local(source, "--flux")
        if path is None:
            missing["transformer"] = why
        elif path.is_file():
            if transformer is not None:
                raise ValueError(f"--flux {source} is a single transformer file and --transformer {transformer} is another; "
                                 "pass one of them")
            transformer = path
        else:
            root = path
    found = {}
    steps = (("transformer", lambda: _resolve_transformer(root, transformer, "--transformer")),
             ("vae", lambda: _resolve_vae(root, ae, "--ae")),
             ("clip", lambda: _resolve_text("clip", root, clip, "--clip")),
             ("t5", lambda: _resolve_text("t5", root, t5, "--t5")))
    for part, resolve in steps:
        if part in missing:
            continue
        src, why = resolve()
        if src is None:
            missing[part] = why
        else:
            found[part] = src
    if missing:
        raise MissingWeightsError({p: missing[p] for p in PARTS if p in missing})
    return found


# --- transformer: safetensors read tensor by tensor, BFL names mapped to diffusers' -----------------

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")


class TensorFile:
    """One or more safetensors files read lazily as one name -> tensor map (ComfyUI's
    ``model.diffusion_model.`` prefix stripped; other prefixed parts of a full checkpoint ignored).
    ``get(name, rows=(a, b))`` reads only those rows; ``scale(name)`` is a weight's fp8 scale or None."""

    def __init__(self, files):
        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[object, str]] = {}
        for file in files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            keys = list(handle.keys())
            prefix = next((p for p in _PREFIXES if any(k.startswith(p + "double_blocks.") or k.startswith(p + "transformer_blocks.")
                                                       for k in keys)), "")
            for k in keys:
                if k.startswith(prefix):
                    self._where[k[len(prefix):]] = (handle, k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def shape(self, name) -> tuple[int, ...]:
        handle, key = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def get(self, name, rows: tuple[int, int] | None = None) -> torch.Tensor:
        handle, key = self._where[name]
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows[0]:rows[1]]

    def scale(self, weight_name: str) -> torch.Tensor | None:
        base = weight_name[:-len(".weight")] if weight_name.endswith(".weight") else weight_name
        for suffix in _SCALE_SUFFIXES:
            if base + suffix in self._where:
                return self.get(base + suffix).float()
        return None


def bfl_to_diffusers_rules(num_layers: int, num_single_layers: int, hidden: int, mlp_hidden: int,
                           guidance: bool = True) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """diffusers name -> (BFL name, rows to take or None, swap the two halves) for a FLUX transformer.

    The same mapping as diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (tested
    against it at FLUX.1-dev's size), but for any width (diffusers' fixes 3072) and expressed as row
    slices, so each tensor is read on its own, and only the rows it needs.
    """
    rules: dict[str, tuple[str, tuple[int, int] | None, bool]] = {}

    def rename(d, b):
        for s in ("weight", "bias"):
            rules[f"{d}.{s}"] = (f"{b}.{s}", None, False)

    embed = {"time_text_embed.timestep_embedder": "time_in", "time_text_embed.text_embedder": "vector_in"}
    if guidance:
        embed["time_text_embed.guidance_embedder"] = "guidance_in"
    for d, b in embed.items():
        rename(f"{d}.linear_1", f"{b}.in_layer")
        rename(f"{d}.linear_2", f"{b}.out_layer")
    rename("context_embedder", "txt_in")
    rename("x_embedder", "img_in")
    h = hidden
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        rename(d + "norm1.linear", b + "img_mod.lin")
        rename(d + "norm1_context.linear", b + "txt_mod.lin")
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            for s in ("weight", "bias"):
                rules[f"{d}attn.{img}.{s}"] = (f"{b}img_attn.qkv.{s}", (j * h, (j + 1) * h), False)
                rules[f"{d}attn.{txt}.{s}"] = (f"{b}txt_attn.qkv.{s}", (j * h, (j + 1) * h), False)
        for dn, bn in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                       ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            rules[f"{d}attn.{dn}.weight"] = (f"{b}{bn}.scale", None, False)
        rename(d + "ff.net.0.proj", b + "img_mlp.0")
        rename(d + "ff.net.2", b + "img_mlp.2")
        rename(d + "ff_context.net.0.proj", b + "txt_mlp.0")
        rename(d + "ff_context.net.2", b + "txt_mlp.2")
        rename(d + "attn.to_out.0", b + "img_attn.proj")
        rename(d + "attn.to_add_out", b + "txt_attn.proj")
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        rename(d + "norm.linear", b + "modulation.lin")
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            for s in ("weight", "bias"):
                rules[f"{d}attn.{name}.{s}"] = (f"{b}linear1.{s}", (j * h, (j + 1) * h), False)
        for s in ("weight", "bias"):
            rules[f"{d}proj_mlp.{s}"] = (f"{b}linear1.{s}", (3 * h, 3 * h + mlp_hidden), False)
        rules[f"{d}attn.norm_q.weight"] = (f"{b}norm.query_norm.scale", None, False)
        rules[f"{d}attn.norm_k.weight"] = (f"{b}norm.key_norm.scale", None, False)
        rename(d + "proj_out", b + "linear2")
    rename("proj_out", "final_layer.linear")
    for s in ("weight", "bias"):
        rules[f"norm_out.linear.{s}"] = (f"final_layer.adaLN_modulation.1.{s}", None, True)
    return rules


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def flux_config_from_bfl(tf: TensorFile) -> dict:
    """The diffusers ``FluxTransformer2DModel`` config of a BFL-named file, read from tensor shapes.
    RoPE axes are not stored in a file: FLUX's (16, 56, 56) scaled to the head width."""
    keys = list(tf.keys())
    hidden, in_channels = tf.shape("img_in.weight")
    head_dim = tf.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0] if "double_blocks.0.img_attn.norm.query_norm.scale" in tf \
        else tf.shape("single_blocks.0.norm.query_norm.scale")[0]
    axes = [a * head_dim / 128 for a in (16, 56, 56)]
    if any(a != int(a) or int(a) % 2 for a in axes) or hidden % head_dim:
        raise ValueError(f"transformer file: head width {head_dim} (hidden {hidden}) has no FLUX RoPE split; "
                         "pass a diffusers transformer/ folder for its config.json")
    mlp_hidden = tf.shape("double_blocks.0.img_mlp.0.weight")[0] if "double_blocks.0.img_mlp.0.weight" in tf else 4 * hidden
    if mlp_hidden != 4 * hidden:
        raise ValueError(f"transformer file: MLP width {mlp_hidden} is not 4 x hidden {hidden} as FLUX's")
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_channels,
        "out_channels": tf.shape("final_layer.linear.weight")[0], "num_layers": _count(keys, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(keys, r"single_blocks\.(\d+)\."), "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim, "joint_attention_dim": tf.shape("txt_in.weight")[1],
        "pooled_projection_dim": tf.shape("vector_in.in_layer.weight")[1], "guidance_embeds": "guidance_in.in_layer.weight" in tf,
        "axes_dims_rope": [int(a) for a in axes],
    }


def _transformer_files(src: WeightSource) -> list[Path]:
    if src.kind == "single":
        return [src.path]
    index = src.path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return sorted({src.path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [src.path / "diffusion_pytorch_model.safetensors"]


def load_transformer(src: WeightSource | str | Path, *, dtype=torch.bfloat16, fp8: bool = False,
                     config: dict | str | Path | None = None):
    """The FLUX transformer from ``src`` (a single BFL/diffusers-named/fp8 file or a diffusers
    folder), built on the meta device and filled tensor by tensor.

    fp8: every Linear becomes an :class:`~idflux.engine.lowvram.Fp8Linear` as its weight is read (fp8
    weights in the file are taken as they are, with their scale; others are quantized per row), so
    the full-precision transformer never exists. Without fp8, fp8 weights are dequantized to ``dtype``.
    Other tensors (biases, norms) are cast to ``dtype``. config: a diffusers config (dict or folder);
    default: the source's ``config.json``, else derived from a BFL file's shapes.
    """
    from diffusers import FluxTransformer2DModel

    from idflux.engine.lowvram import FP8, Fp8Linear, quantize_fp8, store_linears_fp8

    if not isinstance(src, WeightSource):
        path = Path(src)
        src = WeightSource("transformer", "single" if path.is_file() else "diffusers", path)
    with TensorFile(_transformer_files(src)) as tf:
        bfl = "img_in.weight" in tf
        if not bfl and "x_embedder.weight" not in tf:
            raise ValueError(f"{src.path}: not a FLUX transformer (neither BFL names such as img_in.weight nor "
                             "diffusers names such as x_embedder.weight)")
        if config is None:
            config = src.config if src.config is not None else (src.path if src.kind == "diffusers" else None)
        if config is None and not bfl:
            raise ValueError(f"{src.path}: a diffusers-named transformer file needs its config; pass the "
                             f"transformer/ folder of {FLUX_REPO} as --flux")
        if config is None:
            config = flux_config_from_bfl(tf)
        elif not isinstance(config, dict):
            config = dict(FluxTransformer2DModel.load_config(str(config)))
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
        if fp8:
            store_linears_fp8(model)
        cfg = model.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        rules = (bfl_to_diffusers_rules(cfg.num_layers, cfg.num_single_layers, hidden, 4 * hidden, cfg.guidance_embeds)
                 if bfl else None)

        def read(name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
            b, rows, swap = rules[name] if rules is not None else (name, None, False)
            if b not in tf:
                return None
            t, scale = tf.get(b, rows), tf.scale(b)
            if swap:
                half = t.shape[0] // 2
                t = torch.cat([t[half:], t[:half]])
            return t, scale

        state, missing, bad = {}, [], []

        def plain(name: str, t: torch.Tensor, scale) -> torch.Tensor:
            t = t.float() * scale if scale is not None else t
            return t.to(dtype)

        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(module, Fp8Linear):
                got = read(prefix + "weight")
                if got is None:
                    missing.append(prefix + "weight")
                    continue
                w, scale = got
                if tuple(w.shape) != (module.out_features, module.in_features):
                    bad.append(f"{prefix}weight {tuple(w.shape)} vs {(module.out_features, module.in_features)}")
                    continue
                if w.dtype == FP8:
                    q, row_scale = w, (scale if scale is not None else torch.ones(())).float().reshape(-1, 1).expand(w.shape[0], 1)
                else:
                    q, row_scale = quantize_fp8(plain(prefix + "weight", w, scale).float())
                state[prefix + "weight_u8"] = q.contiguous().view(torch.uint8)
                state[prefix + "scale"] = row_scale.contiguous().to(torch.float32)
                if module.bias is not None:
                    got = read(prefix + "bias")
                    if got is None:
                        missing.append(prefix + "bias")
                    else:
                        state[prefix + "bias"] = plain(prefix + "bias", *got)
                continue
            for pname, p in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if isinstance(module, Fp8Linear) or p is None:
                    continue
                got = read(prefix + pname)
                if got is None:
                    missing.append(prefix + pname)
                elif tuple(got[0].shape) != tuple(p.shape):
                    bad.append(f"{prefix}{pname} {tuple(got[0].shape)} vs {tuple(p.shape)}")
                else:
                    state[prefix + pname] = plain(prefix + pname, *got)
    if missing or bad:
        problems = ([f"{len(missing)} tensors missing (e.g. {missing[:3]})"] if missing else []) + \
                   ([f"{len(bad)} with wrong shapes, file vs model (e.g. {bad[:3]})"] if bad else [])
        raise ValueError(f"{src.path} does not match the FLUX transformer config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model


# --- the autoencoder from BFL's ae.safetensors --------------------------------------------------------

def flux_vae_config_from_ae(path: str | Path) -> dict:
    """The diffusers ``AutoencoderKL`` config of a BFL ``ae.safetensors``, read from tensor shapes;
    what a file cannot tell (group-norm groups, latent scale and shift) is FLUX's."""
    with TensorFile([path]) as tf:
        keys = list(tf.keys())
        if "encoder.conv_in.weight" not in tf:
            raise ValueError(f"{path}: not an autoencoder file (no encoder.conv_in.weight); pass FLUX's ae.safetensors")
        n_down = _count(keys, r"encoder\.down\.(\d+)\.")
        return {
            "_class_name": "AutoencoderKL", "in_channels": tf.shape("encoder.conv_in.weight")[1],
            "out_channels": tf.shape("decoder.conv_out.weight")[0], "latent_channels": tf.shape("decoder.conv_in.weight")[1],
            "down_block_types": ["DownEncoderBlock2D"] * n_down, "up_block_types": ["UpDecoderBlock2D"] * n_down,
            "block_out_channels": [tf.shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(n_down)],
            "layers_per_block": _count(keys, r"encoder\.down\.0\.block\.(\d+)\."), "act_fn": "silu", "norm_num_groups": 32,
            "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "force_upcast": True,
            "use_quant_conv": "quant_conv.weight" in tf, "use_post_quant_conv": "post_quant_conv.weight" in tf,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in tf,
        }


def load_vae(src: WeightSource | str | Path, *, dtype=torch.bfloat16):
    """The autoencoder from a diffusers ``vae/`` folder or BFL's ``ae.safetensors`` (diffusers'
    single-file loader, with the config derived here: nothing is fetched)."""
    from diffusers import AutoencoderKL

    if not isinstance(src, WeightSource):
        path = Path(src)
        src = WeightSource("vae", "single" if path.is_file() else "diffusers", path)
    if src.kind == "diffusers":
        return AutoencoderKL.from_pretrained(src.path, torch_dtype=dtype, local_files_only=True)
    config = flux_vae_config_from_ae(src.path)
    with tempfile.TemporaryDirectory(prefix="idflux-vae-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        return AutoencoderKL.from_single_file(str(src.path), config=tmp, torch_dtype=dtype, local_files_only=True)


def _text_encoder(src: WeightSource, cls, dtype):
    from transformers import AutoTokenizer

    model = cls.from_pretrained(src.path, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(src.tokenizer, local_files_only=True)


@dataclass
class FluxParts:
    """The frozen FLUX modules a generation needs."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module
    clip_tokenizer: object
    t5: torch.nn.Module
    t5_tokenizer: object
    max_text_tokens: int = 512


def load_flux(source: str | Path | None = None, *, transformer: str | Path | None = None, ae: str | Path | None = None,
              clip: str | Path | None = None, t5: str | Path | None = None, dtype=torch.bfloat16, device=None,
              fp8: bool = False, fp8_t5: bool = False, max_text_tokens: int = 512,
              transformer_file: str | Path | None = None) -> FluxParts:
    """Load FLUX.1-dev's four parts, offline, from the sources :func:`resolve_flux_sources` takes.

    source: diffusers folder, folder of BFL files, Hub id in the local cache, or a single transformer
    file; transformer / ae / clip / t5 override a part (``transformer_file`` is the older name of
    ``transformer``). Every part is located first: if any are missing, one
    :class:`MissingWeightsError` names them all before any weight is read. fp8: the transformer's
    Linears are stored in float8 as they load (see :func:`load_transformer`). fp8_t5: the T5-XXL
    encoder's Linears too, converted on the CPU (9.5 GB of bf16 -> about 4.8 GB: what lets the text
    stage share a 24 GB GPU with the resident transformer and adapter). device: where all four
    modules go at the end (default: stay on the CPU; the transformer is never on the device in
    full precision when fp8 is set).

    >>> parts = load_flux("black-forest-labs/FLUX.1-dev", fp8=True, device="cuda")  # doctest: +SKIP
    """
    from transformers import CLIPTextModel, T5EncoderModel

    if transformer_file is not None:
        if transformer is not None:
            raise ValueError("load_flux: pass transformer= or transformer_file= (the same thing), not both")
        transformer = transformer_file
    found = resolve_flux_sources(source, transformer=transformer, ae=ae, clip=clip, t5=t5)
    src = found["transformer"]
    if src.kind == "diffusers" and not fp8:
        from diffusers import FluxTransformer2DModel

        flux = FluxTransformer2DModel.from_pretrained(src.path, torch_dtype=dtype, local_files_only=True)
    else:
        flux = load_transformer(src, dtype=dtype, fp8=fp8)
    vae = load_vae(found["vae"], dtype=dtype)
    clip_model, clip_tok = _text_encoder(found["clip"], CLIPTextModel, dtype)
    t5_model, t5_tok = _text_encoder(found["t5"], T5EncoderModel, dtype)
    if fp8_t5:
        from idflux.engine.lowvram import store_linears_fp8

        store_linears_fp8(t5_model)
    parts = FluxParts(flux, vae, clip_model, clip_tok, t5_model, t5_tok, max_text_tokens)
    for m in (flux, vae, clip_model, t5_model):
        m.requires_grad_(False).eval()
        if device is not None:
            m.to(device)
    return parts


# --- the command line's weight options ----------------------------------------------------------------

def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:scale]`` -> (file, scale); scale 1.0 when absent. A Windows drive colon is not a scale."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and not tail.startswith(("\\", "/")):
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _lora_arg(spec: str) -> tuple[str, float]:
    import argparse

    path, scale = parse_lora_spec(spec)
    if not torch.isfinite(torch.tensor(scale)):
        raise argparse.ArgumentTypeError(f"--lora {spec}: the scale must be a finite number")
    return path, scale


def add_weight_arguments(parser) -> None:
    """Add the FLUX weight options to an argparse parser: --flux, --transformer (alias
    --flux-transformer), --ae, --clip, --t5, --fp8, --offload, --group-offload, --lora FILE[:scale]
    (repeatable). :func:`load_parts_from_args` reads them."""
    g = parser.add_argument_group("FLUX weights (local files; a Hub id is read from the local cache, never downloaded)")
    g.add_argument("--flux", metavar="SOURCE",
                   help=f"diffusers folder, folder with flux1-dev.safetensors + ae.safetensors, Hub id in the local "
                        f"cache (e.g. {FLUX_REPO}), or a single transformer file")
    g.add_argument("--transformer", "--flux-transformer", dest="transformer", metavar="FILE",
                   help="transformer from a single file: BFL flux1-dev.safetensors or a ComfyUI fp8 file (overrides --flux)")
    g.add_argument("--ae", metavar="FILE", help="autoencoder from BFL's ae.safetensors or a vae/ folder (overrides --flux)")
    g.add_argument("--clip", metavar="DIR", help="CLIP-L text encoder folder with its tokenizer, e.g. "
                                                 "openai/clip-vit-large-patch14 (overrides --flux)")
    g.add_argument("--t5", metavar="DIR", help="T5-XXL text encoder folder with its tokenizer (overrides --flux)")
    g.add_argument("--fp8", action="store_true",
                   help="low VRAM: transformer and T5 Linears stored in float8, converted on the CPU while loading")
    g.add_argument("--offload", action="store_true", help="low VRAM: text encoders and VAE on the CPU between stages")
    g.add_argument("--group-offload", action="store_true",
                   help="lowest VRAM: the transformer stays on the CPU, one block at a time on the device "
                        "(diffusers group offloading)")
    g.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="LoRA on the FLUX transformer (diffusers/peft or kohya/BFL keys), scale 1 by default (repeat)")


def load_parts_from_args(args, device, dtype=torch.bfloat16) -> FluxParts:
    """FluxParts from the options :func:`add_weight_arguments` added. Every part and LoRA file is
    checked before any weight is read (one :class:`MissingWeightsError` names all that are missing).
    With --fp8 the transformer (and the T5 encoder) are converted on the CPU and only their fp8 form
    reaches ``device``;
    with --group-offload it stays on the CPU with diffusers' group-offload hooks; with --offload
    the text encoders and VAE stay on the CPU (the pipeline moves each for its stage)."""
    from idflux.engine.lowvram import enable_group_offload

    loras = list(getattr(args, "lora", None) or [])
    missing_loras = [p for p, _ in loras if not Path(p).is_file()]
    found_error = None
    try:
        resolve_flux_sources(args.flux, transformer=args.transformer, ae=args.ae, clip=args.clip, t5=args.t5)
    except MissingWeightsError as exc:
        found_error = exc
    if found_error is not None or missing_loras:
        missing = dict(found_error.missing) if found_error else {}
        for p in missing_loras:
            missing[f"--lora {p}"] = "file not found"
        raise MissingWeightsError(missing)
    parts = load_flux(args.flux, transformer=args.transformer, ae=args.ae, clip=args.clip, t5=args.t5, dtype=dtype,
                      fp8=args.fp8, fp8_t5=args.fp8)
    if loras:
        from idflux.engine.lora import load_lora

        for i, (path, scale) in enumerate(loras):
            load_lora(parts.transformer, path, scale=scale, adapter_name=f"lora{i}")
    device = torch.device(device)
    if getattr(args, "group_offload", False) and device.type == "cuda":
        enable_group_offload(parts.transformer, device)
    else:
        parts.transformer.to(device)
    if not getattr(args, "offload", False):
        for m in (parts.vae, parts.clip, parts.t5):
            m.to(device)
    return parts


def char_tokenizer(model_max_length: int):
    """A character-level fast tokenizer built in code (no files): the tiny preset's CLIP/T5 tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = string.ascii_lowercase + string.digits + string.punctuation + " "
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=model_max_length)
    return fast


def tiny_flux_parts(seed: int = 0) -> FluxParts:
    """Random tiny FLUX, VAE (x8, 4 latent channels) and text encoders: the CPU preset, no weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from idflux.engine.flux import tiny_flux_transformer

    torch.manual_seed(seed)
    transformer = tiny_flux_transformer(in_channels=16, seed=seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False)
    clip_tok, t5_tok = char_tokenizer(77), char_tokenizer(64)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    parts = FluxParts(transformer, vae, clip, clip_tok, t5, t5_tok, max_text_tokens=64)
    for m in (transformer, vae, clip, t5):
        m.requires_grad_(False).eval()
    return parts


#: The shipped tiny world (trained by ``python -m idflux.train.tiny_world``), inside the package.
TINY_WORLD = Path(__file__).resolve().parent.parent / "assets" / "tiny"
_TINY_WORLD_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "recognizer", "siglip")


@dataclass
class TinyWorld:
    """The trained tiny world: FLUX parts, the pixel face recogniser, the SigLIP-branch stand-in and
    the adapter sizes that fit them (``adapter_path``: the shipped trained adapter, None if absent)."""

    parts: FluxParts
    recognizer: torch.nn.Module
    siglip: torch.nn.Module
    adapter_config: object
    adapter_path: Path | None
    root: Path
    manifest: dict


def tiny_world_available(root: str | Path | None = None) -> bool:
    """Whether ``root`` (default: the shipped world) holds every part of a built tiny world."""
    root = Path(root) if root is not None else TINY_WORLD
    return (root / "manifest.json").is_file() and all((root / p).is_dir() for p in _TINY_WORLD_PARTS)


def verify_tiny_world(root: str | Path | None = None) -> dict:
    """Check every file the manifest lists against its recorded sha256; returns the manifest.
    Raises FileNotFoundError / ValueError naming the first missing or altered file."""
    import hashlib
    import json

    root = Path(root) if root is not None else TINY_WORLD
    manifest = json.loads((root / "manifest.json").read_text())
    for stage, info in manifest.get("stages", {}).items():
        for rel, rec in info.get("files", {}).items():
            path = root / rel
            if not path.is_file():
                raise FileNotFoundError(f"tiny world: {path} (stage {stage}) is missing; rebuild with "
                                        f"`python -m idflux.train.tiny_world --stages {stage} --force`")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != rec["sha256"]:
                raise ValueError(f"tiny world: {path} does not match its manifest hash (stage {stage}); a Git LFS "
                                 f"pointer or a partial copy? Rebuild with `python -m idflux.train.tiny_world --stages {stage} --force`")
    return manifest


def tiny_world_adapter_config(transformer, recognizer, siglip):
    """Adapter sizes for the world's backbone (width, blocks), recogniser (embedding) and SigLIP stand-in."""
    from idflux.engine.adapter import AdapterConfig

    c = transformer.config
    return AdapterConfig(hidden=c.num_attention_heads * c.attention_head_dim, heads=4, head_dim=16,
                         n_blocks=c.num_layers + c.num_single_layers, arc_dim=recognizer.config.embedding_dim,
                         arc_tokens=8, arc_mlp_ratio=2, siglip_dim=siglip.hidden_size, siglip_tokens=siglip.num_tokens)


def load_tiny_world(root: str | Path | None = None, *, dtype=torch.float32, verify: bool = True) -> TinyWorld:
    """Load the trained tiny world from ``root`` (default: the shipped ``idflux/assets/tiny``) through the
    same loaders as real weights: :func:`load_flux` for the FLUX parts (diffusers layout), safetensors
    for the recogniser, ``SiglipFaceEncoder.from_pretrained`` for the SigLIP stand-in. ``verify``
    checks every file against the manifest's sha256 first."""
    import json

    from safetensors.torch import load_file

    from idflux.engine.faces import SiglipFaceEncoder
    from idflux.engine.iresnet import IResNet, IResNetConfig

    root = Path(root) if root is not None else TINY_WORLD
    if not tiny_world_available(root):
        missing = [p for p in ("manifest.json", *_TINY_WORLD_PARTS) if not (root / p).exists()]
        raise FileNotFoundError(f"tiny world {root} lacks {missing}; build it with `python -m idflux.train.tiny_world`")
    manifest = verify_tiny_world(root) if verify else json.loads((root / "manifest.json").read_text())
    parts = load_flux(root, dtype=dtype, max_text_tokens=int(manifest.get("world", {}).get("text_tokens", 64)))
    cfg = json.loads((root / "recognizer" / "config.json").read_text())
    cfg["layers"] = tuple(cfg["layers"])
    recognizer = IResNet(IResNetConfig(**cfg))
    recognizer.load_state_dict(load_file(str(root / "recognizer" / "model.safetensors")), strict=True)
    recognizer = recognizer.to(dtype).eval().requires_grad_(False)
    siglip = SiglipFaceEncoder.from_pretrained(root / "siglip", dtype=dtype).eval().requires_grad_(False)
    adapter = root / "adapter.safetensors"
    return TinyWorld(parts, recognizer, siglip, tiny_world_adapter_config(parts.transformer, recognizer, siglip),
                     adapter if adapter.is_file() else None, root, manifest)


def tiny_world_pipeline(root: str | Path | None = None, adapter: str | Path | None = None, **kw):
    """(Pipeline, CenterFaceDetector, SiglipFaceEncoder) of the trained tiny world, with ``adapter``
    (an idflux adapter file; default the world's shipped ``adapter.safetensors``). ``kw`` go to
    :class:`idflux.engine.pipeline.Pipeline` (device, backend, offload, fp8, cuda_graph)."""
    from idflux.engine.adapter import IdentityAdapter
    from idflux.engine.faces import CenterFaceDetector
    from idflux.engine.pipeline import Pipeline
    from idflux.engine.weights import load_adapter

    world = load_tiny_world(root)
    path = adapter or world.adapter_path
    if path is None:
        raise FileNotFoundError(f"tiny world {world.root} ships no adapter.safetensors; pass an adapter file")
    net = load_adapter(path)
    if net.cfg != world.adapter_config:
        raise ValueError(f"adapter {path}: its config {net.cfg} does not fit the tiny world ({world.adapter_config})")
    assert isinstance(net, IdentityAdapter)
    return Pipeline(world.parts, net, **kw), CenterFaceDetector(world.recognizer), world.siglip
