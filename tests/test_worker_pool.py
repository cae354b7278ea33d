"""megatron_solo.data.worker_pool: order, errors, dead workers, big payloads, orphaned workers."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_solo.data.worker_pool import OrderedWorkerPool, RemoteTraceback, WorkerDied

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# task functions: module level, so spawned workers can import them
def slow_square(x):
    time.sleep(0.05 if x % 3 == 0 else 0.0)  # later tasks finish first on the other worker
    return x * x


def remember(offset):
    global _OFFSET
    _OFFSET = offset


def add_offset(x):
    return x + _OFFSET


def fail_on_five(x):
    if x == 5:
        raise ValueError("five is not allowed")
    return x


def die_on_three(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.callback = lambda: None  # a lambda does not pickle


def raise_unpicklable(x):
    raise Unpicklable(f"task {x} failed")


def no_tokenizer():
    raise ValueError("tokenizer model not found")


def echo_reversed(data: bytes) -> bytes:
    return data[::-1]


def test_answers_in_task_order_after_initializer():
    with OrderedWorkerPool(2, slow_square, depth=2) as pool:
        assert list(pool.imap(range(40))) == [x * x for x in range(40)]
    with OrderedWorkerPool(3, add_offset, remember, (100,)) as pool:
        assert list(pool.imap(range(10))) == list(range(100, 110))


def test_worker_exception_is_raised_with_its_traceback():
    with pytest.raises(ValueError, match="five is not allowed") as info:
        with OrderedWorkerPool(2, fail_on_five) as pool:
            list(pool.imap(range(10)))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on_five" in str(info.value.__cause__)


def test_an_exception_that_does_not_pickle_keeps_its_type_and_message():
    with pytest.raises(RuntimeError, match=r"^Unpicklable: task 0 failed$"):
        with OrderedWorkerPool(1, raise_unpicklable) as pool:
            list(pool.imap(range(2)))


def test_failed_initializer_is_raised_in_the_parent():
    with pytest.raises(ValueError, match="tokenizer model not found") as info:
        with OrderedWorkerPool(2, slow_square, no_tokenizer) as pool:
            list(pool.imap(range(4)))
    assert "no_tokenizer" in str(info.value.__cause__)


def test_killed_worker_is_an_error_not_a_hang():
    t = time.time()
    with pytest.raises(WorkerDied, match="died with signal SIGKILL"):
        with OrderedWorkerPool(2, die_on_three) as pool:
            list(pool.imap(range(10)))
    assert time.time() - t < 60


def test_big_tasks_and_answers_do_not_deadlock():
    # 4 MB each way, more than a pipe holds: the sender thread keeps the caller from blocking
    payloads = [bytes([i]) * (4 << 20) + b"end" for i in range(12)]
    with OrderedWorkerPool(2, echo_reversed, depth=3) as pool:
        out = list(pool.imap(payloads))
    assert out == [p[::-1] for p in payloads]


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from megatron_solo.data.worker_pool import OrderedWorkerPool\n"
            "from tests.test_worker_pool import slow_square\n"
            "if __name__ == '__main__':\n"
            "    pool = OrderedWorkerPool(2, slow_square)\n"
            "    assert list(pool.imap(range(4))) == [0, 1, 4, 9]\n"
            "    print(' '.join(str(p.pid) for p in pool._procs), flush=True)\n"
            "    time.sleep(600)\n") % ROOT
    script = tmp_path / "parent.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in pids if _running(p)]
    assert not alive, f"workers {alive} outlived their killed parent"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
