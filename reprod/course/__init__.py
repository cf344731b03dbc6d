"""Course tooling: the notebook runner, student copies and the lesson benchmarks."""
