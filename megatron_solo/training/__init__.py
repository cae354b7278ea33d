"""Training: arguments, the derived TrainConfig, the Trainer, the sampler, logging. Entry point:
``python -m megatron_solo.train``. The checkpoint format lives in :mod:`megatron_solo.checkpoint`."""
