#!/usr/bin/env python
"""Loader throughput and memory against the training step's consumption, measured in the same run.

    .venv/bin/python benchmarks/loader.py [--samples 10000 --seq-length 256 --micro-batch-size 4]

Data: the demo's real corpora (scikit-learn digits written as PNG files, ``tools/make_digits_corpus.py``),
preprocessed with ``tools/preprocess_data.py`` into two packed prefixes (stage-1 style ``pretrain`` and
chat ``sft``) and blended ``0.7 pretrain 0.3 sft`` by megatron-core's ``BlendedDataset``
(``build_train_valid_test_datasets``, as training builds it).

loader       ``--samples`` samples read in training order through ``MicroBatchStream`` (the real
             ``SoloDataset.__getitem__`` + ``collate``), one process, as the training loop reads them;
             RSS (psutil) at the start, middle and end.
consumption  the tiny preset's real ``train_step`` (benchmarks/train_step.py's setup) on micro-batches
             of the same dataset, timed after warm-up.
The ratio loader samples/s : training samples/s is printed last (goal >= 10x).

    .venv/bin/python benchmarks/loader.py --photos [benchmarks/photo_loader.py's flags]

measures instead encoded vs patches image storage on real photos: loader patches/s per core against
what one H100 consumes training SOLO-7B at 45% MFU, and bytes on disk per image (benchmarks/photo_loader.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import psutil
import torch


def run(cmd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def build_data(work, seq_length):
    """Tokenizer, digits corpora and the two preprocessed prefixes (reused when already there)."""
    tok = os.path.join(work, "tokenizer", "tokenizer.model")
    if not os.path.exists(tok):
        run(["tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", os.path.dirname(tok)])
    corpus = os.path.join(work, "corpus")
    if not os.path.exists(os.path.join(corpus, "sft.jsonl")):
        run(["tools/make_digits_corpus.py", "--output", corpus])
    from megatron_solo.data.indexed import prefix_complete

    prefixes = {}
    for name, fmt in (("pretrain", "pretrain"), ("sft", "chat")):
        prefix = os.path.join(work, f"data_s{seq_length}", name)
        prefixes[name] = prefix
        if prefix_complete(prefix):
            continue
        run(["tools/preprocess_data.py", "--input", os.path.join(corpus, f"{name}.jsonl"), "--output-prefix", prefix,
             "--tokenizer-model", tok, "--format", fmt, "--seq-length", str(seq_length), "--image-root", corpus,
             "--no-progress"])
    return tok, prefixes


def rss_mib():
    return psutil.Process().memory_info().rss / 2**20


def main(argv=None):
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "bench_out", "loader"))
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=4, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--photos", action="store_true", help="run benchmarks/photo_loader.py (storage vs one GPU)")
    a, rest = ap.parse_known_args(argv)
    if a.photos:
        from photo_loader import main as photo_main

        return photo_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    t0 = time.perf_counter()
    tok, prefixes = build_data(a.work, a.seq_length)
    print(f"data: digits corpora preprocessed to seq {a.seq_length} ({time.perf_counter() - t0:.1f} s; "
          f"reused when already there): {prefixes}", flush=True)

    from train_step import megatron_setup, megatron_step_fn

    from megatron_solo.data import build_train_valid_test_datasets
    from megatron_solo.training.sampler import MicroBatchStream

    blend = f"0.7 {prefixes['pretrain']} 0.3 {prefixes['sft']}"
    train_argv = ["--model", "tiny", "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
                  "--global-batch-size", str(a.micro_batch_size), "--train-iters",
                  str(max(a.samples // a.micro_batch_size + 1, 8)), "--lr", "1e-4", "--min-lr", "1e-4",
                  "--lr-decay-style", "constant", "--data-path", *blend.split(), "--split", "1,0,0",
                  "--eval-iters", "0", "--tokenizer-model", tok]
    cfg, trainer = megatron_setup(train_argv)
    # As the trainer's build_datasets builds it, with test_samples=0: megatron-core's builder asserts on a
    # weighted blend whose test split size is None (what build_datasets passes with --eval-iters 0).
    train_ds, _, _ = build_train_valid_test_datasets(
        blend, split="1,0,0", seq_length=a.seq_length, train_samples=cfg.schedule.train_iters * cfg.schedule.global_batch_size,
        valid_samples=0, test_samples=0, seed=cfg.data.seed, loss_role=cfg.data.loss_role)
    print(f"blend: {type(train_ds).__name__} of {len(train_ds)} samples over {len(prefixes)} prefixes", flush=True)

    # ---- loader: --samples samples through MicroBatchStream (dataset __getitem__ + collate)
    stream = MicroBatchStream(train_ds, cfg.schedule, consumed=0)
    n_steps = a.samples // a.micro_batch_size
    rss = {"start": rss_mib()}
    real_tokens = patches = images = 0
    t0 = time.perf_counter()
    for k in range(n_steps):
        for b in stream.global_step():
            real_tokens += int((b["tokens"] != 0).sum())
            patches += b["patches"].shape[0]
        if k == n_steps // 2:
            rss["middle"] = rss_mib()
    dt = time.perf_counter() - t0
    rss["end"] = rss_mib()
    n = n_steps * a.micro_batch_size
    load_sps = n / dt
    print(f"loader: {n} samples in {dt:.2f} s = {load_sps:.0f} samples/s, {load_sps * a.seq_length:.0f} tokens/s "
          f"(non-padding {real_tokens / dt:.0f} tokens/s, {patches / dt:.0f} patches/s)")
    print(f"loader RSS: start {rss['start']:.0f} MiB, middle {rss['middle']:.0f} MiB, end {rss['end']:.0f} MiB "
          f"(end - start {rss['end'] - rss['start']:+.1f} MiB)", flush=True)

    # ---- consumption: the real training step on batches of the same dataset
    step = megatron_step_fn(trainer)
    stream = MicroBatchStream(train_ds, cfg.schedule, consumed=0)
    batches = [stream.global_step() for _ in range(a.train_steps + 2)]
    for b in batches[:2]:
        step(b)
    times = []
    for b in batches[2:]:
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    train_sps = a.micro_batch_size / statistics.median(times)
    print(f"training step (tiny, seq {a.seq_length}, micro-batch {a.micro_batch_size}, {torch.get_num_threads()} "
          f"threads): median {statistics.median(times):.3f} s/step = {train_sps:.2f} samples/s, "
          f"{train_sps * a.seq_length:.0f} tokens/s")
    print(f"\nRATIO loader / training consumption = {load_sps / train_sps:.1f}x (goal >= 10x); "
          f"RSS growth over {n} samples {rss['end'] - rss['start']:+.1f} MiB")
    from megatron_solo import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
