"""lessons.baselines: the position-only prior (notebook 01's floor). TinySegNet is exercised by
the training and sweep tests."""

from __future__ import annotations

import pytest
import torch

from lessons.baselines import PositionPrior
from lessons.train import evaluate


def _pairs():
    top = torch.zeros(4, 6, dtype=torch.long)
    top[2:] = 3                                   # class 0 above, class 3 below
    other = top.clone()
    other[0, 0] = 5                               # a minority vote at one pixel
    ignored = torch.full((4, 6), 255)             # contributes nothing
    return [(torch.rand(3, 4, 6), lbl) for lbl in (top, top, other, ignored)]


def test_it_predicts_the_most_frequent_class_at_each_pixel_whatever_the_image():
    prior = PositionPrior((4, 6), num_classes=8).fit(_pairs())
    logits = prior(torch.rand(2, 3, 4, 6))                                       # (B, K, H, W)
    assert logits.shape == (2, 8, 4, 6)
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[0].argmax(0), _pairs()[0][1])
    assert torch.equal(prior(torch.zeros(1, 3, 4, 6)), prior(torch.ones(1, 3, 4, 6)))


def test_it_scores_perfectly_where_position_is_everything():
    pairs = _pairs()[:2]
    prior = PositionPrior((4, 6), num_classes=8).fit(pairs)
    assert evaluate(prior, pairs)["mean_iou"] == pytest.approx(1.0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_images must be in 1\.\.4"):
        PositionPrior((4, 6)).fit(_pairs(), num_images=9)
    with pytest.raises(ValueError, match=r"label 0 is \(4, 6\), the prior is \(8, 8\)"):
        PositionPrior((8, 8)).fit(_pairs())
