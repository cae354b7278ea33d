"""Megatron's pretraining-sampler order: which samples each data-parallel rank reads at each step."""

from __future__ import annotations

from megatron_solo.data import collate
from megatron_solo.data.loader import micro_batch_indices


class MicroBatchStream:
    """Micro-batches of one DP rank for global steps starting at ``consumed`` samples.

    Global step k covers samples [consumed + k*gbs, consumed + (k+1)*gbs); micro-batch m of DP rank r
    holds samples start + m*mbs*dp + r*mbs + [0, mbs), Megatron's pretraining-sampler order. ``cfg`` needs
    ``global_batch_size``, ``micro_batch_size`` and ``num_microbatches`` (a TrainConfig has them).
    """

    def __init__(self, dataset, cfg, consumed: int, num_workers: int = 0):
        from megatron.core import parallel_state

        self.dataset, self.cfg, self.consumed = dataset, cfg, consumed
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self._workers = None
        if num_workers:  # --num-workers: the same batches, made ahead in DataLoader worker processes
            from megatron_solo.data.loader import WorkerBatchStream

            self._workers = WorkerBatchStream(
                dataset, global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
                num_microbatches=cfg.num_microbatches, dp=self.dp, dp_rank=self.dp_rank, consumed=consumed,
                num_workers=num_workers)

    def global_step(self):
        if self._workers is not None:
            batches = self._workers.global_step()
            self.consumed = self._workers.consumed
            return batches
        c = self.cfg
        start = self.consumed
        self.consumed += c.global_batch_size
        return [collate([self.dataset[i] for i in micro_batch_indices(start, m, c.micro_batch_size, self.dp,
                                                                      self.dp_rank, len(self.dataset))])
                for m in range(c.num_microbatches)]
