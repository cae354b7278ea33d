"""Megatron's pretraining-sampler order: which samples each data-parallel rank reads at each step."""

from __future__ import annotations

from megatron_solo.data import collate


class MicroBatchStream:
    """Micro-batches of one DP rank for global steps starting at ``consumed`` samples.

    Global step k covers samples [consumed + k*gbs, consumed + (k+1)*gbs); micro-batch m of DP rank r
    holds samples start + m*mbs*dp + r*mbs + [0, mbs), Megatron's pretraining-sampler order. ``cfg`` needs
    ``global_batch_size``, ``micro_batch_size`` and ``num_microbatches`` (a TrainConfig has them).
    """

    def __init__(self, dataset, cfg, consumed: int):
        from megatron.core import parallel_state

        self.dataset, self.cfg, self.consumed = dataset, cfg, consumed
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()

    def global_step(self):
        c = self.cfg
        start = self.consumed
        self.consumed += c.global_batch_size
        batches = []
        for m in range(c.num_microbatches):
            base = start + m * c.micro_batch_size * self.dp + self.dp_rank * c.micro_batch_size
            batches.append(collate([self.dataset[(base + j) % len(self.dataset)] for j in range(c.micro_batch_size)]))
        return batches
