"""MFuser: Mamba as a bridge between a VFM and a VLM for domain-generalised segmentation.

X. Zhang and R. T. Tan, *Mamba as a Bridge: Where Vision Foundation Models Meet Vision Language
Models for Domain-Generalized Semantic Segmentation* (CVPR 2025). Both foundation models stay
frozen and run **block by block in lock-step**; after every pair of blocks a small Mamba mixer,
the **MVFuser**, reads the two token sequences concatenated along the token axis, ``[VFM; VLM]``,
and writes a residual update back into each (Fig. 2a, b). The VLM's text side is refined per
image by the **MTEnhancer** (Fig. 2c), and the result feeds tqdm's text-query Mask2Former
(:mod:`lessons.mask2former`) plus a pixel-text alignment loss.

- :class:`MVFuser` (Fig. 2b), as the official ``adapter_module.py`` has it: one bias-free
  ``in_proj`` split into a *sequential* branch x and a *spatial* branch z; depthwise 1-D
  convolutions (kernel 3, non-causal ``same`` padding, no bias) and SiLU on both; the selection
  ``x_proj -> (dt, B, C)``, ``dt_proj``; the selective scan of :mod:`lessons.ssm`; a gated
  RMSNorm ``RMSNorm(y) * silu(z)``; ``out_proj``, dropout 0.1 and a learnable scalar ``scale``
  (1e-3) on the output, so the residual update starts near zero. At d_model 1024 (d_state 16,
  d_conv 3, expand 1) it has 1,667,585 parameters (the paper's Table 3: 1.67 M).
- :class:`FusedEncoder`: any two :class:`lessons.backbones.Encoder` of equal depth and width;
  after block i, ``u = Fuser_i([P1_i(d); v])``, ``d += P2_i(u_VFM)``, ``v += u_VLM``; the maps at
  the out_indices are ``[d | v]`` on the channel axis (2C), which a :class:`SimpleFPN` turns
  into strides 4..32. ``P1 / P2`` (and ``P3``, the VFM's share of the dense VLM embedding) exist
  in the CLIP variant only; EVA02 and SigLIP concatenate raw tokens.
- :class:`MTEnhancer` (Fig. 2c): self-attention over the class texts, then an MVFuser over
  ``[text; visual; text]`` ("copy"), keeping both text outputs and dropping the visual part
  ("drop"), then an MLP; it is the layer of tqdm's :class:`ContextDecoder` frame, whose
  ``t = t0 + gamma * out_proj(...)`` update MFuser keeps.
- :class:`MFuserSegmentor`: fused encoder + FPN + MTEnhancer + tqdm's Mask2Former (one text query
  per class, identity matching) + the pixel-text alignment loss.
- Fusion alternatives with the same interface (the paper's Tables 3-4): self-attention over the
  concatenation, separate self-attention, separate MVFusers, Rein-style cross-attention, none.
- :func:`convert_official_mfuser`: an official checkpoint -> our state dict, with a report.

**Paper vs official code** (we follow the code, devinxzhang/MFuser at commit cd8ef85: the MVFuser is
``models/backbones/eva_clip/adapter_module.py#L60-L180``, the per-block fusion of the CLIP variant
``models/backbones/clip/models.py#L331-L347``; the paper's form is a flag where cheap):

- Δ's bias is applied twice, ``softplus(W dt + 2 b)`` (``dt_proj`` with its bias, then the scan's
  ``delta_bias``, inherited from MambaVision): ``dt_bias_twice=False`` applies it once (Mamba).
- the gate is ``silu(silu(conv(z)))`` (SiLU after the conv and again in the gated norm):
  ``gate_silu_twice=False`` keeps one.
- the schedule is poly decay (power 0.9) after a 1,500-iteration warm-up; the paper says linear
  decay (``reprod`` configs: ``schedule``).
- the MTEnhancer's MVFuser is re-initialised with the rest of the context decoder (trunc-normal
  0.02, biases 0): its Δ bias becomes 0, so Δ starts at softplus(0) ≈ 0.69, not in [1e-3, 0.1].
- ``gamma`` and the prompt ``contexts`` are trunc-normal with std 1 (the 1e-4 ``gamma`` is
  overwritten), as in tqdm's code.
- the frozen towers run in eval mode here; the official model trains in ``train()`` mode, so
  CLIP's stochastic depth (0.1) is active in its frozen tower.

Dimension glossary: B batch, C token width of both encoders, N_d / N_v tokens of the VFM / VLM
(prefix + h*w), L = N_d + N_v the fused sequence, D the MVFuser's inner width (expand * C), D/2 the
width of each branch, N the SSM state size (d_state), R the rank of Δ's projection (dt_rank), h w
token grid, E joint image-text width, K classes (19), W the context decoder's width.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lessons.backbones import Encoder, _attention_pool_dense, build_encoder, toy_weights_dir
from lessons.classes import CLASSES
from lessons.convert import convert_official_mfuser, load_official_mfuser
from lessons.convert import official_mfuser_to_ours as official_to_ours
from lessons.mask2former import (
    MFUSER_M2F,
    ContextDecoder,
    Mask2FormerHead,
    MaskClassificationLoss,
    MaskFormerSegmentor,
    SimpleFPN,
    _Attention,
    pixel_text_loss,
    pixel_text_scores,
    toy_config,
)
from lessons.ssm import IMPLS, RMSNormGated, init_dt_bias, s4d_real_A_log, selective_scan

# with the names of the official converter (lessons.convert) this lesson introduces
__all__ = [
    "ENHANCERS",
    "FUSIONS",
    "MFUSER_VARIANTS",
    "ConcatFuser",
    "CrossAttentionFuser",
    "FusedEncoder",
    "MFuserSegmentor",
    "MTEnhancer",
    "MVFuser",
    "SelfAttentionMixer",
    "SeparateFuser",
    "build_context_decoder",
    "build_mfuser",
    "build_toy_mfuser",
    "convert_official_mfuser",
    "load_official_mfuser",
    "make_fuser",
    "official_to_ours",
    "pixel_text_sigmoid_loss",
    "trainable_parameter_counts",
]

# ----------------------------------------------------------------------------------------------
# MVFuser (Fig. 2b)
# ----------------------------------------------------------------------------------------------


class MVFuser(nn.Module):
    """The Mamba-based fuser: (B, L, C) -> a residual update (B, L, C).

    ``forward(h)``::

        x, z = in_proj(h).split(D/2)                 # sequential / spatial branch, (B, D/2, L)
        x = silu(conv1d_x(x));  z = silu(conv1d_z(z))  # depthwise, kernel d_conv, 'same', no bias
        dt, B, C = x_proj(x).split([R, N, N])        # selection, per token
        Δ = softplus(dt_proj(dt) + b_dt)             # b_dt twice: dt_proj's own bias, then again
        y = selective_scan(x, Δ, A=-exp(A_log), B, C, D)   # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t
        y = RMSNorm(y) * silu(z)                     # gated norm (the code's second silu on z)
        return dropout(out_proj(y)) * scale          # scale: a scalar, 1e-3 at init

    Parameter names equal the official ``backbone.adapter.{i}.*`` keys, so its tensors load by
    name (:func:`convert_official_mfuser`). The scan is unidirectional over the sequence as given.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 1,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dropout: float = 0.1, scale_init: float = 1e-3,
                 dt_bias_twice: bool = True, gate_silu_twice: bool = True,
                 scan_impl: str = "auto"):
        super().__init__()
        if scan_impl not in IMPLS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; choose one of {IMPLS}")
        d_inner = expand * d_model
        if d_inner % 2:
            raise ValueError(f"expand * d_model = {d_inner} must be even: it splits in two")
        self.d_model, self.d_state, self.d_inner = d_model, d_state, d_inner
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_bias_twice, self.gate_silu_twice = dt_bias_twice, gate_silu_twice
        self.scan_impl = scan_impl
        half = d_inner // 2
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        with torch.no_grad():
            std = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-std, std)
        init_dt_bias(self.dt_proj.bias, dt_min, dt_max, dt_init_floor)
        self.A_log = nn.Parameter(s4d_real_A_log(half, d_state))                 # (D/2, N)
        self.D = nn.Parameter(torch.ones(half))                                  # (D/2,)
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.norm = RMSNormGated(half, eps=1e-5, norm_before_gate=True)
        self.out_proj = nn.Linear(half, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def branches(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequential branch x = silu(conv(x)) and the spatial branch's gate input, (B, D/2, L).

        The gated norm applies silu to what it gets, so the code's gate is silu(conv(z)) here
        (silu twice in all); with ``gate_silu_twice=False`` it is conv(z) (silu once).
        """
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)                   # (B, D/2, L)
        z = self.conv1d_z(z)
        return F.silu(self.conv1d_x(x)), F.silu(z) if self.gate_silu_twice else z

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ before the scan's bias (B, D/2, L), and B, C (B, N, L): the selection."""
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)                  # (B, L, R|N|N)
        delta = self.dt_proj(dt) if self.dt_bias_twice else F.linear(dt, self.dt_proj.weight)
        return delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.d_model:
            raise ValueError(f"MVFuser expects (B, L, {self.d_model}), got {tuple(h.shape)}")
        x, gate = self.branches(h)                                               # (B, D/2, L)
        delta, B, C = self.ssm_inputs(x)
        A = -torch.exp(self.A_log.float())                                       # (D/2, N)
        y = selective_scan(x, delta, A, B, C, self.D.float(),
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           impl=self.scan_impl)                                  # (B, D/2, L)
        y = self.norm(y.transpose(1, 2), gate.transpose(1, 2))                   # (B, L, D/2)
        return self.dropout(self.out_proj(y)) * self.scale                      # (B, L, C)


# ----------------------------------------------------------------------------------------------
# Fusers: one per block pair, (d, v) -> (update of d, update of v)
# ----------------------------------------------------------------------------------------------


class ConcatFuser(nn.Module):
    """A sequence mixer over the token-axis concatenation ``[d; v]`` (B, N_d + N_v, C), its
    output split back into the two streams' updates. MFuser's form with an :class:`MVFuser`;
    the paper's "self-attn (concat.)" with a :class:`SelfAttentionMixer`."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, d: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.mixer(torch.cat([d, v], dim=1))                                 # (B, L, C)
        return u[:, :d.shape[1]], u[:, d.shape[1]:]


class SeparateFuser(nn.Module):
    """One mixer per stream, no exchange between them (the paper's "separate" rows)."""

    def __init__(self, mixer_vfm: nn.Module, mixer_vlm: nn.Module):
        super().__init__()
        self.mixer_vfm, self.mixer_vlm = mixer_vfm, mixer_vlm

    def forward(self, d: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixer_vfm(d), self.mixer_vlm(v)


class SelfAttentionMixer(nn.Module):
    """``scale * MHA(LN(h))``: attention as the mixer, near zero at init like the MVFuser.
    At C 1024 it has 4.20 M parameters, the paper's Table 3 count (its norm is our choice)."""

    def __init__(self, width: int, heads: int, scale_init: float = 1e-3):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.norm(h)                                                         # (B, L, C)
        return self.attn(y, y, y, need_weights=False)[0] * self.scale


class CrossAttentionFuser(nn.Module):
    """Rein-style cross-attention (Table 4), in our reading: each stream's tokens ask the other's,
    ``d += scale_d * MHA(LN d, LN v)``, ``v += scale_v * MHA(LN v, LN d)``."""

    def __init__(self, width: int, heads: int, scale_init: float = 1e-3):
        super().__init__()
        self.norm_vfm, self.norm_vlm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn_vfm = nn.MultiheadAttention(width, heads, batch_first=True)   # d asks v
        self.attn_vlm = nn.MultiheadAttention(width, heads, batch_first=True)   # v asks d
        self.scale_vfm = nn.Parameter(torch.tensor(float(scale_init)))
        self.scale_vlm = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, d: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nd, nv = self.norm_vfm(d), self.norm_vlm(v)
        dd = self.attn_vfm(nd, nv, nv, need_weights=False)[0] * self.scale_vfm  # (B, N_d, C)
        dv = self.attn_vlm(nv, nd, nd, need_weights=False)[0] * self.scale_vlm  # (B, N_v, C)
        return dd, dv


FUSIONS = ("mvfuser", "self_attention", "separate_self_attention", "separate_mvfusers",
           "cross_attention", "none")
"""MFuser's fuser and the alternatives its Tables 3-4 compare ("none": the frozen towers'
concatenated features, no fuser)."""


def make_fuser(fusion: str, width: int, heads: int = 8, **mvfuser_kwargs) -> nn.Module | None:
    """One fuser of kind ``fusion`` (see :data:`FUSIONS`) for tokens of ``width``."""
    if fusion == "mvfuser":
        return ConcatFuser(MVFuser(width, **mvfuser_kwargs))
    if fusion == "self_attention":
        return ConcatFuser(SelfAttentionMixer(width, heads))
    if fusion == "separate_self_attention":
        return SeparateFuser(SelfAttentionMixer(width, heads), SelfAttentionMixer(width, heads))
    if fusion == "separate_mvfusers":
        return SeparateFuser(MVFuser(width, **mvfuser_kwargs), MVFuser(width, **mvfuser_kwargs))
    if fusion == "cross_attention":
        return CrossAttentionFuser(width, heads)
    if fusion == "none":
        return None
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")


# ----------------------------------------------------------------------------------------------
# The fused dual encoder (Fig. 2a)
# ----------------------------------------------------------------------------------------------


class FusedEncoder(nn.Module):
    """A frozen VFM and a frozen VLM in lock-step, a fuser after every block pair.

    Per block i (VLM block first, as the code)::

        v = vlm.block_i(v);  d = vfm.block_i(d)            # (B, N_v, C), (B, N_d, C)
        u_d, u_v = fuser_i(P1_i(d), v)                     # MVFuser over [P1 d; v]
        d = d + P2_i(u_d);   v = v + u_v
        at the out_indices: maps += [patch_map(d) | patch_map(v)]   # (B, 2C, h, w)

    After the last block, the dense and global VLM embeddings carry the VFM too:
    CLIP ``proj(ln_post(v + P3(d)))``; EVA02 ``head(norm(v) + vfm.norm(d))``; SigLIP its
    attention-pool head (dense: every token its own query) on ``norm(v) + vfm.norm(d)``.
    ``d`` is first aligned to the VLM's token layout (its CLS if the VLM has one, then patches;
    the VFM's registers are dropped).

    ``projections`` (P1, P2, P3): default on for an OpenAI-style CLIP tower (the official CLIP
    variant), off otherwise (EVA02, SigLIP: raw tokens; the SigLIP code creates them unused).
    Each encoder normalises the [0, 1] images with its own statistics (the official code
    de-normalises CLIP-normalised input and re-normalises per tower: the same tensors).
    """

    def __init__(self, vfm: Encoder, vlm: Encoder, fusion: str = "mvfuser",
                 projections: bool | None = None, heads: int = 8, **mvfuser_kwargs):
        super().__init__()
        if vlm.bundle.kind != "vlm":
            raise ValueError(f"the second encoder must be a VLM, got {vlm.bundle.name} "
                             f"({vlm.bundle.kind})")
        if (vfm.depth, vfm.width) != (vlm.depth, vlm.width):
            raise ValueError(f"MFuser fuses block by block: the encoders need equal depth and "
                             f"width, got {vfm.bundle.name} ({vfm.depth} x {vfm.width}) and "
                             f"{vlm.bundle.name} ({vlm.depth} x {vlm.width})")
        if vfm.bundle.out_indices != vlm.bundle.out_indices:
            raise ValueError(f"out_indices differ: {vfm.bundle.out_indices} vs "
                             f"{vlm.bundle.out_indices}")
        self.vfm, self.vlm, self.fusion = vfm, vlm, fusion
        C, depth = vlm.width, vlm.depth
        self.out_indices = vlm.bundle.out_indices
        fusers = [make_fuser(fusion, C, heads, **mvfuser_kwargs) for _ in range(depth)]
        self.fusers = None if fusion == "none" else nn.ModuleList(fusers)
        if projections is None:
            projections = vlm.style == "open_clip" and fusion != "none"
        self.proj1 = self.proj2 = self.proj3 = None
        if projections:
            self.proj1 = nn.ModuleList(nn.Linear(C, C) for _ in range(depth))
            self.proj2 = nn.ModuleList(nn.Linear(C, C) for _ in range(depth))
            self.proj3 = nn.Linear(C, C)

    @property
    def out_channels(self) -> int:
        return 2 * self.vlm.width

    @property
    def patch_size(self) -> int:
        return self.vlm.patch_size

    def freeze(self) -> FusedEncoder:
        """Freeze both foundation models; the fusers and projections keep training."""
        self.vfm.freeze()
        self.vlm.freeze()
        return self

    def train(self, mode: bool = True) -> FusedEncoder:
        super().train(mode)
        self.vfm.eval()          # frozen towers: eval mode (the code keeps them in train mode)
        self.vlm.eval()
        return self

    def fuse(self, i: int, d: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuser i's residual updates of the two streams (identity when fusion is "none")."""
        if self.fusers is None:
            return d, v
        u_d, u_v = self.fusers[i](self.proj1[i](d) if self.proj1 is not None else d, v)
        return d + (self.proj2[i](u_d) if self.proj2 is not None else u_d), v + u_v

    def forward(self, images: torch.Tensor) -> dict:
        """Images in [0, 1] (B, 3, H, W) -> ``maps`` [(B, 2C, h, w)] at the out_indices, the
        VLM-space ``global`` (B, E) and ``dense`` (B, E, h, w) embeddings, ``grid``."""
        d, grid_d = self.vfm.embed(self.vfm.normalize(images))                  # (B, N_d, C)
        v, grid = self.vlm.embed(self.vlm.normalize(images))                    # (B, N_v, C)
        if (grid_d.h, grid_d.w) != (grid.h, grid.w):
            raise ValueError(f"token grids differ: VFM {grid_d.h}x{grid_d.w}, VLM "
                             f"{grid.h}x{grid.w}; give both the same patch size "
                             "(Encoder.set_patch_size)")
        maps = []
        no_grad = self.fusers is None          # nothing to train inside the towers
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            for i in range(self.vlm.depth):
                v = self.vlm.block(i, v, grid)
                d = self.vfm.block(i, d, grid_d)
                d, v = self.fuse(i, d, v)
                if i in self.out_indices:
                    maps.append(torch.cat([self.vfm.patch_map(d, grid_d),
                                           self.vlm.patch_map(v, grid)], dim=1))  # (B, 2C, h, w)
            glob, dense = self.embeddings(d, v, grid)
        return {"maps": maps, "global": glob, "dense": dense, "grid": grid, "tokens": v}

    def align_vfm(self, d: torch.Tensor) -> torch.Tensor:
        """VFM tokens in the VLM's layout: [CLS] + patches when the VLM has a CLS, else patches."""
        patches = d[:, self.vfm.num_prefix_tokens:]                              # (B, hw, C)
        if self.vlm.num_prefix_tokens == 0:
            return patches
        return torch.cat([d[:, :1], patches], dim=1)                             # (B, 1+hw, C)

    def embeddings(self, d: torch.Tensor, v: torch.Tensor, grid) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        """The fused global (B, E) and dense (B, E, h, w) embeddings in the VLM's joint space."""
        vlm, vit = self.vlm, self.vlm.vit
        d = self.align_vfm(d)
        if vlm.style == "open_clip":                                   # CLIP variant
            h = v + self.proj3(d) if self.proj3 is not None else v
            tokens = vit.ln_post(h) @ vit.proj                                   # (B, 1+hw, E)
            return tokens[:, 0], vlm.patch_map(tokens, grid)
        h = vit.norm(v) + self.vfm.final_norm(d)                                 # (B, N_v, C)
        pool = getattr(vit, "attn_pool", None)
        if pool is not None:                                           # SigLIP: no CLS
            glob = vlm._timm_head(pool(h))
            dense = vlm._timm_head(_attention_pool_dense(pool, h))
        else:                                                          # EVA02: CLS + patches
            glob, dense = vlm._timm_head(h[:, 0]), vlm._timm_head(h)
        return glob, vlm.patch_map(dense, grid)


# ----------------------------------------------------------------------------------------------
# MTEnhancer (Fig. 2c) and the context decoder around it
# ----------------------------------------------------------------------------------------------


class MTEnhancer(nn.Module):
    """Text x (B, K, W), visual memory (B, 1+hw, W) -> enhanced text (B, K, W)::

        x = x + SelfAttn(LN1 x)                          # the classes see each other
        s = MVFuser([LN2 x; visual; LN2 x])              # copy the text before and after the image
        x = x + s[:, :K] + s[:, -K:]                     # keep both text outputs, drop the visual
        x = x + Dropout(MLP(LN3 x))

    The unidirectional scan lets the first text copy only see text, the second see the image
    too; summing both is the "hybrid" the paper's Table 6 ablates. Module names equal the official
    ``context_decoder.decoder.{l}.*`` keys (``cross_attn`` is the MVFuser).
    """

    def __init__(self, width: int = 256, heads: int = 4, dropout: float = 0.1,
                 d_state: int = 16, **mvfuser_kwargs):
        super().__init__()
        self.self_attn = _Attention(width, heads, dropout)
        self.cross_attn = MVFuser(width, d_state=d_state, dropout=dropout, **mvfuser_kwargs)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        K = x.shape[1]
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y)                                          # (B, K, W)
        y = self.norm2(x)
        s = self.cross_attn(torch.cat([y, visual, y], dim=1))                    # (B, 2K+1+hw, W)
        x = x + s[:, :K] + s[:, -K:]                                             # (B, K, W)
        return x + self.dropout(self.mlp(self.norm3(x)))


ENHANCERS = ("mtenhancer", "attention", "none")
"""Text enhancement: MFuser's MTEnhancer, tqdm's attention layer (Table 6 "cross-attention"), or
none (the prompt-tuned texts as they are)."""


def build_context_decoder(embed_dim: int, width: int = 256, heads: int = 4, num_layers: int = 1,
                          enhancer: str = "mtenhancer", dropout: float = 0.1
                          ) -> ContextDecoder | None:
    """MFuser's context decoder: tqdm's frame (``t = t0 + gamma * out(...)``) around
    ``num_layers`` MTEnhancers (the published configuration: 1 layer, width 256, 4 heads).
    The frame re-initialises every Linear inside it, the MVFuser's too (its Δ bias becomes 0)."""
    if enhancer == "none":
        return None
    if enhancer == "attention":
        return ContextDecoder(embed_dim, width, heads, num_layers, dropout)
    if enhancer != "mtenhancer":
        raise ValueError(f"unknown enhancer {enhancer!r}; choose one of {ENHANCERS}")
    layers = [MTEnhancer(width, heads, dropout) for _ in range(num_layers)]
    return ContextDecoder(embed_dim, width, heads, dropout=dropout, layers=layers)


# ----------------------------------------------------------------------------------------------
# The segmentor
# ----------------------------------------------------------------------------------------------


def pixel_text_sigmoid_loss(scores: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                            logit_bias: float, ignore_index: int = 255) -> torch.Tensor:
    """A SigLIP-style per-class sigmoid alternative to the code's softmax CE: BCE of
    ``score * exp(logit_scale) + logit_bias`` against one-hot labels, over labelled pixels."""
    logits = scores * math.exp(logit_scale) + logit_bias
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != ignore_index                                               # (B, H, W)
    onehot = F.one_hot(labels.long().where(valid, 0), logits.shape[1]).permute(0, 3, 1, 2)
    bce = F.binary_cross_entropy_with_logits(logits, onehot.to(logits.dtype), reduction="none")
    return (bce.sum(1) * valid).sum() / valid.sum().clamp(min=1)


class MFuserSegmentor(MaskFormerSegmentor):
    """Fused encoder -> SimpleFPN (2C) -> tqdm's text-query Mask2Former; class texts from the
    prompt learner, refined per image by the MTEnhancer context decoder.

    ``loss``: the mask-classification loss on every prediction plus ``pixel_text_weight`` x the
    pixel-text alignment CE on ``cos(dense, t)`` over classes: ``/ tau`` for CLIP and EVA02;
    for SigLIP (``logit_scale`` given) ``* exp(logit_scale) + logit_bias`` as the code
    (``pixel_text_form="sigmoid"``: SigLIP's own per-class sigmoid instead).
    """

    def __init__(self, encoder: FusedEncoder, neck: nn.Module, head: Mask2FormerHead,
                 criterion: MaskClassificationLoss, *, prompts: nn.Module,
                 context_decoder: ContextDecoder | None = None, pixel_text_weight: float = 1.0,
                 tau: float = 0.07, logit_scale: float | None = None,
                 logit_bias: float | None = None, pixel_text_form: str = "softmax"):
        if pixel_text_form not in ("softmax", "sigmoid"):
            raise ValueError(f"pixel_text_form must be 'softmax' or 'sigmoid', got "
                             f"{pixel_text_form!r}")
        if pixel_text_form == "sigmoid" and logit_scale is None:
            raise ValueError("the sigmoid pixel-text form needs SigLIP's logit_scale and bias")
        super().__init__(encoder, neck, head, criterion, prompts=prompts,
                         context_decoder=context_decoder, pixel_text_weight=pixel_text_weight,
                         tau=tau)
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.pixel_text_form = pixel_text_form
        self.train()

    def train(self, mode: bool = True) -> MFuserSegmentor:
        nn.Module.train(self, mode)     # fusers train (dropout 0.1); the towers stay in eval
        return self

    def encode(self, images: torch.Tensor) -> dict:
        return self.encoder(images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        preds, feats = self(images)
        losses = self.criterion(preds, labels)
        if self.pixel_text_weight:
            scores = pixel_text_scores(feats["dense"], feats["text"])            # (B, K, h, w)
            ignore = self.criterion.ignore_index
            if self.pixel_text_form == "sigmoid":
                term = pixel_text_sigmoid_loss(scores, labels, self.logit_scale,
                                               self.logit_bias or 0.0, ignore)
            else:
                term = pixel_text_loss(scores, labels, self.tau, self.logit_scale,
                                       self.logit_bias, ignore_index=ignore)
            losses["loss_pixel_text"] = self.pixel_text_weight * term
        return losses


# ----------------------------------------------------------------------------------------------
# Builders: the published variants (DINOv2-L + a VLM-L) and the notebooks' toy pair
# ----------------------------------------------------------------------------------------------

MFUSER_VARIANTS: dict[str, dict] = {
    "clip": dict(vlm="clip_vitl14_336", patch_size=16, n_ctx=5, weight_decay=1e-4),
    "eva": dict(vlm="eva02_clip_l14_336", patch_size=14, n_ctx=8, weight_decay=1e-5),
    "siglip": dict(vlm="siglip_vitl16_384", patch_size=16, n_ctx=5, weight_decay=1e-5),
}
"""The official configs (``configs/mfuser/mfuser_{clip,eva,siglip}_vit-l_*``): the VLM, the patch
size both towers run at (CLIP / SigLIP: 14 -> 16 for DINOv2 and CLIP; EVA02: 14), the learnable
prompt length (context length 10 / 13 / 10 minus 5 name tokens) and AdamW's weight decay."""


def build_mfuser(variant: str = "eva", vfm_weights: str | Path | None = None,
                 vlm_weights: str | Path | None = None, image_size: int = 512,
                 fusion: str = "mvfuser", enhancer: str = "mtenhancer",
                 tokenizer=None, meta: bool = False, scan_impl: str = "auto") -> MFuserSegmentor:
    """MFuser at the published size: DINOv2-L + ``variant``'s VLM at ``image_size`` crops, 24
    MVFusers, the 2048-channel FPN, MTEnhancer (width 256, 1 layer), tqdm's head with 19 text
    queries. Weights load from local files (see :mod:`lessons.backbones`); ``meta`` builds on the
    meta device to count parameters without memory. SigLIP needs its ``tokenizer``
    (:func:`lessons.text.load_siglip_tokenizer`)."""
    from lessons.text import PromptLearner

    if variant not in MFUSER_VARIANTS:
        raise ValueError(f"unknown MFuser variant {variant!r}; choose one of "
                         f"{sorted(MFUSER_VARIANTS)}")
    var = MFUSER_VARIANTS[variant]
    vfm = build_encoder("dinov2_vitl14", vfm_weights, meta=meta)
    vlm = build_encoder(var["vlm"], vlm_weights, meta=meta)
    p = var["patch_size"]
    grid = (image_size // p, image_size // p)
    clip_like = vlm.style == "open_clip"
    if not meta:                               # resized once at load time, as the code does
        for enc, how in ((vfm, "bicubic"), (vlm, "bilinear" if clip_like else "bicubic")):
            if enc.patch_size != p:
                enc.set_patch_size(p, how)
            enc.set_pos_grid(grid, how)
    with torch.device("meta") if meta else contextlib.nullcontext():
        fused = FusedEncoder(vfm, vlm, fusion, scan_impl=scan_impl)
        E = vlm.bundle.embed_dim
        head = Mask2FormerHead(replace(MFUSER_M2F, text_dim=E))      # 768, SigLIP 1024
        ctx = build_context_decoder(E, 256, 4, 1, enhancer)
        neck = SimpleFPN(fused.out_channels, 16)     # strides 4..32 of the grid (x4, x2, x1, /2)
    prompts = PromptLearner(vlm.model, CLASSES, n_ctx=var["n_ctx"], tokenizer=tokenizer)
    scale = bias = None
    if getattr(vlm.model, "logit_bias", None) is not None and not meta:   # SigLIP's calibration
        scale, bias = float(vlm.model.logit_scale), float(vlm.model.logit_bias)
    criterion = MaskClassificationLoss(matcher="identity")
    return MFuserSegmentor(fused, neck, head, criterion, prompts=prompts, context_decoder=ctx,
                           logit_scale=scale, logit_bias=bias)


def build_toy_mfuser(fusion: str = "mvfuser", enhancer: str = "mtenhancer",
                     pixel_text_weight: float = 1.0, n_ctx: int = 5, d_state: int = 16,
                     projections: bool | None = None, pretrained: bool = True,
                     first_tower: str = "toy_vfm") -> MFuserSegmentor:
    """MFuser on the toy pair: the frozen toy VFM (DINOv2-style) and toy VLM (CLIP-style, so the
    CLIP variant's P1 / P2 / P3), 6 MVFusers at width 192 over 133 + 129 tokens, the FPN on the
    384-channel maps, an MTEnhancer of width 64, the toy Mask2Former with 19 text queries.

    ``first_tower`` replaces the VFM (the lesson's near-twins control: ``"toy_vlm"`` fuses a
    second copy of the VLM's image tower with the VLM, two towers with the same blind spots)."""
    from lessons.text import PromptLearner

    vfm = build_encoder(first_tower, toy_weights_dir() if pretrained else None)
    vlm = build_encoder("toy_vlm", toy_weights_dir() if pretrained else None)
    fused = FusedEncoder(vfm, vlm, fusion, projections=projections, heads=4, d_state=d_state)
    E = vlm.bundle.embed_dim
    prompts = PromptLearner(vlm.model, CLASSES, n_ctx=n_ctx)
    cfg = toy_config(in_channels=(fused.out_channels,) * 4, query_source="text", text_dim=E,
                     pixel_post_norm=True)
    ctx = build_context_decoder(E, width=64, heads=4, num_layers=1, enhancer=enhancer)
    criterion = MaskClassificationLoss(matcher="identity", num_points=None)
    return MFuserSegmentor(fused, SimpleFPN(fused.out_channels, fused.patch_size),
                           Mask2FormerHead(cfg), criterion, prompts=prompts, context_decoder=ctx,
                           pixel_text_weight=pixel_text_weight)


# ----------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------


def _n(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def trainable_parameter_counts(model: MFuserSegmentor) -> dict[str, int]:
    """What trains, by part (works on the meta device). ``prompts + gamma`` is the official
    top-level ``contexts`` and ``gamma``; ``context decoder`` excludes gamma, as the official
    ``ContextDecoder`` holds it outside (devinxzhang/MFuser@cd8ef85
    ``models/backbones/clip/models.py``): 1,494,401 at 768-d."""
    enc = model.encoder
    ctx = model.context_decoder
    gamma = ctx.gamma.numel() if ctx is not None else 0
    parts = {
        "fusers": _n(enc.fusers),
        "projections P1 P2 P3": _n(enc.proj1, enc.proj2, enc.proj3),
        "FPN": _n(model.neck),
        "context decoder": _n(ctx) - gamma,
        "Mask2Former head": _n(model.head),
        "prompts + gamma": model.prompts.contexts.numel() + gamma,
    }
    parts["total"] = sum(parts.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != parts["total"]:
        raise AssertionError(f"parts sum to {parts['total']} but {trainable} parameters train")
    return parts

