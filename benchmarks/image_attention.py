#!/usr/bin/env python
"""The CPU training step with ``--image-attention bidirectional`` against ``causal``, and the mask's share.

    .venv/bin/python benchmarks/image_attention.py [--seq-length 2048 --images 4 --repeats 5]
        [--attention-backend dot_product|sdpa_flex]

One Trainer (the tiny preset, flags parsed as ``python -m megatron_solo.train`` parses them, megatron-core's
real ``train_step``) trains on packs of ``--seq-length`` tokens with ``--images`` images per pack (two
documents per row, text between the images, 12 x 16 patches each with row separators). The two sides
differ only in the run's forward step: ``make_forward_step`` of the run's config with SOLO's
``image_attention`` (causal) or with ``bidirectional`` (same weights, same batches, same attention
backend). After ``--warmup`` steps each, ``--repeats`` windows alternate (ABAB, so machine noise hits both
alike); the medians of the step time and their ratio are printed.

The mask's share: ``model_forward_kwargs`` (the [b, 1, s, s] mask with the image blocks, or FlexAttention's
[2, b, s] ids; plus, separately, the [3, b, s] mrope positions) timed alone on the same batches, median,
as a share of the median step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.train_step import megatron_setup, megatron_step_fn  # noqa: E402


def image_packs(n, seq, images, seed=0, rows=12, cols=16):
    """``n`` micro-batches of one row: two documents, ``images // 2`` images each, random text between."""
    from megatron_solo.model.batch import position_ids_from_doc_lengths
    from megatron_solo.spec import SOLO_IDS as T

    g = torch.Generator().manual_seed(seed)
    block = [T.vision_start]
    coords = []
    for r in range(rows):
        block += [T.vision_patch] * cols + ([T.vision_row_sep] if r < rows - 1 else [])
        coords += [(r, c) for c in range(cols)]
    block.append(T.vision_end)
    out = []
    for _ in range(n):
        half = seq // 2
        toks, lengths, all_coords = [], [], []
        for _doc in range(2):
            per = images // 2
            text = half - per * len(block) - 1
            assert text > per, "too many images for the sequence"
            cuts = sorted(torch.randperm(text, generator=g)[:per].tolist())
            words = torch.randint(3, 32000, (text,), generator=g).tolist()
            doc, prev = [T.bos], 0
            for c in cuts:
                doc += words[prev:c] + block
                all_coords += coords
                prev = c
            doc += words[prev:]
            toks += doc
            lengths.append(len(doc))
        tokens = torch.tensor([toks + [0] * (seq - len(toks))])
        if len(toks) < seq:
            lengths.append(seq - len(toks))
        doc_lengths = torch.tensor([lengths], dtype=torch.int32)
        labels = torch.roll(tokens, -1, 1)
        mask = ((tokens != 0) & (labels < 32000)).float()
        mask[:, -1] = 0
        n_patch = int((tokens == T.vision_patch).sum())
        out.append({"tokens": tokens, "labels": labels * mask.long(), "loss_mask": mask,
                    "position_ids": position_ids_from_doc_lengths(doc_lengths, seq), "doc_lengths": doc_lengths,
                    "image_doc_mask": torch.ones(1, seq, dtype=torch.bool),
                    "patches": torch.randint(0, 256, (n_patch, 3072), generator=g, dtype=torch.uint8),
                    "patch_coords": torch.tensor(all_coords, dtype=torch.long)})
    return out


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--images", type=int, default=4, help="images per pack (even: two documents)")
    ap.add_argument("--attention-backend", default="dot_product", choices=["dot_product", "sdpa_flex"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed windows per side (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from megatron_solo.model import model_forward_kwargs
    from megatron_solo.training.trainer import make_forward_step

    cfg, trainer = megatron_setup(
        ["--model", "tiny", "--seq-length", str(a.seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
         "--train-iters", "1000000", "--lr", "1e-4", "--min-lr", "1e-4", "--lr-decay-style", "constant",
         "--data-path", "unused", "--attention-backend", a.attention_backend, "--transformer-impl", "local"])
    args = {"causal": cfg.model.args,
            "bidirectional": dataclasses.replace(cfg.model.args, image_attention="bidirectional")}
    steps = {k: make_forward_step(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, args=m)),
                                  trainer.model_config) for k, m in args.items()}
    step = megatron_step_fn(trainer)
    batches = image_packs(4, a.seq_length, a.images)
    k = iter(range(10 ** 9))

    def run(side):
        trainer.forward_step = steps[side]
        return step([batches[next(k) % len(batches)]])

    for side in steps:
        for _ in range(a.warmup):
            run(side)
    times = {side: [] for side in steps}
    for _ in range(a.repeats):
        for side in steps:
            t = time.perf_counter()
            run(side)
            times[side].append(time.perf_counter() - t)
    med = {side: statistics.median(v) for side, v in times.items()}

    config = trainer.model_config
    flex = a.attention_backend == "sdpa_flex"
    mrope = dataclasses.replace(cfg.model.args, image_positions="mrope")
    build = {
        "causal mask": lambda b: model_forward_kwargs(b, config, document_ids_mask=flex, model_args=args["causal"]),
        "bidirectional mask": lambda b: model_forward_kwargs(b, config, document_ids_mask=flex,
                                                             model_args=args["bidirectional"]),
        "mrope positions (+ causal mask)": lambda b: model_forward_kwargs(b, config, document_ids_mask=flex,
                                                                          model_args=mrope),
    }
    cost = {name: median_seconds(lambda: fn(batches[0]), 7) for name, fn in build.items()}

    n_img = int((batches[0]["tokens"] == 32000).sum())
    print(f"seq {a.seq_length}, {n_img} images per pack (12 x 16 patches), tiny preset, backend {a.attention_backend}, "
          f"{torch.get_num_threads()} threads, {a.repeats} windows of 1 step per side (ABAB), medians")
    for side in steps:
        print(f"  {side:14s} step {med[side]:.3f} s  ({a.seq_length / med[side]:,.0f} tokens/s)")
    print(f"  speed bidirectional / causal: {med['causal'] / med['bidirectional']:.3f}x")
    for name, c in cost.items():
        side = "bidirectional" if name.startswith("bidirectional") else "causal"
        print(f"  building the {name}: {c * 1e3:.1f} ms = {100 * c / med[side]:.2f}% of the {side} step")


if __name__ == "__main__":
    main()
