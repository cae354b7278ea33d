"""Workers that die with their torchrun agent.

When the agent dies (an OOM killer, a lost node agent, a ``kill -9``), torchrun cannot stop its workers:
left alone they would keep the GPUs, hold the ``--save`` lock and the launcher's output pipe, and write
checkpoints nobody asked for. Each worker watches its parent and leaves, without saving, within a second.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

from megatron_solo.errors import global_rank, print_error

PARENT_POLL_S = 0.5

_parent_watch_started = False
_held_lock = None  # the SaveDirLock this process holds (see release_on_leave), released if the agent dies


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def release_on_leave(lock) -> None:
    """Release ``lock`` (a held :class:`~megatron_solo.training.faults.lock.SaveDirLock`, or None: no
    more) when the agent dies: the lock must not outlive this run by ``STALE_S``."""
    global _held_lock
    _held_lock = lock


def watch_parent() -> bool:
    """Exit this process (code 1, no save) soon after its torchrun agent dies.

    Only under torchrun: a plain ``python -m megatron_solo.train`` under ``nohup`` must survive its shell.
    Linux delivers ``SIGUSR2`` on the parent's death (``PR_SET_PDEATHSIG``); the handler runs between
    bytecodes of the main thread, so a thread polling ``os.getppid()`` covers a main thread blocked in C
    (a collective) and other systems. A ``--save`` lock this process holds is released first.
    Returns whether the watch was started.
    """
    global _parent_watch_started
    if _parent_watch_started or not _under_torchrun():
        return False
    _parent_watch_started = True
    parent = os.getppid()
    leaving = threading.Lock()

    def leave(how: str) -> None:
        if os.getppid() == parent or not leaving.acquire(blocking=False):
            return  # a spurious signal (the thread that started us ended), or already leaving
        print_error(f"the torchrun agent (pid {parent}) is gone ({how}); rank {global_rank()} exits without "
                    f"saving", all_ranks=True)
        try:
            if _held_lock is not None:
                _held_lock.release(join=False)
            # megatron-core's checkpoint writer keeps helper processes (multiprocessing children): they
            # would outlive us and hold the launcher's output pipe open.
            for child in multiprocessing.active_children():
                child.kill()
        finally:
            os._exit(1)

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            # The handler first: SIGUSR2's default action would end the process without releasing the lock.
            previous = signal.signal(signal.SIGUSR2, lambda signum, frame: leave("parent-death signal"))
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR2), 0, 0, 0) != 0:
                signal.signal(signal.SIGUSR2, previous)
        except (OSError, AttributeError, ValueError):  # no prctl, or not the main thread: the thread suffices
            pass

    def poll() -> None:
        while True:
            if os.getppid() != parent:
                leave("parent pid changed")
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=poll, name="megatron_solo-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # died before the watch began
        leave("parent pid changed")
    return True
