"""Tests of reprod.data.datasets: the label tables, each reader on small hand-made trees with the
official naming and encodings, clear errors (missing roots, unpaired files, wrong sizes,
out-of-range labels), and the ToyWorld export read back through the readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lessons import toyworld as tw
from lessons.classes import CLASSES, PALETTE
from reprod.data import datasets as D

# the GTAV converter's map (DAFormer's tools/convert_datasets/gta.py, as Rein and tqdm ship it)
GTA_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                     24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, palette: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette is not None:
        im.putpalette(palette)
    im.save(path)
    return path


# label ids chosen to hit kept classes, ignored ids (0, 18 polegroup, 29 caravan) and the ends
IDS = np.array([[0, 7, 8, 11, 12], [17, 18, 19, 26, 29], [31, 32, 33, 24, 25]], np.uint8)
TRAIN = np.array([[255, 0, 1, 2, 3], [5, 255, 6, 13, 255], [16, 17, 18, 11, 12]], np.uint8)


# --- tables -----------------------------------------------------------------------------------
def test_label_id_table_is_the_standard_34_id_table():
    table = D.LABEL_ID_TO_TRAIN_ID
    for lid in range(34):
        assert table[lid] == GTA_ID_TO_TRAIN.get(lid, 255), lid
    assert (table[34:] == -1).all()
    kept = [(tid, name, rgb) for _, name, tid, rgb in D.CITYSCAPES_LABELS if tid != 255]
    assert [n for _, n, _ in sorted(kept)] == list(CLASSES)
    assert [c for *_, c in sorted(kept)] == list(PALETTE)


def test_inverse_table_round_trips_every_train_id():
    tids = np.array([*range(19), 255], np.uint8)
    ids = D.train_ids_to_label_ids(tids)
    assert ids[-1] == 0 and ids[0] == 7 and ids[18] == 33
    assert (D.label_ids_to_train_ids(ids) == tids).all()
    with pytest.raises(ValueError, match="19"):
        D.train_ids_to_label_ids(np.array([19], np.uint8))


def test_conversion_is_vectorised_and_rejects_values_outside_the_table():
    assert (D.label_ids_to_train_ids(IDS) == TRAIN).all()
    bad = IDS.copy()
    bad[0, 0], bad[1, 1] = 40, 200
    with pytest.raises(ValueError, match=r"my_label\.png: 2 pixels have values \(40, 200\)"):
        D.label_ids_to_train_ids(bad, "my_label.png")
    lenient = D.label_ids_to_train_ids(bad, strict=False)
    assert lenient[0, 0] == 255 and lenient[1, 1] == 255 and lenient[2, 2] == 18
    with pytest.raises(ValueError, match="300"):                  # 16-bit values
        D.label_ids_to_train_ids(np.array([[7, 300]], np.uint16))
    with pytest.raises(ValueError, match="integers"):
        D.label_ids_to_train_ids(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(19\)"):
        D.check_train_ids(np.array([[0, 19, 255]], np.uint8))


def test_mapillary_table_maps_the_converters_names():
    labels = D.MAPILLARY_V12_LABELS
    assert len(labels) == 66 and labels[65][1] == "Unlabeled"
    assert len({c for *_, c in labels}) == 66 and len({r for _, r, _ in labels}) == 66
    keys = {D.mapillary_name_key(r) for _, r, _ in labels}
    assert set(D.MAPILLARY_TO_TRAIN_ID) <= keys and len(D.MAPILLARY_TO_TRAIN_ID) == 34
    lut = D.mapillary_lookup([r for _, r, _ in labels])
    by_name = {r: int(lut[i]) for i, (_, r, _) in enumerate(labels)}
    assert D.mapillary_name_key("Crosswalk - Plain") == "crosswalkplain"
    expected = {"Road": 0, "Lane Marking - General": 0, "Lane Marking - Crosswalk": 0,
                "Parking": 0, "Bike Lane": 0, "Service Lane": 0, "Crosswalk - Plain": 0,
                "Curb": 1, "Curb Cut": 1, "Pedestrian Area": 1, "Street Light": 5,
                "Utility Pole": 5, "Traffic Sign Frame": 7, "Traffic Sign (Back)": 7,
                "Bicyclist": 12, "Other Rider": 12, "On Rails": 16, "Guard Rail": 255,
                "Barrier": 255, "Caravan": 255, "Other Vehicle": 255, "Unlabeled": 255}
    assert {n: by_name[n] for n in expected} == expected
    counts = np.bincount([v for v in by_name.values() if v != 255], minlength=19)
    assert counts.tolist() == [7, 4, 1, 1, 1, 3, 1, 3, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1]
    assert (lut[66:] == -1).all()
    with pytest.raises(ValueError, match="onrails"):
        D.mapillary_lookup([r for _, r, _ in labels if r != "On Rails"])


# --- GTAV ---------------------------------------------------------------------------------------
def _gtav(root: Path, names=("00001", "00002"), sub: str = "") -> None:
    for k, n in enumerate(names):
        _save(root / "images" / sub / f"{n}.png", _rgb(3, 5, k))
        _save(root / "labels" / sub / f"{n}.png", np.roll(IDS, k, axis=1), D.LABEL_ID_PALETTE)


def test_gtav_reads_palettised_label_ids_as_train_ids(tmp_path):
    _gtav(tmp_path)
    ds = D.build_dataset("gtav", tmp_path, "all")
    assert len(ds) == 2 and ds.expected_count() == 24966
    image, label, name = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 3, 5)
    assert (image.permute(1, 2, 0).numpy() == _rgb(3, 5, 1)).all()
    assert label.dtype == torch.int64 and (label.numpy() == np.roll(TRAIN, 1, axis=1)).all()
    assert name == "images/00002.png"
    assert len(D.GTAV(tmp_path, return_name=False)[0]) == 2          # split "all" by default


def test_gtav_robustnet_splits_and_all_reads_recursively(tmp_path):
    _gtav(tmp_path, ("00001", "00002", "00003"), "train")
    _gtav(tmp_path, ("00004",), "valid")
    assert [s.key for s in D.GTAV(tmp_path, "train").samples] == ["00001", "00002", "00003"]
    valid = D.GTAV(tmp_path, "valid")
    assert len(valid) == 1 and valid.expected_count() is None
    assert [s.key for s in D.GTAV(tmp_path, "all").samples] == [
        "train/00001", "train/00002", "train/00003", "valid/00004"]
    with pytest.raises(ValueError, match="'valid'"):
        D.GTAV(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="images/test does not exist"):
        D.GTAV(tmp_path, "test")
    (tmp_path / "images" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="labels/test does not exist"):
        D.GTAV(tmp_path, "test")


def test_gtav_converted_labels_are_not_taken_for_official_ones(tmp_path):
    _gtav(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)2 images without a label.*No labels at all.*"
                                         r"prepare_data convert gtav"):
        D.GTAV(tmp_path, "all", labels="trainids")
    D.write_label(tmp_path / "labels" / "00001_labelTrainIds.png", TRAIN)
    D.write_label(tmp_path / "labels" / "00002_labelTrainIds.png", TRAIN)
    assert len(D.GTAV(tmp_path, "all")) == 2                          # not 4, not unpaired
    ds = D.GTAV(tmp_path, "all", labels="trainids")
    assert ds.samples[0].label.name == "00001_labelTrainIds.png"
    assert (ds[0][1].numpy() == TRAIN).all()


# --- Cityscapes -------------------------------------------------------------------------------
def _cityscapes(root: Path, split: str = "val", cities=("frankfurt", "lindau")) -> None:
    for k, city in enumerate(cities):
        stem = f"{city}/{city}_{k:06d}_000019"
        _save(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", _rgb(3, 5, k))
        _save(root / "gtFine" / split / f"{stem}_gtFine_labelIds.png", IDS)


def test_cityscapes_pairs_by_official_names(tmp_path):
    _cityscapes(tmp_path)
    ds = D.Cityscapes(tmp_path, "val")
    assert [s.key for s in ds.samples] == ["frankfurt/frankfurt_000000_000019",
                                           "lindau/lindau_000001_000019"]
    assert (ds[0][1].numpy() == TRAIN).all()
    assert ds[1][2] == "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png"
    assert ds.expected_count() == 500
    with pytest.raises(ValueError, match="withheld"):
        D.Cityscapes(tmp_path, "test")


def test_cityscapes_unpaired_files_are_errors_naming_them(tmp_path):
    _cityscapes(tmp_path)
    orphan = _save(tmp_path / "leftImg8bit/val/munster/munster_000007_000019_leftImg8bit.png",
                   _rgb(3, 5))
    with pytest.raises(ValueError, match=r"1 images without a label:\n  .*munster_000007"):
        D.Cityscapes(tmp_path, "val")
    orphan.unlink()
    _save(tmp_path / "gtFine/val/lindau/lindau_000009_000019_gtFine_labelIds.png", IDS)
    with pytest.raises(ValueError, match=r"1 labels without an image:\n  .*lindau_000009"):
        D.Cityscapes(tmp_path, "val")
    ds = D.Cityscapes(tmp_path, "val", allow_unpaired=True)
    assert len(ds) == 2 and ds.pairing.unpaired_labels[0].name.startswith("lindau_000009")


def test_cityscapes_size_mismatch_and_bad_values_name_the_file(tmp_path):
    _cityscapes(tmp_path)
    label = tmp_path / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png"
    _save(label, np.zeros((4, 5), np.uint8))
    ds = D.Cityscapes(tmp_path, "val")
    with pytest.raises(ValueError, match=r"lindau_000001_000019_gtFine_labelIds\.png: label is "
                                         r"5x4 but its image .* is 5x3"):
        ds[1]
    assert "label is 5x4" in ds.check(1)[0] and ds.check(0) == []
    bad = IDS.copy()
    bad[0, 0] = 50
    _save(label, bad)
    with pytest.raises(ValueError, match=r"lindau_000001.*values \(50\) outside"):
        D.Cityscapes(tmp_path, "val")[1]
    assert D.Cityscapes(tmp_path, "val", strict_labels=False)[1][1][0, 0] == 255


def test_missing_roots_and_folders_say_where_the_data_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*cityscapes-dataset\.com"
                                                r".*leftImg8bit"):
        D.Cityscapes(tmp_path / "nope", "val")
    _cityscapes(tmp_path)
    (tmp_path / "leftImg8bit/train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"gtFine/train does not exist"):
        D.Cityscapes(tmp_path, "train")
    (tmp_path / "gtFine/train").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        D.Cityscapes(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="mapillary.com"):
        D.Mapillary(tmp_path / "nope", "val")


def test_registry_rejects_unknown_names_splits_and_formats(tmp_path):
    assert set(D.DATASETS) == {"gtav", "cityscapes", "bdd100k", "mapillary", "acdc"}
    with pytest.raises(ValueError, match="unknown dataset 'kitti'.*gtav"):
        D.build_dataset("kitti", tmp_path, "val")
    with pytest.raises(ValueError, match="unknown BDD100K split 'validation'"):
        D.build_dataset("bdd100k", tmp_path, "validation")
    with pytest.raises(ValueError, match="label format 'labelIds'"):
        D.build_dataset("cityscapes", tmp_path, "val", labels="labelIds")


# --- BDD100K ----------------------------------------------------------------------------------
def test_bdd_reads_train_id_masks_and_checks_their_values(tmp_path):
    for k, name in enumerate(("7d2f7975-e0c1c5a7", "0a0a0b1a-7c39d841")):
        _save(tmp_path / f"images/10k/val/{name}.jpg", _rgb(3, 5, k))
        _save(tmp_path / f"labels/sem_seg/masks/val/{name}.png", TRAIN)
    ds = D.BDD100K(tmp_path, "val")
    assert [s.key for s in ds.samples] == ["0a0a0b1a-7c39d841", "7d2f7975-e0c1c5a7"]
    assert (ds[0][1].numpy() == TRAIN).all() and ds[0][0].shape == (3, 3, 5)
    _save(tmp_path / "labels/sem_seg/masks/val/0a0a0b1a-7c39d841.png", TRAIN + 1)   # 19, 256->0
    with pytest.raises(ValueError, match=r"0a0a0b1a-7c39d841\.png: .*\(19\)"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="colormaps/val"):
        D.BDD100K(tmp_path, "val", labels="colormaps")


# --- Mapillary --------------------------------------------------------------------------------
def _mapillary_config(root: Path, order: list[int], name: str = "config_v1.2.json") -> list:
    labels = [D.MAPILLARY_V12_LABELS[i] for i in order]
    body = {"labels": [{"name": n, "readable": r, "color": list(c)} for n, r, c in labels]}
    (root / name).write_text(json.dumps(body))
    return labels


def _mapillary_index(labels, readable: str) -> int:
    return [r for _, r, _ in labels].index(readable)


MAP_NAMES = [["Road", "Lane Marking - General", "Curb"],
             ["Traffic Sign Frame", "Guard Rail", "Bicyclist"]]
MAP_TRAIN = np.array([[0, 0, 1], [7, 255, 12]], np.uint8)


def test_mapillary_maps_config_indices_by_name_not_by_position(tmp_path):
    order = list(np.random.default_rng(1).permutation(66))           # a shuffled config
    labels = _mapillary_config(tmp_path, order)
    idx = np.array([[_mapillary_index(labels, r) for r in row] for row in MAP_NAMES], np.uint8)
    palette = [c for *_, rgb in labels for c in rgb]
    _save(tmp_path / "validation/images/AbCdEfGhIjKlMnOpQrStUv.jpg", _rgb(2, 3))
    _save(tmp_path / "validation/v1.2/labels/AbCdEfGhIjKlMnOpQrStUv.png", idx, palette)
    ds = D.Mapillary(tmp_path, "val")
    assert ds.config_file == tmp_path / "config_v1.2.json"
    assert (ds[0][1].numpy() == MAP_TRAIN).all()
    assert ds[0][2] == "validation/images/AbCdEfGhIjKlMnOpQrStUv.jpg"
    bad = idx.copy()
    bad[0, 0] = 70
    _save(tmp_path / "validation/v1.2/labels/AbCdEfGhIjKlMnOpQrStUv.png", bad, palette)
    with pytest.raises(ValueError, match=r"AbCdEf.*\(70\) outside the Mapillary"):
        ds[0]


def test_mapillary_rgb_labels_v1_layout_and_embedded_table(tmp_path):
    # v1.x release layout (labels/ beside images/), colour-coded RGB labels, no config at all
    colors = {r: c for _, r, c in D.MAPILLARY_V12_LABELS}
    rgb = np.array([[colors[r] for r in row] for row in MAP_NAMES], np.uint8)
    _save(tmp_path / "training/images/k1.jpg", _rgb(2, 3))
    _save(tmp_path / "training/labels/k1.png", rgb)
    ds = D.Mapillary(tmp_path, "train")
    assert ds.config_file is None and (ds[0][1].numpy() == MAP_TRAIN).all()
    rgb[1, 1] = (1, 2, 3)
    _save(tmp_path / "training/labels/k1.png", rgb)
    with pytest.raises(ValueError, match=r"k1\.png: 1 pixels have colours \(\(1, 2, 3\)\)"):
        ds[0]
    assert D.Mapillary(tmp_path, "train", strict_labels=False)[0][1][1, 1] == 255


def test_mapillary_rejects_a_config_that_is_not_v1_2(tmp_path):
    (tmp_path / "config_v1.2.json").write_text(json.dumps(
        {"labels": [{"readable": f"x{i}", "color": [i, 0, 0]} for i in range(124)]}))
    _save(tmp_path / "training/images/k1.jpg", _rgb(2, 3))
    _save(tmp_path / "training/v1.2/labels/k1.png", np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="has 124 labels.*v1.2 has 66"):
        D.Mapillary(tmp_path, "train")


# --- ACDC -------------------------------------------------------------------------------------
def _acdc(root: Path, conds=("fog", "night"), split: str = "val") -> None:
    for k, cond in enumerate(conds):
        stem = f"GOPR047{k}/GOPR047{k}_frame_000{k}41"
        _save(root / f"rgb_anon/{cond}/{split}/{stem}_rgb_anon.png", _rgb(3, 5, k))
        _save(root / f"gt/{cond}/{split}/{stem}_gt_labelIds.png", IDS)
        _save(root / f"gt/{cond}/{split}/{stem}_gt_labelTrainIds.png", TRAIN)
        _save(root / f"gt/{cond}/{split}/{stem}_gt_labelColor.png", _rgb(3, 5))


def test_acdc_conditions_and_both_label_files(tmp_path):
    _acdc(tmp_path)
    ids = D.ACDC(tmp_path, "val", conditions=("fog", "night"))
    assert [s.key for s in ids.samples] == ["fog/GOPR0470/GOPR0470_frame_000041",
                                            "night/GOPR0471/GOPR0471_frame_000141"]
    assert (ids[1][1].numpy() == TRAIN).all() and ids.expected_count() == 206
    train_ids = D.build_dataset("acdc", tmp_path, "val", labels="trainids", conditions="night")
    assert len(train_ids) == 1 and (train_ids[0][1].numpy() == TRAIN).all()
    assert sum(c["val"] for c in D.ACDC_COUNTS.values()) == 406       # QueryDiff paper §5.1's total
    with pytest.raises(FileNotFoundError, match="rgb_anon/rain/val"):
        D.ACDC(tmp_path, "val")                                       # all four by default
    with pytest.raises(ValueError, match="unknown ACDC conditions"):
        D.ACDC(tmp_path, "val", conditions=["haze"])
    with pytest.raises(ValueError, match="evaluation server"):
        D.ACDC(tmp_path, "test", conditions="fog")


# --- ToyWorld export --------------------------------------------------------------------------
SIZE = (32, 64)


def _round_trip(root: Path, dataset: str, split: str, domain: str, toy_split: str,
                labels: str | None = None, cond: str | None = None, length: int = 3) -> None:
    """Every exported item reads back with ToyWorld's label (and image, up to JPEG)."""
    manifest = json.loads((root / D.MANIFEST).read_text())
    part = manifest["parts"][f"{cond}/{split}" if cond else split]
    step = len(part["files"]) // length
    index = {f: i for i, f in enumerate(part["files"][::step])}       # image file -> scene index
    extra = {"conditions": cond} if cond else {}
    ds = D.build_dataset(dataset, root, split, labels=labels, **extra)
    world = tw.ToyWorld(domain, toy_split, SIZE, length, seed=3)
    assert len(ds) == length
    for image, label, name in ds:
        ref_image, ref_label = world[index[name]]
        assert torch.equal(label, ref_label), (dataset, name)
        ref = torch.round(ref_image * 255)
        err = (image.float() - ref).abs().mean().item()
        assert err == 0 if name.endswith(".png") else 0 < err < 5, (dataset, name, err)


@pytest.mark.parametrize("dataset", ["gtav", "cityscapes", "bdd100k", "mapillary"])
def test_toyworld_export_round_trips(tmp_path, dataset):
    m = D.export_toyworld(tmp_path, dataset, length=3, size=SIZE, seed=3)
    assert m["dataset"] == dataset and m["toyworld_version"] == tw.current_world()
    for split in D.DATASETS[dataset].DEFAULT_SPLITS:
        _round_trip(tmp_path, dataset, split, D.TOY_DOMAINS[dataset], D.TOY_SPLITS[split])


def test_toyworld_export_acdc_and_split_map(tmp_path):
    D.export_toyworld(tmp_path, "acdc", ["val"], length=3, size=SIZE, seed=3,
                      split_map={"val": "test"}, conditions=["fog", "snow"])
    for cond in ("fog", "snow"):
        for labels in ("ids", "trainids"):
            _round_trip(tmp_path, "acdc", "val", cond, "test", labels, cond)
    assert not (tmp_path / "rgb_anon" / "night").exists()


def test_toyworld_export_gtav_robustnet_layout_and_reexport(tmp_path):
    D.export_toyworld(tmp_path, "gtav", ["train", "valid"], length=3, size=SIZE, seed=3)
    _round_trip(tmp_path, "gtav", "valid", "synthetic", "val")
    assert len(D.GTAV(tmp_path, "all")) == 6
    D.export_toyworld(tmp_path, "gtav", ["valid"], length=2, size=SIZE, seed=3)   # shrinks
    assert len(D.GTAV(tmp_path, "valid")) == 2 and len(D.GTAV(tmp_path, "train")) == 3
    with pytest.raises(ValueError, match="either 'all'"):
        D.export_toyworld(tmp_path, "gtav", ["all", "train"], length=1, size=SIZE)
    with pytest.raises(ValueError, match="not 'cityscapes'"):
        D.export_toyworld(tmp_path, "cityscapes", length=1, size=SIZE)


def test_toyworld_export_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileExistsError, match="may be a real dataset tree"):
        D.export_toyworld(tmp_path, "gtav", length=1, size=SIZE)


def test_mapillary_export_writes_the_official_config_and_palettised_labels(tmp_path):
    D.export_toyworld(tmp_path, "mapillary", ["val"], length=2, size=SIZE, seed=3)
    config = json.loads((tmp_path / "config_v1.2.json").read_text())
    assert [lab["readable"] for lab in config["labels"]] == [
        r for _, r, _ in D.MAPILLARY_V12_LABELS]
    label = next((tmp_path / "validation/v1.2/labels").glob("*.png"))
    with Image.open(label) as im:
        assert im.mode == "P"
        values = np.unique(np.asarray(im))
    assert values.max() <= 65 and 13 in values                       # 13 = "Road"


# --- the export's manifest cannot be turned against the tree it sits in ------------------------
def test_reexport_refuses_a_manifest_listing_paths_outside_the_export(tmp_path):
    root = tmp_path / "export"
    D.export_toyworld(root, "gtav", ["all"], length=1, size=SIZE, seed=3)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    manifest = json.loads((root / D.MANIFEST).read_text())
    for rel in ("../precious.txt", str(outside)):
        manifest["parts"]["all"]["files"] = [rel]
        (root / D.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="not a plain path inside"):
            D.export_toyworld(root, "gtav", ["all"], length=1, size=SIZE, seed=3)
        assert outside.read_text() == "keep me"


def test_reexport_refuses_a_tree_holding_files_it_did_not_write(tmp_path):
    """A real GTAV unpacked over an old export: no file is replaced, nothing is deleted."""
    root = tmp_path / "gta"
    D.export_toyworld(root, "gtav", ["all"], length=2, size=SIZE, seed=3)
    manifest = json.loads((root / D.MANIFEST).read_text())
    image = root / manifest["parts"]["all"]["files"][0]       # same name as a real GTAV file
    real = np.full((*SIZE, 3), 7, np.uint8)
    Image.fromarray(real).save(image)
    extra = root / "images" / "99999.png"
    Image.fromarray(real).save(extra)
    with pytest.raises(FileExistsError, match="did not write") as err:
        D.export_toyworld(root, "gtav", ["all"], length=2, size=SIZE, seed=3)
    assert "images/99999.png\n" in str(err.value) and "changed since the export" in str(err.value)
    assert np.array_equal(np.asarray(Image.open(image)), real) and extra.exists()
    extra.unlink()
    with pytest.raises(FileExistsError, match="changed since the export"):
        D.export_toyworld(root, "gtav", ["all"], length=2, size=SIZE, seed=3)
    assert np.array_equal(np.asarray(Image.open(image)), real)


def test_reexport_refuses_links_and_old_manifests(tmp_path):
    root = tmp_path / "gta"
    D.export_toyworld(root, "gtav", ["all"], length=1, size=SIZE, seed=3)
    (tmp_path / "elsewhere").mkdir()
    (root / "images" / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="a link"):
        D.export_toyworld(root, "gtav", ["all"], length=1, size=SIZE, seed=3)
    (root / "images" / "sub").unlink()
    manifest = json.loads((root / D.MANIFEST).read_text())
    del manifest["sha256"]                                     # written by an older version
    (root / D.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="predates the export's checksums"):
        D.export_toyworld(root, "gtav", ["all"], length=1, size=SIZE, seed=3)


def test_reexport_of_its_own_files_still_works(tmp_path):
    D.export_toyworld(tmp_path, "mapillary", ["val"], length=2, size=SIZE, seed=3)
    m = D.export_toyworld(tmp_path, "mapillary", ["val"], length=1, size=SIZE, seed=4)
    assert len(D.Mapillary(tmp_path, "val")) == 1 and "config_v1.2.json" in m["sha256"]
    assert set(m["sha256"]) == {*m["parts"]["val"]["files"], "config_v1.2.json"}


def test_an_image_past_the_decompression_bomb_limit_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)        # 1600 > 2 x 100: PIL refuses
    for read in (D.read_image, D.image_size, D.read_label_values):
        with pytest.raises(ValueError, match=f"{path}: cannot read the .*decompression bomb"):
            read(path)
