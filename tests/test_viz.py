"""Tests of lessons.viz: palette lookups, image conversion, grids and plots on the Agg backend."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lessons.classes import CLASSES, IGNORE_INDEX, PALETTE, TRAIN_ID
from lessons.viz import (
    HEATMAP_CMAP,
    bar_by_domain,
    colorize,
    domain_heatmap,
    index_colours,
    legend_handles,
    overlay,
    setup_style,
    show_grid,
    to_image,
)

matplotlib.use("Agg")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _no_figures_left() -> Iterator[None]:
    """Every test closes the figures it opens, on the Agg backend."""
    assert matplotlib.get_backend().lower() == "agg"
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def label_map() -> torch.Tensor:
    return torch.tensor([[TRAIN_ID["road"], TRAIN_ID["car"]], [TRAIN_ID["sky"], IGNORE_INDEX]])


@pytest.mark.parametrize("as_numpy", [False, True])
def test_colorize_known_colours(as_numpy: bool) -> None:
    lab = label_map().numpy().astype(np.uint8) if as_numpy else label_map()
    rgb = colorize(lab)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (128, 64, 128)  # road
    assert tuple(rgb[0, 1]) == (0, 0, 142)  # car
    assert tuple(rgb[1, 0]) == (70, 130, 180)  # sky
    assert tuple(rgb[1, 1]) == (0, 0, 0)  # ignore is black
    every = colorize(np.arange(len(CLASSES)).reshape(1, -1))
    assert [tuple(c) for c in every[0]] == list(PALETTE)


def test_colorize_errors() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 19\) other than 255: \[-1, 19\]"):
        colorize(torch.tensor([[0, 19], [-1, 255]]))
    with pytest.raises(ValueError, match=r"integer class ids, got dtype float32"):
        colorize(np.zeros((2, 2), dtype=np.float32))


def test_to_image() -> None:
    x = torch.rand(3, 4, 5)
    img = to_image(x)
    assert img.shape == (4, 5, 3) and img.dtype == np.float64
    np.testing.assert_allclose(img, x.permute(1, 2, 0).numpy(), atol=1e-7)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    np.testing.assert_allclose(
        to_image((x - mean) / std, IMAGENET_MEAN, IMAGENET_STD), img, atol=1e-6
    )
    mean255, std255 = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]
    x255 = (255 * x - mean * 255) / (std * 255)
    np.testing.assert_allclose(to_image(x255, mean255, std255), img, atol=1e-5)
    u8 = (x * 255).round().to(torch.uint8)
    np.testing.assert_allclose(to_image(u8), img, atol=1 / 255)
    assert to_image(torch.full((3, 2, 2), 7.0)).max() == 1.0  # clipped into [0, 1]


def test_to_image_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(3, H, W\), got \(4, 5, 3\)"):
        to_image(np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="both mean and std"):
        to_image(torch.zeros(3, 2, 2), mean=IMAGENET_MEAN)


def test_overlay() -> None:
    image = torch.full((3, 2, 2), 0.5)
    out = overlay(image, label_map(), alpha=0.5)
    assert out.shape == (2, 2, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out[0, 0], 0.25 + 0.5 * np.array([128, 64, 128]) / 255)
    np.testing.assert_allclose(out[1, 1], [0.5, 0.5, 0.5])  # ignored: image only
    channels_last = overlay(np.full((2, 2, 3), 128, dtype=np.uint8), label_map(), alpha=0.0)
    np.testing.assert_allclose(channels_last, 128 / 255)
    with pytest.raises(ValueError, match=r"label \(3, 3\) does not match image"):
        overlay(image, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay(image, label_map(), alpha=1.5)


def test_show_grid() -> None:
    images = [torch.rand(3, 8, 16), label_map(), np.random.rand(8, 16), np.zeros((8, 16, 3))]
    fig = show_grid(images, titles=["a", "b", "c", "d"], ncols=3, row_labels=["x", "y"])
    assert isinstance(fig, Figure) and type(fig.canvas).__name__ == "FigureCanvasAgg"
    axes = fig.axes
    assert len(axes) == 6
    assert axes[0].get_title() == "a" and axes[0].get_ylabel() == "x"
    assert axes[3].get_ylabel() == "y"
    label_img = axes[1].images[0].get_array()
    assert tuple(label_img[0, 0]) == (128, 64, 128)  # colourised automatically
    assert axes[2].images[0].get_cmap().name == HEATMAP_CMAP
    assert not axes[4].axison and not axes[5].images  # unused cells are blank
    fig.canvas.draw()
    plt.close(fig)


def test_show_grid_errors() -> None:
    with pytest.raises(ValueError, match="2 titles for 3 images"):
        show_grid([label_map()] * 3, titles=["a", "b"])
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        show_grid([label_map()] * 3, ncols=2, row_labels=["a"])
    with pytest.raises(ValueError, match="at least one image"):
        show_grid([])


def test_legend_handles() -> None:
    handles = legend_handles(np.unique(label_map().numpy()))
    assert [h.get_label() for h in handles] == ["road", "sky", "car"]  # sorted ids, 255 skipped
    np.testing.assert_allclose(handles[2].get_facecolor()[:3], np.array([0, 0, 142]) / 255)
    assert [h.get_label() for h in legend_handles([13, 0, 13])] == ["road", "car"]
    with pytest.raises(ValueError, match=r"class ids outside \[0, 19\): \[19\]"):
        legend_handles(torch.tensor([0, 19]))


def test_setup_style_is_idempotent() -> None:
    with matplotlib.rc_context():  # restores the rcParams afterwards
        setup_style()
        first = dict(matplotlib.rcParams)
        setup_style()
        assert dict(matplotlib.rcParams) == first
        assert matplotlib.rcParams["figure.dpi"] == 100
        assert matplotlib.rcParams["image.cmap"] == HEATMAP_CMAP
        assert matplotlib.rcParams["axes.grid"]
        fig = show_grid([label_map()])
        ax = fig.axes[0]
        assert not any(g.get_visible() for g in ax.get_xgridlines() + ax.get_ygridlines())
        plt.close(fig)


def test_bar_by_domain() -> None:
    results = {"city": 52.34, "bdd": 44.0, "mapillary": 47.5}
    ax = bar_by_domain(results, title="GTAV ->", reference=60.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(results)
    assert [t.get_text() for t in ax.texts] == ["52.3", "44.0", "47.5"]
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == pytest.approx(sorted(results.values()))
    assert ax.get_title() == "GTAV ->"
    assert any(line.get_ydata()[0] == 60.0 for line in ax.get_lines())
    plt.close(ax.figure)
    fig, ax2 = plt.subplots()
    assert bar_by_domain({"a": 0.5}, ax=ax2, fmt="{:.2f}") is ax2
    assert [t.get_text() for t in ax2.texts] == ["0.50"]
    plt.close(fig)
    with pytest.raises(ValueError, match="results is empty"):
        bar_by_domain({})


def test_feature_pca_colours_shared_directions_alike_across_images():
    from lessons.viz import feature_pca

    torch.manual_seed(0)
    direction = torch.randn(16)
    codes = torch.randn(2, 1, 4, 8)                      # one latent value per patch ...
    feats = codes * direction[None, :, None, None] + 0.01 * torch.randn(2, 16, 4, 8)
    rgb, basis = feature_pca(feats)
    assert rgb.shape == (2, 4, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # ... so the first component orders the patches exactly as the latent does
    first = torch.from_numpy(rgb[..., 0]).flatten()
    order = torch.corrcoef(torch.stack([first, codes.flatten()]))[0, 1].abs()
    assert order > 0.95
    again, _ = feature_pca(feats[:1], basis=basis)       # a reused basis gives the same colours
    np.testing.assert_allclose(again, rgb[:1], atol=1e-5)
    with pytest.raises(ValueError, match="16 channels, not 8"):
        feature_pca(torch.randn(1, 8, 2, 2), basis=basis)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        feature_pca(torch.randn(8, 2, 2))


def test_domain_heatmap_prints_every_cell_in_the_tables_order() -> None:
    import pandas as pd

    table = pd.DataFrame({"synthetic": [60.0, 50.0], "fog": [20.0, float("nan")],
                          "targets' mean": [30.0, 40.0]}, index=["b method", "a method"])
    ax = domain_heatmap(table, title="t")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b method", "a method"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["synthetic", "fog", "targets' mean"]
    shown = sorted(t.get_text() for t in ax.texts)
    assert shown == sorted(["60.0", "50.0", "20.0", "30.0", "40.0"])      # NaN stays blank
    assert len(ax.lines) == 2 and ax.get_title() == "t"                    # the two separators
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="non-empty DataFrame"):
        domain_heatmap(pd.DataFrame())


def test_index_colours_are_distinct_and_categorical() -> None:
    ids = torch.arange(20).view(4, 5)
    colours = index_colours(ids, 20)                                          # (4, 5, 3)
    assert colours.shape == (4, 5, 3) and colours.min() >= 0 and colours.max() <= 1
    assert len({tuple(c) for c in colours.reshape(-1, 3)}) == 20
    many = index_colours(np.arange(60), 60)
    assert len({tuple(c) for c in many}) == 60
    with pytest.raises(ValueError, match=r"indices outside \[0, 5\): \[7\]"):
        index_colours(np.array([1, 7]), 5)
    with pytest.raises(ValueError, match="integer indices"):
        index_colours(np.array([0.5]), 5)
    with pytest.raises(ValueError, match="1..60"):
        index_colours(np.array([0]), 61)


def test_learning_curves_draw_a_line_per_method_their_convergence_and_the_budget() -> None:
    from lessons.viz import learning_curves

    curves = {"frozen": {"steps": [100, 200, 300], "miou": [0.3, 0.4, 0.41]},
              "rein": {"steps": [100, 200, 300], "miou": [0.2, 0.5, 0.45]}}
    ax = learning_curves(curves, converged={"frozen": 200, "rein": 200}, budget=250,
                         labels={"rein": "Rein"}, title="t")
    lines = [ln for ln in ax.lines if ln.get_label() in ("frozen", "Rein")]
    assert [ln.get_label() for ln in lines] == ["frozen", "Rein"]
    assert list(lines[1].get_ydata()) == pytest.approx([20, 50, 45])     # percent
    dots = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [(float(d.get_xdata()[0]), float(d.get_ydata()[0])) for d in dots] == [
        (200, pytest.approx(40)), (200, pytest.approx(50))]
    assert any(list(ln.get_xdata()) == [250, 250] for ln in ax.lines)      # the budget line
    assert ax.get_title() == "t" and ax.get_xlabel() == "training step"
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="at least one method"):
        learning_curves({})
    with pytest.raises(ValueError, match="as many steps"):
        learning_curves({"x": {"steps": [1, 2], "miou": [0.1]}})
