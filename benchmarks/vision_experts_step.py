#!/usr/bin/env python
"""The CPU training step with ``--vision-experts full`` against the dense step, same tokens, one process.

    .venv/bin/python benchmarks/vision_experts_step.py [--seq-length 256 --micro-batch-size 4 --repeats 5] [--shape FLAGS]

dense    megatron_solo's real training step (``benchmarks/train_step.py``'s ``megatron_setup``: the Trainer's
         model chunks, megatron-core DDP, Adam, schedule, SOLO loss), the tiny preset.
full     the same with ``--vision-experts full``: image tokens through their own norms, QKV, output
         projection and MLP, gathered by modality and scattered back (model/vision_experts.py).

Both train on the same micro-batches: random text with an image block of ``--image-share`` of each row as
``<vpatch>`` tokens with random patches (the routing splits every layer's tokens in two groups). After
``--warmup`` steps each, ``--repeats`` timed windows alternate (ABAB, so machine noise hits both alike);
the medians of tokens/s and their ratio are printed (goal >= 0.85). Memory: the process's resident set
grows by what each model, its gradient buffer and its Adam state take; the growth of each (measured
around building it and its first steps) is printed beside what the expert parameters account for
(4 bytes of weight, 4 of gradient, 8 of Adam moments each, fp32).
"""

from __future__ import annotations

import sys

import psutil
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repository root, for benchmarks.train_step

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
from megatron_solo.spec import SOLO_IDS  # noqa: E402


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


def rss() -> int:
    return psutil.Process().memory_info().rss


def main(argv=None):
    from megatron_solo import quiet
    from megatron_solo.parameter_names import is_vision_expert_parameter

    quiet.filter_known_warnings()
    ap = timing_parser(__doc__)
    add_shape_flags(ap)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    common = trainer_flags(a)
    n_batches = 8
    steps, grown, experts = {}, {}, 0
    for name, extra in (("dense", []), ("full", ["--vision-experts", "full"])):
        before = rss()
        cfg, trainer = megatron_setup(common + extra)
        batches = with_images([random_batches(1, a.micro_batch_size, a.seq_length, cfg.model.padded_vocab_size,
                                              seed=i) for i in range(n_batches)], a.image_share)
        step = megatron_step_fn(trainer)
        for k in range(a.warmup):
            step(batches[k % n_batches])
        grown[name] = rss() - before
        steps[name] = (step, batches, trainer)
        if name == "full":
            experts = sum(p.numel() for n, p in trainer.model_chunks[0].module.named_parameters()
                          if is_vision_expert_parameter(n))
    tokens = a.micro_batch_size * a.seq_length * a.steps
    print(f"vision_experts_step: tiny {a.shape}, hidden {cfg.model.args.hidden_size}, seq {a.seq_length}, micro-batch {a.micro_batch_size}, "
          f"{a.image_share:.0%} <vpatch> tokens per row, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    tps, cps = alternate_windows(steps, ("dense", "full"), tokens, a)
    mib = 2**20
    print(f"\nmemory: resident set grew {grown['dense'] / mib:.1f} MiB (dense) and {grown['full'] / mib:.1f} MiB (full) "
          f"while each was built and ran {a.warmup} steps; difference {(grown['full'] - grown['dense']) / mib:.1f} MiB; "
          f"the {experts:,} expert parameters with fp32 gradient and Adam state account for {experts * 16 / mib:.1f} MiB")
    print_comparison(tps, cps, ("dense", "full"), a.steps, goal=0.85)
    from megatron_solo import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
