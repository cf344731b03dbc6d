"""The invariance meter: how much do an encoder's features change when only the look changes?

Rein's premise (Rein, Table 1: a *frozen* DINOv2-L beats every earlier DGSS method) is that a
vision foundation model's features are already close to style-invariant, so a few trainable
tokens can refine them without undoing that. ToyWorld can measure the premise directly: one scene
renders pixel-aligned in every look (``toyworld.render_across_domains``), so the token of a
patch in the source look and the token of the same patch in a target look can be compared. Their
cosine, averaged over patches and scenes, is 1 for a feature that ignores the look and falls as
the feature follows it. Read block by block, it shows where in the network the look is removed
(or added back: by fine-tuning, or by an adapter).

Tokens share a position code and a direction common to all of them, so raw cosines of two
*different* scenes are already high (0.91 at the course's world-1 toy VFM's last block). The
meter therefore centres first: per block and patch position it subtracts the source tokens' mean
over the scenes, and it reports the floor beside the targets (``"other scenes"``: each source
render against the next scene's, near 0 once centred). A feature is invariant as far as its
targets rise above that floor.

Dimension glossary: S scenes, B blocks, N patch tokens, C width, H W image size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lessons import toyworld as tw
from lessons.backbones import Encoder

__all__ = ["aligned_renders", "block_tokens", "invariance_meter", "invariance_of", "meter_table"]

Adapter = Callable[[int, torch.Tensor, object], torch.Tensor]


def aligned_renders(scenes: int, domains: Sequence[str], seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """``scenes`` scenes, each rendered pixel-aligned in every one of ``domains``: per domain
    the images (S, 3, H, W) in [0, 1], scene k in the same row of every domain."""
    if scenes < 1:
        raise ValueError(f"scenes must be >= 1, got {scenes}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct, got {list(domains)}")
    rows: dict[str, list[torch.Tensor]] = {d: [] for d in domains}
    for k in range(scenes):
        renders = tw.render_across_domains(seed * 10_000 + k, domains=tuple(domains))
        for d in domains:
            rows[d].append(torch.from_numpy(renders[d][0]))                     # (3, H, W)
    return {d: torch.stack(images) for d, images in rows.items()}            # (S, 3, H, W)


def block_tokens(encoder: Encoder, images: torch.Tensor, adapter: Adapter | None = None
                 ) -> list[torch.Tensor]:
    """The patch tokens after every block, as the next block sees them (after ``adapter``'s
    refinement when there is one, e.g. ``reins.adapter(encoder)``): a list of B tensors
    (S, N, C) for images (S, 3, H, W) in [0, 1]."""
    out: list[torch.Tensor] = []

    def capture(i: int, x: torch.Tensor, grid: object) -> torch.Tensor:
        if adapter is not None:
            x = adapter(i, x, grid)
        out.append(x[:, encoder.num_prefix_tokens:])                          # (S, N, C)
        return x

    encoder.forward_tokens(encoder.normalize(images), adapter=capture)
    return out


@torch.no_grad()
def invariance_of(encoder: Encoder, images: dict[str, torch.Tensor], source: str,
                  adapter: Adapter | None = None, center: bool = True) -> dict[str, list[float]]:
    """Per look other than ``source``: per block, the mean cosine between each patch token of
    the source render and the same patch's token in that look's render (``images`` as
    :func:`aligned_renders` returns them). ``center``: first subtract, per block and patch
    position, the source tokens' mean over the scenes (module docstring; needs 2+ scenes)."""
    if source not in images:
        raise ValueError(f"source {source!r} is not among the looks {sorted(images)}")
    shapes = {d: tuple(x.shape) for d, x in images.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the looks' images must be aligned (same shape), got {shapes}")
    was_training = encoder.training
    encoder.eval()
    try:
        ref = [t.float() for t in block_tokens(encoder, images[source], adapter)]  # B x (S, N, C)
        if center and len(images[source]) < 2:
            raise ValueError("centring needs at least 2 scenes (it subtracts their mean)")
        mean = [t.mean(0, keepdim=True) if center else torch.zeros_like(t[:1]) for t in ref]
        out = {}
        for d, x in images.items():
            if d == source:
                continue
            tokens = block_tokens(encoder, x, adapter)
            out[d] = [F.cosine_similarity(a - m, b.float() - m, dim=-1).mean().item()
                      for a, b, m in zip(ref, tokens, mean, strict=True)]     # (S, N) -> mean
    finally:
        encoder.train(was_training)
    return out


def invariance_meter(encoder: Encoder, scenes: int = 8, targets: Sequence[str] | None = None,
                     source: str | None = None, seed: int = 0, adapter: Adapter | None = None,
                     center: bool = True) -> dict[str, list[float]]:
    """The meter on ``scenes`` fresh scenes (at least 2): per target look and per block the mean
    cosine with the source look (:func:`invariance_of`), ``"targets' mean"`` (the mean over the
    targets, block by block) and the ``"other scenes"`` floor (the source look against the next
    scene's source render). Defaults: the current world's source and benchmark targets."""
    if scenes < 2:
        raise ValueError(f"the meter needs at least 2 scenes (its floor pairs them), got {scenes}")
    source = source or tw.SOURCE_DOMAIN
    targets = list(targets or tw.TARGET_DOMAINS)
    images = aligned_renders(scenes, [source, *targets], seed)
    images["other scenes"] = images[source].roll(1, dims=0)                # scene k -> k - 1
    result = invariance_of(encoder, images, source, adapter, center)
    result["targets' mean"] = np.mean([result[d] for d in targets], axis=0).tolist()
    return result


def meter_table(meters: dict[str, dict[str, list[float]]],
                rows: Sequence[str] = ("targets' mean", "other scenes")) -> str:
    """Markdown: one line per (encoder, meter row), the centred cosine after each block."""
    depth = {len(v) for m in meters.values() for v in m.values()}
    if len(depth) != 1:
        raise ValueError(f"the meters have different depths {sorted(depth)}")
    n = depth.pop()
    out = ["| encoder | looks | " + " | ".join(f"block {i + 1}" for i in range(n)) + " |",
           "|---|---|" + "---|" * n]
    for name, meter in meters.items():
        for row in rows:
            if row not in meter:
                raise ValueError(f"{name}'s meter has no row {row!r}; it has {sorted(meter)}")
            cells = " | ".join(f"{round(v, 2) + 0.0:.2f}" for v in meter[row])   # no "-0.00"
            out.append(f"| {name} | {row} | {cells} |")
    return "\n".join(out)
