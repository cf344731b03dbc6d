"""Reproduction at scale: training, evaluation, benchmarks and published results."""
