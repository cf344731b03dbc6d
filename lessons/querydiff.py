"""QueryDiff (ICML 2025): agent queries taught by a frozen diffusion model, absent at test time.

Li et al., *Better to Teach than to Give: Domain Generalized Semantic Segmentation via Agent
Queries with Diffusion Model Guidance*. Three stages, on top of Rein + Mask2Former:

1. **Agent queries** (§4.1, Eq. 3-6). For each backbone layer l a group of r learnable queries
   pools the layer's tokens (``A_l = softmax(f^l q_init^l)``, Eq. 3) and a *shared* MLP maps the
   pooled vectors (Eq. 4); the L groups are merged progressively (learnable queries attend to the
   previous stage, then self-attention and an FFN, Eq. 5) and averaged and projected to r agent
   queries ``q_agent`` (Eq. 6). They are computed from the image, so they carry its layout.
2. **Diffusion guidance** (§4.2, Eq. 7-12), training only. A frozen diffusion model sees the image
   noised at a *weak* timestep t_w and a *strong* one t_s (the same noise draw); forward hooks
   collect U-Net features ``f_w`` and ``f_s``. The **diffusion consistency loss** asks the agent
   queries to explain both: a similarity map ``S = softmax(f_w k^T)`` (each location's soft
   assignment to the queries, Eq. 8) re-assembles the query vectors into a feature map that must
   match the strong-noise features (``L_dist``, a KL divergence, Eq. 9); and every query must equal
   the strong-noise features pooled by its column of S (``L_sup``, a Huber loss, Eq. 10-11).
   Strong noise wipes out textures and colours but not the scene layout: that is what the queries
   are taught.
3. **Refinement** (§4.3): every pixel-decoder map attends to the agent queries, is concatenated
   with the original map, fused by parallel dilated depth-wise separable convolutions and a 1x1
   convolution, and only then enters the masked-attention decoder.

**At inference there is no diffusion model**: the teacher is not a sub-module (it is never saved
with the segmentor, never moved, never called by ``predict``); a test removes it and predicts.

The official release does not run (FanLiHub/QueryDiff@c4cae29: ``QueryDiff/__init__.py`` imports
a missing ``.models``; ``seg_model/backbones/dino_v2.py``'s ``forward`` uses attributes never
created; docs/paper_vs_code.md), so we follow the **paper**; each open
choice has a stated default and, where cheap, a flag:

- Eq. 3's softmax runs over the *locations* (each query takes a weighted mean of the tokens), with
  a 1/sqrt(c) temperature. The code's image-independent Rein-token queries are not offered.
- merging: L -> L/2 -> ... -> 1 groups (``merge_groups``), attention + FFN blocks with residuals
  and LayerNorm (the paper writes neither); agent queries are per image.
- Eq. 8's softmax runs over the *queries* (a soft segmentation of the diffusion map); Eq. 10 pools
  with S's columns normalised to sum to 1 (a weighted mean of the features).
- the diffusion features are LayerNorm-ed over channels (their raw scale differs by layer); Eq. 9's
  KL compares per-location channel distributions (softmax), as the code does (``batchmean``).
- Eq. 11 compares ``q_agent`` (c-dim) with ``q_opt`` (c_j-dim): we compare the per-layer
  projection ``k_j`` (a 2-layer MLP with LayerNorm) instead; targets are detached (as the code).
- the Huber target: strong-noise features (Eq. 10, ``huber_target="strong"``); the code pools the
  weak ones (``"weak"``). The weight alpha of ``L_seg + alpha L_diff`` (Eq. 14) is unstated:
  ``alpha=1``; the toy sweep measures both choices.
- refinement: cross-attention shared by the levels (the code), concatenated with the *original*
  maps (the paper; the code concatenates the attended ones), dilations 1-4 (the code).
- decoder queries: Rein's query link as in the baseline; ``queries_from="agents"`` is the code's
  replacement of the query embeddings by projected agent queries (projected to D: the release
  feeds 1024-d agent queries to its 256-d head).

Guidance controls (not in the paper; the lesson's precondition experiment): ``guidance="teacher"``
is QueryDiff; ``"oracle"`` gives the same teacher a view of the scene with no look at all (its
class map drawn flat in the class palette, :func:`flat_view`), so the target is layout only and
invariant by construction; ``"shuffled"`` pairs each image with another image's teacher features
(a teacher that knows nothing about this image).

Guidance controls (not in the paper; the lesson's precondition experiment): ``guidance="teacher"``
is QueryDiff; ``"oracle"`` shows the same teacher the scene with no look at all (its class map
drawn flat in the class palette, :func:`flat_view`), so its target is layout only and invariant
by construction; ``"shuffled"`` gives each image another image's teacher features (a teacher that
knows nothing of this image).

Timesteps: Stable Diffusion (scaled-linear betas 0.00085 -> 0.012) uses t_w = 0 and t_s = 100; a
model with another schedule uses the timesteps with the same noise level alpha-bar
(:func:`matching_timestep`): for DDPM's linear schedule that is t = 5 and t = 100.

Dimension glossary: B batch, c backbone width, L backbone layers used, r agent queries, n_i groups
of merging stage i, D decoder width, j diffusion feature layer, C_j its channels, h_j w_j its grid,
n = h_j w_j locations, H W image size, T text tokens (77), E text width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lessons.backbones import Encoder, build_encoder, toy_weights_dir
from lessons.classes import IGNORE_INDEX, PALETTE
from lessons.mask2former import (
    Mask2FormerHead,
    MaskClassificationLoss,
    MaskFormerSegmentor,
    Prediction,
    RescaleNeck,
    sine_position_encoding,
    toy_config,
)
from lessons.rein import Reins
from lessons.toyworld import current_world

__all__ = [
    "GUIDANCE",
    "SD21_UNET",
    "SD_FEATURE_LAYERS",
    "SD_LATENT_SCALE",
    "SD_TIMESTEPS",
    "TOY_DIFFUSION_WEIGHTS",
    "TOY_FEATURE_LAYERS",
    "TOY_IMAGE_SIZE",
    "TOY_UNET",
    "TOY_UNET_WORLD1",
    "AgentQueryGenerator",
    "AgentRefinement",
    "DiffusionConsistencyLoss",
    "DiffusionTeacher",
    "MergeStage",
    "QueryDiffSegmentor",
    "TeacherFeatures",
    "build_toy_querydiff",
    "build_toy_unet",
    "cache_features",
    "empty_prompt_embedding",
    "flat_view",
    "guidance_features",
    "halving_groups",
    "matching_timestep",
    "sd_scheduler",
    "toy_scheduler",
    "toy_timesteps",
    "toy_unet_config",
    "unet_channels",
]

# ----------------------------------------------------------------------------------------------
# The diffusion teacher: noise at t_w and t_s, U-Net features by forward hooks
# ----------------------------------------------------------------------------------------------

TOY_UNET: dict = dict(
    sample_size=(64, 128), in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16, attention_head_dim=32)
"""The toy diffusion teacher: a diffusers ``UNet2DModel`` (DDPM) on 64x128 pixels, the lessons'
resolution. Its up blocks run at 8x16, 16x32, 32x64 and 64x128: the deepest matches the toy ViT's
grid (patch 8 at 64x128), as SD 2.1's 32x32 up block matches a patch-16 ViT at 512."""
TOY_UNET_WORLD1: dict = dict(
    sample_size=(32, 64), in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16, attention_head_dim=32)
"""World 1's teacher, on 32x64 pixels (its lesson checkpoints were trained against it)."""
TOY_IMAGE_SIZE = (64, 128)


def toy_unet_config(world: str | None = None) -> dict:
    """The toy U-Net of a ToyWorld version (default: the current world)."""
    from lessons.toyworld import TOYWORLD_VERSION, current_world

    return TOY_UNET if (world or current_world()) == TOYWORLD_VERSION else TOY_UNET_WORLD1


def unet_channels(config: dict | None = None) -> dict[tuple[int, int], int]:
    """Output channels of a toy U-Net's up-block resnets (the hooks' C_j), without building it."""
    config = config or toy_unet_config()
    return {(i, k): c for i, c in enumerate(reversed(config["block_out_channels"]))
            for k in range(config["layers_per_block"] + 1)}


TOY_FEATURE_LAYERS = ((0, 1), (1, 1), (2, 1))
"""(up block, resnet) hooks of the toy U-Net: the last resnet of the first three up blocks,
before their upsamplers (64 ch @ 8x16, 64 @ 16x32, 64 @ 32x64), as SD's hooks skip its last."""
SD_FEATURE_LAYERS = ((0, 2), (2, 2), (3, 2))
"""The official code's default hooks on SD's U-Net (1280 ch @ 8x8, 640 @ 32x32, 320 @ 64x64 for a
512 image); the release never registers them (a ``mode`` string mismatch in
``QueryDiff/diffusion/``)."""
SD21_UNET: dict = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
"""Stable Diffusion 2.1's U-Net (``unet/config.json``), to build on the meta device for counts."""
SD_TIMESTEPS = (0, 100)
"""t_w and t_s of the paper (§5.3) on Stable Diffusion's schedule."""
SD_LATENT_SCALE = 0.18215
TOY_DIFFUSION_WEIGHTS = "committed"
"""Default of the toy teacher's ``weights``: the current world's committed file,
``toy_weights_dir() / "toy_diffusion.safetensors"``; None builds a random-init U-Net."""


def sd_scheduler():
    """Stable Diffusion's DDPM schedule: 1000 steps, scaled-linear betas 0.00085 -> 0.012."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


def toy_scheduler():
    """The toy teacher's schedule: DDPM's linear betas 1e-4 -> 0.02 over 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def matching_timestep(scheduler, alpha_bar: float) -> int:
    """The timestep whose noise level alpha-bar_t = prod(1 - beta) is nearest ``alpha_bar``.

    Timesteps only mean something with their schedule: SD's t = 0 keeps alpha-bar 0.99915 of the
    signal, DDPM's linear t = 0 keeps 0.9999.
    """
    ab = scheduler.alphas_cumprod                                              # (1000,)
    return int((ab - alpha_bar).abs().argmin())


def toy_timesteps() -> tuple[int, int]:
    """(t_w, t_s) of the toy teacher: the noise levels of SD's t = 0 and t = 100."""
    sd, toy = sd_scheduler(), toy_scheduler()
    return tuple(matching_timestep(toy, float(sd.alphas_cumprod[t])) for t in SD_TIMESTEPS)


def build_toy_unet(weights: str | Path | None = TOY_DIFFUSION_WEIGHTS, world: str | None = None):
    """A world's toy U-Net (``toy_unet_config``; default: the current world), with its committed
    weights (``TOY_DIFFUSION_WEIGHTS``), a file, or None (random init)."""
    from diffusers import UNet2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    unet = UNet2DModel(**toy_unet_config(world))
    if weights is None:
        return unet
    path = (toy_weights_dir(world) / "toy_diffusion.safetensors" if weights == TOY_DIFFUSION_WEIGHTS
            else Path(weights))
    if not path.is_file():
        raise FileNotFoundError(
            f"toy diffusion weights not found at {path}; make them with `python -m "
            "reprod.toy.pretrain diffusion --until-done` then `--export --card`")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        unet.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the toy U-Net (TOY_UNET): {e}") from e
    return unet


@dataclass
class TeacherFeatures:
    """U-Net features of one batch at the weak and strong timestep: lists over layers j of
    (B, C_j, h_j, w_j)."""

    weak: list[torch.Tensor]
    strong: list[torch.Tensor]

    def __getitem__(self, index) -> TeacherFeatures:
        """The features of a subset of the batch (an index tensor, list or slice)."""
        return TeacherFeatures([f[index] for f in self.weak], [f[index] for f in self.strong])

    def to(self, device) -> TeacherFeatures:
        return TeacherFeatures([f.to(device) for f in self.weak],
                               [f.to(device) for f in self.strong])


class _AllCaptured(Exception):
    """Raised by the last feature hook while the teacher reads features: nothing after it in the
    U-Net is read, so its forward stops there (for the toy teacher, its 64x128 up block)."""


class DiffusionTeacher(nn.Module):
    """A frozen diffusion model read at two noise levels (paper Eq. 1 and 7).

    ``z_0`` is the image itself for a pixel-space model (the toy teacher: [0, 1] images resized
    to ``image_size`` and scaled to [-1, 1]) or ``0.18215 * mean(VAE(x))`` for Stable Diffusion
    (un-normalised RGB in [-1, 1]: the release's ``img_process_`` in
    ``QueryDiff/diffusion/diffusion_component.py`` expects 0..255 but receives mmseg-normalised
    tensors). ``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps``
    with the model's own scheduler; the same eps at both timesteps, so the two views differ only
    in the noise level. The U-Net runs once per timestep, unconditioned (pixel model) or with the
    empty prompt's text embedding (SD); forward hooks keep the outputs of ``layers``, and the
    forward stops once the last of them has run (the layers after it are never read: for the toy
    teacher, its full-resolution up block, about 45% of its arithmetic; the features are the same).
    """

    def __init__(self, unet: nn.Module, scheduler, timesteps: tuple[int, int],
                 layers: Sequence[tuple[int, int]], image_size: tuple[int, int] | None = None,
                 vae: nn.Module | None = None, prompt_embedding: torch.Tensor | None = None,
                 latent_scale: float = SD_LATENT_SCALE):
        super().__init__()
        n = scheduler.config.num_train_timesteps
        if not all(0 <= t < n for t in timesteps) or len(timesteps) != 2:
            raise ValueError(f"timesteps must be (t_w, t_s) within 0..{n - 1}, got {timesteps}")
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.timesteps, self.layers = tuple(timesteps), tuple(tuple(j) for j in layers)
        self.image_size, self.latent_scale = image_size, latent_scale
        self.register_buffer("prompt_embedding", prompt_embedding, persistent=False)
        self._captured: list[torch.Tensor] = []
        self._reading = False                 # inside features_at: stop after the last hook
        self._hooks = [self._block(i, k).register_forward_hook(self._capture)
                       for i, k in self.layers]
        self.requires_grad_(False).eval()

    def _block(self, up: int, resnet: int) -> nn.Module:
        try:
            return self.unet.up_blocks[up].resnets[resnet]
        except (IndexError, AttributeError) as e:
            raise ValueError(f"the U-Net has no up_blocks[{up}].resnets[{resnet}]") from e

    def _capture(self, module, args, output) -> None:
        self._captured.append(output)
        if self._reading and len(self._captured) == len(self.layers):
            raise _AllCaptured

    def train(self, mode: bool = True) -> DiffusionTeacher:
        return super().train(False)                       # frozen means frozen

    @property
    def channels(self) -> tuple[int, ...]:
        """C_j of every hooked layer."""
        return tuple(self._block(i, k).conv2.out_channels for i, k in self.layers)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z_0 from images (B, 3, H, W) in [0, 1]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images
        if self.image_size is not None and tuple(x.shape[-2:]) != tuple(self.image_size):
            x = F.interpolate(x, size=self.image_size, mode="area")
        x = 2 * x - 1                                                            # [-1, 1]
        if self.vae is None:
            return x
        return self.latent_scale * self.vae.encode(x).latent_dist.mean         # (B, 4, H/8, W/8)

    @torch.no_grad()
    def features(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> TeacherFeatures:
        """U-Net features at t_w and t_s (no gradients). ``generator`` fixes the noise."""
        return TeacherFeatures(*self.features_at(images, self.timesteps, generator))

    @torch.no_grad()
    def features_at(self, images: torch.Tensor, timesteps: Sequence[int],
                    generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
        """Hooked features [per timestep][per layer] (B, C_j, h_j, w_j), one noise draw shared
        by all timesteps."""
        n = self.scheduler.config.num_train_timesteps
        if any(not 0 <= int(t) < n for t in timesteps):
            raise ValueError(f"timesteps must lie within 0..{n - 1}, got {list(timesteps)}")
        z0 = self.encode(images.to(self.device))
        noise = torch.randn(z0.shape, generator=generator, device="cpu").to(z0)
        out = []
        for t in timesteps:
            tt = torch.full((z0.shape[0],), int(t), dtype=torch.long, device=z0.device)
            zt = self.scheduler.add_noise(z0, noise, tt)                         # Eq. 1
            self._captured, self._reading = [], True
            try:
                if self.prompt_embedding is None:
                    self.unet(zt, tt)
                else:                                                            # Eq. 7
                    self.unet(zt, tt, encoder_hidden_states=self.prompt_embedding.expand(
                        z0.shape[0], -1, -1))
            except _AllCaptured:
                pass
            finally:
                self._reading = False
            out.append([f.float() for f in self._captured])
        return out

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def toy(cls, weights: str | Path | None = TOY_DIFFUSION_WEIGHTS, world: str | None = None
            ) -> DiffusionTeacher:
        """The toy teacher (:data:`TOY_UNET`) at the timesteps matched to SD's 0 and 100."""
        return cls(build_toy_unet(weights, world), toy_scheduler(), toy_timesteps(),
                   TOY_FEATURE_LAYERS, image_size=tuple(toy_unet_config(world)["sample_size"]))

    @classmethod
    def from_pretrained(cls, directory: str | Path, timesteps: tuple[int, int] = SD_TIMESTEPS,
                        layers: Sequence[tuple[int, int]] = SD_FEATURE_LAYERS,
                        image_size: tuple[int, int] | None = None,
                        dtype: torch.dtype = torch.float32) -> DiffusionTeacher:
        """Stable Diffusion (e.g. 2.1) from a local diffusers directory (``vae/``, ``unet/``,
        ``text_encoder/``, ``tokenizer/``, ``scheduler/``); nothing is downloaded."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        root = Path(directory)
        missing = [s for s in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
                   if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{root} is not a diffusers Stable Diffusion directory (missing {missing}); "
                "download e.g. stabilityai/stable-diffusion-2-1 elsewhere and pass its folder")
        kw = dict(local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler",
                                                  local_files_only=True)
        return cls(unet, scheduler, timesteps, layers, image_size, vae=vae,
                   prompt_embedding=empty_prompt_embedding(root).to(dtype))


@torch.no_grad()
def empty_prompt_embedding(directory: str | Path) -> torch.Tensor:
    """The text encoder's embedding of the empty prompt "" (1, T, E): QueryDiff's conditioning."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(directory)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder",
                                            local_files_only=True).eval()
    length = encoder.config.max_position_embeddings                             # T (77)
    ids = tokenizer([""], padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0]                                                       # (1, T, E)


def cache_features(teacher: DiffusionTeacher, images: torch.Tensor, batch_size: int = 64,
                   seed: int = 0) -> TeacherFeatures:
    """Teacher features of a fixed image set (N, 3, H, W), computed once with seeded noise, so a
    short training loop over that set never runs the diffusion model again."""
    g = torch.Generator().manual_seed(seed)
    parts = [teacher.features(images[i:i + batch_size], generator=g)
             for i in range(0, len(images), batch_size)]
    return TeacherFeatures([torch.cat(f) for f in zip(*(p.weak for p in parts), strict=True)],
                           [torch.cat(f) for f in zip(*(p.strong for p in parts), strict=True)])


# ----------------------------------------------------------------------------------------------
# Stage 1: agent queries (Eq. 3-6)
# ----------------------------------------------------------------------------------------------


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def halving_groups(layers: int) -> tuple[int, ...]:
    """Merging stages L -> L/2 -> ... -> 1 (the code's 24 -> 12 -> 6 -> 3, carried to one)."""
    groups, n = [], layers
    while n > 1:
        n = max(n // 2, 1)
        groups.append(n)
    return tuple(groups) or (1,)


class MergeStage(nn.Module):
    """One progressive-merging stage (Eq. 5): n_i r learnable queries attend to the previous
    stage's queries (Q from the learnable ones, K and V from the previous stage), an FFN, then
    self-attention and an FFN; residuals and LayerNorm around each (our choice)."""

    def __init__(self, dim: int, out_tokens: int, heads: int, ffn: int):
        super().__init__()
        self.query = nn.Parameter(torch.empty(out_tokens, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn1, self.ffn2 = _mlp(dim, ffn), _mlp(dim, ffn)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, prev: torch.Tensor) -> torch.Tensor:
        q = self.query[None].expand(prev.shape[0], -1, -1)                       # (B, n_i r, c)
        q = self.norms[0](q + self.cross_attn(q, prev, prev, need_weights=False)[0])
        q = self.norms[1](q + self.ffn1(q))
        q = self.norms[2](q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norms[3](q + self.ffn2(q))                                   # (B, n_i r, c)


class AgentQueryGenerator(nn.Module):
    """Backbone layer features -> r agent queries per image (paper Eq. 3-6).

    ``maps``: L maps (B, c, h, w) (the encoder's ``out_indices``). Per layer l (Eq. 3-4)::

        A_l = softmax_over_locations(f^l q_init^l / sqrt(c))        # (B, hw, r)
        q_layer^l = MLP(A_l^T f^l)                                  # (B, r, c), MLP shared

    then ``concat_l`` (B, L r, c) -> merging stages (``merge_groups``, Eq. 5) -> the mean over
    the last stage's groups and a linear map W_a (Eq. 6) -> (B, r, c).
    """

    def __init__(self, dim: int, num_layers: int, num_queries: int,
                 merge_groups: Sequence[int] | None = None, heads: int = 4,
                 ffn_ratio: float = 1.0):
        super().__init__()
        self.num_layers, self.num_queries = num_layers, num_queries
        self.merge_groups = tuple(merge_groups or halving_groups(num_layers))
        self.query_init = nn.Parameter(torch.empty(num_layers, dim, num_queries))  # q_init^l
        nn.init.trunc_normal_(self.query_init, std=0.02)
        hidden = int(dim * ffn_ratio)
        self.layer_mlp = _mlp(dim, hidden)                                          # shared
        self.stages = nn.ModuleList(MergeStage(dim, n * num_queries, heads, hidden)
                                    for n in self.merge_groups)
        self.mapping = nn.Linear(dim, dim)                                          # W_a, b_a

    def pool(self, f: torch.Tensor, q_init: torch.Tensor) -> torch.Tensor:
        """Eq. 3-4 for one layer: tokens (B, hw, c) -> pooled queries (B, r, c)."""
        A = torch.softmax(f @ q_init / math.sqrt(f.shape[-1]), dim=1)           # (B, hw, r)
        return self.layer_mlp(A.transpose(1, 2) @ f)                            # (B, r, c)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layer maps, got {len(maps)}")
        q = torch.cat([self.pool(m.flatten(2).transpose(1, 2), self.query_init[i])
                       for i, m in enumerate(maps)], dim=1)                     # (B, L r, c)
        for stage in self.stages:
            q = stage(q)                                                         # (B, n_i r, c)
        B, _, c = q.shape
        q = q.reshape(B, -1, self.num_queries, c).mean(1)                        # (B, r, c)
        return self.mapping(q)                                                   # q_agent


# ----------------------------------------------------------------------------------------------
# Stage 2: the diffusion consistency loss (Eq. 8-12)
# ----------------------------------------------------------------------------------------------


def _tokens(f: torch.Tensor) -> torch.Tensor:
    """A feature map (B, C_j, h, w) as LayerNorm-ed tokens (B, hw, C_j)."""
    t = f.flatten(2).transpose(1, 2)
    return F.layer_norm(t, t.shape[-1:])


class DiffusionConsistencyLoss(nn.Module):
    """L_diff = L_sup + L_dist, summed over the diffusion layers j (paper Eq. 8-12).

    Per layer, with ``k_j = MLP_j(q_agent)`` (B, r, C_j), ``f_w``, ``f_s`` (B, n, C_j)::

        S_j    = softmax_over_queries(f_w k_j^T / sqrt(C_j))       # Eq. 8   (B, n, r)
        fhat   = S_j k_j                                            # Eq. 9   (B, n, C_j)
        L_dist = KL(softmax_c(f_s) || softmax_c(fhat))              # per location, mean
        q_opt  = (S_j / sum_n S_j)^T f_target                       # Eq. 10  (B, r, C_j)
        L_sup  = Huber_delta(k_j, q_opt.detach())                   # Eq. 11

    ``huber_target``: ``"strong"`` pools f_s (the paper's Eq. 10), ``"weak"`` pools f_w (the
    code). Gradients reach ``k_j`` and, through it, the agent queries; never the teacher.
    """

    def __init__(self, query_dim: int, channels: Sequence[int], huber_target: str = "strong",
                 delta: float = 1.0):
        super().__init__()
        if huber_target not in ("strong", "weak"):
            raise ValueError(f"huber_target must be 'strong' or 'weak', got {huber_target!r}")
        self.huber_target, self.delta = huber_target, delta
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(query_dim, c), nn.LayerNorm(c), nn.GELU(), nn.Linear(c, c))
            for c in channels)

    def similarity(self, j: int, q_agent: torch.Tensor, f_weak: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """S_j (B, n, r) from the weak-noise features, and k_j (B, r, C_j)."""
        k = self.proj[j](q_agent)                                                # (B, r, C_j)
        fw = _tokens(f_weak)                                                     # (B, n, C_j)
        return torch.softmax(fw @ k.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1), k

    def forward(self, q_agent: torch.Tensor, weak: Sequence[torch.Tensor],
                strong: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(weak) != len(self.proj) or len(strong) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} diffusion layers, got {len(weak)} weak "
                             f"and {len(strong)} strong")
        dist = sup = q_agent.new_zeros(())
        for j, (f_w, f_s) in enumerate(zip(weak, strong, strict=True)):
            S, k = self.similarity(j, q_agent, f_w)                              # (B, n, r)
            fs = _tokens(f_s).detach()                                           # (B, n, C_j)
            fhat = S @ k                                                         # (B, n, C_j)
            dist = dist + F.kl_div(F.log_softmax(fhat, -1), F.log_softmax(fs, -1),
                                   reduction="none", log_target=True).sum(-1).mean()
            target = fs if self.huber_target == "strong" else _tokens(f_w)
            W = S / S.sum(1, keepdim=True).clamp_min(1e-6)                       # columns sum 1
            q_opt = (W.transpose(1, 2) @ target).detach()                        # (B, r, C_j)
            sup = sup + F.huber_loss(k, q_opt, delta=self.delta)
        return {"dist": dist, "sup": sup}


# ----------------------------------------------------------------------------------------------
# Stage 3: refinement of the pixel-decoder features (§4.3)
# ----------------------------------------------------------------------------------------------


class AgentRefinement(nn.Module):
    """Pixel-decoder maps (B, D, h, w) x agent queries (B, r, D) -> refined maps, same shapes.

    Per map: pixels attend to the agent queries (one attention shared by all maps, as the code),
    the result is concatenated with the original map (the paper), parallel depth-wise separable
    3x3 convolutions at ``dilations`` (DW 3x3 -> PW 2D -> D -> GroupNorm -> ReLU, one set per map)
    see several context sizes, and a 1x1 convolution restores D channels.
    """

    def __init__(self, dim: int, heads: int, num_maps: int = 4,
                 dilations: Sequence[int] = (1, 2, 3, 4), gn_groups: int = 32):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

        def branch(d: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(2 * dim, 2 * dim, 3, padding=d, dilation=d, groups=2 * dim, bias=False),
                nn.Conv2d(2 * dim, dim, 1, bias=False), nn.GroupNorm(gn_groups, dim), nn.ReLU())

        self.branches = nn.ModuleList(nn.ModuleList(branch(d) for d in dilations)
                                      for _ in range(num_maps))
        self.fuse = nn.ModuleList(nn.Conv2d(len(dilations) * dim, dim, 1)
                                  for _ in range(num_maps))

    def refine(self, i: int, x: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
        B, D, h, w = x.shape
        pos = sine_position_encoding(h, w, D, x.device).to(x.dtype)[None]        # (1, hw, D)
        t = x.flatten(2).transpose(1, 2)                                         # (B, hw, D)
        a = self.norm(self.attn(t + pos, agents, agents, need_weights=False)[0])
        # contiguous: PyTorch 2.14's CPU bf16 kernel for a dilated depthwise convolution returns
        # wrong input gradients (up to inf) for a channels-last map, as the pixel decoder's are
        y = torch.cat([a.transpose(1, 2).reshape(B, D, h, w), x], dim=1)         # (B, 2D, h, w)
        y = y.contiguous()
        return self.fuse[i](torch.cat([b(y) for b in self.branches[i]], dim=1))  # (B, D, h, w)

    def forward(self, maps: Sequence[torch.Tensor], agents: torch.Tensor) -> list[torch.Tensor]:
        if len(maps) != len(self.fuse):
            raise ValueError(f"expected {len(self.fuse)} maps, got {len(maps)}")
        return [self.refine(i, x, agents) for i, x in enumerate(maps)]


# ----------------------------------------------------------------------------------------------
# Guidance controls: the teacher, a look-free oracle, a shuffled teacher
# ----------------------------------------------------------------------------------------------

GUIDANCE = ("teacher", "oracle", "shuffled")


def flat_view(labels: torch.Tensor) -> torch.Tensor:
    """The scene with its look removed: labels (B, H, W) drawn flat in the class palette,
    (B, 3, H, W) in [0, 1], ignore black. Every look of one scene gives the same view."""
    if labels.dim() != 3 or labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"expected integer labels (B, H, W), got {tuple(labels.shape)} "
                         f"{labels.dtype}")
    lut = torch.tensor((*PALETTE, (0, 0, 0)), dtype=torch.float32, device=labels.device) / 255
    index = labels.long()
    bad = ((index < 0) | (index >= len(PALETTE))) & (index != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"labels hold class ids outside 0..{len(PALETTE) - 1} and "
                         f"{IGNORE_INDEX}: {index[bad].unique()[:10].tolist()}")
    index = torch.where(index == IGNORE_INDEX, len(PALETTE), index)
    return lut[index].permute(0, 3, 1, 2)                                  # (B, 3, H, W)


def guidance_features(teacher: DiffusionTeacher, images: torch.Tensor, labels: torch.Tensor,
                      guidance: str = "teacher") -> TeacherFeatures:
    """The teacher features one batch is guided toward (module docstring, guidance controls):
    the teacher on the images; on their :func:`flat_view`; or on the images, rolled by one along
    the batch so that each image gets another's."""
    if guidance == "teacher":
        return teacher.features(images)
    if guidance == "oracle":
        return teacher.features(flat_view(labels).to(images))
    if guidance == "shuffled":
        if images.shape[0] < 2:
            raise ValueError("a shuffled teacher needs a batch of 2 or more images")
        return teacher.features(images)[torch.roll(torch.arange(images.shape[0]), 1)]
    raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")


# ----------------------------------------------------------------------------------------------
# The segmentor: Rein + Mask2Former + agent queries (+ the teacher while training)
# ----------------------------------------------------------------------------------------------


class QueryDiffSegmentor(MaskFormerSegmentor):
    """Rein-tuned encoder -> agent queries -> Mask2Former whose pixel-decoder maps are refined by
    them; ``loss`` adds ``alpha * (L_sup + L_dist)`` against the diffusion teacher (Eq. 14).

    The teacher is held outside the module tree (not in ``state_dict``, ``parameters`` or
    ``.to``): pass it, or a factory that builds it on first use, or precomputed
    ``teacher_features`` to :meth:`loss`. ``predict`` never uses it.
    """

    def __init__(self, encoder: Encoder, neck: nn.Module, head: Mask2FormerHead,
                 criterion: MaskClassificationLoss, *, reins: Reins,
                 agents: AgentQueryGenerator, refinement: AgentRefinement,
                 dcl: DiffusionConsistencyLoss | None = None, teacher=None, alpha: float = 1.0,
                 queries_from: str = "rein", guidance: str = "teacher"):
        super().__init__(encoder, neck, head, criterion, reins=reins)
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
        if queries_from not in ("rein", "agents"):
            raise ValueError(f"queries_from must be 'rein' or 'agents', got {queries_from!r}")
        if queries_from == "agents" and agents.num_queries != head.cfg.num_queries:
            raise ValueError(f"agent queries as decoder queries need r == num_queries "
                             f"({agents.num_queries} vs {head.cfg.num_queries})")
        if alpha and dcl is None:
            raise ValueError("alpha > 0 needs the diffusion consistency loss (dcl)")
        self.agents, self.refinement, self.dcl = agents, refinement, dcl
        self.agent_proj = nn.Linear(encoder.width, head.cfg.hidden_dim)        # c -> D (Q7)
        self.alpha, self.queries_from, self.guidance = alpha, queries_from, guidance
        self.__dict__["_teacher"] = teacher        # not registered: never saved or moved

    @property
    def teacher(self) -> DiffusionTeacher | None:
        t = self.__dict__["_teacher"]
        if callable(t) and not isinstance(t, nn.Module):     # a factory: build on first use
            t = self.__dict__["_teacher"] = t()
        return t

    def __setattr__(self, name: str, value) -> None:
        if name == "teacher":             # nn.Module would register a module value as a child
            self.__dict__["_teacher"] = value
        else:
            super().__setattr__(name, value)

    def forward(self, images: torch.Tensor) -> tuple[list[Prediction], dict]:
        feats = self.encode(images)
        q_agent = self.agents(feats["maps"])                                     # (B, r, c)
        agents = self.agent_proj(q_agent)                                        # (B, r, D)
        head, B = self.head, images.shape[0]
        mask_features, memories = head.pixel_decoder(self.neck(feats["maps"]))
        mask_features, *memories = self.refinement([mask_features, *memories], agents)
        if self.queries_from == "agents":
            content, pos = head.querys2feat(agents), agents                      # (B, r, D)
        else:
            content, pos = head.queries(B, rein_queries=self.reins.queries())
        preds = head.transformer_decoder(content, pos, memories, mask_features)
        feats["q_agent"] = q_agent
        return preds, feats

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             teacher_features: TeacherFeatures | None = None) -> dict[str, torch.Tensor]:
        preds, feats = self(images)
        losses = self.criterion(preds, labels)
        if self.alpha:
            if teacher_features is None:
                if self.teacher is None:
                    raise ValueError("diffusion guidance (alpha > 0) needs a teacher or "
                                     "teacher_features")
                teacher_features = guidance_features(self.teacher.to(images.device), images,
                                                     labels, self.guidance)
            tf = teacher_features.to(images.device)
            dcl = self.dcl(feats["q_agent"], tf.weak, tf.strong)
            losses["loss_dcl_dist"] = self.alpha * dcl["dist"]
            losses["loss_dcl_sup"] = self.alpha * dcl["sup"]
        return losses


def build_toy_querydiff(alpha: float = 1.0, huber_target: str = "strong", num_queries: int = 19,
                        queries_from: str = "rein", lora_rank: int | None = 8,
                        teacher_weights: str | Path | None = TOY_DIFFUSION_WEIGHTS,
                        pretrained: bool = True, guidance: str = "teacher"
                        ) -> QueryDiffSegmentor:
    """QueryDiff on the toy VFM: Rein + Mask2Former (notebook 03's ``rein_m2f``) plus agent
    queries, refinement and, when ``alpha > 0``, the toy diffusion teacher (built on first use).
    ``alpha=0`` keeps agent queries and refinement without guidance (the ablation);
    ``guidance`` picks what the teacher looks at (``GUIDANCE``, module docstring)."""
    enc = build_encoder("toy_vfm", toy_weights_dir() if pretrained else None)
    cfg = toy_config(in_channels=(enc.width,) * 4, query_source="rein", num_queries=num_queries)
    reins = Reins(enc.depth, enc.width, token_length=num_queries, lora_rank=lora_rank,
                  query_dim=cfg.hidden_dim, link_to_queries=True, patch_size=enc.patch_size)
    criterion = MaskClassificationLoss(num_points=None)
    agents = AgentQueryGenerator(enc.width, len(enc.bundle.out_indices), num_queries, heads=4)
    refinement = AgentRefinement(cfg.hidden_dim, cfg.num_heads, gn_groups=cfg.gn_groups)
    dcl = teacher = None
    if alpha:
        channels = tuple(unet_channels()[j] for j in TOY_FEATURE_LAYERS)
        dcl = DiffusionConsistencyLoss(enc.width, channels, huber_target)
        world = current_world()                  # the teacher is built later, in this world
        teacher = lambda: DiffusionTeacher.toy(teacher_weights, world)  # noqa: E731  (lazily)
    return QueryDiffSegmentor(enc, RescaleNeck(enc.patch_size), Mask2FormerHead(cfg), criterion,
                              reins=reins, agents=agents, refinement=refinement, dcl=dcl,
                              teacher=teacher, alpha=alpha, queries_from=queries_from,
                              guidance=guidance)


