"""Megatron's pretraining-sampler order: which samples each data-parallel rank reads at each step."""

from __future__ import annotations

import dataclasses

from megatron.core import parallel_state

from megatron_solo.data import collate
from megatron_solo.data.loader import WorkerBatchStream, micro_batch_indices


@dataclasses.dataclass
class GlobalBatch:
    """One optimizer step's micro-batches on this data-parallel rank, and what the logger counts of them."""

    micro_batches: list[dict]
    images: int  # images in these micro-batches (one <vision_start> per image)


def count_images(micro_batches: list[dict], vision_start: int | None) -> int:
    """One ``<vision>`` per image, at the run's own id (``None``: the vocabulary is unknown, counted as 0)."""
    if vision_start is None:
        return 0
    return sum(int((b["tokens"] == vision_start).sum()) for b in micro_batches)


class MicroBatchStream:
    """Micro-batches of one DP rank for global steps starting at ``consumed`` samples.

    Global step k covers samples [consumed + k*gbs, consumed + (k+1)*gbs); micro-batch m of DP rank r
    holds samples start + m*mbs*dp + r*mbs + [0, mbs), Megatron's pretraining-sampler order. ``schedule``
    needs ``global_batch_size``, ``micro_batch_size`` and ``num_microbatches`` (the config's
    :class:`~megatron_solo.training.config.ScheduleSection`).
    """

    def __init__(self, dataset, schedule, consumed: int, num_workers: int = 0, vision_start: int | None = None):
        self.dataset, self.schedule, self.consumed = dataset, schedule, consumed
        self.vision_start = vision_start  # the run's <vision> id, for the image count
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self._workers = None
        if num_workers:  # --num-workers: the same batches, made ahead in DataLoader worker processes
            self._workers = WorkerBatchStream(
                dataset, global_batch_size=schedule.global_batch_size, micro_batch_size=schedule.micro_batch_size,
                num_microbatches=schedule.num_microbatches, dp=self.dp, dp_rank=self.dp_rank, consumed=consumed,
                num_workers=num_workers)

    def global_step(self) -> list[dict]:
        """The next global step's micro-batches of this rank."""
        if self._workers is not None:
            batches = self._workers.global_step()
            self.consumed = self._workers.consumed
            return batches
        s = self.schedule
        start = self.consumed
        self.consumed += s.global_batch_size
        return [collate([self.dataset[i] for i in micro_batch_indices(start, m, s.micro_batch_size, self.dp,
                                                                      self.dp_rank, len(self.dataset))])
                for m in range(s.num_microbatches)]

    def next_batch(self) -> GlobalBatch:
        """:meth:`global_step` with its image count (the trainer's throughput line)."""
        micro_batches = self.global_step()
        return GlobalBatch(micro_batches, count_images(micro_batches, self.vision_start))
