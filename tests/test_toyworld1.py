"""Tests of lessons.toyworld: golden renders, determinism, labels, layout, domains and protocol.

After a deliberate change to what a seed renders, bump ``TOYWORLD_VERSION`` and regenerate the
golden table, then paste it over ``GOLDEN`` below::

    PYTHONPATH=. python tests/test_toyworld.py --regen
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from lessons.classes import IGNORE_INDEX, NUM_CLASSES, TRAIN_ID
from lessons.toyworld1 import (
    DEFAULT_SIZE,
    DOMAINS,
    HELD_OUT_FAMILIES,
    PALETTE_FAMILIES,
    RENDERED_CLASSES,
    SOURCE_DOMAIN,
    SPLITS,
    TARGET_DOMAINS,
    THIN_CLASSES,
    TOY_BENCHMARK,
    TOYWORLD_VERSION,
    VALIDATION_DOMAIN,
    ToyWorld,
    _Draws,
    benchmark_datasets,
    draw_scene,
    rasterize,
    render_across_domains,
    render_digest,
    render_sample,
    sample_style,
    scene_seed,
)

REPO = Path(__file__).resolve().parents[1]
ACROSS = "render_across_domains"
LARGE = (128, 256)
HOOD_DOMAINS = frozenset({"citylike", "dashcam", "fog", "night", "rain", "snow"})
SKY, ROAD, CAR = TRAIN_ID["sky"], TRAIN_ID["road"], TRAIN_ID["car"]

# ----------------------------------------------------------------------------------------------
# Golden renders. Keys: (domain, split, index) = ToyWorld(domain, split, seed=0)[index] at 64x128;
# (domain, split, index, size) = the same at another size; (ACROSS, seed, domain) =
# render_across_domains(seed)[domain]. Values: render_digest(image, label).
# A renderer change must bump TOYWORLD_VERSION and regenerate this table (see the module
# docstring): weights, lesson checkpoints and notebook outputs record the version they were made
# with.
# ----------------------------------------------------------------------------------------------
GOLDEN_VERSION = "1.0"
GOLDEN: dict[tuple, str] = {
    ("synthetic", "train", 0): "b5edd6dbee2a31c0",
    ("synthetic", "train", 7): "65fe0fcf57149239",
    ("synthetic", "train", 1999): "14af8dcce2ae8231",
    ("synthetic", "val", 0): "5d2710298257a82e",
    ("synthetic", "test", 0): "b48e0fc1b58fc3c3",
    ("citylike", "test", 0): "c68511950100cea4",
    ("dashcam", "test", 1): "39db7205c72a0c9b",
    ("streetview", "test", 2): "68e9582f0c5d9482",
    ("fog", "test", 3): "89bce8fa867fdc97",
    ("night", "test", 4): "2b16d3b38dd23a08",
    ("rain", "test", 5): "f185852b46ff68c5",
    ("snow", "test", 6): "85721f24eec69a7e",
    ("painted", "test", 7): "19c44e6f0abe6d09",
    ("fog", "val", 10): "641757a77e8e4fd7",
    ("validation", "val", 0): "8c04e40f77723550",
    ("validation", "val", 199): "b3d5023f58ebc766",
    ("random", "train", 0): "416e870b858a66ad",
    ("random", "train", 1): "5e176b40e8cb7638",
    ("dashcam", "test", 0, (128, 256)): "6dfa6dbd705d0938",
    ("render_across_domains", 0, "synthetic"): "ce7842616e908ae0",
    ("render_across_domains", 0, "painted"): "44036855d9ded8fd",
}


def _golden_keys() -> list[tuple]:
    """The keys of the golden table (used by --regen)."""
    keys: list[tuple] = [
        ("synthetic", "train", 0), ("synthetic", "train", 7), ("synthetic", "train", 1999),
        ("synthetic", "val", 0), ("synthetic", "test", 0),
    ]
    keys += [(d, "test", k) for k, d in enumerate(TARGET_DOMAINS)]
    keys += [("fog", "val", 10), ("validation", "val", 0), ("validation", "val", 199),
             ("random", "train", 0), ("random", "train", 1)]
    keys += [("dashcam", "test", 0, LARGE), (ACROSS, 0, "synthetic"), (ACROSS, 0, "painted")]
    return keys


def _golden_render(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Render a golden-table key: (image (3, H, W) float32, label (H, W) int64)."""
    if key[0] == ACROSS:
        _, seed, domain = key
        return render_across_domains(seed)[domain]
    domain, split, index = key[:3]
    size = key[3] if len(key) == 4 else DEFAULT_SIZE
    image, label = ToyWorld(domain, split, size=size, length=index + 1, seed=0)[index]
    return image.numpy(), label.numpy()


def _digest(key: tuple) -> str:
    return render_digest(*_golden_render(key))


def _literal(value) -> str:
    """A Python literal with double-quoted strings (the repository's style)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    return repr(value)


def _regen_table() -> str:
    lines = [f"GOLDEN_VERSION = {_literal(TOYWORLD_VERSION)}", "GOLDEN: dict[tuple, str] = {"]
    lines += [f"    {_literal(k)}: {_literal(_digest(k))}," for k in _golden_keys()]
    return "\n".join([*lines, "}"])


def test_version_matches_golden_table():
    # A renderer change must bump TOYWORLD_VERSION and regenerate GOLDEN (and GOLDEN_VERSION).
    assert TOYWORLD_VERSION == "1.0"
    assert GOLDEN_VERSION == TOYWORLD_VERSION


def test_golden_table_covers_every_domain():
    plain = {k[0] for k in GOLDEN if k[0] != ACROSS}
    assert plain == set(DOMAINS)
    assert any(len(k) == 4 and k[3] == LARGE for k in GOLDEN)
    assert any(k[0] == ACROSS for k in GOLDEN)
    assert len(GOLDEN) >= 18
    assert len(set(GOLDEN.values())) == len(GOLDEN)  # distinct renders, distinct digests


@pytest.mark.parametrize("key", list(GOLDEN), ids=str)
def test_golden_render(key):
    assert _digest(key) == GOLDEN[key], (
        f"ToyWorld render {key} changed: bump TOYWORLD_VERSION and regenerate GOLDEN "
        "(python tests/test_toyworld.py --regen)")


def test_dataset_item_is_render_sample():
    for domain, split, index in (("synthetic", "train", 3), ("night", "test", 5)):
        image, label = ToyWorld(domain, split, length=10, seed=2)[index]
        ref_image, ref_label = render_sample(scene_seed(2, domain, split, index), domain)
        np.testing.assert_array_equal(image.numpy(), ref_image)
        np.testing.assert_array_equal(label.numpy(), ref_label)


def test_render_digest_sees_image_and_label():
    image, label = _golden_render(("synthetic", "train", 0))
    base = render_digest(image, label)
    bumped = image.copy()
    bumped[0, 10, 10] = (round(float(bumped[0, 10, 10]) * 255) + 1) % 256 / 255
    relabelled = label.copy()
    relabelled[10, 10] = (relabelled[10, 10] + 1) % NUM_CLASSES
    assert render_digest(bumped, label) != base
    assert render_digest(image, relabelled) != base
    quantised = np.round(image * 255) / 255   # the digest sees the uint8 image only
    assert render_digest(quantised.astype(np.float32), label) == base


# ----------------------------------------------------------------------------------------------
# Determinism across processes
# ----------------------------------------------------------------------------------------------
_CHILD = """
import json, sys
from lessons.toyworld1 import ToyWorld, render_across_domains, render_digest
out = {}
render_across_domains(5, size=(96, 192))   # warm the caches in another order than the parent
for key in json.loads(sys.argv[1])[::-1]:
    if key[0] == "across":
        image, label = render_across_domains(key[1])[key[2]]
    else:
        d, s, i, size = key
        image, label = ToyWorld(d, s, size=tuple(size), length=i + 1, seed=0)[i]
        image, label = image.numpy(), label.numpy()
    out[json.dumps(key)] = render_digest(image, label)
print(json.dumps(out))
"""


def test_renders_are_identical_in_another_process():
    keys = [["synthetic", "train", 4, [64, 128]], ["night", "val", 2, [64, 128]],
            ["painted", "test", 1, [128, 256]], ["random", "train", 9, [64, 128]],
            ["across", 3, "fog"]]
    here = {}
    for key in keys:
        if key[0] == "across":
            here[json.dumps(key)] = _digest((ACROSS, key[1], key[2]))
        else:
            here[json.dumps(key)] = _digest((*key[:3], tuple(key[3])))
    hashseed = "271828" if os.environ.get("PYTHONHASHSEED") != "271828" else "314159"
    env = {**os.environ, "PYTHONHASHSEED": hashseed,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(keys)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there == here


# ----------------------------------------------------------------------------------------------
# Shared renders: 14 test-split scenes per domain at 64x128 and 3 per domain at 128x256
# ----------------------------------------------------------------------------------------------
PER_DOMAIN, PER_DOMAIN_LARGE = 14, 3


def _render_set(size: tuple[int, int], n: int) -> dict[str, list[tuple]]:
    """domain -> [(image (3, H, W), label (H, W), horizon row)] from ToyWorld(domain, "test")."""
    out = {}
    for d in DOMAINS:
        ds = ToyWorld(d, "test", size=size, length=n, seed=0)
        items = []
        for i in range(n):
            image, label = ds[i]
            assert image.dtype == torch.float32 and label.dtype == torch.int64
            scene = draw_scene(np.random.default_rng(scene_seed(0, d, "test", i)), d)
            items.append((image.numpy(), label.numpy(), scene.camera.horizon * size[0], scene))
        out[d] = items
    return out


@pytest.fixture(scope="module")
def renders() -> dict[str, list[tuple]]:
    return _render_set(DEFAULT_SIZE, PER_DOMAIN)


@pytest.fixture(scope="module")
def renders_large() -> dict[str, list[tuple]]:
    return _render_set(LARGE, PER_DOMAIN_LARGE)


def test_image_and_label_types_and_ranges(renders, renders_large):
    allowed = set(RENDERED_CLASSES) | {IGNORE_INDEX}
    for rs in (renders, renders_large):
        for items in rs.values():
            for image, label, _, _ in items:
                h, w = label.shape
                assert (h, w) in (DEFAULT_SIZE, LARGE)
                assert image.dtype == np.float32 and image.shape == (3, h, w)
                assert label.dtype == np.int64
                assert image.min() >= 0.0 and image.max() <= 1.0
                assert set(np.unique(label).tolist()) <= allowed


def test_ignore_only_on_the_hood(renders, renders_large):
    for rs in (renders, renders_large):
        for d, items in rs.items():
            for _, label, _, _ in items:
                h = label.shape[0]
                ignored = label == IGNORE_INDEX
                if d not in HOOD_DOMAINS:
                    assert not ignored.any(), d
                    continue
                assert ignored[-1].all(), d  # the hood spans the bottom row
                rows = np.nonzero(ignored.any(axis=1))[0]
                assert rows.min() >= 0.8 * h, (d, rows.min())
                # the hood is a solid shape hanging from the bottom: each column is ignored
                # from some row down to the last
                for col in ignored.T:
                    first = np.argmax(col)
                    assert col[first:].all()


def test_scene_geometry_matches_the_rendered_label(renders):
    # the tests below read the camera of draw_scene(rng of the scene's seed words)
    for d in ("synthetic", "dashcam", "streetview"):
        for _, label, _, scene in renders[d][:3]:
            np.testing.assert_array_equal(rasterize(scene, DEFAULT_SIZE)[0], label)


# ----------------------------------------------------------------------------------------------
# Classes, thin classes, layout prior
# ----------------------------------------------------------------------------------------------
def test_classes_per_scene(renders):
    counts, union = [], set()
    for items in renders.values():
        for _, label, _, _ in items:
            present = set(np.unique(label).tolist()) - {IGNORE_INDEX}
            counts.append(len(present))
            union |= present
    assert len(counts) >= 100
    assert min(counts) >= 8
    assert np.mean(counts) >= 10
    assert len(union) >= 15
    assert union == set(RENDERED_CLASSES)
    assert TRAIN_ID["train"] not in union and TRAIN_ID["motorcycle"] not in union
    assert TRAIN_ID["train"] == 16 and TRAIN_ID["motorcycle"] == 17
    assert 16 not in RENDERED_CLASSES and 17 not in RENDERED_CLASSES


def _thin_boxes(label: np.ndarray) -> list[tuple[int, int, int]]:
    """(class, width, height) of every connected component of a thin class."""
    boxes = []
    for c in THIN_CLASSES:
        components, _ = ndimage.label(label == c)
        for sl in ndimage.find_objects(components):
            boxes.append((c, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start))
    return boxes


@pytest.mark.parametrize(("size", "fixture"), [(DEFAULT_SIZE, "renders"),
                                                (LARGE, "renders_large")])
def test_thin_classes_fill_whole_patches(size, fixture, request):
    h, w = size
    min_w, min_h = w // 16, h // 4   # 8 x 16 at 64x128: one stride-8 patch wide, two tall
    seen = set()
    for d, items in request.getfixturevalue(fixture).items():
        for i, (_, label, _, _) in enumerate(items):
            for c, bw, bh in _thin_boxes(label):
                seen.add(c)
                assert bw >= min_w and bh >= min_h, (d, i, c, bw, bh)
    assert seen == set(THIN_CLASSES)


def test_layout_prior(renders):
    car_below, car_total = 0, 0
    for d, items in renders.items():
        for i, (_, label, hz, _) in enumerate(items):
            rows = np.broadcast_to(np.arange(label.shape[0])[:, None] + 0.5, label.shape)
            sky, road, car = rows[label == SKY], rows[label == ROAD], rows[label == CAR]
            assert sky.size and road.size, (d, i)
            assert sky.mean() < road.mean(), (d, i)
            assert sky.mean() < hz < road.mean(), (d, i, hz)
            assert sky.max() < hz, (d, i)        # no sky below the horizon
            assert road.min() > hz, (d, i)       # no road above it
            if car.size:
                assert (car > hz).mean() >= 0.6, (d, i)
                car_below += int((car > hz).sum())
                car_total += car.size
    assert car_total > 0 and car_below / car_total >= 0.9


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def _label_digest(label: torch.Tensor) -> str:
    return hashlib.sha256(label.numpy().astype(np.uint8).tobytes()).hexdigest()


@pytest.mark.parametrize("domain", [SOURCE_DOMAIN, VALIDATION_DOMAIN])
def test_splits_share_no_scene(domain):
    digests = {}
    for split in SPLITS:
        ds = ToyWorld(domain, split, length=200, seed=0)
        digests[split] = [_label_digest(ds[i][1]) for i in range(len(ds))]
        assert len(set(digests[split])) == 200, split   # no repeated scene inside a split
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(digests[a]) & set(digests[b]), (a, b)


def test_scene_seeds_are_distinct():
    words = [tuple(scene_seed(s, d, sp, i)) for s in (0, 1) for d in DOMAINS for sp in SPLITS
             for i in range(150)]
    assert len(set(words)) == len(words)
    # and so are the random streams they start (a seeding scheme could collide silently)
    first = {np.random.default_rng(list(w)).random() for w in words}
    assert len(first) == len(words)
    assert scene_seed(0, "synthetic", "train", 5) != scene_seed(1, "synthetic", "train", 5)


# ----------------------------------------------------------------------------------------------
# Domains: aligned geometry, a real pixel-level gap, the random sampler's held-out families
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_render_across_domains_is_aligned(seed):
    out = render_across_domains(seed)
    assert tuple(out) == DOMAINS
    label = out[SOURCE_DOMAIN][1]
    assert label.shape == DEFAULT_SIZE and not (label == IGNORE_INDEX).any()  # source camera
    for d, (image, lab) in out.items():
        assert image.shape == (3, *DEFAULT_SIZE) and image.dtype == np.float32
        np.testing.assert_array_equal(lab, label, err_msg=d)
    source = out[SOURCE_DOMAIN][0]
    for d in DOMAINS[1:]:   # measured: >= 0.058 at seeds 0..4
        assert np.abs(out[d][0] - source).mean() > 0.03, d
    for a in DOMAINS:       # measured: every pair >= 0.022
        for b in DOMAINS:
            if a < b:
                assert np.abs(out[a][0] - out[b][0]).mean() > 0.01, (a, b)
    subset = render_across_domains(seed, domains=("fog", SOURCE_DOMAIN))
    assert tuple(subset) == ("fog", SOURCE_DOMAIN)
    for d in subset:        # a domain's render does not depend on which others are asked for
        np.testing.assert_array_equal(subset[d][0], out[d][0])
    # the labels handed out are copies: editing one leaves the others alone
    out["fog"][1][0, 0] = 3 if label[0, 0] != 3 else 4
    assert out["night"][1][0, 0] == label[0, 0] != out["fog"][1][0, 0]


def _stats(items) -> dict[str, float]:
    images = np.stack([it[0] for it in items])                            # (N, 3, H, W)
    rgb = images.mean(axis=(0, 2, 3))
    return {
        "mean": float(images.mean()),
        "std": float(np.mean([im.std() for im in images])),              # per-image contrast
        "blue_minus_red": float(rgb[2] - rgb[0]),                        # cool vs warm
        "chroma": float((images.max(axis=1) - images.min(axis=1)).mean()),  # saturation
        "levels": float(np.mean([len(np.unique(np.round(im * 255))) for im in images])),
        "grad": float(np.abs(np.diff(images, axis=3)).mean()),           # edges and texture
    }


def test_domain_gap_is_real_at_the_pixel_level(renders):
    st = {d: _stats(items) for d, items in renders.items()}
    src = st[SOURCE_DOMAIN]
    # measured on these renders (synthetic: mean 0.42, std 0.22, B-R +0.04, chroma 0.20,
    # levels 105, grad 0.030); margins leave headroom
    checks = {
        "citylike": st["citylike"]["chroma"] < 0.6 * src["chroma"],         # muted (0.08)
        "dashcam": st["dashcam"]["blue_minus_red"] < src["blue_minus_red"] - 0.05,  # warm (-0.06)
        "streetview": st["streetview"]["blue_minus_red"] > src["blue_minus_red"] + 0.06,  # (0.15)
        "fog": (st["fog"]["mean"] > src["mean"] + 0.1                       # bright (0.62)
                and st["fog"]["std"] < 0.6 * src["std"]                     # flat (0.08)
                and st["fog"]["chroma"] < 0.3 * src["chroma"]),             # grey (0.03)
        "night": st["night"]["mean"] < 0.5 * src["mean"],                  # dark (0.14)
        "rain": st["rain"]["std"] < 0.75 * src["std"],                     # dull (0.12)
        "snow": st["snow"]["mean"] > src["mean"] + 0.06,                   # white (0.55)
        "painted": (st["painted"]["levels"] < 0.25 * src["levels"]          # posterised (7)
                    and st["painted"]["grad"] > 1.5 * src["grad"]),         # outlines (0.069)
        "validation": st["validation"]["chroma"] < 0.8 * src["chroma"],     # (0.13)
    }
    assert set(checks) == set(TARGET_DOMAINS) | {VALIDATION_DOMAIN}
    failed = {d: st[d] for d, ok in checks.items() if not ok}
    assert not failed, (src, failed)


def test_random_sampler_holds_out_two_targets():
    assert set(HELD_OUT_FAMILIES) >= {"streetview", "painted"}
    rng = np.random.default_rng(123)
    styles = [sample_style("random", rng) for _ in range(2000)]
    families = {s.family for s in styles}
    assert not families & set(HELD_OUT_FAMILIES)
    assert families == set(PALETTE_FAMILIES) - set(HELD_OUT_FAMILIES)  # every other family
    assert not any(s.painted for s in styles)
    assert {s.weather for s in styles} == {"clear", "fog", "night", "rain", "snow"}
    assert all((s.strength == 0) == (s.weather == "clear") for s in styles)
    # the held-out families are really what those two targets are made of
    assert sample_style("streetview", rng).family == "streetview"
    assert sample_style("painted", rng).family == "painted"
    assert sample_style("painted", rng).painted


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
UNKNOWN_DOMAIN = r"unknown ToyWorld domain 'gta'; choose one of synthetic, citylike, .*random"


def test_unknown_domain():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=UNKNOWN_DOMAIN):
        ToyWorld("gta")
    with pytest.raises(ValueError, match=UNKNOWN_DOMAIN):
        scene_seed(0, "gta", "train", 0)
    with pytest.raises(ValueError, match=UNKNOWN_DOMAIN):
        draw_scene(0, "gta")
    with pytest.raises(ValueError, match=UNKNOWN_DOMAIN):
        sample_style("gta", rng)
    with pytest.raises(ValueError, match=UNKNOWN_DOMAIN):
        render_sample([0, 0, 0, 0], "gta")


def test_unknown_domain_in_render_across_domains():
    with pytest.raises(ValueError, match=UNKNOWN_DOMAIN):
        render_across_domains(0, domains=("gta",))


def test_unknown_split():
    match = r"unknown split 'training'; choose one of train, val, test"
    with pytest.raises(ValueError, match=match):
        ToyWorld(SOURCE_DOMAIN, "training")
    with pytest.raises(ValueError, match=match):
        scene_seed(0, SOURCE_DOMAIN, "training", 0)


@pytest.mark.parametrize(("size", "match"), [
    ((16, 32), r"in \[32, 2048\], got \(16, 32\)"),
    ((64, 32), r"at least as wide as tall, got \(64, 32\)"),
    ((0, 0), r"in \[32, 2048\], got \(0, 0\)"),
    ((64.5, 128), r"integers in \[32, 2048\], got \(64.5, 128\)"),
    ((4096, 4096), r"in \[32, 2048\], got \(4096, 4096\)"),
    ((64, 4096), r"in \[32, 2048\]"),
    ((64, 128, 3), r"size must be \(H, W\) integers, got \(64, 128, 3\)"),
    (64, r"size must be \(H, W\) integers, got 64"),
    (None, r"size must be \(H, W\) integers, got None"),
])
def test_impossible_sizes(size, match):
    with pytest.raises(ValueError, match=match):
        ToyWorld(SOURCE_DOMAIN, size=size)
    with pytest.raises(ValueError, match=match):
        render_sample(scene_seed(0, SOURCE_DOMAIN, "train", 0), SOURCE_DOMAIN, size)


def test_sizes_at_the_limits_render():
    image, label = ToyWorld(SOURCE_DOMAIN, size=(32, 32), length=1)[0]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    size = (np.int64(64), 128)   # numpy integers are integers
    assert ToyWorld(SOURCE_DOMAIN, size=size).size == DEFAULT_SIZE


@pytest.mark.parametrize("length", [0, -1, -200, 2.5])
def test_bad_length(length):
    with pytest.raises(ValueError, match=rf"length must be a positive integer, got {length}"):
        ToyWorld(SOURCE_DOMAIN, length=length)


def test_index_out_of_range():
    ds = ToyWorld(SOURCE_DOMAIN, "val", length=5)
    for index in (5, 6, 1000, -6):
        with pytest.raises(IndexError, match=rf"index {index} out of range .* length 5"):
            ds[index]
    last, minus_one = ds[4], ds[-1]
    assert torch.equal(last[0], minus_one[0]) and torch.equal(last[1], minus_one[1])


def test_negative_seed_rejected_at_construction():
    with pytest.raises(ValueError, match="seed"):
        ToyWorld(SOURCE_DOMAIN, seed=-1)


# ----------------------------------------------------------------------------------------------
# Benchmark protocol
# ----------------------------------------------------------------------------------------------
def test_toy_benchmark_protocol():
    assert TOY_BENCHMARK == {
        "size": (64, 128), "source": "synthetic",
        "train_split": "train", "train_length": 2000,
        "val_domain": "validation", "val_split": "val", "val_length": 200,
        "targets": TARGET_DOMAINS, "test_split": "test", "test_length": 200,
        "eval_size": (64, 128), "seeds": (0, 1, 2),
    }
    assert TARGET_DOMAINS == ("citylike", "dashcam", "streetview", "fog", "night", "rain",
                              "snow", "painted")
    assert SOURCE_DOMAIN not in TARGET_DOMAINS and VALIDATION_DOMAIN not in TARGET_DOMAINS
    assert "random" not in TARGET_DOMAINS
    assert set(DOMAINS) == {SOURCE_DOMAIN, VALIDATION_DOMAIN, "random", *TARGET_DOMAINS}


@pytest.mark.parametrize("seed", [0, 2])
def test_benchmark_datasets(seed):
    sets = benchmark_datasets(seed=seed)
    assert list(sets) == ["train", "val", *TARGET_DOMAINS]
    expected = {"train": ("synthetic", "train", 2000), "val": ("validation", "val", 200)}
    expected |= {d: (d, "test", 200) for d in TARGET_DOMAINS}
    for name, ds in sets.items():
        assert isinstance(ds, ToyWorld)
        assert (ds.domain, ds.split, len(ds)) == expected[name], name
        assert ds.size == (64, 128) and ds.seed == seed
        image, label = ds[len(ds) - 1]
        assert image.shape == (3, 64, 128) and label.shape == (64, 128)
        ref = render_sample(scene_seed(seed, ds.domain, ds.split, len(ds) - 1), ds.domain)
        assert render_digest(image.numpy(), label.numpy()) == render_digest(*ref)


def test_benchmark_datasets_follow_a_custom_protocol():
    protocol = {**TOY_BENCHMARK, "train_length": 7, "targets": ("fog",), "test_length": 3,
                "size": (32, 64)}
    sets = benchmark_datasets(seed=1, protocol=protocol)
    assert list(sets) == ["train", "val", "fog"]
    assert len(sets["train"]) == 7 and sets["train"].size == (32, 64)
    assert len(sets["fog"]) == 3 and sets["fog"].size == (64, 128)   # eval_size


# ----------------------------------------------------------------------------------------------
# torch integration
# ----------------------------------------------------------------------------------------------
def test_dataloader_batches():
    ds = ToyWorld("rain", "val", length=10, seed=3)
    batches = list(DataLoader(ds, batch_size=4, num_workers=0, shuffle=False))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    images, labels = batches[0]
    assert images.shape == (4, 3, 64, 128) and images.dtype == torch.float32
    assert labels.shape == (4, 64, 128) and labels.dtype == torch.int64
    assert torch.equal(images[2], ds[2][0]) and torch.equal(labels[3], ds[3][1])
    assert torch.equal(batches[2][1][1], ds[9][1])


def test_repr_names_the_arguments():
    ds = ToyWorld("fog", "val", size=(32, 64), length=8, seed=3)
    text = repr(ds)
    for part in ("domain='fog'", "split='val'", "size=(32, 64)", "length=8", "seed=3"):
        assert part in text, text
    again = eval(text, {"ToyWorld": ToyWorld})   # the repr rebuilds the same dataset
    assert repr(again) == text
    assert torch.equal(again[5][1], ds[5][1])


# ----------------------------------------------------------------------------------------------
# _Draws
# ----------------------------------------------------------------------------------------------
def test_draws_int_stays_in_range():
    r = _Draws(np.random.default_rng(0))
    for lo, hi in ((0, 1), (2, 6), (-3, 4), (0, 2), (5, 6), (10, 13)):
        values = [r.int(lo, hi) for _ in range(3000)]
        assert min(values) == lo and max(values) == hi - 1, (lo, hi)   # every end reached
        assert all(isinstance(v, int) for v in values)
        counts = np.bincount(np.asarray(values) - lo, minlength=hi - lo)
        expected = 3000 / (hi - lo)
        assert np.all(np.abs(counts - expected) < 0.2 * expected), (lo, hi, counts)  # uniform
    assert all(r.pick(("a", "b", "c")) in "abc" for _ in range(300))


def test_draws_int_at_the_top_of_the_unit_interval():
    r = _Draws(np.random.default_rng(0), block=4)
    r.buf, r.i = [1.0 - 2.0**-53, 0.0, 0.5, 0.999999], 0
    assert [r.int(0, 3), r.int(0, 3), r.int(0, 3), r.int(7, 9)] == [2, 0, 1, 8]


def test_draws_refill_beyond_the_block():
    r = _Draws(np.random.default_rng(11), block=8)
    values = [r.u(0.0, 1.0) for _ in range(1000)]
    # refilling continues the generator's stream: the same values as one long draw
    np.testing.assert_allclose(values, np.random.default_rng(11).random(1000), rtol=0, atol=0)
    assert len(set(values)) == 1000


if __name__ == "__main__":
    if "--regen" in sys.argv[1:]:
        print(_regen_table())
    else:
        print("usage: PYTHONPATH=. python tests/test_toyworld.py --regen  (prints GOLDEN)")
