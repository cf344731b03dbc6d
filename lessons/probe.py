"""Linear probing: what does a frozen encoder's patch feature already know about the classes?

The DGSS papers freeze their foundation models because the frozen features already generalise:
Rein's Table 1 shows a *frozen* DINOv2-L with a decoder beating every earlier DGSS method. The
cheapest way to measure that on ToyWorld is a linear probe: a 1x1 convolution from the frozen
patch features (B, C, h, w) to class logits at the token stride, trained on the source only, then
scored on every target. The same probe on a random-init encoder and a from-scratch model bracket
the result.

Dimension glossary: B batch, C width, K classes, h w token grid, H W image size.
"""

from __future__ import annotations

import torch
from torch import nn

from lessons.backbones import Encoder
from lessons.classes import NUM_CLASSES

__all__ = [
    "LinearProbe",
]


class LinearProbe(nn.Module):
    """A frozen :class:`~lessons.backbones.Encoder` and a trainable 1x1 classifier.

    Input images (B, 3, H, W) in [0, 1] (the encoder's own normalisation is applied); output
    logits (B, K, h, w) at the patch stride (``lessons.train`` resizes them to the labels).
    ``layer=None`` probes the final normed tokens; an int probes that block's output.
    """

    def __init__(self, encoder: Encoder, num_classes: int = NUM_CLASSES,
                 layer: int | None = None):
        super().__init__()
        if layer is not None and not 0 <= layer < encoder.depth:
            raise ValueError(f"layer {layer} outside 0..{encoder.depth - 1}")
        self.encoder = encoder.freeze().eval()
        self.layer = layer
        self.norm = nn.BatchNorm2d(encoder.width, affine=False)     # standardise the features
        self.head = nn.Conv2d(encoder.width, num_classes, kernel_size=1)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()            # frozen means frozen: no dropout, no statistics updates
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen patch features (B, C, h, w)."""
        enc = self.encoder
        blocks = None if self.layer is None else self.layer + 1
        _, x, grid = enc.forward_tokens(enc.normalize(images), blocks=blocks)   # (B, N, C)
        if self.layer is None:
            x = enc.final_norm(x)
        return enc.patch_map(x, grid)                             # (B, C, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images)))        # (B, K, h, w)
