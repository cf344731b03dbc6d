"""Tests of reprod.protocols: the protocols' test sizes, the sliding-window counts, images
smaller than the crop, exact mIoU of an oracle and of a constant model, Rein's half-size
Mapillary, end to end on ToyWorld exports under both protocols, the report files, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from reprod import protocols as E
from reprod.data.datasets import build_dataset, export_toyworld

REIN, TQDM = E.PROTOCOLS["rein"], E.PROTOCOLS["tqdm"]
CODE = 13            # the oracle's image encodes class k as the red value 13 * k


class Counting(nn.Module):
    """Records every crop it is given; predicts class ``cls`` everywhere."""

    def __init__(self, cls: int = 0) -> None:
        super().__init__()
        self.cls = cls
        self.crops: list[tuple[int, int]] = []
        self.grad_seen: list[bool] = []

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.crops.append(tuple(images.shape[-2:]))
        self.grad_seen.append(torch.is_grad_enabled())
        scores = images.new_zeros(images.shape[0], NUM_CLASSES, *images.shape[-2:])
        scores[:, self.cls] = 1
        return scores                                                           # (B, K, H, W)


class Oracle(nn.Module):
    """Reads the class out of the image's red channel: one-hot scores of the encoded label."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:               # (B, 3, H, W)
        cls = (images[:, :1] * 255 / CODE).round().long().clamp(0, NUM_CLASSES - 1)
        scores = images.new_zeros(images.shape[0], NUM_CLASSES, *images.shape[-2:])
        return scores.scatter_(1, cls, 1.0)                                   # (B, K, H, W)


def _encoded(label: torch.Tensor) -> torch.Tensor:
    """A uint8 image (3, H, W) whose red channel encodes ``label`` (ignored pixels as class 0)."""
    red = torch.where(label == IGNORE_INDEX, 0, label) * CODE
    return torch.stack([red, torch.full_like(red, 7), torch.full_like(red, 99)]).to(torch.uint8)


def _blocks(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A label of 16x16 blocks of random classes, with some ignored blocks."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES + 3, (h // 16 + 1, w // 16 + 1), generator=g)
    coarse[coarse >= NUM_CLASSES] = IGNORE_INDEX
    return coarse.repeat_interleave(16, 0).repeat_interleave(16, 1)[:h, :w].long()


# ----------------------------------------------------------------------------------------------
# Protocols: test-time sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "target", "size", "test_size"), [
    ("rein", "cityscapes", (1024, 2048), (512, 1024)),
    ("tqdm", "cityscapes", (1024, 2048), (1024, 2048)),
    ("rein", "gtav", (1052, 1914), (704, 1280)),      # f = 1280/1914: 703.53 -> 704
    ("tqdm", "gtav", (1052, 1914), (704, 1280)),
    ("rein", "bdd100k", (720, 1280), (720, 1280)),
    ("tqdm", "bdd100k", (720, 1280), (720, 1280)),
    ("rein", "mapillary", (3024, 4032), (512, 683)),  # halved to 1512x2016, then fitted
    ("tqdm", "mapillary", (3024, 4032), (1024, 1365)),
    ("rein", "mapillary", (4032, 3024), (683, 512)),  # portrait: either orientation fits
    ("rein", "acdc", (1080, 1920), (1080, 1920)),
    ("tqdm", "night", (1080, 1920), (1080, 1920)),    # an ACDC condition uses ACDC's spec
    ("rein_citys2acdc", "cityscapes", (1024, 2048), (1024, 2048)),
])
def test_test_size(protocol, target, size, test_size):
    assert E.get_protocol(protocol).test_size(*size, target) == test_size


def test_label_size_halved_only_for_rein_mapillary():
    assert REIN.label_size(3024, 4032, "mapillary") == (1512, 2016)
    assert REIN.label_size(3025, 4033, "mapillary") == (1512, 2016)   # W // 2, H // 2
    assert TQDM.label_size(3024, 4032, "mapillary") == (3024, 4032)
    assert REIN.label_size(1024, 2048, "cityscapes") == (1024, 2048)


def test_protocol_windows_and_sources():
    assert (REIN.crop, REIN.stride, TQDM.crop, TQDM.stride) == (512, 341, 512, 341)
    assert REIN.with_window(1024).stride == 683 == E.PROTOCOLS["rein_citys2acdc"].stride
    assert TQDM.spec("acdc").ours and TQDM.spec("gtav").ours and not TQDM.spec("mapillary").ours
    assert all("w1oves/Rein" in s.source for k, s in REIN.targets.items() if k != "gtav")
    assert REIN.spec("fog") is REIN.spec("acdc")


# ----------------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "target", "size", "windows"), [
    (TQDM, "cityscapes", (1024, 2048), 18),   # 3 x 6
    (REIN, "cityscapes", (1024, 2048), 3),    # 1024x512: 1 x 3
    (TQDM, "bdd100k", (720, 1280), 8),        # 2 x 4 (Rein's BDD scale is the same)
])
def test_window_count(protocol, target, size, windows):
    model = Counting()
    scores = E.predict_image(model, torch.zeros(3, *size, dtype=torch.uint8), protocol, target)
    assert len(model.crops) == windows
    assert set(model.crops) == {(512, 512)}
    assert scores.shape == (NUM_CLASSES, *size)


def test_image_smaller_than_the_crop():
    # a thin strip: 100x2000 fits Rein's Cityscapes scale as 51x1024: three 51x512 windows
    model = Counting()
    E.predict_image(model, torch.zeros(3, 100, 2000, dtype=torch.uint8), REIN, "cityscapes")
    assert model.crops == [(51, 512)] * 3
    # smaller than the crop both ways: one window of the image's own size, nothing padded
    small = E.Protocol("small", 512, 341, {"cityscapes": E.TargetSpec((300, 200), "test")}, "t")
    label = _blocks(200, 300)
    model = Counting()
    E.predict_image(model, torch.zeros(3, 200, 300, dtype=torch.uint8), small, "cityscapes")
    assert model.crops == [(200, 300)]
    result = E.evaluate_dataset(Oracle(), [(_encoded(label), label)], small, "cityscapes")
    assert result.miou == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------
# mIoU
# ----------------------------------------------------------------------------------------------


def test_oracle_scores_100():
    label = _blocks(512, 1024)            # Rein's Cityscapes size: 3 exact, overlapping crops
    result = E.evaluate_dataset(Oracle(), [(_encoded(label), label, "a.png")], REIN, "cityscapes")
    assert result.miou == pytest.approx(100.0)
    present = set(label.unique().tolist()) - {IGNORE_INDEX}
    for k, name in enumerate(CLASSES):
        assert result.per_class_iou[name] == (pytest.approx(100.0) if k in present else None)
    assert int(result.confusion.sum()) == int((label != IGNORE_INDEX).sum())


def test_constant_model_by_hand():
    label = torch.full((60, 100), IGNORE_INDEX)
    label[:30], label[30:45], label[45:55] = 0, 2, 13      # 3000 road, 1500 building, 1000 car
    image = torch.zeros(3, 60, 100, dtype=torch.uint8)
    model = Counting(cls=2).train()
    result = E.evaluate_dataset(model, [(image, label)], REIN, "cityscapes")
    # building: TP 1500, union = every one of the 5500 labelled pixels; road and car: IoU 0
    assert result.miou == pytest.approx(100 * (1500 / 5500) / 3)
    iou = result.per_class_iou
    assert iou["building"] == pytest.approx(100 * 1500 / 5500)
    assert iou["road"] == 0.0 and iou["car"] == 0.0
    assert [k for k, v in iou.items() if v is None] == [
        c for c in CLASSES if c not in ("road", "building", "car")]
    assert model.training and not any(model.grad_seen)      # no_grad, mode restored
    assert (result.images, result.dataset_size, result.subset) == (1, 1, False)


def test_mapillary_halving():
    label = torch.zeros(8, 200, dtype=torch.long)   # a strip: cheap to fit up to 2048x1024
    label[0::2, :] = 5                     # even rows only: PIL's nearest keeps rows 1, 3, ...
    image = torch.randint(0, 256, (3, 8, 200), dtype=torch.uint8)
    small_image, small_label = E.halve_mapillary(image, label)
    assert small_image.shape == (3, 4, 100) and small_image.dtype == torch.uint8
    assert torch.equal(small_label, label[1::2, 1::2])
    assert E.halve_label(torch.zeros(41, 61, dtype=torch.long)).shape == (20, 30)
    rein = E.evaluate_dataset(Counting(), [(image, label)], REIN, "mapillary")
    tqdm = E.evaluate_dataset(Counting(), [(image, label)], TQDM, "mapillary")
    assert int(rein.confusion.sum()) == 4 * 100 and int(tqdm.confusion.sum()) == 8 * 200
    assert rein.per_class_iou["pole"] is None and rein.miou == pytest.approx(100.0)
    assert tqdm.per_class_iou["pole"] == 0.0 and tqdm.miou == pytest.approx(25.0)
    scores = E.predict_image(Counting(), image, REIN, "mapillary")
    assert scores.shape == (NUM_CLASSES, 4, 100)


# ----------------------------------------------------------------------------------------------
# End to end on ToyWorld exports, and the report
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    out = {}
    for name in ("cityscapes", "bdd100k", "mapillary"):
        export_toyworld(root / name, name, ["val"], length=2)
        out[name] = build_dataset(name, root / name, "val")
    return out


@pytest.fixture(scope="module")
def toy_results(toy_targets):
    """Both protocols on the ToyWorld exports: Rein on both scenes of the three targets; tqdm,
    whose Mapillary differs most (full-resolution labels), on a subset of one Mapillary scene
    (fitted up to 2048x1024: 18 windows; tqdm's Cityscapes windows are counted above)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, NUM_CLASSES, 1)).train()
    results = {"rein": E.evaluate_targets(model, toy_targets, "rein"),
               "tqdm": E.evaluate_targets(model, {"mapillary": toy_targets["mapillary"]}, "tqdm",
                                          max_images=1)}
    assert model.training
    return results


@pytest.mark.parametrize("protocol", ["rein", "tqdm"])
def test_toyworld_end_to_end(toy_targets, toy_results, protocol):
    results = toy_results[protocol]
    images = 2 if protocol == "rein" else 1
    assert results["protocol"] == protocol
    names = ["mapillary"] if protocol == "tqdm" else list(toy_targets)
    assert list(results["targets"]) == names
    for name, r in results["targets"].items():
        assert (r.target, r.images, r.dataset_size) == (name, images, 2)
        assert r.subset == (protocol == "tqdm")
        assert 0 <= r.miou <= 100 and r.confusion.shape == (NUM_CLASSES, NUM_CLASSES)
        assert set(r.per_class_iou) == set(CLASSES)
    pixels = images * 64 * 128 // (4 if protocol == "rein" else 1)    # Rein halves Mapillary
    assert int(results["targets"]["mapillary"].confusion.sum()) <= pixels
    assert int(results["targets"]["mapillary"].confusion.sum()) > pixels // 2
    mean = np.mean([r.miou for r in results["targets"].values()])
    assert results["mean"] == pytest.approx(mean)


def test_report_files(toy_results, tmp_path):
    paper = E.paper_row("rein_gtav_main", "Rein", "DINOv2-L")
    json_path, md_path = E.write_report(
        toy_results["rein"], tmp_path / "out", experiment="toy check", protocol="rein",
        paper=paper, extra={"checkpoint": "none", **E.run_info("cpu")},
        paper_label="Rein DINOv2-L")
    assert (json_path.name, md_path.name) == ("results.json", "results.md")
    report = json.loads(json_path.read_text())
    assert not report["subset"] and report["targets"]["cityscapes"]["images"] == 2
    assert report["protocol"]["name"] == "rein" and report["extra"]["checkpoint"] == "none"
    ours = report["targets"]["mapillary"]["miou"]
    assert report["comparison"]["mapillary"]["delta"] == pytest.approx(ours - 66.1)
    assert report["comparison"]["mean"]["comparable"]
    assert report["comparison"]["mean"]["delta"] == pytest.approx(report["mean"] - 64.3)
    confusion = toy_results["rein"]["targets"]["bdd100k"].confusion
    assert report["confusion"]["bdd100k"] == confusion.tolist()
    md = md_path.read_text()
    for text in ("66.4", "60.4", "66.1", "64.3", "cityscapes 2 images", "CPU (",
                 "Rein DINOv2-L", "traffic light", "checkpoint: none"):
        assert text in md
    assert "subset" not in md.lower()


def test_report_marks_a_subset(toy_results, tmp_path):
    paper = E.paper_row("tqdm_gtav_main", "tqdm", "eva02-clip-l")     # case-insensitive
    json_path, md_path = E.write_report(toy_results["tqdm"], tmp_path, experiment="x",
                                        protocol="tqdm", paper=paper)
    report = json.loads(json_path.read_text())
    assert report["subset"] and report["targets"]["mapillary"]["subset"]
    # one target against the paper's three: the means are not compared
    assert report["comparison"]["mean"]["delta"] is None
    md = md_path.read_text()
    for text in ("68.88", "70.1", "66.05", "subset of 1 of 2 images", "Subset evaluation",
                 "hardware not recorded", "not comparable"):
        assert text in md
    ours = f"| mapillary | {report['targets']['mapillary']['miou']:.2f} (subset) |"
    assert ours in md
    assert "| mean | " + f"{report['mean']:.2f} (subset) |" in md
    with pytest.raises(ValueError, match="protocol 'tqdm', not 'rein'"):
        E.write_report(toy_results["tqdm"], tmp_path, experiment="x", protocol="rein")


def test_report_protocol_with_another_window(tmp_path):
    label = torch.zeros(2, 200, dtype=torch.long)      # fitted to 19x1920: three 1024 windows
    wide = TQDM.with_window(1024)
    assert (wide.crop, wide.stride) == (1024, 683) and "changed" in wide.description
    results = E.evaluate_targets(Counting(), {"acdc": [(_encoded(label), label)]}, wide)
    with pytest.raises(ValueError, match="pass that Protocol itself"):
        E.write_report(results, tmp_path, experiment="x", protocol="tqdm")
    json_path, md_path = E.write_report(results, tmp_path, experiment="x", protocol=wide)
    assert json.loads(json_path.read_text())["protocol"]["crop"] == 1024
    md = md_path.read_text()
    assert "window 1024, stride 683" in md and "chosen by us" in md and "acdc (ours" in md


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown protocol 'mmseg'.*rein"):
        E.get_protocol("mmseg")
    with pytest.raises(ValueError, match="no target 'synthia'.*cityscapes"):
        E.predict_image(Counting(), torch.zeros(3, 8, 8, dtype=torch.uint8), REIN, "synthia")
    model = Counting()
    with pytest.raises(ValueError, match="no target 'kitti'"):
        E.evaluate_targets(model, {"cityscapes": [], "kitti": []}, "tqdm")
    assert model.crops == []                          # checked before anything runs
    with pytest.raises(ValueError, match="no target 'gtav'"):
        E.PROTOCOLS["rein_citys2acdc"].spec("gtav")


def test_bad_inputs_are_errors():
    label = torch.zeros(8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="uint8"):
        E.predict_image(Counting(), torch.zeros(3, 8, 8), REIN, "cityscapes")
    with pytest.raises(ValueError, match=r"label of b.png is \(8, 9\)"):
        E.evaluate_dataset(Counting(), [(torch.zeros(3, 8, 8, dtype=torch.uint8),
                                         torch.zeros(8, 9, dtype=torch.long), "b.png")],
                           REIN, "cityscapes")
    with pytest.raises(ValueError, match="max_images"):
        E.evaluate_dataset(Counting(), [(torch.zeros(3, 8, 8, dtype=torch.uint8), label)] * 2,
                           REIN, "cityscapes", max_images=0)
    with pytest.raises(ValueError, match="empty"):
        E.evaluate_dataset(Counting(), [], REIN, "cityscapes")
    with pytest.raises(ValueError, match="stride"):
        E.Protocol("bad", 512, 600, {"cityscapes": E.TargetSpec((1, 1), "x")}, "x")


def test_paper_row():
    assert E.paper_row("tqdm_gtav_main", "tqdm", "EVA02-CLIP-L") == {
        "cityscapes": 68.88, "bdd100k": 59.18, "mapillary": 70.10, "mean": 66.05}
    with pytest.raises(ValueError, match=r"(?s)no row.*\n  Rein / DINOv2-L"):
        E.paper_row("rein_gtav_main", "Rein", "ViT-Z")
    with pytest.raises(KeyError, match="no paper-results table"):
        E.paper_row("nope", "Rein", "DINOv2-L")
