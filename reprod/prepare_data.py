"""Prepare dataset trees for training: convert labels, rare-class statistics, verify, toy export.

    python -m reprod.prepare_data convert gtav data/gta              # labels/<n>_labelTrainIds.png
    python -m reprod.prepare_data convert cityscapes data/cityscapes # *_gtFine_labelTrainIds.png
    python -m reprod.prepare_data convert mapillary data/mapillary   # {dir}/labels/*_labelTrainIds
    python -m reprod.prepare_data convert bdd100k data/bdd100k       # tqdm's colormaps/ copies
    python -m reprod.prepare_data stats gtav data/gta                # rare-class sampling files
    python -m reprod.prepare_data verify cityscapes data/cityscapes  # exit 1 on any problem
    python -m reprod.prepare_data export-toyworld data/toy           # ToyWorld in these layouts

``convert`` writes Cityscapes trainIds (uint8 mode L, 255 = ignore) beside the official labels, as
the DAFormer-style converters that Rein, tqdm and MFuser ship do (``tools/convert_datasets/``): GTAV
and Cityscapes labelIds through the 34-id table, Mapillary v1.2 by class name into
``{training,validation}/labels/<key>_labelTrainIds.png`` (the path tqdm's and MFuser's dataset
configs read), and BDD100K's trainId masks copied, checked, to tqdm's
``labels/sem_seg/colormaps/{split}/<id>_labelTrainIds.png``. ACDC ships trainIds already.

``stats`` writes the files rare-class sampling (RCS) reads, in the DAFormer format, into the dataset
root (or ``--out``): ``sample_class_stats.json`` (a list of ``{"file": <trainId label>, "<trainId>":
pixels, ...}``, classes present only), ``sample_class_stats_dict.json`` (the same keyed by file) and
``samples_with_class.json`` (``{"<trainId>": [[file, pixels], ...]}``). Files are the
``_labelTrainIds.png`` paths relative to the root (RCS loaders match on the base name). The
min-pixels rule is the loader's: a class is drawn with probability softmax((1 - f_c) / T) over the
classes present (f_c its pixel frequency), then an image with *more than* ``min_pixels`` of it (tqdm
and MFuser: 3000 pixels, T = 100; DAFormer: T = 0.01; ``mmseg/datasets/ug_dataset.py`` and the
``rare_class_sampling`` settings of their dataset configs). ``rcs_summary.json`` records, per class,
the pixels, frequency, that probability and how many images pass the rule, and a warning names any
class present in the stats that no image passes (the tqdm loader asserts on that).

``verify`` checks a tree before training: the image count of each split against the official
count (``--no-expect-counts`` for toy trees), image/label pairing, equal image and label sizes and
label values inside the dataset's table; it prints a report naming every missing or bad file and
exits 1 when there is any problem. Labels are decoded; images are checked from their headers,
or decoded fully with ``--decode`` (a truncated file has a valid header). Files the readers would
not see are reported too: a link that loops or leads nowhere, a suffix in another case (``.PNG``).

Exit status: 0 done; 1 ``verify`` found problems; 2 a usage or dataset error (missing root or
folder, unpaired files or bad label values for ``convert``/``stats``), with its message.

``export-toyworld`` writes ToyWorld scenes in the official layouts under ``OUT/{gta,cityscapes,
bdd100k,mapillary,acdc}`` (``reprod.datasets.export_toyworld``). It writes only into an empty
folder or one holding nothing but an earlier export's own files, unchanged (their SHA-256 are in
its ``toyworld_export.json``); anything else there is refused before a file is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lessons import toyworld as tw
from lessons.classes import CLASSES, NUM_CLASSES
from reprod.data.datasets import (
    ACDC_CONDITIONS,
    DATASETS,
    EXPORT_DIRS,
    TOY_SPLITS,
    LabelDecoder,
    SegmentationFiles,
    build_dataset,
    check_sample,
    dataset_class,
    export_toyworld,
    write_label,
)

__all__ = [
    "RCS_MIN_PIXELS",
    "RCS_TEMPERATURE",
    "STATS_FILES",
    "class_stats",
    "convert",
    "main",
    "rcs_probabilities",
    "rcs_summary",
    "verify",
    "write_stats",
]

RCS_MIN_PIXELS = 3000      # tqdm / MFuser UGDataset (their configs' rare_class_sampling)
RCS_TEMPERATURE = 100.0    # tqdm / MFuser class_temp; DAFormer uses 0.01
STATS_FILES = ("sample_class_stats.json", "sample_class_stats_dict.json",
               "samples_with_class.json", "rcs_summary.json")


def _map(fn: Callable, items: Sequence, workers: int, desc: str) -> list:
    """``[fn(x) for x in items]`` with a progress bar, in ``workers`` processes when > 1."""
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in tqdm(items, desc=desc, leave=False)]
    chunk = max(1, min(64, len(items) // (4 * workers)))
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=chunk), total=len(items), desc=desc,
                         leave=False))


def _datasets(name: str, root: str | Path, splits: Sequence[str] | None, labels: str | None,
              conditions: Sequence[str] | None, **kwargs) -> list[SegmentationFiles]:
    cls = dataset_class(name)
    extra = {"conditions": tuple(conditions)} if name == "acdc" and conditions else {}
    return [build_dataset(name, root, split, labels=labels, **extra, **kwargs)
            for split in (splits or cls.DEFAULT_SPLITS)]


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------
def _convert_one(decoder: LabelDecoder, job: tuple[Path, Path]) -> None:
    src, dst = job
    write_label(dst, decoder(src))


def convert(name: str, root: str | Path, splits: Sequence[str] | None = None, *,
            strict: bool = True, workers: int = 1) -> list[Path]:
    """Write the trainIds of every official label of ``splits``; returns the written files.

    Every label file found is converted, also one whose image is missing (``verify`` reports
    those). ``strict=False`` maps values outside the table to 255 (DAFormer's behaviour).
    """
    if name == "acdc":
        raise ValueError("ACDC ships its trainIds (gt/<cond>/<split>/..._gt_labelTrainIds.png): "
                         "there is nothing to convert; read them with labels='trainids'")
    written = []
    for ds in _datasets(name, root, splits, None, None, strict_labels=strict,
                        allow_unpaired=True):
        labels = [s.label for s in ds.samples] + list(ds.pairing.unpaired_labels)
        if not labels:
            raise ValueError(f"{ds.title} {ds.split}: no labels found under {ds.root}.\n"
                             f"{ds.SOURCE}")
        jobs = [(lab, ds.train_id_path(lab)) for lab in labels]
        _map(partial(_convert_one, ds.decoder), jobs, workers, f"convert {name} {ds.split}")
        written += [dst for _, dst in jobs]
    return written


# ----------------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------------
def _pixel_counts(decoder: LabelDecoder, label: Path) -> list[int]:
    counts = np.bincount(decoder(label).ravel(), minlength=256)
    return counts[:NUM_CLASSES].tolist()


def class_stats(datasets: Iterable[SegmentationFiles], workers: int = 1) -> list[dict]:
    """Per labelled image: ``{"file": its trainId label relative to the root, "<c>": pixels}``
    for every class c present (DAFormer's ``sample_class_stats`` entries)."""
    out = []
    for ds in datasets:
        counts = _map(partial(_pixel_counts, ds.decoder), [s.label for s in ds.samples],
                      workers, f"stats {ds.name} {ds.split}")
        for sample, row in zip(ds.samples, counts, strict=True):
            entry = {str(c): n for c, n in enumerate(row) if n > 0}
            file = ds.rcs_label(sample).relative_to(ds.root).as_posix()
            out.append({**entry, "file": file})
    return out


def rcs_probabilities(pixels: dict[int, int], temperature: float = RCS_TEMPERATURE
                      ) -> dict[int, float]:
    """RCS class probabilities softmax((1 - f_c) / T), f_c = pixels_c / sum of pixels, over the
    classes with pixels (``mmseg/datasets/ug_dataset.py`` of tqdm and MFuser, after DAFormer's
    ``get_rare_class_sample``)."""
    classes = sorted(c for c, n in pixels.items() if n > 0)
    if not classes:
        raise ValueError("no labelled pixels: cannot compute rare-class sampling probabilities")
    total = sum(pixels[c] for c in classes)
    logits = np.array([(1.0 - pixels[c] / total) / temperature for c in classes])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {c: float(v) for c, v in zip(classes, p, strict=True)}


def rcs_summary(stats: list[dict], min_pixels: int = RCS_MIN_PIXELS,
                temperature: float = RCS_TEMPERATURE) -> dict:
    """Per class present: pixels, frequency, RCS probability, images with it and images with
    more than ``min_pixels`` of it; ``ready`` is False when a class has no such image."""
    pixels: dict[int, int] = {}
    images: dict[int, list[int]] = {}
    for entry in stats:
        for key, n in entry.items():
            if key != "file":
                pixels[int(key)] = pixels.get(int(key), 0) + n
                images.setdefault(int(key), []).append(n)
    probs = rcs_probabilities(pixels, temperature)
    total = sum(pixels.values())
    classes = {str(c): {"name": CLASSES[c], "pixels": pixels[c], "freq": pixels[c] / total,
                        "prob": probs[c], "images": len(images[c]),
                        "images_over_min_pixels": sum(n > min_pixels for n in images[c])}
               for c in sorted(pixels)}
    starved = [CLASSES[int(c)] for c, v in classes.items() if v["images_over_min_pixels"] == 0]
    return {"min_pixels": min_pixels, "temperature": temperature, "images": len(stats),
            "ready": not starved, "starved_classes": starved, "classes": classes}


def write_stats(stats: list[dict], out_dir: str | Path, min_pixels: int = RCS_MIN_PIXELS,
                temperature: float = RCS_TEMPERATURE) -> dict:
    """Write the RCS files (``STATS_FILES``) into ``out_dir``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_file = {e["file"]: {k: v for k, v in e.items() if k != "file"} for e in stats}
    with_class: dict[str, list] = {}
    for file, counts in by_file.items():
        for c, n in counts.items():
            with_class.setdefault(c, []).append([file, n])
    with_class = {c: with_class[c] for c in sorted(with_class, key=int)}
    summary = rcs_summary(stats, min_pixels, temperature)
    for name, body in zip(STATS_FILES, (stats, by_file, with_class, summary), strict=True):
        (out / name).write_text(json.dumps(body, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
def verify(name: str, root: str | Path, splits: Sequence[str] | None = None, *,
           labels: str | None = None, conditions: Sequence[str] | None = None,
           expect_counts: bool = True, check_values: bool = True, decode: bool = False,
           workers: int = 1, out: Callable[[str], None] = print) -> list[str]:
    """Check ``splits`` of a tree; prints a report through ``out``, returns every problem.
    ``decode`` reads every image's pixels, not only its header."""
    cls = dataset_class(name)
    problems: list[str] = []
    for split in splits or cls.DEFAULT_SPLITS:
        try:
            ds = _datasets(name, root, [split], labels, conditions, allow_unpaired=True)[0]
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{cls.title} {split}: {e}")
            out(f"{cls.title} {split}: cannot read the tree\n  {e}")
            continue
        problems += _verify_split(ds, expect_counts, check_values, decode, workers, out)
    out(f"verify {name} {root}: " + (f"{len(problems)} problem(s)" if problems else "all good"))
    return problems


def _verify_split(ds: SegmentationFiles, expect_counts: bool, check_values: bool, decode: bool,
                  workers: int, out: Callable[[str], None]) -> list[str]:
    head = f"{ds.title} {ds.split}"
    if getattr(ds, "conditions", None):
        head += f" ({', '.join(ds.conditions)})"
    n, expected = len(ds.samples), ds.expected_count()
    problems = [f"{p}: image without a label" for p in ds.pairing.unpaired_images]
    problems += [f"{p}: label without an image" for p in ds.pairing.unpaired_labels]
    problems += ds.pairing.skipped
    if n == 0:
        hint = "" if ds.pairing.unpaired_labels else " " + ds.convert_hint()
        problems.append(f"{head}: no image/label pairs under {ds.root}.{hint}".rstrip())
    if expect_counts and expected is not None and n != expected:
        problems.append(f"{head}: {n} image/label pairs, the official count is {expected}")
    checks = _map(partial(check_sample, ds.decoder, values=check_values, decode=decode),
                  ds.samples, workers, f"verify {ds.name} {ds.split}")
    problems += [p for found in checks for p in found]
    count = f"{n} pairs" + (f" (official: {expected})" if expected is not None else
                            " (no official count known)")
    out(f"{head}: {count}, {len(problems)} problem(s)")
    for p in problems:
        out(f"  BAD {p}")
    return problems


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _split_map(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        split, sep, toy = item.partition("=")
        if not sep or toy not in tw.SPLITS or split not in TOY_SPLITS:
            raise argparse.ArgumentTypeError(
                f"--split-map takes DATASET_SPLIT=TOY_SPLIT with a dataset split in "
                f"{tuple(TOY_SPLITS)} and a ToyWorld split in {tw.SPLITS}, got {item!r}")
        out[split] = toy
    return out


def _dataset_args(p: argparse.ArgumentParser, labels: bool = True) -> None:
    p.add_argument("dataset", choices=tuple(DATASETS))
    p.add_argument("root", type=Path, help="the dataset root")
    p.add_argument("--split", nargs="+", default=None,
                   help="splits (default: gtav 'all', others 'train val')")
    if labels:
        p.add_argument("--labels", default=None,
                       help="label format (default: the official one; e.g. 'trainids')")
        p.add_argument("--conditions", nargs="+", default=None, choices=ACDC_CONDITIONS,
                       help="ACDC conditions (default: all four)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes (default: up to 8)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reprod.prepare_data",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="write *_labelTrainIds.png beside the official labels")
    _dataset_args(p, labels=False)
    p.add_argument("--lenient", action="store_true",
                   help="map label values outside the table to 255 instead of failing")
    p = sub.add_parser("stats", help="write the rare-class sampling statistics")
    _dataset_args(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the root)")
    p.add_argument("--min-pixels", type=int, default=RCS_MIN_PIXELS)
    p.add_argument("--temperature", type=float, default=RCS_TEMPERATURE)
    p = sub.add_parser("verify", help="check a tree before training; exit 1 on problems")
    _dataset_args(p)
    p.add_argument("--expect-counts", action=argparse.BooleanOptionalAction, default=True,
                   help="compare image counts with the official ones (default: yes)")
    p.add_argument("--check-values", action=argparse.BooleanOptionalAction, default=True,
                   help="decode every label and check its values (default: yes)")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully, not only its header (finds truncated files)")
    p = sub.add_parser("export-toyworld", help="write ToyWorld scenes in the official layouts")
    p.add_argument("out", type=Path, help="export root; one folder per dataset inside")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=tuple(DATASETS))
    p.add_argument("--length", type=int, default=16, help="scenes per split (and condition)")
    p.add_argument("--size", type=int, nargs=2, default=list(tw.DEFAULT_SIZE),
                   metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-map", nargs="+", default=[], metavar="SPLIT=TOY_SPLIT",
                   help="ToyWorld split per dataset split, e.g. val=test (default: same name)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert" and args.dataset == "acdc":
        print("convert acdc: nothing to do, ACDC ships its trainIds "
              "(gt/<cond>/<split>/<seq>/..._gt_labelTrainIds.png; read them with "
              "--labels trainids)")
        return 0
    if args.command == "convert":
        files = convert(args.dataset, args.root, args.split, strict=not args.lenient,
                        workers=args.workers)
        print(f"convert {args.dataset}: wrote {len(files)} trainId labels")
        return 0
    if args.command == "stats":
        sets = _datasets(args.dataset, args.root, args.split, args.labels, args.conditions)
        summary = write_stats(class_stats(sets, args.workers), args.out or args.root,
                              args.min_pixels, args.temperature)
        print(f"stats {args.dataset}: {summary['images']} images, "
              f"{len(summary['classes'])} classes -> {args.out or args.root}")
        if not summary["ready"]:
            print(f"WARNING: no image has more than {args.min_pixels} pixels of "
                  f"{summary['starved_classes']}: tqdm's rare-class sampler would fail; lower "
                  "--min-pixels (small toy images) or drop those classes", file=sys.stderr)
        return 0
    if args.command == "verify":
        problems = verify(args.dataset, args.root, args.split, labels=args.labels,
                          conditions=args.conditions, expect_counts=args.expect_counts,
                          check_values=args.check_values, decode=args.decode,
                          workers=args.workers)
        return 1 if problems else 0
    split_map = _split_map(args.split_map)
    for name in args.datasets:
        m = export_toyworld(args.out / EXPORT_DIRS[name], name, length=args.length,
                            size=tuple(args.size), seed=args.seed, split_map=split_map,
                            progress=True)
        print(f"export-toyworld {name}: {', '.join(m['parts'])} -> {args.out / EXPORT_DIRS[name]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for a dataset error, with its message)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
