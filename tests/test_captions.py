"""Captions from ToyWorld metadata: what they may say, the prompt forms, the held-out class."""

from __future__ import annotations

import numpy as np
import pytest

from lessons import captions as cap
from lessons import toyworld as tw
from lessons.classes import CLASSES, IGNORE_INDEX


def test_class_areas_orders_by_area_and_drops_specks():
    label = np.full((8, 8), 0, np.uint8)
    label[:2] = 10                     # sky: 16 px
    label[2, :3] = 13                  # car: 3 px
    label[7, 7] = IGNORE_INDEX
    areas = cap.class_areas(label, min_pixels=4)
    assert list(areas) == ["road", "sky"]
    assert areas["road"] == pytest.approx(44 / 63)
    assert "car" in cap.class_areas(label, min_pixels=1)


def test_class_areas_rejects_bad_labels():
    with pytest.raises(ValueError, match="label value 19"):
        cap.class_areas(np.full((4, 4), 19, np.uint8))


def test_scene_captions_only_name_what_the_view_shows():
    for k in range(30):
        rng = np.random.default_rng([3, k])
        scene = tw.draw_scene(rng, "web")
        label = tw.rasterize(scene).label
        style = tw.sample_style("web", rng)
        facts = cap.scene_facts(scene, label, style)
        text = cap.caption_scene(facts, np.random.default_rng(k))
        named = {c for c in CLASSES for word in cap.SYNONYMS[c] if f" {word}" in f" {text}"}
        # every class word in the caption is a class the view shows (synonyms share no words)
        assert named <= set(facts.areas) | {"rider", "person"}, (text, facts.areas)
        assert all(n <= 0 or c in facts.areas for c, n in facts.counts.items())


def test_region_captions_use_the_downstream_prompts_and_subtypes():
    rng = np.random.default_rng(0)
    texts = {cap.caption_region({"car": 0.8}, {}, rng) for _ in range(200)}
    assert "A photo of a car in the scene" in texts          # CAT-Seg's template
    assert "car" in texts                                    # tqdm / MFuser: the raw name
    subtyped = {cap.caption_region({"bus": 0.8}, {"bus": "double"}, rng) for _ in range(200)}
    assert any("double-decker" in t for t in subtyped) and "bus" in subtyped
    several = cap.caption_region({"road": 0.5, "car": 0.3, "sky": 0.2}, {}, rng)
    assert isinstance(several, str) and several


def test_regions_are_boxes_inside_the_view_filled_by_their_first_class():
    rng = np.random.default_rng([5, 1])
    scene = tw.draw_scene(rng, "web")
    label = tw.rasterize(scene).label
    found = cap.regions(scene, label, rng, n=4)
    assert 1 <= len(found) <= 4
    for region in found:
        top, left, h, w = region.box
        assert top >= 0 and top + h <= label.shape[0] and left >= 0 and left + w <= label.shape[1]
        assert region.caption


def test_captioned_views_mix_crops_and_scenes_and_name_the_held_out_class():
    views = [cap.captioned_view([1, k]) for k in range(200)]
    crops = [v for v in views if v[2]]
    assert 0.25 < len(crops) / len(views) < 0.6
    assert all(v[0].shape[0] == 3 and v[0].shape[1] <= 64 for v in views)
    held = cap.SYNONYMS[cap.HELD_OUT_CLASS]
    assert any(any(w in v[1] for w in held) for v in views)  # still in the captions
    assert cap.HELD_OUT_CLASS in CLASSES
    assert cap.class_id(cap.HELD_OUT_CLASS) == CLASSES.index("bus")
    with pytest.raises(ValueError, match="unknown class 'lorry'"):
        cap.class_id("lorry")
