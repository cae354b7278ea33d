"""Evaluation on benchmark tasks: task files (tasks.py), the benchmarks' metrics (metrics.py), running
tasks on a Hugging Face export (runner.py, behind tools/evaluate.py). See docs/EVALUATION.md."""
