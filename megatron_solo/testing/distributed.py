"""Run a function under N real processes (gloo on loopback) and collect each rank's result.

Used by the test suite and benchmarks. Each rank is a fresh ``spawn`` process with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), so code under
test sees exactly what it sees under torchrun. When a rank raises, the caller gets that rank's
traceback, not "exit 1"; when the world hangs (a missed collective), the timeout kills every rank
and says which ones never finished.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable

from megatron_solo import mcore_fixes
from megatron_solo.netutil import free_port


class DistributedTestError(RuntimeError):
    pass


def _rank_main(call, rank, world_size, port, env, cpu_backend_on, results):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        if cpu_backend_on:
            mcore_fixes.apply()  # first: one of its fixes must precede megatron-core's import
            # Imported here: it loads torch, which a worker with cpu_backend=False starts without (~2 s less).
            from megatron_solo import cpu_backend

            cpu_backend.ensure()
        # Unpickled only now: unpickling imports fn's module, which may import megatron-core.
        fn, args, kwargs = pickle.loads(call)
        out = fn(*args, **kwargs)
        # Plain pickle copies tensor data into the message; torch's queue reducers would pass
        # shared-memory handles that vanish when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass
    _exit_like_a_forked_child(results)


def _exit_like_a_forked_child(results) -> None:
    """End this spawned rank as multiprocessing ends a forked child: everything a normal exit runs (its threads
    joined, atexit handlers: multiprocessing's stops the rank's own children), then ``os._exit`` instead of
    the interpreter's teardown, which frees torch's and megatron-core's modules one by one (~2 CPU-s per rank,
    measured, while the parent waits for the rank to end)."""
    results.close()
    results.join_thread()  # the answer is in the pipe
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    cpu_backend: bool = True,
    **kwargs,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return results in rank order.

    ``fn`` must be importable (defined at module level). Results must be picklable (CPU tensors are).
    Each rank is an entry point: it calls ``mcore_fixes.apply()`` and ``cpu_backend.ensure()`` first, before
    it unpickles ``fn`` (whose module may import megatron-core);
    ``cpu_backend=False`` skips both for workers that need neither torch nor megatron-core.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # One thread per rank: this machine has 2 cores, and oversubscribed intra-op threads make
    # gloo runs slower, not faster.
    base_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base_env.update(env or {})
    call = pickle.dumps((fn, args, kwargs))  # each rank unpickles it after its entry-point calls
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(call, rank, world_size, port, base_env, cpu_backend, results),
            name=f"rank{rank}",
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs) - set(errors))
                detail = "".join(f"\n--- rank {r} traceback ---\n{tb}" for r, tb in sorted(errors.items()))
                timed_out = True  # the missing ranks are hung: nothing to wait for below
                raise DistributedTestError(
                    f"timed out after {timeout:.0f}s; ranks {missing} never finished{detail}"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in outputs and r not in errors]
                if dead:
                    # A rank died without reporting (segfault, os._exit, OOM kill).
                    time.sleep(0.5)
                    while True:
                        try:
                            rank, status, payload = results.get_nowait()
                        except queue.Empty:
                            break
                        (outputs if status == "ok" else errors)[rank] = payload
                    for r in dead:
                        if r not in outputs and r not in errors:
                            errors[r] = f"rank {r} died with exit code {procs[r].exitcode} and no traceback"
                    if errors:
                        break
                continue
            if status == "ok":
                outputs[rank] = payload
            else:
                errors[rank] = payload
                # Peers of a failed rank usually block in a collective: give them a moment, then stop.
                grace = time.monotonic() + 5.0
                while len(outputs) + len(errors) < world_size and time.monotonic() < grace:
                    try:
                        r2, s2, p2 = results.get(timeout=0.5)
                        (outputs if s2 == "ok" else errors)[r2] = p2
                    except queue.Empty:
                        pass
                break
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors or timed_out else 10.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    if errors:
        first = min(errors)
        others = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()) if r != first)
        raise DistributedTestError(f"rank {first} failed:\n{errors[first]}{others}")
    return [pickle.loads(outputs[r]) for r in range(world_size)]
