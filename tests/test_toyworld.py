"""Tests of lessons.toyworld (world 2): golden renders, the gap's parts, content, protocol, worlds.

After a deliberate change to what a seed renders, bump ``TOYWORLD_VERSION`` and regenerate the
golden table, then paste it over ``GOLDEN`` below::

    PYTHONPATH=. python tests/test_toyworld.py --regen

World 1 (``lessons.toyworld1``) keeps its own tests and golden table in ``test_toyworld1.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from lessons import toyworld as tw
from lessons import toyworld1 as w1
from lessons.classes import IGNORE_INDEX, TRAIN_ID

SKY, ROAD, SIDEWALK, CAR = (TRAIN_ID[n] for n in ("sky", "road", "sidewalk", "car"))
ACROSS = "render_across_domains"
HOOD_DOMAINS = frozenset({"citylike", "dashcam", "fog", "night", "rain", "snow"})

GOLDEN_VERSION = "2.0"
GOLDEN: dict[tuple, str] = {
    ("synthetic", "train", 0): "a9fdbd0534b32d99",
    ("synthetic", "train", 1999): "0644ed5ab0c94051",
    ("synthetic", "test", 0): "f075b3c9edd38d9c",
    ("citylike", "test", 0): "00fab16ed464de6c",
    ("dashcam", "test", 1): "49e2389d2ca89486",
    ("streetview", "test", 2): "7bcab5fddf82aa69",
    ("fog", "test", 3): "19e9cbc0f7743c16",
    ("night", "test", 4): "117c5e05f99b5766",
    ("rain", "test", 5): "fbd1ac719de6d029",
    ("snow", "test", 6): "fc52da9c02a5b55a",
    ("painted", "test", 7): "378158e020b96720",
    ("validation", "val", 0): "f35fa7040c862c16",
    ("web", "train", 0): "21d8918481c8369c",
    ("web", "train", 1): "cc67ae71474d474a",
    ("dashcam", "test", 0, (128, 256)): "b8e97af67cac6151",
    ("render_across_domains", 0, "synthetic"): "b78869002aaeebac",
    ("render_across_domains", 0, "streetview"): "495eaa370acf16ad",
}


@pytest.fixture(scope="module", autouse=True)
def world_2():
    """These tests are about world 2, whatever the course's default (``COURSE_WORLD``); yields
    that default."""
    previous = tw.use_world("2.0")
    yield previous
    tw.use_world(previous)


def _golden_keys() -> list[tuple]:
    keys: list[tuple] = [("synthetic", "train", 0), ("synthetic", "train", 1999),
                         ("synthetic", "test", 0)]
    keys += [(d, "test", k) for k, d in enumerate(tw.TARGET_DOMAINS)]
    keys += [("validation", "val", 0), ("web", "train", 0), ("web", "train", 1),
             ("dashcam", "test", 0, (128, 256)), (ACROSS, 0, "synthetic"),
             (ACROSS, 0, "streetview")]
    return keys


def _render(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    if key[0] == ACROSS:
        return tw.render_across_domains(key[1])[key[2]]
    domain, split, index = key[:3]
    size = key[3] if len(key) == 4 else tw.DEFAULT_SIZE
    image, label = tw.ToyWorld(domain, split, size=size, length=index + 1)[index]
    return image.numpy(), label.numpy()


def _literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    return repr(value)


# ----------------------------------------------------------------------------------------------
# Version and golden renders
# ----------------------------------------------------------------------------------------------
def test_versions():
    assert tw.TOYWORLD_VERSION == GOLDEN_VERSION == "2.0"
    assert tw.WORLD_VERSIONS == ("1.0", "2.0") and w1.TOYWORLD_VERSION == "1.0"


@pytest.mark.parametrize("key", _golden_keys(), ids=str)
def test_golden_render(key):
    assert tw.render_digest(*_render(key)) == GOLDEN[key], (
        f"ToyWorld render {key} changed: bump TOYWORLD_VERSION and regenerate GOLDEN "
        "(python tests/test_toyworld.py --regen)")


def test_golden_table_covers_every_domain():
    assert {k[0] for k in GOLDEN if k[0] != ACROSS} == set(tw.DOMAINS)
    assert len(set(GOLDEN.values())) == len(GOLDEN)


def test_dataset_item_is_render_sample_and_worlds_differ():
    image, label = tw.ToyWorld("night", "test", length=10, seed=2)[5]
    ref = tw.render_sample(tw.scene_seed(2, "night", "test", 5), "night")
    np.testing.assert_array_equal(image.numpy(), ref[0])
    np.testing.assert_array_equal(label.numpy(), ref[1])
    old_image, old_label = tw.ToyWorld("night", "test", length=10, seed=2, world="1.0")[5]
    ref1 = w1.ToyWorld("night", "test", length=10, seed=2)[5]
    assert torch.equal(old_image, ref1[0]) and torch.equal(old_label, ref1[1])
    assert not torch.equal(old_label, label)          # world 2's scenes are not world 1's


# ----------------------------------------------------------------------------------------------
# Shared renders
# ----------------------------------------------------------------------------------------------
PER_DOMAIN = 14


@pytest.fixture(scope="module")
def renders() -> dict[str, list[tuple]]:
    out = {}
    for d in tw.DOMAINS:
        ds = tw.ToyWorld(d, "test", length=PER_DOMAIN)
        items = []
        for i in range(PER_DOMAIN):
            image, label = ds[i]
            scene = tw.draw_scene(np.random.default_rng(tw.scene_seed(0, d, "test", i)), d)
            items.append((image.numpy(), label.numpy(), scene))
        out[d] = items
    return out


def test_types_ranges_and_ignore(renders):
    allowed = set(tw.RENDERED_CLASSES) | {IGNORE_INDEX}
    for d, items in renders.items():
        for image, label, scene in items:
            assert image.dtype == np.float32 and image.shape == (3, *tw.DEFAULT_SIZE)
            assert image.min() >= 0.0 and image.max() <= 1.0
            assert set(np.unique(label).tolist()) <= allowed
            assert (label == IGNORE_INDEX).any() == (d in HOOD_DOMAINS), d
            np.testing.assert_array_equal(tw.rasterize(scene).label, label)


def test_classes_and_thin_classes(renders):
    counts, union = [], set()
    for items in renders.values():
        for _, label, _ in items:
            present = set(np.unique(label).tolist()) - {IGNORE_INDEX}
            counts.append(len(present))
            union |= present
            for c in tw.THIN_CLASSES:
                components, _ = ndimage.label(label == c)
                for sl in ndimage.find_objects(components):
                    assert sl[1].stop - sl[1].start >= 8 and sl[0].stop - sl[0].start >= 16
    assert min(counts) >= 7 and np.mean(counts) >= 10
    assert union == set(tw.RENDERED_CLASSES)


def test_layout_prior(renders):
    for d, items in renders.items():
        for _, label, scene in items:
            hz = scene.camera.horizon * label.shape[0]
            rows = np.broadcast_to(np.arange(label.shape[0])[:, None] + 0.5, label.shape)
            sky, road = rows[label == SKY], rows[label == ROAD]
            assert sky.size and road.size and sky.max() < hz < road.min(), d


# ----------------------------------------------------------------------------------------------
# The gap: content, materials and colour, lighting
# ----------------------------------------------------------------------------------------------
def _variants(domain: str, n: int = 300) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k in range(n):
        for t in tw.draw_scene(np.random.default_rng([k, 5]), domain).things:
            out.setdefault(t.kind, set()).add(t.variant)
    return out


def test_content_shift_between_source_and_targets():
    src, tgt, web = _variants("synthetic"), _variants("citylike"), _variants("web")
    assert src["car"] == {"sedan", "suv"} and tgt["car"] == {"sedan", "hatchback", "van", "suv"}
    assert src["bus"] == {"single"} and "double" in tgt["bus"] and "pickup" in tgt["truck"]
    assert web["tree"] == {"round", "column", "cone"}
    people = {d: np.mean([sum(t.kind == "person" for t in tw.draw_scene(
        np.random.default_rng([k, 6]), d).things) for k in range(300)])
        for d in ("synthetic", "citylike")}
    assert people["citylike"] > 2 * people["synthetic"]       # class frequencies shift too


def _car_hues(domain: str, n: int = 30) -> list[float]:
    from matplotlib.colors import rgb_to_hsv

    hues = []
    for image, label in tw.ToyWorld(domain, "test", length=n):
        mask = label.numpy() == CAR
        if mask.sum() > 20:
            hues.append(float(np.median(rgb_to_hsv(image.permute(1, 2, 0).numpy())[..., 0][mask])))
    return hues


def test_a_class_colour_names_it_in_the_source_not_in_the_targets():
    # measured: car hue std across images 0.056 (synthetic) vs 0.24 (citylike)
    assert np.std(_car_hues("synthetic")) < 0.1 < 0.18 < np.std(_car_hues("citylike"))


def test_materials_are_per_domain_and_streetview_materials_are_unseen():
    tables = tw.FAMILIES
    assert not tables["rendered"].materials                        # flat rendered surfaces
    for fam in ("urban", "dashcam", "mapillary", "suburban"):
        assert tables[fam].materials[ROAD][0] != "flat"
    only_streetview = {"panels", "pavers"}
    assert only_streetview <= {m for m, _ in tables["mapillary"].materials.values()}
    assert not only_streetview & set(tw.WEB_MATERIALS)
    for fam in tw.COVERED_FAMILIES:
        assert not only_streetview & {m for m, _ in tables[fam].materials.values()}


def test_web_looks_cover_the_covered_families_only():
    rng = np.random.default_rng(3)
    looks = [tw.sample_style("web", rng) for _ in range(1500)]
    families = {s.family for s in looks}
    assert families == {"random", *tw.COVERED_FAMILIES}
    assert not any(s.painted for s in looks)
    assert {s.weather for s in looks} == {"clear", "fog", "night", "rain", "snow"}
    assert any(s.shadows > 0 for s in looks) and any(s.glare > 0 for s in looks)
    assert set(tw.PRETRAINING["outside"]) == {"synthetic", "streetview", "painted"}
    assert tw.sample_style("streetview", rng).family == "mapillary"
    assert tw.sample_style("synthetic", rng).family == "rendered"


def test_cast_shadows_cross_label_boundaries():
    crossed = 0
    for k in range(20):
        rng = np.random.default_rng([k, 9])
        raster = tw.rasterize(tw.draw_scene(rng, "citylike"))
        style = replace(tw.sample_style("citylike", rng), shadows=0.5, sun_left=bool(k % 2))
        shadow = tw._cast_shadows(raster.scene, style, *tw.DEFAULT_SIZE) > 0.5
        classes = set(np.unique(raster.label[shadow]).tolist())
        crossed += len(classes & {ROAD, SIDEWALK, CAR, TRAIN_ID["person"]}) >= 2
        lit = tw.stylize(raster, replace(style, shadows=0.0), np.random.default_rng(0))
        dark = tw.stylize(raster, style, np.random.default_rng(0))
        if shadow.any():
            assert dark.mean(0)[shadow].mean() < 0.8 * lit.mean(0)[shadow].mean()
    assert crossed >= 10


def test_synthetic_is_clean_and_targets_are_not():
    rng = np.random.default_rng(1)
    src = tw.sample_style("synthetic", rng)
    assert src.shadows == 0 and src.glare == 0 and src.noise == 0 and src.blur == 0
    city = [tw.sample_style("citylike", rng) for _ in range(200)]
    assert np.mean([s.shadows > 0 for s in city]) > 0.5
    assert np.ptp([s.exposure for s in city]) > 0.3


def test_render_across_domains_is_aligned():
    out = tw.render_across_domains(1)
    assert tuple(out) == tw.DOMAINS
    label = out["synthetic"][1]
    for d, (image, lab) in out.items():
        np.testing.assert_array_equal(lab, label, err_msg=d)
        if d != "synthetic":
            assert np.abs(image - out["synthetic"][0]).mean() > 0.03, d
    old = tw.render_across_domains(1, world="1.0")
    assert tuple(old) == w1.DOMAINS


# ----------------------------------------------------------------------------------------------
# Protocol, worlds, errors
# ----------------------------------------------------------------------------------------------
def test_protocol_and_domains():
    assert tw.TOY_BENCHMARK["targets"] == tw.TARGET_DOMAINS == w1.TARGET_DOMAINS
    assert tw.TOY_BENCHMARK["seeds"] == (0, 1, 2, 3, 4) and w1.TOY_BENCHMARK["seeds"] == (0, 1, 2)
    assert tw.toy_benchmark() is tw.TOY_BENCHMARK and tw.toy_benchmark("1.0") is w1.TOY_BENCHMARK
    assert tw.domains_of("1.0") == w1.DOMAINS and tw.domains_of() == tw.DOMAINS
    sets = tw.benchmark_datasets(seed=1, world="1.0")
    assert all(ds.world == "1.0" for ds in sets.values())
    assert "world='1.0'" in repr(sets["fog"]) and "world" not in repr(tw.ToyWorld("fog"))


def test_use_world_sets_the_default_and_returns_the_previous_one(world_2):
    # the course stays in world 1 until world 2's toy models have passed their gates
    assert world_2 == tw.COURSE_WORLD == "1.0"
    assert tw.current_world() == "2.0"
    previous = tw.use_world("1.0")
    try:
        assert previous == "2.0" and tw.current_world() == "1.0"
        assert tw.ToyWorld("random").world == "1.0" and tw.domains_of() == w1.DOMAINS
        assert tuple(tw.render_across_domains(0)) == w1.DOMAINS
    finally:
        tw.use_world(previous)
    assert tw.ToyWorld("fog").world == "2.0"
    with pytest.raises(ValueError, match="unknown ToyWorld version"):
        tw.use_world("9")
    with pytest.raises(RuntimeError), tw.in_world("1.0"):
        assert tw.current_world() == "1.0"
        raise RuntimeError                          # the block fails: the default comes back
    assert tw.current_world() == "2.0"


def test_scene_seeds_are_distinct_and_splits_disjoint():
    words = [tuple(tw.scene_seed(s, d, sp, i)) for s in (0, 1) for d in tw.DOMAINS
             for sp in tw.SPLITS for i in range(50)]
    assert len(set(words)) == len(words)
    assert all(w not in words for w in
               (tuple(w1.scene_seed(0, "synthetic", "train", i)) for i in range(50)))


def test_errors():
    with pytest.raises(ValueError, match="unknown ToyWorld domain 'random'; choose one of"):
        tw.ToyWorld("random")                          # world 1's sampler is not world 2's
    assert tw.ToyWorld("random", world="1.0").domain == "random"
    with pytest.raises(ValueError, match="unknown ToyWorld version '3.0'; choose one of 1.0, 2.0"):
        tw.ToyWorld("fog", world="3.0")
    with pytest.raises(ValueError, match=r"in \[32, 2048\]"):
        tw.ToyWorld("fog", size=(16, 32))
    with pytest.raises(ValueError, match="length must be a positive integer"):
        tw.ToyWorld("fog", length=0)
    with pytest.raises(IndexError, match="out of range"):
        tw.ToyWorld("fog", length=3)[3]


if __name__ == "__main__":
    if "--regen" in sys.argv[1:]:
        tw.use_world(tw.TOYWORLD_VERSION)
        print(f"GOLDEN_VERSION = {_literal(tw.TOYWORLD_VERSION)}")
        print("GOLDEN: dict[tuple, str] = {")
        for key in _golden_keys():
            print(f"    {_literal(key)}: {_literal(tw.render_digest(*_render(key)))},")
        print("}")
    else:
        print("usage: PYTHONPATH=. python tests/test_toyworld.py --regen  (prints GOLDEN)")
