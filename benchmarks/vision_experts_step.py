#!/usr/bin/env python
"""The CPU training step with ``--vision-experts full`` against the dense step, same tokens.

    .venv/bin/python benchmarks/vision_experts_step.py --threads 1 [--seq-length 256 --micro-batch-size 4 --repeats 5] [--shape FLAGS] [--profile]
    .venv/bin/python benchmarks/vision_experts_step.py --memory [--steps 4] [--shape FLAGS]

dense    megatron_solo's real training step (``benchmarks/train_step.py``'s ``megatron_setup``: the Trainer's
         model chunks, megatron-core DDP, Adam, schedule, SOLO loss), the tiny preset.
full     the same with ``--vision-experts full``: image tokens through their own norms, QKV, output
         projection and MLP, gathered by modality and scattered back (model/vision_experts.py).

Both train on the same micro-batches: random text with an image block of ``--image-share`` of each row as
``<vpatch>`` tokens with random patches (the routing splits every layer's tokens in two groups).

Speed (default): both models in one process; after ``--warmup`` steps each, ``--repeats`` timed windows
alternate (ABAB, so machine noise hits both alike); the medians of tokens/s and tokens per process
CPU-second, and their ratio, are printed (goal >= 0.85). ``--threads 1`` is the honest setting on a
shared machine: with two OpenMP threads every op waits at a barrier for a thread that another process
has descheduled, which charges each op, not each FLOP, and ``full`` has twice the ops per layer.

Memory (``--memory``): each model in its OWN fresh process (this script, re-run with ``--memory-side``),
same batches, ``--warmup + --steps`` steps; the peak resident set (``ru_maxrss``) above the set after
imports is printed per side, the difference beside the exact accounting of what the experts add: 16 bytes
per expert parameter (fp32 weight, gradient buffer, two Adam moments).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repository root, for benchmarks.train_step

from benchmarks.train_step import (  # noqa: E402
    megatron_setup,
    megatron_step_fn,
    random_batches,
    add_shape_flags,
    alternate_windows,
    print_comparison,
    profile_step,
    timing_parser,
    trainer_flags,
)
from megatron_solo.spec import SOLO_IDS  # noqa: E402

SIDES = (("dense", []), ("full", ["--vision-experts", "full"]))
N_BATCHES = 8


def with_images(batches, share: float, seed: int = 0):
    """Each row's first ``share`` of tokens become ``<vpatch>`` tokens with random uint8 patches."""
    g = torch.Generator().manual_seed(seed)
    for mb in batches:
        for b in mb:
            n = int(b["tokens"].size(1) * share)
            b["tokens"][:, :n] = SOLO_IDS.vision_patch
            b["patches"] = torch.randint(0, 256, (b["tokens"].size(0) * n, 3072), generator=g, dtype=torch.uint8)
            b["image_doc_mask"][:] = True
    return batches


def build_side(a, extra):
    """(config, trainer, the micro-batches, a step function) of one side."""
    cfg, trainer = megatron_setup(trainer_flags(a) + extra)
    batches = with_images([random_batches(1, a.micro_batch_size, a.seq_length, cfg.model.padded_vocab_size,
                                          seed=i) for i in range(N_BATCHES)], a.image_share)
    return cfg, trainer, batches, megatron_step_fn(trainer)


def parameter_counts(trainer) -> tuple[int, int]:
    """(all parameters, the vision experts' parameters) of this rank."""
    from megatron_solo.parameter_names import is_vision_expert_parameter

    named = list(trainer.model_chunks[0].module.named_parameters())
    return sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if is_vision_expert_parameter(n))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_side(a, name: str) -> dict:
    """One side in this (fresh) process: the peak resident set above the set after imports."""
    base = peak_rss_bytes()
    _, trainer, batches, step = build_side(a, dict(SIDES)[name])
    for k in range(a.warmup + a.steps):
        step(batches[k % N_BATCHES])
    params, experts = parameter_counts(trainer)
    return {"name": name, "base": base, "peak": peak_rss_bytes(), "params": params, "experts": experts}


def memory(a, argv) -> None:
    mib = 2**20
    sides = {}
    for name, _ in SIDES:  # each in its own process: no allocator reuse between the two models
        out = subprocess.run([sys.executable, __file__, *argv, "--memory-side", name], check=True,
                             capture_output=True, text=True).stdout
        sides[name] = json.loads(out.strip().splitlines()[-1])
    d, f = sides["dense"], sides["full"]
    grow = {k: (v["peak"] - v["base"]) / mib for k, v in sides.items()}
    accounted = 16 * f["experts"] / mib
    print(f"vision_experts_step --memory: tiny {a.shape}, seq {a.seq_length}, micro-batch {a.micro_batch_size}, "
          f"{a.image_share:.0%} <vpatch> tokens per row, {a.warmup + a.steps} steps per side, each side in its own process")
    for k, v in sides.items():
        print(f"  {k:5s}: {v['params']:,} parameters; resident set after imports {v['base'] / mib:.1f} MiB, "
              f"peak {v['peak'] / mib:.1f} MiB, growth {grow[k]:.1f} MiB")
    print(f"peak growth full - dense = {grow['full'] - grow['dense']:.1f} MiB; the {f['experts']:,} expert parameters "
          f"x 16 bytes (fp32 weight, gradient, Adam moments) = {accounted:.1f} MiB; "
          f"ratio measured / accounted = {(grow['full'] - grow['dense']) / accounted:.2f}")


def main(argv=None):
    from megatron_solo import quiet

    quiet.filter_known_warnings()
    ap = timing_parser(__doc__)
    add_shape_flags(ap)
    ap.add_argument("--memory", action="store_true", help="peak memory, each side in its own process")
    ap.add_argument("--memory-side", choices=[n for n, _ in SIDES], help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_side:
        print(json.dumps(memory_side(a, a.memory_side)))
        return 0
    if a.memory:
        memory(a, [x for x in argv if x != "--memory"])
        return 0
    steps = {}
    for name, extra in SIDES:
        cfg, trainer, batches, step = build_side(a, extra)
        for k in range(a.warmup):
            step(batches[k % N_BATCHES])
        steps[name] = (step, batches, trainer)
    print(f"vision_experts_step: tiny {a.shape}, hidden {cfg.model.args.hidden_size}, seq {a.seq_length}, micro-batch {a.micro_batch_size}, "
          f"{a.image_share:.0%} <vpatch> tokens per row, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    if a.profile:
        for name in ("dense", "full"):
            step, batches, _ = steps[name]
            profile_step(step, batches[:2], name)
    tps, cps = alternate_windows(steps, ("dense", "full"), a.micro_batch_size * a.seq_length * a.steps, a)
    print_comparison(tps, cps, ("dense", "full"), a.steps, goal=0.85)
    from megatron_solo import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
