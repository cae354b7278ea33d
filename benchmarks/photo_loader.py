#!/usr/bin/env python
"""Encoded vs patches storage on real photos: loader patches/s per core against one GPU's consumption.

    .venv/bin/python benchmarks/photo_loader.py [--docs 240 --samples 60 --seq-length 32768]

Corpus: sklearn's two real photos (china.jpg, flower.jpg) resized to 320x213, 640x427, 1024x683 and
2048x1365 (the last is resized to 1024 by SOLO's rule), saved as JPEG quality 90, one per document with a
caption, preprocessed with ``tools/preprocess_data.py``'s pipeline into one ``encoded`` and one ``patches``
prefix packed to ``--seq-length``.

loader    ``--samples`` samples through ``SoloDataset.__getitem__`` + ``collate`` (training's read path)
          in this one process, torch limited to one thread: patches per second per loader core.
          Encoded storage decodes, resizes and patchifies every image here; patches storage copies.
          Also the same through a ``torch.utils.data.DataLoader`` with ``--num-workers`` workers
          (``WorkerBatchStream``, training's ``--num-workers`` path).
GPU       SOLO-7B (``solo-7b`` preset) at ``--mfu`` (0.45) of an H100's 989.4 dense bf16 TFLOP/s, FLOPs per
          token from ``training/flops.py`` at ``--seq-length``; patches/s = tokens/s x the corpus's
          ``<vpatch>`` share of tokens.
Printed last: loader patches/s per core / GPU patches/s (goal >= 2) and bytes on disk per image of both
storages (goal: encoded <= 1/5 of patches).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

H100_BF16_DENSE_FLOPS = 989.4e12
SIZES = ((320, 213), (640, 427), (1024, 683), (2048, 1365))


def make_photo_corpus(path: str, n: int) -> list[int]:
    """n chat-JSONL documents, one JPEG photo each (data URL); returns the JPEG sizes in bytes."""
    import base64

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    jpegs = []
    for size in SIZES:
        for p in photos:
            buf = io.BytesIO()
            p.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
    sizes = []
    with open(path, "w") as f:
        for i in range(n):
            data = jpegs[i % len(jpegs)]
            sizes.append(len(data))
            url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
            f.write(json.dumps([{"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": f"Photo {i}: a temple in China, or a flower, at one of four sizes."}]}]) + "\n")
    return sizes


def gpu_patches_per_s(seq_length: int, patch_share: float, mfu: float) -> tuple[float, float]:
    """(tokens/s, patches/s) one H100 consumes training SOLO-7B at ``mfu``."""
    from megatron_solo.model.config import SoloModelArgs
    from megatron_solo.spec import SOLO_VOCAB_SIZE, pad_vocab_size
    from megatron_solo.training.flops import num_floating_point_operations

    flops_per_token = num_floating_point_operations(
        SoloModelArgs.from_preset("solo-7b"), seq_length=seq_length, global_batch_size=1,
        padded_vocab_size=pad_vocab_size(SOLO_VOCAB_SIZE)) / seq_length
    tokens = mfu * H100_BF16_DENSE_FLOPS / flops_per_token
    return tokens, tokens * patch_share


def read_rate(dataset, samples: int, num_workers: int = 0) -> tuple[float, float, int]:
    """(samples/s, patches/s, patches) reading ``samples`` samples as training does."""
    from megatron_solo.data.dataset import collate

    if num_workers:
        from megatron_solo.data.loader import WorkerBatchStream

        stream = WorkerBatchStream(dataset, micro_batch_size=1, num_microbatches=1, global_batch_size=1, dp=1,
                                   dp_rank=0, consumed=0, num_workers=num_workers)
        stream.global_step()  # workers started (not timed)
        t = time.perf_counter()
        patches = sum(int(stream.global_step()[0]["patches"].shape[0]) for _ in range(samples))
        dt = time.perf_counter() - t
        stream.close()
    else:
        t = time.perf_counter()
        patches = sum(int(collate([dataset[i % len(dataset)]])["patches"].shape[0]) for i in range(samples))
        dt = time.perf_counter() - t
    return samples / dt, patches / dt, patches


def main(argv=None) -> int:
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=240)
    ap.add_argument("--samples", type=int, default=60, help="samples (packs) read per measurement")
    ap.add_argument("--seq-length", type=int, default=32768, help="SOLO's packed sequence length")
    ap.add_argument("--mfu", type=float, default=0.45)
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the second measurement")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from megatron_solo.data.dataset import build_train_valid_test_datasets
    from megatron_solo.data.preprocess import PreprocessConfig, preprocess
    from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

    tmp = tempfile.mkdtemp(prefix="bench_photo_")
    tok = create_solo_tokenizer(mistral_tokenizer_path(), tmp)
    corpus = os.path.join(tmp, "photos.jsonl")
    jpeg_sizes = make_photo_corpus(corpus, a.docs)
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}; {os.cpu_count()} CPUs (shared)")
    print(f"corpus: {a.docs} photos, sizes {SIZES}, mean JPEG {sum(jpeg_sizes) / len(jpeg_sizes) / 1e3:.0f} KB")
    stats, data = {}, {}
    for storage in ("encoded", "patches"):
        prefix = os.path.join(tmp, storage)
        stats[storage] = preprocess(PreprocessConfig(inputs=[corpus], output_prefix=prefix, tokenizer_model=tok,
                                                     seq_length=a.seq_length, image_storage=storage, progress=False))
        train, _, _ = build_train_valid_test_datasets(prefix, split="1,0,0", seq_length=a.seq_length,
                                                      train_samples=a.samples, valid_samples=0, test_samples=0)
        data[storage] = train
    s = stats["encoded"]
    share = s["patches"] / s["tokens"]
    print(f"packs {s['packs']}, tokens {s['tokens']}, patches {s['patches']} (<vpatch> share {share:.3f})")
    rates = {}
    for storage in ("encoded", "patches"):
        rates[storage] = read_rate(data[storage], a.samples)
        print(f"loader, {storage:8s} storage, 1 process 1 thread: {rates[storage][0]:7.2f} samples/s = "
              f"{rates[storage][1]:10.0f} patches/s")
    if a.num_workers:
        w = read_rate(data["encoded"], a.samples, a.num_workers)
        print(f"loader, encoded  storage, DataLoader {a.num_workers} workers: {w[0]:7.2f} samples/s = "
              f"{w[1]:10.0f} patches/s ({w[1] / rates['encoded'][1]:.2f}x one process)")
    tokens_s, patches_s = gpu_patches_per_s(a.seq_length, share, a.mfu)
    print(f"GPU: SOLO-7B at {a.mfu:.0%} MFU on one H100 (989.4 TFLOP/s bf16), seq {a.seq_length}: "
          f"{tokens_s:.0f} tokens/s = {patches_s:.0f} patches/s at this corpus's patch share")
    enc, pat = stats["encoded"]["bytes_per_image"], stats["patches"]["bytes_per_image"]
    print(f"\nRATIO encoded loader patches/s per core / one GPU's patches/s = {rates['encoded'][1] / patches_s:.2f} "
          f"(goal >= 2)")
    print(f"RATIO patches-storage loader / one GPU = {rates['patches'][1] / patches_s:.1f}")
    print(f"bytes on disk per image: encoded {enc:.0f}, patches {pat:.0f}: encoded = {enc / pat:.3f}x patches "
          f"(goal <= 0.2); per token: encoded {stats['encoded']['bytes_per_token']}, "
          f"patches {stats['patches']['bytes_per_token']}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
