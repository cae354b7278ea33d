"""Evaluation on benchmark tasks: task files (tasks.py) and the benchmarks' metrics (metrics.py).
See docs/EVALUATION.md."""
