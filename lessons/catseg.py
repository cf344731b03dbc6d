"""CAT-Seg (Cho et al., CVPR 2024): cost aggregation over image-text similarities.

CAT-Seg segments by **aggregating a cost volume**, not by decoding features. Everything starts from
one number per (pixel, class): the cosine similarity between CLIP's dense image embedding and the
class's text embedding (the paper's Eq. 1),

    C(i, l) = D^V(i) . D^L(l) / (|D^V(i)| |D^L(l)|)            -> (B, P, T, h, w)

which alone is MaskCLIP's coarse zero-shot segmentation. A small network then refines this volume:

- **cost embedding**: each class's (P, h, w) slice through one 7x7 convolution -> (B, C, T, h, w);
- **spatial aggregation** (per class, weights shared over classes): a pair of Swin blocks, plain
  then shifted windows; queries and keys see [cost; appearance guidance], values the cost only,
  and there is no position bias anywhere (the paper's Eq. 3, with embedding guidance, Eq. 5);
- **class aggregation** (per pixel): a linear-attention transformer over the class axis, without
  positional embeddings, so it is permutation-equivariant over classes and takes any number of
  them; queries and keys see [cost; text guidance] (Eq. 4, 6);
- an **upsampling decoder** per class (two transposed-conv stages, each concatenated with guidance
  from an intermediate CLIP layer) -> one logit map per class (B, T, 4h, 4w).

Training fine-tunes only the query and value projections of **both** CLIP towers; the loss is a
per-pixel sigmoid BCE over classes. At test time any list of class names works: that is the
open-vocabulary property the notebooks use to segment a class never seen in training.

**Following the released code** (cvlab-kaist/CAT-Seg@6d3a188: ``cat_seg/cat_seg_model.py``,
``cat_seg/modeling/transformer/model.py``, ``cat_seg/third_party/model_vpt.py``; the comments below
name the official class or function) and its configs ``vitb_384.yaml`` / ``vitl_336.yaml``, not the
base config: 2 aggregation layers (base: 4), one prompt template ``"A photo of a {} in the scene"``
(base: 80 ImageNet templates), class pooling 2x2 in training and 1x1 at test (base: 6x6), class
padding to 256 tokens. Where code and paper differ we follow the code, the other form a flag:

- the class-aggregation residual adds ``upsample(pool(x) + delta)`` to x (about ``2x + delta`` at
  test): ``class_residual="paper"`` adds ``upsample(delta)``;
- ignored pixels get all-zero targets and stay in the BCE mean in the code; here they are masked out
  by default, and ``official_ignore=True`` keeps the official form;
- the dense image embedding is MaskCLIP's value path with a residual from the CLS token only
  (``lessons.backbones``, form ``"maskclip"``). So the last visual block's q projection, trainable
  and counted in the 25.1M / 70.3M, is never used and never receives a gradient.

Dimension glossary: B batch, T classes, P prompt templates (1), D visual width (768 / 1024),
E joint embedding (512 / 768), C hidden width (128), G guidance width, h w CLIP grid (24 x 24),
H W label size, N tokens in a window, S class tokens after padding (256), n sequences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import Mlp
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from lessons.backbones import Encoder, build_encoder, toy_weights_dir
from lessons.checkpoints import trainable_state_dict
from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from lessons.convert import CATSEG_AGGREGATOR as OFFICIAL_AGGREGATOR
from lessons.convert import CATSEG_CLIP as OFFICIAL_CLIP
from lessons.convert import convert_official_catseg, load_official_catseg
from lessons.segmentor import optimizer_groups
from lessons.text import TEMPLATES, TextEmbeddingCache, format_prompts, text_tower, tokenize

# with the names of the official converter (lessons.convert) this lesson introduces
__all__ = [
    "CATSEG_B",
    "CATSEG_L",
    "FINETUNE_MODES",
    "HELD_OUT_CLASS",
    "OFFICIAL_AGGREGATOR",
    "OFFICIAL_CLIP",
    "TOY_CATSEG",
    "Aggregator",
    "AggregatorLayer",
    "CATSeg",
    "CATSegConfig",
    "ClassAggregation",
    "ClassAttention",
    "DoubleConv",
    "GuidedWindowAttention",
    "SpatialAggregation",
    "SwinBlock",
    "Up",
    "build_toy_catseg",
    "catseg_loss",
    "convert_official_catseg",
    "cost_volume",
    "full_attention",
    "linear_attention",
    "load_official_catseg",
    "set_clip_finetuning",
    "shift_mask",
    "sliding_inference",
    "split_attention_qkv",
    "split_qkv_state_dict",
    "top_classes",
    "trainable_parameter_counts",
]

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CATSegConfig:
    """Sizes of CAT-Seg's aggregator and decoder; defaults are the released ViT-B/16 config."""

    visual_width: int = 768               # D: CLIP visual width (the guidance layers' tokens)
    embed_dim: int = 512                  # E: joint image-text embedding width
    prompts: int = 1                      # P: templates per class (released configs: one)
    hidden: int = 128                     # C: cost-embedding width
    heads: int = 4
    num_layers: int = 2                   # aggregation layers (base config: 4)
    window: int = 12                      # Swin window (shift window // 2)
    mlp_ratio: int = 4
    pooling: tuple[int, int] = (2, 2)     # class-aggregation pooling in training
    eval_pooling: tuple[int, int] = (1, 1)  # ... at test (eval.sh's POOLING_SIZES)
    pad_len: int | None = 256             # class tokens: pad to / keep the top pad_len
    attention: str = "linear"             # class aggregation: linear (released) or full
    cost_kernel: int = 7
    upsample_dims: tuple[int, int] = (256, 128)        # ConvTranspose of the guidance layers
    decoder_guidance_dims: tuple[int, int] = (32, 16)  # their projections, into the decoder
    decoder_dims: tuple[int, int] = (64, 32)           # the two decoder stages' outputs
    guidance_layers: tuple[int, int] = (3, 7)          # visual blocks (0-based) guiding stage 1, 2
    class_residual: str = "code"          # "code": x + up(pool(x) + delta); "paper": x + up(delta)

    def __post_init__(self) -> None:
        if self.attention not in ("linear", "full"):
            raise ValueError(f"attention must be 'linear' or 'full', got {self.attention!r}")
        if self.class_residual not in ("code", "paper"):
            raise ValueError(f"class_residual must be 'code' or 'paper', got "
                             f"{self.class_residual!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        for name in ("upsample_dims", "decoder_guidance_dims", "decoder_dims", "guidance_layers"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} needs two values (one per decoder stage)")
        ins = (self.hidden, self.decoder_dims[0])
        for stage, (c_in, g) in enumerate(zip(ins, self.decoder_guidance_dims, strict=True)):
            if not 0 < g < c_in:
                raise ValueError(f"decoder stage {stage}: guidance {g} must be below its input "
                                 f"width {c_in} (the transposed conv makes the rest)")

    @classmethod
    def from_dict(cls, d: Mapping) -> CATSegConfig:
        """Build from a mapping, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CATSegConfig key(s) {unknown}; known: {sorted(known)}")
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tuples)


CATSEG_B = CATSegConfig()                                               # ViT-B/16 at 384
CATSEG_L = CATSegConfig(visual_width=1024, embed_dim=768, guidance_layers=(7, 15))  # L/14@336
TOY_CATSEG = CATSegConfig(visual_width=192, embed_dim=128, hidden=32, window=4, pad_len=32,
                          upsample_dims=(32, 16), decoder_guidance_dims=(8, 4),
                          decoder_dims=(16, 8), guidance_layers=(1, 3))


# ----------------------------------------------------------------------------------------------
# The cost volume
# ----------------------------------------------------------------------------------------------


def cost_volume(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. 1: cosine similarity of every pixel embedding with every class text.

    dense (B, E, h, w); text (B, T, P, E) or (T, P, E) -> cost (B, P, T, h, w).
    """
    if dense.dim() != 4 or text.dim() not in (3, 4) or text.shape[-1] != dense.shape[1]:
        raise ValueError(f"dense must be (B, E, h, w) and text (B, T, P, E) or (T, P, E) with the "
                         f"same E; got {tuple(dense.shape)} and {tuple(text.shape)}")
    dense = F.normalize(dense, dim=1)
    text = F.normalize(text, dim=-1)
    if text.dim() == 3:
        return torch.einsum("behw,tpe->bpthw", dense, text)
    return torch.einsum("behw,btpe->bpthw", dense, text)


def top_classes(cost: torch.Tensor, k: int) -> torch.Tensor:
    """With more than ``k`` classes keep, per image, the k whose best pixel scores highest
    (the official ``Aggregator``'s ``pad_len`` top-k in ``model.py``).

    cost (B, P, T, h, w) -> indices (B, k) into T, in descending order of max cost.
    """
    score = cost.amax(dim=(1, 3, 4))                                            # (B, T)
    return score.topk(k, dim=1).indices


# ----------------------------------------------------------------------------------------------
# Spatial aggregation: a pair of Swin blocks per class, guided
# ----------------------------------------------------------------------------------------------


def shift_mask(h: int, w: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Swin's mask for shifted windows (nW, N, N): -100 between tokens that the cyclic shift
    brought together from different regions, 0 elsewhere. (timm computes the same inside its
    block class; it has no stand-alone helper.)"""
    region = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in bands for ws in bands):
        region[:, hs, ws, :] = i
    windows = window_partition(region, (window, window)).reshape(-1, window * window)  # (nW, N)
    different = windows[:, None, :] != windows[:, :, None]                  # (nW, N, N)
    return different.float() * -100.0


class GuidedWindowAttention(nn.Module):
    """Window attention where queries and keys see [x; guidance] and values see x (Eq. 5);
    no relative position bias (the official ``WindowAttention``). Official names: q, k, v, proj."""

    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        """x (n, N, C), guidance (n, N, G), mask (nW, N, N) with n = batch * nW -> (n, N, C)."""
        xg = torch.cat([x, guidance], dim=-1)                                   # (n, N, C+G)
        q, k, v = (rearrange(t, "n N (m d) -> n m N d", m=self.heads)
                   for t in (self.q(xg), self.k(xg), self.v(x)))
        attn = (q @ k.transpose(-2, -1)) * self.scale                           # (n, m, N, N)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(-1, nW, self.heads, *attn.shape[-2:]) + mask[None, :, None]
            attn = attn.view(-1, self.heads, *attn.shape[-2:])
        out = attn.softmax(-1) @ v                                              # (n, m, N, d)
        return self.proj(rearrange(out, "n m N d -> n N (m d)"))


class SwinBlock(nn.Module):
    """One Swin block with guidance: LN -> (shifted) window attention -> residual -> LN -> MLP."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int, shift: int,
                 mlp_ratio: int = 4):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (n, h, w, C), guidance (n, h, w, G) -> (n, h, w, C)."""
        _, h, w, C = x.shape
        ws = self.window
        if h % ws or w % ws:
            raise ValueError(f"the cost grid {h}x{w} is not divisible by the window {ws}")
        shift = self.shift if min(h, w) > ws else 0          # one window: nothing to shift
        y = self.norm1(x)
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            guidance = torch.roll(guidance, (-shift, -shift), dims=(1, 2))
        mask = shift_mask(h, w, ws, shift, x.device) if shift else None
        y = self.attn(window_partition(y, (ws, ws)).reshape(-1, ws * ws, C),
                      window_partition(guidance, (ws, ws)).reshape(-1, ws * ws,
                                                                   guidance.shape[-1]), mask)
        y = window_reverse(y.view(-1, ws, ws, C), (ws, ws), h, w)               # (n, h, w, C)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SpatialAggregation(nn.Module):
    """Eq. 3 / 5: the cost of each class, as an image, through a plain and a shifted Swin block
    (weights shared over classes), guided by CLIP's dense embedding. Official: ``swin_block``."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        args = (cfg.hidden, cfg.hidden, cfg.heads, cfg.window)
        self.block_1 = SwinBlock(*args, shift=0, mlp_ratio=cfg.mlp_ratio)
        self.block_2 = SwinBlock(*args, shift=cfg.window // 2, mlp_ratio=cfg.mlp_ratio)
        self.guidance_norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, h, w), guidance (B, G, h, w) -> (B, C, T, h, w)."""
        T = x.shape[2]
        y = rearrange(x, "B C T h w -> (B T) h w C")
        g = self.guidance_norm(rearrange(guidance, "B G h w -> B h w G"))
        g = repeat(g, "B h w G -> (B T) h w G", T=T)
        y = self.block_2(self.block_1(y, g), g)
        return rearrange(y, "(B T) h w C -> B C T h w", T=T)


# ----------------------------------------------------------------------------------------------
# Class aggregation: a transformer over the class axis, no positions
# ----------------------------------------------------------------------------------------------


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
                     ) -> torch.Tensor:
    """Linear attention (Katharopoulos et al.) with phi(z) = elu(z) + 1, as the official code:
    phi(Q) (phi(K)^T V) / (phi(Q) sum_s phi(K_s)). q, k, v (n, S, m, d) -> (n, S, m, d).

    V is divided by S and the result multiplied back (the official fp16 guard; exact in fp32)."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    S = v.shape[1]
    kv = torch.einsum("nsmd,nsme->nmde", k, v / S)                             # (n, m, d, d)
    z = 1 / (torch.einsum("nlmd,nmd->nlm", q, k.sum(1)) + eps)                 # (n, S, m)
    return torch.einsum("nlmd,nmde,nlm->nlme", q, kv, z) * S


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V over the class axis; q, k, v (n, S, m, d) -> (n, S, m, d)."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


class ClassAttention(nn.Module):
    """Queries and keys from [x; text guidance], values from x, no output projection (official
    ``attention.attention`` with q, k, v)."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, kind: str = "linear"):
        super().__init__()
        self.heads, self.kind = heads, kind
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x (n, S, C), guidance (n, S, G) -> (n, S, C)."""
        xg = torch.cat([x, guidance], dim=-1)
        q, k, v = (rearrange(t, "n S (m d) -> n S m d", m=self.heads)
                   for t in (self.q(xg), self.k(xg), self.v(x)))
        attend = linear_attention if self.kind == "linear" else full_attention
        return rearrange(attend(q, k, v), "n S m d -> n S (m d)")


class ClassAggregation(nn.Module):
    """Eq. 4 / 6: at every (pooled) pixel, the T class costs attend to each other.

    No positional embedding: permuting the classes permutes the output (any T works). Classes are
    padded to ``pad_len`` tokens with a learnable token (and guidance). Official: ``attention``.
    """

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        C = cfg.hidden
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(C)
        self.attention = ClassAttention(C, C, cfg.heads, cfg.attention)
        self.norm2 = nn.LayerNorm(C)
        self.MLP = nn.Sequential(nn.Linear(C, C * cfg.mlp_ratio), nn.ReLU(),
                                 nn.Linear(C * cfg.mlp_ratio, C))
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, C))
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, C))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, pool: tuple[int, int]
                ) -> torch.Tensor:
        """x (B, C, T, h, w), guidance (B, T, G) -> (B, C, T, h, w)."""
        B, C, T, h, w = x.shape
        y = rearrange(x, "B C T h w -> (B T) C h w")
        if pool != (1, 1):
            y = F.avg_pool2d(y, pool)                                           # (B*T, C, h', w')
        hp, wp = y.shape[-2:]
        tokens = rearrange(y, "(B T) C h w -> (B h w) T C", T=T)               # (n, T, C)
        g = repeat(guidance, "B T G -> (B h w) T G", h=hp, w=wp)
        pad = (self.cfg.pad_len or T) - T
        if pad > 0:
            n = tokens.shape[0]
            tokens = torch.cat([tokens, self.padding_tokens.expand(n, pad, C)], dim=1)
            g = torch.cat([g, self.padding_guidance.expand(n, pad, g.shape[-1])], dim=1)
        delta = self.attention(self.norm1(tokens), g)                          # (n, S, C)
        delta = delta + self.MLP(self.norm2(tokens + delta))
        out = delta if self.cfg.class_residual == "paper" else tokens + delta
        out = rearrange(out[:, :T], "(B h w) T C -> (B T) C h w", B=B, h=hp, w=wp)
        if (hp, wp) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return x + rearrange(out, "(B T) C h w -> B C T h w", T=T)  # ClassTransformerLayer


class AggregatorLayer(nn.Module):
    """Spatial then class aggregation (the paper's Fig. 3, one of N_B layers)."""

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.swin_block = SpatialAggregation(cfg)
        self.attention = ClassAggregation(cfg)

    def forward(self, x: torch.Tensor, appearance: torch.Tensor, text: torch.Tensor,
                pool: tuple[int, int]) -> torch.Tensor:
        return self.attention(self.swin_block(x, appearance), text, pool)


# ----------------------------------------------------------------------------------------------
# Upsampling decoder and the aggregator
# ----------------------------------------------------------------------------------------------


class DoubleConv(nn.Module):
    """[Conv3x3 (no bias) -> GroupNorm(C/16) -> ReLU] x 2 (official ``double_conv.{0,1,3,4}``)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(max(c_out // 16, 1), c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(max(c_out // 16, 1), c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """x2 transposed conv to (c_in - G) channels, concat the guidance (G), DoubleConv to c_out."""

    def __init__(self, c_in: int, guidance_dim: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in - guidance_dim, 2, stride=2)
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), guidance], dim=1))


class Aggregator(nn.Module):
    """Cost volume -> cost embedding -> N_B x (spatial, class) aggregation -> decoder -> logits.

    Module names follow the official ``sem_seg_head.predictor.transformer`` so that released
    weights convert by prefix (:func:`convert_official_catseg`).
    """

    def __init__(self, cfg: CATSegConfig):
        super().__init__()
        self.cfg = cfg
        C, E = cfg.hidden, cfg.embed_dim
        self.conv1 = nn.Conv2d(cfg.prompts, C, cfg.cost_kernel, padding=cfg.cost_kernel // 2)
        self.guidance_projection = nn.Sequential(nn.Conv2d(E, C, 3, padding=1), nn.ReLU())
        self.text_guidance_projection = nn.Sequential(nn.Linear(E, C), nn.ReLU())
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(u, g, 3, padding=1), nn.ReLU())
            for u, g in zip(cfg.upsample_dims, cfg.decoder_guidance_dims, strict=True))
        self.layers = nn.ModuleList(AggregatorLayer(cfg) for _ in range(cfg.num_layers))
        (g1, g2), (d1, d2) = cfg.decoder_guidance_dims, cfg.decoder_dims
        self.decoder1 = Up(C, g1, d1)
        self.decoder2 = Up(d1, g2, d2)
        self.head = nn.Conv2d(d2, 1, 3, padding=1)

    def embed_cost(self, cost: torch.Tensor) -> torch.Tensor:
        """Per class, (P, h, w) -> (C, h, w): cost (B, P, T, h, w) -> (B, C, T, h, w)."""
        T = cost.shape[2]
        y = self.conv1(rearrange(cost, "B P T h w -> (B T) P h w"))
        return rearrange(y, "(B T) C h w -> B C T h w", T=T)

    def decode(self, x: torch.Tensor, guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """x (B, C, T, h, w), guidance [(B, G1, 2h, 2w), (B, G2, 4h, 4w)] -> (B, T, 4h, 4w)."""
        T = x.shape[2]
        nhwc = torch.channels_last        # many maps with few channels: about 3x faster on CPU
        y = rearrange(x, "B C T h w -> (B T) C h w").contiguous(memory_format=nhwc)
        g1, g2 = (repeat(g, "B G h w -> (B T) G h w", T=T).contiguous(memory_format=nhwc)
                  for g in guidance)
        y = self.decoder2(self.decoder1(y, g1), g2)
        return rearrange(self.head(y), "(B T) 1 h w -> B T h w", T=T)

    def forward(self, dense: torch.Tensor, text: torch.Tensor,
                decoder_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """dense (B, E, h, w), text (B, T, P, E), decoder_maps [(B, U1, 2h, 2w), (B, U2, 4h, 4w)]
        (the upsampled intermediate CLIP maps) -> class logits (B, T, 4h, 4w)."""
        B, T = dense.shape[0], text.shape[1]
        if text.shape[2] != self.cfg.prompts:
            raise ValueError(f"text has {text.shape[2]} prompts per class, the config "
                             f"{self.cfg.prompts}")
        cost = cost_volume(dense, text)                                         # (B, P, T, h, w)
        keep = None
        if self.cfg.pad_len is not None and self.cfg.pad_len < T:     # Aggregator's top-k
            keep = top_classes(cost, self.cfg.pad_len)                          # (B, k)
            cost = cost.gather(2, keep[:, None, :, None, None].expand(
                -1, cost.shape[1], -1, *cost.shape[-2:]))
            text = text.gather(1, keep[:, :, None, None].expand(-1, -1, *text.shape[-2:]))
        x = self.embed_cost(cost)                                               # (B, C, T, h, w)
        appearance = self.guidance_projection(dense)                            # (B, C, h, w)
        text_guidance = self.text_guidance_projection(
            F.normalize(F.normalize(text, dim=-1).mean(2), dim=-1))             # (B, T, C)
        decoder_guidance = [proj(m) for proj, m in
                            zip(self.decoder_guidance_projection, decoder_maps, strict=True)]
        pool = self.cfg.pooling if self.training else self.cfg.eval_pooling
        for layer in self.layers:
            x = layer(x, appearance, text_guidance, pool)
        logits = self.decode(x, decoder_guidance)                               # (B, k, H', W')
        if keep is None:
            return logits
        full = logits.new_full((B, T, *logits.shape[-2:]), -100.0)              # dropped: -100
        return full.scatter(1, keep[:, :, None, None].expand_as(logits), logits)


# ----------------------------------------------------------------------------------------------
# Fine-tuning CLIP's attention: q / k / v as separate parameters
# ----------------------------------------------------------------------------------------------


def split_attention_qkv(model: nn.Module) -> int:
    """Give every ``nn.MultiheadAttention`` in ``model`` separate ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` parameters (torch's own unfused mode), as CAT-Seg's
    ``build_model`` does: ``requires_grad`` cannot cover a slice of the fused ``in_proj_weight``,
    and weight decay would move rows that are meant to stay frozen. The fused bias stays. Returns
    how many attention modules were split; the function is exact (outputs do not change)."""
    count = 0
    for attn in model.modules():
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            continue
        q, k, v = attn.in_proj_weight.detach().chunk(3, dim=0)
        del attn.in_proj_weight
        attn.register_parameter("in_proj_weight", None)
        attn.q_proj_weight = nn.Parameter(q.clone())
        attn.k_proj_weight = nn.Parameter(k.clone())
        attn.v_proj_weight = nn.Parameter(v.clone())
        attn._qkv_same_embed_dim = False
        count += 1
    return count


def split_qkv_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converter from open_clip's / OpenAI's fused weights: every ``*.in_proj_weight`` (3D, D)
    becomes ``*.q_proj_weight``, ``*.k_proj_weight``, ``*.v_proj_weight`` (D, D) each."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".in_proj_weight"):
            stem = key[: -len("in_proj_weight")]
            if value.dim() != 2 or value.shape[0] % 3:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, not (3D, D)")
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{stem}{name}_proj_weight"] = part.clone()
        else:
            out[key] = value
    return out


FINETUNE_MODES = ("attention", "frozen", "full")


def set_clip_finetuning(model: nn.Module, mode: str = "attention") -> int:
    """CAT-Seg's ``CLIP_FINETUNE``: ``attention`` trains only ``q_proj_weight`` and
    ``v_proj_weight`` in every block of both towers (``CATSeg.__init__``, ``CLIP_FINETUNE``);
    ``frozen`` nothing; ``full`` all.
    Returns the number of trainable CLIP parameters."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {FINETUNE_MODES}")
    for name, p in model.named_parameters():
        trains = mode == "full" or (mode == "attention"
                                    and name.endswith(("attn.q_proj_weight", "attn.v_proj_weight")))
        p.requires_grad_(trains)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class CATSeg(nn.Module):
    """CLIP (both towers, q/v fine-tuned) + the aggregator; open-vocabulary by class names.

    ``class_names`` are the training classes (by default all 19). ``train_ids`` maps them to the
    label values of the dataset (trainIds); labels of classes not in the list (a held-out class)
    become ignored pixels in the loss. At test time :meth:`predict` scores ``eval_names`` (default:
    all 19 Cityscapes classes, in trainId order), which may include classes never trained on.
    """

    def __init__(self, encoder: Encoder, cfg: CATSegConfig, class_names: Sequence[str] = CLASSES,
                 train_ids: Sequence[int] | None = None, eval_names: Sequence[str] = CLASSES,
                 template: str = "catseg", tokenizer=None, finetune: str = "attention",
                 clip_lr_mult: float = 0.01, official_ignore: bool = False,
                 ignore_index: int = IGNORE_INDEX, num_labels: int = NUM_CLASSES):
        super().__init__()
        if encoder.bundle.kind != "vlm" or encoder.style != "open_clip":
            raise ValueError(f"CAT-Seg needs an OpenAI-style CLIP (open_clip's own ViT), got "
                             f"{encoder.bundle.name}")
        if (encoder.width, encoder.bundle.embed_dim) != (cfg.visual_width, cfg.embed_dim):
            raise ValueError(f"{encoder.bundle.name} has width {encoder.width} and embedding "
                             f"{encoder.bundle.embed_dim}; the config expects "
                             f"{cfg.visual_width} and {cfg.embed_dim}")
        if max(cfg.guidance_layers) >= encoder.depth - 1:
            raise ValueError(f"guidance layers {cfg.guidance_layers} must come before the last "
                             f"of {encoder.depth} blocks (it is replaced by the dense path)")
        self.encoder, self.cfg = encoder, cfg
        self.template, self.tokenizer = TEMPLATES.get(template, template), tokenizer
        self.class_names, self.eval_names = list(class_names), list(eval_names)
        ids = list(range(len(class_names))) if train_ids is None else list(train_ids)
        if len(ids) != len(self.class_names) or len(set(ids)) != len(ids) or not all(
                0 <= i < num_labels for i in ids):
            raise ValueError(f"train_ids {ids} must give one distinct label value in "
                             f"[0, {num_labels}) per class name")
        self.num_labels = num_labels
        lut = torch.full((256,), ignore_index, dtype=torch.long)
        lut[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("label_map", lut, persistent=False)      # label -> class index
        split_attention_qkv(encoder.model)
        set_clip_finetuning(encoder.model, finetune)
        self.aggregator = Aggregator(cfg)
        D, (u1, u2) = cfg.visual_width, cfg.upsample_dims
        self.upsample1 = nn.ConvTranspose2d(D, u1, 2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(D, u2, 4, stride=4)
        self.clip_lr_mult, self.official_ignore = clip_lr_mult, official_ignore
        self.ignore_index = ignore_index
        self.cache = TextEmbeddingCache()       # eval only; cleared whenever training resumes

    # -- the two towers ---------------------------------------------------------------------------
    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(T, P, E) class text embeddings: through the (trainable) text tower in training,
        cached at evaluation (as the official ``CATSegPredictor``'s ``cache``; here it is per
        model and cleared by ``train()``)."""
        prompts = format_prompts(names, self.template, first_synonym=True)
        if not self.training and not torch.is_grad_enabled():
            text = self.cache.get(self.encoder.model, prompts, self.tokenizer, normalize=False)
        else:
            tokens = tokenize(self.encoder.model, prompts, self.tokenizer)
            device = text_tower(self.encoder.model).token_embedding.weight.device
            text = self.encoder.model.encode_text(tokens.to(device))            # (T, E)
        return text[:, None]                                                    # P = 1

    def train(self, mode: bool = True) -> CATSeg:
        self.cache.clear()                  # the text tower may change: never serve stale texts
        return super().train(mode)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (B, 3, H, W) in [0, 1] -> the dense embedding (B, E, h, w) and the raw token
        maps (B, D, h, w) of the two guidance layers (raw block outputs, no final norm, no
        projection: the forward hooks of the official ``CATSeg.__init__``)."""
        enc = self.encoder
        x, grid = enc.embed(enc.normalize(images))
        mids = {}
        for i in range(enc.depth - 1):
            x = enc.block(i, x, grid)
            if i in self.cfg.guidance_layers:
                mids[i] = enc.patch_map(x, grid)
        dense = enc.dense_embedding(None, grid, form="maskclip", before_last=x)
        return dense, [mids[i] for i in self.cfg.guidance_layers]

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None
                ) -> torch.Tensor:
        """Class logits (B, T, 4h, 4w) for ``class_names`` (default: the training classes when
        training, ``eval_names`` otherwise)."""
        if class_names is None:
            class_names = self.class_names if self.training else self.eval_names
        dense, (mid1, mid2) = self.encode_image(images)
        text = self.text_embeddings(class_names)                                # (T, P, E)
        text = text[None].expand(images.shape[0], *text.shape)                  # (B, T, P, E)
        return self.aggregator(dense, text, [self.upsample1(mid1), self.upsample2(mid2)])

    # -- training and inference -------------------------------------------------------------------
    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel sigmoid BCE against one-hot targets over the training classes, logits
        upsampled to the labels (the official loss; ignored pixels masked out unless
        ``official_ignore``)."""
        logits = self(images, self.class_names)                                 # (B, T, h, w)
        return {"loss_bce": catseg_loss(logits, self.map_labels(labels), self.official_ignore,
                                        self.ignore_index)}

    def map_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Dataset label values (trainIds) -> indices into ``class_names``; a held-out class
        becomes ignored. A value outside [0, num_labels) other than ``ignore_index`` is an error."""
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_labels))
        if bad.any():
            found = sorted(labels[bad].unique().tolist())[:5]
            raise ValueError(f"label values must be in [0, {self.num_labels}) or "
                             f"{self.ignore_index}; found {found}")
        return self.label_map[labels.long().clamp(0, 255)]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None
                ) -> torch.Tensor:
        """Class probabilities (B, T, 4h, 4w) = sigmoid of the logits, for ``class_names``
        (default ``eval_names``)."""
        return self(images, class_names or self.eval_names).sigmoid()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Official optimiser groups: CLIP at ``clip_lr_mult`` (0.01) of the learning rate, no
        decay on norms and embeddings."""
        return optimizer_groups(self, weight_decay, self.clip_lr_mult, backbone=("encoder.",))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a lesson checkpoint stores: the aggregator, the upsamplers and CLIP's q / v."""
        return trainable_state_dict(self)


def catseg_loss(logits: torch.Tensor, labels: torch.Tensor, official_ignore: bool = False,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean sigmoid BCE of logits (B, T, h, w), upsampled bilinearly to labels (B, H, W) holding
    class indices in [0, T) or ``ignore_index``, against their one-hot encoding.

    ``official_ignore``: ignored pixels get all-zero targets and count in the mean (the official
    ``CATSeg.forward``), which trains them towards "no class"; by default they are left out.
    """
    if labels.dim() != 3 or logits.dim() != 4 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits must be (B, T, h, w) and labels (B, H, W); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    T = logits.shape[1]
    valid = labels != ignore_index
    if (labels[valid] < 0).any() or (labels[valid] >= T).any():
        raise ValueError(f"label values must be in [0, {T}) or {ignore_index}")
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    target = F.one_hot(labels.masked_fill(~valid, 0).long(), T).permute(0, 3, 1, 2).float()
    target = target * valid[:, None]                                          # (B, T, H, W)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if official_ignore:
        return bce.mean()
    weight = valid[:, None].expand_as(bce).float()
    return (bce * weight).sum() / weight.sum().clamp(min=1)


def sliding_inference(predict, images: torch.Tensor, size: tuple[int, int],
                      window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """CAT-Seg's sliding evaluation (``CATSeg.inference_sliding_window`` and ``eval.sh``): squash
    the image to ``size`` (640 x 640 officially, aspect ratio not kept), score the windows (384,
    stride 256: 2 x 2) and one global view at the window size, average overlapping windows, then
    average that 50/50 with the global map and resize back. ``predict``: crops (n, 3, h, w) ->
    probabilities (n, T, h', w')."""
    B, _, H, W = images.shape
    (sh, sw), (wh, ww), (th, tw) = size, window, stride
    if (sh - wh) % th or (sw - ww) % tw:
        raise ValueError(f"windows {window} at stride {stride} do not tile {size}")
    x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    crops, spots = [], []
    for top in range(0, sh - wh + 1, th):
        for left in range(0, sw - ww + 1, tw):
            crops.append(x[:, :, top:top + wh, left:left + ww])
            spots.append((top, left))
    glob = F.interpolate(x, size=window, mode="bilinear", align_corners=False)
    out = predict(torch.cat([*crops, glob]))                                  # (n*B, T, h', w')
    out = F.interpolate(out, size=window, mode="bilinear", align_corners=False)
    parts = out.split(B)
    total = x.new_zeros(B, out.shape[1], *size)
    count = x.new_zeros(1, 1, *size)
    for part, (top, left) in zip(parts[:-1], spots, strict=True):
        total[:, :, top:top + wh, left:left + ww] += part
        count[:, :, top:top + wh, left:left + ww] += 1
    local = total / count
    merged = (local + F.interpolate(parts[-1], size=size, mode="bilinear",
                                    align_corners=False)) / 2
    return F.interpolate(merged, size=(H, W), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Parameter counts and the official checkpoint
# ----------------------------------------------------------------------------------------------


def trainable_parameter_counts(cfg: CATSegConfig, text_width: int, visual_depth: int,
                               text_depth: int) -> dict[str, int]:
    """CAT-Seg's trainable parameters by part, built on the meta device (no memory): the
    aggregator's layers, its embedding and guidance projections, decoder + head, the two
    upsamplers, and CLIP's q / v weights of both towers (``depth x 2 x width^2`` each)."""
    with torch.device("meta"):
        agg = Aggregator(cfg)
        ups = nn.ModuleList([nn.ConvTranspose2d(cfg.visual_width, cfg.upsample_dims[0], 2, 2),
                             nn.ConvTranspose2d(cfg.visual_width, cfg.upsample_dims[1], 4, 4)])

    def n(*modules: nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    parts = {
        "aggregation layers": n(agg.layers),
        "cost embedding + guidance projections": n(agg.conv1, agg.guidance_projection,
                                                   agg.text_guidance_projection,
                                                   agg.decoder_guidance_projection),
        "decoder + head": n(agg.decoder1, agg.decoder2, agg.head),
        "upsample1 + upsample2": n(ups),
        "CLIP q / v (image + text)": 2 * (visual_depth * cfg.visual_width ** 2
                                          + text_depth * text_width ** 2),
    }
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------------------------
# The notebooks' model
# ----------------------------------------------------------------------------------------------

HELD_OUT_CLASS = "bus"
"""Kept out of CAT-Seg's segmentation training in the toy sweep (the toy VLM saw it in captions)."""


def build_toy_catseg(held_out: Sequence[str] = (HELD_OUT_CLASS,), pretrained: bool = True,
                     finetune: str = "attention", clip_lr_mult: float = 0.01,
                     official_ignore: bool = False, num_layers: int = TOY_CATSEG.num_layers,
                     **overrides) -> CATSeg:
    """CAT-Seg on the toy VLM at 64 x 128 (grid 8 x 16, output stride 2), trained on the 19
    classes minus ``held_out`` and scored on all 19. ``num_layers`` aggregation layers (0: the
    raw cost's embedding goes straight to the upsampling decoder, the aggregation's control);
    ``overrides`` change the rest of ``TOY_CATSEG`` (in code only: a checkpoint names
    ``num_layers`` at most)."""
    unknown = [c for c in held_out if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown class(es) {unknown}; choose from {CLASSES}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    weights = toy_weights_dir() if pretrained else None
    encoder = build_encoder("toy_vlm", weights)
    cfg = replace(TOY_CATSEG, num_layers=num_layers, **overrides)
    kept = [i for i, c in enumerate(CLASSES) if c not in held_out]
    return CATSeg(encoder, cfg, class_names=[CLASSES[i] for i in kept], train_ids=kept,
                  finetune=finetune, clip_lr_mult=clip_lr_mult, official_ignore=official_ignore)
