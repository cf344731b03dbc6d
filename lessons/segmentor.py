"""An encoder, an optional adapter and a segmentation head: the three ways to use a VFM.

Rein's Table 2 compares three ways to turn a foundation model into a segmenter, with the same
decoder on top:

- **Freeze**: the encoder keeps its pretrained weights (``requires_grad=False``, eval mode); only
  the head trains;
- **Full**: every encoder weight trains with the head (the official Full config gives the encoder
  the head's learning rate; the paper's text says 0.1x -- ``backbone_lr_mult`` offers it);
- **Rein**: the encoder stays frozen and :class:`~lessons.rein.Reins` refine its tokens between
  blocks; tokens, MLPs and head train.

:class:`Segmentor` is all three (``finetune_encoder``, ``reins``). Its head here is
:class:`LevelHead`, a light SemFPN-style head over the encoder's out_indices maps (Rein's Table 9
uses SemFPN without the query link); notebook 03 replaces it by Mask2Former, where the link feeds
the decoder's queries.

Weight decay follows Rein's optimiser: none on norms, learnable tokens and the Rein scale
(``decay_mult=0`` for names containing ``norm``, ``learnable_tokens``, ``reins.scale``,
``query_embed``, ``level_embed``; here every normalisation layer, whatever its name);
:meth:`Segmentor.param_groups` gives ``lessons.train`` those groups.

Dimension glossary: B batch, C encoder width, D head width, K classes, h w token grid,
H W image size, L levels (out_indices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lessons.backbones import Encoder, build_encoder, toy_weights_dir
from lessons.classes import NUM_CLASSES
from lessons.rein import Reins

__all__ = [
    "NORM_LAYERS",
    "NO_DECAY_KEYS",
    "LevelHead",
    "Segmentor",
    "build_toy_segmentor",
    "optimizer_groups",
]

NO_DECAY_KEYS = ("norm", "query_embed", "level_embed", "learnable_tokens", "reins.scale")
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def optimizer_groups(model: nn.Module, weight_decay: float, backbone_lr_mult: float = 1.0,
                     backbone: tuple[str, ...] = ("encoder.", "reins.")) -> list[dict]:
    """Optimiser groups for ``lessons.train``: no weight decay on norms, embeddings and Rein's
    tokens and scale (the official paramwise configs), ``backbone_lr_mult`` on the parameters whose
    names start with a ``backbone`` prefix. Frozen parameters are left out."""
    norms = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS)
             for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = id(p) in norms or any(k in name for k in NO_DECAY_KEYS)
        mult = backbone_lr_mult if name.startswith(backbone) else 1.0
        groups.setdefault((0.0 if no_decay else weight_decay, mult), []).append(p)
    return [{"params": ps, "weight_decay": d, "lr_mult": m} for (d, m), ps in groups.items()]


class LevelHead(nn.Module):
    """L encoder maps (B, C, h, w) -> class logits (B, K, h, w) at the first map's size.

    Each level: BatchNorm (the frozen features' scales differ by depth) and a 1x1 lateral
    convolution to D channels; the sum, a 3x3 convolution + BN + ReLU, then a 1x1 classifier.
    """

    def __init__(self, in_dims: int | Sequence[int], num_levels: int | None = None,
                 hidden: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        if isinstance(in_dims, int):
            if num_levels is None:
                raise ValueError("give num_levels with a single in_dims")
            in_dims = [in_dims] * num_levels
        self.in_dims = list(in_dims)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, hidden, 1)) for c in self.in_dims)
        self.fuse = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} levels, got {len(maps)}")
        size = maps[0].shape[-2:]
        x = 0
        for lateral, m in zip(self.lateral, maps, strict=True):
            y = lateral(m)                                                       # (B, D, h', w')
            x = x + (y if y.shape[-2:] == size else
                     F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.classifier(self.fuse(x))                                     # (B, K, h, w)


class Segmentor(nn.Module):
    """Encoder (+ Reins) + head; images (B, 3, H, W) in [0, 1] -> logits (B, K, h, w).

    ``finetune_encoder=False`` freezes the encoder and keeps it in eval mode whatever
    ``.train()`` says (frozen means frozen: no dropout, no drop-path). ``reins`` attach to the
    encoder through its block-wise interface.
    """

    def __init__(self, encoder: Encoder, head: nn.Module, reins: Reins | None = None,
                 finetune_encoder: bool = False, backbone_lr_mult: float = 1.0):
        super().__init__()
        if reins is not None and finetune_encoder:
            raise ValueError("Rein trains adapters on a frozen encoder: pass reins or "
                             "finetune_encoder, not both")
        self.encoder, self.head, self.reins = encoder, head, reins
        self.finetune_encoder, self.backbone_lr_mult = finetune_encoder, backbone_lr_mult
        if not finetune_encoder:
            encoder.freeze().eval()
        self._adapter = reins.adapter(encoder) if reins is not None else None

    def train(self, mode: bool = True) -> Segmentor:
        super().train(mode)
        if not self.finetune_encoder:
            self.encoder.eval()
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's maps (B, C, h, w) at its out_indices, refined by the Reins if any."""
        enc = self.encoder
        x = enc.normalize(images)
        if self.reins is None and not self.finetune_encoder:
            with torch.no_grad():                     # nothing upstream of the head trains
                return enc.forward_tokens(x)[0]
        return enc.forward_tokens(x, adapter=self._adapter)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))                                 # (B, K, h, w)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser groups for ``lessons.train``: Rein's no-decay names, the encoder's lr mult."""
        return optimizer_groups(self, weight_decay, self.backbone_lr_mult)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a lesson checkpoint stores: the state of everything that trains.

        The frozen encoder is left out (it is the committed toy VFM); a fully fine-tuned one is in.
        """
        skip = () if self.finetune_encoder else ("encoder.",)
        out, seen = {}, set()
        for k, v in self.state_dict().items():
            if k.startswith(skip) or (v.data_ptr() in seen and v.numel()):
                continue     # an encoder reaches timm's model under two names: store it once
            seen.add(v.data_ptr())
            out[k] = v
        return out


def build_toy_segmentor(method: str, encoder: str = "toy_vfm", pretrained: bool = True,
                        head_dim: int = 128, token_length: int = 20, lora_rank: int | None = 8,
                        link_to_queries: bool = False, zero_init: bool = False,
                        backbone_lr_mult: float = 1.0) -> Segmentor:
    """The notebook-02 models on the toy VFM: ``method`` is ``frozen``, ``full`` or ``rein``.

    Rein at toy scale: 20 tokens of rank 8 per block (the paper: 100 of rank 16 at width 1024);
    the head has no decoder queries, so the link is off unless asked for.
    """
    if method not in ("frozen", "full", "rein"):
        raise ValueError(f"unknown method {method!r}; choose frozen, full or rein")
    enc = build_encoder(encoder, toy_weights_dir() if pretrained and encoder.startswith("toy_")
                        else None)
    head = LevelHead(enc.width, len(enc.bundle.out_indices), hidden=head_dim)
    reins = None
    if method == "rein":
        reins = Reins(enc.depth, enc.width, token_length=token_length, lora_rank=lora_rank,
                      link_to_queries=link_to_queries, zero_init=zero_init,
                      patch_size=enc.patch_size)
    return Segmentor(enc, head, reins=reins, finetune_encoder=method == "full",
                     backbone_lr_mult=backbone_lr_mult)
