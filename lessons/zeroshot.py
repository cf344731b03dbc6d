"""Zero-shot segmentation with a CLIP: MaskCLIP's dense trick, the starting point of CAT-Seg.

CLIP is trained to match a *whole* image with a caption; its patch tokens are not trained to say
what is where. MaskCLIP (Zhou et al., ECCV 2022) noticed that the last block's query-key
attention is what mixes every patch into a global summary: replacing that block by its value path
(``v`` -> output projection -> MLP), then the final norm and image projection, gives each patch an
embedding in the joint image-text space. Its cosine with each class prompt's text embedding is a
zero-shot score map, no segmentation labels involved. CAT-Seg starts from exactly these scores
(its cost volume) and learns to aggregate them.

Dimension glossary: B batch, K classes, D joint embedding width, h w token grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lessons.backbones import Encoder
from lessons.classes import CLASSES
from lessons.text import CATSEG_TEMPLATE, encode_text

__all__ = [
    "MaskCLIPSegmenter",
]


class MaskCLIPSegmenter(nn.Module):
    """Frozen CLIP -> per-patch embeddings (MaskCLIP form) -> cosine with class prompts.

    ``encoder`` wraps an OpenAI-style open_clip CLIP (``build_encoder("toy_vlm", ...)``); the text
    embeddings come from the same open_clip model (``encoder.model``). Output: logits (B, K, h, w),
    cosines times ``scale`` (CLIP's logit scale by default), so ``lessons.train.evaluate`` scores it
    like any segmenter.
    """

    def __init__(self, encoder: Encoder, class_names: Sequence[str] = CLASSES,
                 template: str = CATSEG_TEMPLATE, scale: float | None = None):
        super().__init__()
        if encoder.bundle.kind != "vlm":
            raise ValueError(f"{encoder.bundle.name} has no text tower: MaskCLIP needs a CLIP")
        self.encoder = encoder.freeze().eval()
        prompts = [template.format(name) for name in class_names]
        self.register_buffer("text", encode_text(encoder.model, prompts), persistent=False)
        if scale is None:
            scale = float(encoder.model.logit_scale.exp()) if hasattr(encoder.model,
                                                                       "logit_scale") else 100.0
        self.scale = scale

    @torch.no_grad()
    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """Unit per-patch embeddings (B, D, h, w) of images (B, 3, H, W) in [0, 1]."""
        enc = self.encoder
        _, before_last, grid = enc.forward_tokens(enc.normalize(images), blocks=enc.depth - 1)
        z = enc.dense_embedding(None, grid, form="maskclip", before_last=before_last)
        return F.normalize(z, dim=1)                                   # (B, D, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.dense(images)                                         # (B, D, h, w)
        return self.scale * torch.einsum("bdhw,kd->bkhw", z, self.text)   # (B, K, h, w)
