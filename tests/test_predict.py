"""reprod.predict on a lesson checkpoint: odd sizes, folders with strays, videos, broken files,
grayscale and RGBA, the ACDC archive and test-time augmentation."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from lessons.checkpoints import CHECKPOINT_DIR
from reprod import predict as P
from reprod.protocols import TTA

CKPT = CHECKPOINT_DIR / "02_rein" / "frozen_seed0.safetensors"


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor():
    return P.load_predictor(str(CKPT), device="cpu")


def test_the_python_api_returns_a_label_at_the_photo_size(predictor):
    label = P.predict(predictor, _photo(333, 517))
    assert label.shape == (333, 517) and label.dtype == np.uint8 and label.max() < 19
    gray = P.predict(predictor, _photo(40, 90)[..., 0])                   # grayscale
    rgba = np.concatenate([_photo(40, 90), np.full((40, 90, 1), 255, np.uint8)], -1)
    assert gray.shape == (40, 90) and np.array_equal(P.predict(predictor, rgba),
                                                     P.predict(predictor, _photo(40, 90)))
    with pytest.raises(ValueError, match="uint8"):
        P.predict(predictor, _photo(8, 8).astype(np.float32))
    assert "ToyWorld" in predictor.note


def test_a_folder_with_strays_broken_files_and_a_video(tmp_path, predictor):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_photo(333, 517)).save(src / "odd.JPG")              # upper-case suffix
    Image.fromarray(_photo(50, 60)[..., 0]).save(src / "sub" / "gray.png")
    Image.fromarray(np.dstack([_photo(50, 60), _photo(50, 60)[..., :1]])).save(src / "rgba.png")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    import imageio.v2 as iio

    with iio.get_writer(src / "clip.mp4", fps=5, macro_block_size=1) as w:
        for k in range(4):
            w.append_data(_photo(48, 64, k))
    out = tmp_path / "out"
    failures = P.run(predictor, [src], out, acdc_zip=tmp_path / "acdc.zip", progress=False)
    assert len(failures) == 1 and "broken.png" in failures[0]            # named, others done
    assert Image.open(out / "odd_labelTrainIds.png").size == (517, 333)
    assert (out / "odd_color.png").exists() and (out / "odd_overlay.jpg").exists()
    assert (out / "sub" / "gray_labelTrainIds.png").exists() and (out / "rgba_color.png").exists()
    assert (out / "clip_overlay.mp4").stat().st_size > 0 and (out / "legend.png").exists()
    assert not list(out.glob("notes*"))
    with zipfile.ZipFile(tmp_path / "acdc.zip") as z:
        names = sorted(z.namelist())
        assert names == ["odd.png", "rgba.png", "sub/gray.png"]
        ids = np.asarray(Image.open(z.open("odd.png")))
    assert ids.shape == (333, 517) and set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21,
                                                               22, 23, 24, 25, 26, 27, 28, 31, 32,
                                                               33, 0}


def test_cli_errors_and_exit_status(tmp_path, capsys):
    assert P.main([str(CKPT), "--input", str(tmp_path / "none.png"), "--out",
                   str(tmp_path / "o"), "--no-progress"]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert P.main([str(CKPT), "--weights", "x.pth", "--input", "a", "--out", "b"]) == 2
    assert "holds its own weights" in capsys.readouterr().err
    assert P.main([str(tmp_path / "missing.safetensors"), "--input", "a", "--out", "b"]) == 2


def test_tta_averages_flips_and_scales():
    image = torch.from_numpy(_photo(20, 30).transpose(2, 0, 1).copy())
    seen = []

    def score(img):                                  # a "model" that favours bright columns
        seen.append(tuple(img.shape[-2:]))
        col = img.float().mean(0, keepdim=True)      # (1, h, w)
        return torch.cat([col, 255 - col]) / 50

    probs = TTA().apply(score, image)
    assert probs.shape == (2, 20, 30) and torch.allclose(probs.sum(0), torch.ones(20, 30))
    assert len(seen) == 12 and (10, 15) in seen and (35, 53) in seen   # 6 scales x 2 flips
    plain = TTA(scales=(1.0,), flip=False).apply(score, image)
    assert torch.allclose(plain, score(image).softmax(0))
