"""Reproduction at scale: the papers' experiments on the ``lessons`` modules, the toy assets and
the course tooling.

Entry points (``python -m reprod.<name>``) sit at the top; ``data`` reads the real datasets and
runs the training pipelines, ``toy`` makes the toy foundation models and runs the toy sweep,
``course`` runs the notebooks and writes the student copies.

Modules: bench, convert, evaluate, experiment, gpu_check, install_mamba_ssm, models, predict,
prepare_data, protocols, safe_io, train, course.bench_scan, course.diagrams,
course.notebook_imports, course.notebooks, course.reading_path, course.site, course.student_copies,
data.datasets, data.pipelines, toy.bench_render, toy.bench_sweep, toy.bf16_check, toy.curves,
toy.diffusion, toy.gates, toy.preconditions, toy.pretrain, toy.regenerate, toy.resumable,
toy.sweep, toy.vlm
"""
