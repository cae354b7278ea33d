#!/usr/bin/env python3
"""Peak memory of the checkpoint conversion against the model's size (goal: peak RSS <= 1.3x model bytes).

Writes a random HF SOLO checkpoint of about 1B parameters (bf16, streamed: never whole in memory),
then runs, each in a fresh process, and reports the peak RSS of its process tree (psutil, sampled every 20 ms):

    baseline         python + torch + megatron-core + transformers imported, nothing converted
    hf-to-megatron   tools/convert_checkpoint.py hf-to-megatron (fp32 parameters)
    megatron-to-hf   tools/convert_checkpoint.py megatron-to-hf (bf16 export)

"model bytes" is the in-memory size of the model the converter holds (fp32, 4 bytes/parameter).
Ratios are given both for the raw peak and for the peak above the baseline process.

    python benchmarks/convert.py --work /tmp/convert_bench [--hidden 2048 --layers 16 --ffn 5632]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(out_dir, hidden, layers, ffn, heads, groups, head_dim):
    import torch

    from megatron_solo.convert.hf_config import conversion_shapes, hf_config_from_model_args
    from megatron_solo.convert.hf_export_files import write_hf_support_files
    from megatron_solo.convert.safetensors_io import StreamingSafetensorsWriter
    from megatron_solo.convert.mapping import expected_hf_shapes
    from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

    args = dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                num_query_groups=groups, kv_channels=head_dim, vocab_size=33031, max_position_embeddings=4096,
                rotary_base=10000, norm_epsilon=1e-5, sliding_window=4096, init_method_std=0.02)
    shapes = expected_hf_shapes(conversion_shapes(args, padded_vocab_size=33031))
    os.makedirs(out_dir, exist_ok=True)
    w = StreamingSafetensorsWriter(out_dir, [(n, s, torch.bfloat16) for n, s in shapes.items()], 2 * 10**9)
    g = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        w.write(n, (torch.randn(s, generator=g) * (0.02 if len(s) == 2 else 1.0)).to(torch.bfloat16))
    w.close()
    tok = create_solo_tokenizer(mistral_tokenizer_path(), os.path.join(out_dir, ".tok"))
    write_hf_support_files(out_dir, hf_config_from_model_args(args), tok)
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/solo_convert_bench")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    hf, ckpt, out = (os.path.join(a.work, d) for d in ("hf", "ckpt", "export"))
    n = make_checkpoint(hf, a.hidden, a.layers, a.ffn, a.heads, a.groups, a.hidden // a.heads)
    model_bytes = 4 * n
    py = sys.executable
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    base, _ = run([py, "-c", "import torch, transformers, megatron_solo.model, megatron_solo.convert.megatron_io"])
    imp, t_imp = run([py, tool, "hf-to-megatron", "--hf-dir", hf, "--save", ckpt])
    exp, t_exp = run([py, tool, "megatron-to-hf", "--load", ckpt, "--save", out])
    res = {"parameters": n, "model_bytes_fp32": model_bytes, "baseline_rss": base,
           "hf_to_megatron": {"peak_rss": imp, "ratio": imp / model_bytes,
                              "ratio_above_baseline": (imp - base) / model_bytes, "seconds": t_imp},
           "megatron_to_hf": {"peak_rss": exp, "ratio": exp / model_bytes,
                              "ratio_above_baseline": (exp - base) / model_bytes, "seconds": t_exp}}
    print(json.dumps(res, indent=2))
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
