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
