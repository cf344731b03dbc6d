"""Tests of reprod.prepare_data: convert writes the right trainId files, stats writes the DAFormer
rare-class-sampling files with hand-checked values, verify names every bad file and exits 1,
export-toyworld writes readable trees."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reprod import prepare_data as P
from reprod.data import datasets as D


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(h: int = 2, w: int = 4) -> np.ndarray:
    return np.full((h, w, 3), 90, np.uint8)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


# two GTAV labels (label ids): road 7, car 26, sky 23, unlabeled 0, caravan 29 (ignored)
GTA_A = np.array([[7, 7, 7, 26], [7, 7, 23, 0]], np.uint8)     # road 5, car 1, sky 1
GTA_B = np.array([[23, 23, 26, 26], [26, 29, 7, 7]], np.uint8)  # sky 2, car 3, road 2


def _gtav(root: Path) -> Path:
    for n, lab in (("00001", GTA_A), ("00002", GTA_B)):
        _save(root / "images" / f"{n}.png", _image())
        _save(root / "labels" / f"{n}.png", lab)
    return root


# --- convert ----------------------------------------------------------------------------------
def test_convert_gtav_writes_train_ids_beside_the_labels(tmp_path, capsys):
    root = _gtav(tmp_path)
    assert P.main(["convert", "gtav", str(root), "--workers", "1"]) == 0
    assert "wrote 2 trainId labels" in capsys.readouterr().out
    a = _read(root / "labels" / "00001_labelTrainIds.png")
    assert a.tolist() == [[0, 0, 0, 13], [0, 0, 10, 255]]
    b = D.GTAV(root, "all", labels="trainids")[1][1]
    assert b.tolist() == [[10, 10, 13, 13], [13, 255, 0, 0]]
    assert len(D.GTAV(root, "all")) == 2                              # still 2 official pairs


def test_convert_names_the_file_with_bad_values_and_lenient_maps_them(tmp_path, capsys):
    root = _gtav(tmp_path)
    _save(root / "labels" / "00002.png", np.where(GTA_B == 29, 99, GTA_B).astype(np.uint8))
    assert P.main(["convert", "gtav", str(root), "--workers", "1"]) == 2
    assert "00002.png: 1 pixels have values (99)" in capsys.readouterr().err
    assert P.main(["convert", "gtav", str(root), "--workers", "1", "--lenient"]) == 0
    assert _read(root / "labels" / "00002_labelTrainIds.png")[1, 1] == 255


def test_convert_cityscapes_and_mapillary_and_bdd(tmp_path):
    city = tmp_path / "cityscapes"
    stem = "val/lindau/lindau_000000_000019"
    _save(city / f"leftImg8bit/{stem}_leftImg8bit.png", _image())
    _save(city / f"gtFine/{stem}_gtFine_labelIds.png", GTA_A)
    files = P.convert("cityscapes", city, ["val"])
    assert files == [city / f"gtFine/{stem}_gtFine_labelTrainIds.png"]
    assert _read(files[0]).tolist() == [[0, 0, 0, 13], [0, 0, 10, 255]]

    mapi = tmp_path / "mapillary"
    index = {r: i for i, (_, r, _) in enumerate(D.MAPILLARY_V12_LABELS)}
    lab = np.array([[index["Curb Cut"], index["Utility Pole"], index["Bird"], index["Sky"]]] * 2,
                   np.uint8)
    _save(mapi / "validation/images/key1.jpg", _image())
    _save(mapi / "validation/v1.2/labels/key1.png", lab)
    assert P.convert("mapillary", mapi, ["val"]) == [
        mapi / "validation/labels/key1_labelTrainIds.png"]               # where tqdm reads them
    assert _read(mapi / "validation/labels/key1_labelTrainIds.png")[0].tolist() == [1, 5, 255, 10]
    assert (D.Mapillary(mapi, "val", labels="trainids")[0][1].numpy()
            == D.Mapillary(mapi, "val")[0][1].numpy()).all()

    bdd = tmp_path / "bdd100k"
    _save(bdd / "images/10k/val/a-b.jpg", _image())
    _save(bdd / "labels/sem_seg/masks/val/a-b.png", np.array([[0, 18, 255, 3]] * 2, np.uint8))
    assert P.convert("bdd100k", bdd, ["val"]) == [
        bdd / "labels/sem_seg/colormaps/val/a-b_labelTrainIds.png"]
    assert D.BDD100K(bdd, "val", labels="colormaps")[0][1][0].tolist() == [0, 18, 255, 3]


def test_convert_acdc_has_nothing_to_do(tmp_path, capsys):
    assert P.main(["convert", "acdc", str(tmp_path)]) == 0
    assert "ships its trainIds" in capsys.readouterr().out


# --- stats ------------------------------------------------------------------------------------
def test_stats_writes_the_daformer_files_with_exact_counts(tmp_path, capsys):
    root = _gtav(tmp_path)
    args = ["stats", "gtav", str(root), "--workers", "1", "--min-pixels", "2"]
    assert P.main(args) == 0
    fa, fb = "labels/00001_labelTrainIds.png", "labels/00002_labelTrainIds.png"
    stats = json.loads((root / "sample_class_stats.json").read_text())
    assert stats == [{"0": 5, "10": 1, "13": 1, "file": fa}, {"0": 2, "10": 2, "13": 3, "file": fb}]
    by_file = json.loads((root / "sample_class_stats_dict.json").read_text())
    assert by_file == {fa: {"0": 5, "10": 1, "13": 1}, fb: {"0": 2, "10": 2, "13": 3}}
    with_class = json.loads((root / "samples_with_class.json").read_text())
    assert with_class == {"0": [[fa, 5], [fb, 2]], "10": [[fa, 1], [fb, 2]],
                          "13": [[fa, 1], [fb, 3]]}
    summary = json.loads((root / "rcs_summary.json").read_text())
    classes = summary["classes"]
    # "more than min_pixels": road 5 and 2 -> one image over 2; sky 1, 2 -> none; car 1, 3 -> one
    assert [classes[c]["images_over_min_pixels"] for c in ("0", "10", "13")] == [1, 0, 1]
    assert summary["ready"] is False and summary["starved_classes"] == ["sky"]
    assert "more than 2 pixels of ['sky']" in capsys.readouterr().err
    assert classes["0"]["pixels"] == 7 and classes["0"]["freq"] == pytest.approx(7 / 14)
    # T = 100: softmax((1 - f) / 100) over road 7/14, sky 3/14, car 4/14
    logits = [(1 - f) / 100 for f in (7 / 14, 3 / 14, 4 / 14)]
    z = sum(math.exp(v) for v in logits)
    assert [classes[c]["prob"] for c in ("0", "10", "13")] == pytest.approx(
        [math.exp(v) / z for v in logits])


def test_rcs_probabilities_follow_the_temperature():
    p = P.rcs_probabilities({0: 90, 5: 10}, temperature=0.01)     # DAFormer: rare class wins
    assert p[5] > 0.9999 and set(p) == {0, 5}
    p = P.rcs_probabilities({0: 90, 5: 10, 7: 0}, temperature=100)
    assert set(p) == {0, 5} and p[5] == pytest.approx(1 / (1 + math.exp(-0.8 / 100)))
    with pytest.raises(ValueError, match="no labelled pixels"):
        P.rcs_probabilities({3: 0})


def test_stats_out_folder_and_file_names_from_official_labels(tmp_path):
    root = _gtav(tmp_path / "gta")
    summary = P.write_stats(P.class_stats([D.GTAV(root, "all")]), tmp_path / "out", 1, 1.0)
    assert summary["ready"] and summary["images"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(P.STATS_FILES)
    assert not (root / "sample_class_stats.json").exists()


# --- verify -----------------------------------------------------------------------------------
def _toy(tmp_path: Path, dataset: str = "cityscapes", length: int = 3) -> Path:
    root = tmp_path / dataset
    D.export_toyworld(root, dataset, length=length, size=(32, 64), seed=0)
    return root


def test_verify_a_good_toy_tree_and_the_official_counts(tmp_path, capsys):
    root = _toy(tmp_path)
    assert P.main(["verify", "cityscapes", str(root), "--no-expect-counts",
                   "--workers", "2"]) == 0                                  # a process pool
    out = capsys.readouterr().out
    assert "Cityscapes val: 3 pairs (official: 500), 0 problem(s)" in out and "all good" in out
    assert P.main(["verify", "cityscapes", str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD Cityscapes train: 3 image/label pairs, the official count is 2975" in out


def test_verify_names_every_bad_file(tmp_path, capsys):
    root = _toy(tmp_path)
    gt = root / "gtFine" / "val" / "toyworld"
    missing = gt / "toyworld_000000_000019_gtFine_labelIds.png"
    missing.unlink()
    orphan = _save(gt / "toyworld_000099_000019_gtFine_labelIds.png", np.zeros((32, 64), np.uint8))
    small = _save(gt / "toyworld_000001_000019_gtFine_labelIds.png", np.zeros((16, 64), np.uint8))
    bad = _save(root / "gtFine/train/toyworld/toyworld_000002_000019_gtFine_labelIds.png",
                np.full((32, 64), 77, np.uint8))
    assert P.main(["verify", "cityscapes", str(root), "--no-expect-counts",
                   "--workers", "1"]) == 1
    out = capsys.readouterr().out
    image = root / "leftImg8bit/val/toyworld/toyworld_000000_000019_leftImg8bit.png"
    assert f"BAD {image}: image without a label" in out
    assert f"BAD {orphan}: label without an image" in out
    assert f"BAD {small}: label is 64x16 but its image" in out
    assert f"BAD {bad}: 2048 pixels have values (77)" in out
    assert "verify cityscapes" in out and "4 problem(s)" in out
    # without decoding labels, the out-of-range values are not seen but the rest is
    assert P.main(["verify", "cityscapes", str(root), "--no-expect-counts", "--no-check-values",
                   "--workers", "1"]) == 1
    assert "3 problem(s)" in capsys.readouterr().out


def test_verify_missing_root_and_acdc_conditions(tmp_path, capsys):
    assert P.main(["verify", "bdd100k", str(tmp_path / "nope"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BDD100K train: cannot read the tree" in out and "bdd-data.berkeley.edu" in out
    root = tmp_path / "acdc"
    D.export_toyworld(root, "acdc", ["val"], length=2, size=(32, 64), conditions=["night"])
    args = ["verify", "acdc", str(root), "--split", "val", "--conditions", "night",
            "--workers", "1"]
    assert P.main(args) == 1
    assert "2 image/label pairs, the official count is 106" in capsys.readouterr().out
    assert P.main([*args, "--no-expect-counts", "--labels", "trainids"]) == 0


# --- export-toyworld --------------------------------------------------------------------------
def test_export_toyworld_cli_writes_readable_trees(tmp_path, capsys):
    out = tmp_path / "data"
    assert P.main(["export-toyworld", str(out), "--datasets", "gtav", "mapillary", "--length",
                   "2", "--size", "32", "64", "--split-map", "val=test"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gta", "mapillary"]
    manifest = json.loads((out / "mapillary" / D.MANIFEST).read_text())
    assert manifest["parts"]["val"]["toy_split"] == "test"
    assert manifest["parts"]["train"]["toy_split"] == "train"
    assert P.main(["verify", "mapillary", str(out / "mapillary"), "--no-expect-counts",
                   "--workers", "1"]) == 0
    with pytest.raises(SystemExit):
        P.main(["export-toyworld", str(out), "--split-map", "val:test"])
    assert "--split-map takes" in capsys.readouterr().err


# --- verify: full decoding, files the readers would not see ------------------------------------
def test_verify_decode_finds_truncated_images(tmp_path, capsys):
    root = _toy(tmp_path)
    image = root / "leftImg8bit/val/toyworld/toyworld_000001_000019_leftImg8bit.png"
    image.write_bytes(image.read_bytes()[:-200])              # the header still reads
    args = ["verify", "cityscapes", str(root), "--no-expect-counts", "--workers", "1"]
    assert P.main(args) == 0
    capsys.readouterr()
    assert P.main([*args, "--decode"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {image}: cannot read the image" in out and "1 problem(s)" in out


def test_verify_reports_looping_links_and_upper_case_suffixes(tmp_path, capsys):
    root = _toy(tmp_path)
    val = root / "leftImg8bit/val/toyworld"
    gt = root / "gtFine/val/toyworld"
    image = val / "toyworld_000000_000019_leftImg8bit.png"
    label = gt / "toyworld_000000_000019_gtFine_labelIds.png"
    for path in (image, label):                               # a pair of looping links
        path.unlink()
        path.symlink_to(path)
    upper = val / "toyworld_000001_000019_leftImg8bit.png"
    upper.rename(upper.with_suffix(".PNG"))
    (gt / "toyworld_000001_000019_gtFine_labelIds.png").unlink()
    assert P.main(["verify", "cityscapes", str(root), "--split", "val", "--no-expect-counts",
                   "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {image}: a link that cannot be followed" in out
    assert f"BAD {label}: a link that cannot be followed" in out
    assert f"BAD {upper.with_suffix('.PNG')}: not read, the loaders match" in out
    assert "3 problem(s)" in out
