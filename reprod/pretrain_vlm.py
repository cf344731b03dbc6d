"""The toy VLM: a small open_clip CLIP trained contrastively on ToyWorld images and captions.

    python -m reprod.pretrain_toy vlm --until-done           # train (or resume), in chunks
    python -m reprod.pretrain_toy vlm --export               # fp16 safetensors + model card

**Data.** Each pair is a ``random``-style render (the wide style sampler, never the held-out
``streetview`` palette family or the painted style) and a caption from ``lessons.captions``: half
are whole views described by some of their classes, counts, weather and look; half are random
crops described by their largest classes, often in the downstream prompt forms (CAT-Seg's template,
the bare class name). The held-out class (``HELD_OUT_CLASS``) is named in captions like any other.

**Loss.** CLIP's symmetric InfoNCE with a learnable temperature, with one change: captions repeat
(many crops are "a photo of a car"), so every pair whose captions are the same string counts as a
positive (the target distribution is uniform over them) instead of a false negative.

Dimension glossary: B batch (pairs), D joint embedding width, L context length, H W image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lessons import toyworld as tw
from lessons.backbones import WEIGHTS_DIR, Encoder, create_model, get_bundle
from lessons.captions import HELD_OUT_CLASS, captioned_view, class_areas, random_crop
from lessons.classes import CLASSES
from lessons.text import CATSEG_TEMPLATE, default_tokenizer, encode_text
from reprod.resumable import ResumableRun, card_facts, write_card_files


@dataclass
class VLMConfig:
    """Hyper-parameters of the toy VLM's contrastive pretraining."""

    steps: int = 1600
    batch_size: int = 96              # image-caption pairs per step
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    crop_fraction: float = 0.5        # pairs that are crops captioned with their classes
    grad_clip: float = 1.0
    bf16: bool = True                 # autocast matmuls to bfloat16 (AMX CPUs, GPUs)
    seed: int = 0
    toyworld_version: str = field(default=tw.TOYWORLD_VERSION)


def make_batch(step: int, cfg: VLMConfig, size=tw.DEFAULT_SIZE
               ) -> tuple[torch.Tensor, list[str]]:
    """The step's images (B, 3, H, W), crops resized to the full size and randomly flipped, and
    their captions."""
    images, captions = [], []
    for k in range(cfg.batch_size):
        words = [cfg.seed, 11, step, k]
        img, caption, _ = captioned_view(words, cfg.crop_fraction, size)
        x = F.interpolate(torch.from_numpy(img)[None], size=size, mode="bilinear",
                          align_corners=False)[0]                        # (3, H, W)
        if np.random.default_rng([*words, 1]).random() < 0.5:
            x = x.flip(-1)
        images.append(x.clamp(0, 1))
        captions.append(caption)
    return torch.stack(images), captions


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over unit embeddings img, txt (B, D); equal captions are all positives."""
    logits = logit_scale.exp() * img @ txt.T                          # (B, B) image -> text
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cap = torch.tensor([ids[c] for c in captions])
    target = (cap[:, None] == cap[None, :]).float()
    target = target / target.sum(1, keepdim=True)                     # symmetric, rows sum to 1
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class VLMRun(ResumableRun):
    """The open_clip model and optimizer of one toy-VLM run."""

    name = "vlm"

    def __init__(self, cfg: VLMConfig, run_dir: str | Path):
        super().__init__(cfg, run_dir)
        torch.manual_seed(cfg.seed)
        self.model = create_model("toy_vlm")
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2
                 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2
                and "embedding" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                                     betas=(0.9, 0.98), eps=1e-6)
        self.encoder = Encoder(get_bundle("toy_vlm"), self.model)      # for its normalize()
        self.tokenizer = default_tokenizer(self.model.context_length)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, captions = make_batch(step, self.cfg)
        img = self.model.encode_image(self.encoder.normalize(images))                 # (B, D)
        txt = self.model.encode_text(self.tokenizer(captions))                        # (B, D)
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        loss = clip_loss(img, txt, self.model.logit_scale, captions)
        return loss, {"scale": self.model.logit_scale.detach().exp().item(),
                      "unique": len(set(captions)) / len(captions)}

    def after_step(self, step: int) -> None:
        with torch.no_grad():                       # CLIP clamps the temperature at 1/100
            self.model.logit_scale.clamp_(0, np.log(100))

    def export(self, path: str | Path | None = None) -> Path:
        """The whole CLIP (both towers) as fp16 safetensors loadable by the ``toy_vlm`` bundle."""
        from safetensors.torch import save_file

        path = Path(path or WEIGHTS_DIR / get_bundle("toy_vlm").weights)
        state = {k: v.half().contiguous() for k, v in self.model.state_dict().items()}
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

    facts = card_facts(run, "toy_vlm", weights) | {"held_out_class": HELD_OUT_CLASS,
                                                    "measured": measured}
    n_params = sum(p.numel() for p in run.model.parameters())
    lines = [
        "# Model card: toy VLM (`toy_vlm`)", "",
        "A CLIP for ToyWorld: open_clip `CLIP`, vision tower a ViT with patch 8 at 64x128, width",
        "192, 6 blocks; text tower width 64, 4 blocks, context 32, open_clip's BPE tokenizer;",
        f"joint embedding 128 ({n_params:,} parameters), stored in fp16.", "",
        "## Training", "",
        "Contrastive image-text pretraining (`python -m reprod.pretrain_toy vlm`) on",
        "`random`-style renders and captions written from scene metadata (`lessons.captions`):",
        "half whole views (classes, counts, weather, look; clause dropout, synonyms), half crops",
        "captioned with their largest classes, often in the downstream prompt forms. Equal",
        f"captions in a batch count as positives. The class `{HELD_OUT_CLASS}` is named in",
        "captions; CAT-Seg's unseen-class lesson keeps it out of segmentation training only.", "",
        f"- steps: {run.step} of {run.cfg.steps}, batch {run.cfg.batch_size} pairs",
        f"- wall time: {run.seconds / 60:.1f} min on {facts['hardware']}",
        f"- seed: {run.cfg.seed}; ToyWorld {run.cfg.toyworld_version}; sha256 "
        f"{facts['sha256'][:16]}...",
        "- pretraining styles: the `random` sampler (never the `streetview` palette family or",
        "  the painted style: those two targets are unseen).", ""]
    if measured:
        lines += ["## Measured (`python -m reprod.pretrain_toy vlm --export --card`)", ""]
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
