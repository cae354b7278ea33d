"""Evaluation on benchmark tasks: task files (tasks.py), the benchmarks' metrics (metrics.py), running
tasks on a Hugging Face export (runner.py, behind tools/evaluate.py), and in the training loop
(in_loop.py, ``--eval-tasks``). See docs/EVALUATION.md."""
