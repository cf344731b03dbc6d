"""Baselines without a foundation model: a small CNN trained from scratch on the source domain.

Notebook 00 trains :class:`TinySegNet` on ToyWorld's ``synthetic`` domain and tests it on every
target: the domain gap every later method tries to close. It is deliberately ordinary (a
DeepLab-style encoder with BatchNorm, a dilated context block and a linear classifier), so the gap
it shows is the one a standard supervised segmenter has.

Dimension glossary: B batch, C channels, K classes, H W image size, h w feature size (H/8, W/8).
"""

from __future__ import annotations

import torch
from torch import nn

from lessons.classes import NUM_CLASSES

__all__ = [
    "TinySegNet",
    "conv_bn_relu",
]


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinySegNet(nn.Module):
    """A from-scratch segmenter: stride-8 encoder, dilated context, 1x1 classifier.

    Input images (B, 3, H, W) in [0, 1]; output logits (B, K, H/8, W/8) (``lessons.train``
    resizes them to the label size).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (32, 64, 96),
                 context: int = 128):
        super().__init__()
        layers, c = [], 3
        for w in widths:                      # one stride-2 stage per width: stride 2**len
            layers += [conv_bn_relu(c, w, stride=2), conv_bn_relu(w, w)]
            c = w
        self.encoder = nn.Sequential(*layers)
        self.context = nn.Sequential(         # growing receptive field at stride 8
            conv_bn_relu(c, context, dilation=2), conv_bn_relu(context, context, dilation=4))
        self.classifier = nn.Conv2d(context, num_classes, 1)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = (images - self.mean) / self.std      # (B, 3, H, W)
        x = self.context(self.encoder(x))         # (B, C, h, w)
        return self.classifier(x)                 # (B, K, h, w)
