#!/usr/bin/env python
"""What the batch's ``patch_coords`` cost the loader: their share of reading one training sample.

    .venv/bin/python benchmarks/patch_coords.py [--docs 48 --samples 24 --seq-length 8192]

Corpus: benchmarks/photo_loader.py's real photos (four sizes, one per document), preprocessed into three
prefixes packed to ``--seq-length``: ``patches`` storage (SOLO's layout), ``encoded`` storage with row
separators (``on``) and without (``off``, SAIL's layout).

sample   ``SoloDataset.__getitem__`` (training's read path, coordinates included), one process, one thread.
coords   the coordinates of the same sample alone, as ``__getitem__`` makes them: patches storage counts them
         from the tokens (``SoloIndexedDataset._coords_from_tokens``, across the segments of a cut image);
         encoded storage from each image's grid slice (``patch_coords.grid_coords``; its width comes with the
         decode the sample makes anyway).
Printed: the median of each over ``--samples`` samples (3 passes) and coords / sample, per prefix.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.photo_loader import make_photo_corpus  # noqa: E402


def _coords_only(ds, pack: int, max_tokens: int):
    """The coordinates of one sample, computed as ``SoloIndexedDataset.pack(with_coords=True)`` does."""
    import numpy as np

    from megatron_solo.data.image_storage import IDX_FIELDS
    from megatron_solo.data.patch_coords import grid_coords

    a, b = int(ds.pack_bounds[pack]), int(ds.pack_bounds[pack + 1])
    left, out = max_tokens, []
    for s in range(a, b):
        if left <= 0:
            break
        length = min(int(ds.segment_lengths[s]), left)
        left -= length
        t = np.array(ds.tokens.get(s, 0, length))
        n_p = int(np.count_nonzero(t == ds.vocab.vision_patch))
        if not n_p:
            continue
        if ds.storage == "patches":
            out.append(ds._coords_from_tokens(s, t))
            continue
        have = 0
        for _, _, start, end in np.asarray(ds.imageidx[s]).reshape(-1, IDX_FIELDS).tolist():
            take = min(end - start, n_p - have)
            if take <= 0:
                break
            out.append(grid_coords(start, start + take, 32))  # the width is the decode's; any width costs the same
            have += take
    return out


def main(argv=None) -> int:
    from megatron_solo import quiet

    quiet.filter_known_warnings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--seq-length", type=int, default=8192)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from megatron_solo.data.dataset import build_train_valid_test_datasets
    from megatron_solo.data.preprocess import PreprocessConfig, preprocess
    from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

    tmp = tempfile.mkdtemp(prefix="bench_coords_")
    tok = create_solo_tokenizer(mistral_tokenizer_path(), tmp)
    corpus = os.path.join(tmp, "photos.jsonl")
    make_photo_corpus(corpus, a.docs)
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}; {os.cpu_count()} CPUs (shared)")
    for name, storage, sep in (("patches, on", "patches", True), ("encoded, on", "encoded", True),
                               ("encoded, off", "encoded", False)):
        prefix = os.path.join(tmp, name.replace(", ", "_"))
        preprocess(PreprocessConfig(inputs=[corpus], output_prefix=prefix, tokenizer_model=tok, seq_length=a.seq_length,
                                    image_storage=storage, row_separator=sep, progress=False))
        train = build_train_valid_test_datasets(prefix, split="1,0,0", seq_length=a.seq_length,
                                                train_samples=a.samples, valid_samples=0, test_samples=0)[0]
        sample_t, coords_t, n_patches = [], [], 0
        for _ in range(3):
            for i in range(len(train)):
                t0 = time.perf_counter()
                s = train[i]
                t1 = time.perf_counter()
                _coords_only(train.dataset, int(train.sample_index[i]), a.seq_length + 1)
                t2 = time.perf_counter()
                sample_t.append(t1 - t0)
                coords_t.append(t2 - t1)
                n_patches += int(s["patches"].shape[0])
        ms, mc = statistics.median(sample_t), statistics.median(coords_t)
        print(f"{name:13s}: sample {ms * 1e3:8.2f} ms, coords {mc * 1e3:6.3f} ms, coords / sample {mc / ms:.4f} "
              f"({n_patches // (3 * len(train))} patches per sample)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
