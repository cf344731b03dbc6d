"""Pictures for the lessons: coloured label maps, overlays, image grids and the house plot style.

Label maps use the Cityscapes trainIds and colours of ``lessons.classes``; ignored pixels (255)
are drawn black. Images come either as tensors (3, H, W), possibly normalised with a backbone's
mean and std, or as arrays (H, W, 3); everything returned for display is an ``np.ndarray``
(H, W, 3), float in [0, 1] or uint8. Heatmaps (similarity maps, costs, errors) use ``cividis``.

Dimension letters: H W height width, K classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lessons.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE

__all__ = [
    "HEATMAP_CMAP",
    "PCABasis",
    "bar_by_domain",
    "colorize",
    "domain_heatmap",
    "feature_pca",
    "index_colours",
    "learning_curves",
    "legend_handles",
    "overlay",
    "setup_style",
    "show_grid",
    "to_image",
]

HEATMAP_CMAP = "cividis"  # colour-blind-safe sequential map for every heatmap

# trainId -> RGB lookup table; every value that is not a class (255 included) maps to black.
_LUT = np.zeros((256, 3), dtype=np.uint8)
_LUT[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)

_STYLE_RC = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "image.cmap": HEATMAP_CMAP,
}

Array = np.ndarray | torch.Tensor


def _numpy(x: Array) -> np.ndarray:
    """A NumPy view or copy of a tensor or array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _is_integer(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.integer)


def colorize(label: Array) -> np.ndarray:
    """Colour a trainId map with the Cityscapes palette: (H, W) -> uint8 (H, W, 3), 255 black."""
    lab = _numpy(label)
    if not _is_integer(lab):
        raise ValueError(f"label must hold integer class ids, got dtype {lab.dtype}")
    bad = (lab < 0) | ((lab >= NUM_CLASSES) & (lab != IGNORE_INDEX))
    if bad.any():
        raise ValueError(
            f"label has values outside [0, {NUM_CLASSES}) other than {IGNORE_INDEX}: "
            f"{np.unique(lab[bad])[:10].tolist()}"
        )
    return _LUT[lab.astype(np.int64)]  # (H, W) -> (H, W, 3)


def to_image(
    x: Array, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """Turn a (3, H, W) image into a displayable float (H, W, 3) array in [0, 1].

    With ``mean`` and ``std`` the normalisation ``(x - mean) / std`` is undone first. Means above 1
    (e.g. 123.675) are taken to be in 0..255 units, and the result is then divided by 255, as is a
    uint8 input.
    """
    img = _numpy(x)
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {img.shape}")
    scale = 255.0 if img.dtype == np.uint8 else 1.0
    img = img.astype(np.float64)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        m = np.asarray(mean, dtype=np.float64).reshape(3, 1, 1)
        s = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
        img = img * s + m  # undo (x - mean) / std
        scale = 255.0 if m.max() > 1.0 else scale
    return np.clip(img.transpose(1, 2, 0) / scale, 0.0, 1.0)  # (3, H, W) -> (H, W, 3)


def _rgb(image: Array) -> np.ndarray:
    """Any image (tensor (3, H, W); array (3, H, W) or (H, W, 3)) as float (H, W, 3) in [0, 1]."""
    img = _numpy(image)
    channels_last = not isinstance(image, torch.Tensor) and img.ndim == 3 and img.shape[-1] == 3
    if not channels_last:
        return to_image(image)
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    return np.clip(img.astype(np.float64), 0.0, 1.0)


def overlay(image: Array, label: Array, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured label map over an image; ignored pixels show the image alone.

    ``image`` is a tensor (3, H, W) in [0, 1] or an array (H, W, 3); returns float (H, W, 3).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _rgb(image)  # (H, W, 3)
    lab = _numpy(label)
    if lab.shape != img.shape[:2]:
        raise ValueError(f"label {lab.shape} does not match image (H, W) = {img.shape[:2]}")
    colour = colorize(lab).astype(np.float64) / 255.0  # (H, W, 3)
    blended = (1.0 - alpha) * img + alpha * colour
    return np.where((lab == IGNORE_INDEX)[..., None], img, blended)


def _displayable(x: Array) -> tuple[np.ndarray, str | None]:
    """What ``imshow`` gets for one grid cell, and the colour map (for 2-D float heatmaps)."""
    arr = _numpy(x)
    if arr.ndim == 2:
        return (colorize(arr), None) if _is_integer(arr) else (arr.astype(np.float64), HEATMAP_CMAP)
    return _rgb(x), None


def _grid_shape(n: int, ncols: int | None) -> tuple[int, int]:
    ncols = min(n, 4) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    return -(-n // ncols), ncols  # ceil(n / ncols) rows


def show_grid(
    images: Sequence[Array],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """Show images, label maps and heatmaps in a grid; returns the Figure (4 columns by default).

    2-D integer arrays are label maps (colourised), 2-D float arrays heatmaps (``cividis``),
    3-D ones images. ``row_labels`` name the rows on the left.
    """
    if len(images) == 0:
        raise ValueError("show_grid needs at least one image")
    nrows, ncols = _grid_shape(len(images), ncols)
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images")
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"got {len(row_labels)} row labels for {nrows} rows")
    cells = [_displayable(x) for x in images]
    height, width = cells[0][0].shape[:2]
    if figsize is None:
        figsize = (2.6 * ncols, (2.6 * height / width + 0.35) * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.grid(False)
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(cells):
            ax.set_axis_off()
            continue
        arr, cmap = cells[i]
        ax.imshow(arr, cmap=cmap, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i])
    for r, name in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(name)
    return fig


@dataclass(frozen=True)
class PCABasis:
    """Principal directions of patch features and the range that maps them to [0, 1]."""

    mean: torch.Tensor          # (C,)
    components: torch.Tensor    # (C, k)
    low: torch.Tensor           # (k,) 1st percentile of the projections
    high: torch.Tensor          # (k,) 99th percentile


def feature_pca(features: torch.Tensor, components: int = 3, basis: PCABasis | None = None
                ) -> tuple[np.ndarray, PCABasis]:
    """Patch features (B, C, h, w) -> their first principal components as RGB (B, h, w, k).

    The components are fitted jointly on all B maps (or taken from an earlier call's ``basis``),
    so one colour means one direction in feature space in every image: the same scene in two
    styles looks alike exactly when the features are style-invariant. Each component is scaled
    to [0, 1] by its 1st and 99th percentiles. Returns the maps and the basis.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, h, w), got shape {tuple(features.shape)}")
    B, C, h, w = features.shape
    x = features.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, C)    # (B*h*w, C)
    if basis is None:
        mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)              # v: (C', C)
        comps = v[:components].T                                               # (C, k)
        proj = (x - mean) @ comps
        basis = PCABasis(mean, comps, proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0))
    elif basis.mean.shape != (C,):
        raise ValueError(f"the basis was fitted on {basis.mean.shape[0]} channels, not {C}")
    proj = ((x - basis.mean) @ basis.components - basis.low) / (basis.high - basis.low
                                                                ).clamp_min(1e-8)
    return proj.clamp(0, 1).reshape(B, h, w, -1).numpy(), basis


def legend_handles(
    class_ids: Iterable[int] | Array, class_names: Sequence[str] = CLASSES
) -> list[Patch]:
    """Legend patches (palette colour, class name) for the classes present; 255 is skipped."""
    if isinstance(class_ids, np.ndarray | torch.Tensor):
        arr = _numpy(class_ids).ravel()
    else:
        arr = np.asarray(list(class_ids), dtype=np.int64)
    if not _is_integer(arr):
        raise ValueError(f"class ids must be integers, got dtype {arr.dtype}")
    ids = np.unique(arr)
    ids = ids[ids != IGNORE_INDEX].astype(np.int64)
    bad = ids[(ids < 0) | (ids >= len(class_names))]
    if bad.size:
        raise ValueError(f"class ids outside [0, {len(class_names)}): {bad.tolist()}")
    return [Patch(facecolor=_LUT[k] / 255.0, edgecolor="0.3", label=class_names[k]) for k in ids]


def index_colours(ids: Array, count: int) -> np.ndarray:
    """Categorical colours (..., 3) in [0, 1] for integer indices in [0, count): which token, query
    or agent a patch picks. Up to 20 indices use ``tab20``; up to 60 ``tab20``, ``tab20b`` and
    ``tab20c`` in turn, so no two indices share a colour (a sequential map would suggest an
    order the indices do not have)."""
    ids = _numpy(ids)
    if not _is_integer(ids):
        raise ValueError(f"index_colours wants integer indices, got {ids.dtype}")
    if not 0 < count <= 60:
        raise ValueError(f"index_colours draws 1..60 distinct indices, not {count}")
    if ids.size and (ids.min() < 0 or ids.max() >= count):
        bad = np.unique(ids[(ids < 0) | (ids >= count)])
        raise ValueError(f"indices outside [0, {count}): {bad.tolist()}")
    names = ["tab20"] if count <= 20 else ["tab20", "tab20b", "tab20c"]
    table = np.concatenate([plt.get_cmap(n)(np.arange(20))[:, :3] for n in names])   # (20|60, 3)
    return table[ids]


def setup_style() -> None:
    """Apply the house plot style: seaborn whitegrid, colour-blind palette, small fonts, dpi 100."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", rc=_STYLE_RC)


def bar_by_domain(
    results: Mapping[str, float],
    ax: Axes | None = None,
    title: str | None = None,
    reference: float | None = None,
    *,
    reference_label: str = "source",
    ylabel: str = "mIoU (%)",
    fmt: str = "{:.1f}",
) -> Axes:
    """Bar plot of mIoU per domain, each bar annotated, with an optional reference line.

    ``reference`` (e.g. the source-domain mIoU) is drawn as a dashed horizontal line.
    """
    if not results:
        raise ValueError("results is empty: expected {domain: mIoU}")
    if ax is None:
        _, ax = plt.subplots()
    domains, values = list(results), [float(v) for v in results.values()]
    sns.barplot(x=domains, y=values, hue=domains, palette="colorblind", legend=False, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt=fmt, padding=2)
    if reference is not None:
        label = f"{reference_label} ({fmt.format(reference)})"
        ax.axhline(reference, color="0.25", linestyle="--", linewidth=1, label=label)
        ax.legend(loc="lower right")
    top = max([*values, reference if reference is not None else 0.0])
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    ax.set(xlabel="", ylabel=ylabel)
    if len(domains) > 6:
        ax.tick_params(axis="x", labelrotation=30)
    if title is not None:
        ax.set_title(title)
    return ax


def domain_heatmap(
    table: pd.DataFrame,
    ax: Axes | None = None,
    title: str | None = None,
    *,
    source: str | None = "synthetic",
    mean_column: str | None = "targets' mean",
    fmt: str = ".1f",
    label: str = "mIoU (%)",
) -> Axes:
    """Methods x domains as an annotated heatmap: one row per method (in the table's order), one
    column per domain, every cell printed, so eleven methods on nine domains read at a glance.

    ``table`` holds scores (e.g. mIoU in %) with methods as index and domains as columns; the
    ``source`` column and the ``mean_column`` (when present) are set off by white lines. Colours
    use :data:`HEATMAP_CMAP` over the table's own range; NaN cells stay blank.
    """
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ValueError("table must be a non-empty DataFrame of methods x domains")
    values = table.astype(float)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.9 * values.shape[1], 0.8 + 0.38 * values.shape[0]))
    sns.heatmap(values, annot=True, fmt=fmt, cmap=HEATMAP_CMAP, linewidths=0.5,
                linecolor="white", cbar_kws={"label": label, "shrink": 0.8},
                annot_kws={"fontsize": 8}, ax=ax)
    columns = list(values.columns)
    for name in (source, mean_column):
        if name in columns:     # white separators around the source and the mean
            i = columns.index(name)
            ax.axvline(i + (1 if i == 0 else 0), color="white", linewidth=3)
    ax.set(xlabel="", ylabel="")
    ax.tick_params(axis="x", labelrotation=0 if len(columns) <= 8 else 30, length=0)
    ax.tick_params(axis="y", labelrotation=0, length=0)
    if title is not None:
        ax.set_title(title)
    return ax


def learning_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    ax: Axes | None = None,
    title: str | None = None,
    *,
    converged: Mapping[str, int] | None = None,
    budget: int | None = None,
    labels: Mapping[str, str] | None = None,
) -> Axes:
    """Validation mIoU (%) against training step, one line per method.

    ``curves`` maps a method to ``{"steps": [...], "miou": [...]}`` (mIoU in [0, 1], as runs
    record it); ``converged`` marks each method's step of convergence with a dot, ``budget``
    draws the chosen budget as a dashed vertical line, ``labels`` renames the methods.
    """
    if not curves:
        raise ValueError("curves must map at least one method to its steps and mIoU")
    for method, curve in curves.items():
        if len(curve["steps"]) != len(curve["miou"]) or not curve["steps"]:
            raise ValueError(f"{method}: a curve needs as many steps as mIoU values, got "
                             f"{len(curve['steps'])} and {len(curve['miou'])}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 4.0))
    colours = sns.color_palette("colorblind", len(curves))
    for colour, (method, curve) in zip(colours, curves.items(), strict=True):
        steps, miou = list(curve["steps"]), [100 * v for v in curve["miou"]]
        name = (labels or {}).get(method, method)
        ax.plot(steps, miou, color=colour, linewidth=1.4, label=name)
        if converged is not None and method in converged:
            at = converged[method]
            ax.plot(at, miou[steps.index(at)], "o", color=colour, markersize=5)
    if budget is not None:
        ax.axvline(budget, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(f"budget {budget:,}", (budget, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -10), textcoords="offset points", fontsize=8, color="0.3")
    ax.set(xlabel="training step", ylabel="validation mIoU (%)")
    ax.legend(loc="lower right", ncol=2, frameon=False)
    if title is not None:
        ax.set_title(title)
    return ax
