"""Pretrain the course's toy foundation models on ToyWorld, resumably, in short chunks.

    python -m reprod.pretrain_toy vfm --chunk-minutes 9      # run (or resume) one chunk
    python -m reprod.pretrain_toy vfm --steps 3000 --until-done
    python -m reprod.pretrain_toy vfm --export               # fp16 safetensors + model card

**Toy VFM** (``toy_vfm`` bundle: timm ViT, patch 8 at 64x128, d192 x 6, 4 registers), trained
self-supervised with **no segmentation labels**, DINOv2-style:

- two global views of one scene, each rendered in an independently sampled ``random`` style
  (with probability ``p_same_style`` in the same style: the headroom knob) and the same random
  resized crop and flip, so their patches correspond one to one;
- an EMA teacher (momentum cosine-scheduled to 1), centring and sharpening of its outputs;
- a DINO loss on the CLS token across the two views (teacher on one style, student on the other);
- an iBOT loss on patch tokens: the student sees its view with random patches masked, the teacher
  the *other style's* view unmasked, and the student predicts the teacher's distribution at each
  masked location;
- a dense cross-style InfoNCE (``objective="nce"``, the default): at every patch position the
  student's feature of one style must pick the same scene's teacher feature in the other style
  among the batch's scenes at that position.

``objective`` chooses ``"nce"``, ``"dino_ibot"`` (DESIGN's DINO + iBOT form) or both. On CPU pilots
(32 pairs a step, 400-800 steps) DINO + iBOT collapsed to a uniform teacher (entropy back to
log K) with lr 5e-4/K 1024 and with lr 2e-4/K 256, so the default is the contrastive objective,
which cannot collapse (negatives) and directly asks for style-invariant, content-specific
patch features -- what a segmentation probe reads.

Training state (student, teacher, heads, optimizer, centres, step) is saved atomically under
``--run-dir`` at the end of every chunk; the batch of step ``i`` is drawn from seeds derived from
``(seed, i)``, so a resumed run sees exactly the data an unbroken one would.

Dimension glossary: B batch (pairs), C width, N tokens, M masked patches, K prototypes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lessons import toyworld as tw
from lessons.backbones import WEIGHTS_DIR, Encoder, build_encoder, get_bundle

RUN_DIR = Path("runs/pretrain_toy")


@dataclass
class VFMConfig:
    """Hyper-parameters of the toy VFM's self-supervised pretraining."""

    steps: int = 3000
    batch_size: int = 32              # scene pairs per step
    lr: float = 2e-4                  # DINO's 5e-4 x batch / 256, for 64 images a step
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    momentum: float = 0.994           # teacher EMA start, cosine to 1
    prototypes: int = 256             # K
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    ibot_weight: float = 1.0
    p_same_style: float = 0.2         # headroom: pairs sharing one style teach no invariance
    crop_scale: tuple[float, float] = (0.5, 1.0)
    grad_clip: float = 3.0
    objective: str = "nce"            # "nce", "dino_ibot" or "dino_ibot_nce" (see the docstring)
    nce_temp: float = 0.1
    seed: int = 0
    toyworld_version: str = field(default=tw.TOYWORLD_VERSION)


# ----------------------------------------------------------------------------------------------
# Data: two styles of one scene, the same crop
# ----------------------------------------------------------------------------------------------
def render_pair(seed_words: list[int], cfg: VFMConfig, size=tw.DEFAULT_SIZE
                ) -> tuple[np.ndarray, np.ndarray]:
    """Two (3, H, W) views of one scene: independent random styles, identical geometry."""
    rng = np.random.default_rng(seed_words)
    scene = tw.draw_scene(rng, "random")
    label, shade = tw.rasterize(scene, size)
    hz = scene.camera.horizon * size[0]
    style_a = tw.sample_style("random", rng)
    style_b = style_a if rng.random() < cfg.p_same_style else tw.sample_style("random", rng)
    a = tw.stylize(label, shade, style_a, rng, hz)
    b = tw.stylize(label, shade, style_b, rng, hz)
    return a, b


def _crop_params(rng: np.random.Generator, cfg: VFMConfig, h: int, w: int):
    scale = rng.uniform(*cfg.crop_scale)
    ch, cw = max(round(h * math.sqrt(scale)), 8), max(round(w * math.sqrt(scale)), 8)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return y, x, ch, cw, bool(rng.random() < 0.5)


def make_batch(step: int, cfg: VFMConfig, size=tw.DEFAULT_SIZE
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's batch: views (B, 3, H, W) x 2, one crop and flip per pair, both views alike."""
    h, w = size
    views_a, views_b = [], []
    for k in range(cfg.batch_size):
        words = [cfg.seed, 7, step, k]
        a, b = render_pair(words, cfg, size)
        y, x, ch, cw, flip = _crop_params(np.random.default_rng([*words, 1]), cfg, h, w)
        pair = torch.from_numpy(np.stack([a, b]))[:, :, y:y + ch, x:x + cw]   # (2, 3, ch, cw)
        pair = F.interpolate(pair, size=size, mode="bilinear", align_corners=False)
        if flip:
            pair = pair.flip(-1)
        views_a.append(pair[0])
        views_b.append(pair[1])
    return torch.stack(views_a), torch.stack(views_b)


# ----------------------------------------------------------------------------------------------
# Model: backbone + DINO/iBOT head
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
    """Encoder + a shared DINO/iBOT head (CLS and patch tokens) + a dense projection (NCE)."""

    def __init__(self, encoder: Encoder, prototypes: int, dense_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.head = DINOHead(encoder.width, prototypes)
        self.dense = nn.Sequential(nn.Linear(encoder.width, 256), nn.GELU(),
                                   nn.Linear(256, dense_dim))
        self.mask_token = nn.Parameter(torch.zeros(encoder.width))

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
        return self.head(cls), self.head(patches), dense               # (B, K), (B, h*w, K)


def dense_nce(z: torch.Tensor, z_target: torch.Tensor, temp: float) -> torch.Tensor:
    """Cross-style dense InfoNCE: at every patch position, pick this scene among the batch.

    z, z_target: (B, P, D) unit vectors of pixel-aligned views in two styles. Negatives are the
    other scenes *at the same position*, so position embeddings alone cannot solve it: the
    feature must say what is there, whatever the style.
    """
    logits = torch.einsum("bpd,cpd->pbc", z, z_target) / temp         # (P, B, B)
    P, B, _ = logits.shape
    target = torch.arange(B, device=z.device).expand(P, B)
    return F.cross_entropy(logits.reshape(P * B, B), target.reshape(P * B))


def _both_views_nce(s_dense: torch.Tensor, t_dense: torch.Tensor, B: int, temp: float
                    ) -> torch.Tensor:
    """Mean dense NCE of the two halves (view a vs b's teacher, view b vs a's teacher)."""
    return 0.5 * (dense_nce(s_dense[:B], t_dense[:B], temp)
                  + dense_nce(s_dense[B:], t_dense[B:], temp))


def ssl_losses(student: SSLNet, teacher: SSLNet, view_a: torch.Tensor, view_b: torch.Tensor,
               centers: dict[str, torch.Tensor], cfg: VFMConfig, step: int
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Each view's student against the other style's teacher: DINO (CLS), iBOT (masked
    patches) and/or the dense cross-style InfoNCE, as ``cfg.objective`` says.
    """
    if cfg.objective not in ("nce", "dino_ibot", "dino_ibot_nce"):
        raise ValueError(f"unknown objective {cfg.objective!r}")
    B = view_a.shape[0]
    with torch.no_grad():
        t_cls, t_patch, t_dense = teacher(torch.cat([view_a, view_b]))   # (2B, K), (2B, P, K)
    P = t_patch.shape[1]
    # the teacher's targets come from the *other* style's view: swap the halves
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])
    t_cls, t_patch, t_dense = t_cls[swap], t_patch[swap], t_dense[swap]
    if cfg.objective == "nce":
        _, _, s_dense = student(torch.cat([view_a, view_b]))
        nce = _both_views_nce(s_dense, t_dense, B, cfg.nce_temp)
        return nce, {"nce": nce.item(), "dino": float("nan"), "ibot": float("nan"),
                     "entropy": float("nan")}
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    ratio = torch.empty(2 * B, 1).uniform_(*cfg.mask_ratio, generator=g)
    mask = torch.rand(2 * B, P, generator=g) < ratio                    # (2B, P)
    s_cls, s_patch, s_dense = student(torch.cat([view_a, view_b]), mask=mask)
    q_cls = F.softmax((t_cls - centers["cls"]) / cfg.teacher_temp, dim=-1)
    q_patch = F.softmax((t_patch - centers["patch"]) / cfg.teacher_temp, dim=-1)
    dino = -(q_cls * F.log_softmax(s_cls / cfg.student_temp, dim=-1)).sum(-1).mean()
    ce_patch = -(q_patch * F.log_softmax(s_patch / cfg.student_temp, dim=-1)).sum(-1)  # (2B, P)
    ibot = (ce_patch * mask).sum() / mask.sum().clamp(min=1)
    with torch.no_grad():                                              # centre updates (EMA)
        m = cfg.center_momentum
        centers["cls"].mul_(m).add_(t_cls.mean(0), alpha=1 - m)
        centers["patch"].mul_(m).add_(t_patch.mean((0, 1)), alpha=1 - m)
    total = dino + cfg.ibot_weight * ibot
    nce = torch.zeros(())
    if cfg.objective == "dino_ibot_nce":
        nce = _both_views_nce(s_dense, t_dense, B, cfg.nce_temp)
        total = total + nce
    return total, {"dino": dino.item(), "ibot": ibot.item(), "nce": nce.item(),
                   "entropy": -(q_cls * q_cls.clamp_min(1e-12).log()).sum(-1).mean().item()}


def _lr(step: int, cfg: VFMConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _momentum(step: int, cfg: VFMConfig) -> float:
    t = min(step / max(cfg.steps, 1), 1.0)
    return 1 - (1 - cfg.momentum) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------
# The resumable loop
# ----------------------------------------------------------------------------------------------
class VFMRun:
    """State of one pretraining run, saved and restored as a whole."""

    def __init__(self, cfg: VFMConfig, run_dir: Path):
        self.cfg, self.dir = cfg, Path(run_dir)
        torch.manual_seed(cfg.seed)
        self.student = SSLNet(build_encoder("toy_vfm"), cfg.prototypes)
        self.teacher = SSLNet(build_encoder("toy_vfm"), cfg.prototypes)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.centers = {"cls": torch.zeros(cfg.prototypes), "patch": torch.zeros(cfg.prototypes)}
        self.step, self.seconds, self.log = 0, 0.0, []

    @property
    def ckpt(self) -> Path:
        return self.dir / "vfm_state.pt"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"cfg": asdict(self.cfg), "student": self.student.state_dict(),
                 "teacher": self.teacher.state_dict(), "opt": self.opt.state_dict(),
                 "centers": self.centers, "step": self.step, "seconds": self.seconds,
                 "log": self.log}
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)                       # atomic: a killed job leaves the old one

    def load(self) -> bool:
        if not self.ckpt.exists():
            return False
        state = torch.load(self.ckpt, weights_only=True)
        if state["cfg"] != asdict(self.cfg):
            diff = {k: (state["cfg"].get(k), v) for k, v in asdict(self.cfg).items()
                    if state["cfg"].get(k) != v}
            raise ValueError(f"{self.ckpt} was made with another config: {diff}; use another "
                             f"--run-dir or the same settings")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.opt.load_state_dict(state["opt"])
        self.centers = state["centers"]
        self.step, self.seconds, self.log = state["step"], state["seconds"], state["log"]
        return True

    def train_chunk(self, minutes: float, log_every: int = 25, stop_at: int | None = None
                    ) -> None:
        """Train until the run is done (or at step ``stop_at``) or ``minutes`` have passed; save."""
        cfg, start = self.cfg, time.perf_counter()
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self.student.train()
        while self.step < last and time.perf_counter() - start < 60 * minutes:
            for group in self.opt.param_groups:
                group["lr"] = _lr(self.step, cfg)
            view_a, view_b = make_batch(self.step, cfg)
            loss, parts = ssl_losses(self.student, self.teacher, view_a, view_b, self.centers,
                                     cfg, self.step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite SSL loss at step {self.step}: {parts}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
            self.opt.step()
            with torch.no_grad():                        # EMA teacher
                m = _momentum(self.step, cfg)
                for ps, pt in zip(self.student.parameters(), self.teacher.parameters(),
                                  strict=True):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            self.step += 1
            if self.step % log_every == 0 or self.step == cfg.steps:
                self.log.append({"step": self.step, "loss": loss.item(), **parts})
                print(f"step {self.step}/{cfg.steps} loss {loss.item():.3f} "
                      + " ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
        self.seconds += time.perf_counter() - start
        self.save()

    def export(self, path: Path | None = None) -> Path:
        """The teacher's backbone as fp16 safetensors loadable by the ``toy_vfm`` bundle."""
        from safetensors.torch import save_file

        path = Path(path or WEIGHTS_DIR / get_bundle("toy_vfm").weights)
        state = {k: v.half().contiguous()
                 for k, v in self.teacher.encoder.vit.state_dict().items()}
        save_file(state, str(path), metadata={"toyworld_version": self.cfg.toyworld_version,
                                              "steps": str(self.step)})
        return path


def write_card(run: VFMRun, gate: dict | None, path: Path | None = None) -> Path:
    """The toy VFM's model card (markdown, and the same facts as JSON beside it)."""
    from lessons.train import domain_table

    path = Path(path or WEIGHTS_DIR / "toy_vfm.md")
    facts = {"model": "toy_vfm", "bundle": asdict(get_bundle("toy_vfm")) | {"kwargs": None},
             "config": asdict(run.cfg), "steps_done": run.step,
             "wall_minutes": round(run.seconds / 60, 1), "hardware": hardware(),
             "toyworld_version": run.cfg.toyworld_version, "gate": gate}
    path.with_suffix(".json").write_text(json.dumps(facts, indent=1, default=str))
    lines = [
        "# Model card: toy VFM (`toy_vfm`)", "",
        "A DINOv2-style ViT for ToyWorld: timm `VisionTransformer`, patch 8 at 64x128, width 192,",
        "6 blocks, 3 heads, 4 registers, LayerScale 0.1 (2,734,464 parameters), stored in fp16.",
        "", "## Training", "",
        "Self-supervised, **no segmentation labels** (`python -m reprod.pretrain_toy vfm`): two",
        "views of one scene in independently sampled `random` styles (same crop and flip), an EMA",
        "teacher, a DINO loss on the CLS token across styles and an iBOT loss on masked patches",
        "whose targets come from the other style's view.", "",
        f"- steps: {run.step} of {run.cfg.steps}, batch {run.cfg.batch_size} scene pairs",
        f"- p_same_style: {run.cfg.p_same_style} (headroom knob)",
        f"- wall time: {run.seconds / 60:.1f} min on {hardware()}",
        f"- seed: {run.cfg.seed}; ToyWorld {run.cfg.toyworld_version}",
        "- pretraining styles: the `random` sampler, which never draws the `streetview` palette",
        "  family or the painted style: `streetview` and `painted` are truly unseen targets; the",
        "  other targets' looks lie inside the pretraining distribution.", ""]
    if gate:
        lines += ["## Measured (`python -m reprod.toy_gate`)", "",
                  "mIoU (%) after training on `synthetic` only, 300 steps x 16 each, 200 test",
                  "scenes per domain:", "", "```", domain_table(gate["results"]), "```", "",
                  "Gate, over the real-looking and adverse targets: "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in gate["gate"].items()), ""]
    path.write_text("\n".join(lines))
    return path


def hardware() -> str:
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
            if not torch.cuda.is_available() else torch.cuda.get_device_name(0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["vfm"])
    ap.add_argument("--run-dir", type=Path, default=RUN_DIR)
    ap.add_argument("--chunk-minutes", type=float, default=9.0)
    ap.add_argument("--until-done", action="store_true", help="chain chunks until finished")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--p-same-style", type=float, default=None)
    ap.add_argument("--objective", choices=["nce", "dino_ibot", "dino_ibot_nce"], default=None)
    ap.add_argument("--export", action="store_true", help="write the weights and stop")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VFMConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    if args.p_same_style is not None:
        cfg.p_same_style = args.p_same_style
    if args.objective is not None:
        cfg.objective = args.objective
    run = VFMRun(cfg, args.run_dir)
    resumed = run.load()
    print(f"{'resumed at step ' + str(run.step) if resumed else 'new run'} "
          f"({cfg.steps} steps, {hardware()})", flush=True)
    if args.export:
        print(f"wrote {run.export()} (step {run.step})")
        (args.run_dir / "vfm_log.json").write_text(json.dumps(run.log, indent=1))
        return 0
    while True:
        run.train_chunk(args.chunk_minutes)
        print(f"saved {run.ckpt} at step {run.step} ({run.seconds / 60:.1f} min in all)",
              flush=True)
        if run.step >= cfg.steps or not args.until_done:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
