"""An order-preserving pool of worker processes for preprocessing.

Task ``i`` goes to worker ``i % K`` and its answer is read from that worker's own pipe, in task order,
by the caller's thread: answers need no reordering and the parent runs no result thread.

Why not ``multiprocessing.Pool``: its three helper threads (task, result and worker handlers, the
last one polling ``waitpid`` at every change) cost the parent 0.35 s of CPU per 1,000 photo
documents, about a tenth of the whole job on a 2-core machine (docs/BENCHMARKS.md 3b), and a worker
killed by the OS (out of memory, a decoder crash) leaves ``Pool`` waiting forever. Here a dead worker
is an error that names it.

Messages are pickled with protocol 5 and their large buffers (numpy arrays, image bytes that opt in
with ``PickleBuffer``) sent out of band, each as its own message straight from the object's memory:
the big answer that a whole chunk pickled into one buffer was made of fresh pages on both sides,
which cost the parent more page faults than all of its own work.

One sender thread writes the tasks: a task that carries image bytes (tar and Parquet records) could
otherwise block the caller against a worker that is itself blocked sending an answer. Workers are
spawned (the parent may hold threads whose locks a fork would copy) and stop when their pipe closes,
so they do not outlive a parent that was killed.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import traceback
from typing import Callable, Iterable, Iterator

from megatron_solo.data.errors import picklable


class WorkerDied(RuntimeError):
    """A worker process ended without answering (killed by a signal or by the OS)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as the parent exception's cause."""

    def __str__(self) -> str:
        return self.args[0]


OUT_OF_BAND_MIN_BYTES = 64 << 10  # smaller buffers stay inside the pickle: a message each would cost more


def send_message(conn, obj) -> None:
    """Send ``obj`` on a ``multiprocessing`` connection: its pickle, then each out-of-band buffer."""
    buffers: list = []

    def out_of_band(buf: pickle.PickleBuffer):
        if buf.raw().nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # in band
        buffers.append(buf)
        return None

    head = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    conn.send_bytes(len(buffers).to_bytes(4, "little") + head)
    for buf in buffers:
        conn.send_bytes(buf.raw())


def recv_message(conn):
    """The object :func:`send_message` sent (its out-of-band buffers come back as ``bytes``)."""
    head = conn.recv_bytes()
    buffers = [conn.recv_bytes() for _ in range(int.from_bytes(head[:4], "little"))]
    return pickle.loads(memoryview(head)[4:], buffers=buffers)


def _serve(conn, fn, initializer, initargs) -> None:
    """A worker: initialise, then answer tasks until the pipe says stop (None) or closes. A failed
    initialisation is the worker's first answer (raised in the parent), not a traceback here."""
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as e:  # noqa: BLE001
            send_message(conn, ("error", picklable(e), traceback.format_exc()))
            return
    while True:
        try:
            task = recv_message(conn)
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        try:
            answer = ("ok", fn(task))
        except BaseException as e:  # noqa: BLE001 - the parent re-raises it with this traceback
            answer = ("error", picklable(e), traceback.format_exc())
        try:
            send_message(conn, answer)
        except (BrokenPipeError, ConnectionResetError):
            return


def _describe_exit(code) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@contextlib.contextmanager
def _environ_defaults(values: dict):
    """Set the unset ones of ``values`` in os.environ (inherited by spawned children), then undo."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class OrderedWorkerPool:
    """``processes`` spawned workers that each run ``initializer(*initargs)`` and then ``fn`` on tasks.

    :meth:`imap` yields ``fn(task)`` in task order with at most ``depth`` tasks per worker in flight
    (which bounds memory). Use as a context manager: leaving it normally stops the workers; leaving it
    by an exception kills them.
    """

    def __init__(self, processes: int, fn: Callable, initializer: Callable | None = None, initargs: tuple = (),
                 depth: int = 4, name: str = "worker", env_defaults: dict | None = None):
        """``env_defaults``: environment variables the workers start with, where the user has not set them."""
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        ctx = mp.get_context("spawn")
        self.depth = depth
        self._conns, self._procs = [], []
        try:
            with _environ_defaults(env_defaults or {}):
                self._start(ctx, processes, fn, initializer, initargs, name)
        except BaseException:
            self.terminate()
            raise
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_tasks, name=f"{name}-sender", daemon=True)
        self._sender.start()

    def _start(self, ctx, processes, fn, initializer, initargs, name) -> None:
        for j in range(processes):
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, args=(child_end, fn, initializer, initargs),
                               name=f"{name}-{j}", daemon=True)
            proc.start()
            child_end.close()  # only the child holds its end: its death reads as EOF here
            self._conns.append(parent_end)
            self._procs.append(proc)

    def _send_tasks(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            j, task = item
            try:
                send_message(self._conns[j], task)
            except (OSError, ValueError):  # that worker died: imap says so when it waits for its answer
                pass

    def imap(self, tasks: Iterable) -> Iterator:
        """``fn(task)`` for each task, in order. A worker's exception is raised here, with the
        worker's traceback as its cause; a worker that dies raises :class:`WorkerDied`."""
        k = len(self._conns)
        waiting: collections.deque = collections.deque()
        for i, task in enumerate(tasks):
            self._tasks.put((i % k, task))
            waiting.append(i % k)
            if len(waiting) >= k * self.depth:
                yield self._answer(waiting.popleft())
        while waiting:
            yield self._answer(waiting.popleft())

    def _answer(self, j: int):
        try:
            answer = recv_message(self._conns[j])
        except (EOFError, OSError):
            proc = self._procs[j]
            proc.join(timeout=5)
            raise WorkerDied(f"{proc.name} (pid {proc.pid}) died with {_describe_exit(proc.exitcode)} before "
                             "answering (out of memory? a crashing decoder?)") from None
        if answer[0] == "ok":
            return answer[1]
        _, exc, tb = answer
        raise exc from RemoteTraceback(tb)

    def close(self) -> None:
        """Stop the workers after their current task and wait for them."""
        for j in range(len(self._conns)):
            self._tasks.put((j, None))
        self._tasks.put(None)
        self._sender.join(timeout=10)
        for proc in self._procs:
            proc.join(timeout=10)
        self.terminate()  # any that did not stop in time

    def terminate(self) -> None:
        """Kill the workers now."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
        if hasattr(self, "_tasks"):
            self._tasks.put(None)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> "OrderedWorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()
