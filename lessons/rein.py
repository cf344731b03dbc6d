"""Rein: learnable tokens that refine a frozen VFM's features between its blocks (CVPR 2024).

Wei et al., *Stronger, Fewer, & Superior: Harnessing Vision Foundation Models for Domain
Generalized Semantic Segmentation*. A frozen ViT keeps its weights; after every block ``i`` a
small set of **learnable tokens** ``T_i`` (m of them, width c) refines the patch features ``f_i``:

- Eq. 3-4, similarity:   ``S_i = softmax(f_i T_i^T / sqrt(c))``                      (B, n, m)
- Eq. 5-6, token update: ``dfbar_i = S_i[:, :, 1:] (T_i[1:] W_T + b_T)``             (B, n, c)
  token 0 is a "null" sink: it takes part in the softmax and is dropped afterwards, so a patch
  that matches no token gets a small update (its remaining similarities sum to less than 1);
- Eq. 7, refinement:     ``f_{i+1} = f_i + scale * ((dfbar_i + f_i) W_f + b_f)``
- Eq. 8-10, link to queries: ``Q_i = T_i W_Q``; the object queries of Mask2Former are
  ``Q = [max_i Q_i, avg_i Q_i, Q_N] W_Q'`` -- the tokens and the decoder queries become one thing.

Parameter-efficiency steps of the paper's Table 6, each a constructor flag here:
``shared_mlps`` (one W_T, W_f, W_Q for every layer, "+share") and ``lora_rank``
(``T_i = A_i B_i`` with A_i (m, r), B_i (r, c), "+lora"). At the ViT-L configuration (24 layers,
1024 dims, 100 tokens, rank 16, 256-d queries) that is 2,990,081 trainable parameters.

**Paper vs official code** (we follow the code, w1oves/Rein at commit 29755d4:
``https://github.com/w1oves/Rein/blob/29755d4/rein/models/backbones/reins.py``, lines cited as
``reins.py#Lx``, and ``reins_dinov2.py#Lx`` in the same folder; the paper's form is a flag):

- the code scales the update by a learnable scalar ``scale`` initialised to 1e-3 and keeps the
  default Linear init (``reins.py#L37-L59``); the paper (Alg. 1) starts W_f and all biases at zero
  and has no scale: ``zero_init=True`` (the state dict then has no ``scale``, as the official flag
  ``zero_mlp_delta_f`` gives, ``reins.py#L55-L59``);
- refinement runs after *every* block, the last included (``reins_dinov2.py#L17-L34``); prefix
  tokens (CLS, and registers where a model has them) pass through untouched -- the official DINOv2
  has only the CLS token (``reins.py#L84-L103``); token 0 takes part in the softmax and is dropped
  from the update (``reins.py#L105-L116``);
- the link uses all m tokens, the null token included, and feeds ``merge`` the (max, mean, last)
  features *interleaved per channel* ``[c0_max, c0_mean, c0_last, c1_max, ...]``, the order the
  released ``merge.weight`` expects (``reins.py#L61-L75``).

Parameter names follow the official code (``learnable_tokens_a``, ``mlp_token2feat``,
``mlp_delta_f``, ``transform``, ``merge``), so :func:`convert_official_rein` is a renaming with a
report of what did not fit.

Dimension glossary: B batch, n patch tokens, P prefix tokens, N layers (blocks), m token length,
r LoRA rank, c embedding width, q query width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lessons.backbones import Adapter, Encoder, TokenGrid

# The official checkpoint's converter lives in lessons.convert with the other methods'; its
# names stay importable from here.
from lessons.convert import (
    OFFICIAL_PREFIX,
    ConversionReport,
    convert_official_rein,
    load_official_rein,
    read_official_checkpoint,
)

__all__ = [
    "LINK_REDUCTIONS",
    "OFFICIAL_PREFIX",
    "VIT_L",
    "ConversionReport",
    "Reins",
    "convert_official_rein",
    "load_official_rein",
    "read_official_checkpoint",
    "rein_parameter_count",
]

LINK_REDUCTIONS = ("max", "mean", "last")


class Reins(nn.Module):
    """Rein's learnable tokens, shared MLPs and token -> query link for an N-block encoder.

    Args:
        num_layers: N, the encoder's blocks (one set of tokens per block).
        embed_dim: c, the encoder's token width.
        token_length: m, tokens per layer (100 in the paper; = the number of decoder queries).
        lora_rank: r for low-rank tokens ``T_i = A_i @ B_i`` (16 in the paper); None: full tokens.
        query_dim: q, the decoder's query width (256 for Mask2Former).
        link_to_queries: build W_Q and W_Q' and offer :meth:`queries` (Eq. 8-10).
        shared_mlps: one W_T / W_f / W_Q for every layer (the paper's "+share"); False gives the
            "Rein-core" ablation with per-layer MLPs (Table 6).
        zero_init: the paper's Alg. 1 form (W_f and all biases zero, no ``scale``).
        scale_init: the official learnable output scale's initial value.
        patch_size: only enters the token initialisation, as in the official code.
    """

    def __init__(self, num_layers: int, embed_dim: int, token_length: int = 100,
                 lora_rank: int | None = 16, query_dim: int = 256, link_to_queries: bool = True,
                 shared_mlps: bool = True, zero_init: bool = False, scale_init: float = 1e-3,
                 patch_size: int = 16):
        super().__init__()
        for name, v in (("num_layers", num_layers), ("embed_dim", embed_dim),
                        ("token_length", token_length), ("query_dim", query_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if token_length < 2:
            raise ValueError("token_length must be >= 2: token 0 is the null token")
        if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
            raise ValueError(f"lora_rank must be a positive integer or None, got {lora_rank!r}")
        self.num_layers, self.embed_dim, self.token_length = num_layers, embed_dim, token_length
        self.lora_rank, self.query_dim = lora_rank, query_dim
        self.link_to_queries, self.shared_mlps, self.zero_init = (link_to_queries, shared_mlps,
                                                                  zero_init)
        N, m, c = num_layers, token_length, embed_dim
        if lora_rank is None:
            self.learnable_tokens = nn.Parameter(torch.empty(N, m, c))            # (N, m, c)
        else:
            self.learnable_tokens_a = nn.Parameter(torch.empty(N, m, lora_rank))  # (N, m, r)
            self.learnable_tokens_b = nn.Parameter(torch.empty(N, lora_rank, c))  # (N, r, c)
        copies = 1 if shared_mlps else N
        self.mlp_token2feat = _linears(copies, c, c)          # W_T
        self.mlp_delta_f = _linears(copies, c, c)             # W_f
        if not zero_init:
            self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        if link_to_queries:
            self.transform = _linears(copies, c, query_dim)   # W_Q
            self.merge = nn.Linear(len(LINK_REDUCTIONS) * query_dim, query_dim)   # W_Q'
        self._init_tokens(patch_size)
        if zero_init:
            self._zero_init()

    # --- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def _init_tokens(self, patch_size: int) -> None:
        """Uniform tokens, bound sqrt(6 / (3 p^2 + c)) (full) or sqrt(6 / (3 p^2 + sqrt(c r)))."""
        fan = 3 * patch_size ** 2
        if self.lora_rank is None:
            bound = math.sqrt(6.0 / (fan + self.embed_dim))
            nn.init.uniform_(self.learnable_tokens, -bound, bound)
        else:
            bound = math.sqrt(6.0 / (fan + math.sqrt(self.embed_dim * self.lora_rank)))
            nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
            nn.init.uniform_(self.learnable_tokens_b, -bound, bound)

    @torch.no_grad()
    def _zero_init(self) -> None:
        """Paper Alg. 1: W_f = 0 and every bias = 0, so each refinement starts as the identity."""
        for lin in _each(self.mlp_delta_f):
            lin.weight.zero_()
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.bias.zero_()

    # --- the tokens -----------------------------------------------------------------------------
    def tokens(self, layer: int | None = None) -> torch.Tensor:
        """T_i (m, c) for one layer, or all layers' tokens (N, m, c) when ``layer`` is None."""
        if layer is not None and not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside 0..{self.num_layers - 1}")
        if self.lora_rank is None:
            return self.learnable_tokens if layer is None else self.learnable_tokens[layer]
        if layer is None:
            return self.learnable_tokens_a @ self.learnable_tokens_b           # (N, m, c)
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]  # (m, c)

    # --- Eq. 3-7: refinement of one layer's patch features --------------------------------------
    def forward(self, feats: torch.Tensor, layer: int) -> torch.Tensor:
        """Refine patch features (B, n, c) after block ``layer``; returns (B, n, c)."""
        if feats.dim() != 3 or feats.shape[-1] != self.embed_dim:
            raise ValueError(f"expected patch features (B, n, {self.embed_dim}), got "
                             f"{tuple(feats.shape)}")
        return feats + self.delta_f(feats, layer)

    def delta_f(self, feats: torch.Tensor, layer: int) -> torch.Tensor:
        """The update (scaled) that Eq. 7 adds to f_i: (B, n, c) -> (B, n, c)."""
        T = self.tokens(layer).to(feats.dtype)                                 # (m, c)
        S = torch.softmax(feats @ T.t() * self.embed_dim ** -0.5, dim=-1)      # (B, n, m)
        W_T = _pick(self.mlp_token2feat, layer)
        W_f = _pick(self.mlp_delta_f, layer)
        dfbar = S[..., 1:] @ W_T(T[1:])                # token 0 dropped  (B, n, c)
        delta = W_f(dfbar + feats)                                              # (B, n, c)
        return delta if self.zero_init else self.scale * delta

    def adapter(self, encoder: Encoder) -> Adapter:
        """The ``adapter(i, x, grid)`` that :meth:`Encoder.forward_tokens` calls after block i.

        Prefix tokens (CLS, registers) pass through; the patch tokens are refined.
        """
        if encoder.depth != self.num_layers or encoder.width != self.embed_dim:
            raise ValueError(f"these Reins fit {self.num_layers} blocks of width "
                             f"{self.embed_dim}; {encoder.bundle.name} has {encoder.depth} of "
                             f"width {encoder.width}")
        P = encoder.num_prefix_tokens

        def refine(i: int, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
            return torch.cat([x[:, :P], self(x[:, P:], i)], dim=1)           # (B, P + n, c)
        return refine

    # --- Eq. 8-10: the link from tokens to object queries ---------------------------------------
    def queries(self) -> torch.Tensor:
        """Object queries Q (m, q) for a Mask2Former decoder (all m tokens, token 0 included)."""
        if not self.link_to_queries:
            raise RuntimeError("built with link_to_queries=False: no W_Q / W_Q' to make queries")
        T = self.tokens()                                                       # (N, m, c)
        if self.shared_mlps:
            Q = self.transform(T)                                               # (N, m, q)
        else:
            Q = torch.stack([lin(t) for lin, t in zip(self.transform, T, strict=True)])  # (N, m, q)
        stacked = torch.stack([Q.amax(0), Q.mean(0), Q[-1]], dim=-1)            # (m, q, 3)
        return self.merge(stacked.flatten(-2))        # interleaved per channel -> (m, q)


def _linears(copies: int, d_in: int, d_out: int) -> nn.Module:
    """One Linear (shared by every layer) or a ModuleList of one per layer."""
    if copies == 1:
        return nn.Linear(d_in, d_out)
    return nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(copies))


def _pick(mlp: nn.Module, layer: int) -> nn.Module:
    return mlp[layer] if isinstance(mlp, nn.ModuleList) else mlp


def _each(mlp: nn.Module) -> list[nn.Linear]:
    return list(mlp) if isinstance(mlp, nn.ModuleList) else [mlp]


# ----------------------------------------------------------------------------------------------
# Parameter counts at the paper's scale (Table 6, Table 7, the SemFPN and SAM-H rows)
# ----------------------------------------------------------------------------------------------
VIT_L = dict(num_layers=24, embed_dim=1024, token_length=100, lora_rank=16, query_dim=256)


def rein_parameter_count(**overrides) -> int:
    """Trainable parameters of :class:`Reins` built on the meta device (ViT-L defaults)."""
    with torch.device("meta"):
        reins = Reins(**{**VIT_L, **overrides})
    return sum(p.numel() for p in reins.parameters())

