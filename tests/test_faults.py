"""A run that cannot hurt itself (megatron_solo/training/faults/): start-up input checks, one writer per
--save directory, workers that die with their torchrun agent, a data file changed under a running job, a
disk that fills up during a save. Cheap checks run in-process; each fault that needs real processes runs
torchrun over gloo on the digits corpus and asserts what remains on disk."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from megatron_solo import checkpoint
from megatron_solo.netutil import free_port
from megatron_solo.training import faults
from megatron_solo.training.faults import InputError, SaveDirLock
from tests.conftest import ROOT
from tests.test_training import _common, _losses, _torchrun, _wait_for

PY = sys.executable


def _copy_prefix(src_prefix, dst_dir, name="p"):
    os.makedirs(dst_dir, exist_ok=True)
    from megatron_solo.data.indexed import STORAGE_SUFFIXES, prefix_storage

    for n in STORAGE_SUFFIXES[prefix_storage(src_prefix)]:
        for ext in (".idx", ".bin"):
            shutil.copy(f"{src_prefix}-{n}{ext}", os.path.join(dst_dir, f"{name}-{n}{ext}"))
    return os.path.join(dst_dir, name)


def _cfg(monkeypatch, data, prefix, *extra):
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = build_parser().parse_args(["--model", "tiny", "--seq-length", "128", "--train-iters", "2",
                                      "--data-path", prefix, "--tokenizer-model", data["tokenizer"], *extra])
    return build_train_config(args)


def _input_error(cfg) -> str:
    with pytest.raises(InputError) as exc:
        faults.check_inputs(cfg)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------- start-up checks
def test_check_inputs_one_line_per_mistake(digits_data, tmp_path, monkeypatch):
    good = _copy_prefix(digits_data["pretrain"], str(tmp_path / "good"))
    faults.check_inputs(_cfg(monkeypatch, digits_data, good, "--save", str(tmp_path / "save")))  # all fine

    missing = str(tmp_path / "nope" / "p")
    assert f"the directory {tmp_path / 'nope'} does not exist" in _input_error(_cfg(monkeypatch, digits_data, missing))
    partial = _copy_prefix(digits_data["pretrain"], str(tmp_path / "partial"))
    os.remove(partial + "-roles.idx")
    assert "missing p-roles.idx (write it again" in _input_error(_cfg(monkeypatch, digits_data, partial))

    short = _copy_prefix(digits_data["pretrain"], str(tmp_path / "short"))
    size = os.path.getsize(short + "-images.bin")  # the digits prefixes use the default, encoded storage
    os.truncate(short + "-images.bin", size - 3072)
    msg = _input_error(_cfg(monkeypatch, digits_data, short))
    assert f"p-images.bin has {size - 3072} bytes, its index describes {size}" in msg

    bad_idx = _copy_prefix(digits_data["pretrain"], str(tmp_path / "badidx"))
    with open(bad_idx + "-roles.idx", "r+b") as f:
        f.write(b"GARBAGE!!")
    assert "p-roles.idx is not a readable megatron-core index" in _input_error(_cfg(monkeypatch, digits_data, bad_idx))

    mixed = _copy_prefix(digits_data["pretrain"], str(tmp_path / "mixed"))
    sft = digits_data["sft"]
    for ext in (".idx", ".bin"):
        shutil.copy(sft + "-roles" + ext, mixed + "-roles" + ext)
    assert "disagree on segments or packs" in _input_error(_cfg(monkeypatch, digits_data, mixed))

    foreign = _copy_prefix(digits_data["pretrain"], str(tmp_path / "foreign"))
    ids = np.memmap(foreign + "-tokens.bin", dtype=np.int32, mode="r+")
    ids[len(ids) // 2] = 128000  # a Llama-3 id: preprocessed with another tokenizer
    ids.flush()
    del ids
    from megatron_solo.spec import SOLO_VOCAB_SIZE

    msg = _input_error(_cfg(monkeypatch, digits_data, foreign))
    assert f"p-tokens.bin holds token id 128000, outside the {SOLO_VOCAB_SIZE}-piece SOLO vocabulary" in msg

    from megatron_solo.data.tokenizer import mistral_tokenizer_path

    args = ["--model", "tiny", "--seq-length", "128", "--train-iters", "2", "--data-path", good,
            "--tokenizer-model", mistral_tokenizer_path()]
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config

    msg = _input_error(build_train_config(build_parser().parse_args(args)))
    assert "32000 pieces, a SOLO tokenizer has" in msg

    not_dir = tmp_path / "a_file"
    not_dir.write_text("x")
    msg = _input_error(_cfg(monkeypatch, digits_data, good, "--save", str(not_dir / "save")))
    assert msg.startswith(f"--save {not_dir / 'save'} is not writable")


def test_load_with_another_model_shape_is_one_line(digits_data, tmp_path, monkeypatch):
    # A complete-looking checkpoint (the info file and metadata) of a wider model.
    it = tmp_path / "ck" / "iter_0000005"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    from dataclasses import asdict

    from megatron_solo.model.config import SoloModelArgs
    from megatron_solo.training.arguments import ArgumentError

    wide = asdict(SoloModelArgs.from_preset("tiny", hidden_size=256, kv_channels=64))
    (it / "solo_checkpoint.json").write_text(json.dumps({"iteration": 5, "consumed_train_samples": 40,
                                                         "model_args": wide, "padded_vocab_size": 33152}))
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ArgumentError) as e:  # --model tiny (_cfg) names a narrower preset
        _cfg(monkeypatch, digits_data, digits_data["pretrain"], "--load", str(tmp_path / "ck"))
    assert str(e.value).startswith(f"--model tiny builds a model with hidden_size 128, kv_channels 32, but --load "
                                   f"{tmp_path / 'ck'} holds hidden_size 256, kv_channels 64: drop --model tiny")


def test_entry_point_prints_one_line_on_rank_0_only(tmp_path):
    args = [PY, "-m", "megatron_solo.train", "--seq-length", "128", "--train-iters", "2",
            "--data-path", str(tmp_path / "missing")]
    expected = {"0": [f"error: --data-path {tmp_path / 'missing'}: no dataset has this prefix"], "1": []}
    runs = {rank: subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore", RANK=rank,
                                                            WORLD_SIZE="1"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in expected}  # side by side: each is a whole start-up of the trainer
    for rank, expect in expected.items():
        stdout, stderr = runs[rank].communicate(timeout=300)
        assert runs[rank].returncode == 2, stderr[-3000:]
        lines = [l for l in (stdout + stderr).splitlines() if l.strip()]
        assert len(lines) == len(expect) and all(l.startswith(e) for l, e in zip(lines, expect)), stderr
        assert "Traceback" not in stderr


_TORCHRUN_LOG = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ .*torch/distributed/")  # a line logged by torchrun's agent


def test_torchrun_by_hand_a_user_mistake_is_one_line_and_torchruns_root_cause(digits_data):
    """``torchrun --nproc-per-node 2 -m megatron_solo.train`` with a bad flag (a global batch size that DP=2
    does not divide; the data are real): the job's one ``error:`` line, printed by rank 0 only (rank 1 found
    the same and stays quiet), no worker traceback, and the last line from the workers. torchrun then always
    reports a failed worker with its own traceback and table (torch/distributed/launcher/api.py raises
    ChildFailedError for any non-zero exit): the worker records its line in torchrun's error file, so that
    table's root cause is the same line (not "To enable traceback see ..."), and a worker's exit code 2
    shows in it. (One run for both checks: each torchrun start-up costs ~25 s on 2 cores; the text of an
    input error, a missing data prefix, is checked by test_entry_point_prints_one_line_on_rank_0_only.)"""
    p = _torchrun(2, ["--model", "tiny", "--seq-length", "128", "--train-iters", "2",
                      "--data-path", digits_data["pretrain"], "--global-batch-size", "3"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    lines = out.splitlines()
    mine = [i for i, l in enumerate(lines) if l.startswith("error:")]
    assert [lines[i] for i in mine] == [
        "error: --global-batch-size 3 is not divisible by micro-batch-size (1) x data-parallel size (2)"], out[-4000:]
    report = next(i for i, l in enumerate(lines) if l.startswith("Traceback"))
    assert all(_TORCHRUN_LOG.match(l) for l in lines[mine[0] + 1:report]), out[-4000:]  # then torchrun only
    assert out.count("Traceback") == 1 and "ChildFailedError" in out[out.index("Traceback"):], out[-4000:]
    assert "exitcode  : 2 (pid" in out[out.index("Failures:"):], out[-4000:]  # a worker's own exit code
    root = out[out.index("Root Cause (first observed failure):"):]  # whichever rank torchrun saw end first
    assert f"traceback : {lines[mine[0]]}" in root, out[-4000:]


_WORKER = """
import sys
from megatron_solo import errors


@errors.entry_point
def main():
    if sys.argv[1] == "mistake":
        raise errors.InputError("--data-path nowhere: no such dataset")
    raise RuntimeError("a crash, not a mistake")


sys.exit(main())
"""


def test_the_launchers_torchrun_ends_a_user_mistake_with_its_line_and_keeps_a_crashs_report(tmp_path):
    """``python -m megatron_solo.training.torchrun`` (what the launchers start, torchrun's arguments): a worker's
    ``error:`` line is the last line of the job and its exit code the job's; a crash keeps torchrun's whole
    report (the worker's traceback, the agent's log line, ChildFailedError). Two workers of a script that
    only imports ``megatron_solo.errors``: the agent's handling is what is tested, cheaply."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    runs = {kind: subprocess.run([PY, "-m", "megatron_solo.training.torchrun", "--nproc-per-node", "2",
                                  "--master-port", str(free_port()), str(script), kind],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            for kind in ("mistake", "crash")}
    mistake = runs["mistake"]
    assert mistake.returncode == 2, mistake.stderr[-3000:]
    lines = [l for l in (mistake.stdout + mistake.stderr).splitlines() if l.strip()]
    assert lines[-1] == "error: --data-path nowhere: no such dataset", lines
    assert sum(l.startswith("error:") for l in lines) == 1 and "Traceback" not in mistake.stderr, lines
    crash = runs["crash"]
    assert crash.returncode == 1
    assert "RuntimeError: a crash, not a mistake" in crash.stderr and "failed (exitcode: 1)" in crash.stderr
    assert "ChildFailedError" in crash.stderr and "Root Cause (first observed failure)" in crash.stderr


# ------------------------------------------------------------------------------- the --save lock
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_save_dir_lock_live_stale_and_released(tmp_path):
    save = str(tmp_path / "save")
    a = SaveDirLock(save, heartbeat_s=0.2)
    a.acquire()
    rec = json.loads(open(os.path.join(save, faults.LOCK_NAME)).read())
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["owner"] == a.owner
    time.sleep(0.6)
    assert a.read()["heartbeat"] > rec["heartbeat"]  # refreshed while alive
    os.remove(os.path.join(save, faults.LOCK_NAME))  # removed by hand: the holder puts it back
    time.sleep(0.6)
    assert a.read()["owner"] == a.owner

    b = SaveDirLock(save)
    with pytest.raises(InputError) as exc:
        b.acquire()
    with pytest.raises(InputError):
        b.check_free()
    assert f"--save {save} is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in str(exc.value)
    a.release()
    assert not os.path.exists(os.path.join(save, faults.LOCK_NAME))

    # The holder died on this host: taken over at once, said out loud.
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "start_time": time.time(),
             "heartbeat": time.time(), "owner": "x"}
    with open(os.path.join(save, faults.LOCK_NAME), "w") as f:
        json.dump(stale, f)
    c = SaveDirLock(save)
    c.acquire()
    assert c.warning and "is gone" in c.warning and f"pid {stale['pid']}" in c.warning
    assert c.read()["owner"] == c.owner
    c.release()

    # Another host (its pid cannot be checked from here): live while its heartbeat advances, taken over
    # once it stops (a lost node, a job requeued elsewhere).
    remote = SaveDirLock(save, heartbeat_s=0.2)
    remote.record["host"] = "node-17"
    remote.acquire()
    with pytest.raises(InputError) as exc:
        SaveDirLock(save, stale_s=5).check_free()  # the launchers' pre-flight: read-only
    assert "in use by another run (pid" in str(exc.value) and "on node-17" in str(exc.value)
    remote._stop.set()  # the node is lost: no more heartbeats, the lock file stays
    remote._thread.join()
    t0 = time.time()
    d = SaveDirLock(save, stale_s=2)
    d.acquire()
    assert time.time() - t0 < 5 and d.warning and "on node-17" in d.warning, d.warning
    assert d.read()["owner"] == d.owner
    d.release()
    assert not os.path.exists(os.path.join(save, faults.LOCK_NAME))


# ------------------------------------------------------------------------------- real processes
def _descendants(pid):
    return psutil.Process(pid).children(recursive=True)


def _alive(proc) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_second_run_is_refused_and_workers_die_with_their_agent(digits_data, tmp_path):
    ck = tmp_path / "ckpt"
    a = _torchrun(2, _common(digits_data, str(tmp_path), "--save", str(ck), "--save-interval", "1",
                             "--train-iters", "200"))
    tracker = ck / checkpoint.TRACKER
    _wait_for(lambda: tracker.exists() and int(tracker.read_text() or 0) >= 1, a)
    holder = json.loads((ck / faults.LOCK_NAME).read_text())
    procs = _descendants(a.pid)  # the two workers and the checkpoint writer's helper processes
    assert holder["pid"] in {w.pid for w in procs} and len(procs) >= 2

    # A second job on the same --save stops at start-up, naming the holder; the first is untouched.
    b = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                        "--master-port", "0", "-m", "megatron_solo.train",
                        *_common(digits_data, str(tmp_path / "b"), "--save", str(ck))],
                       cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=200)
    assert b.returncode != 0
    errors = [l for l in b.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and f"is in use by another run (pid {holder['pid']} on " in errors[0], b.stderr[-3000:]
    assert f"traceback : {errors[0]}" in b.stderr, b.stderr[-3000:]  # torchrun's report names the same line
    assert json.loads((ck / faults.LOCK_NAME).read_text())["owner"] == holder["owner"]
    assert a.poll() is None and not (tmp_path / "b" / "log.jsonl").exists()

    # SIGKILL of the agent (an OOM killer, a lost node agent): every process it started exits, unsaved.
    os.kill(a.pid, signal.SIGKILL)
    t0 = time.time()
    while any(_alive(w) for w in procs) and time.time() - t0 < 15:
        time.sleep(0.2)
    assert not any(_alive(w) for w in procs), "processes outlived their torchrun agent by 15 s"
    out, _ = a.communicate(timeout=30)  # EOF: nothing holds the launcher's output open
    assert "torchrun agent" in out and "exits without saving" in out, out[-3000:]
    listing = sorted(os.listdir(ck))
    assert faults.LOCK_NAME not in listing  # released on the way out
    time.sleep(2)
    assert sorted(os.listdir(ck)) == listing  # nobody writes any more
    last = checkpoint.latest_iteration(str(ck))
    assert last is not None and int(tracker.read_text()) == last
    logged = max(_losses(tmp_path / "log.jsonl"))
    assert logged <= last + 1  # stopped within the iteration it was in


def test_data_file_truncated_during_the_run_is_named(digits_data, tmp_path):
    prefix = _copy_prefix(digits_data["pretrain"], str(tmp_path / "data"))
    data = dict(digits_data, pretrain=prefix)
    p = _torchrun(1, _common(data, str(tmp_path), "--train-iters", "200", "--global-batch-size", "2"))
    _wait_for(lambda: (tmp_path / "log.jsonl").exists() and 2 in _losses(tmp_path / "log.jsonl"), p)
    size = os.path.getsize(prefix + "-tokens.bin")
    os.truncate(prefix + "-tokens.bin", size // 2)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert f"error: data file {prefix}-tokens.bin was truncated during the run ({size} -> {size // 2} bytes)" in out, \
        out[-3000:]
    assert "Signal 7" not in out  # no SIGBUS from the memory map


def test_a_sample_read_checks_only_the_files_of_its_own_prefix(digits_data, tmp_path, monkeypatch):
    """Two prefixes blended by the project's builder: each read stats the data files of the prefix the
    sample comes from, once each, and none of the other's (a shard set of hundreds of prefixes costs what one
    does). The watched blend pickles (spawned DataLoader workers) and a changed file is named through a
    DataLoader worker."""
    import pickle

    from megatron_solo.data.dataset import build_train_valid_test_datasets
    from megatron_solo.data.loader import WorkerBatchStream
    from megatron_solo.training.faults.data_watch import DataFileError, _prefix_files

    monkeypatch.setenv("RANK", "0")  # megatron-core's builder asks (no process group here)
    a = _copy_prefix(digits_data["pretrain"], str(tmp_path / "a"))
    b = _copy_prefix(digits_data["pretrain"], str(tmp_path / "b"))
    train, _, _ = build_train_valid_test_datasets(f"1 {a} 1 {b}", split="1,0,0", seq_length=128, train_samples=16,
                                                  valid_samples=0, test_samples=0)
    valid, _, _ = build_train_valid_test_datasets(a, split="1,0,0", seq_length=128, train_samples=4,
                                                  valid_samples=0, test_samples=0)
    watched, [(_, watched_valid)] = faults.watch_data_files(train, [("valid", valid)])
    files = {p: set(_prefix_files(p)) for p in (a, b)}
    assert len(files[a]) == 8 and not files[a] & files[b]

    stats, real_stat = [], os.stat

    def counting_stat(path, *args, **kwargs):  # the real call, with the data files' paths recorded
        if os.fspath(path) in files[a] | files[b]:
            stats.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)

    def read(ds, i):
        stats.clear()
        sample = ds[i]
        return sample, list(stats)

    seen = set()
    for ds in (watched, pickle.loads(pickle.dumps(watched))):
        for i in range(len(ds)):
            sample, stated = read(ds, i)
            source = (a, b)[int(sample["dataset_id"])]
            assert sorted(stated) == sorted(files[source]), (i, source, stated)  # each once, the other's never
            seen.add(source)
    assert seen == {a, b}
    _, stated = read(watched_valid, 0)
    assert sorted(stated) == sorted(files[a])
    monkeypatch.setattr(os, "stat", real_stat)

    # b's tokens shrink: a's samples still read, b's are refused with the file's name, also in a worker.
    size = os.path.getsize(b + "-tokens.bin")
    os.truncate(b + "-tokens.bin", size // 2)
    ids = [int(x) for x in np.asarray(train.dataset_index)]
    watched[ids.index(0)]
    with pytest.raises(DataFileError, match=f"data file {b}-tokens.bin was truncated during the run"):
        watched[ids.index(1)]
    stream = WorkerBatchStream(watched, global_batch_size=16, micro_batch_size=16, num_microbatches=1, dp=1,
                               dp_rank=0, consumed=0, num_workers=1)
    try:
        with pytest.raises(DataFileError, match=f"data file {b}-tokens.bin was truncated during the run"):
            stream.global_step()
    finally:
        stream.close()


_ONE_LINE_SCRIPT = """
import os, sys, time
import torch.distributed as dist
from megatron_solo import errors
dist.init_process_group("gloo")
rank, scenario = dist.get_rank(), sys.argv[1]
if scenario == "both" or rank == 1:  # "both": every rank fails, rank 1 first; "one": rank 0 does not fail
    time.sleep(1.0 if rank == 0 else 0)
    errors.print_error_once(f"the fault as rank {rank} saw it")
    sys.exit(1)
time.sleep(errors.ONE_LINE_WAIT_S + 3)  # rank 0 busy elsewhere (in a collective), never raising
"""


def test_a_fault_raised_by_several_ranks_is_one_line():
    """Ranks meet in the process group's store: rank 0's line when it fails too (it holds the details),
    else the failing rank's; never two lines, and a quiet rank waits for the line before it exits."""
    from megatron_solo.netutil import free_port

    procs = {}
    for scenario in ("both", "one"):
        port = str(free_port())
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       PYTHONWARNINGS="ignore")
            procs[scenario, rank] = subprocess.Popen([PY, "-c", _ONE_LINE_SCRIPT, scenario], cwd=ROOT, env=env,
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[key] = [l for l in (stdout + stderr).splitlines() if l.startswith("error:")]
    assert out["both", 0] == ["error: the fault as rank 0 saw it"] and out["both", 1] == [], out
    assert out["one", 0] == [] and out["one", 1] == ["error: the fault as rank 1 saw it"], out


@pytest.fixture
def tiny_disk(tmp_path):
    """A real filesystem of a chosen size (tmpfs): writes beyond it fail with ENOSPC at the kernel."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")

    def resize(nbytes):
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(mnt)], check=True)

    yield mnt, resize
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_save_keeps_the_last_complete_checkpoint(digits_data, tmp_path, tiny_disk):
    mnt, resize = tiny_disk
    ck = mnt / "ckpt"
    args = _common(digits_data, str(tmp_path), "--save", str(ck), "--train-iters", "1")
    p = _torchrun(2, args)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    used = shutil.disk_usage(mnt).used
    # The disk now has room for half a checkpoint more: the next save fails midway.
    resize(used + used // 2)
    p = _torchrun(2, _common(digits_data, str(tmp_path), "--save", str(ck), "--load", str(ck), "--train-iters", "3",
                             "--save-interval", "1", log_name="log2.jsonl"))
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    errors = [l for l in out.splitlines() if l.startswith("error:")]  # every rank's save failed: one line
    assert len(errors) == 1 and errors[0].startswith("error: saving iteration 2"), out[-4000:]
    assert "No space left on device" in errors[0] and "the last complete checkpoint is iteration 1" in errors[0], \
        out[-4000:]
    assert (ck / checkpoint.TRACKER).read_text() == "1"
    assert checkpoint.latest_iteration(str(ck)) == 1
    assert not checkpoint.is_complete(str(ck / "iter_0000002"))
    assert 2 in _losses(tmp_path / "log2.jsonl")  # it trained; only the save failed
