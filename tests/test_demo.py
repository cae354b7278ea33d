"""`make demo` end to end, shortened: examples/quickstart.sh with few iterations and a slice of the
held-out digits. Checks that every step ran through the real tools and launchers, that the export
verified, that the evaluation ran through HF generate, that every artifact is written, and that the
loss falls in both phases. (The accuracy target is the full demo's; see docs/DEMO.md.)"""

import json
import os
import subprocess
import sys

from megatron_solo.demo.plots import read_losses
from tests.conftest import ROOT


def test_quickstart_shortened_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PY=sys.executable, OUT=str(out), STAGE1_ITERS="12", SFT_ITERS="6", SFT_GBS="8",
               EVAL_LIMIT="48", PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    for step in ("[1/8]", "[2/8]", "[3/8]", "[4/8]", "[5/8]", "[6/8]", "[7/8]", "[8/8]", "== done in"):
        assert step in r.stdout, r.stdout[-3000:]

    # Training went through the launchers: 2 processes, TP=2, SFT started from stage 1's checkpoint.
    sft_log = (out / "logs" / "5_sft.log").read_text()
    assert "TP=2" in sft_log and "weights only, --finetune" in sft_log
    assert (out / "checkpoints" / "stage1" / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert (out / "checkpoints" / "sft" / "latest_checkpointed_iteration.txt").read_text() == "6"
    s1 = read_losses(out / "logs" / "stage1.jsonl")
    sft = read_losses(out / "logs" / "sft.jsonl")
    assert s1[0] == list(range(1, 13)) and sft[0] == list(range(1, 7))
    assert s1[1][-1] < s1[1][0] - 1.0, s1  # learning on the real corpus
    assert sft[1][-1] < sft[1][0] - 1.0, sft

    # The export verified against the checkpoint; the evaluation used it through generate.
    assert "verify: 40 tensors bit-identical" in (out / "logs" / "6_export.log").read_text()
    for f in ("config.json", "model.safetensors", "tokenizer.model", "modeling_solo.py", "processing_solo.py"):
        assert (out / "hf" / f).is_file(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["total"] == 48 and len(ev["predictions"]) == 48 and ev["chance"] == 0.1
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["hf_dir"] == str(out / "hf")
    # every digit got an answer: text, or a stop token (a barely tuned model may stop at once)
    assert all(p["output"] or p["stopped"] for p in ev["predictions"])
    assert 0 <= ev["stopped"] <= 48 and "answers ended by themselves" in r.stdout
    gen = json.loads((out / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 33030]  # generate stops at </s> or <|im_end|> by itself
    assert "held-out accuracy:" in r.stdout and "vs chance 10%" in r.stdout

    for png in ("loss_curves.png", "test_digits.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_quickstart_stops_with_the_failing_step_and_its_log(tmp_path):
    out = tmp_path / "demo"
    # A python that fails: the first step stops the demo, names itself and its log.
    env = dict(os.environ, PY="false", OUT=str(out))
    r = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "step 'tokenizer' failed" in r.stderr, r.stderr
    assert f"full log: {out / 'logs' / '1_tokenizer.log'}" in r.stderr
    assert "[2/8]" not in r.stdout


def test_quickstart_on_a_tiny_qwen3_base(tmp_path):
    """`BASE=qwen3 make demo`, cheapest form: a tiny random Qwen3ForCausalLM with Qwen3's real tokenizer.json,
    converted by the launcher (BASE_HF), trained from it with its own architecture (no --model: the trainer's
    default when it starts from a checkpoint),
    exported (verified) and asked through generate; the export keeps Qwen's tokenizer and stop ids."""
    out = tmp_path / "demo"
    env = dict(os.environ, PY=sys.executable, OUT=str(out), BASE="qwen3", STAGE1_ITERS="2", SFT_ITERS="1",
               DEMO_SEQ_LENGTH="64", DEMO_MBS="4", DEMO_GBS="8", SFT_GBS="8", EVAL_LIMIT="2", PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "tiny random qwen3 base" in r.stdout and "== done in" in r.stdout
    base = json.loads((out / "base" / "config.json").read_text())
    assert base["architectures"] == ["Qwen3ForCausalLM"] and base["vocab_size"] == 151669
    s1_log = (out / "logs" / "4_stage1.log").read_text()
    assert f"converting BASE_HF={out / 'base'}" in s1_log and "weights only, --finetune" in s1_log
    assert f"architecture: the checkpoint's in {out / 'checkpoints' / 'base'} (qwen3, 4 layers, hidden 128, " in s1_log
    assert (out / "checkpoints" / "base" / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "checkpoints" / "sft" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert "verify: logits max abs diff" in (out / "logs" / "6_export.log").read_text()
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["SoloQwen3ForCausalLM"] and cfg["vision_patch_token_id"] == 151669 + 1, cfg
    assert (out / "hf" / "tokenizer.json").is_file() and not (out / "hf" / "tokenizer.model").exists()
    gen = json.loads((out / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151643, 151645]  # <|endoftext|>, <|im_end|>: Qwen's own, reused by SOLO
    ev = json.loads((out / "eval.json").read_text())
    assert ev["total"] == 2 and all(p["output"] or p["stopped"] for p in ev["predictions"])

    # The launcher variable's mistakes: one error: line naming it, exit 2, before anything is converted.
    for extra, line in (({"BASE_HF": str(out / "base"), "INIT_CKPT": str(out / "checkpoints" / "base")},
                         "error: set BASE_HF or INIT_CKPT, not both (each chooses the checkpoint to start from)"),
                        ({"BASE_HF": str(out)}, f"error: BASE_HF={out}: not a Hugging Face model directory (no "
                                                "config.json); set BASE_HF")):
        e = dict(os.environ, PRESET="tiny", DATA_PATH="x", TOKENIZER_MODEL="y", BASE_CKPT=str(tmp_path / "no"),
                 STAGE1_CKPT=str(tmp_path / "s1"), **extra)
        r = subprocess.run(["bash", "examples/stage1_pretrain.sh"], cwd=ROOT, env=e, capture_output=True, text=True,
                           timeout=60)
        assert (r.returncode, r.stderr.strip()) == (2, line) and not (tmp_path / "no").exists()


def test_the_demo_shows_the_trainers_iteration_lines_as_progress(capsys, monkeypatch):
    """examples/demo_progress.awk (the demo's terminal view of a training log) on the lines the trainer's
    logger prints: an iteration's loss sits on a later line than its number since lines are cut to 160
    columns; the demo must still show iteration, loss and step time every ~10% of the run, and the
    validation loss. (Cut lines broke this once: the demo showed no progress at all.)"""
    from types import SimpleNamespace

    from megatron_solo.training.logger import TrainingLogger

    cfg = SimpleNamespace(schedule=SimpleNamespace(train_iters=20, global_batch_size=16, seq_length=128),
                          parallel=SimpleNamespace(world_size=2),
                          logging=SimpleNamespace(tensorboard_dir=None, log_file=None))
    log = TrainingLogger(cfg, is_logging_rank=True)
    for it in range(1, 21):
        # the window's step time (s), tokens/s, images/s and skipped steps: the DP all-reduce left out
        monkeypatch.setattr(log, "_throughput", lambda it=it: (it * 0.25, 100.0, 10.0, 0))
        log.iteration_line(iteration=it, consumed=16 * it, lr=1e-3, grad_norm=1.0, skipped_total=0,
                           losses={"lm loss": 10.0 / it, "image-doc loss": 10.0 / it})
    log.validation(20, "valid", {"lm loss": 0.75})
    printed = capsys.readouterr().out
    assert max(map(len, printed.splitlines())) <= 160 and "lm loss" not in printed.splitlines()[0]
    r = subprocess.run(["awk", "-v", "name=stage 1", "-f", "examples/demo_progress.awk"], cwd=ROOT, input=printed,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [f"   stage 1: iteration {it:3d}/20  loss {10.0 / it:.3f}  ({it * 0.25:.1f} s/it)"
                                     for it in (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)] + [
                                        "   stage 1: validation loss 0.750"]
