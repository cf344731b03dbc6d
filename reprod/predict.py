"""Run a model on your own images, folders and videos: label maps, colours, overlays.

    python -m reprod.predict lessons/weights/checkpoints/02_rein/rein_seed0.safetensors \\
        --input photo.jpg --out predictions/              # a lesson checkpoint (toy scale)
    python -m reprod.predict rein_dinov2_gtav --input street/ --out predictions/
        # a config with its trained runs/rein_dinov2_gtav/final.safetensors (or --weights FILE)
    python -m reprod.predict mfuser_eva_gtav --official mfuser --weights mfuser_eva_gta.pth \\
        --input drive.mp4 --out predictions/              # a released checkpoint, converted
    python -m reprod.predict rein_dinov2_acdc --weights final.safetensors --tta \\
        --input ACDC/rgb_anon --acdc-submission acdc_test.zip    # the ACDC server's archive

Like mmsegmentation's ``MMSegInferencer(model)(inputs, out_dir=...)``: an input is an image, a
folder (searched recursively for .png .jpg .jpeg .bmp .webp .tif .tiff, any letter case) or a
video (.mp4 .avi .mov .mkv .webm, read and written back with imageio's ffmpeg). Per image it
writes, at the image's own size: ``<name>_labelTrainIds.png`` (Cityscapes trainIds, uint8,
255 ignore), ``<name>_color.png`` (the Cityscapes palette) and ``<name>_overlay.jpg`` (the colours
over the photo); per video ``<name>_overlay.mp4``; once ``legend.png``. Relative folders are kept.
A file that cannot be read is reported, the rest are processed, and the failures are listed at
the end (exit status 1 when there were any).

**Models.** A lesson checkpoint (``lessons.checkpoints``; the toy models): the photo is resized
to the toy scale (64 x 128) and the prediction back to the photo's size, and every output says
that these models were trained on ToyWorld, not on real streets. A ``reprod`` config: its model
with the frozen parts from the local weight files it names, and ``--weights`` (our
``final.safetensors`` / ``checkpoint.pt``, default ``runs/<name>/final.safetensors``) or a released
checkpoint with ``--official rein|mfuser|tqdm|catseg`` through the converters
(:mod:`lessons.convert`; tqdm's is unverified until a released file has loaded); predicted as
the config's protocol tests (keep-ratio resize to the ``--target``'s scale, sliding window,
scores back to the image size; ``reprod.protocols``). Weights come only from local files.

**Test-time augmentation** (``--tta``, off by default so the published protocols stay as they
are): horizontal flip and the scales of mmsegmentation's ``--aug-test`` (0.5 ... 1.75), softmax
scores averaged (``reprod.protocols.TTA``).

**ACDC submissions** (``--acdc-submission FILE.zip``): ACDC's test labels are on its server
only. For every image under the input's ``rgb_anon/<condition>/test/`` (or any folder), the zip
holds a PNG at the same relative path and file name (``--acdc-ids labelids``, the default:
Cityscapes labelIds as the Cityscapes server takes; ``trainids``: trainIds, as ACDC's authors'
own code writes them, brdav/refign ``models/segmentation_model.py`` ``predict_step`` at commit
16a623c). Check the server's page for the form it expects before uploading.

Dimension glossary: H W an image's size, K classes (19).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "Predictor", "collect_inputs", "load_predictor",
           "main", "predict"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
TOY_NOTE = ("note: a lesson checkpoint is a toy model trained on ToyWorld's rendered streets at "
            "64x128, not on real photos; expect a toy's guess, not a real segmentation")


# ----------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """A model and how it sees an image: ``toy_size`` for lesson checkpoints (resize there and
    back), else ``protocol`` and ``target`` (``reprod.protocols``)."""

    model: nn.Module
    toy_size: tuple[int, int] | None = None
    protocol: object = None
    target: str = "cityscapes"
    tta: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    note: str = ""

    def scores(self, image: np.ndarray) -> torch.Tensor:
        """Class probabilities (K, H, W) of an RGB uint8 image (H, W, 3)."""
        from reprod.protocols import TTA, predict_image

        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))   # (3, H, W) uint8
        with torch.no_grad():
            if self.toy_size is None:                         # the config's protocol
                tta = TTA() if self.tta else None
                out = predict_image(self.model, x, self.protocol, self.target, self.device, tta)
                return out.float().cpu() if tta else out.float().cpu().softmax(0)
            # a toy model sees the photo at the toy scale (TTA's scales around that size)
            small = F.interpolate(x[None].float(), size=self.toy_size, mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)

            def score(img: torch.Tensor) -> torch.Tensor:      # (3, h, w) uint8 -> (K, h, w)
                from lessons.train import predict as toy_predict

                batch = img[None].float().div(255).to(self.device)
                return toy_predict(self.model, batch)[0].float().cpu()

            probs = TTA().apply(score, small) if self.tta else score(small).softmax(0)
            return F.interpolate(probs[None], size=x.shape[-2:], mode="bilinear",
                                 align_corners=False)[0]                       # (K, H, W)


def predict(predictor: Predictor | nn.Module, image: np.ndarray) -> np.ndarray:
    """The trainId label map (H, W) uint8 of an RGB uint8 image (H, W, 3) (grayscale (H, W) and
    RGBA are converted). A bare ``nn.Module`` is taken as a lesson (toy) model."""
    if isinstance(predictor, nn.Module):
        predictor = Predictor(predictor.eval(), toy_size=(64, 128),
                              device=next(predictor.parameters()).device)
    return predictor.scores(_rgb(image)).argmax(0).numpy().astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image[..., :3]


def load_predictor(spec: str, weights: str | Path | None = None, official: str | None = None,
                   target: str = "cityscapes", tta: bool = False,
                   device: str | None = None) -> Predictor:
    """A lesson checkpoint (``*.safetensors`` with a lesson header) or a ``reprod`` config name /
    YAML with ``weights`` (default ``runs/<name>/final.safetensors``) or ``official`` weights."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(spec)
    if path.suffix == ".safetensors":
        from lessons.checkpoints import load_lesson_checkpoint, read_metadata

        if weights or official:
            raise ValueError("a lesson checkpoint holds its own weights: drop --weights and "
                             "--official")
        meta = read_metadata(path)
        if "builder" not in meta:
            raise ValueError(f"{path} is not a lesson checkpoint (no builder in its header); "
                             "for a reprod run give the config and --weights")
        model, _ = load_lesson_checkpoint(path)
        return Predictor(model.to(dev).eval(), toy_size=(64, 128), tta=tta, device=dev,
                         note=TOY_NOTE)
    from reprod.evaluate import experiment_protocol, load_official, load_trained
    from reprod.experiment import build_model, load_experiment

    exp = load_experiment(spec)
    model = build_model(exp)
    if official:
        if weights is None:
            raise ValueError(f"--official {official} needs --weights: the released checkpoint")
        load_official(model, weights, official)
    else:
        load_trained(model, weights or Path("runs") / exp.name / "final.safetensors")
    protocol = experiment_protocol(exp)
    protocol.spec(target)                                    # a clear error for a bad target
    return Predictor(model.to(dev).eval(), protocol=protocol, target=target, tta=tta,
                     device=dev)


# ----------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------
def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, path relative to its input root) for every image and video under ``paths``, and
    the problems found (missing inputs, files that are neither)."""
    found, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            kept = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
            found += [(f, f.relative_to(p)) for f in kept]
            if not kept:
                problems.append(f"{p}: no image or video inside")
        elif p.is_file():
            if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
                found.append((p, Path(p.name)))
            else:
                problems.append(f"{p}: not an image or video ({', '.join(IMAGE_SUFFIXES)}; "
                                f"{', '.join(VIDEO_SUFFIXES)})")
        else:
            problems.append(f"{p}: no such file or folder")
    return found, problems


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 image (H, W, 3); a ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from e


def _colour(label: np.ndarray) -> np.ndarray:
    from lessons.viz import colorize

    return colorize(label)                                    # (H, W, 3) uint8


def _overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colour = _colour(label).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def write_legend(out: Path) -> Path:
    """``legend.png``: every class name beside its Cityscapes colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from lessons.classes import CLASSES, PALETTE

    fig = plt.figure(figsize=(3.2, 5.2))
    fig.legend(handles=[Patch(color=np.array(c) / 255, label=n) for n, c in
                        zip(CLASSES, PALETTE, strict=True)], loc="center", frameon=False)
    path = out / "legend.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _save_image(predictor: Predictor, image: np.ndarray, stem: Path) -> np.ndarray:
    label = predict(predictor, image)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(f"{stem}_labelTrainIds.png")
    Image.fromarray(_colour(label)).save(f"{stem}_color.png")
    Image.fromarray(_overlay(image, label)).save(f"{stem}_overlay.jpg", quality=92)
    return label


def _video_frames(path: Path) -> tuple[Iterator[np.ndarray], float]:
    import imageio.v3 as iio

    try:
        fps = float(iio.immeta(path, plugin="pyav" if _has_av() else "FFMPEG").get("fps", 25))
        return iio.imiter(path, plugin="pyav" if _has_av() else "FFMPEG"), fps
    except Exception as e:                    # imageio's plugins raise their own kinds
        raise ValueError(f"{path}: cannot be read as a video ({type(e).__name__}: {e})") from e


def _has_av() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def _save_video(predictor: Predictor, path: Path, stem: Path) -> int:
    import imageio.v2 as iio2

    frames, fps = _video_frames(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    writer = iio2.get_writer(f"{stem}_overlay.mp4", fps=fps, macro_block_size=1)
    n = 0
    try:
        for frame in frames:
            frame = _rgb(np.asarray(frame))
            writer.append_data(_overlay(frame, predict(predictor, frame)))
            n += 1
    finally:
        writer.close()
    if n == 0:
        raise ValueError(f"{path}: the video has no frames")
    return n


def run(predictor: Predictor, inputs: Sequence[str | Path], out: Path,
        acdc_zip: Path | None = None, acdc_ids: str = "labelids",
        progress: bool = True) -> list[str]:
    """Predict every input into ``out`` (and the ACDC archive); returns the failures."""
    from tqdm import tqdm

    files, failures = collect_inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
    write_legend(out)
    archive = zipfile.ZipFile(acdc_zip, "w", zipfile.ZIP_DEFLATED) if acdc_zip else None
    try:
        for path, rel in tqdm(files, desc="predict", disable=not progress):
            stem = out / rel.parent / rel.stem
            try:
                if path.suffix.lower() in VIDEO_SUFFIXES:
                    _save_video(predictor, path, stem)
                    continue
                label = _save_image(predictor, read_image(path), stem)
                if archive is not None:
                    archive.writestr(rel.with_suffix(".png").as_posix(),
                                     _png_bytes(_acdc_ids(label, acdc_ids)))
            except ValueError as e:
                failures.append(str(e))
    finally:
        if archive is not None:
            archive.close()
    return failures


def _acdc_ids(label: np.ndarray, kind: str) -> np.ndarray:
    if kind == "trainids":
        return label
    from reprod.data.datasets import train_ids_to_label_ids

    return train_ids_to_label_ids(label)


def _png_bytes(label: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    from reprod.evaluate import OFFICIAL

    ap = argparse.ArgumentParser(prog="python -m reprod.predict",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a lesson checkpoint (.safetensors) or a reprod config")
    ap.add_argument("--input", nargs="+", required=True, help="images, folders or videos")
    ap.add_argument("--out", type=Path, required=True, help="where predictions go")
    ap.add_argument("--weights", type=Path, help="the trained or released weights (configs)")
    ap.add_argument("--official", choices=OFFICIAL,
                    help="--weights is a released checkpoint of this family (tqdm's converter "
                    "is unverified until a released file has loaded)")
    ap.add_argument("--target", default="cityscapes",
                    help="the protocol's target whose scale to use (configs; default cityscapes)")
    ap.add_argument("--tta", action="store_true", help="flip + multi-scale test-time "
                    "augmentation (off: the published protocols)")
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument("--acdc-submission", type=Path, metavar="ZIP",
                    help="also write ACDC's test-server archive here")
    ap.add_argument("--acdc-ids", choices=("labelids", "trainids"), default="labelids")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        predictor = load_predictor(args.model, args.weights, args.official, args.target,
                                   args.tta, args.device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if predictor.note:
        print(predictor.note, file=sys.stderr)
    failures = run(predictor, args.input, args.out, args.acdc_submission, args.acdc_ids,
                   progress=not args.no_progress)
    print(f"wrote predictions to {args.out}" + (f" and {args.acdc_submission}"
                                                  if args.acdc_submission else ""))
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
