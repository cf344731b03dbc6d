"""Tests of lessons.metrics against an independent per-pixel computation with numpy and sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lessons.classes import CLASSES, IGNORE_INDEX
from lessons.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    iou_table,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
)

K = 5


def reference_confusion(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Confusion matrix by a plain loop over pixels (rows = ground truth)."""
    m = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t != IGNORE_INDEX:
            m[t, p] += 1
    return m


def reference_ious(pred: np.ndarray, target: np.ndarray, k: int) -> list[float]:
    """Per-class IoU from sets of evaluated pixel positions; NaN when a class never occurs."""
    p, t = pred.ravel().tolist(), target.ravel().tolist()
    evaluated = [i for i in range(len(t)) if t[i] != IGNORE_INDEX]
    ious = []
    for c in range(k):
        gt = {i for i in evaluated if t[i] == c}
        pr = {i for i in evaluated if p[i] == c}
        union = gt | pr
        ious.append(len(gt & pr) / len(union) if union else math.nan)
    return ious


def reference_miou(ious: list[float]) -> float:
    present = [v for v in ious if not math.isnan(v)]
    return sum(present) / len(present)


def random_maps(seed: int, shape: tuple[int, ...], k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pred/target class maps, with about 20% of the target set to IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, k, shape, generator=g)
    target = torch.randint(0, k, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.2] = IGNORE_INDEX
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7, 9), (3, 6, 8)])
def test_random_maps_match_reference(seed: int, shape: tuple[int, ...]) -> None:
    pred, target = random_maps(seed, shape)
    m = confusion_matrix(pred, target, K)
    assert m.dtype == torch.int64 and m.shape == (K, K)
    np.testing.assert_array_equal(m.numpy(), reference_confusion(pred.numpy(), target.numpy(), K))
    ious = reference_ious(pred.numpy(), target.numpy(), K)
    got = per_class_iou(m)
    assert got.dtype == torch.float64 and got.shape == (K,)
    np.testing.assert_allclose(got.numpy(), ious, rtol=0, atol=1e-12)
    assert mean_iou(m) == pytest.approx(reference_miou(ious), abs=1e-12)
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    keep = t != IGNORE_INDEX
    assert pixel_accuracy(m) == pytest.approx(float((t[keep] == p[keep]).mean()))


def test_class_absent_from_both_is_excluded() -> None:
    pred, target = random_maps(3, (20, 20), k=3)  # classes 3 and 4 never occur
    m = confusion_matrix(pred, target, K)
    iou = per_class_iou(m)
    assert torch.isnan(iou[3:]).all() and not torch.isnan(iou[:3]).any()
    assert mean_iou(m) == pytest.approx(float(iou[:3].mean()))


def test_class_only_in_prediction_counts_zero() -> None:
    target = torch.tensor([[0, 0], [1, 1]])
    perfect = confusion_matrix(target.clone(), target, 3)
    assert mean_iou(perfect) == 1.0
    pred = torch.tensor([[0, 2], [1, 1]])  # class 2 predicted, never in the ground truth
    m = confusion_matrix(pred, target, 3)
    iou = per_class_iou(m)
    assert iou.tolist() == [0.5, 1.0, 0.0]
    assert mean_iou(m) == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3, below 1 and below (0.5 + 1) / 2


def test_hand_built_example() -> None:
    #  target     pred
    #  0 1        0 1
    #  1 255      0 2      class 0: TP 1, FP 1, FN 0 -> 1/2; class 1: TP 1, FN 1 -> 1/2
    target = torch.tensor([[0, 1], [1, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1], [0, 2]])
    m = confusion_matrix(pred, target, 3)
    assert m.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert per_class_iou(m)[:2].tolist() == [0.5, 0.5]
    assert math.isnan(per_class_iou(m)[2])  # the ignored pixel's prediction does not count
    assert mean_iou(m) == 0.5
    assert pixel_accuracy(m) == pytest.approx(2 / 3)


def test_accumulation_equals_one_shot() -> None:
    pred, target = random_maps(4, (6, 10, 12))
    acc = ConfusionMatrix(K)
    for i in range(0, 6, 2):
        acc.update(pred[i : i + 2], target[i : i + 2])
    np.testing.assert_array_equal(acc.matrix.numpy(), confusion_matrix(pred, target, K).numpy())
    out = acc.compute()
    assert out["mean_iou"] == pytest.approx(mean_iou(confusion_matrix(pred, target, K)))
    assert out["per_class_iou"].shape == (K,)
    acc.reset()
    assert acc.matrix.sum() == 0 and math.isnan(acc.compute()["mean_iou"])


def test_logits_path() -> None:
    pred, target = random_maps(5, (2, 8, 8))
    logits = torch.randn(2, K, 8, 8)
    logits.scatter_(1, pred.unsqueeze(1), 10.0)  # argmax over dim 1 is pred
    acc = ConfusionMatrix(K)
    acc.update(logits, target)
    np.testing.assert_array_equal(acc.matrix.numpy(), confusion_matrix(pred, target, K).numpy())
    single = ConfusionMatrix(K)
    single.update(logits[0], target[0])  # (K, H, W) with (H, W)
    np.testing.assert_array_equal(
        single.matrix.numpy(), confusion_matrix(pred[0], target[0], K).numpy()
    )
    with pytest.raises(ValueError, match=r"3 classes in dim 1, expected num_classes=5"):
        acc.update(torch.randn(2, 3, 8, 8), target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulates_on_cuda() -> None:
    pred, target = random_maps(6, (2, 8, 8))
    acc = ConfusionMatrix(K)
    acc.update(pred.cuda(), target.cuda())
    assert acc._matrix is not None and acc._matrix.is_cuda
    assert acc.matrix.device.type == "cpu"
    np.testing.assert_array_equal(acc.matrix.numpy(), confusion_matrix(pred, target, K).numpy())


def test_errors() -> None:
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"same shape, got pred \(3, 2\) and target \(2, 3\)"):
        confusion_matrix(torch.zeros(3, 2, dtype=torch.long), t, K)
    with pytest.raises(ValueError, match=r"pred must be an integer tensor.*torch\.float32"):
        confusion_matrix(torch.zeros(2, 3), t, K)
    with pytest.raises(ValueError, match=r"target must be an integer tensor.*torch\.float64"):
        confusion_matrix(t, t.double(), K)
    bad_t = torch.tensor([[0, 7, -1], [IGNORE_INDEX, 1, 7]])
    with pytest.raises(ValueError, match=r"target has values outside \[0, 5\).*\[-1, 7\]"):
        confusion_matrix(t, bad_t, K)
    bad_p = torch.tensor([[0, 5, 1], [2, 9, 0]])
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 5\).*\[5, 9\]"):
        confusion_matrix(bad_p, t, K)
    with pytest.raises(ValueError, match=r"square \(K, K\) matrix, got \(2, 3\)"):
        mean_iou(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"got 19 class names for a 5x5 confusion matrix"):
        iou_table(torch.eye(K))


def test_pred_at_ignored_pixels_is_not_checked() -> None:
    target = torch.tensor([0, IGNORE_INDEX])
    pred = torch.tensor([0, IGNORE_INDEX])
    assert confusion_matrix(pred, target, K).sum() == 1


def test_iou_table() -> None:
    target = torch.tensor([[0, 1], [1, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1], [0, 2]])
    m = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    m[:3, :3] = confusion_matrix(pred, target, 3)
    lines = iou_table(m).splitlines()
    assert len(lines) == 2 + len(CLASSES) + 2
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[2].split() == ["road", "50.0"]
    assert lines[4].split() == ["building", "-"]
    assert lines[-1].split() == ["mIoU", "50.0"]
    small = iou_table(torch.eye(2, dtype=torch.long), class_names=["a", "b"])
    assert small.splitlines()[-1].split() == ["mIoU", "100.0"]
