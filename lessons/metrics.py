"""Segmentation metrics: the confusion matrix, per-class IoU and mean IoU (mIoU).

Every DGSS paper reports mIoU over the 19 Cityscapes classes. The confusion matrix ``M`` counts
pixels: ``M[i, j]`` is the number of evaluated pixels whose ground truth is class ``i`` and whose
prediction is class ``j`` (rows = ground truth, columns = prediction). From it, for class ``k``:

    IoU_k = TP / (TP + FP + FN) = M[k, k] / (sum_j M[k, j] + sum_i M[i, k] - M[k, k])

and mIoU is the mean of IoU_k over the classes that occur, in the ground truth or the prediction,
of the evaluated set. A class absent from both has no IoU (NaN) and is left out of the mean, as
mmsegmentation computes it; a class that is predicted but never in the ground truth counts with
IoU 0. Pixels labelled ``IGNORE_INDEX`` (255) are not evaluated. Accumulate one confusion matrix
over the whole evaluated set, then take the IoUs: the mean of per-image mIoUs is a different
(and not the published) number.

Dimension letters: B batch, H W height width, K classes.
"""

from __future__ import annotations

import math

import torch

from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES

__all__ = [
    "ConfusionMatrix",
    "confusion_matrix",
    "iou_table",
    "mean_iou",
    "per_class_iou",
    "pixel_accuracy",
]

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _values(x: torch.Tensor, limit: int = 10) -> str:
    """The distinct values of ``x`` as a short string, for error messages."""
    values = torch.unique(x).tolist()
    more = f" ... ({len(values)} distinct)" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


def _check_labels(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless ``pred`` and ``target`` are integer maps of one shape."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} and "
            f"target {tuple(target.shape)}"
        )
    for name, x in (("pred", pred), ("target", target)):
        if x.dtype not in _INTEGER_DTYPES:
            raise ValueError(
                f"{name} must be an integer tensor of class indices, got dtype {x.dtype}"
                " (take argmax over the class dimension of logits first)"
            )


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int = NUM_CLASSES,
    ignore_index: int | None = IGNORE_INDEX,
) -> torch.Tensor:
    """Count (ground truth, prediction) pixel pairs: rows = ground truth, columns = prediction.

    ``pred`` and ``target`` are integer class maps of the same shape, e.g. (H, W) or (B, H, W).
    Pixels whose target is ``ignore_index`` are skipped. Returns int64 (K, K) on pred's device.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    _check_labels(pred, target)
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()  # (B, H, W) -> (B*H*W,)
    valid = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        valid = target != ignore_index
    t, p = target[valid], pred[valid]
    bad_t = (t < 0) | (t >= num_classes)
    if bad_t.any():
        raise ValueError(
            f"target has values outside [0, {num_classes}) other than ignore_index="
            f"{ignore_index}: {_values(t[bad_t])}"
        )
    bad_p = (p < 0) | (p >= num_classes)
    if bad_p.any():
        raise ValueError(
            f"pred has values outside [0, {num_classes}) at evaluated pixels: {_values(p[bad_p])}"
        )
    counts = torch.bincount(num_classes * t + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (K*K,) -> (K, K)


def _check_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Return ``confusion`` as a float64 CPU tensor after checking it is (K, K)."""
    confusion = torch.as_tensor(confusion)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got {tuple(confusion.shape)}")
    return confusion.detach().to("cpu", torch.float64)


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of each class, float64 (K,); NaN for classes absent from ground truth and prediction."""
    m = _check_confusion(confusion)  # (K, K)
    tp = m.diagonal()  # (K,)
    union = m.sum(dim=1) + m.sum(dim=0) - tp  # GT pixels + predicted pixels - TP, (K,)
    iou = tp / union  # 0 / 0 -> NaN: the class never occurs
    return torch.where(union > 0, iou, torch.full_like(iou, math.nan))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes that occur in ground truth or prediction (NaN if none does)."""
    return float(torch.nanmean(per_class_iou(confusion)))


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of evaluated pixels predicted correctly (NaN if no pixel was evaluated)."""
    m = _check_confusion(confusion)
    total = float(m.sum())
    return float(m.diagonal().sum()) / total if total > 0 else math.nan


def _percent(value: float) -> str:
    """An IoU as a percentage with one decimal, or '-' when it is NaN."""
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def iou_table(confusion: torch.Tensor, class_names: tuple[str, ...] | list[str] = CLASSES) -> str:
    """A fixed-width text table of per-class IoU in % (1 decimal, '-' for NaN) and the mIoU."""
    iou = per_class_iou(confusion)
    if len(class_names) != len(iou):
        raise ValueError(
            f"got {len(class_names)} class names for a {len(iou)}x{len(iou)} confusion matrix"
        )
    width = max(len("class"), len("mIoU"), *(len(name) for name in class_names))
    header = f"{'class':<{width}}  {'IoU (%)':>7}"
    rule = "-" * len(header)
    rows = [
        f"{name:<{width}}  {_percent(v):>7}"
        for name, v in zip(class_names, iou.tolist(), strict=True)
    ]
    footer = f"{'mIoU':<{width}}  {_percent(mean_iou(confusion)):>7}"
    return "\n".join([header, rule, *rows, rule, footer])


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; ``compute()`` gives mIoU and friends.

    The running matrix stays on the device of the tensors passed to ``update`` (CPU or CUDA);
    ``matrix`` and ``compute()`` return CPU values.
    """

    def __init__(
        self, num_classes: int = NUM_CLASSES, ignore_index: int | None = IGNORE_INDEX
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._matrix: torch.Tensor | None = None

    def _labels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Turn logits (B, K, H, W) or (K, H, W) into a class map (B, H, W) or (H, W)."""
        if pred.dim() != target.dim() + 1:
            return pred
        class_dim = 0 if target.dim() <= 2 else 1  # (K, H, W) vs (H, W); (B, K, H, W) vs (B, H, W)
        if pred.shape[class_dim] != self.num_classes:
            raise ValueError(
                f"logits {tuple(pred.shape)} have {pred.shape[class_dim]} classes in dim "
                f"{class_dim}, expected num_classes={self.num_classes}"
            )
        return pred.argmax(dim=class_dim)  # (B, K, H, W) -> (B, H, W)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` is a class map like ``target``, or logits with a class dim."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        pred = self._labels(pred, target).to(target.device)
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore_index)  # (K, K)
        if self._matrix is None:
            self._matrix = batch
        else:
            self._matrix += batch.to(self._matrix.device)

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self._matrix = None

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated int64 (K, K) matrix on the CPU (zeros before any update)."""
        if self._matrix is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self._matrix.cpu()

    def compute(self) -> dict[str, float | torch.Tensor]:
        """``mean_iou`` and ``pixel_accuracy`` (floats in [0, 1]), ``per_class_iou`` (K,)."""
        m = self.matrix
        return {
            "mean_iou": mean_iou(m),
            "pixel_accuracy": pixel_accuracy(m),
            "per_class_iou": per_class_iou(m),
        }
