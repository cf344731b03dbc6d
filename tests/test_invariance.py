"""The invariance meter (lesson 02's precondition experiment): cosine of pixel-aligned tokens."""

from __future__ import annotations

import pytest
import torch

from lessons import toyworld as tw
from lessons.backbones import build_encoder, toy_weights_dir
from lessons.invariance import aligned_renders, block_tokens, invariance_meter, invariance_of

VFM = toy_weights_dir(tw.COURSE_WORLD) / "toy_vfm.safetensors"


def test_aligned_renders_share_the_scene_across_looks():
    images = aligned_renders(3, ["synthetic", "fog"], seed=1)
    assert set(images) == {"synthetic", "fog"}
    assert images["synthetic"].shape == images["fog"].shape == (3, 3, *tw.DEFAULT_SIZE)
    assert not torch.equal(images["synthetic"], images["fog"])            # another look
    assert not torch.equal(images["synthetic"][0], images["synthetic"][1])  # another scene
    again = aligned_renders(3, ["synthetic"], seed=1)["synthetic"]
    assert torch.equal(again, images["synthetic"])                          # drawn from the seed


@pytest.mark.parametrize("kwargs, message", [
    ({"scenes": 0, "domains": ["synthetic"]}, "scenes must be >= 1"),
    ({"scenes": 1, "domains": ["fog", "fog"]}, "distinct"),
])
def test_bad_render_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aligned_renders(**kwargs)


def test_one_token_list_per_block_after_the_adapter():
    enc = build_encoder("toy_vfm")
    calls = []
    tokens = block_tokens(enc, torch.rand(2, 3, *tw.DEFAULT_SIZE),
                          adapter=lambda i, x, grid: (calls.append(i), x * 0)[1])
    assert calls == list(range(enc.depth)) and len(tokens) == enc.depth
    n = (tw.DEFAULT_SIZE[0] // 8) * (tw.DEFAULT_SIZE[1] // 8)
    assert tokens[0].shape == (2, n, enc.width)
    assert all(t.abs().max() == 0 for t in tokens)                       # what the adapter made


def test_an_unchanged_look_scores_one_and_a_look_swamped_by_the_adapter_too():
    enc = build_encoder("toy_vfm")
    images = aligned_renders(2, ["synthetic", "night"])
    same = invariance_of(enc, {"synthetic": images["synthetic"],
                               "copy": images["synthetic"].clone()}, "synthetic")
    assert same["copy"] == pytest.approx([1.0] * enc.depth, abs=1e-5)
    swamped = invariance_of(enc, images, "synthetic", adapter=lambda i, x, grid: x + 1e4,
                            center=False)
    assert swamped["night"] == pytest.approx([1.0] * enc.depth, abs=1e-4)
    centred = invariance_of(enc, images, "synthetic", adapter=lambda i, x, grid: x + 1e4)
    assert centred["night"][-1] < 0.99            # centring removes what every token shares


def test_problems_are_named():
    enc = build_encoder("toy_vfm")
    images = aligned_renders(1, ["synthetic", "fog"])
    with pytest.raises(ValueError, match="source 'rain' is not among"):
        invariance_of(enc, images, "rain")
    with pytest.raises(ValueError, match="at least 2 scenes"):
        invariance_of(enc, images, "synthetic")
    with pytest.raises(ValueError, match="aligned"):
        invariance_of(enc, {"synthetic": images["synthetic"],
                            "fog": torch.cat([images["fog"]] * 2)}, "synthetic")


def test_the_pretrained_vfm_matches_the_same_scene_better_than_other_scenes():
    """The meter measures the scene, not only the position: the course's toy VFM agrees more
    with the same scene in another look than with other scenes in the source look."""
    enc = build_encoder("toy_vfm", VFM)
    meter = invariance_meter(enc, scenes=4, targets=["citylike", "fog"])
    assert set(meter) == {"citylike", "fog", "targets' mean", "other scenes"}
    assert all(len(v) == enc.depth for v in meter.values())
    assert meter["targets' mean"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(meter["citylike"], meter["fog"], strict=True)])
    assert meter["citylike"][-1] > meter["other scenes"][-1] + 0.05, meter
    with pytest.raises(ValueError, match="at least 2 scenes"):
        invariance_meter(enc, scenes=1)


def test_the_meter_restores_the_encoders_mode():
    enc = build_encoder("toy_vfm").train()
    invariance_meter(enc, scenes=2, targets=["fog"])
    assert enc.training


def test_the_teacher_gate_compares_each_target_look_with_the_source_one(in_world_2):
    """G5's invariance (``reprod.toy.gates.invariance``) reads the same aligned renders: a
    teacher whose strong-noise maps ignore the image scores 1 there, its weak maps (the images
    themselves) less."""
    from types import SimpleNamespace

    from reprod.toy.gates import invariance

    seen = []

    class Teacher:
        def features(self, images, generator=None):
            seen.append(images.shape)
            return SimpleNamespace(weak=[images], strong=[torch.ones_like(images)])

    inv = invariance(Teacher(), pairs=2)
    assert seen == [(1 + len(tw.TARGET_DOMAINS), 3, *tw.DEFAULT_SIZE)] * 2
    assert inv["strong"] == pytest.approx(1.0) and inv["weak"] < 0.99


def test_docs_show_world_1s_meter_as_the_command_prints_it():
    from pathlib import Path

    from reprod.toy.gates import invariance_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "toyworld.md").read_text()
    table = invariance_table()
    assert table in doc, "re-run python -m reprod.toy.gates --invariance-table"
    for look in ("fog", "night", "painted"):           # the prose's first -> last block figures
        cells = _cells(table, "world-1 toy VFM, frozen", look)
        assert f"{cells[0]} → {cells[-1]}" in doc, (look, cells)
    last = [_cells(table, enc, "targets' mean")[-1] for enc in
            ("world-1 toy VFM, frozen", "Rein (lesson 02, seed 0)", "full fine-tuning (lesson 02")]
    assert "frozen {}, Rein {}, full fine-tuning {}".format(*last) in " ".join(doc.split())


def _cells(table: str, encoder: str, look: str) -> list[str]:
    row = next(r for r in table.splitlines() if r.startswith(f"| {encoder}") and f"| {look} |" in r)
    return [c.strip() for c in row.strip("|").split("|")][2:]
