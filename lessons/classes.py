"""The 19 Cityscapes evaluation classes (trainIds 0..18) shared by ToyWorld and the real datasets.

Every label map in this repository, toy or real, uses Cityscapes trainIds, so decoders, losses and
metrics run unchanged on ToyWorld, GTAV, Cityscapes, BDD100K, Mapillary (mapped) and ACDC.
Pixels that are not evaluated carry ``IGNORE_INDEX`` (255).
"""

from __future__ import annotations

__all__ = [
    "CLASSES",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "PALETTE",
    "TRAIN_ID",
]

IGNORE_INDEX: int = 255

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # trainId k is CLASSES[k]
NUM_CLASSES: int = len(CLASSES)

# The official Cityscapes colours (cityscapesScripts labels.py), used for every label overlay.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

TRAIN_ID: dict[str, int] = {name: k for k, name in enumerate(CLASSES)}
