"""The one user-error type and its one line.

A user mistake (a bad input, a held ``--save``, a full disk) is a :class:`UserError`: the entry point
(``python -m megatron_solo.train``, the tools) catches it once, with :func:`entry_point` or
:func:`report`, and the user reads one ``error: ...`` line and gets the error's exit code, never a
traceback. :class:`InputError` is the start-up kind (exit 2, like a bad flag).

Under torchrun the line is said once for the whole job (rank 0 says what every rank found; a fault raised
by several ranks is said by one of them, :func:`print_error_once`), and every rank that found it writes
it to torchrun's error file (``TORCHELASTIC_ERROR_FILE``, the format of torch's ``@record``): torchrun's
own failure report then names that line as the root cause instead of "To enable traceback see ...".
torchrun itself always prints that report after a worker exits non-zero (torch/distributed/launcher/api.py
raises ChildFailedError; docs/TRAINING.md "What happens when ...").

Importing this module imports nothing heavy (no torch) and changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time


class UserError(RuntimeError):
    """A condition the user must act on: printed as one ``error:`` line, the process exits ``exit_code``."""

    exit_code = 1


class InputError(UserError):
    """A bad input found at start-up (exit 2, like a bad flag)."""

    exit_code = 2


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _record_for_torchrun(line: str) -> None:
    """Write ``line`` where torchrun's agent reads a worker's failure (what torch's ``@record`` writes for
    an exception, with the line in place of a traceback). Without torchrun (no error file named): nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):  # the agent's directory may be gone with the agent
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)


def print_error(msg: str, *, all_ranks: bool = False) -> None:
    """One ``error:`` line on stderr, by rank 0 only unless ``all_ranks`` (a fault seen by one rank).
    Every rank that calls it records the line for torchrun: the agent names whichever worker exited first
    as the root cause, and a quiet rank may be the first to exit."""
    line = f"error: {msg}"
    _record_for_torchrun(line)
    if all_ranks or global_rank() == 0:
        try:
            print(line, file=sys.stderr, flush=True)
        except (BrokenPipeError, OSError):  # the terminal or the agent's pipe may be gone
            pass


ONE_LINE_WAIT_S = 5.0  # how long a rank other than 0 waits for rank 0 to report a fault, then reports it


def print_error_once(msg: str) -> None:
    """The run's one ``error:`` line for a fault raised by one rank or by several: every rank raises a
    failed save (megatron-core broadcasts the failure, but only rank 0, its coordinator, holds the per-rank
    details), whichever ranks read a changed data file raise that. Rank 0 prints its line; another rank
    prints its own only when rank 0 has not raised one within ``ONE_LINE_WAIT_S`` (rank 0 may be waiting
    in a collective). The ranks meet in the process group's key-value store (torchrun's agent store), not
    in a collective, which a failed rank may be unable to join; the quiet ranks exit only once the line is
    printed, since torchrun stops every worker as soon as one exits. Without a process group (a world of
    one) or a reachable store, this rank prints."""
    _record_for_torchrun(f"error: {msg}")  # this rank's own account, whichever rank prints
    dist = sys.modules.get("torch.distributed")  # never imported here: a fault before torch needs none
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        print_error(msg, all_ranks=True)
        return
    claim, printed = "megatron_solo/error/claim", "megatron_solo/error/printed"
    try:
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank() != 0:
            # poll: the store's wait() logs a C++ warning when it times out
            deadline = time.monotonic() + ONE_LINE_WAIT_S
            while not store.check([claim]) and time.monotonic() < deadline:
                time.sleep(0.05)
        mine = store.add(claim, 1) == 1
    except Exception:  # no store to meet in: this rank says it
        mine = True
        store = None
    if mine:
        print_error(msg, all_ranks=True)
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(printed, "1")
        return
    deadline = time.monotonic() + ONE_LINE_WAIT_S
    try:
        while not store.check([printed]):
            if time.monotonic() > deadline:  # the rank that claimed the line died before printing it
                print_error(msg, all_ranks=True)
                return
            time.sleep(0.05)
    except Exception:  # the store went with its host (rank 0, without torchrun's agent), after it printed
        pass


def report(e: UserError) -> int:
    """Say ``e`` as the one line and return its exit code. An :class:`InputError` is found by every rank
    alike (the same flags, the same files): rank 0 says it. Any other may be raised by one rank or several:
    :func:`print_error_once`."""
    if isinstance(e, InputError):
        print_error(str(e))
    else:
        print_error_once(str(e))
    return e.exit_code


def entry_point(main):
    """``main`` with a :class:`UserError` caught once: said as one line, returned as the exit code."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            return report(e)

    return run
