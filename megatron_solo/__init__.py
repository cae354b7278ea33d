"""megatron_solo: train SOLO-style single-transformer vision-language models on megatron-core.

Importing the package is cheap (no torch). The subpackages that drive megatron-core
(`model`, `training`, `convert`) switch on the CPU backend (`megatron_solo.cpu_backend`)
on import when CUDA is absent.
"""

__version__ = "0.1.0"
