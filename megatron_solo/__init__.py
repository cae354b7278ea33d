"""megatron_solo: train SOLO-style single-transformer vision-language models on megatron-core.

Importing the package is cheap (no torch), and importing any of its modules changes nothing
global. On a machine without CUDA, entry points (the trainer, tools, benchmarks, test fixtures) call
`megatron_solo.cpu_backend.ensure()` before running megatron-core.
"""

__version__ = "0.1.0"
