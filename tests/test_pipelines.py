"""Tests of reprod.data.pipelines: mmseg's resize sizes (Rein's short-side choice with its cap,
tqdm's
ratio of the native size), bilinear/nearest resampling against torch, the cat_max crop rule and its
fall-back, flip, padding that normalises to 0, the position-indexed stream (determinism, disjoint
DDP ranks), rare-class sampling from the stats files, config errors and the bench command."""

from __future__ import annotations

import ast
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from reprod.data import datasets as D
from reprod.data import pipelines as P
from reprod.prepare_data import class_stats, rcs_probabilities, write_stats

GTAV = (1052, 1914)          # (H, W)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)   # (3, H, W)


def _plain(**overrides) -> P.TrainPipeline:
    """A pipeline with only the geometry: no flip, no photometric distortion."""
    return P.TrainPipeline(P.PipelineConfig.from_dict(
        {"flip_prob": 0.0, "photometric": False, **overrides}))


def _toy_gtav(tmp_path: Path, length: int = 4) -> D.GTAV:
    root = tmp_path / "gta"
    D.export_toyworld(root, "gtav", ["all"], length=length, size=(32, 64), seed=0)
    return D.GTAV(root, "all")


# --- sizes ------------------------------------------------------------------------------------
def test_rein_short_side_list():
    assert P.REIN_SHORT_SIDES == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819,
                                  870, 921, 972, 1024]
    big = P.short_sides(1024)
    assert len(big) == 16 and big[0] == 512 and big[-1] == 2048
    cfg = P.PipelineConfig(crop=1024)
    assert cfg.short_sides == tuple(big) and cfg.max_long_side == 4096
    assert P.PipelineConfig().max_long_side == P.REIN_MAX_LONG_SIDE == 2048


def test_shortest_edge_sizes_keep_the_aspect_and_cap_the_long_side():
    assert P.shortest_edge_size(GTAV, 256, 2048) == (256, 466)         # 256 * 1914 / 1052
    assert P.shortest_edge_size(GTAV, 1024, 2048) == (1024, 1863)      # long side 1863 < 2048
    assert P.shortest_edge_size((1024, 2048), 1024, 2048) == (1024, 2048)
    assert P.shortest_edge_size((2000, 1000), 512, 2048) == (1024, 512)   # portrait
    # 1:3 image at short side 1024 would be 3072 long: scaled so the long side is 2048
    assert P.shortest_edge_size((500, 1500), 1024, 2048) == (683, 2048)
    # mmcv's keep-ratio rescale afterwards can move a side by a pixel (1365 x 4096 -> 4095)
    assert P.shortest_edge_size((500, 1500), 2048, 4096) == (1365, 4095)
    rng = np.random.default_rng(0)
    sizes = {P.draw_short_side_size(GTAV, rng) for _ in range(400)}
    assert {min(s) for s in sizes} == set(P.REIN_SHORT_SIDES)
    assert all(abs(w / h - 1914 / 1052) < 0.01 and max(h, w) <= 2048 for h, w in sizes)


def test_ratio_resize_sizes_and_bounds():
    assert P.ratio_size(GTAV, 0.5) == (526, 957)
    assert P.ratio_size(GTAV, 2.0) == (2104, 3828)
    assert P.ratio_size((1024, 2048), 0.5) == (512, 1024)
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = P.draw_ratio_size(GTAV, rng)
        assert 526 <= h <= 2104 and 957 <= w <= 3828
        assert abs(w / h - 1914 / 1052) < 0.01
    image, label = _image(40, 60), np.zeros((40, 60), np.int64)
    out_img, out_lab = P.ratio_resize(image, label, np.random.default_rng(3))
    assert out_img.shape[1:] == out_lab.shape == P.draw_ratio_size((40, 60),
                                                                   np.random.default_rng(3))
    assert out_img.dtype == np.uint8 and out_lab.dtype == np.uint8


# --- resampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(61, 29), (74, 106), (18, 26), (37, 53)])
def test_resampling_matches_torch_interpolate(size):
    image = _image(37, 53)
    ref = F.interpolate(torch.from_numpy(image)[None].float(), size=size, mode="bilinear",
                        align_corners=False, antialias=False)[0].numpy()
    full = P.bilinear_window(image, size, (0, 0, *size))
    assert np.abs(full - ref).max() < 1e-3
    window = (size[0] // 3, size[1] // 4, size[0] // 2, size[1] // 2)
    top, left, h, w = window
    assert np.array_equal(P.bilinear_window(image, size, window),
                          full[:, top:top + h, left:left + w])
    label = np.random.default_rng(1).choice(np.array([0, 7, 13, 255], np.uint8), (37, 53))
    near = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size,
                         mode="nearest")[0, 0].numpy()
    out = P.nearest_window(label, size, (0, 0, *size))
    assert np.array_equal(out, near) and set(np.unique(out)) <= {0, 7, 13, 255}
    assert np.array_equal(P.nearest_window(label, size, window), out[top:top + h, left:left + w])


def test_pipeline_crop_equals_resizing_everything_then_cropping():
    image, label = _image(50, 70, 2), np.random.default_rng(2).integers(0, 19, (50, 70))
    pipe = _plain(kind="tqdm", crop=24, cat_max_ratio=0.75)
    for seed in range(5):
        out_img, out_lab = pipe(image, label, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        size = P.draw_ratio_size((50, 70), rng)
        big_img, big_lab = P.resize_pair(image, label, size)
        crop_img, crop_lab = P.random_crop_cat_max(big_img, big_lab, rng, 24, 0.75)
        h, w = crop_lab.shape
        assert np.allclose(out_img[:, :h, :w].numpy() * 255, crop_img, atol=1e-3)
        assert np.array_equal(out_lab[:h, :w].numpy(), crop_lab)


# --- crop -------------------------------------------------------------------------------------
def _mmseg_choice(label: np.ndarray, crop: int, seed: int, ratio: float = 0.75):
    """Replay mmseg's loop by hand: the first of 10 checked draws that passes, else the 11th."""
    rng = np.random.default_rng(seed)
    draws = [P.crop_box(label.shape, crop, rng) for _ in range(11)]
    ok = [b for b in draws[:10]
          if P.cat_max_ok(label[b[0]:b[0] + b[2], b[1]:b[1] + b[3]], ratio)]
    return (ok[0], True) if ok else (draws[10], False)


def test_cat_max_rule_accepts_when_possible_and_keeps_the_last_draw_otherwise():
    label = np.zeros((64, 64), np.uint8)
    label[27:37, 27:37] = 1                                  # a small patch of another class
    label[:4] = 255                                          # ignored rows do not count
    passed = fell_back = 0
    for seed in range(120):
        box = P.cat_max_crop_box(lambda b: label[b[0]:b[0] + b[2], b[1]:b[1] + b[3]],
                                 label.shape, 16, np.random.default_rng(seed))
        expected, ok = _mmseg_choice(label, 16, seed)
        assert box == expected
        crop = label[box[0]:box[0] + 16, box[1]:box[1] + 16]
        if ok:
            counts = np.bincount(crop[crop != 255], minlength=2)
            assert (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75
        passed, fell_back = passed + ok, fell_back + (not ok)
    assert passed > 10 and fell_back > 10                     # both branches were exercised
    one_class = np.zeros((64, 64), np.uint8)                  # no crop can pass: the 11th draw
    box = P.cat_max_crop_box(lambda b: one_class[b[0]:b[0] + b[2], b[1]:b[1] + b[3]],
                             (64, 64), 16, np.random.default_rng(5))
    assert box == _mmseg_choice(one_class, 16, 5)[0]
    assert P.cat_max_ok(np.array([[0, 0, 1, 1]]), 0.75) and not P.cat_max_ok(
        np.array([[0, 0, 0, 1]]), 0.75) and not P.cat_max_ok(np.array([[3, 255, 255]]), 0.75)


def test_crop_window_is_clipped_to_small_images_and_crops_image_and_label_together():
    rows, cols = np.mgrid[0:20, 0:40]
    image = np.stack([rows, cols, rows + cols]).astype(np.uint8)      # pixels know where they are
    label = (cols // 10).astype(np.int64)                             # 4 classes in stripes
    out_img, out_lab = P.random_crop_cat_max(image, label, np.random.default_rng(0), crop=32)
    assert out_img.shape == (3, 20, 32) and out_lab.shape == (20, 32)
    left = int(out_img[1, 0, 0])
    assert np.array_equal(out_lab, label[:, left:left + 32].astype(np.uint8))
    assert all(P.crop_box((20, 40), 32, np.random.default_rng(s))[:3:2] == (0, 20)
               for s in range(5))


# --- flip, pad, output ------------------------------------------------------------------------
def test_flip_flips_image_and_label_together():
    image, label = _image(40, 50, 4), np.random.default_rng(4).integers(0, 19, (40, 50))
    cfg = {"kind": "tqdm", "crop": 16, "ratio_range": (1.0, 1.0)}
    kept = _plain(**cfg)(image, label, np.random.default_rng(9))
    flipped = _plain(**cfg, flip_prob=1.0)(image, label, np.random.default_rng(9))
    assert torch.equal(flipped[0], kept[0].flip(-1)) and torch.equal(flipped[1], kept[1].flip(-1))
    assert not torch.equal(flipped[0], kept[0])


def test_padding_label_255_and_image_mean_that_normalises_to_zero():
    image = _image(20, 30, 5)
    label = np.random.default_rng(5).integers(0, 19, (20, 30))
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)
    pipe = _plain(kind="rein", crop=32, short_sides=(20,), max_long_side=1000,
                  cat_max_ratio=1.0, pad_mean=mean)
    out_img, out_lab = pipe(image, label, np.random.default_rng(0))
    assert out_img.dtype == torch.float32 and out_img.shape == (3, 32, 32)
    assert out_lab.dtype == torch.int64 and out_lab.shape == (32, 32)
    assert torch.allclose(out_img[:, :20, :30], torch.from_numpy(image / 255).float())
    assert torch.equal(out_lab[:20, :30], torch.from_numpy(label))
    pad = torch.ones(32, 32, dtype=torch.bool)
    pad[:20, :30] = False
    assert (out_lab[pad] == 255).all()
    normed = (out_img - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert normed[:, pad].abs().max() < 1e-6                         # 0 after normalisation
    assert P.pad_value_for(mean) == mean
    assert P.pad_value_for(SimpleNamespace(mean=P.CLIP_MEAN)) == P.CLIP_MEAN
    with pytest.raises(ValueError, match=r"3 floats in \[0, 1\]"):
        P.pad_value_for((123.675, 116.28, 103.53))                  # a 0..255 mean


def test_photometric_output_stays_in_unit_range_and_defaults_pad_by_kind():
    image, label = _image(60, 80, 6), np.random.default_rng(6).integers(0, 19, (60, 80))
    out, lab = P.TrainPipeline(kind="rein", crop=48)(image, torch.from_numpy(label),
                                                      np.random.default_rng(1))
    assert out.shape == (3, 48, 48) and out.min() >= 0 and out.max() <= 1
    assert set(lab.unique().tolist()) <= set(range(19)) | {255}
    assert P.PipelineConfig(kind="rein").pad_mean == P.IMAGENET_MEAN
    assert P.PipelineConfig(kind="tqdm").pad_mean == P.CLIP_MEAN


def test_pad_means_match_lessons_backbones():
    """The means are repeated in reprod.data.pipelines to avoid importing open_clip; keep them
    equal."""
    source = (Path(__file__).resolve().parents[1] / "lessons" / "backbones.py").read_text()
    values = {t.id: ast.literal_eval(node.value) for node in ast.parse(source).body
              if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
              and t.id in ("IMAGENET_MEAN", "CLIP_MEAN")}
    assert values == {"IMAGENET_MEAN": P.IMAGENET_MEAN, "CLIP_MEAN": P.CLIP_MEAN}


def test_bad_inputs_are_named():
    image = _image(10, 12)
    with pytest.raises(ValueError, match=r"\(H, W, 3\): transpose"):
        P.as_image(image.transpose(1, 2, 0))
    with pytest.raises(ValueError, match="uint8"):
        P.as_image(image.astype(np.float32))
    with pytest.raises(ValueError, match="label is 13x10 but the image is 12x10"):
        P.TrainPipeline()(image, np.zeros((10, 13), np.int64), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"0\.\.300"):
        P.as_label(np.array([[0, 300]]))


# --- config -----------------------------------------------------------------------------------
def test_config_from_dict_names_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match=r"unknown pipeline config keys \['cropp'\]"):
        P.PipelineConfig.from_dict({"crop": 512, "cropp": 3})
    with pytest.raises(ValueError, match="pipeline kind 'segformer'"):
        P.PipelineConfig(kind="segformer")
    with pytest.raises(ValueError, match="ratio_range"):
        P.PipelineConfig(kind="tqdm", ratio_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="unknown pipeline config keys"):
        P.TrainPipeline(flip=0.5)
    with pytest.raises(ValueError, match="not both"):
        P.TrainPipeline(P.PipelineConfig(), crop=1024)
    cfg = P.PipelineConfig(kind="tqdm", crop=256)
    assert P.PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- stream and sampler -----------------------------------------------------------------------
def test_stream_depends_only_on_seed_and_position(tmp_path):
    files = _toy_gtav(tmp_path)
    pipe = P.TrainPipeline(kind="tqdm", crop=16)
    stream = P.TrainingStream(files, pipe, seed=3)
    a, again, other = stream[5], P.TrainingStream(files, pipe, seed=3)[5], stream[6]
    assert a[0].shape == (3, 16, 16) and a[1].dtype == torch.int64
    assert torch.equal(a[0], again[0]) and torch.equal(a[1], again[1])     # resumable
    assert not torch.equal(a[0], other[0])
    assert not torch.equal(a[0], P.TrainingStream(files, pipe, seed=4)[5][0])
    n = len(stream)
    assert sorted(stream.source(p)[0] for p in range(n)) == list(range(n))   # one epoch
    assert sorted(stream.source(p)[0] for p in range(n, 2 * n)) == list(range(n))
    loader = DataLoader(stream, batch_size=2, sampler=P.StreamSampler(1, 2, steps=1))
    images, labels = next(iter(loader))
    assert torch.equal(images, torch.stack([stream[2][0], stream[3][0]]))
    assert torch.equal(labels, torch.stack([stream[2][1], stream[3][1]]))
    with pytest.raises(ValueError, match="non-negative"):
        stream[-1]
    with pytest.raises(ValueError, match="seed"):
        P.TrainingStream(files, pipe, seed=-1)


def test_two_ranks_are_disjoint_and_cover_one_rank_with_double_batch():
    r0, r1 = (P.StreamSampler(0, 2, rank, 2, steps=3) for rank in (0, 1))
    single = P.StreamSampler(0, 4, steps=3)
    assert not set(r0) & set(r1) and sorted([*r0, *r1]) == list(single) == list(range(12))
    for step in range(3):
        assert sorted([*r0.positions(step), *r1.positions(step)]) == list(single.positions(step))
    assert list(P.StreamSampler(2, 2, 1, 2, steps=1)) == [10, 11]          # resume at step 2
    assert list(itertools.islice(P.StreamSampler(5, 3), 4)) == [15, 16, 17, 18]
    with pytest.raises(TypeError, match="infinite"):
        len(P.StreamSampler(0, 2))
    with pytest.raises(ValueError, match="rank"):
        P.StreamSampler(0, 2, rank=2, world_size=2)


# --- rare-class sampling ----------------------------------------------------------------------
F1, F2 = "labels/00001_labelTrainIds.png", "labels/00002_labelTrainIds.png"


def _stats(folder: Path, entries: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with_class: dict[str, list] = {}
    for e in entries:
        for c, n in e.items():
            if c != "file":
                with_class.setdefault(c, []).append([e["file"], n])
    (folder / "sample_class_stats.json").write_text(json.dumps(entries))
    (folder / "samples_with_class.json").write_text(json.dumps(with_class))
    return folder


def test_rcs_min_pixels_rule_and_near_uniform_classes(tmp_path):
    folder = _stats(tmp_path / "s", [{"file": F1, "0": 5000, "13": 3000},
                                     {"file": F2, "0": 2000, "13": 3001}])
    rcs = P.RareClassSampler.from_stats(folder)
    assert rcs.files == {0: [F1], 13: [F2]}                        # *more than* 3000 pixels
    assert rcs.min_crop_pixels == 1500
    expected = rcs_probabilities({0: 7000, 13: 6001}, 100)
    assert dict(zip(rcs.classes, rcs.probs, strict=True)) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    draws = [rcs.draw(rng) for _ in range(400)]
    assert set(draws) == {(0, F1), (13, F2)}
    assert 0.4 < sum(c == 0 for c, _ in draws) / 400 < 0.6         # T = 100: about uniform
    with pytest.raises(ValueError, match=r"more than 6000 pixels of class 0 \(road\), 13 "):
        P.RareClassSampler.from_stats(folder, min_pixels=6000)
    with pytest.raises(FileNotFoundError, match="prepare_data stats"):
        P.RareClassSampler.from_stats(tmp_path / "nowhere")


def test_rcs_on_a_toy_tree_matches_files_and_finds_stale_stats(tmp_path):
    files = _toy_gtav(tmp_path)
    write_stats(class_stats([files]), files.root, min_pixels=1)
    rcs = P.RareClassSampler.from_stats(files.root, min_pixels=1)
    assert P.RareClassSampler.from_stats(files, min_pixels=1).files == rcs.files   # its root
    assert max(rcs.probs) / min(rcs.probs) <= math.exp(1 / 100) + 1e-12
    index = rcs.indices(files)
    assert index[F1] == 0 and set(index.values()) <= set(range(len(files)))
    stream = P.TrainingStream(files, P.TrainPipeline(kind="tqdm", crop=16), 0, rcs)
    for p in range(6):
        i, c = stream.source(p)
        assert c in rcs.classes and (files[i][1] == c).sum() > 1
    assert torch.equal(stream[4][0], P.TrainingStream(files, stream.pipeline, 0, rcs)[4][0])
    # DAFormer-style stats name files by another root: matched by base name
    other = _stats(tmp_path / "daformer", [{"file": "data/gta/" + F1, "0": 5000}])
    assert P.RareClassSampler.from_stats(other).indices(files) == {"data/gta/" + F1: 0}
    stale = _stats(tmp_path / "stale", [{"file": "labels/00099_labelTrainIds.png", "0": 5000}])
    with pytest.raises(ValueError, match=r"(?s)stale.*00099.*prepare_data stats gtav"):
        P.TrainingStream(files, stream.pipeline, 0, P.RareClassSampler.from_stats(stale))


def test_rcs_crop_rule_redraws_until_the_class_is_in_the_crop():
    label = np.zeros((64, 64), np.uint8)
    label[40:52, 40:52] = 5                                         # 144 pixels of class 5
    image = _image(64, 64, 7)
    pipe = _plain(kind="rein", crop=16, short_sides=(64,), cat_max_ratio=1.0)

    def rate(focus):
        hits = [(pipe(image, label, np.random.default_rng(s), focus)[1] == 5).sum() > 50
                for s in range(80)]
        return np.mean(hits)

    plain, focused = rate(None), rate((5, 50))
    assert focused > 0.4 and focused > 3 * plain


# --- bench ------------------------------------------------------------------------------------
def test_bench_cli_on_small_synthetic_images(capsys):
    args = ["bench", "--synthetic", "2", "--size", "191x105", "--seconds", "1", "--workers",
            "0", "--pipeline", "tqdm", "--rcs", "--min-pixels", "0", "--crop", "64"]
    assert P.main(args) == 0
    out = capsys.readouterr().out
    assert "2 synthetic GTAV PNG images 191x105" in out and "hardware:" in out
    assert "RESULT tqdm +rcs workers 0:" in out and "images/s per core" in out
    assert P.main(["bench", "--root", "/nonexistent/gta", "--seconds", "1"]) == 2
    assert "GTAV root /nonexistent/gta does not exist" in capsys.readouterr().err
