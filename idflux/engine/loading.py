"""Local-path loading of FLUX.1-dev's parts, offline-safe, and the tiny random preset built in code.

Real weights come from a diffusers-format folder (``black-forest-labs/FLUX.1-dev`` layout:
``transformer/``, ``vae/``, ``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` +
``tokenizer_2/`` (T5-XXL)), optionally with the transformer from a single BFL file
(``flux1-dev.safetensors``). Every file is checked before a loader runs: offline, transformers
can return a useless tokenizer instead of raising, so a missing file is a clear error naming it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch

FLUX_SOURCE = "the Hugging Face repo black-forest-labs/FLUX.1-dev (diffusers layout)"

# Files each part needs: any one of each inner tuple.
_REQUIRED = {
    "transformer": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors",)),
    "text_encoder": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "text_encoder_2": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer_2": (("tokenizer.json", "spiece.model"),),
}


def require_files(root: str | Path, part: str) -> Path:
    """``root/part`` with the files its loader reads, or FileNotFoundError naming what is missing."""
    folder = Path(root) / part
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: FLUX weights must be a local folder from {FLUX_SOURCE}")
    for options in _REQUIRED[part]:
        if not any((folder / name).is_file() for name in options):
            raise FileNotFoundError(f"{folder} lacks {' or '.join(options)} (from {FLUX_SOURCE}); nothing is downloaded offline")
    return folder


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


def load_flux(root: str | Path, *, transformer_file: str | Path | None = None, dtype=torch.bfloat16,
              max_text_tokens: int = 512) -> FluxParts:
    """Load FLUX.1-dev from a local diffusers folder (optionally the transformer from a BFL file)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = Path(root)
    if transformer_file is not None:
        transformer_file = Path(transformer_file)
        if not transformer_file.is_file():
            raise FileNotFoundError(f"{transformer_file} not found (flux1-dev.safetensors from {FLUX_SOURCE})")
        config = require_files(root, "transformer")
        transformer = FluxTransformer2DModel.from_single_file(str(transformer_file), config=str(config), torch_dtype=dtype,
                                                              local_files_only=True)
    else:
        transformer = FluxTransformer2DModel.from_pretrained(require_files(root, "transformer"), torch_dtype=dtype,
                                                             local_files_only=True)
    vae = AutoencoderKL.from_pretrained(require_files(root, "vae"), torch_dtype=dtype, local_files_only=True)
    clip = CLIPTextModel.from_pretrained(require_files(root, "text_encoder"), torch_dtype=dtype, local_files_only=True)
    clip_tok = AutoTokenizer.from_pretrained(require_files(root, "tokenizer"), local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(require_files(root, "text_encoder_2"), torch_dtype=dtype, local_files_only=True)
    t5_tok = AutoTokenizer.from_pretrained(require_files(root, "tokenizer_2"), local_files_only=True)
    parts = FluxParts(transformer, vae, clip, clip_tok, t5, t5_tok, max_text_tokens)
    for m in (transformer, vae, clip, t5):
        m.requires_grad_(False).eval()
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
