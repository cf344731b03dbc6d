"""MaskCLIP zero-shot segmentation on an open_clip CLIP."""

from __future__ import annotations

import pytest
import torch

from lessons.backbones import build_encoder
from lessons.zeroshot import MaskCLIPSegmenter


def test_maskclip_scores_are_scaled_cosines_per_class():
    seg = MaskCLIPSegmenter(build_encoder("toy_vlm"), class_names=["road", "sky", "car"],
                            scale=1.0)
    out = seg(torch.rand(2, 3, 64, 128))
    assert out.shape == (2, 3, 8, 16)
    assert out.abs().max() <= 1.0 + 1e-5                 # cosines
    assert all(not p.requires_grad for p in seg.encoder.parameters())


def test_maskclip_needs_a_text_tower():
    with pytest.raises(ValueError, match="no text tower"):
        MaskCLIPSegmenter(build_encoder("toy_vfm"))


def test_crop_zero_shot_spreads_each_crops_scores_over_its_pixels():
    from lessons.zeroshot import CropZeroShot

    enc = build_encoder("toy_vlm")
    seg = CropZeroShot(enc, class_names=["road", "sky", "car"], crop=(32, 64), stride=(32, 64),
                       scale=1.0)
    assert seg.boxes(64, 128) == [(0, 0), (0, 64), (32, 0), (32, 64)]   # four tiles
    images = torch.rand(1, 3, 64, 128)
    out = seg(images)
    assert out.shape == (1, 3, 64, 128) and out.abs().max() <= 1.0 + 1e-5
    # the top-right tile's pixels hold exactly that crop's cosines, resized to the tower's size
    crop = torch.nn.functional.interpolate(images[:, :, :32, 64:], size=(64, 128),
                                           mode="bilinear", align_corners=False)
    emb = enc.project(enc.forward_tokens(enc.normalize(crop))[1])
    expected = torch.nn.functional.normalize(emb, dim=-1) @ seg.text.T
    assert torch.allclose(out[0, :, 5, 100], expected[0], atol=1e-5)
    overlapping = CropZeroShot(enc, crop=(16, 32), stride=(8, 16))
    assert len(overlapping.boxes(64, 128)) == 49 and (0, 96) in overlapping.boxes(64, 128)
    assert CropZeroShot(enc, crop=(16, 48), stride=(8, 40)).boxes(16, 128)[-1] == (0, 80)
    with pytest.raises(ValueError, match="do not fit"):
        overlapping(torch.rand(1, 3, 8, 16))
    with pytest.raises(ValueError, match="no text tower"):
        CropZeroShot(build_encoder("toy_vfm"))
