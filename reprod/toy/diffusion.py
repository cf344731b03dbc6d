"""The toy diffusion teacher: a small diffusers DDPM trained on ToyWorld for QueryDiff's lesson.

    python -m reprod.toy.pretrain diffusion --until-done      # train (or resume), in chunks
    python -m reprod.toy.pretrain diffusion --export --card   # fp16 safetensors + model card

**Model.** ``lessons.querydiff.TOY_UNET``: a diffusers ``UNet2DModel`` on 64x128 RGB pixels (no
VAE: the images are small), DDPM's linear schedule (betas 1e-4 -> 0.02, 1000 steps).

**Data.** Broader than the student's, as Stable Diffusion's LAION-5B is broader than any
segmentation backbone's data: scenes of ToyWorld's ``web`` world in web looks, and in one image
of ``painted_fraction`` the painted style (Stable Diffusion saw paintings; the toy VFM and VLM
never see the painted family), randomly flipped, scaled to [-1, 1]. No labels.

**Loss.** The DDPM objective (Ho et al. 2020, "simple" loss): t uniform in 0..999, ``z_t =
sqrt(ab_t) x + sqrt(1 - ab_t) eps``, mean squared error between eps and the U-Net's prediction.
The exported weights are an exponential moving average of the trained ones.

**Measured property (the card).** Not "the samples look nice": what QueryDiff uses is the layout
the U-Net's features carry at the *strong-noise* timestep. A linear probe (BatchNorm + 1x1 conv
on the hooked up-block features, resized to 16x32) trained on the ``synthetic`` source only and
scored on every domain, for the trained teacher at t_s and t_w and for a random-init U-Net.

Dimension glossary: B batch, H W image size (64x128 for the U-Net).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lessons import toyworld as tw
from lessons.backbones import toy_weights_dir
from lessons.classes import NUM_CLASSES
from lessons.querydiff import (
    TOY_IMAGE_SIZE,
    TOY_UNET,
    DiffusionTeacher,
    build_toy_unet,
    toy_scheduler,
    toy_timesteps,
)
from reprod.toy.resumable import ResumableRun, card_facts, write_card_files

__all__ = [
    "DiffusionConfig", "DiffusionProbe", "DiffusionRun", "layout_probe", "make_batch",
    "write_card",
]


@dataclass
class DiffusionConfig:
    """Hyper-parameters of the toy DDPM."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema: float = 0.995
    painted_fraction: float = 0.2     # images in the painted style (outside the VFM's data)
    grad_clip: float = 1.0
    bf16: bool = True                 # bfloat16 autocast where native (bf16_autocast_pays)
    seed: int = 0
    toyworld_version: str = field(default=tw.TOYWORLD_VERSION)


def make_batch(step: int, cfg: DiffusionConfig) -> torch.Tensor:
    """The step's images (B, 3, 64, 128) in [0, 1]: web scenes, a fraction of them painted."""
    images = []
    for k in range(cfg.batch_size):
        rng = np.random.default_rng([cfg.seed, 13, step, k])
        raster = tw.rasterize(tw.draw_scene(rng, "web"), TOY_IMAGE_SIZE)
        look = "painted" if rng.random() < cfg.painted_fraction else "web"
        x = torch.from_numpy(tw.stylize(raster, tw.sample_style(look, rng), rng))
        images.append(x.flip(-1) if rng.random() < 0.5 else x)
    return torch.stack(images)


class DiffusionRun(ResumableRun):
    """U-Net, its EMA and the optimizer of one DDPM run."""

    name = "diffusion"

    def __init__(self, cfg: DiffusionConfig, run_dir: str | Path, device: str | None = None):
        super().__init__(cfg, run_dir, device)
        torch.manual_seed(cfg.seed)
        self.model = build_toy_unet(None).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.scheduler = toy_scheduler()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)

    def state_modules(self) -> dict:
        return {"model": self.model, "ema": self.ema, "opt": self.opt}

    def data(self) -> Callable[[int], torch.Tensor]:
        return partial(make_batch, cfg=self.cfg)

    def loss(self, step: int, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = 2 * batch - 1                                  # (B, 3, H, W)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        noise = torch.randn(x.shape, generator=g)                             # on the CPU, so
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],),
                          generator=g)                                        # any device agrees
        x, noise, t = x.to(self.device), noise.to(self.device), t.to(self.device)
        pred = self.model(self.scheduler.add_noise(x, noise, t), t).sample
        return F.mse_loss(pred.float(), noise), {}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = min(self.cfg.ema, (1 + step) / (10 + step))                  # warm-up of the decay
        for pe, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            pe.mul_(m).add_(p.detach(), alpha=1 - m)

    def export(self, path: str | Path | None = None) -> Path:
        """The EMA U-Net as fp16 safetensors (``lessons.querydiff.build_toy_unet`` loads it)."""
        from safetensors.torch import save_file

        path = Path(path or toy_weights_dir(tw.TOYWORLD_VERSION) / "toy_diffusion.safetensors")
        state = {k: v.half().contiguous().cpu() for k, v in self.ema.state_dict().items()}
        save_file(state, str(path), metadata={"toyworld_version": self.cfg.toyworld_version,
                                              "steps": str(self.step)})
        return path


# ----------------------------------------------------------------------------------------------
# The card's measured property: a linear layout probe on U-Net features
# ----------------------------------------------------------------------------------------------


class DiffusionProbe(nn.Module):
    """A frozen teacher's hooked features at one timestep -> BatchNorm -> 1x1 conv -> K logits.

    The features of all hooked layers are resized to ``grid`` (16x32: stride 4 of a 64x128
    image) and concatenated. The noise is the same draw for every batch (a seeded generator),
    so the probe is deterministic.
    """

    def __init__(self, teacher: DiffusionTeacher, which: str = "strong",
                 grid: tuple[int, int] = (16, 32), num_classes: int = NUM_CLASSES):
        super().__init__()
        if which not in ("weak", "strong"):
            raise ValueError(f"which must be 'weak' or 'strong', got {which!r}")
        self.__dict__["teacher"] = teacher         # frozen, not trained, not saved
        self.which, self.grid = which, grid
        C = sum(teacher.channels)
        self.norm = nn.BatchNorm2d(C, affine=False)
        self.head = nn.Conv2d(C, num_classes, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.teacher.features(images, generator=torch.Generator().manual_seed(0))
        maps = f.strong if self.which == "strong" else f.weak
        return torch.cat([F.interpolate(m, size=self.grid, mode="bilinear", align_corners=False)
                          for m in maps], dim=1)                                 # (B, C, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images)))                      # (B, K, h, w)


def layout_probe(weights: str | Path | None, steps: int = 300, test_length: int = 200,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """mIoU per domain of the probe: trained teacher at t_s and t_w, random U-Net at t_s."""
    from lessons.train import TrainConfig, evaluate_domains, train
    from lessons.utils import seed_everything

    domains = ["synthetic", *tw.TARGET_DOMAINS]
    tests = {d: tw.ToyWorld(d, "test", length=test_length, seed=seed) for d in domains}
    source = tw.ToyWorld("synthetic", "train", length=2000, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, seed=seed, progress=False)
    t_w, t_s = toy_timesteps()
    cases = {f"toy DDPM, t_s={t_s} (strong)": (weights, "strong"),
             f"toy DDPM, t_w={t_w} (weak)": (weights, "weak"),
             f"random-init U-Net, t_s={t_s}": (None, "strong")}
    out = {}
    for name, (w, which) in cases.items():
        seed_everything(seed)
        probe = DiffusionProbe(DiffusionTeacher.toy(w), which)
        train(probe, source, cfg)
        out[name] = evaluate_domains(probe, tests)
    return out


def write_card(run: DiffusionRun, measured: dict | None, weights: Path) -> Path:
    """The toy diffusion teacher's model card beside its weights (markdown and JSON)."""
    from lessons.train import domain_table
    from reprod.toy.resumable import data_lines, gate_section

    t_w, t_s = toy_timesteps()
    facts = card_facts(run, "toy_diffusion", weights) | {
        "unet": TOY_UNET, "timesteps": [t_w, t_s], "layout_probe": measured}
    n_params = sum(p.numel() for p in run.ema.parameters())
    lines = [
        "# Model card: toy diffusion teacher (`toy_diffusion`)", "",
        "A DDPM for ToyWorld, QueryDiff's frozen teacher in notebook 05: diffusers `UNet2DModel`",
        "on 64x128 RGB pixels (no VAE), blocks 32/64/64/64, one resnet per block, attention at",
        f"8x16 ({n_params:,} parameters), fp16, DDPM's linear schedule (1e-4 -> 0.02, 1000).", "",
        "## Training", "",
        "The DDPM noise-prediction loss (`python -m reprod.toy.pretrain diffusion`); no labels.",
        "The weights are the EMA of the trained network.", "",
        f"- steps: {run.step} of {run.cfg.steps}, batch {run.cfg.batch_size}, lr {run.cfg.lr},"
        f" EMA {run.cfg.ema}, bf16 autocast where native {run.cfg.bf16}",
        f"- wall time: {run.seconds / 60:.1f} min on {facts['hardware']}",
        f"- seed: {run.cfg.seed}; ToyWorld {run.cfg.toyworld_version}; sha256 "
        f"{facts['sha256'][:16]}...",
        *data_lines(f"broader than the student's: ToyWorld's `web` world, and one image in "
                    f"{round(1 / run.cfg.painted_fraction)} in the painted style (Stable "
                    "Diffusion saw paintings; the toy VFM and VLM never see that family)",
                    teacher=True), "",
        "## QueryDiff's timesteps", "",
        "SD 2.1's t_w = 0 and t_s = 100 keep alpha-bar 0.99915 and 0.8942 of the signal; on this",
        f"schedule the same noise levels are **t_w = {t_w}** and **t_s = {t_s}**",
        "(`lessons.querydiff.toy_timesteps`).", "",
        *gate_section(("G5",), weights)]
    if measured:
        lines += ["## Measured: layout probe (`python -m reprod.toy.pretrain diffusion --export "
                  "--card`)", "",
                  "mIoU (%) of a linear probe (BatchNorm + 1x1 conv) on the hooked up-block",
                  "features, resized to 16x32, trained 300 steps x 16 on `synthetic` only, 200",
                  "test scenes per domain:", "", "```", domain_table(measured), "```", ""]
    return write_card_files(facts, lines, weights)
