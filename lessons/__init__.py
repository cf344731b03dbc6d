"""dgss-lessons: domain-generalized semantic segmentation with foundation models, lesson by lesson.

The package the notebooks build and import, one concept per module (each module's docstring says
what it holds; ``python -m lessons.check_env`` checks an installation).

Modules: augment, backbones, baselines, benchmark, captions, catseg, check_env, checkpoints,
classes, convert, invariance, mask2former, metrics, mfuser, papers, probe, querydiff, rein,
segmentor, ssm, text, toyworld, toyworld1, train, utils, viz, zeroshot, exercises.lesson00,
exercises.lesson01, exercises.lesson02, exercises.lesson03a, exercises.lesson03b,
exercises.lesson04, exercises.lesson05, exercises.lesson06, exercises.lesson07, exercises.lesson08,
exercises.lesson09
"""

__version__ = "0.1.0"
