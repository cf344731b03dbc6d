"""Training-time augmentation of the DGSS recipes: random flip and photometric distortion.

Rein, tqdm and MFuser all train with mmseg's ``RandomFlip(p=0.5)`` and ``PhotoMetricDistortion``
after their resize/crop. The distortion is the only thing in those pipelines that changes an
image's *look*; on ToyWorld, where the domains differ by look, it is part of the method's recipe,
not a domain-randomisation trick (the style sampler of notebook 00's exercise is that).

``photometric_distortion`` follows mmseg's order and ranges, on images in [0, 1]:

1. brightness (p 0.5): add a uniform delta in [-32, 32] / 255;
2. contrast (p 0.5): multiply by a uniform factor in [0.5, 1.5] -- here or after step 4 (a coin);
3. saturation (p 0.5): HSV saturation times a uniform factor in [0.5, 1.5];
4. hue (p 0.5): HSV hue shifted by an integer in [-18, 18] on OpenCV's 0..180 scale (±36°);

with clipping to [0, 1] after each step. :func:`augment_batch` draws the same distributions for a
whole batch at once in torch (one HSV round trip per batch instead of one per image): the toy
sweep's training loop uses it (``TrainConfig.augment``). Dimension glossary: B batch, H W image
size.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from torch.utils.data import Dataset

__all__ = [
    "Augmented",
    "augment_batch",
    "hsv_to_rgb_torch",
    "photometric_distortion",
    "rgb_to_hsv_torch",
]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on one float image (3, H, W) in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W), got shape {image.shape}")
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = np.clip(img + rng.uniform(-32, 32) / 255.0, 0.0, 1.0)
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.random() < 0.5:
        img = np.clip(img * rng.uniform(0.5, 1.5), 0.0, 1.0)
    sat, hue = rng.random() < 0.5, rng.random() < 0.5
    if sat or hue:
        hsv = rgb_to_hsv(img.transpose(1, 2, 0))                              # (H, W, 3)
        if sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0.0, 1.0)
        if hue:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19) / 180.0) % 1.0
        img = hsv_to_rgb(hsv).transpose(2, 0, 1).astype(np.float32)           # (3, H, W)
    if not contrast_first and rng.random() < 0.5:
        img = np.clip(img * rng.uniform(0.5, 1.5), 0.0, 1.0)
    return img


class Augmented(Dataset):
    """A (image, label) dataset with random horizontal flip and/or photometric distortion.

    Draws are a function of (seed, epoch-free item index, a per-access counter), so a run is
    reproducible for a given seed and order of access.
    """

    def __init__(self, dataset: Dataset, flip: bool = True, photometric: bool = True,
                 seed: int = 0):
        self.dataset, self.flip, self.photometric, self.seed = dataset, flip, photometric, seed
        self._draws = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        self._draws += 1
        rng = np.random.default_rng([self.seed, int(index), self._draws])
        if self.flip and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = torch.from_numpy(photometric_distortion(image.numpy(), rng))
        return image, label

    def __repr__(self) -> str:
        return (f"Augmented({self.dataset!r}, flip={self.flip}, photometric={self.photometric}, "
                f"seed={self.seed})")


def rgb_to_hsv_torch(rgb: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> HSV (B, 3, H, W), hue in [0, 1) (matplotlib's convention)."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(1)
    delta = v - rgb.min(1).values
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    d = delta.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, torch.remainder(h / 6, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb_torch(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (B, 3, H, W) -> RGB (B, 3, H, W)."""
    h, s, v = hsv.unbind(1)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=hsv.device).view(1, 3, 1, 1)
                        + 6 * h[:, None], 6.0)
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0.0, 1.0)


def augment_batch(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  flip: bool = True, photometric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipes' random flip and mmseg's PhotoMetricDistortion for a batch (B, 3, H, W) in
    [0, 1] with labels (B, H, W): every image draws its own coins and values, from the same
    distributions as :func:`photometric_distortion` (draws from ``generator``, on the CPU)."""
    B = images.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:                       # (B, 1, 1, 1)
        return (lo + (hi - lo) * torch.rand(B, generator=generator)).view(B, 1, 1, 1).to(images)

    def coin() -> torch.Tensor:
        return (torch.rand(B, generator=generator) < 0.5).view(B, 1, 1, 1).to(images.device)

    if flip:
        f = coin()
        images = torch.where(f, images.flip(-1), images)
        labels = torch.where(f[:, 0], labels.flip(-1), labels)
    if not photometric:
        return images, labels
    x = images.float()
    x = torch.where(coin(), (x + u(-32, 32) / 255).clamp(0, 1), x)             # brightness
    contrast_first = coin()
    do_contrast, factor = coin(), u(0.5, 1.5)
    x = torch.where(contrast_first & do_contrast, (x * factor).clamp(0, 1), x)
    sat, hue = coin(), coin()
    sat_f = u(0.5, 1.5)
    shift = (torch.randint(-18, 19, (B,), generator=generator) / 180.0).view(B, 1, 1).to(x)
    hsv = rgb_to_hsv_torch(x)
    hsv[:, 1] = torch.where(sat[:, 0], (hsv[:, 1] * sat_f[:, 0]).clamp(0, 1), hsv[:, 1])
    hsv[:, 0] = torch.where(hue[:, 0], torch.remainder(hsv[:, 0] + shift, 1.0), hsv[:, 0])
    x = torch.where(sat | hue, hsv_to_rgb_torch(hsv), x)
    x = torch.where(~contrast_first & do_contrast, (x * factor).clamp(0, 1), x)
    return x.to(images.dtype), labels
