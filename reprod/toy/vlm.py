"""The toy VLM: a small open_clip CLIP trained contrastively on ToyWorld images and captions.

    python -m reprod.toy.pretrain vlm --until-done           # train (or resume), in chunks
    python -m reprod.toy.pretrain vlm --export --card        # fp16 safetensors + model card

**Data.** ToyWorld's ``web`` world (broad content, covered and random looks; never the source's
rendered family, ``streetview``'s family or the painted style) with captions from
``lessons.captions``: about a third of the pairs are crops captioned by the classes filling them
(often in the downstream prompt forms, sometimes by a subtype), the rest whole views described
by their content (classes, counts, where things are, subtypes; rarely the weather or the look).
The held-out class (``HELD_OUT_CLASS``) is named in captions like any other.

**Loss.** CLIP's symmetric InfoNCE with a learnable temperature, with one change: captions repeat
(many crops are "a photo of a car"), so every pair whose captions are the same string counts as a
positive (the target distribution is uniform over them) instead of a false negative. Plus a
**region term** (in the spirit of RegionCLIP, Zhong et al., CVPR 2022): each whole view brings
``regions`` captioned boxes; a box's embedding is the mean of the view's unit dense embeddings in
the MaskCLIP form (the last block's value path, the form ``lessons.zeroshot`` reads) over the
patches whose centres it covers, and the same InfoNCE matches boxes and their captions across the
batch. CLIP's image-level loss alone leaves patches unaligned with text (world 1's toy VLM: 3%
MaskCLIP mIoU); the region term is what makes the toy VLM localise.

Dimension glossary: B batch (pairs), R regions, D joint embedding width, L context length,
H W image size, h w token grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lessons import toyworld as tw
from lessons.backbones import WEIGHTS_DIR, Encoder, create_model, get_bundle
from lessons.captions import HELD_OUT_CLASS, captioned_view, class_areas, random_crop
from lessons.classes import CLASSES
from lessons.text import CATSEG_TEMPLATE, default_tokenizer, encode_text
from reprod.toy.resumable import ResumableRun, card_facts, write_card_files

__all__ = [
    "Batch", "VLMConfig", "VLMRun", "clip_loss", "crop_classification", "make_batch",
    "measure", "region_embeddings", "retrieval", "write_card", "zero_shot_miou",
]


@dataclass
class VLMConfig:
    """Hyper-parameters of the toy VLM's contrastive pretraining."""

    steps: int = 2000
    batch_size: int = 96              # image-caption pairs per step
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    crop_fraction: float = 0.35       # pairs that are crops captioned with their classes
    regions: int = 3                  # captioned boxes per whole view (the region term)
    region_weight: float = 1.0
    grad_clip: float = 1.0
    bf16: bool = True                 # bfloat16 autocast where native (bf16_autocast_pays)
    seed: int = 0
    toyworld_version: str = field(default=tw.TOYWORLD_VERSION)


@dataclass
class Batch:
    """One step's pairs: images (B, 3, H, W), captions, and the whole views' regions as
    ``boxes`` (n, 5) = (view index, top, left, height, width in pixels) with their captions."""

    images: torch.Tensor
    captions: list[str]
    boxes: torch.Tensor
    region_captions: list[str]


def make_batch(step: int, cfg: VLMConfig, size=tw.DEFAULT_SIZE) -> Batch:
    """The step's pairs: crops resized to the full size, every view randomly flipped (its
    regions with it)."""
    images, captions, boxes, region_captions = [], [], [], []
    for k in range(cfg.batch_size):
        words = [cfg.seed, 11, step, k]
        img, caption, _, regions = captioned_view(words, cfg.crop_fraction, size, "web",
                                                  n_regions=cfg.regions)
        x = F.interpolate(torch.from_numpy(img)[None], size=size, mode="bilinear",
                          align_corners=False)[0]                        # (3, H, W)
        flip = np.random.default_rng([*words, 1]).random() < 0.5
        images.append((x.flip(-1) if flip else x).clamp(0, 1))
        captions.append(caption)
        for r in regions:
            top, left, h, w = r.box
            boxes.append([k, top, size[1] - left - w if flip else left, h, w])
            region_captions.append(r.caption)
    return Batch(torch.stack(images), captions,
                 torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5), region_captions)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over unit embeddings img, txt (B, D); equal captions are all positives."""
    logits = logit_scale.exp() * img @ txt.T                          # (B, B) image -> text
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cap = torch.tensor([ids[c] for c in captions], device=img.device)
    target = (cap[:, None] == cap[None, :]).float()
    target = target / target.sum(1, keepdim=True)                     # symmetric, rows sum to 1
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def region_embeddings(dense: torch.Tensor, boxes: torch.Tensor, patch: int) -> torch.Tensor:
    """Unit embeddings (n, D) of boxes (n, 5) pooled from unit dense maps (B, D, h, w): the mean
    over the patches whose centres lie in the box."""
    h, w = dense.shape[-2:]
    ys = (torch.arange(h, device=dense.device) + 0.5) * patch          # (h,) centres in pixels
    xs = (torch.arange(w, device=dense.device) + 0.5) * patch          # (w,)
    b, top, left, bh, bw = boxes.to(dense.device).unbind(-1)           # (n,) each
    rows = (ys[None] >= top[:, None]) & (ys[None] < (top + bh)[:, None])       # (n, h)
    cols = (xs[None] >= left[:, None]) & (xs[None] < (left + bw)[:, None])     # (n, w)
    mask = (rows[:, :, None] & cols[:, None, :]).float()               # (n, h, w)
    mask = mask / mask.sum((1, 2), keepdim=True).clamp(min=1)
    pooled = torch.einsum("nhw,ndhw->nd", mask, dense[b.long()])       # (n, D)
    return F.normalize(pooled, dim=-1)


class VLMRun(ResumableRun):
    """The open_clip model and optimizer of one toy-VLM run."""

    name = "vlm"

    def __init__(self, cfg: VLMConfig, run_dir: str | Path, device: str | None = None):
        super().__init__(cfg, run_dir, device)
        torch.manual_seed(cfg.seed)
        self.model = create_model("toy_vlm").to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2
                 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2
                and "embedding" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                                     betas=(0.9, 0.98), eps=1e-6)
        self.encoder = Encoder(get_bundle("toy_vlm"), self.model)      # the tower, block by block
        self.tokenizer = default_tokenizer(self.model.context_length)

    def data(self) -> Callable[[int], Batch]:
        return partial(make_batch, cfg=self.cfg)

    def loss(self, step: int, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        enc, B = self.encoder, self.cfg.batch_size
        images = enc.normalize(batch.images.to(self.device))
        _, before_last, grid = enc.forward_tokens(images, blocks=enc.depth - 1)   # (B, N, C)
        img = enc.project(enc.block(enc.depth - 1, before_last, grid))           # (B, D)
        tokens = self.tokenizer(batch.captions + batch.region_captions).to(self.device)
        txt = F.normalize(self.model.encode_text(tokens).float(), dim=-1)        # (B + n, D)
        scale = self.model.logit_scale
        loss = clip_loss(F.normalize(img.float(), dim=-1), txt[:B], scale, batch.captions)
        parts = {"clip": loss.item()}
        if len(batch.region_captions):
            dense = enc.dense_embedding(None, grid, form="maskclip", before_last=before_last)
            boxes = region_embeddings(F.normalize(dense.float(), dim=1), batch.boxes,
                                      enc.patch_size)                             # (n, D)
            region = clip_loss(boxes, txt[B:], scale, batch.region_captions)
            loss = loss + self.cfg.region_weight * region
            parts["region"] = region.item()
        parts |= {"scale": scale.detach().exp().item(),
                  "unique": len(set(batch.captions)) / len(batch.captions)}
        return loss, parts

    def after_step(self, step: int) -> None:
        with torch.no_grad():                       # CLIP clamps the temperature at 1/100
            self.model.logit_scale.clamp_(0, np.log(100))

    def export(self, path: str | Path | None = None) -> Path:
        """The whole CLIP (both towers) as fp16 safetensors loadable by the ``toy_vlm`` bundle."""
        from safetensors.torch import save_file

        path = Path(path or WEIGHTS_DIR / get_bundle("toy_vlm").weights)
        state = {k: v.half().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path), metadata={"toyworld_version": self.cfg.toyworld_version,
                                              "steps": str(self.step)})
        return path


# ----------------------------------------------------------------------------------------------
# Measured properties for the card
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def crop_classification(model: torch.nn.Module, n: int = 400, seed: int = 1,
                        domain: str = "synthetic") -> dict[str, float]:
    """Zero-shot top-1 accuracy on crops whose largest class fills at least half of them.

    The prompts are CAT-Seg's template for the 19 classes; crops come from ``domain`` test
    scenes. Returns overall accuracy, the held-out class's accuracy, and chance (1/19).
    """
    enc = Encoder(get_bundle("toy_vlm"), model)
    text = encode_text(model, [CATSEG_TEMPLATE.format(c) for c in CLASSES])   # (K, D)
    ds = tw.ToyWorld(domain, "test", length=n, seed=seed)
    rng = np.random.default_rng(seed)
    correct, held_right, held_all, total = 0, 0, 0, 0
    for i in range(n):
        image, label = ds[i]
        label = np.asarray(label)
        top, left, h, w = random_crop(label, rng)
        areas = class_areas(label[top:top + h, left:left + w], min_pixels=1)
        if not areas or next(iter(areas.values())) < 0.5:
            continue
        truth = next(iter(areas))
        crop = F.interpolate(image[None, :, top:top + h, left:left + w], size=tw.DEFAULT_SIZE,
                             mode="bilinear", align_corners=False)
        emb = F.normalize(enc.project(enc.forward_tokens(enc.normalize(crop))[1]), dim=-1)
        guess = CLASSES[int((emb @ text.T).argmax())]
        correct += guess == truth
        total += 1
        if truth == HELD_OUT_CLASS:
            held_all += 1
            held_right += guess == truth
    return {"crop_top1": correct / max(total, 1), "crops": total,
            f"{HELD_OUT_CLASS}_top1": held_right / held_all if held_all else float("nan"),
            "chance": 1 / len(CLASSES)}


@torch.no_grad()
def retrieval(model: torch.nn.Module, n: int = 200, seed: int = 1) -> dict[str, float]:
    """Image-to-text and text-to-image top-1 among ``n`` held-out whole-scene pairs (a caption
    string shared by several images counts as right for each of them)."""
    enc = Encoder(get_bundle("toy_vlm"), model)
    pairs = [captioned_view([seed, 99, k], crop_fraction=0.0) for k in range(n)]
    images = torch.stack([torch.from_numpy(p[0]) for p in pairs])
    captions = [p[1] for p in pairs]
    img = F.normalize(model.encode_image(enc.normalize(images)), dim=-1)          # (n, D)
    txt = F.normalize(model.encode_text(default_tokenizer(model.context_length)(captions)), -1)
    sim = img @ txt.T                                                              # (n, n)
    same = np.array([[a == b for b in captions] for a in captions])
    i2t = same[np.arange(n), sim.argmax(1).numpy()].mean()
    t2i = same[sim.argmax(0).numpy(), np.arange(n)].mean()
    return {"image_to_text_top1": float(i2t), "text_to_image_top1": float(t2i),
            "chance": 1 / n}


def zero_shot_miou(model: torch.nn.Module, test_length: int = 100, seed: int = 0
                   ) -> dict[str, float]:
    """MaskCLIP-style zero-shot mIoU per domain (``lessons.zeroshot``), no segmentation training."""
    from lessons.train import evaluate_domains
    from lessons.zeroshot import MaskCLIPSegmenter

    domains = ["synthetic", *tw.TARGET_DOMAINS]
    tests = {d: tw.ToyWorld(d, "test", length=test_length, seed=seed) for d in domains}
    return evaluate_domains(MaskCLIPSegmenter(Encoder(get_bundle("toy_vlm"), model)), tests)


def measure(weights: str | Path, random_too: bool = True) -> dict:
    """Every measured property of the card, for the trained VLM and a random-init one."""
    out = {}
    for name, w in [("toy VLM", weights), ("random-init CLIP", None)][: 2 if random_too else 1]:
        model = create_model("toy_vlm", w).eval()
        out[name] = {"retrieval": retrieval(model), "crops": crop_classification(model),
                     "zero_shot_miou": zero_shot_miou(model)}
    return out


def write_card(run: VLMRun, measured: dict | None, weights: Path) -> Path:
    """The toy VLM's model card beside its weights (markdown, and the facts as JSON)."""
    from lessons.train import domain_table
    from reprod.toy.resumable import data_lines, gate_section

    facts = card_facts(run, "toy_vlm", weights) | {"held_out_class": HELD_OUT_CLASS,
                                                    "measured": measured}
    n_params = sum(p.numel() for p in run.model.parameters())
    lines = [
        "# Model card: toy VLM (`toy_vlm`)", "",
        "A CLIP for ToyWorld: open_clip `CLIP`, vision tower a ViT with patch 8 at 64x128, width",
        "192, 6 blocks; text tower width 64, 4 blocks, context 32, open_clip's BPE tokenizer;",
        f"joint embedding 128 ({n_params:,} parameters), stored in fp16.", "",
        "## Training", "",
        "Contrastive image-text pretraining (`python -m reprod.toy.pretrain vlm`) on web renders",
        "and captions written from scene metadata (`lessons.captions`), mostly about content:",
        "classes, counts, where things are, relations and subtypes (a van, a double-decker);",
        "the weather in one caption in ten, the look in one in twenty. A third of the pairs are",
        "crops captioned by the classes filling them, often in the downstream prompt forms.",
        "CLIP's symmetric InfoNCE (equal captions count as positives) plus a region term: each",
        f"whole view brings {run.cfg.regions} captioned boxes, and a box's mean MaskCLIP-form",
        "dense embedding must match its caption. The class "
        f"`{HELD_OUT_CLASS}` is named in captions; CAT-Seg's",
        "unseen-class lesson keeps it out of segmentation training only.", "",
        f"- steps: {run.step} of {run.cfg.steps}, batch {run.cfg.batch_size} pairs",
        f"- wall time: {run.seconds / 60:.1f} min on {facts['hardware']}",
        f"- seed: {run.cfg.seed}; ToyWorld {run.cfg.toyworld_version}; sha256 "
        f"{facts['sha256'][:16]}...",
        *data_lines("ToyWorld's `web` world, as the toy VFM's"), "",
        *gate_section(("G4",), weights)]
    if measured:
        lines += ["## Measured (`python -m reprod.toy.pretrain vlm --export --card`)", ""]
        for name, m in measured.items():
            r, c = m["retrieval"], m["crops"]
            lines += [f"- **{name}**: retrieval among 200 held-out scenes, image->text top-1 "
                      f"{100 * r['image_to_text_top1']:.1f}%, text->image "
                      f"{100 * r['text_to_image_top1']:.1f}% (chance {100 * r['chance']:.1f}%); "
                      f"zero-shot crop classification top-1 {100 * c['crop_top1']:.1f}% over "
                      f"{c['crops']} synthetic crops ({HELD_OUT_CLASS}: "
                      f"{100 * c[HELD_OUT_CLASS + '_top1']:.1f}%; chance {100 * c['chance']:.1f}%)"]
        lines += ["", "MaskCLIP-style zero-shot mIoU (%), 100 test scenes per domain, no "
                  "segmentation training:", "", "```",
                  domain_table({k: v["zero_shot_miou"] for k, v in measured.items()}), "```", ""]
    return write_card_files(facts, lines, weights)
