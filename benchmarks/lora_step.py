#!/usr/bin/env python
"""The CPU training step with LoRA adapters against the full step, same tokens, one process.

    .venv/bin/python benchmarks/lora_step.py [--seq-length 256 --micro-batch-size 4 --repeats 5] [--rank 16]
        [--shape FLAGS]

full     megatron_solo's real training step (``benchmarks/train_step.py``'s ``megatron_setup``: the Trainer's
         model chunks, megatron-core DDP, Adam, schedule, SOLO loss), the tiny preset, every weight trained.
lora     the same model, started from the full model's weights (saved once, loaded with ``--finetune``),
         with ``--lora-rank`` adapters on every target (attention QKV and output, MLP in and out, the patch
         embedding): the base frozen, no weight gradients, gradient buffer or Adam state for it.

Both train on the same micro-batches (random text with an image block of ``--image-share`` of each row).
After ``--warmup`` steps each, ``--repeats`` timed windows alternate (ABAB, so machine noise hits both
alike); the medians of tokens/s and their ratio are printed (goal >= 1.0), and the same per process
CPU-second (steadier on a shared machine).
"""

from __future__ import annotations

import sys
import tempfile

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repository root, for benchmarks.*

from benchmarks.train_step import (  # noqa: E402
    megatron_setup,
    megatron_step_fn,
    random_batches,
    add_shape_flags,
    alternate_windows,
    print_comparison,
    timing_parser,
    trainer_flags,
)
from benchmarks.vision_experts_step import with_images  # noqa: E402

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "vision_patch_embed"]


def main(argv=None):
    from megatron_solo import checkpoint, quiet

    quiet.filter_known_warnings()
    ap = timing_parser(__doc__)
    ap.add_argument("--rank", type=int, default=16, help="--lora-rank")
    add_shape_flags(ap)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    common = trainer_flags(a)
    n_batches = 8
    work = tempfile.mkdtemp(prefix="lora_step_")
    steps, trainable = {}, {}
    for name in ("full", "lora"):
        extra = [] if name == "full" else ["--load", work, "--finetune", "--lora-rank", str(a.rank), "--lora-alpha",
                                           str(2 * a.rank), "--lora-targets", *TARGETS]
        cfg, trainer = megatron_setup(common + extra)
        if name == "full":  # the base the adapters start on: the full model's own weights
            checkpoint.save_checkpoint(work, 0, trainer.model_chunks, model_args=cfg.model.args,
                                       padded_vocab_size=cfg.model.padded_vocab_size)
        else:
            trainer.checkpointer.load_start_state()
        batches = with_images([random_batches(1, a.micro_batch_size, a.seq_length, cfg.model.padded_vocab_size,
                                              seed=i) for i in range(n_batches)], a.image_share)
        step = megatron_step_fn(trainer)
        for k in range(a.warmup):
            step(batches[k % n_batches])
        trainable[name] = sum(p.numel() for c in trainer.model_chunks for p in c.module.parameters() if p.requires_grad)
        steps[name] = (step, batches, trainer)
    tokens = a.micro_batch_size * a.seq_length * a.steps
    print(f"lora_step: tiny {a.shape}, hidden {cfg.model.args.hidden_size}, seq {a.seq_length}, micro-batch "
          f"{a.micro_batch_size}, {a.image_share:.0%} <vpatch> tokens per row, rank {a.rank} on {' '.join(TARGETS)}; "
          f"trainable parameters: full {trainable['full']:,}, lora {trainable['lora']:,}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    tps, cps = alternate_windows(steps, ("full", "lora"), tokens, a)
    print_comparison(tps, cps, ("full", "lora"), a.steps, goal=1.0)
    import shutil

    from megatron_solo import parallel

    shutil.rmtree(work, ignore_errors=True)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
