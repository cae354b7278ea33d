"""Micro-batches made in ``torch.utils.data.DataLoader`` worker processes (``--num-workers``).

The training loop's order is Megatron's pretraining-sampler order (:func:`micro_batch_indices`);
:class:`WorkerBatchStream` hands the same index lists, in the same order, to a DataLoader whose
workers run ``SoloDataset.__getitem__`` (for ``encoded`` storage: decode, resize, patchify) and
``collate``, so batches, resume and blends are exactly those of the in-process path, only made ahead
of time on other cores.
"""

from __future__ import annotations

import itertools
import signal
import traceback

from megatron_solo.data.allocator import keep_freed_memory
from megatron_solo.data.dataset import collate
from megatron_solo.data.errors import picklable


def micro_batch_indices(start: int, m: int, micro_batch_size: int, dp: int, dp_rank: int, n: int) -> list[int]:
    """Sample indices of micro-batch ``m`` of DP rank ``dp_rank`` in the global step starting at sample
    ``start``: ``start + m*mbs*dp + dp_rank*mbs + [0, mbs)``, wrapped over a dataset of ``n`` samples."""
    base = start + m * micro_batch_size * dp + dp_rank * micro_batch_size
    return [(base + j) % n for j in range(micro_batch_size)]


def _init_loader_worker(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the training process, which saves a checkpoint and
    then shuts them down; a worker killed by the signal sent to the whole process group would make
    the DataLoader fail that save. A worker whose parent died exits by itself (DataLoader's watchdog).
    A worker decodes images in a loop: it keeps freed memory for reuse (data/allocator.py)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()


class _Raised:
    """An exception raised while a worker read a sample, carried back as data and raised again in the
    training process as itself (DataLoader would re-raise a new one whose message is a worker traceback:
    a one-line user error, e.g. a data file truncated during the run, must stay one line)."""

    def __init__(self, exc: BaseException):
        exc.add_note("raised in a DataLoader worker:\n" + "".join(traceback.format_exception(exc)))
        self.exc = picklable(exc)


class _CatchErrors:
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except Exception as e:
            return _Raised(e)


def _collate(samples):
    return next((s for s in samples if isinstance(s, _Raised)), None) or collate(samples)


class _StepIndexLists:
    """An endless batch sampler: the micro-batch index lists of every global step from ``consumed``."""

    def __init__(self, n, consumed, global_batch_size, micro_batch_size, num_microbatches, dp, dp_rank):
        self.args = (n, consumed, global_batch_size, micro_batch_size, num_microbatches, dp, dp_rank)

    def __iter__(self):
        n, consumed, gbs, mbs, n_micro, dp, dp_rank = self.args
        for step in itertools.count():
            start = consumed + step * gbs
            for m in range(n_micro):
                yield micro_batch_indices(start, m, mbs, dp, dp_rank, n)


class WorkerBatchStream:
    """``global_step()`` -> the micro-batches of the next global step, made by ``num_workers``
    DataLoader workers (the interface of the training loop's in-process ``MicroBatchStream``)."""

    def __init__(self, dataset, *, global_batch_size, micro_batch_size, num_microbatches, dp, dp_rank, consumed,
                 num_workers, prefetch_factor=2):
        from torch.utils.data import DataLoader

        if num_workers < 1:
            raise ValueError("WorkerBatchStream needs num_workers >= 1 (0 reads in the training process)")
        self.consumed, self.global_batch_size, self.num_microbatches = consumed, global_batch_size, num_microbatches
        sampler = _StepIndexLists(len(dataset), consumed, global_batch_size, micro_batch_size, num_microbatches,
                                  dp, dp_rank)
        self._loader = DataLoader(_CatchErrors(dataset), batch_sampler=sampler, collate_fn=_collate,
                                  num_workers=num_workers,
                                  persistent_workers=True, prefetch_factor=prefetch_factor,
                                  worker_init_fn=_init_loader_worker)
        self._it = iter(self._loader)
        # Stop the workers before multiprocessing's own exit handler would SIGTERM them (they ignore it,
        # see _init_loader_worker, and the exit would wait for them forever).
        import atexit

        atexit.register(self.close)

    def global_step(self):
        self.consumed += self.global_batch_size
        batches = [next(self._it) for _ in range(self.num_microbatches)]
        for b in batches:
            if isinstance(b, _Raised):
                raise b.exc
        return batches

    def close(self) -> None:
        """Stop the workers now (they would stop when the stream is garbage-collected)."""
        import atexit

        atexit.unregister(self.close)
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
