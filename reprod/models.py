"""The methods at the papers' scale, built from the same ``lessons`` modules the notebooks teach.

Every builder takes local weight paths (``None``: random weights, e.g. for benchmarks) and
``meta=True`` to build on the meta device, where only shapes and parameter counts exist (a
ViT-L pair in under a second instead of minutes and gigabytes). The configs in
``reprod/configs/`` name a builder of :data:`BUILDERS` and its arguments.

- ``rein_mask2former``: frozen DINOv2-L / EVA02-L at patch 16, LoRA Reins (m 100, r 16) linked
  to Mask2Former's 100 queries, Hungarian matching (w1oves/Rein@7da85bc
  ``configs/_base_/models/rein_dinov2_mask2former.py``);
- ``mask2former``: the same head on a frozen or fully fine-tuned encoder with learnable queries
  (Rein's Frozen / Full baselines);
- ``tqdm`` (:func:`tqdm_mask2former`, so the name does not shadow the progress bar):
  EVA02-CLIP-L/14-336 at 512 (patch 14 kept), fine-tuned at 0.1 x lr, SimpleFPN, 19
  text queries, the context decoder (3 layers), both regularisers (ByeongHyunPak/tqdm@75168af
  ``configs/tqdm/tqdm_eva_vit-l_1e-5_20k-g2c-512.py``, ``models/segmentors/tqdm_eva_clip.py``);
- ``querydiff``: ``rein_mask2former`` plus agent queries, refinement and Stable Diffusion 2.1's
  guidance (the QueryDiff paper's §4; its release does not run, see ``lessons.querydiff``);
- ``catseg``: CAT-Seg's aggregator on CLIP ViT-L/14-336 trained on GTAV's 19 classes, our own
  DGSS config (CAT-Seg's own recipe is COCO-Stuff's: cvlab-kaist/CAT-Seg@6d3a188
  ``configs/vitl_336.yaml``);
- ``mfuser``: :func:`lessons.mfuser.build_mfuser` (devinxzhang/MFuser@cd8ef85
  ``configs/mfuser/``);
- ``toy``: a lesson model on the toy foundation models (ToyWorld end to end on a laptop).

Dimension glossary: C token width (1024 for ViT-L), E joint image-text width, D decoder width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lessons.backbones import CLIP_MEAN, CLIP_STD, Bundle, Encoder, build_encoder, register
from lessons.classes import CLASSES
from lessons.mask2former import (
    REIN_M2F,
    TQDM_M2F,
    ContextDecoder,
    Mask2FormerHead,
    MaskClassificationLoss,
    MaskFormerSegmentor,
    RescaleNeck,
    SimpleFPN,
)
from lessons.rein import VIT_L, Reins

__all__ = [
    "BUILDERS",
    "EVA02_MIM",
    "TOY_BUILDERS",
    "WEIGHT_ARGS",
    "catseg",
    "encoder_at",
    "mask2former",
    "mfuser",
    "querydiff",
    "rein_mask2former",
    "toy",
    "tqdm_mask2former",
    "trainable_parameters",
]

EVA02_MIM = register(Bundle(
    "eva02_l14_mim", "timm", "eva02_large_patch14_224", "vfm", CLIP_MEAN, CLIP_STD, 14,
    (224, 224), 1024, 24, (7, 11, 15, 23), weights="model.safetensors",
    source="timm/eva02_large_patch14_224.mim_m38m on the Hugging Face hub (its "
           "model.safetensors, saved locally): Rein's EVA02-L (eva02_L_pt_m38m_p14to16)"))
"""Rein's EVA02-L: the MIM-pretrained tower (not EVA02-CLIP), rope, SwiGLU (w1oves/Rein@7da85bc
``configs/_base_/models/rein_eva02-L_mask2former.py``)."""


def encoder_at(name: str, weights: str | Path | None, image_size: int, patch_size: int | None,
               meta: bool = False, interpolation: str = "bicubic") -> Encoder:
    """A pretrained encoder converted once to ``patch_size`` and the ``image_size`` token grid,
    as Rein's ``convert_dinov2_large_512x512.py`` does (kernel 14 -> 16 and position grid
    37 -> 32, bicubic). ``patch_size=None`` keeps the native patch (tqdm's EVA02: 512 / 14)."""
    enc = build_encoder(name, weights, meta=meta)
    if patch_size is not None and enc.patch_size != patch_size:
        enc.set_patch_size(patch_size, interpolation)
    p = enc.patch_size
    enc.set_pos_grid((image_size // p, image_size // p), interpolation)
    return enc


def _meta(meta: bool):
    return torch.device("meta") if meta else contextlib.nullcontext()


def rein_mask2former(backbone: str = "dinov2_vitl14", weights: str | Path | None = None,
                     image_size: int = 512, patch_size: int = 16, token_length: int = 100,
                     lora_rank: int | None = 16, zero_init: bool = False, meta: bool = False
                     ) -> MaskFormerSegmentor:
    """Rein + Mask2Former (``rein_dinov2_mask2former_512x512_bs1x4.py``): 2,990,081 Rein
    parameters and a 20,579,796-parameter head on the frozen encoder. ``zero_init``: the
    paper's initialisation (W_f and biases zero, no scale) instead of the code's."""
    enc = encoder_at(backbone, weights, image_size, patch_size, meta)
    with _meta(meta):
        reins = Reins(**{**VIT_L, "num_layers": enc.depth, "embed_dim": enc.width,
                         "token_length": token_length, "lora_rank": lora_rank},
                      link_to_queries=True, zero_init=zero_init, patch_size=enc.patch_size)
        head = Mask2FormerHead(replace(REIN_M2F, in_channels=(enc.width,) * 4,
                                       num_queries=token_length))
    return MaskFormerSegmentor(enc, RescaleNeck(enc.patch_size), head,
                               MaskClassificationLoss(matcher="hungarian"), reins=reins)


def mask2former(backbone: str = "dinov2_vitl14", weights: str | Path | None = None,
                image_size: int = 512, patch_size: int = 16, finetune: bool = False,
                num_queries: int = 100, meta: bool = False) -> MaskFormerSegmentor:
    """Rein's baselines: Mask2Former (100 learnable queries) on the frozen encoder (``Frozen``)
    or the fully fine-tuned one (``Full``; every parameter at the same lr, as the config)."""
    enc = encoder_at(backbone, weights, image_size, patch_size, meta)
    with _meta(meta):
        head = Mask2FormerHead(replace(REIN_M2F, query_source="learnable",
                                       in_channels=(enc.width,) * 4, num_queries=num_queries))
    return MaskFormerSegmentor(enc, RescaleNeck(enc.patch_size), head,
                               MaskClassificationLoss(matcher="hungarian"),
                               finetune_encoder=finetune)


def _text_tower_frozen(enc: Encoder) -> None:
    for name, p in enc.model.named_parameters():
        if not name.startswith("visual."):
            p.requires_grad_(False)          # the text tower and logit scale stay frozen


def tqdm_mask2former(backbone: str = "eva02_clip_l14_336", weights: str | Path | None = None,
                     image_size: int = 512, n_ctx: int = 8, context_layers: int = 3,
                     backbone_lr_mult: float = 0.1, regularizers: bool = True,
                     meta: bool = False) -> MaskFormerSegmentor:
    """tqdm (``tqdm_eva_vit-l_1e-5_20k-g2c-512.py``): the VLM's visual tower fine-tuned at
    ``backbone_lr_mult`` x lr with a SimpleFPN, 19 prompt-tuned text queries (8 context tokens),
    identity matching, the context decoder (3 layers, width 256), pixel-text loss and both
    regularisers (the language anchors need the real text tower: zeros on meta)."""
    from lessons.text import TQDM_REGULARIZER_TEMPLATE, PromptLearner, encode_text

    enc = encoder_at(backbone, weights, image_size, None, meta, "bicubic")
    _text_tower_frozen(enc)
    E = enc.bundle.embed_dim
    prompts = PromptLearner(enc.model, CLASSES, n_ctx=n_ctx)
    anchors = None
    if regularizers:
        anchors = (torch.zeros(len(CLASSES), E) if meta else
                   encode_text(enc.model, [TQDM_REGULARIZER_TEMPLATE.format(c) for c in CLASSES]))
    with _meta(meta):
        head = Mask2FormerHead(replace(TQDM_M2F, in_channels=(enc.width,) * 4, text_dim=E))
        ctx = (ContextDecoder(E, width=256, heads=4, num_layers=context_layers)
               if context_layers else None)      # 0: the paper's figure, no context decoder
        neck = SimpleFPN(enc.width, 16)        # x4, x2, x1, /2 of the 36 x 36 grid
    weight = 1.0 if regularizers else 0.0
    return MaskFormerSegmentor(
        enc, neck, head, MaskClassificationLoss(matcher="identity"), prompts=prompts,
        context_decoder=ctx, finetune_encoder=True, backbone_lr_mult=backbone_lr_mult,
        pixel_text_weight=1.0, language_weight=weight, anchors=anchors, visual_weight=weight)


def querydiff(backbone: str = "dinov2_vitl14", weights: str | Path | None = None,
              sd_weights: str | Path | None = None, image_size: int = 512, patch_size: int = 16,
              num_queries: int = 100, lora_rank: int | None = 16, alpha: float = 1.0,
              huber_target: str = "strong", queries_from: str = "rein", zero_init: bool = False,
              meta: bool = False) -> nn.Module:
    """QueryDiff (paper §4-5): Rein + Mask2Former with r = 100 agent queries pooled from the
    encoder's ``out_indices`` maps, refinement of the pixel-decoder maps and, for ``alpha > 0``,
    the consistency loss against Stable Diffusion 2.1's U-Net features at t = 0 and 100 (a
    frozen teacher built from the local ``sd_weights`` directory on first use). ``huber_target``,
    ``queries_from`` and ``zero_init`` reach the open choices of :mod:`lessons.querydiff`."""
    from lessons.querydiff import (
        SD21_UNET,
        SD_FEATURE_LAYERS,
        AgentQueryGenerator,
        AgentRefinement,
        DiffusionConsistencyLoss,
        DiffusionTeacher,
        QueryDiffSegmentor,
    )

    enc = encoder_at(backbone, weights, image_size, patch_size, meta)
    cfg = replace(REIN_M2F, in_channels=(enc.width,) * 4, num_queries=num_queries)
    with _meta(meta):
        reins = Reins(**{**VIT_L, "num_layers": enc.depth, "embed_dim": enc.width,
                         "token_length": num_queries, "lora_rank": lora_rank},
                      link_to_queries=True, zero_init=zero_init, patch_size=enc.patch_size)
        agents = AgentQueryGenerator(enc.width, len(enc.bundle.out_indices), num_queries)
        refinement = AgentRefinement(cfg.hidden_dim, cfg.num_heads, gn_groups=cfg.gn_groups)
        head = Mask2FormerHead(cfg)
        dcl = None
        if alpha:
            up = tuple(reversed(SD21_UNET["block_out_channels"]))
            dcl = DiffusionConsistencyLoss(enc.width, tuple(up[i] for i, _ in SD_FEATURE_LAYERS),
                                           huber_target)
    teacher = None
    if alpha and sd_weights is not None:
        teacher = lambda: DiffusionTeacher.from_pretrained(sd_weights)  # noqa: E731  (lazy)
    return QueryDiffSegmentor(enc, RescaleNeck(enc.patch_size), head,
                              MaskClassificationLoss(matcher="hungarian"), reins=reins,
                              agents=agents, refinement=refinement, dcl=dcl, teacher=teacher,
                              alpha=alpha, queries_from=queries_from)


def catseg(backbone: str = "clip_vitl14_336", weights: str | Path | None = None,
           finetune: str = "attention", clip_lr_mult: float = 0.01,
           official_ignore: bool = False, meta: bool = False) -> nn.Module:
    """CAT-Seg's cost aggregation as a DGSS model (ours): CLIP ViT-L/14-336 with q/v fine-tuned
    at ``clip_lr_mult`` x lr and the published L aggregator, trained on the 19 GTAV classes.
    ``official_ignore``: the code's loss over ignored pixels too (``lessons.catseg``)."""
    from lessons.catseg import CATSEG_L, CATSeg

    enc = build_encoder(backbone, weights, meta=meta)
    with _meta(meta):
        return CATSeg(enc, CATSEG_L, finetune=finetune, clip_lr_mult=clip_lr_mult,
                      official_ignore=official_ignore)


def mfuser(variant: str = "eva", vfm_weights: str | Path | None = None,
           vlm_weights: str | Path | None = None, tokenizer=None,
           image_size: int = 512, fusion: str = "mvfuser", enhancer: str = "mtenhancer",
           meta: bool = False) -> nn.Module:
    """MFuser (``configs/mfuser/mfuser_{clip,eva,siglip}_vit-l_*``); SigLIP's tokenizer is a
    local directory (:func:`lessons.text.load_siglip_tokenizer`) or a tokenizer callable."""
    from lessons.mfuser import build_mfuser
    from lessons.text import load_siglip_tokenizer

    tok = load_siglip_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
    return build_mfuser(variant, vfm_weights, vlm_weights, image_size, fusion, enhancer,
                        tokenizer=tok, meta=meta)


TOY_BUILDERS = {
    "frozen": ("lessons.segmentor", "build_toy_segmentor", {"method": "frozen"}),
    "rein": ("lessons.mask2former", "build_toy_rein_mask2former", {}),
    "tqdm": ("lessons.mask2former", "build_toy_tqdm", {}),
    "querydiff": ("lessons.querydiff", "build_toy_querydiff", {}),
    "catseg": ("lessons.catseg", "build_toy_catseg", {"held_out": []}),
    "mfuser": ("lessons.mfuser", "build_toy_mfuser", {}),
}


def toy(method: str = "rein", meta: bool = False, **kwargs) -> nn.Module:
    """A lesson model on the committed toy foundation models (64 x 128 ToyWorld scenes); small
    enough that ``meta`` is ignored (it always builds with the committed weights)."""
    import importlib

    if method not in TOY_BUILDERS:
        raise ValueError(f"unknown toy method {method!r}; choose from {sorted(TOY_BUILDERS)}")
    module, func, defaults = TOY_BUILDERS[method]
    return getattr(importlib.import_module(module), func)(**{**defaults, **kwargs})


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "rein_mask2former": rein_mask2former, "mask2former": mask2former,
    "tqdm": tqdm_mask2former,             # configs say ``builder: tqdm``
    "querydiff": querydiff, "catseg": catseg, "mfuser": mfuser, "toy": toy,
}
WEIGHT_ARGS = ("weights", "vfm_weights", "vlm_weights", "sd_weights", "tokenizer")
"""Builder arguments that name local files or directories (checked before building)."""


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that receive gradients (each shared tensor once; works on meta)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
