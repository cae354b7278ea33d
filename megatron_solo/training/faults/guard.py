"""The training entry point's frame: inputs checked, then ``--save`` held for the run's whole life.

Everything a run needs before megatron-core starts is checked here on every rank (each finds the same
mistake: an :class:`~megatron_solo.errors.InputError`, which rank 0 says), then rank 0 holds the ``--save``
lock, released on any exit, and by the parent watch when the agent dies. A user error raised inside (a
failed save, a changed data file) passes through to the entry point's :func:`megatron_solo.errors.entry_point`.
"""

from __future__ import annotations

import contextlib
import sys

from megatron_solo.errors import global_rank
from megatron_solo.training.faults import parent
from megatron_solo.training.faults.inputs import check_inputs
from megatron_solo.training.faults.lock import SaveDirLock


@contextlib.contextmanager
def guarded_run(cfg):
    """The entry point's frame: inputs checked, the ``--save`` lock held by rank 0 (released on exit, and
    by the parent watch). Yields the run's checked vocabulary (``None`` when nothing says which it is)."""
    lock = None
    try:
        vocab = check_inputs(cfg, save_lock=False)
        if cfg.checkpoint.save and global_rank() == 0:
            lock = SaveDirLock(cfg.checkpoint.save)
            lock.acquire()
            parent.release_on_leave(lock)
            if lock.warning:
                print(lock.warning, file=sys.stderr, flush=True)
        yield vocab
    finally:
        if lock is not None:
            parent.release_on_leave(None)
            lock.release()
