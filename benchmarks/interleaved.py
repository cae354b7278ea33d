#!/usr/bin/env python
"""Interleaved web documents: OBELICS-layout Parquet against the same documents in the project's JSONL.

    .venv/bin/python benchmarks/interleaved.py --docs 10000 --repeats 3

Each document is text, a photo, text (sklearn's real photos at 512x384, JPEG quality 90, as in
benchmarks/preprocess.py). The Parquet file holds them as OBELICS does (``texts`` and ``images``, aligned
lists; the image as a Hugging Face struct ``{bytes, path}``, row groups of 256 rows); the JSONL holds the
same documents as chat JSON lines with base64 data URLs. Each run is tools/preprocess_data.py's pipeline
(1 worker, the default image storage) in its own process, which reports its time (imports excluded) and
its peak RSS (VmHWM); the two inputs alternate, so a busy moment hits both. Medians of ``--repeats``.
Also: peak RSS for a tenth of the rows, to show memory flat in the number of rows.
"""

import argparse
import base64
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def photo_jpegs():
    # benchmarks/ is not a package: the preprocessing benchmark's photos, loaded from its file
    spec = importlib.util.spec_from_file_location("bench_preprocess", os.path.join(HERE, "preprocess.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.photo_jpegs()[:2]  # the two 512x384 photos


def texts(i):
    return (f"Paragraph {i} before the photo, about a place and what happened there.",
            f"Paragraph {i} after the photo: what it shows and where it was taken.")


def make_obelics(path, n, jpegs, row_group_size=256):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(img))])
    # no dictionary: the 2 photos repeat, and a dictionary would store each once
    with pq.ParquetWriter(path, schema, use_dictionary=False, compression="none") as w:
        for lo in range(0, n, row_group_size):
            rows = range(lo, min(n, lo + row_group_size))
            w.write_table(pa.table({
                "texts": [[texts(i)[0], None, texts(i)[1]] for i in rows],
                "images": pa.array([[None, {"bytes": jpegs[i % 2], "path": None}, None] for i in rows],
                                   pa.list_(img))}, schema=schema))


def make_jsonl(path, n, jpegs):
    urls = ["data:image/jpeg;base64," + base64.b64encode(j).decode() for j in jpegs]
    with open(path, "w") as f:
        for i in range(n):
            a, b = texts(i)
            f.write(json.dumps([{"role": "assistant", "content": [
                {"type": "text", "text": a}, {"type": "image_url", "image_url": {"url": urls[i % 2]}},
                {"type": "text", "text": b}]}]) + "\n")


RUN = """
import time
from megatron_solo.data.allocator import keep_freed_memory
from megatron_solo.data.preprocess import PreprocessConfig, preprocess
keep_freed_memory()  # as tools/preprocess_data.py does
t = time.perf_counter()
s = preprocess(PreprocessConfig(inputs=[{inp!r}], output_prefix={out!r}, tokenizer_model={tok!r}, progress=False,
                                overwrite=True))
t = time.perf_counter() - t
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(t, int(hwm) / 1024, s["documents"], s["images"], s["tokens"])
"""


def run(inp, out, tok):
    """(seconds, peak RSS MiB, documents, images, tokens) of one preprocessing run in its own process."""
    r = subprocess.run([sys.executable, "-c", RUN.format(inp=inp, out=out, tok=tok)], capture_output=True,
                       text=True, check=True)
    t, rss, docs, images, tokens = r.stdout.split()
    return float(t), float(rss), int(docs), int(images), int(tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

    tmp = tempfile.mkdtemp(prefix=f"bench_interleaved_{os.getpid()}_")
    try:
        tok = create_solo_tokenizer(mistral_tokenizer_path(), tmp)
        jpegs = photo_jpegs()
        pq_path, js_path, small = (os.path.join(tmp, x) for x in ("web.parquet", "web.jsonl", "small.parquet"))
        make_obelics(pq_path, a.docs, jpegs)
        make_jsonl(js_path, a.docs, jpegs)
        make_obelics(small, a.docs // 10, jpegs)
        print(f"machine: {os.cpu_count()} CPUs; load average {open('/proc/loadavg').read().split()[:3]}; "
              f"{a.docs} documents (text, 512x384 JPEG, text); Parquet {os.path.getsize(pq_path) / 2**20:.0f} MiB, "
              f"JSONL {os.path.getsize(js_path) / 2**20:.0f} MiB")
        res = {"obelics": [], "jsonl": []}
        for _ in range(a.repeats):
            res["obelics"].append(run(pq_path, os.path.join(tmp, "pq"), tok))
            res["jsonl"].append(run(js_path, os.path.join(tmp, "js"), tok))
        assert res["obelics"][0][2:] == res["jsonl"][0][2:], (res["obelics"][0], res["jsonl"][0])
        rate = {k: statistics.median(a.docs / r[0] for r in v) for k, v in res.items()}
        rss = {k: statistics.median(r[1] for r in v) for k, v in res.items()}
        for k in res:
            print(f"{k:8s}: {rate[k]:7.1f} docs/s, peak RSS {rss[k]:.0f} MiB (median of {a.repeats}; runs: "
                  f"{', '.join(f'{a.docs / r[0]:.1f}' for r in res[k])} docs/s)")
        print(f"OBELICS / JSONL speed: {rate['obelics'] / rate['jsonl']:.2f}x; documents, images and tokens equal: "
              f"{res['obelics'][0][2:]}")
        t, small_rss, *_ = run(small, os.path.join(tmp, "small"), tok)
        print(f"peak RSS, OBELICS, {a.docs // 10} rows: {small_rss:.0f} MiB; {a.docs} rows: {rss['obelics']:.0f} MiB")
        print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
