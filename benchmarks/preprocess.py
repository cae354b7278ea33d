#!/usr/bin/env python
"""Preprocessing speed and memory, each as a ratio against a baseline measured in the same run.

    .venv/bin/python benchmarks/preprocess.py --docs 200

(a) this tool (tools/preprocess_data.py's pipeline) at 1 and 2 workers, for both image storages
    (``encoded``, the default, and ``patches``), and a worker's start time (spawn + imports + init);
(b) baseline: a straightforward Python version of SOLO's pipeline (float16 normalised patches,
    megatron-core's Python IndexedDatasetBuilder);
(c) decode + resize alone: the floor;
RSS of the tool (1 worker, subprocess, default storage) for N and 10N documents;
index writer per-item overhead (C++ IndexWriter vs megatron-core's IndexedDatasetBuilder).
Inputs: JPEGs from sklearn's real photos, 512x384 and 1024x768, as base64 data URLs in chat JSONL.
"""

import argparse
import base64
import glob
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def photo_jpegs():
    """sklearn's two real photos at 512x384 and 1024x768, JPEG quality 90: the corpora's 4 images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    jpegs = []
    for size in [(512, 384), (1024, 768)]:
        for a in load_sample_images().images:
            buf = io.BytesIO()
            Image.fromarray(a).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
    return jpegs


def make_corpus(path, n):
    urls = ["data:image/jpeg;base64," + base64.b64encode(j).decode() for j in photo_jpegs()]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps([{"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                {"type": "text", "text": f"A photo number {i} of a place."}]}]) + "\n")


def make_parquet_corpus(path, n, row_group_size=256):
    """The same photos as a caption-layout Parquet file (``image`` bytes + ``text``), n rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpegs = photo_jpegs()
    # no dictionary: the 4 photos repeat, and a dictionary would store each once (a 15 MB file for 10k rows)
    with pq.ParquetWriter(path, pa.schema([("image", pa.binary()), ("text", pa.string())]), use_dictionary=False,
                          compression="none") as w:
        for lo in range(0, n, row_group_size):
            rows = range(lo, min(n, lo + row_group_size))
            w.write_table(pa.table({"image": [jpegs[i % len(jpegs)] for i in rows],
                                    "text": [f"A photo number {i} of a place." for i in rows]}))


def baseline_solo(corpus, prefix, tokenizer_model):
    """SOLO-style: PIL decode, resize, float16 normalised patches, megatron's Python builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from PIL import Image

    from megatron_solo.data.tokenizer import SoloTokenizer

    tok = SoloTokenizer(tokenizer_model)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    tb = IndexedDatasetBuilder(prefix + "-tokens.bin", dtype=np.int32)
    pb = IndexedDatasetBuilder(prefix + "-patches.bin", dtype=np.float32)  # no float16 code: store as float32 bits
    for line in open(corpus):
        msgs = json.loads(line)
        ids = [1]
        patches = []
        for part in msgs[0]["content"]:
            if part["type"] == "text":
                ids += tok.encode(part["text"])
            else:
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                img = Image.open(io.BytesIO(data)).convert("RGB")
                w, h = img.size
                L, S = max(w, h), min(w, h)
                nl = min(-(-L // 32) * 32, 1024)
                ns = max(-(-(nl * S // L) // 32) * 32, 32)
                img = img.resize((nl, ns) if w >= h else (ns, nl), Image.BILINEAR)
                a = ((np.asarray(img, np.float32) / 255 - mean) / std).astype(np.float16)
                r, c = a.shape[0] // 32, a.shape[1] // 32
                p = a.reshape(r, 32, c, 32, 3).transpose(0, 2, 4, 1, 3).reshape(r * c, 3072)
                patches.append(p)
                ids += [32000]
                for i in range(r):
                    ids += [32001] * c + ([32002] if i < r - 1 else [])
                ids += [32004]
        tb.add_item(torch.tensor(ids, dtype=torch.int32))
        tb.end_document()
        pb.add_item(torch.from_numpy(np.concatenate(patches).view(np.uint16).astype(np.float32)))
        pb.end_document()
    tb.finalize(prefix + "-tokens.idx")
    pb.finalize(prefix + "-patches.idx")


def floor_decode_resize(corpus):
    from PIL import Image

    from megatron_solo.data.image import target_size

    for line in open(corpus):
        for part in json.loads(line)[0]["content"]:
            if part["type"] == "image_url":
                img = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))).convert("RGB")
                img.resize(target_size(*img.size), Image.BILINEAR)


def timed(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def worker_start_s(tokenizer_model, repeats=3):
    """Seconds from starting a 1-process encoder pool to its first answer (interpreter, imports, tokenizer)."""
    from megatron_solo.data.preprocess import PreprocessConfig, encoder_pool

    cfg = PreprocessConfig(inputs=[], output_prefix="", tokenizer_model=tokenizer_model, fmt="chat", workers=2)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with encoder_pool(cfg) as pool:
            list(pool.imap([[]]))  # an empty chunk: the answer comes once the worker is initialised
        times.append(time.perf_counter() - t)
    return min(times), max(times)


def write_floor(n_bytes, path, block=1 << 20):
    """Writing n_bytes to a new file (what patches storage must at least do per run)."""
    buf = os.urandom(block)
    with open(path, "wb") as f:
        for _ in range(n_bytes // block):
            f.write(buf)
        f.write(buf[: n_bytes % block])
    os.remove(path)


def rss_of_tool(corpus, prefix, tokenizer_model):
    # VmHWM (peak RSS of this process image): ru_maxrss would keep the forking parent's peak across exec
    code = ("from megatron_solo.data.allocator import keep_freed_memory; keep_freed_memory(); "
            "from megatron_solo.data.preprocess import *; "
            "preprocess(PreprocessConfig(inputs=[%r], output_prefix=%r, tokenizer_model=%r, progress=False, overwrite=True)); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
            ) % (corpus, prefix, tokenizer_model)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024  # MiB


def writer_overhead(tmp, n=200_000):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_solo._C import IndexWriter

    items = [np.arange(8, dtype=np.int32)] * n
    titems = [torch.from_numpy(x) for x in items]
    b = IndexedDatasetBuilder(os.path.join(tmp, "py.bin"), dtype=np.int32)
    t = time.perf_counter()
    for x in titems:
        b.add_item(x)
    b.end_document()
    b.finalize(os.path.join(tmp, "py.idx"))
    py = (time.perf_counter() - t) / n
    w = IndexWriter(os.path.join(tmp, "c.bin"), "<i4")
    t = time.perf_counter()
    for x in items:
        w.add_item(x)
    w.end_document()
    w.finalize(os.path.join(tmp, "c.idx"))
    cpp = (time.perf_counter() - t) / n
    return py * 1e6, cpp * 1e6


def main():
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tool configuration (medians)")
    ap.add_argument("--scaling-docs", type=int, default=0,
                    help="also compare 1 and 2 workers (encoded) on this many documents, start-up amortised")
    ap.add_argument("--parquet-rss-docs", type=int, default=0, help="peak RSS reading Parquet at this many rows and 10x")
    ap.add_argument("--rss-docs", type=int, default=1000, help="RSS at this many docs and 10x")
    a = ap.parse_args()
    from megatron_solo.data.allocator import keep_freed_memory
    from megatron_solo.data.preprocess import PreprocessConfig, preprocess
    from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

    # as tools/preprocess_data.py does; the floor and the baseline run in this process with the same settings
    tuned = keep_freed_memory()
    tmp = tempfile.mkdtemp(prefix=f"bench_pre_{os.getpid()}_")
    tokm = create_solo_tokenizer(mistral_tokenizer_path(), tmp)
    corpus = os.path.join(tmp, "c.jsonl")
    make_corpus(corpus, a.docs)
    n = a.docs
    print(f"machine: {os.cpu_count()} CPUs (shared); {n} docs, one 512x384 or 1024x768 JPEG each; "
          f"malloc thresholds {'raised (as the tool does)' if tuned else 'glibc defaults'}")
    t_floor = timed(floor_decode_resize, corpus)
    t_base = timed(baseline_solo, corpus, os.path.join(tmp, "base"), tokm)
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    stats = {}

    cpu = {}

    def run(k, storage):
        s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        stats[storage] = preprocess(PreprocessConfig(
            inputs=[corpus], output_prefix=os.path.join(tmp, f"w{k}" if storage == "patches" else f"e{k}"),
            tokenizer_model=tokm, workers=k, progress=False, overwrite=True, image_storage=storage))
        s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[k, storage] = (s1.ru_utime + s1.ru_stime - s0.ru_utime - s0.ru_stime,
                           c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)

    print(f"(c) decode+resize floor : {n / t_floor:8.1f} docs/s")
    print(f"(b) SOLO-style baseline  : {n / t_base:8.1f} docs/s")
    for storage in ("encoded", "patches"):
        t1s, t2s = [], []
        for _ in range(a.repeats):  # interleaved, so that a busy moment hits both
            t1s.append(timed(run, 1, storage))
            t2s.append(timed(run, 2, storage))
        t1, t2 = statistics.median(t1s), statistics.median(t2s)
        speedup = statistics.median(x / y for x, y in zip(t1s, t2s))
        print(f"(a) tool, {storage:8s} 1 worker : {n / t1:8.1f} docs/s  = {t_base / t1:.2f}x baseline, "
              f"{t_floor / t1:.2f}x floor (median of {a.repeats})")
        print(f"(a) tool, {storage:8s} 2 workers: {n / t2:8.1f} docs/s  = {speedup:.2f}x the 1-worker speed "
              f"(median of the {a.repeats} run pairs: {', '.join(f'{x / y:.2f}' for x, y in zip(t1s, t2s))})")
        parent, workers = cpu[2, storage]
        print(f"    2 workers' CPU (last run): parent {parent:.1f} s, workers {workers:.1f} s; on 2 free cores "
              f"the CPU-bound speed-up would be {(cpu[1, storage][0]) / max(parent, (parent + workers) / 2):.2f}x")
        print(f"    bytes on disk per image {stats[storage]['bytes_per_image']:.0f}, per token "
              f"{stats[storage]['bytes_per_token']}")
        if storage == "patches":
            t_write = timed(write_floor, stats[storage]["image_bytes"], os.path.join(tmp, "write_floor.bin"))
            print(f"    writing its {stats[storage]['image_bytes'] / 2**20:.0f} MiB of patches alone takes {t_write:.2f} s "
                  f"= {t_write / t_floor:.2f}x the decode+resize floor's time; tool 1 worker = "
                  f"{(t_floor + t_write) / t1:.2f}x (decode+resize+write floor)")
    if a.scaling_docs:  # the same comparison where the workers' start-up (~0.2 s each) is amortised
        big = os.path.join(tmp, "scaling.jsonl")
        make_corpus(big, a.scaling_docs)
        pairs = []
        for _ in range(a.repeats):
            t1, t2 = (timed(preprocess, PreprocessConfig(
                inputs=[big], output_prefix=os.path.join(tmp, f"s{k}"), tokenizer_model=tokm, workers=k,
                progress=False, overwrite=True)) for k in (1, 2))
            pairs.append(t1 / t2)
        print(f"(a) tool, encoded, {a.scaling_docs} docs: 2 workers = {statistics.median(pairs):.2f}x the 1-worker "
              f"speed (median of the {a.repeats} run pairs: {', '.join(f'{x:.2f}' for x in pairs)})")
        os.remove(big)
    lo, hi = worker_start_s(tokm)
    print(f"worker start (spawn, imports, tokenizer; 3 tries): {lo:.2f} - {hi:.2f} s")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    base_bytes = os.path.getsize(os.path.join(tmp, "base-patches.bin"))
    ours_bytes = os.path.getsize(os.path.join(tmp, "w1-patches.bin"))
    print(f"patch bytes: tool {ours_bytes} vs baseline float16-as-float32 {base_bytes} "
          f"(float16 would be {base_bytes // 2}: tool = {ours_bytes / (base_bytes / 2):.2f}x)")
    py_us, cpp_us = writer_overhead(tmp)
    print(f"index writer per item (8 int32): megatron builder {py_us:.2f} us, C++ IndexWriter {cpp_us:.2f} us "
          f"= {py_us / cpp_us:.1f}x")
    if a.rss_docs:
        for m in (a.rss_docs, 10 * a.rss_docs):
            c = os.path.join(tmp, f"rss{m}.jsonl")
            make_corpus(c, m)
            print(f"peak RSS, tool 1 worker, {m} docs: {rss_of_tool(c, os.path.join(tmp, f'rss{m}'), tokm):.0f} MiB")
            os.remove(c)
    if a.parquet_rss_docs:  # Parquet is read one row group (256 rows here) at a time
        for m in (a.parquet_rss_docs, 10 * a.parquet_rss_docs):
            c = os.path.join(tmp, f"rss{m}.parquet")
            make_parquet_corpus(c, m)
            print(f"peak RSS, tool 1 worker, Parquet, {m} rows ({os.path.getsize(c) / 2**20:.0f} MiB file): "
                  f"{rss_of_tool(c, os.path.join(tmp, f'prss{m}'), tokm):.0f} MiB")
            os.remove(c)


if __name__ == "__main__":
    try:
        main()
    finally:  # the outputs (several GB of patches at --rss-docs 1000) never outlive the run
        for d in glob.glob(os.path.join(tempfile.gettempdir(), f"bench_pre_{os.getpid()}_*")):
            shutil.rmtree(d, ignore_errors=True)
