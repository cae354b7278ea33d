"""The training entry point's frame: inputs checked, ``--save`` held, a user error said as one line.

Everything a run needs before megatron-core starts is checked here on every rank (each finds the same
mistake; rank 0 says it), rank 0 then holds the ``--save`` lock for the run's whole life (released on any
exit, and by the parent watch when the agent dies), and a :class:`~megatron_solo.errors.UserError` raised
anywhere inside (a failed save, a changed data file) leaves through :func:`megatron_solo.errors.report`.
"""

from __future__ import annotations

import contextlib
import sys

from megatron_solo.errors import UserError, global_rank, report
from megatron_solo.training.faults import parent
from megatron_solo.training.faults.inputs import check_inputs
from megatron_solo.training.faults.lock import SaveDirLock


@contextlib.contextmanager
def guarded_run(cfg):
    """The entry point's frame: inputs checked, the ``--save`` lock held by rank 0 (released on exit, and
    by the parent watch), and a :class:`UserError` printed as one ``error:`` line with its exit code."""
    lock = None
    try:
        check_inputs(cfg, save_lock=False)
        if cfg.checkpoint.save and global_rank() == 0:
            lock = SaveDirLock(cfg.checkpoint.save)
            lock.acquire()
            parent.release_on_leave(lock)
            if lock.warning:
                print(lock.warning, file=sys.stderr, flush=True)
        yield
    except UserError as e:
        sys.exit(report(e))  # an InputError: every rank found it, rank 0 says it; else said once by one rank
    finally:
        if lock is not None:
            parent.release_on_leave(None)
            lock.release()
