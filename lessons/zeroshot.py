"""Zero-shot segmentation with a CLIP: MaskCLIP's dense trick, the starting point of CAT-Seg.

CLIP is trained to match a *whole* image with a caption; its patch tokens are not trained to say
what is where. MaskCLIP (Zhou et al., ECCV 2022) noticed that the last block's query-key
attention is what mixes every patch into a global summary: replacing that block by its value path
(``v`` -> output projection -> MLP), then the final norm and image projection, gives each patch an
embedding in the joint image-text space. Its cosine with each class prompt's text embedding is a
zero-shot score map, no segmentation labels involved. CAT-Seg starts from exactly these scores
(its cost volume) and learns to aggregate them.

Region-level zero-shot is the coarser alternative CAT-Seg's introduction argues against
(region-based open-vocabulary segmenters classify crops or mask proposals with CLIP's *global*
embedding): :class:`CropZeroShot` classifies overlapping crops, each resized to the tower's input
size, and lets every pixel average the scores of the crops that cover it. Crop classification,
the raw cost map (MaskCLIP) and CAT-Seg's aggregated cost are the three granularities at which
notebook 04 asks about a class named but never segmented.

Dimension glossary: B batch, K classes, D joint embedding width, h w token grid, n crops per
image, H W image size.
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
    "CropZeroShot",
    "MaskCLIPSegmenter",
    "class_text",
]


def class_text(encoder: Encoder, class_names: Sequence[str], template: str = CATSEG_TEMPLATE,
               scale: float | None = None) -> tuple[torch.Tensor, float]:
    """Unit text embeddings (K, D) of the class prompts and the score scale (default: CLIP's
    own logit scale, 100 where the model has none)."""
    text = encode_text(encoder.model, [template.format(name) for name in class_names])
    if scale is None:
        logit_scale = getattr(encoder.model, "logit_scale", None)
        scale = float(logit_scale.exp()) if logit_scale is not None else 100.0
    return text, scale


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
        text, self.scale = class_text(encoder, class_names, template, scale)
        self.register_buffer("text", text, persistent=False)                  # (K, D)

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


class CropZeroShot(nn.Module):
    """Frozen CLIP -> the global embedding of every crop -> cosine with class prompts, spread back
    over the crop's pixels (the mean over the crops covering a pixel).

    Crops of ``crop`` (h, w) pixels slide by ``stride`` over the image (the last crop of a row or
    column touches the border); each is resized to ``input_size`` (default: the tower's own,
    bilinear) before the tower sees it. Output: logits (B, K, H, W) at the image's size, cosines
    times ``scale`` as in :class:`MaskCLIPSegmenter`.
    """

    def __init__(self, encoder: Encoder, class_names: Sequence[str] = CLASSES,
                 crop: tuple[int, int] = (16, 32), stride: tuple[int, int] = (8, 16),
                 template: str = CATSEG_TEMPLATE, scale: float | None = None,
                 input_size: tuple[int, int] | None = None, batch_size: int = 64):
        super().__init__()
        if encoder.bundle.kind != "vlm":
            raise ValueError(f"{encoder.bundle.name} has no text tower: crop zero-shot needs a "
                             "CLIP")
        if min(*crop, *stride) < 1:
            raise ValueError(f"crop and stride must be positive, got {crop} and {stride}")
        self.encoder = encoder.freeze().eval()
        self.crop, self.stride, self.batch_size = tuple(crop), tuple(stride), batch_size
        self.input_size = tuple(input_size or encoder.bundle.img_size)
        text, self.scale = class_text(encoder, class_names, template, scale)
        self.register_buffer("text", text, persistent=False)                  # (K, D)

    def boxes(self, H: int, W: int) -> list[tuple[int, int]]:
        """(top, left) of every crop of an H x W image."""
        ch, cw = self.crop
        if ch > H or cw > W:
            raise ValueError(f"crops of {self.crop} do not fit images of {(H, W)}")

        def starts(size: int, c: int, s: int) -> list[int]:
            out = list(range(0, size - c + 1, s))
            return out if out[-1] == size - c else [*out, size - c]

        return [(t, left) for t in starts(H, ch, self.stride[0])
                for left in starts(W, cw, self.stride[1])]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        B, _, H, W = images.shape
        (ch, cw), boxes, enc = self.crop, self.boxes(H, W), self.encoder
        crops = torch.stack([images[:, :, t:t + ch, x:x + cw] for t, x in boxes], 1)
        # (B, n, 3, ch, cw) -> every crop at the tower's input size
        crops = F.interpolate(crops.flatten(0, 1), size=self.input_size, mode="bilinear",
                              align_corners=False)                       # (B n, 3, H_in, W_in)
        emb = torch.cat([enc.project(enc.forward_tokens(enc.normalize(part))[1])
                         for part in crops.split(self.batch_size)])      # (B n, D)
        scores = self.scale * F.normalize(emb, dim=-1) @ self.text.T     # (B n, K)
        scores = scores.view(B, len(boxes), -1)                          # (B, n, K)
        out = images.new_zeros(B, scores.shape[-1], H, W)
        cover = images.new_zeros(1, 1, H, W)
        for i, (t, x) in enumerate(boxes):
            out[:, :, t:t + ch, x:x + cw] += scores[:, i, :, None, None]
            cover[:, :, t:t + ch, x:x + cw] += 1
        return out / cover                                               # (B, K, H, W)
