"""Test-time augmentation in reprod.protocols / reprod.evaluate: one scale without flip is the
plain prediction, the scales change the test size (as mmseg's MultiScaleFlipAug scales
img_scale), flips are undone, and results.json / results.md say when it was on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lessons.classes import IGNORE_INDEX, NUM_CLASSES
from reprod import protocols as E
from reprod.evaluate import _parser, tta_option

REIN = E.PROTOCOLS["rein"]
CODE = 13            # the oracle's image encodes class k as the red value 13 * k


class Counting(nn.Module):
    """Records every crop; scores depend on the pixels (a fixed 1x1 convolution)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)
        self.crops: list[tuple[int, int]] = []

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.crops.append(tuple(images.shape[-2:]))
        return self.conv(images)                                              # (B, K, h, w)


class Oracle(nn.Module):
    """One-hot scores of the class encoded in the red channel (position-dependent labels)."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        cls = (images[:, :1] * 255 / CODE).round().long().clamp(0, NUM_CLASSES - 1)
        scores = images.new_zeros(images.shape[0], NUM_CLASSES, *images.shape[-2:])
        return scores.scatter_(1, cls, 1.0)


def _label(h: int, w: int) -> torch.Tensor:
    """Vertical stripes of classes 0..7, 32 px wide, and an ignored block: not mirror-symmetric."""
    label = (torch.arange(w) // 32 % 8).expand(h, w).clone()
    label[: h // 4, : w // 8] = IGNORE_INDEX
    return label


def _encoded(label: torch.Tensor) -> torch.Tensor:
    red = torch.where(label == IGNORE_INDEX, 0, label) * CODE
    return torch.stack([red, torch.full_like(red, 7), torch.full_like(red, 99)]).to(torch.uint8)


def test_one_scale_without_flip_is_the_plain_prediction():
    image = torch.randint(0, 256, (3, 300, 700), dtype=torch.uint8, generator=torch.Generator()
                          .manual_seed(1))
    label = torch.randint(0, NUM_CLASSES, (300, 700))
    model = Counting().eval()
    one = E.TTA(scales=(1.0,), flip=False)
    plain = E.predict_image(model, image, REIN, "cityscapes")
    assert torch.allclose(E.predict_image(model, image, REIN, "cityscapes", tta=one),
                          plain.softmax(0), atol=1e-6)
    a = E.evaluate_dataset(model, [(image, label)], REIN, "cityscapes")
    b = E.evaluate_dataset(model, [(image, label)], REIN, "cityscapes", tta=one)
    assert torch.equal(a.confusion, b.confusion) and a.miou == b.miou
    assert (a.tta, b.tta) == (None, one)


def test_the_scales_scale_the_test_size_and_flips_double_the_views():
    # Rein's Cityscapes scale (1024, 512): a 512x1024 image is tested at 512x1024 (3 windows);
    # at ratio 0.5 the scale is (512, 256): 256x512, one window
    model = Counting().eval()
    E.predict_image(model, torch.zeros(3, 512, 1024, dtype=torch.uint8), REIN, "cityscapes",
                    tta=E.TTA(scales=(0.5, 1.0), flip=True))
    assert sorted(model.crops) == [(256, 512)] * 2 + [(512, 512)] * 6
    with pytest.raises(ValueError, match="positive scales"):
        E.TTA(scales=())
    with pytest.raises(ValueError, match="positive scales"):
        E.TTA(scales=(1.0, -0.5))


def test_flips_are_undone():
    label = _label(256, 1024)              # Rein's Cityscapes test size: no resize
    result = E.evaluate_dataset(Oracle(), [(_encoded(label), label)], REIN, "cityscapes",
                                tta=E.TTA(scales=(1.0,), flip=True))
    assert result.miou == pytest.approx(100.0)
    mirrored = E.evaluate_dataset(Oracle(), [(_encoded(label).flip(-1), label)], REIN,
                                  "cityscapes", tta=E.TTA(scales=(1.0,), flip=True))
    assert mirrored.miou < 50                     # (a flip left in place would look like this)


def test_the_report_says_when_tta_was_on(tmp_path):
    label = _label(64, 128)
    data = {"cityscapes": [(_encoded(label), label)]}
    tta = E.TTA(scales=(0.75, 1.0, 1.5))
    on = E.evaluate_targets(Oracle(), data, REIN, tta=tta)
    off = E.evaluate_targets(Oracle(), data, REIN)
    assert on["tta"] is tta and off["tta"] is None
    json_path, md_path = E.write_report(on, tmp_path / "on", experiment="x", protocol=REIN)
    report = json.loads(json_path.read_text())
    assert report["tta"] == {"scales": [0.75, 1.0, 1.5], "flip": True}
    assert report["targets"]["cityscapes"]["tta"] == report["tta"]
    md = md_path.read_text()
    assert "Test-time augmentation**: on: scales 0.75, 1, 1.5" in md and "flipped" in md
    json_path, md_path = E.write_report(off, tmp_path / "off", experiment="x", protocol=REIN)
    assert json.loads(json_path.read_text())["tta"] is None
    assert "augmentation" not in md_path.read_text()


def test_the_command_line_options():
    parse = _parser().parse_args
    assert tta_option(parse(["c", "--checkpoint", "x"])) is None
    assert tta_option(parse(["c", "--checkpoint", "x", "--tta"])) == E.TTA()
    assert tta_option(parse(["c", "--checkpoint", "x", "--tta-scales", "1", "--tta-no-flip"])
                      ) == E.TTA(scales=(1.0,), flip=False)
