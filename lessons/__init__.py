"""dgss-lessons: domain-generalized semantic segmentation with foundation models, lesson by lesson.

The package the notebooks build and import. One concept per module:

- ``lessons.classes``  the 19 Cityscapes trainIds, palette, ignore index
- ``lessons.toyworld`` ToyWorld, the embedded procedural street-scene dataset (versioned)
- ``lessons.metrics``  confusion matrix, per-class IoU, mIoU
- ``lessons.viz``      palette overlays, image grids, the house plot style
- ``lessons.utils``    seeding, device, threads, the package digest
- ``lessons.train``    the one training step, loop and per-domain evaluation
- ``lessons.baselines`` a from-scratch CNN segmenter (the no-foundation-model baseline)
- ``lessons.backbones`` DINOv2 / CLIP / EVA02-CLIP / SigLIP / toy encoders, one block-wise interface
- ``lessons.text``     class names, prompts, CoOp-style prompt learner, text encoding
- ``lessons.check_env`` ``python -m lessons.check_env``: versions, device, fused-kernel status
"""

__version__ = "0.1.0"
