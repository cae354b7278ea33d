"""The training entry point end to end: resume exactness, resharding, atomic checkpoints, launchers,
multi-node, bad flags. Real torchrun processes over gloo on the digits corpus."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_solo.netutil import free_port
from tests.conftest import ROOT

PY = sys.executable
ITERS = 6


def _common(data, out_dir, *extra, log_name="log.jsonl"):
    return ["--model", "tiny", "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1",
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--data-path", data["pretrain"], "--split", "98,2,0",
            "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1", "--seed", "7",
            "--tokenizer-model", data["tokenizer"], "--log-file", os.path.join(out_dir, log_name), *extra]


def _torchrun(nproc, args, launcher="torch.distributed.run", **popen):
    cmd = [PY, "-m", launcher, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_solo.train", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _run(nproc, args, timeout=400):
    p = _torchrun(nproc, args)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-6000:]
    return out


def _losses(log_file):
    out = {}
    with open(log_file) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "train":
                out[rec["iteration"]] = rec["lm loss"]
    return out


def _learning_rates(log_file):
    with open(log_file) as f:
        return {r["iteration"]: r["learning-rate"] for r in map(json.loads, f) if r["kind"] == "train"}


def _wait_for(condition, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the training log")


def test_resume_is_exact_after_ctrl_c_and_kill9_and_reshards(digits_data, tmp_path):
    tp2 = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
    # A: uninterrupted reference at TP=2.
    a = tmp_path / "a"
    a.mkdir()
    _run(2, _common(digits_data, str(a), *tp2))
    ref = _losses(a / "log.jsonl")
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert ref[ITERS] < ref[1] - 0.3, f"loss did not fall: {ref}"  # learning on a real corpus

    # B: Ctrl-C after iteration 2, through the launchers' torchrun (megatron_solo.training.torchrun): the
    # terminal's SIGINT reaches the agent only (its workers run in sessions of their own); the agent passes it
    # on, each worker saves at the end of the iteration and exits 0, and the run ends with the save line and
    # how to resume, exit 130, no traceback (torch.distributed.run itself ends in SignalException's).
    ck = tmp_path / "ckpt"
    b = tmp_path / "b"
    b.mkdir()
    p = _torchrun(2, _common(digits_data, str(b), *tp2, "--save", str(ck), "--exit-signal-handler"),
                  launcher="megatron_solo.training.torchrun")
    _wait_for(lambda: (b / "log.jsonl").exists() and 2 in _losses(b / "log.jsonl"), p)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=300)
    k = int(open(ck / "latest_checkpointed_iteration.txt").read())
    assert 2 <= k < ITERS
    assert p.returncode == 130 and out.strip().splitlines()[-3:] == [
        f"saved checkpoint at iteration {k} to {ck} (signal)", f"exiting at iteration {k} (signal)",
        f"stopped by SIGINT: run the same command again to resume from the last checkpoint in {ck}"], out[-4000:]
    assert "Traceback" not in out and "SignalException" not in out and "death signal" not in out, out[-4000:]
    assert max(map(len, out.splitlines())) <= 160, max(out.splitlines(), key=len)  # a 160-column terminal

    # C: resume, checkpoint every iteration, with an in-loop generation task every iteration (its greedy
    # decoding takes most of an iteration's time); kill -9 the whole process group during the evaluation
    # of iteration k+2 (trained and logged, not yet evaluated nor saved). Its losses are the reference's.
    c = tmp_path / "c"
    c.mkdir()
    task = c / "digits_gen.json"
    task.write_text(json.dumps({"kind": "exact_match", "data": os.path.join(digits_data["root"], "corpus", "test.jsonl"),
                                "prompt": "Which digit is this?", "limit": 8, "max_new_tokens": 16}))
    p = _torchrun(2, _common(digits_data, str(c), *tp2, "--save", str(ck), "--load", str(ck), "--save-interval", "1",
                             "--eval-tasks", str(task), "--eval-tasks-interval", "1"))
    tracker = ck / "latest_checkpointed_iteration.txt"

    def evaluating(log=c / "log.jsonl"):
        if not log.exists():
            return None
        records = [json.loads(line) for line in open(log) if line.endswith("\n")]
        trained = max((r["iteration"] for r in records if r["kind"] == "train"), default=0)
        evaluated = {r["iteration"] for r in records if r["kind"] == "eval"}
        return trained if trained >= k + 2 and trained not in evaluated else None

    _wait_for(lambda: evaluating() is not None, p)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    killed_at = evaluating()
    assert killed_at == k + 2 and int(tracker.read_text()) == k + 1  # killed inside that evaluation
    # A save that was cut short, and a tracker pointing at it, must not be picked up.
    last_complete = int(open(ck / "latest_checkpointed_iteration.txt").read())
    broken = ck / f"iter_{last_complete + 1:07d}"
    if not broken.exists():
        shutil.copytree(ck / f"iter_{last_complete:07d}", broken)
    (broken / "solo_checkpoint.json").unlink(missing_ok=True)
    (ck / "latest_checkpointed_iteration.txt").write_text(str(last_complete + 1))

    # D: resume to the end at the same layout, with another --lr: the checkpoint's schedule wins, said once.
    d = tmp_path / "d"
    d.mkdir()
    out = _run(2, _common(digits_data, str(d), *tp2, "--save", str(ck), "--load", str(ck), "--lr", "4e-3"))
    assert f"at iteration {last_complete}," in out, out[-3000:]
    # Start-up lines once for all ranks (issue 26.7), each rank's numbers as one range.
    assert out.count("world 2 = TP 2 x PP 1 x DP 1") == 1 and out.count("model tiny: ") == 1, out[:3000]
    assert "M parameters per rank (" in out and " GiB per rank" in out and "[rank 0]" not in out
    assert out.count("learning-rate schedule: the checkpoint's (--lr 0.002), not the flags' (--lr 0.004): add "
                     "--override-opt_param-scheduler to use the flags'") == 1, out[-3000:]
    resumed = {**_losses(b / "log.jsonl"), **_losses(c / "log.jsonl"), **_losses(d / "log.jsonl")}
    # Bitwise: the same data order, weights, optimizer and scheduler state as the uninterrupted run.
    assert {i: resumed[i] for i in ref} == ref
    assert json.loads((ck / f"iter_{ITERS:07d}" / "solo_checkpoint.json").read_text())["args"]["lr"] == 2e-3

    # F: from iteration k with --lr 4e-3 and --override-opt_param-scheduler: the flags' peak on the same
    # cosine (the uninterrupted run's rates rescaled), the optimizer state loaded (the first loss is the same).
    f = tmp_path / "f"
    f.mkdir()
    out = _run(2, _common(digits_data, str(f), *tp2, "--load", str(ck), "--ckpt-step", str(k), "--lr", "4e-3",
                          "--override-opt_param-scheduler"))
    assert out.count("learning-rate schedule: the flags' (--lr 0.004) replaces the checkpoint's (--lr 0.002)") == 1
    assert _losses(f / "log.jsonl")[k + 1] == ref[k + 1]
    ref_lr, new_lr = _learning_rates(a / "log.jsonl"), _learning_rates(f / "log.jsonl")
    assert sorted(new_lr) == list(range(k + 1, ITERS + 1))
    for i, lr in new_lr.items():
        assert (lr - 2e-4) / (4e-3 - 2e-4) == pytest.approx((ref_lr[i] - 2e-4) / (2e-3 - 2e-4), rel=1e-6), i

    # E: reshard TP=2 -> TP=1 PP=2 from the checkpoint at iteration k, continue to the end.
    e = tmp_path / "e"
    e.mkdir()
    out = _run(2, _common(digits_data, str(e), "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                          "--load", str(ck),
                          "--ckpt-step", str(k)))
    assert "RNG state restarts from the seed" in out
    resharded = _losses(e / "log.jsonl")
    assert sorted(resharded) == list(range(k + 1, ITERS + 1))
    for i, v in resharded.items():
        assert v == pytest.approx(ref[i], rel=1e-5, abs=1e-6), (i, v, ref[i])


def test_launchers_run_every_phase_in_tiny_mode(digits_data, tmp_path):
    env = dict(os.environ, PRESET="tiny", DATA_PATH=digits_data["pretrain"], TOKENIZER_MODEL=digits_data["tokenizer"],
               TRAIN_ITERS="2", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHON=PY,
               STAGE0_CKPT=str(tmp_path / "s0"), STAGE1_CKPT=str(tmp_path / "s1"), STAGE2_CKPT=str(tmp_path / "s2"),
               STAGE3_CKPT=str(tmp_path / "s3"), SFT_CKPT=str(tmp_path / "sft"))
    phases = [("stage0_align.sh", "s0", {}), ("stage1_pretrain.sh", "s1", {"FROM_STAGE0": "1"}),
              ("stage2_pretrain.sh", "s2", {"TP": "1", "PP": "2"}),
              ("stage3_anneal.sh", "s3", {}), ("sft.sh", "sft", {"DATA_PATH": digits_data["sft"]})]
    for script, ck, extra in phases:
        r = subprocess.run(["bash", f"examples/{script}"], cwd=ROOT, env=dict(env, MASTER_PORT=str(free_port()), **extra),
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, f"{script}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        assert (tmp_path / ck / "latest_checkpointed_iteration.txt").read_text() == "2"
        if script != "stage0_align.sh":  # stage 1 starts from stage 0 (FROM_STAGE0=1), weights only
            assert "weights only, --finetune" in r.stdout, r.stdout[-2000:]
        else:  # --freeze-lm: only the patch embedding (hidden 128 x 3072) trains
            assert "(0.39M trainable)" in r.stdout, r.stdout[-2000:]
    info = json.loads((tmp_path / "sft" / "iter_0000002" / "solo_checkpoint.json").read_text())
    assert info["args"]["loss_role"] == "assistant" and info["layout"]["tp"] == 2


def test_two_torchrun_agents_with_nnodes_2_train_together(digits_data, tmp_path):
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
               "-m", "megatron_solo.train",
               *_common(digits_data, str(tmp_path), "--tensor-model-parallel-size", "2", "--train-iters", "2",
                        log_name=f"log{node_rank}.jsonl")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "world 2 = TP 2 x PP 1 x DP 1" in outs[0] + outs[1]
    losses = _losses(tmp_path / "log1.jsonl")  # the last rank (node 1) logs
    assert sorted(losses) == [1, 2]


BAD_FLAGS = [
    (["--tensor-model-parallel-size", "3"], "world size 2 is not divisible by TP(3)"),
    (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--num-query-groups", "3",
      "--hidden-size", "96"], "does not divide the 3 attention heads"),
    (["--global-batch-size", "7"], "--global-batch-size 7 is not divisible"),
    (["--bf16", "--fp16"], "choose at most one of --bf16 and --fp16"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--context-parallel-size", "2"], "--context-parallel-size > 1 needs GPUs"),
    (["--finetune"], "--finetune needs --load"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], "does not divide the 3 layers"),
    (["--bf16", "--fp8-format", "hybrid"], "Transformer Engine"),
    (["--model", "llama-70b"], "unknown preset"),
    (["--min-lr", "1.0"], "--min-lr (1.0) is larger than --lr"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_flag_combinations_fail_with_one_line(extra, message, monkeypatch):
    from megatron_solo.training.arguments import ArgumentError, build_parser
    from megatron_solo.training.config import build_train_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = build_parser().parse_args(["--seq-length", "128", "--train-iters", "2", "--data-path", "x", *extra])
    with pytest.raises(ArgumentError) as exc:
        build_train_config(args)  # validate_args checks the flags, the config what needs a derived size
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_flags_exit_2_with_a_single_stderr_line(digits_data):
    env = dict(os.environ, PYTHONWARNINGS="ignore", WORLD_SIZE="2")
    r = subprocess.run([PY, "-m", "megatron_solo.train", "--seq-length", "128", "--train-iters", "2",
                        "--data-path", digits_data["pretrain"], "--global-batch-size", "3"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert lines == ["error: --global-batch-size 3 is not divisible by micro-batch-size (1) x data-parallel size (2)"]
    assert "Traceback" not in r.stderr
