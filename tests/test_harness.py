"""The multi-process harness itself: a failing rank's traceback reaches the test; a hung world times out."""

import os
import time

import pytest

from megatron_solo.testing.distributed import DistributedTestError, run_distributed


def _fail_on_rank1():
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank one is broken")
    return "ok"


def _hang_on_rank0():
    if int(os.environ["RANK"]) == 0:
        time.sleep(600)
    return os.environ["RANK"]


def _world_env():
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def _exit_hard_on_rank1():
    if int(os.environ["RANK"]) == 1:
        os._exit(3)
    time.sleep(600)


def test_ranks_get_torchrun_environment():
    envs = run_distributed(_world_env, 3, cpu_backend=False, timeout=120)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and envs[0]["MASTER_ADDR"] == "127.0.0.1"


def test_failing_rank_reports_its_traceback():
    with pytest.raises(DistributedTestError) as exc:
        run_distributed(_fail_on_rank1, 2, cpu_backend=False, timeout=120)
    msg = str(exc.value)
    assert "rank 1 failed" in msg
    assert "ValueError: rank one is broken" in msg and "_fail_on_rank1" in msg


def test_hung_world_times_out_and_names_the_hung_rank():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"timed out after 10s; ranks \[0\] never finished"):
        run_distributed(_hang_on_rank0, 2, cpu_backend=False, timeout=10)
    assert time.monotonic() - t0 < 15  # the hung rank was killed at the deadline, not waited for


def test_rank_dying_without_traceback_is_reported():
    with pytest.raises(DistributedTestError, match=r"rank 1 died with exit code 3"):
        run_distributed(_exit_hard_on_rank1, 2, cpu_backend=False, timeout=120)
