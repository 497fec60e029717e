"""CLIP-I (generated vs GT image) and CLIP-T (generated image vs prompt) with a local transformers CLIP.

The released evaluation uses ``openai/clip-vit-base-patch16``: L2-normalised projected features, plain
cosine (no x100, no clamp), prompts truncated to 77 tokens. Pass the folder of a downloaded copy
(``huggingface-cli download openai/clip-vit-base-patch16 --local-dir DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ClipScorer:
    """CLIP image / text features from a local folder (config, weights, tokenizer, preprocessor).

    Args:
        path: folder in the transformers layout. Missing files are a FileNotFoundError naming them
            (an offline transformers may otherwise build a useless tokenizer silently).
        device: torch device for the model (default "cpu").
    """

    def __init__(self, path, device: str | torch.device = "cpu"):
        folder = Path(path).expanduser()
        hint = "download openai/clip-vit-base-patch16 (the released evaluation's CLIP) into a folder and pass it"
        if not folder.is_dir():
            raise FileNotFoundError(f"clip: {folder} is not a folder; {hint}")
        missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
        if not any((folder / name).is_file() for name in _WEIGHTS):
            missing.append(" or ".join(_WEIGHTS[::2]))
        if not ((folder / "tokenizer.json").is_file()
                or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
            missing.append("tokenizer.json (or vocab.json + merges.txt)")
        if missing:
            raise FileNotFoundError(f"clip: {folder} lacks {', '.join(missing)}; {hint}")
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        self.name = folder.name

    @torch.no_grad()
    def image_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(n, d) L2-normalised float32 features of RGB uint8 (H, W, 3) images, on the CPU."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        # vision tower + projection directly: get_image_features returns a tensor or an output object
        # depending on the transformers version.
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) L2-normalised float32 features of prompts (truncated to 77 tokens), on the CPU."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        pooled = self.model.text_model(**tokens).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()

    def clip_i(self, image_a: np.ndarray, image_b: np.ndarray) -> float:
        """Cosine of the CLIP features of two images."""
        feats = self.image_features([image_a, image_b])
        return float(feats[0] @ feats[1])

    def clip_t(self, image: np.ndarray, text: str) -> float:
        """Cosine of the CLIP features of an image and a prompt."""
        return float(self.image_features([image])[0] @ self.text_features([text])[0])
