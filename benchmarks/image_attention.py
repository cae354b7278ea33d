#!/usr/bin/env python
"""The CPU training step with ``--image-attention bidirectional`` against ``causal``, and the mask's share.

    .venv/bin/python benchmarks/image_attention.py [--seq-length 2048 --images 4 --repeats 15]
        [--attention-backend dot_product|sdpa_flex] [--threads 1] [--profile]

One Trainer (the tiny preset, flags parsed as ``python -m megatron_solo.train`` parses them, megatron-core's
real ``train_step``) trains on packs of ``--seq-length`` tokens with ``--images`` images per pack (two
documents per row, text between the images, 12 x 16 patches each with row separators). The two sides
differ only in the run's forward step: ``make_forward_step`` of the run's config with SOLO's
``image_attention`` (causal) or with ``bidirectional`` (same weights, same batches, same attention
backend). After ``--warmup`` steps each, ``--repeats`` windows of ``--steps`` steps alternate (ABAB, so
machine noise hits both alike; ``train_step.alternate_windows``); printed: the medians of tokens/s, of
tokens per process CPU-second (the steadier measure on a shared machine: time spent waiting for a core
is not counted) and the median of the per-window ratios.

The mask's share, wall and process CPU time, medians: what a step spends on the mask outside the
attention kernels. ``model_forward_kwargs`` (the [b, 1, s, s] boolean mask with the image blocks, or
FlexAttention's [b, s] / [2, b, s] integer ids; plus, separately, the [3, b, s] mrope positions) and, on
``sdpa_flex``, the dense mask its CPU training fallback makes from those ids
(``SDPAFlexAttention._dense_allowed``, once per step: the layers share it), as a share of the median step.
``--profile`` adds a torch.profiler table of one step of each side.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.train_step import (  # noqa: E402
    alternate_windows,
    megatron_setup,
    megatron_step_fn,
    print_comparison,
    profile_step,
    timing_parser,
)

SIDES = ("causal", "bidirectional")


def image_row(seq, images, g, rows=12, cols=16):
    """(tokens, doc lengths, patch coords) of one row: two documents, ``images // 2`` images each (SOLO's
    layout, row separators), random text between."""
    from megatron_solo.spec import SOLO_IDS as T

    block = [T.vision_start]
    coords = []
    for r in range(rows):
        block += [T.vision_patch] * cols + ([T.vision_row_sep] if r < rows - 1 else [])
        coords += [(r, c) for c in range(cols)]
    block.append(T.vision_end)
    toks, lengths, all_coords = [], [], []
    for _doc in range(2):
        per = images // 2
        text = seq // 2 - per * len(block) - 1
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
    lengths.append(seq - len(toks))  # the padding (0 when the documents fill the row)
    return toks + [0] * (seq - len(toks)), lengths, all_coords


def image_packs(n, seq, images, mbs=1, seed=0):
    """``n`` micro-batches of ``mbs`` rows of :func:`image_row` in the contract of docs/ARCHITECTURE.md."""
    from megatron_solo.model.batch import position_ids_from_doc_lengths
    from megatron_solo.spec import SOLO_IDS as T

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = [image_row(seq, images, g) for _ in range(mbs)]
        tokens = torch.tensor([r[0] for r in rows])
        doc_lengths = torch.tensor([r[1] for r in rows], dtype=torch.int32)
        labels = torch.roll(tokens, -1, 1)
        mask = ((tokens != 0) & (labels < 32000)).float()
        mask[:, -1] = 0
        n_patch = int((tokens == T.vision_patch).sum())
        out.append({"tokens": tokens, "labels": labels * mask.long(), "loss_mask": mask,
                    "position_ids": position_ids_from_doc_lengths(doc_lengths, seq), "doc_lengths": doc_lengths,
                    "image_doc_mask": torch.ones(mbs, seq, dtype=torch.bool),
                    "patches": torch.randint(0, 256, (n_patch, 3072), generator=g, dtype=torch.uint8),
                    "patch_coords": torch.tensor([c for r in rows for c in r[2]], dtype=torch.long)})
    return out


def median_cost(fn, repeats=7):
    """Medians of (wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def mask_builders(cfg, trainer, model_args):
    """name -> function(batch): the mask work of one step outside the attention kernels (module docstring)."""
    from megatron_solo.model import model_forward_kwargs
    from megatron_solo.model.attention import SDPAFlexAttention

    config = trainer.model_config
    flex = cfg.model.attention_backend == "sdpa_flex"
    core = next((m for m in trainer.model_chunks[0].modules() if isinstance(m, SDPAFlexAttention)), None)

    def build(args):
        def fn(batch):
            mask = model_forward_kwargs(batch, config, document_ids_mask=flex, model_args=args)["attention_mask"]
            if core is not None:  # the CPU training fallback's dense form of the ids
                s = batch["tokens"].size(1)
                core._dense_allowed(mask, batch["tokens"].size(0), s, s, mask.device)
        return fn

    mrope = dataclasses.replace(cfg.model.args, image_positions="mrope")
    return {"causal mask": (build(model_args["causal"]), "causal"),
            "bidirectional mask": (build(model_args["bidirectional"]), "bidirectional"),
            "mrope positions (+ causal mask)": (build(mrope), "causal")}


def main(argv=None):
    from megatron_solo import quiet

    quiet.filter_known_warnings()
    ap = timing_parser(__doc__)
    ap.set_defaults(seq_length=2048, micro_batch_size=1, warmup=1, steps=1, repeats=15)
    ap.add_argument("--images", type=int, default=4, help="images per pack (even: two documents)")
    ap.add_argument("--attention-backend", default="dot_product", choices=["dot_product", "sdpa_flex"])
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from megatron_solo.training.trainer import make_forward_step

    mbs = a.micro_batch_size
    cfg, trainer = megatron_setup(
        ["--model", "tiny", "--seq-length", str(a.seq_length), "--micro-batch-size", str(mbs),
         "--global-batch-size", str(mbs), "--train-iters", "1000000", "--lr", "1e-4", "--min-lr", "1e-4",
         "--lr-decay-style", "constant", "--data-path", "unused", "--attention-backend", a.attention_backend,
         "--transformer-impl", "local"])
    model_args = {"causal": cfg.model.args,
                  "bidirectional": dataclasses.replace(cfg.model.args, image_attention="bidirectional")}
    step = megatron_step_fn(trainer)
    batches = image_packs(4, a.seq_length, a.images, mbs)

    def side_step(side):
        forward_step = make_forward_step(dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, args=model_args[side])), trainer.model_config)

        def run(micro_batch):
            trainer.forward_step = forward_step
            return step([micro_batch])
        return run

    steps = {side: (side_step(side), batches) for side in SIDES}
    for side in SIDES:
        for k in range(a.warmup):
            steps[side][0](batches[k % len(batches)])

    from megatron_solo.spec import SOLO_IDS

    n_img = int((batches[0]["tokens"] == SOLO_IDS.vision_start).sum()) // mbs
    print(f"image_attention: seq {a.seq_length}, micro-batch {mbs}, {n_img} images per pack (12 x 16 patches), "
          f"tiny preset, backend {a.attention_backend}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.repeats} windows of {a.steps} step(s) per side (ABAB)", flush=True)
    tps, cps = alternate_windows(steps, SIDES, mbs * a.seq_length * a.steps, a)
    print_comparison(tps, cps, SIDES, a.steps, goal=0.8)

    med_wall = {side: mbs * a.seq_length / statistics.median(tps[side]) for side in SIDES}
    med_cpu = {side: mbs * a.seq_length / statistics.median(cps[side]) for side in SIDES}
    for name, (fn, side) in mask_builders(cfg, trainer, model_args).items():
        wall, cpu = median_cost(lambda: fn(batches[0]))
        print(f"  building the {name}: {wall * 1e3:.1f} ms wall = {100 * wall / med_wall[side]:.2f}% of the {side} "
              f"step; {cpu * 1e3:.1f} ms CPU = {100 * cpu / med_cpu[side]:.2f}% of its CPU time")
    if a.profile:
        for side in SIDES:
            profile_step(steps[side][0], batches[:1], f"{side} step")


if __name__ == "__main__":
    main()
