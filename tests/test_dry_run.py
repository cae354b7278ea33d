"""The trainer's --dry-run (megatron_solo/training/dry_run.py): its per-rank parameter counts equal the real
model's, built by the trainer's own code in a real 4-rank gloo world, for several layouts; its total equals
the full TP=1 model's; frozen parameters get no gradients or optimizer state; the SOLO-7B recipe gives
Mistral-7B's exact count plus SOLO's additions, from the command line, ending with one JSON line."""

import json
import os
import subprocess
import sys

import pytest

from megatron_solo.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 4
BASE = ["--model", "tiny", "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--train-iters", "1", "--data-path", "none"]
LAYOUTS = {
    "tp2_pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "tp2_pp2_vpp2_sp": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--num-layers-per-virtual-pipeline-stage", "1", "--sequence-parallel"],
    "tp1_pp4": ["--pipeline-model-parallel-size", "4"],
    "tp2_dp2_distopt_bf16": ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--bf16"],
}


def _config(flags):
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config

    return build_train_config(build_parser().parse_args(BASE + flags))


def _real_counts(layouts):
    """Each rank: its parameters under every layout, built by the trainer (megatron-core DDP chunks);
    and the full TP=1 model's count at each layout's padded vocabulary."""
    from megatron_solo.convert.megatron_io import build_full_model
    from megatron_solo.parallel import initialize_model_parallel
    from megatron_solo.training.model_setup import build_trained_chunks

    out = {}
    for name, flags in layouts.items():
        cfg = _config(flags)
        initialize_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline)
        chunks = build_trained_chunks(cfg, cfg.transformer_config())
        out[name] = sum(p.numel() for c in chunks for p in c.module.parameters())
        full = build_full_model(cfg.model.args, cfg.model.padded_vocab_size)  # collective (its groups): every rank
        out[name + "/full"] = sum(p.numel() for p in full.parameters())
    return out


@pytest.fixture(scope="module")
def real():
    return run_distributed(_real_counts, WORLD, LAYOUTS, timeout=600)


@pytest.fixture
def world_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dry_run_counts_equal_the_real_model(real, world_env, layout):
    from megatron_solo.training.dry_run import plan

    cfg = _config(LAYOUTS[layout])
    p = plan(cfg)
    per_stage = WORLD // cfg.parallel.pipeline
    for rank in range(WORLD):
        assert p["stages"][rank // per_stage]["parameters"] == real[rank][layout], (layout, rank)
    assert p["parameters_total"] == real[0][layout + "/full"]
    m = cfg.model.args
    assert p["padding_parameters"] == 2 * (cfg.model.padded_vocab_size - m.vocab_size) * m.hidden_size


def test_dry_run_memory_terms(world_env):
    from megatron_solo.training.dry_run import plan

    # bf16 + distributed optimizer over DP=4 (TP=1): 2 + 4 + 12/4 bytes per parameter.
    p = plan(_config(["--bf16", "--use-distributed-optimizer"]))
    s = p["stages"][0]
    n, mem = s["parameters"], s["memory_bytes"]
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (2 * n, 4 * n, 12 * n / 4)
    # --freeze-lm: only the patch embedding (hidden x 3072) has gradients and optimizer state.
    p = plan(_config(["--bf16", "--freeze-lm"]))
    s = p["stages"][0]
    assert s["trainable_parameters"] == 128 * 3072
    assert s["memory_bytes"]["gradients"] == 4 * 128 * 3072 and s["memory_bytes"]["optimizer"] == 12 * 128 * 3072
    # Full recompute keeps less than no recompute.
    plain = plan(_config([]))["stages"][0]["memory_bytes"]["activations"]
    full = plan(_config(["--recompute-granularity", "full"]))["stages"][0]["memory_bytes"]["activations"]
    assert 0 < full < plain


def test_solo_7b_recipe_from_the_command_line():
    """The SOLO-7B recipe (TP=2 on 8 GPUs, seq 32768) in one CPU process: Mistral-7B's exact count plus
    SOLO's additions, and the padding counted apart."""
    args = ["--model", "solo-7b", "--tensor-model-parallel-size", "2", "--seq-length", "32768", "--bf16",
            "--use-distributed-optimizer", "--recompute-granularity", "full", "--global-batch-size", "128",
            "--train-iters", "1", "--data-path", "none", "--dry-run"]
    r = subprocess.run([sys.executable, "-m", "megatron_solo.train", *args], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ, WORLD_SIZE="8", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "= 7,262,760,960: matches" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["parameters_without_padding"] == 7_241_732_096 + 1031 * 4096 * 2 + 3072 * 4096
    assert summary["parameters_total"] == summary["parameters_without_padding"] + (33280 - 33031) * 4096 * 2
    assert len(summary["parameters_per_rank"]) == 1 and summary["memory_gib_per_rank"][0] > 0
    assert summary["step_seconds"] > 0 and summary["gpu"] == "H100" and summary["mfu"] == 0.45
