"""Training: arguments, loop, checkpointing, logging. Entry point: ``python -m megatron_solo.train``."""
