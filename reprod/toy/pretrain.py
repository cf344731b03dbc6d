"""Pretrain the course's toy foundation models on ToyWorld's web world, resumably, in chunks.

    python -m reprod.toy.pretrain vfm --until-done           # train (or resume) the toy VFM
    python -m reprod.toy.pretrain vfm --export --card        # fp16 safetensors + model card
    python -m reprod.toy.pretrain vfm_invariant --until-done # the "invariance taught" contrast
    python -m reprod.toy.pretrain vlm --until-done           # the toy CLIP (reprod.toy.vlm)
    python -m reprod.toy.pretrain diffusion --until-done     # QueryDiff's toy DDPM
                                                             # (reprod.toy.diffusion)
    ... --device cuda                                        # on a GPU (bf16 autocast),
                                                             # batches drawn by data workers

Every model learns from ToyWorld's ``web`` world, the pretraining world that is not the
benchmark: broad content in covered families or random looks (``lessons.toyworld``; never the
source's ``rendered`` family, ``streetview``'s ``mapillary`` family or the painted style).

**Toy VFM** (``toy_vfm`` bundle: timm ViT, patch 8 at 64x128, d192 x 6, 4 registers), trained
self-supervised with **no segmentation labels**, like DINOv2: it learns generic invariances only.
Every step draws scene pairs:

- two views of one web render in **one look** (``p_same_style=1``: never a view of one look
  paired with a view of another), each with its *own* random resized crop and flip and DINOv2's
  photometric augmentations (colour jitter, grayscale, blur; :func:`photometric`);
  :func:`correspondence` says where every patch centre of one view lies in the other, so a
  patch's target is "the same scene point, another crop, another colour jitter";
- the **invariance-taught** contrast (``toy_vfm_invariant``, world 1's recipe on world 2's
  data): the two views are two independently drawn web looks of the same scene (with
  probability ``p_same_style`` = 0.2 the same look), so the model is *told* that a scene point
  is the same under any material, palette, lighting or weather;
- ``objective`` picks the loss on those corresponding patches:

  * ``"vicreg"`` (default): dense VICReg (Bardes et al. 2022; VICRegL's local term with exact
    correspondences): invariance (squared distance to the other view's embedding at the same
    scene point) + variance (every expander dimension keeps a standard deviation of at least 1
    over the batch's patches) + covariance (decorrelated dimensions); student only, the exported
    weights are its EMA. One view of each pair is partly masked (iBOT's masked image modelling,
    :func:`one_view_masked`), so a masked point's embedding is predicted from its context: the
    first VFM trained without masking reached a frozen probe of only 16.0 mIoU on the targets'
    mean (gate G1 needs 10 over a random ViT's 7.3; G2 a 15-point gap to own-label probes, it
    had 10.4), and context is where DINOv2's dense features get their layout;
  * ``"dino_ibot"``: DINOv2's form, an EMA teacher with Sinkhorn-Knopp centring
    (or DINO's running centre, ``centering="ema"``), a DINO loss on the CLS token across styles
    and an iBOT loss where the (masked) student predicts the other style's teacher distribution
    at each corresponding patch;
  * ``"nce"``: dense InfoNCE, the other style's teacher patch at the same scene point against
    every patch of the batch except the same scene's near neighbours; ``"dino_ibot_nce"`` adds
    it to DINO + iBOT.

**Why VICReg.** The CPU pilots (32 pairs a step, 2 cores; gate targets mean mIoU of a linear
probe, random-init ViT 9.9): DINO + iBOT with the *same* crop in both views collapsed to a uniform
teacher, and with independent crops and Sinkhorn-Knopp it stayed near log K after 125 steps (a
random ViT's tokens are too alike for the teacher to say anything); InfoNCE with the same crop
reached 10.8 after 600 steps (it can read the answer off the position embedding or a per-scene
code), with independent crops and in-scene negatives 12.0 after 400; DINO + iBOT + NCE 15.8 after
1,800 steps; dense VICReg 14.7 after 400 steps, the fastest learner, and it asks for nothing a
segmentation probe does not want (same-class patches may share an embedding; instance-level
NCE must tell them apart).

Training state (student, teacher, heads, optimizer, centres, step) is saved atomically under
``--run-dir`` at the end of every chunk; the batch of step ``i`` is drawn from seeds derived from
``(seed, i)``, so a resumed run sees exactly the data an unbroken one would. Matmuls run in
bfloat16 autocast where it is native (``bf16``; ``resumable.bf16_autocast_pays``): 1.6x faster
on an AMX Xeon; an AVX2-only CPU trains in fp32 instead (emulated bfloat16 made a step 27x
slower there).

Dimension glossary: B batch (pairs), C width, N tokens, M masked patches, K prototypes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lessons import toyworld as tw
from lessons.backbones import WEIGHTS_DIR, Encoder, build_encoder, get_bundle
from lessons.utils import hardware
from reprod.toy.resumable import ResumableRun, card_facts, write_card_files

__all__ = [
    "INVARIANT_P_SAME",
    "OBJECTIVES",
    "OBJECTIVE_TEXT",
    "RUN_DIR",
    "DINOHead",
    "SSLNet",
    "VFMConfig",
    "VFMRun",
    "at_corresponding",
    "correspondence",
    "default_workers",
    "dense_nce",
    "dense_vicreg",
    "main",
    "make_batch",
    "masked_mean",
    "one_view_masked",
    "photometric",
    "render_pair",
    "sample_box",
    "sinkhorn_knopp",
    "ssl_losses",
    "teacher_probs",
    "vicreg_terms",
    "write_card",
]

RUN_DIR = Path("runs/pretrain_toy")             # + /vfm, /vlm or /diffusion


@dataclass
class VFMConfig:
    """Hyper-parameters of the toy VFM's self-supervised pretraining."""

    steps: int = 7200                 # try vfm-3's (docs/results/toyworld2_gates.json)
    batch_size: int = 32              # scene pairs per step
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.05
    momentum: float = 0.99            # teacher EMA start, cosine to 1
    prototypes: int = 128             # K of the patch (iBOT) head
    cls_prototypes: int = 64          # K of the CLS (DINO) head
    student_temp: float = 0.1
    teacher_temp: float = 0.07        # after a linear warm-up from ``teacher_temp_start``
    teacher_temp_start: float = 0.04
    teacher_temp_warmup: int = 300
    centering: str = "sinkhorn"       # "sinkhorn" (DINOv2) or "ema" (DINO's running centre)
    sinkhorn_iters: int = 3
    center_momentum: float = 0.9
    mask_ratio: tuple[float, float] = (0.1, 0.5)   # of one view's patches (one_view_masked)
    ibot_weight: float = 1.0
    p_same_style: float = 1.0         # 1: one look per pair (generic); < 1: cross-look pairs
    jitter: bool = True               # DINOv2's colour jitter, grayscale and blur per view
    crop_scale: tuple[float, float] = (0.3, 1.0)
    min_overlap: float = 0.3          # of a view's patches that must see the other view's crop
    grad_clip: float = 3.0
    objective: str = "vicreg"         # one of OBJECTIVES (see the module docstring)
    nce_temp: float = 0.2
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)   # invariance, variance, cov.
    expander_dim: int = 512
    bf16: bool = True                 # bfloat16 autocast where native (bf16_autocast_pays)
    seed: int = 0
    toyworld_version: str = field(default=tw.TOYWORLD_VERSION)


OBJECTIVES = ("vicreg", "dino_ibot", "nce", "dino_ibot_nce")
INVARIANT_P_SAME = 0.2                # the invariance-taught contrast: 80% cross-look pairs


# ----------------------------------------------------------------------------------------------
# Data: two styles of one scene, two crops, and where their patches meet
# ----------------------------------------------------------------------------------------------
def render_pair(seed_words: list[int], cfg: VFMConfig, size=tw.DEFAULT_SIZE
                ) -> tuple[np.ndarray, np.ndarray]:
    """Two (3, H, W) renders of one web scene: one look (generic), or with probability
    ``1 - p_same_style`` two independently drawn looks (invariance taught)."""
    rng = np.random.default_rng(seed_words)
    raster = tw.rasterize(tw.draw_scene(rng, "web"), size)
    style_a = tw.sample_style("web", rng)
    a = tw.stylize(raster, style_a, rng)
    if rng.random() < cfg.p_same_style:
        return a, a
    return a, tw.stylize(raster, tw.sample_style("web", rng), rng)


_GREY = torch.full((3,), 3 ** -0.5)


def _hue_rotation(angle: float) -> torch.Tensor:
    """(3, 3) rotation of RGB about the grey axis by ``angle`` radians (a hue shift)."""
    k = torch.tensor([[0.0, -_GREY[2], _GREY[1]], [_GREY[2], 0.0, -_GREY[0]],
                      [-_GREY[1], _GREY[0], 0.0]])                     # cross-product matrix
    return (math.cos(angle) * torch.eye(3) + math.sin(angle) * k
            + (1 - math.cos(angle)) * torch.outer(_GREY, _GREY))


def photometric(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """DINOv2's per-view photometric augmentations on a (3, H, W) view in [0, 1]: colour jitter
    (brightness, contrast, saturation 0.4, hue 0.1) with p 0.8, grayscale p 0.2, blur p 0.5."""
    x = view
    if rng.random() < 0.8:
        b, c, s = rng.uniform(0.6, 1.4, 3)
        x = x * float(b)
        mean = x.mean()
        x = (x - mean) * float(c) + mean
        grey = x.mean(0, keepdim=True)
        x = grey + (x - grey) * float(s)
        x = torch.einsum("ij,jhw->ihw", _hue_rotation(rng.uniform(-0.1, 0.1) * 2 * math.pi), x)
    if rng.random() < 0.2:
        x = x.mean(0, keepdim=True).expand(3, -1, -1)
    if rng.random() < 0.5:
        x = F.avg_pool2d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return x.clamp(0, 1)


def sample_box(rng: np.random.Generator, cfg: VFMConfig) -> np.ndarray:
    """A random resized crop with the image's aspect ratio, and a flip.

    Returns (top, left, height, width, flip) in scene units (fractions of the full image).
    """
    side = math.sqrt(rng.uniform(*cfg.crop_scale))
    top, left = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
    return np.array([top, left, side, side, float(rng.random() < 0.5)], np.float32)


def correspondence(box_s: torch.Tensor, box_t: torch.Tensor, h: int, w: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each patch centre of view s lies in view t.

    box_s, box_t: (B, 5) boxes from :func:`sample_box`. Returns ``grid`` (B, h, w, 2), view t's
    coordinates in [-1, 1] for ``F.grid_sample(..., align_corners=False)``, and ``valid``
    (B, h*w), true where the patch centre falls inside view t's crop.
    """
    v = (torch.arange(h, device=box_s.device) + 0.5) / h             # (h,) view-s rows
    u = (torch.arange(w, device=box_s.device) + 0.5) / w             # (w,) view-s columns
    v, u = torch.meshgrid(v, u, indexing="ij")                        # (h, w)

    def unflip(coord: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        flip = box[:, 4, None, None] > 0.5
        return torch.where(flip, 1 - coord, coord)

    scene_u = box_s[:, 1, None, None] + unflip(u, box_s) * box_s[:, 3, None, None]  # (B, h, w)
    scene_v = box_s[:, 0, None, None] + v * box_s[:, 2, None, None]
    t_u = (scene_u - box_t[:, 1, None, None]) / box_t[:, 3, None, None]
    t_v = (scene_v - box_t[:, 0, None, None]) / box_t[:, 2, None, None]
    valid = (t_u >= 0) & (t_u <= 1) & (t_v >= 0) & (t_v <= 1)        # (B, h, w)
    grid = torch.stack([2 * unflip(t_u, box_t) - 1, 2 * t_v - 1], dim=-1)
    return grid, valid.flatten(1)


def _overlap(box_a: np.ndarray, box_b: np.ndarray) -> float:
    """Fraction of box a's area inside box b (flips do not matter)."""
    dy = max(0.0, min(box_a[0] + box_a[2], box_b[0] + box_b[2]) - max(box_a[0], box_b[0]))
    dx = max(0.0, min(box_a[1] + box_a[3], box_b[1] + box_b[3]) - max(box_a[1], box_b[1]))
    return dy * dx / (box_a[2] * box_a[3])


def _cut(img: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Crop a (3, H, W) render to ``box``, resize it back to ``size``, flip it if asked."""
    h, w = img.shape[-2:]
    y, x = round(box[0] * h), round(box[1] * w)
    ch, cw = max(round(box[2] * h), 8), max(round(box[3] * w), 8)
    view = torch.from_numpy(img)[None, :, y:y + ch, x:x + cw]           # (1, 3, ch, cw)
    view = F.interpolate(view, size=size, mode="bilinear", align_corners=False)[0]
    return view.flip(-1) if box[4] > 0.5 else view


def make_batch(step: int, cfg: VFMConfig, size=tw.DEFAULT_SIZE
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's batch: views a and b (B, 3, H, W), each with its own crop and flip, and
    their boxes (B, 5) in scene units. The two crops overlap by at least ``cfg.min_overlap``.
    """
    views_a, views_b, boxes_a, boxes_b = [], [], [], []
    for k in range(cfg.batch_size):
        words = [cfg.seed, 7, step, k]
        a, b = render_pair(words, cfg, size)
        rng = np.random.default_rng([*words, 1])
        box_a = sample_box(rng, cfg)
        for _ in range(20):                              # resample b until the crops overlap
            box_b = sample_box(rng, cfg)
            if min(_overlap(box_a, box_b), _overlap(box_b, box_a)) >= cfg.min_overlap:
                break
        else:
            box_b = box_a.copy()
        view_a, view_b = _cut(a, box_a, size), _cut(b, box_b, size)
        if cfg.jitter:
            view_a, view_b = photometric(view_a, rng), photometric(view_b, rng)
        views_a.append(view_a)
        views_b.append(view_b)
        boxes_a.append(box_a)
        boxes_b.append(box_b)
    return (torch.stack(views_a), torch.stack(views_b),
            torch.from_numpy(np.stack(boxes_a)), torch.from_numpy(np.stack(boxes_b)))


# ----------------------------------------------------------------------------------------------
# Model: backbone + DINO head (CLS) + iBOT head (patches) + dense projection (NCE)
# ----------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (K logits)."""

    def __init__(self, dim: int, prototypes: int, hidden: int = 384, bottleneck: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, prototypes, bias=False))
        g = self.last.parametrizations.weight.original0       # DINO's norm_last_layer: the
        g.data.fill_(1.0)                                      # prototypes stay unit vectors,
        g.requires_grad_(False)                                # so logits are cosines in [-1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))            # (..., K)


class SSLNet(nn.Module):
    """Encoder + DINO head (CLS) + iBOT head (patches) + a dense projection (NCE)."""

    def __init__(self, encoder: Encoder, prototypes: int, cls_prototypes: int,
                 dense_dim: int = 128, expander_dim: int = 512):
        super().__init__()
        self.encoder = encoder
        self.cls_head = DINOHead(encoder.width, cls_prototypes)
        self.patch_head = DINOHead(encoder.width, prototypes)
        self.dense = nn.Sequential(nn.Linear(encoder.width, 256), nn.GELU(),
                                   nn.Linear(256, dense_dim))
        e = expander_dim                                               # VICReg's expander
        self.expander = nn.Sequential(nn.Linear(encoder.width, e), nn.BatchNorm1d(e), nn.ReLU(),
                                      nn.Linear(e, e), nn.BatchNorm1d(e), nn.ReLU(),
                                      nn.Linear(e, e))
        self.mask_token = nn.Parameter(torch.zeros(encoder.width))

    def expand(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, P, C) -> VICReg embeddings (B, P, E), BatchNorm over all patches."""
        B, P, C = patches.shape
        return self.expander(patches.reshape(B * P, C)).reshape(B, P, -1)

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normed CLS (B, C) and patch tokens (B, h*w, C)."""
        enc = self.encoder
        _, x, _ = enc.forward_tokens(enc.normalize(images), mask=mask,
                                     mask_token=self.mask_token if mask is not None else None)
        x = enc.final_norm(x)                                          # (B, N, C)
        return x[:, 0], x[:, enc.num_prefix_tokens:]

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls, patches = self.tokens(images, mask)
        dense = F.normalize(self.dense(patches), dim=-1)               # (B, h*w, D)
        return self.cls_head(cls), self.patch_head(patches), dense     # (B, K'), (B, h*w, K)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """DINOv2's teacher centring: soft assignments (N, K) whose prototypes are equally used.

    Alternately normalise the prototype marginals to 1/K and the sample marginals to 1/N
    (Cuturi's Sinkhorn-Knopp on exp(logits / temp)); each returned row sums to 1. Equal use of
    the prototypes is what keeps the teacher from collapsing to one prototype or to uniform.
    """
    q = torch.softmax(logits.float().flatten(0, -2) / temp, dim=-1).T   # (K, N), stable exp
    q = q / q.sum()
    K, N = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / K                          # prototypes: 1/K each
        q = q / q.sum(dim=0, keepdim=True) / N                          # samples: 1/N each
    return (q * N).T.reshape(logits.shape)                              # (..., K), rows sum 1


def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float, cfg: VFMConfig
                  ) -> torch.Tensor:
    """Centred and sharpened teacher distribution, by Sinkhorn-Knopp or a running centre."""
    if cfg.centering == "sinkhorn":
        return sinkhorn_knopp(logits, temp, cfg.sinkhorn_iters)
    return F.softmax((logits - center) / temp, dim=-1)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, P) over the patches where ``valid`` (B, P) holds (0 if there are none)."""
    return (x * valid).sum() / valid.sum().clamp(min=1)


def at_corresponding(t_map: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample view t's per-patch vectors (B, h*w, D) where view s's patches lie: (B, h*w, D)."""
    B, _, D = t_map.shape
    h, w = grid.shape[1:3]
    t = t_map.transpose(1, 2).reshape(B, D, h, w)                       # (B, D, h, w)
    s = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return s.flatten(2).transpose(1, 2)                                 # (B, h*w, D)


def dense_nce(z: torch.Tensor, z_t: torch.Tensor, grid: torch.Tensor, valid: torch.Tensor,
              temp: float, exclude: float = 1.5) -> torch.Tensor:
    """Cross-style dense InfoNCE over every patch of the batch.

    z: (B, P, D) unit student vectors of one style's views; z_t: (B, P, D) unit teacher vectors
    of the other style's views on their own grids; grid (B, h, w, 2) and valid (B, P) from
    :func:`correspondence`. The positive of patch p is the teacher's vector at the scene point
    p shows (sampled bilinearly); the negatives are all teacher patches of all scenes, except
    those of the same scene within ``exclude`` patches of that point. Negatives inside the same
    scene rule out a per-scene code shared by all its patches; different crops of the two views
    rule out reading the answer off the position embedding.
    """
    B, P, D = z.shape
    h, w = grid.shape[1:3]
    pos = F.normalize(at_corresponding(z_t, grid), dim=-1)             # (B, P, D)
    l_pos = (z * pos).sum(-1, keepdim=True)                            # (B, P, 1)
    l_neg = torch.einsum("bpd,nd->bpn", z, z_t.reshape(B * P, D))      # (B, P, B*P)
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h * 2 - 1,
                            (torch.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    dx = (grid[..., 0].reshape(B, P, 1) - xs.reshape(1, 1, P)) * w / 2  # (B, P, P) in patches
    dy = (grid[..., 1].reshape(B, P, 1) - ys.reshape(1, 1, P)) * h / 2
    near = dx ** 2 + dy ** 2 < exclude ** 2                             # same scene, too close
    same = torch.eye(B, dtype=torch.bool)[:, None, :, None]             # (B, 1, B, 1)
    drop = (same & near[:, :, None, :]).reshape(B, P, B * P)
    logits = torch.cat([l_pos, l_neg.masked_fill(drop, float("-inf"))], -1) / temp
    ce = torch.logsumexp(logits, -1) - logits[..., 0]                  # (B, P)
    return masked_mean(ce, valid)


def vicreg_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms over all patches of z (B, P, E).

    Variance: a hinge keeping every dimension's standard deviation at 1 or more (no collapse).
    Covariance: the squared off-diagonal covariances / E (no redundant dimensions).
    """
    x = z.reshape(-1, z.shape[-1]).float()                              # (B*P, E)
    x = x - x.mean(0)
    std = torch.sqrt(x.var(0) + 1e-4)
    variance = F.relu(1 - std).mean()
    cov = x.T @ x / (x.shape[0] - 1)                                    # (E, E)
    off = cov - torch.diag(torch.diag(cov))
    return variance, off.pow(2).sum() / x.shape[-1]


def dense_vicreg(z_a: torch.Tensor, z_b: torch.Tensor, grid_ab: torch.Tensor,
                 grid_ba: torch.Tensor, valid_ab: torch.Tensor, valid_ba: torch.Tensor,
                 weights: tuple[float, float, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Dense VICReg across styles (Bardes et al., ICLR 2022; VICRegL's local term, NeurIPS 2022,
    with exact correspondences instead of nearest neighbours).

    z_a, z_b: (B, P, E) expanded patch embeddings of the two views. Invariance is the mean
    squared distance between each patch and the other view's embedding at the same scene point
    (both directions, gradients through both); variance and covariance are taken per view.
    """
    inv_ab = (z_a - at_corresponding(z_b, grid_ab)).pow(2).mean(-1)    # (B, P)
    inv_ba = (z_b - at_corresponding(z_a, grid_ba)).pow(2).mean(-1)
    inv = 0.5 * (masked_mean(inv_ab, valid_ab) + masked_mean(inv_ba, valid_ba))
    var_a, cov_a = vicreg_terms(z_a)
    var_b, cov_b = vicreg_terms(z_b)
    var, cov = 0.5 * (var_a + var_b), 0.5 * (cov_a + cov_b)
    lam, mu, nu = weights
    return lam * inv + mu * var + nu * cov, {"inv": inv.item(), "var": var.item(),
                                             "cov": cov.item()}


def one_view_masked(B: int, P: int, cfg: VFMConfig, step: int, device: torch.device
                    ) -> torch.Tensor | None:
    """Masked image modelling inside dense VICReg (iBOT's idea, Zhou et al., ICLR 2022): in each
    pair one view (a in even pairs, b in odd) has a ratio U(``mask_ratio``) of its patches
    replaced by the mask token, so its embedding at a masked scene point must be predicted from
    the context to match the other, unmasked view. None when ``mask_ratio`` is (0, 0)."""
    if cfg.mask_ratio[1] <= 0:
        return None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    ratio = torch.empty(2 * B, 1).uniform_(*cfg.mask_ratio, generator=g)
    mask = torch.rand(2 * B, P, generator=g) < ratio                   # (2B, P)
    pair = torch.arange(2 * B) % B
    masked_view = torch.where(pair % 2 == 0, torch.arange(2 * B) < B, torch.arange(2 * B) >= B)
    return (mask & masked_view[:, None]).to(device)


def _teacher_temp(step: int, cfg: VFMConfig) -> float:
    t = min(step / max(cfg.teacher_temp_warmup, 1), 1.0)
    return cfg.teacher_temp_start + t * (cfg.teacher_temp - cfg.teacher_temp_start)


def ssl_losses(student: SSLNet, teacher: SSLNet, batch: tuple[torch.Tensor, ...],
               centers: dict[str, torch.Tensor], cfg: VFMConfig, step: int
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Each view's student against the other style's teacher: DINO (CLS), iBOT (patches, at
    the corresponding locations of the other crop) and/or the dense cross-style InfoNCE.
    """
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; choose from {OBJECTIVES}")
    if cfg.centering not in ("sinkhorn", "ema"):
        raise ValueError(f"unknown centering {cfg.centering!r}; choose sinkhorn or ema")
    view_a, view_b, box_a, box_b = batch
    B = view_a.shape[0]
    views = torch.cat([view_a, view_b])                                # (2B, 3, H, W)
    grid_size = (views.shape[-2] // student.encoder.patch_size,
                 views.shape[-1] // student.encoder.patch_size)
    # view a's patches look up view b, and b's look up a
    grid_ab, valid_ab = correspondence(box_a, box_b, *grid_size)
    grid_ba, valid_ba = correspondence(box_b, box_a, *grid_size)
    if cfg.objective == "vicreg":                                      # no teacher needed
        mask = one_view_masked(B, grid_size[0] * grid_size[1], cfg, step, views.device)
        z = student.expand(student.tokens(views, mask)[1]).float()     # (2B, P, E)
        return dense_vicreg(z[:B], z[B:], grid_ab, grid_ba, valid_ab, valid_ba,
                            cfg.vicreg_weights)
    with torch.no_grad():
        t_cls, t_patch, t_dense = teacher(views)                       # (2B, K'), (2B, P, K), ..
    P = t_patch.shape[1]
    grid, valid = torch.cat([grid_ab, grid_ba]), torch.cat([valid_ab, valid_ba])   # (2B, ..)
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])     # the other style's view
    temp = _teacher_temp(step, cfg)
    parts: dict[str, float] = {}
    total = torch.zeros(())
    if cfg.objective == "nce":
        _, _, s_dense = student(views)
    else:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        ratio = torch.empty(2 * B, 1).uniform_(*cfg.mask_ratio, generator=g)
        mask = torch.rand(2 * B, P, generator=g) < ratio               # (2B, P)
        s_cls, s_patch, s_dense = student(views, mask=mask)
        q_cls = teacher_probs(t_cls, centers["cls"], temp, cfg)[swap]              # (2B, K')
        q_patch = teacher_probs(t_patch, centers["patch"], temp, cfg)              # (2B, P, K)
        q_patch = at_corresponding(q_patch[swap], grid)                # at s's patch centres
        dino = -(q_cls * F.log_softmax(s_cls / cfg.student_temp, -1)).sum(-1).mean()
        ce = -(q_patch * F.log_softmax(s_patch / cfg.student_temp, -1)).sum(-1)   # (2B, P)
        ibot = masked_mean(ce, valid)
        if cfg.centering == "ema":
            with torch.no_grad():
                m = cfg.center_momentum
                centers["cls"].mul_(m).add_(t_cls.mean(0), alpha=1 - m)
                centers["patch"].mul_(m).add_(t_patch.mean((0, 1)), alpha=1 - m)
        total = dino + cfg.ibot_weight * ibot
        parts |= {"dino": dino.item(), "ibot": ibot.item(),
                  "entropy": -(q_patch * q_patch.clamp_min(1e-12).log()).sum(-1).mean().item(),
                  "used": _prototypes_used(q_patch)}
    if cfg.objective in ("nce", "dino_ibot_nce"):
        t_dense = t_dense[swap]
        nce = 0.5 * (dense_nce(s_dense[:B], t_dense[:B], grid_ab, valid_ab, cfg.nce_temp)
                     + dense_nce(s_dense[B:], t_dense[B:], grid_ba, valid_ba, cfg.nce_temp))
        total = total + nce
        parts["nce"] = nce.item()
    return total, parts


def _prototypes_used(q: torch.Tensor) -> float:
    """Perplexity of the mean assignment: how many prototypes the teacher really uses."""
    p = q.reshape(-1, q.shape[-1]).mean(0)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def _momentum(step: int, cfg: VFMConfig) -> float:
    t = min(step / max(cfg.steps, 1), 1.0)
    return 1 - (1 - cfg.momentum) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------
# The resumable run
# ----------------------------------------------------------------------------------------------
class VFMRun(ResumableRun):
    """Student, EMA teacher, optimizer and centres of one pretraining run."""

    name = "vfm"

    def __init__(self, cfg: VFMConfig, run_dir: str | Path, device: str | None = None,
                 bundle: str = "toy_vfm"):
        super().__init__(cfg, run_dir, device)
        self.bundle = bundle
        torch.manual_seed(cfg.seed)
        self.student = SSLNet(build_encoder(bundle), cfg.prototypes, cfg.cls_prototypes,
                              expander_dim=cfg.expander_dim).to(self.device)
        self.teacher = SSLNet(build_encoder(bundle), cfg.prototypes, cfg.cls_prototypes,
                              expander_dim=cfg.expander_dim).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.model = self.student
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.centers = {"cls": torch.zeros(cfg.cls_prototypes, device=self.device),
                        "patch": torch.zeros(cfg.prototypes, device=self.device)}

    def state_modules(self) -> dict:
        return {"student": self.student, "teacher": self.teacher, "opt": self.opt,
                "centers": self.centers}

    def data(self) -> Callable[[int], tuple[torch.Tensor, ...]]:
        return partial(make_batch, cfg=self.cfg)

    def loss(self, step: int, batch: tuple[torch.Tensor, ...]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        batch = tuple(t.to(self.device) for t in batch)
        return ssl_losses(self.student, self.teacher, batch, self.centers, self.cfg, step)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = _momentum(step, self.cfg)                                  # the EMA teacher
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def export(self, path: Path | None = None) -> Path:
        """The teacher's backbone as fp16 safetensors loadable by its bundle."""
        from safetensors.torch import save_file

        path = Path(path or WEIGHTS_DIR / get_bundle(self.bundle).weights)
        state = {k: v.half().contiguous().cpu()
                 for k, v in self.teacher.encoder.vit.state_dict().items()}
        save_file(state, str(path), metadata={"toyworld_version": self.cfg.toyworld_version,
                                              "steps": str(self.step)})
        return path


OBJECTIVE_TEXT = {
    "vicreg": "dense VICReg: invariance between the embeddings of the same scene point in the two "
              "views, plus variance and covariance terms against collapse",
    "dino_ibot": "DINO on the CLS token and iBOT on corresponding patches, EMA teacher with "
                 "Sinkhorn-Knopp centring",
    "nce": "dense InfoNCE against every other patch of the batch",
    "dino_ibot_nce": "DINO + iBOT + dense InfoNCE",
}


def _views_text(cfg: VFMConfig) -> str:
    if cfg.p_same_style >= 1:
        return ("two views of one web render in **one look**, each with its own crop, flip and "
                "DINOv2's photometric augmentations (colour jitter, grayscale, blur): generic "
                "invariances only, never a view of one look paired with a view of another")
    cross = 100 * (1 - cfg.p_same_style)
    return (f"two views of one web scene in two independently drawn looks ({cross:.0f}% of the "
            "pairs; the rest share one), each with its own crop, "
            "flip and photometric augmentations: the model is *told* that a scene point is the "
            "same under any material, palette, lighting or weather")


def write_card(run: VFMRun, probe: dict | None, weights: Path) -> Path:
    """A toy VFM's model card beside its weights (markdown, and the facts as JSON)."""
    from lessons.train import domain_table
    from reprod.toy.resumable import data_lines, gate_section

    generic = run.bundle == "toy_vfm"
    facts = card_facts(run, run.bundle, weights) | {"probe": probe}
    n_params = sum(p.numel() for p in run.teacher.encoder.vit.parameters())
    title = "toy VFM" if generic else "toy VFM, invariance taught (the contrast)"
    lines = [
        f"# Model card: {title} (`{run.bundle}`)", "",
        "A DINOv2-style ViT for ToyWorld: timm `VisionTransformer`, patch 8 at 64x128, width 192,",
        f"6 blocks, 3 heads, 4 registers, LayerScale 0.1 ({n_params:,} parameters), fp16.", "",
        "## Training", "",
        f"Self-supervised, **no segmentation labels** (`python -m reprod.toy.pretrain "
        f"{'vfm' if generic else 'vfm_invariant'}`): {_views_text(run.cfg)}; objective "
        f"`{run.cfg.objective}`: {OBJECTIVE_TEXT[run.cfg.objective]}. The weights are the EMA "
        "of the trained network.", "",
        f"- steps: {run.step} of {run.cfg.steps}, batch {run.cfg.batch_size} scene pairs, lr "
        f"{run.cfg.lr}, bf16 autocast where native {run.cfg.bf16}",
        f"- wall time: {run.seconds / 60:.1f} min on {facts['hardware']}",
        f"- seed: {run.cfg.seed}; ToyWorld {run.cfg.toyworld_version}; sha256 "
        f"{facts['sha256'][:16]}...",
        *data_lines("ToyWorld's `web` world (broad content: every shape variant, wide class "
                    "frequencies and cameras; looks: the urban, dashcam and suburban families or "
                    "a random family, any weather, sun and shadows)"), ""]
    if generic:
        lines += gate_section(("G1", "G2", "G3"), weights)
    if probe:
        lines += ["## Measured: a linear probe on the frozen features", "",
                  "mIoU (%) of a BatchNorm + 1x1 conv probe, 300 steps x 16 on `synthetic` only,",
                  "200 test scenes per domain (`python -m reprod.toy.gates`):", "",
                  "```", domain_table(probe), "```", ""]
    return write_card_files(facts, lines, weights)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["vfm", "vfm_invariant", "vlm", "diffusion"])
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="where the run state lives (default: runs/pretrain_toy/<model>)")
    ap.add_argument("--chunk-minutes", type=float, default=9.0)
    ap.add_argument("--until-done", action="store_true", help="chain chunks until finished")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--p-same-style", type=float, default=None, help="VFM only")
    ap.add_argument("--objective", choices=OBJECTIVES, default=None, help="VFM only")
    ap.add_argument("--export", action="store_true", help="write the fp16 weights and stop")
    ap.add_argument("--card", action="store_true",
                    help="measure the weights and write the model card beside them: with "
                         "--export, of the weights it writes; alone, of those already at --out "
                         "(a re-export can differ in its header's bytes, so the card of a "
                         "measured file is written for that file)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where --export writes (default: lessons/weights/<bundle weights>)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--workers", type=int, default=None,
                    help="data processes rendering batches ahead (default: 0 on the CPU, all "
                         "cores but one up to 15 on a GPU); the same batches either way")
    args = ap.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or RUN_DIR / args.model
    if args.model in ("vfm", "vfm_invariant"):
        cfg = VFMConfig() if args.model == "vfm" else VFMConfig(p_same_style=INVARIANT_P_SAME)
        for key in ("p_same_style", "objective"):
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
        bundle = "toy_vfm" if args.model == "vfm" else "toy_vfm_invariant"
        run: ResumableRun = VFMRun(cfg, run_dir, args.device, bundle)
    elif args.model == "vlm":
        from reprod.toy.vlm import VLMConfig, VLMRun

        run = VLMRun(VLMConfig(), run_dir, args.device)
    else:
        from reprod.toy.diffusion import DiffusionConfig, DiffusionRun

        run = DiffusionRun(DiffusionConfig(), run_dir, args.device)
    if args.steps is not None:
        run.cfg.steps = args.steps
    try:
        resumed = run.load()
    except ValueError as e:         # a foreign, damaged or not weights-only state: one line
        ap.exit(2, f"error: {e}\n")
    print(f"{'resumed at step ' + str(run.step) if resumed else 'new run'} "
          f"({run.cfg.steps} steps, {hardware()})", flush=True)
    if args.card and not args.export:
        if args.out is None or not args.out.is_file():
            ap.exit(2, f"error: --card alone writes the card of the weights at --out; "
                       f"{args.out} is not a file (add --export to write them first)\n")
        print(f"wrote {_measure_and_card(run, args.out)}", flush=True)
        return 0
    if args.export:
        path = run.export(args.out)
        print(f"wrote {path} (step {run.step})")
        (run_dir / f"{run.name}_log.json").write_text(json.dumps(run.log, indent=1))
        if args.card:
            print(f"wrote {_measure_and_card(run, path)}", flush=True)
        return 0
    workers = args.workers if args.workers is not None else default_workers(run.device)
    while True:
        run.train_chunk(args.chunk_minutes, workers=workers)
        print(f"saved {run.ckpt} at step {run.step} ({run.seconds / 60:.1f} min in all)",
              flush=True)
        if run.step >= run.cfg.steps or not args.until_done:
            return 0


def default_workers(device: torch.device) -> int:
    """Data workers for a run on ``device``: none on the CPU (its cores train the model), all
    cores but one, up to 15, on a GPU (there the renderer is the bottleneck of a toy step)."""
    return 0 if device.type == "cpu" else max(min((os.cpu_count() or 1) - 1, 15), 0)


def _measure_and_card(run: ResumableRun, weights: Path) -> Path:
    """Write the card beside exported weights: the gates recorded for them (run
    ``python -m reprod.toy.gates`` first) and each model's own measurement (the VFMs' probes,
    the VLM's retrieval, crops and zero-shot maps, the teacher's layout probes). A card already
    beside the very same file (same SHA-256) lends its measurement: rewriting a card's text
    does not re-measure (the teacher's takes a quarter of an hour on 2 cores)."""
    from reprod.toy.resumable import sha256

    card = weights.with_suffix(".json")
    earlier = json.loads(card.read_text()) if card.is_file() else {}
    if earlier.get("sha256") != sha256(weights):
        earlier = {}
    elif earlier:
        print(f"reusing the measurements of {card} (the same weights)", flush=True)
    if run.name == "diffusion":
        from reprod.toy import diffusion

        probe = earlier.get("layout_probe") or diffusion.layout_probe(weights)
        return diffusion.write_card(run, probe, weights)
    if isinstance(run, VFMRun):
        from reprod.toy.gates import probe_table

        return write_card(run, earlier.get("probe") or probe_table(weights), weights)
    from reprod.toy.vlm import measure
    from reprod.toy.vlm import write_card as write_vlm_card

    return write_vlm_card(run, earlier.get("measured") or measure(weights), weights)


def main(argv: list[str] | None = None) -> int:
    with tw.in_world(tw.TOYWORLD_VERSION):       # the toy models are made in the newest world
        return _main(argv)

if __name__ == "__main__":
    raise SystemExit(main())
