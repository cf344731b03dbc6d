"""Baselines without a foundation model: a small CNN trained from scratch on the source domain,
and a prior that knows only where each class tends to be.

Notebook 00 trains :class:`TinySegNet` on ToyWorld's ``synthetic`` domain and tests it on every
target: the domain gap every later method tries to close. It is deliberately ordinary (a
DeepLab-style encoder with BatchNorm, a dilated context block and a linear classifier), so the gap
it shows is the one a standard supervised segmenter has.

Notebook 01 sets :class:`PositionPrior` beside its linear probes and nearest-neighbour test: street
scenes put sky on top and road at the bottom, so position alone scores something, and a feature
is only shown to carry more than position when it beats this floor.

Dimension glossary: B batch, C channels, K classes, H W image size, h w feature size (H/8, W/8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lessons.classes import NUM_CLASSES

__all__ = [
    "PositionPrior",
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


class PositionPrior(nn.Module):
    """Position only: at each pixel, the log-frequency of each class there in labelled images.

    It never looks at the image: ``forward`` returns the same logits (B, K, H, W) for every input,
    so its mIoU is what position alone explains. :meth:`fit` counts the classes at every pixel of
    the labels it is given (255 ignored), with add-one smoothing.
    """

    def __init__(self, size: tuple[int, int], num_classes: int = NUM_CLASSES):
        super().__init__()
        self.size = tuple(size)
        self.register_buffer("logits", torch.zeros(num_classes, *self.size))   # (K, H, W)

    @torch.no_grad()
    def fit(self, pairs: Sequence, num_images: int | None = None) -> PositionPrior:
        """Count classes per pixel over the first ``num_images`` (image, label) pairs of
        ``pairs`` (a dataset or a list; all of them by default); returns self."""
        n = len(pairs) if num_images is None else num_images
        if not 0 < n <= len(pairs):
            raise ValueError(f"num_images must be in 1..{len(pairs)}, not {num_images}")
        k = self.logits.shape[0]
        counts = torch.ones(k + 1, *self.size)                     # (K + 1, H, W), +1 smoothing
        for i in range(n):
            label = torch.as_tensor(pairs[i][1]).long()            # (H, W)
            if tuple(label.shape) != self.size:
                raise ValueError(f"label {i} is {tuple(label.shape)}, the prior is {self.size}")
            label = torch.where(label == 255, k, label)            # ignored pixels: bin K
            counts.scatter_add_(0, label[None], torch.ones(1, *self.size))
        self.logits.copy_(counts[:k].log())
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(images.shape[0], -1, -1, -1)    # (B, K, H, W)
