"""Mask2Former with class-text queries (tqdm, ECCV 2024), and the decoder Rein links its tokens to.

Mask2Former (Cheng et al., CVPR 2022) segments by **mask classification**: Q object queries each
predict one binary mask and one class (or "no object"); a semantic map is their sum,
``sum_q softmax(class_q)[k] * sigmoid(mask_q)``. Three parts:

- a **pixel decoder**: multi-scale deformable attention (Deformable DETR, Eq. 2) over the three
  coarsest feature maps (strides 32, 16, 8), then an FPN step to the stride-4 *mask features*;
- a **masked-attention transformer decoder**: per layer cross-attention (each query sees only the
  pixels its previous mask covers: the paper's Eq. 3-4) -> self-attention -> FFN, cycling over the
  three levels coarse -> fine, with a prediction before the first layer and after every layer
  (10 predictions for 9 layers, all supervised);
- **matching and loss**: each ground-truth mask (one per class present) is assigned a query, by
  the Hungarian algorithm on a class + BCE + dice cost, and the loss is class CE (no-object weight
  0.1) + mask BCE + dice on importance-sampled points, weights 2 / 5 / 5, on every prediction.

**tqdm** (Pak et al., *Textual Query-Driven Mask Transformer for Domain Generalized Segmentation*)
changes three things, all here:

- the object queries are the **class-text embeddings**: query k is ``text_proj(t_k)`` for the
  prompt-tuned text embedding of class k (19 queries), with a learnable positional embedding;
- so the matching is **fixed**: query k <-> class k when class k is present (``IdentityMatcher``);
- every pixel-decoder layer adds **cross-attention from pixels to the text** embeddings; and a
  **pixel-text alignment** loss pulls each pixel's dense image embedding towards its class's text
  (``softmax(cos(v_px, t_k) / tau)`` cross-entropy, tau = 0.07).

tqdm fine-tunes the whole visual encoder at 0.1x the learning rate (its FPN too, being part of the
backbone), keeps the text tower frozen, and adds two regularisers (language: the learned class
embeddings classify against frozen "a clean origami of a {}" embeddings; vision: the global image
embedding stays near the initial encoder's). Rein instead feeds its tokens as the queries:
positions ``Q`` from :meth:`lessons.rein.Reins.queries` and content ``querys2feat(Q)``.

**Paper vs official code** (we follow the code; the other form is a flag):

- tqdm's pixel-decoder FFN is 2048 wide (mmcv's deprecated ``feedforward_channels=2048`` overrides
  the config's ``1024  # reduced``); Rein's (mmdet 3.x) is 1024: ``pixel_ffn``. We decide by the
  parameter counts: 2048 reproduces MFuser's derived 26.77 M head, 1024 Rein's ~20.6 M.
- tqdm's code refines the text with a DenseCLIP-style ``ContextDecoder`` (3 layers) that its
  paper's figure does not show: ``context_layers=0`` is the paper's form; its ``gamma`` is
  re-initialised by ``trunc_normal_`` (std 1), not the 1e-4 it was created with: ``gamma_init``.
- mmseg 0.16's pixel-text CE averages over all pixels, ignored ones included:
  ``avg_non_ignore=True`` divides by the labelled pixels only.
- ground-truth masks treat ignored pixels as background of every class (as mmdet and
  detectron2 do): ``exclude_ignored=True`` drops them from the mask losses instead.
- the head is never Xavier-initialised in tqdm / MFuser (``init_weights`` is not called): layers
  keep PyTorch's defaults; deformable attention keeps its own init (zero offsets weight, a
  direction per head).

Dimension glossary: B batch, C input channels, D hidden width (256), Q queries, K classes (19),
K+1 with "no object", S pixel tokens over all levels, L levels (3), P sampling points per level
and head (4) or mask points (12,544), h w feature grid, H W label size, n ground-truth masks,
E joint image-text embedding width, T text tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from lessons.backbones import Encoder, build_encoder, toy_weights_dir
from lessons.checkpoints import trainable_state_dict
from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from lessons.rein import Reins
from lessons.segmentor import optimizer_groups
from lessons.train import NonFiniteLoss

__all__ = [
    "MFUSER_M2F",
    "REIN_M2F",
    "TOY_M2F",
    "TQDM_M2F",
    "ContextDecoder",
    "ContextDecoderLayer",
    "DecoderLayer",
    "HungarianMatcher",
    "IdentityMatcher",
    "MSDeformAttn",
    "Mask2FormerConfig",
    "Mask2FormerHead",
    "MaskClassificationLoss",
    "MaskFormerSegmentor",
    "Match",
    "PixelDecoder",
    "PixelDecoderLayer",
    "Prediction",
    "RescaleNeck",
    "SimpleFPN",
    "Targets",
    "TransformerDecoder",
    "build_toy_frozen_mask2former",
    "build_toy_rein_mask2former",
    "build_toy_tqdm",
    "dice_loss",
    "head_parameter_count",
    "language_regularizer",
    "multi_scale_deformable_attention",
    "neck_scales",
    "pixel_text_loss",
    "pixel_text_scores",
    "point_sample",
    "reference_points",
    "semantic_inference",
    "semantic_targets",
    "sine_position_encoding",
    "slide_inference",
    "toy_config",
    "uncertain_point_coords",
]

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Sizes of the head. The published values are :data:`REIN_M2F`, :data:`TQDM_M2F`,
    :data:`MFUSER_M2F`; :data:`TOY_M2F` is the notebooks' size."""

    in_channels: tuple[int, ...] = (1024, 1024, 1024, 1024)   # strides 4, 8, 16, 32
    hidden_dim: int = 256
    num_heads: int = 8
    num_classes: int = NUM_CLASSES
    # pixel decoder
    pixel_layers: int = 6
    pixel_ffn: int = 1024
    num_levels: int = 3              # the coarsest maps the deformable encoder attends over
    num_points: int = 4
    gn_groups: int = 32
    pixel_post_norm: bool = False    # tqdm's DetrTransformerDecoder ends with a LayerNorm
    # transformer decoder
    decoder_layers: int = 9
    decoder_ffn: int = 2048
    num_queries: int = 100
    query_source: str = "learnable"  # learnable (Mask2Former) | text (tqdm) | rein (Rein's link)
    text_dim: int | None = None      # E: text cross-attention in the pixel decoder when set

    def __post_init__(self) -> None:
        if self.query_source not in ("learnable", "text", "rein"):
            raise ValueError(f"unknown query_source {self.query_source!r}; choose learnable, "
                             "text or rein")
        if self.query_source == "text" and (self.text_dim is None
                                            or self.num_queries != self.num_classes):
            raise ValueError("text queries need text_dim and one query per class "
                             f"(num_queries {self.num_queries}, classes {self.num_classes})")
        if len(self.in_channels) != self.num_levels + 1:
            raise ValueError(f"expected {self.num_levels + 1} input maps (strides 4 .. 32), got "
                             f"in_channels {self.in_channels}")
        if self.hidden_dim % self.num_heads or self.hidden_dim % self.gn_groups:
            raise ValueError(f"hidden_dim {self.hidden_dim} must divide by num_heads "
                             f"{self.num_heads} and gn_groups {self.gn_groups}")

    @classmethod
    def from_dict(cls, d: dict) -> Mask2FormerConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown Mask2FormerConfig key(s) {unknown}")
        d = {**d, "in_channels": tuple(d.get("in_channels", cls.in_channels))}
        return cls(**d)


REIN_M2F = Mask2FormerConfig(query_source="rein", num_queries=100)
"""Rein's head on ViT-L (mmdet 3.x Mask2Former): 20,579,796 parameters (the paper: ~20.6 M)."""
TQDM_M2F = Mask2FormerConfig(query_source="text", num_queries=NUM_CLASSES, text_dim=768,
                             pixel_ffn=2048, pixel_post_norm=True)
"""tqdm's head on EVA02-CLIP-L (1024-d maps, 768-d text)."""
MFUSER_M2F = replace(TQDM_M2F, in_channels=(2048,) * 4)
"""MFuser's head: tqdm's, on the concatenated VFM + VLM maps (2048-d): 26,766,292 parameters."""
TOY_M2F = Mask2FormerConfig(in_channels=(192,) * 4, hidden_dim=64, num_heads=4, pixel_layers=3,
                            pixel_ffn=256, decoder_layers=6, decoder_ffn=256, num_queries=19)
"""The notebooks' size: D 64, 3 deformable layers, 6 decoder layers (two rounds of 3 levels)."""


class Prediction(NamedTuple):
    """One of the decoder's predictions: class logits (B, Q, K+1), mask logits (B, Q, h, w)."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Positions and multi-scale deformable attention
# ----------------------------------------------------------------------------------------------


def sine_position_encoding(h: int, w: int, dim: int, device=None,
                           temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding (h*w, dim): dim/2 features for y, then dim/2 for x."""
    feats = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale  # (h,)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale  # (w,)
    dim_t = temperature ** (2 * (torch.arange(feats, device=device) // 2) / feats)      # (F,)

    def encode(v: torch.Tensor) -> torch.Tensor:                     # (n,) -> (n, F)
        p = v[:, None] / dim_t
        return torch.stack([p[:, 0::2].sin(), p[:, 1::2].cos()], dim=-1).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, feats)                                # (h, w, F)
    pos_x = encode(x)[None, :, :].expand(h, w, feats)                                # (h, w, F)
    return torch.cat([pos_y, pos_x], dim=-1).reshape(h * w, 2 * feats)               # (hw, D)


def reference_points(shapes: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1] as (x, y): (S, 2)."""
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.flatten(), yy.flatten()], dim=-1))            # (hw, 2)
    return torch.cat(points)                                                           # (S, 2)


def multi_scale_deformable_attention(value: torch.Tensor, shapes: Sequence[tuple[int, int]],
                                     locations: torch.Tensor, weights: torch.Tensor
                                     ) -> torch.Tensor:
    """Deformable DETR Eq. 3 with ``grid_sample`` (what the CUDA kernel computes).

    value (B, S, heads, d), locations (B, Nq, heads, L, P, 2) in [0, 1] as (x, y),
    weights (B, Nq, heads, L, P) summing to 1 over (L, P) -> (B, Nq, heads * d).
    """
    B, _, heads, d = value.shape
    _, Nq, _, L, P, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1                                      # grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(B * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)      # (B*heads, Nq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))         # (B*heads, d, Nq, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)             # (B*heads, d, Nq, L*P)
    w = weights.transpose(1, 2).reshape(B * heads, 1, Nq, L * P)
    out = (stacked * w).sum(-1)                                    # (B*heads, d, Nq)
    return out.view(B, heads * d, Nq).transpose(1, 2)              # (B, Nq, heads*d)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples P points per head and level around
    its reference point (learned offsets) and mixes them with learned weights."""

    def __init__(self, dim: int, heads: int = 8, levels: int = 3, points: int = 4):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, head h starts along direction 2*pi*h/H,
        point p at distance p + 1; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)                        # (heads, 2)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :].repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, ref: torch.Tensor, value: torch.Tensor,
                shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """query (B, Nq, D), ref (Nq, 2) or (B, Nq, 2), value (B, S, D) -> (B, Nq, D)."""
        B, Nq, D = query.shape
        H, L, P = self.heads, self.levels, self.points
        v = self.value_proj(value).view(B, value.shape[1], H, D // H)          # (B, S, H, d)
        offsets = self.sampling_offsets(query).view(B, Nq, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Nq, H, L * P).softmax(-1)
        size = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        ref = ref.expand(B, Nq, 2)[:, :, None, None, None, :]                  # (B, Nq, 1, 1, 1, 2)
        locations = ref + offsets / size[None, None, None, :, None, :]         # (B, Nq, H, L, P, 2)
        out = multi_scale_deformable_attention(v, shapes, locations, weights.view(B, Nq, H, L, P))
        return self.output_proj(out)                                            # (B, Nq, D)


def _ffn(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


# ----------------------------------------------------------------------------------------------
# Pixel decoder
# ----------------------------------------------------------------------------------------------


class PixelDecoderLayer(nn.Module):
    """Deformable self-attention -> norm -> [cross-attention to text -> norm] -> FFN -> norm."""

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        D = cfg.hidden_dim
        self.self_attn = MSDeformAttn(D, cfg.num_heads, cfg.num_levels, cfg.num_points)
        self.norm1 = nn.LayerNorm(D)
        self.text_attn = None
        if cfg.text_dim is not None:              # tqdm: pixels ask the class texts
            self.text_attn = nn.MultiheadAttention(D, cfg.num_heads, batch_first=True)
            self.norm_text = nn.LayerNorm(D)
        self.ffn = _ffn(D, cfg.pixel_ffn)
        self.norm2 = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor,
                shapes: Sequence[tuple[int, int]], text: torch.Tensor | None = None,
                text_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x + pos, ref, x, shapes))             # (B, S, D)
        if self.text_attn is not None:
            if text is None:
                raise ValueError("this pixel decoder attends to text: pass the class texts")
            y = self.text_attn(x + pos, text + text_pos, text, need_weights=False)[0]
            x = self.norm_text(x + y)                                            # (B, S, D)
        return self.norm2(x + self.ffn(x))                                       # (B, S, D)


class PixelDecoder(nn.Module):
    """MSDeformAttnPixelDecoder: maps at strides (4, 8, 16, 32) -> mask features (B, D, H/4, W/4)
    and the deformable encoder's outputs at strides (32, 16, 8)."""

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        D, L = cfg.hidden_dim, cfg.num_levels
        self.num_levels = L
        self.input_convs = nn.ModuleList(                 # coarsest first: strides 32, 16, 8
            nn.Sequential(nn.Conv2d(cfg.in_channels[-1 - i], D, 1), nn.GroupNorm(cfg.gn_groups, D))
            for i in range(L))
        self.level_encoding = nn.Embedding(L, D)
        self.layers = nn.ModuleList(PixelDecoderLayer(cfg) for _ in range(cfg.pixel_layers))
        self.post_norm = nn.LayerNorm(D) if cfg.pixel_post_norm else None
        if cfg.text_dim is not None:
            self.text_proj = nn.Linear(cfg.text_dim, D)                   # keys / values
            self.text_pos_embed = nn.Embedding(cfg.num_classes, D)        # key positions
        self.lateral_conv = nn.Sequential(nn.Conv2d(cfg.in_channels[0], D, 1, bias=False),
                                          nn.GroupNorm(cfg.gn_groups, D))
        self.output_conv = nn.Sequential(nn.Conv2d(D, D, 3, padding=1, bias=False),
                                         nn.GroupNorm(cfg.gn_groups, D), nn.ReLU(inplace=True))
        self.mask_feature = nn.Conv2d(D, D, 1)

    def forward(self, maps: Sequence[torch.Tensor], text: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        L = self.num_levels
        srcs, pos, shapes = [], [], []
        for i in range(L):
            x = self.input_convs[i](maps[-1 - i])                                 # (B, D, h, w)
            h, w = x.shape[-2:]
            shapes.append((h, w))
            srcs.append(x.flatten(2).transpose(1, 2))                             # (B, hw, D)
            pos.append(sine_position_encoding(h, w, x.shape[1], x.device).to(x.dtype)
                       + self.level_encoding.weight[i])                           # (hw, D)
        x, pos = torch.cat(srcs, 1), torch.cat(pos)[None]                         # (B, S, D)
        ref = reference_points(shapes, x.device).to(x.dtype)                      # (S, 2)
        text_kv = text_pos = None
        if text is not None:
            text_kv = self.text_proj(text)                                        # (B, T, D)
            text_pos = self.text_pos_embed.weight[None]                           # (1, T, D)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes, text_kv, text_pos)
        if self.post_norm is not None:
            x = self.post_norm(x)
        B, _, D = x.shape
        outs = [y.transpose(1, 2).reshape(B, D, h, w)                             # (B, D, h, w)
                for y, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)]
        finest = maps[0]                                                          # stride 4
        y = self.lateral_conv(finest) + F.interpolate(
            outs[-1], size=finest.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_feature(self.output_conv(y)), outs                      # (B, D, H/4, W/4)


# ----------------------------------------------------------------------------------------------
# Masked-attention transformer decoder
# ----------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """Masked cross-attention -> norm -> self-attention -> norm -> FFN -> norm (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = _ffn(dim, ffn)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, q_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.cross_attn(q + q_pos, memory + memory_pos, memory, attn_mask=attn_mask,
                            need_weights=False)[0]
        q = self.norm1(q + y)                                                   # (B, Q, D)
        y = self.self_attn(q + q_pos, q + q_pos, q, need_weights=False)[0]
        q = self.norm2(q + y)                                                   # (B, Q, D)
        return self.norm3(q + self.ffn(q))                                      # (B, Q, D)


class TransformerDecoder(nn.Module):
    """Queries (B, Q, D) + memories at strides (32, 16, 8) + mask features -> predictions."""

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        D = cfg.hidden_dim
        self.num_heads, self.num_levels = cfg.num_heads, cfg.num_levels
        self.level_embed = nn.Embedding(cfg.num_levels, D)
        self.layers = nn.ModuleList(DecoderLayer(D, cfg.num_heads, cfg.decoder_ffn)
                                    for _ in range(cfg.decoder_layers))
        self.post_norm = nn.LayerNorm(D)
        self.cls_embed = nn.Linear(D, cfg.num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), nn.Linear(D, D),
                                        nn.ReLU(inplace=True), nn.Linear(D, D))

    def predict(self, q: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int]
                ) -> tuple[Prediction, torch.Tensor]:
        """Heads on the normed queries, and the next layer's attention mask (B*heads, Q, hw)."""
        q = self.post_norm(q)
        cls = self.cls_embed(q)                                                 # (B, Q, K+1)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        with torch.no_grad():
            small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
            blocked = (small.sigmoid() < 0.5).flatten(2)                        # (B, Q, hw)
            blocked[blocked.all(-1)] = False            # a query that covers nothing sees all
            blocked = blocked.repeat_interleave(self.num_heads, dim=0)          # (B*heads, Q, hw)
        return Prediction(cls, masks), blocked

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor,
                memories: Sequence[torch.Tensor], mask_features: torch.Tensor) -> list[Prediction]:
        mem, mem_pos, sizes = [], [], []
        for i, m in enumerate(memories):
            h, w = m.shape[-2:]
            sizes.append((h, w))
            mem.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])   # (B, hw, D)
            mem_pos.append(sine_position_encoding(h, w, m.shape[1], m.device).to(m.dtype)[None])
        pred, blocked = self.predict(query, mask_features, sizes[0])
        preds = [pred]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            query = layer(query, query_pos, mem[lvl], mem_pos[lvl], blocked)
            pred, blocked = self.predict(query, mask_features, sizes[(i + 1) % self.num_levels])
            preds.append(pred)
        return preds


# ----------------------------------------------------------------------------------------------
# The head: pixel decoder + query source + transformer decoder
# ----------------------------------------------------------------------------------------------


class Mask2FormerHead(nn.Module):
    """Maps at strides (4, 8, 16, 32) -> ``decoder_layers + 1`` predictions.

    Query sources (content, position): ``learnable`` -- ``query_feat``, ``query_embed``
    (Mask2Former); ``text`` -- ``text_proj(t)`` (Linear -> ReLU -> Linear), ``query_embed``
    (tqdm, one query per class); ``rein`` -- ``querys2feat(Q)``, ``Q`` (Rein's link).
    """

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        self.cfg = cfg
        D, Q = cfg.hidden_dim, cfg.num_queries
        self.pixel_decoder = PixelDecoder(cfg)
        self.transformer_decoder = TransformerDecoder(cfg)
        if cfg.query_source == "learnable":
            self.query_feat = nn.Embedding(Q, D)
            self.query_embed = nn.Embedding(Q, D)
        elif cfg.query_source == "text":
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.ReLU(inplace=True),
                                           nn.Linear(D, D))
            self.query_embed = nn.Embedding(Q, D)
        else:
            self.querys2feat = nn.Linear(D, D)

    def queries(self, batch: int, text: torch.Tensor | None = None,
                rein_queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(content, position), each (B, Q, D)."""
        src, Q = self.cfg.query_source, self.cfg.num_queries
        if src == "learnable":
            content, pos = self.query_feat.weight, self.query_embed.weight       # (Q, D)
        elif src == "text":
            if text is None or text.shape[-2] != Q:
                raise ValueError(f"text queries need the {Q} class texts (B, {Q}, E) or ({Q}, E)")
            content, pos = self.text_proj(text), self.query_embed.weight         # (B, Q, D)
        else:
            if rein_queries is None or rein_queries.shape != (Q, self.cfg.hidden_dim):
                got = None if rein_queries is None else tuple(rein_queries.shape)
                raise ValueError(f"Rein's link needs queries ({Q}, {self.cfg.hidden_dim}): the "
                                 f"token length must equal num_queries; got {got}")
            content, pos = self.querys2feat(rein_queries), rein_queries          # (Q, D)
        if content.dim() == 2:
            content = content[None].expand(batch, -1, -1)
        return content, pos[None].expand(batch, -1, -1) if pos.dim() == 2 else pos

    def forward(self, maps: Sequence[torch.Tensor], text: torch.Tensor | None = None,
                rein_queries: torch.Tensor | None = None) -> list[Prediction]:
        if len(maps) != len(self.cfg.in_channels):
            raise ValueError(f"expected {len(self.cfg.in_channels)} maps, got {len(maps)}")
        B = maps[0].shape[0]
        if text is not None and text.dim() == 2:
            text = text[None].expand(B, -1, -1)                                 # (B, K, E)
        pixel_text = text if self.cfg.text_dim is not None else None
        mask_features, memories = self.pixel_decoder(maps, pixel_text)
        content, pos = self.queries(B, text, rein_queries)
        return self.transformer_decoder(content, pos, memories, mask_features)


def head_parameter_count(cfg: Mask2FormerConfig) -> int:
    """Parameters of a head at ``cfg``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Mask2FormerHead(cfg).parameters())


# ----------------------------------------------------------------------------------------------
# Targets, point sampling, matching
# ----------------------------------------------------------------------------------------------


class Targets(NamedTuple):
    """One image's ground truth as mask classification: classes (n,), masks (n, H, W) float."""

    classes: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor          # (H, W) float: 1 where labelled (not ignore)

    def on_grid(self, size: tuple[int, int]) -> Targets:
        """The masks and valid map sampled at the pixel centres of a (h, w) prediction grid."""
        return Targets(self.classes, _resize(self.masks, size), _resize(self.valid[None], size)[0])


def semantic_targets(labels: torch.Tensor, num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> list[Targets]:
    """A semantic label map (B, H, W) -> one binary mask per class present, per image."""
    if labels.dim() != 3 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer (B, H, W), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}; found "
                         f"{sorted(labels[bad].unique().tolist())[:5]}")
    out = []
    for lab in labels:
        classes = lab[lab != ignore_index].unique()                             # (n,)
        masks = (lab[None] == classes[:, None, None]).float()                   # (n, H, W)
        out.append(Targets(classes, masks, (lab != ignore_index).float()))
    return out


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of x (N, C, H, W) at coords (N, P, 2) in [0, 1] as (x, y) -> (N, C, P)."""
    grid = (2 * coords - 1)[:, :, None, :]                                      # (N, P, 1, 2)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)[..., 0]


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75) -> torch.Tensor:
    """PointRend's training points (N, P, 2): of ``oversample_ratio * P`` random points keep the
    ``importance_sample_ratio * P`` most uncertain (logit nearest 0), fill up with random ones."""
    N = logits.shape[0]
    coords = torch.rand(N, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()                     # (N, P*r)
    n_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(n_uncertain, dim=1).indices                          # (N, P_u)
    picked = coords.gather(1, top[..., None].expand(-1, -1, 2))
    rand = torch.rand(N, num_points - n_uncertain, 2, device=logits.device)
    return torch.cat([picked, rand], dim=1)                                     # (N, P, 2)


def _resize(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (n, H, W) sampled bilinearly at the pixel centres of a (h, w) grid -> (n, h, w)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size)
    return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _pairwise_mask_costs(logits: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and dice (eps 1) of every prediction (Q, P) against every target (n, P): (Q, n)."""
    P = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (pos @ targets.T + neg @ (1 - targets).T) / P
    p = logits.sigmoid()
    dice = 1 - (2 * p @ targets.T + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    return bce, dice


Match = tuple[torch.Tensor, torch.Tensor]          # (query indices, target indices)


class HungarianMatcher:
    """Mask2Former's matching: minimise 2 * (-p_class) + 5 * BCE + 5 * dice per image.

    Mask costs use ``num_points`` uniform random points shared by predictions and targets
    (12,544 at full scale); ``num_points=None`` uses every pixel of the prediction grid.
    """

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, num_points: int | None = 12544):
        self.class_weight, self.mask_weight = class_weight, mask_weight
        self.dice_weight, self.num_points = dice_weight, num_points

    def cost(self, cls: torch.Tensor, masks: torch.Tensor, t: Targets) -> torch.Tensor:
        """Cost matrix (Q, n) for one image: cls (Q, K+1), masks (Q, h, w)."""
        cost_class = -cls.softmax(-1)[:, t.classes]                              # (Q, n)
        if self.num_points is None:
            pm, tm = masks.flatten(1), _resize(t.masks, masks.shape[-2:]).flatten(1)
        else:
            coords = torch.rand(1, self.num_points, 2, device=masks.device)
            pm = point_sample(masks[None], coords)[0]                            # (Q, P)
            tm = point_sample(t.masks[None], coords)[0]                          # (n, P)
        bce, dice = _pairwise_mask_costs(pm.float(), tm.float())
        return self.class_weight * cost_class + self.mask_weight * bce + self.dice_weight * dice

    @torch.no_grad()
    def __call__(self, pred: Prediction, targets: Sequence[Targets]) -> list[Match]:
        out = []
        for cls, masks, t in zip(pred.class_logits, pred.mask_logits, targets, strict=True):
            if len(t.classes) == 0:
                empty = torch.empty(0, dtype=torch.long, device=cls.device)
                out.append((empty, empty))
                continue
            cost = self.cost(cls, masks, t)                                     # (Q, T)
            if not torch.isfinite(cost).all():
                raise NonFiniteLoss(float("nan"), {"matching cost": "not finite: the predictions "
                                                   "hold NaN or inf (the training diverged)"})
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, device=cls.device),
                        torch.as_tensor(cols, device=cls.device)))
        return out


class IdentityMatcher:
    """tqdm / MFuser's fixed assignment: query k <-> the mask of class k, when k is present."""

    def __call__(self, pred: Prediction, targets: Sequence[Targets]) -> list[Match]:
        Q = pred.class_logits.shape[1]
        out = []
        for t in targets:
            if len(t.classes) and int(t.classes.max()) >= Q:
                raise ValueError(f"identity matching needs one query per class: class "
                                 f"{int(t.classes.max())} but {Q} queries")
            out.append((t.classes.clone(), torch.arange(len(t.classes), device=t.classes.device)))
        return out


# ----------------------------------------------------------------------------------------------
# The mask-classification loss
# ----------------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
              ) -> torch.Tensor:
    """"Naive" dice per mask (M,): 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) over points (M, P)."""
    p = logits.sigmoid()
    if weights is not None:
        p, targets = p * weights, targets * weights
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


class MaskClassificationLoss(nn.Module):
    """Mask2Former's criterion on every prediction: 2 * CE_cls + 5 * BCE + 5 * dice.

    CE has class weights 1 and ``no_object_weight`` (0.1) for "no object", averaged by their sum;
    BCE and dice use ``num_points`` importance-sampled points per matched mask (None: every pixel
    of the prediction grid, the toy setting), summed over masks and divided by the number of
    ground-truth masks in the batch (at least 1). ``matcher``: ``hungarian`` or ``identity``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, matcher: str = "hungarian",
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, num_points: int | None = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX, exclude_ignored: bool = False):
        super().__init__()
        if matcher == "hungarian":
            self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        elif matcher == "identity":
            self.matcher = IdentityMatcher()
        else:
            raise ValueError(f"unknown matcher {matcher!r}; choose hungarian or identity")
        self.matcher_name = matcher
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_weight, self.mask_weight = class_weight, mask_weight
        self.dice_weight, self.num_points = dice_weight, num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.exclude_ignored = exclude_ignored
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("empty_weight", weight, persistent=False)

    def forward(self, predictions: Sequence[Prediction], labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        targets = semantic_targets(labels, self.num_classes, self.ignore_index)
        num_masks = _num_masks(targets, labels.device)
        if self.num_points is None:        # every pixel: sample the targets at the grid once
            size = tuple(predictions[0].mask_logits.shape[-2:])
            targets = [t.on_grid(size) for t in targets]
        total = {"loss_cls": 0.0, "loss_mask": 0.0, "loss_dice": 0.0}
        for pred in predictions:
            matches = self.matcher(pred, targets)
            total["loss_cls"] = total["loss_cls"] + self.loss_classes(pred, targets, matches)
            bce, dice = self.loss_masks(pred, targets, matches, num_masks)
            total["loss_mask"] = total["loss_mask"] + bce
            total["loss_dice"] = total["loss_dice"] + dice
        return {"loss_cls": self.class_weight * total["loss_cls"],
                "loss_mask": self.mask_weight * total["loss_mask"],
                "loss_dice": self.dice_weight * total["loss_dice"]}

    def loss_classes(self, pred: Prediction, targets: Sequence[Targets],
                     matches: Sequence[Match]) -> torch.Tensor:
        cls = pred.class_logits                                                  # (B, Q, K+1)
        B, Q, _ = cls.shape
        wanted = torch.full((B, Q), self.num_classes, dtype=torch.long, device=cls.device)
        for b, ((qi, ti), t) in enumerate(zip(matches, targets, strict=True)):
            wanted[b, qi] = t.classes[ti]
        return F.cross_entropy(cls.transpose(1, 2), wanted, weight=self.empty_weight.to(cls.dtype))

    def loss_masks(self, pred: Prediction, targets: Sequence[Targets], matches: Sequence[Match],
                   num_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = torch.cat([m[qi] for m, (qi, _) in zip(pred.mask_logits, matches, strict=True)])
        if src.shape[0] == 0:                                   # no labelled pixel in the batch
            zero = pred.mask_logits.sum() * 0
            return zero, zero
        tgt = torch.cat([t.masks[ti] for t, (_, ti) in zip(targets, matches, strict=True)])
        valid = torch.cat([t.valid.expand(len(ti), -1, -1)
                           for t, (_, ti) in zip(targets, matches, strict=True)])  # (M, H, W)
        src_p, tgt_p, valid_p = self._points(src, tgt, valid)                    # (M, P) each
        weights = (valid_p > 0.5).to(src_p.dtype) if self.exclude_ignored else None
        bce = F.binary_cross_entropy_with_logits(src_p, tgt_p, reduction="none")  # (M, P)
        if weights is None:
            bce = bce.mean(-1)
        else:
            bce = (bce * weights).sum(-1) / weights.sum(-1).clamp(min=1)
        dice = dice_loss(src_p, tgt_p, weights)
        return bce.sum() / num_masks, dice.sum() / num_masks

    def _points(self, src: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions (M, h, w) and targets (M, H, W) at the loss's points -> (M, P) each."""
        if self.num_points is None:                      # targets already on the grid
            return src.flatten(1), tgt.flatten(1), valid.flatten(1)
        with torch.no_grad():
            coords = uncertain_point_coords(src[:, None].detach(), self.num_points,
                                            self.oversample_ratio, self.importance_sample_ratio)
        return (point_sample(src[:, None], coords)[:, 0], point_sample(tgt[:, None], coords)[:, 0],
                point_sample(valid[:, None], coords)[:, 0])


def _num_masks(targets: Sequence[Targets], device) -> torch.Tensor:
    """Ground-truth masks in the batch, averaged over processes (DDP), at least 1."""
    n = torch.tensor(float(sum(len(t.classes) for t in targets)), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


def semantic_inference(pred: Prediction) -> torch.Tensor:
    """Per-class scores (B, K, h, w) = sum_q softmax(class_q)[k] * sigmoid(mask_q)."""
    probs = pred.class_logits.softmax(-1)[..., :-1]                              # (B, Q, K)
    return torch.einsum("bqk,bqhw->bkhw", probs, pred.mask_logits.sigmoid())


def slide_inference(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    crop: int | tuple[int, int], stride: int | tuple[int, int],
                    num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """mmseg's sliding window: average ``predict`` (crops -> (B, K, h, w) scores, resized to
    the crop) over overlapping crops (512 / 341 in the papers); returns (B, K, H, W)."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop {crop} and stride {stride} must be positive")
    B, _, H, W = images.shape
    scores = images.new_zeros(B, num_classes, H, W)
    count = images.new_zeros(1, 1, H, W)
    for i in range(max(H - ch + sh - 1, 0) // sh + 1):
        for j in range(max(W - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = predict(images[:, :, y1:y2, x1:x2])
            if out.shape[1] != num_classes:
                raise ValueError(f"predict returned {out.shape[1]} classes, expected {num_classes}")
            scores[:, :, y1:y2, x1:x2] += F.interpolate(out, size=(y2 - y1, x2 - x1),
                                                        mode="bilinear", align_corners=False)
            count[:, :, y1:y2, x1:x2] += 1
    return scores / count


# ----------------------------------------------------------------------------------------------
# Text: pixel-text alignment, the context decoder, regularisers
# ----------------------------------------------------------------------------------------------


def pixel_text_scores(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel embedding (B, E, h, w) with every class text (B, K, E)
    or (K, E): the score map (B, K, h, w)."""
    dense = F.normalize(dense, dim=1)
    text = F.normalize(text, dim=-1)
    if text.dim() == 2:
        return torch.einsum("bchw,kc->bkhw", dense, text)
    return torch.einsum("bchw,bkc->bkhw", dense, text)


def pixel_text_loss(scores: torch.Tensor, labels: torch.Tensor, tau: float = 0.07,
                    logit_scale: float | None = None, logit_bias: float | None = None,
                    ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = False
                    ) -> torch.Tensor:
    """tqdm / MFuser's pixel-text alignment: CE over classes of the upsampled score map.

    Logits are ``scores / tau`` (CLIP, EVA02-CLIP; tau = 0.07), or SigLIP's own calibration
    ``scores * exp(logit_scale) + logit_bias`` when ``logit_scale`` is given (MFuser's SigLIP
    variant). The official mean runs over all pixels, ignored ones included (mmseg 0.16);
    ``avg_non_ignore=True`` averages over labelled pixels only.
    """
    if logit_scale is not None:
        logits = scores * math.exp(logit_scale) + (logit_bias or 0.0)
    else:
        logits = scores / tau
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    n = (labels != ignore_index).sum() if avg_non_ignore else labels.numel()
    return loss / max(int(n), 1)


class _Attention(nn.Module):
    """Multi-head attention with separate q / k / v projections (no bias), as DenseCLIP's."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, C = q.shape

        def split(x: torch.Tensor) -> torch.Tensor:                   # (B, n, C) -> (B, h, n, d)
            return x.view(B, -1, self.heads, C // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(k)),
                                             split(self.v_proj(v)))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class ContextDecoderLayer(nn.Module):
    """x += SelfAttn(LN1 x); x += CrossAttn(LN2 x, visual); x += Dropout(MLP(LN3 x))."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = _Attention(width, heads, dropout)
        self.cross_attn = _Attention(width, heads, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y)                                         # (B, K, W)
        y = self.norm2(x)
        x = x + self.cross_attn(y, visual, visual)                              # (B, K, W)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """tqdm's DenseCLIP-style text refinement (in its code, not its paper), per image:

    ``t = t0 + gamma * out_proj(layers(text_proj(t0), memory_proj([global; dense])))``.
    MFuser keeps this frame and swaps the layers for its MTEnhancer (``layers=``).
    ``gamma_init="trunc_normal"`` is the code (std 1: ``trunc_normal_`` overwrites the 1e-4 it
    was created with); a float sets a constant (1e-4: the intent).
    """

    def __init__(self, embed_dim: int, width: int = 256, heads: int = 4, num_layers: int = 3,
                 dropout: float = 0.1, gamma_init: str | float = "trunc_normal",
                 layers: Sequence[nn.Module] | None = None):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width),
                                         nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.decoder = nn.ModuleList(layers if layers is not None else (
            ContextDecoderLayer(width, heads, dropout) for _ in range(num_layers)))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.gamma = nn.Parameter(torch.empty(embed_dim))
        self.apply(self._init_weights)
        if gamma_init == "trunc_normal":
            nn.init.trunc_normal_(self.gamma, std=1.0)
        else:
            nn.init.constant_(self.gamma, float(gamma_init))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """DenseCLIP's: every Linear trunc_normal(0.02) with zero bias, LayerNorms (1, 0)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """text (K, E) or (B, K, E), visual (B, 1 + hw, E) -> refined text (B, K, E)."""
        B = visual.shape[0]
        if text.dim() == 2:
            text = text[None].expand(B, -1, -1)
        memory = self.memory_proj(visual)                                        # (B, 1+hw, W)
        x = self.text_proj(text)                                                 # (B, K, W)
        for layer in self.decoder:
            x = layer(x, memory)
        return text + self.gamma * self.out_proj(x)                              # (B, K, E)


def language_regularizer(text: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """tqdm's language term: CE over classes of cos(t_l, T0_k) (no temperature), target k = l.

    text (B, K, E) or (K, E); anchors (K, E), the frozen embeddings of "a clean origami of a {}".
    """
    logits = F.normalize(text, dim=-1) @ F.normalize(anchors, dim=-1).T          # (B, K, K)
    if logits.dim() == 2:
        logits = logits[None]
    target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.transpose(1, 2), target)


# ----------------------------------------------------------------------------------------------
# Necks: one ViT grid -> four maps at strides 4, 8, 16, 32 (x 4, x 2, x 1, x 0.5 of the grid)
# ----------------------------------------------------------------------------------------------


def neck_scales(patch_size: int) -> tuple[float, ...]:
    """Resize factors from a ViT grid (stride = patch) to strides 4, 8, 16, 32 of the image:
    (4, 2, 1, 0.5) at patch 16 as in the papers, (2, 1, 0.5, 0.25) at the toy models' patch 8."""
    return tuple(patch_size / s for s in (4, 8, 16, 32))


class RescaleNeck(nn.Module):
    """Rein's: the out_indices maps bilinearly rescaled to strides 4..32; no parameters."""

    def __init__(self, patch_size: int = 16):
        super().__init__()
        self.scales = neck_scales(patch_size)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [m if s == 1 else F.interpolate(m, scale_factor=s, mode="bilinear",
                                               align_corners=False)
                for m, s in zip(maps, self.scales, strict=True)]


def _fpn_stage(dim: int, scale: float) -> nn.Module:
    if scale == 4:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                             nn.ConvTranspose2d(dim, dim, 2, 2))
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim, 2, 2)
    if scale == 1:
        return nn.Identity()
    if scale in (0.5, 0.25):
        return nn.MaxPool2d(int(1 / scale))
    raise ValueError(f"no FPN stage for scale {scale}")


class SimpleFPN(nn.Module):
    """tqdm / MFuser's FPN at patch 16: ConvT-BN-GELU-ConvT (x4), ConvT (x2), identity, max-pool
    (x0.5). At patch 8 (the toy models) the same stages one octave down: ConvT, identity,
    max-pool 2, max-pool 4."""

    def __init__(self, dim: int, patch_size: int = 16):
        super().__init__()
        scales = neck_scales(patch_size)
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = (_fpn_stage(dim, s) for s in scales)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [op(m) for op, m in zip(ops, maps, strict=True)]


# ----------------------------------------------------------------------------------------------
# The segmentor
# ----------------------------------------------------------------------------------------------


class MaskFormerSegmentor(nn.Module):
    """Encoder (+ Reins) -> neck -> Mask2Former head, with class-text queries for tqdm.

    images (B, 3, H, W) in [0, 1]. ``loss(images, labels)`` gives the criterion's terms (and the
    pixel-text and regulariser terms when their weights are > 0); ``predict(images)`` the
    semantic scores (B, K, H/4, W/4). With ``prompts`` (a :class:`lessons.text.PromptLearner` on
    the encoder's own open_clip model) the class texts ``t`` (B, K, E) feed the queries and the
    pixel decoder; the encoder must then be a VLM.
    """

    def __init__(self, encoder: Encoder, neck: nn.Module, head: Mask2FormerHead,
                 criterion: MaskClassificationLoss, *, reins: Reins | None = None,
                 prompts: nn.Module | None = None, context_decoder: ContextDecoder | None = None,
                 finetune_encoder: bool = False, backbone_lr_mult: float = 1.0,
                 pixel_text_weight: float = 0.0, tau: float = 0.07,
                 language_weight: float = 0.0, anchors: torch.Tensor | None = None,
                 visual_weight: float = 0.0):
        super().__init__()
        if reins is not None and finetune_encoder:
            raise ValueError("Rein trains adapters on a frozen encoder: pass reins or "
                             "finetune_encoder, not both")
        if (head.cfg.query_source == "text" or pixel_text_weight) and prompts is None:
            raise ValueError("text queries and the pixel-text loss need prompts (class texts)")
        if head.cfg.query_source == "rein" and (reins is None or not reins.link_to_queries):
            raise ValueError("query_source 'rein' needs Reins built with link_to_queries=True")
        if language_weight and anchors is None:
            raise ValueError("the language regulariser needs anchors (K, E)")
        self.encoder, self.neck, self.head, self.criterion = encoder, neck, head, criterion
        self.reins, self.prompts, self.context_decoder = reins, prompts, context_decoder
        self.finetune_encoder, self.backbone_lr_mult = finetune_encoder, backbone_lr_mult
        self.pixel_text_weight, self.tau = pixel_text_weight, tau
        self.language_weight, self.visual_weight = language_weight, visual_weight
        self.register_buffer("anchors", anchors, persistent=False)
        if not finetune_encoder:
            encoder.freeze().eval()
        self.initial_encoder = None
        if visual_weight:                 # tqdm's reg_E0: a frozen copy of the starting encoder
            self.initial_encoder = copy.deepcopy(encoder).freeze().eval()
        self._adapter = reins.adapter(encoder) if reins is not None else None

    def train(self, mode: bool = True) -> MaskFormerSegmentor:
        super().train(mode)
        if not self.finetune_encoder:
            self.encoder.eval()
        if self.initial_encoder is not None:
            self.initial_encoder.eval()     # tqdm's copy returns to train mode; ours stays frozen
        return self

    # -- the forward pass ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> dict:
        """Encoder maps, last tokens and grid; with prompts, the dense and global embeddings."""
        enc = self.encoder
        x = enc.normalize(images)
        frozen = self.reins is None and not self.finetune_encoder
        with torch.no_grad() if frozen else contextlib.nullcontext():
            maps, tokens, grid = enc.forward_tokens(x, adapter=self._adapter)
        out = {"maps": maps, "tokens": tokens, "grid": grid, "pixels": x}
        if self.prompts is not None:
            out["dense"] = enc.dense_embedding(tokens, grid)                     # (B, E, h, w)
            out["global"] = enc.project(tokens)                                  # (B, E)
        return out

    def class_texts(self, feats: dict) -> torch.Tensor:
        """The class texts t (B, K, E): prompt-tuned, refined per image by the context decoder."""
        t0 = self.prompts()                                                      # (K, E)
        B = feats["maps"][0].shape[0]
        if self.context_decoder is None:
            return t0[None].expand(B, -1, -1)
        visual = torch.cat([feats["global"][:, None],
                            feats["dense"].flatten(2).transpose(1, 2)], dim=1)   # (B, 1+hw, E)
        return self.context_decoder(t0, visual)                                  # (B, K, E)

    def forward(self, images: torch.Tensor) -> tuple[list[Prediction], dict]:
        feats = self.encode(images)
        text = self.class_texts(feats) if self.prompts is not None else None
        rein_q = self.reins.queries() if self.head.cfg.query_source == "rein" else None
        preds = self.head(self.neck(feats["maps"]), text=text, rein_queries=rein_q)
        feats["text"] = text
        return preds, feats

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        preds, feats = self(images)
        losses = self.criterion(preds, labels)
        if self.pixel_text_weight:
            scores = pixel_text_scores(feats["dense"], feats["text"])
            losses["loss_pixel_text"] = self.pixel_text_weight * pixel_text_loss(
                scores, labels, self.tau, ignore_index=self.criterion.ignore_index)
        if self.language_weight:
            losses["loss_language"] = self.language_weight * language_regularizer(
                feats["text"], self.anchors)
        if self.visual_weight:
            with torch.no_grad():
                tokens0 = self.initial_encoder.forward_tokens(feats["pixels"])[1]
                global0 = self.initial_encoder.project(tokens0)                  # (B, E)
            losses["loss_visual"] = self.visual_weight * F.mse_loss(feats["global"], global0)
        return losses

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Semantic scores (B, K, H/4, W/4) from the last prediction."""
        return semantic_inference(self(images)[0][-1])

    # -- training helpers ------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """No decay on norms / embeddings / tokens; ``backbone_lr_mult`` on the encoder, Reins and
        neck (tqdm's FPN belongs to its backbone, so 0.1x too)."""
        return optimizer_groups(self, weight_decay, self.backbone_lr_mult,
                                backbone=("encoder.", "reins.", "neck."))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What trains (and the buffers of modules that train), each tensor once."""
        return trainable_state_dict(self)


# ----------------------------------------------------------------------------------------------
# The notebooks' models
# ----------------------------------------------------------------------------------------------



def toy_config(**overrides) -> Mask2FormerConfig:
    return Mask2FormerConfig.from_dict({**asdict(TOY_M2F), **overrides})


def build_toy_tqdm(queries: str = "text", matcher: str = "identity", text_attention: bool = True,
                   pixel_text_weight: float = 1.0, regularizers: bool = True,
                   context_layers: int = 1, n_ctx: int = 5, backbone_lr_mult: float = 0.1,
                   pretrained: bool = True) -> MaskFormerSegmentor:
    """tqdm on the toy VLM: its visual tower fine-tuned at ``backbone_lr_mult`` x lr with a
    SimpleFPN, prompt-tuned class texts as queries, identity matching, the pixel-text loss and
    both regularisers. ``queries="learnable"`` with ``matcher="hungarian"`` is Mask2Former's own
    query form on the same encoder (the notebook's comparison)."""
    from lessons.text import TQDM_REGULARIZER_TEMPLATE, PromptLearner, encode_text

    enc = build_encoder("toy_vlm", toy_weights_dir() if pretrained else None)
    for name, p in enc.model.named_parameters():
        if not name.startswith("visual."):
            p.requires_grad_(False)          # the text tower and logit scale stay frozen
    E = enc.bundle.embed_dim
    prompts = PromptLearner(enc.model, CLASSES, n_ctx=n_ctx)
    anchors = None
    if regularizers:
        anchors = encode_text(enc.model, [TQDM_REGULARIZER_TEMPLATE.format(c) for c in CLASSES])
    cfg = toy_config(in_channels=(enc.width,) * 4, query_source=queries,
                     text_dim=E if text_attention else None, pixel_post_norm=True)
    ctx = None
    if context_layers:
        ctx = ContextDecoder(E, width=64, heads=4, num_layers=context_layers)
    criterion = MaskClassificationLoss(matcher=matcher, num_points=None)
    return MaskFormerSegmentor(
        enc, SimpleFPN(enc.width, enc.patch_size), Mask2FormerHead(cfg), criterion, prompts=prompts,
        context_decoder=ctx, finetune_encoder=True, backbone_lr_mult=backbone_lr_mult,
        pixel_text_weight=pixel_text_weight, language_weight=1.0 if regularizers else 0.0,
        anchors=anchors, visual_weight=1.0 if regularizers else 0.0)


def build_toy_frozen_mask2former(num_queries: int = 19, matcher: str = "hungarian",
                                 pretrained: bool = True) -> MaskFormerSegmentor:
    """The control of Rein + Mask2Former (and of QueryDiff): the same frozen toy VFM, neck, head
    and Hungarian matching, with Mask2Former's own learnable queries and no Rein: what the
    decoder alone gets from frozen features."""
    enc = build_encoder("toy_vfm", toy_weights_dir() if pretrained else None)
    cfg = toy_config(in_channels=(enc.width,) * 4, query_source="learnable",
                     num_queries=num_queries)
    criterion = MaskClassificationLoss(matcher=matcher, num_points=None)
    return MaskFormerSegmentor(enc, RescaleNeck(enc.patch_size), Mask2FormerHead(cfg), criterion)


def build_toy_rein_mask2former(token_length: int = 19, lora_rank: int | None = 8,
                               matcher: str = "hungarian", pretrained: bool = True
                               ) -> MaskFormerSegmentor:
    """Rein + Mask2Former on the frozen toy VFM: the tokens' link gives the decoder's queries
    (m = ``token_length`` queries; the paper: 100), Hungarian matching, Rein's rescale neck."""
    enc = build_encoder("toy_vfm", toy_weights_dir() if pretrained else None)
    cfg = toy_config(in_channels=(enc.width,) * 4, query_source="rein", num_queries=token_length)
    reins = Reins(enc.depth, enc.width, token_length=token_length, lora_rank=lora_rank,
                  query_dim=cfg.hidden_dim, link_to_queries=True, patch_size=enc.patch_size)
    criterion = MaskClassificationLoss(matcher=matcher, num_points=None)
    return MaskFormerSegmentor(enc, RescaleNeck(enc.patch_size), Mask2FormerHead(cfg), criterion,
                               reins=reins)
