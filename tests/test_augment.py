"""Tests of lessons.augment: the recipes' flip and photometric distortion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lessons import toyworld as tw
from lessons.augment import Augmented, photometric_distortion


def test_photometric_distortion_keeps_shape_range_and_changes_the_look():
    image, _ = tw.ToyWorld("synthetic", "train", length=1)[0]
    outs = [photometric_distortion(image.numpy(), np.random.default_rng(s)) for s in range(20)]
    for out in outs:
        assert out.shape == (3, 64, 128) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    changed = [not np.allclose(o, image.numpy(), atol=1e-6) for o in outs]
    assert 15 <= sum(changed) < 20       # each of 4 steps fires with p 0.5: (1/2)^4 untouched


def test_photometric_steps_match_mmseg_ranges():
    # a grey image: brightness moves it by at most 32/255, contrast scales it within [0.5, 1.5]
    grey = np.full((3, 4, 4), 0.5, np.float32)
    outs = np.array([photometric_distortion(grey, np.random.default_rng(s)).mean()
                     for s in range(400)])
    assert outs.min() >= (0.5 - 32 / 255) * 0.5 - 1e-6
    assert outs.max() <= (0.5 + 32 / 255) * 1.5 + 1e-6
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        photometric_distortion(np.zeros((4, 4, 3)), np.random.default_rng(0))


def test_augmented_flips_image_and_label_together_and_is_reproducible():
    base = tw.ToyWorld("synthetic", "train", length=8)
    aug = Augmented(base, flip=True, photometric=False, seed=3)
    flips = 0
    for i in range(8):
        (img, lab), (img0, lab0) = aug[i], base[i]
        if torch.equal(lab, lab0.flip(-1)) and not torch.equal(lab, lab0):
            flips += 1
            assert torch.equal(img, img0.flip(-1))
        else:
            assert torch.equal(img, img0) and torch.equal(lab, lab0)
    assert 1 <= flips <= 7
    again = Augmented(base, seed=3)
    first = [again[i][0] for i in range(4)]
    again2 = Augmented(base, seed=3)
    assert all(torch.equal(a, again2[i][0]) for i, a in enumerate(first))
    assert "photometric=True" in repr(again)


def test_torch_hsv_matches_matplotlib_and_round_trips():
    from matplotlib.colors import rgb_to_hsv

    from lessons.augment import hsv_to_rgb_torch, rgb_to_hsv_torch

    x = torch.rand(3, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    torch.testing.assert_close(rgb_to_hsv_torch(x), ref.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb_torch(rgb_to_hsv_torch(x)), x, atol=1e-5, rtol=0)


def test_batch_augmentation_draws_what_the_per_image_one_draws():
    """Flips move labels with images; the photometric statistics of a batch match the per-image
    mmseg distortion's (mean change of brightness and spread over many draws)."""
    from lessons.augment import augment_batch, photometric_distortion

    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 3, 8, 16, generator=g)
    labels = torch.arange(16).repeat(64, 8, 1)                      # column index as label
    out, lab = augment_batch(images, labels, g, photometric=False)
    flipped = lab[:, 0, 0] == 15
    assert 16 < int(flipped.sum()) < 48                             # about half flipped
    torch.testing.assert_close(out[flipped], images[flipped].flip(-1))
    out, _ = augment_batch(images, labels, g, flip=False)
    rng = np.random.default_rng(1)
    ref = np.stack([photometric_distortion(im.numpy(), rng) for im in images])
    for stat in (np.mean, np.std):
        a, b = stat((out - images).numpy()), stat(ref - images.numpy())
        assert abs(a - b) < 0.03, (stat.__name__, a, b)
    assert out.min() >= 0 and out.max() <= 1
