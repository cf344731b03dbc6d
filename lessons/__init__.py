"""dgss-lessons: domain-generalized semantic segmentation with foundation models, lesson by lesson.

The package the notebooks build and import, one concept per module (each module's docstring says
what it holds; ``python -m lessons.check_env`` checks an installation).

Modules: augment, backbones, baselines, benchmark, captions, catseg, check_env, checkpoints,
classes, convert, mask2former, metrics, mfuser, papers, probe, querydiff, rein, segmentor, ssm,
text, toyworld, toyworld1, train, utils, viz, zeroshot
"""

__version__ = "0.1.0"
