#!/usr/bin/env python
"""The GPU check of issue 8 (run by benchmarks/gpu_check.sh; one H100/H200, no network, <= 8 minutes).

    .venv/bin/python benchmarks/gpu_check.py --out $OUT            # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run --out bench_out/gpu_dry   # here: every step at toy size

1. peak: the card's bf16 matmul rate, measured here (8192^3 products; MFU is relative to it);
2. logits: the tiny preset at TP=1 on the GPU (bf16 and fp32, same weights) against the CPU (fp32, computed
   in a subprocess with CUDA hidden, i.e. through megatron_solo's CPU backend);
3. training throughput of a ~1B-parameter SOLO model (Mistral shapes scaled down: 18 layers, hidden 2048,
   16 heads, 4 query groups, head dim 128, FFN 5632, window 4096), bf16, seq 4096, packed multimodal
   micro-batches (several documents per row, each an image block of <vpatch> rows plus text, with the
   patches), through the real training step (megatron_solo.training.trainer: DDP, megatron-core optimizer,
   forward-backward schedule); tokens/s, model TFLOP/s (megatron_solo.training.flops) and MFU;
4. peak GPU memory; one table printed last; everything also written to OUT/gpu_check.json and the log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

TINY_SEQ, TINY_MBS = 256, 2


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------- batches
def multimodal_batches(n, mbs, seq, *, seed=0, device="cpu", max_grid=(12, 16)):
    """Packed multimodal micro-batches in the contract of docs/ARCHITECTURE.md.

    Each row is filled with documents ``<s> <vision> grid </vision> text`` (an R x C image of random
    uint8 patches, R, C up to ``max_grid``, then 32..512 text tokens) until ``seq`` is reached; the last
    document is cut at the row's end. Labels: next token of the same document; loss on text tokens only.
    """
    from megatron_solo.data.encode import image_block_tokens
    from megatron_solo.data.tokenizer import SOLO_IDS
    from megatron_solo.model.batch import document_ids, position_ids_from_doc_lengths

    g = torch.Generator().manual_seed(seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    out = []
    for _ in range(n):
        rows, lengths, is_text = [], [], []
        for _r in range(mbs):
            toks, lens, txt = [], [], []
            while sum(lens) < seq:
                img = torch.from_numpy(image_block_tokens(rint(1, max_grid[0]), rint(1, max_grid[1]))).long()
                text = torch.randint(3, 32000, (rint(32, 512),), generator=g)
                doc = torch.cat([torch.tensor([1]), img, text])
                doc = doc[: seq - sum(lens)]
                toks.append(doc)
                lens.append(len(doc))
                mark = torch.zeros(len(doc), dtype=torch.bool)
                mark[1 + len(img):] = True
                txt.append(mark[: len(doc)])
            rows.append(torch.cat(toks))
            lengths.append(lens)
            is_text.append(torch.cat(txt))
        tokens = torch.stack(rows)
        d = max(len(x) for x in lengths)
        doc_lengths = torch.zeros(mbs, d, dtype=torch.int32)
        for i, x in enumerate(lengths):
            doc_lengths[i, : len(x)] = torch.tensor(x, dtype=torch.int32)
        doc = document_ids(doc_lengths, seq)
        same = torch.zeros(mbs, seq, dtype=torch.bool)
        same[:, :-1] = doc[:, 1:] == doc[:, :-1]
        labels = torch.where(same, torch.roll(tokens, -1, 1), torch.zeros_like(tokens))
        text_label = torch.zeros_like(same)
        text_label[:, :-1] = torch.stack(is_text)[:, 1:]
        n_patch = int((tokens == SOLO_IDS.vision_patch).sum())
        out.append({
            "tokens": tokens, "labels": labels, "loss_mask": (same & text_label).float(),
            "position_ids": position_ids_from_doc_lengths(doc_lengths, seq), "doc_lengths": doc_lengths,
            "image_doc_mask": torch.ones(mbs, seq, dtype=torch.bool),
            "patches": torch.randint(0, 256, (n_patch, 3072), dtype=torch.uint8, generator=g),
        })
    return [{k: v.to(device) for k, v in b.items()} for b in out]


# ---------------------------------------------------------------------------------------- peak
def matmul_peak(n, dtype, device, iters=10):
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- logits
def tiny_model(bf16, core_attention="dot_product"):
    from megatron_solo import parallel
    from megatron_solo.model import SoloModelArgs, build_solo_model, build_transformer_config

    parallel.initialize_model_parallel(seed=1234)
    margs = SoloModelArgs.from_preset("tiny")
    config = build_transformer_config(margs, bf16=bf16, use_te=False)
    model = build_solo_model(margs, config, use_te=False, core_attention=core_attention)
    return model.eval(), config


def tiny_logits(model, config, batch):
    from megatron_solo.model import model_forward_kwargs

    kw = model_forward_kwargs({k: v for k, v in batch.items() if k != "labels"}, config)
    with torch.no_grad():
        return model(**kw).float()


def cpu_reference(path):
    """Subprocess with CUDA hidden: tiny model (fp32, CPU backend), its weights, a batch and its logits."""
    from megatron_solo import parallel

    parallel.init_process_group()
    model, config = tiny_model(bf16=False)
    batch = multimodal_batches(1, TINY_MBS, TINY_SEQ, seed=7, max_grid=(4, 6))[0]
    logits = tiny_logits(model, config, batch)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"state": state, "batch": batch, "logits": logits}, path)
    parallel.destroy()


def logits_check(out_dir, device):
    ref_path = os.path.join(out_dir, "tiny_cpu_reference.pt")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # a world of its own
        env.pop(k, None)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-reference", ref_path], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"CPU reference failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    ref = torch.load(ref_path, weights_only=False)
    cpu = ref["logits"]
    rows = {}
    for name, bf16, tol in (("fp32", False, 2e-3), ("bf16", True, 5e-2)):
        model, config = tiny_model(bf16=bf16)
        missing, unexpected = model.load_state_dict(ref["state"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        assert not missing and not unexpected, (missing, unexpected)
        batch = {k: v.to(device) for k, v in ref["batch"].items()}
        got = tiny_logits(model, config, batch).cpu()
        diff = (got - cpu).abs()
        scale = cpu.abs().max().item()
        rel = diff.max().item() / scale
        agree = (got.argmax(-1) == cpu.argmax(-1)).float().mean().item()
        rows[name] = {"max_abs_diff": diff.max().item(), "max_rel_to_max_logit": rel, "argmax_agreement": agree,
                      "tolerance_rel": tol, "ok": rel <= tol}
        log(f"logits {name} on {device} vs CPU fp32: max|diff| {diff.max().item():.3e} (max|logit| {scale:.3f}, "
            f"relative {rel:.2e}, tolerance {tol:g}), argmax agreement {agree:.4f}")
        del model
    return rows


# ---------------------------------------------------------------------------------------- throughput
def throughput(a, device):
    from train_step import megatron_setup, megatron_step_fn

    from megatron_solo.training.flops import flops_per_step

    argv = ["--model", "tiny", "--num-layers", str(a.layers), "--hidden-size", str(a.hidden),
            "--ffn-hidden-size", str(a.ffn), "--num-attention-heads", str(a.heads), "--num-query-groups",
            str(a.groups), "--kv-channels", str(a.hidden // a.heads), "--max-position-embeddings",
            str(max(a.seq_length, 4096)), "--sliding-window", str(a.window), "--seq-length", str(a.seq_length),
            "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size",
            str(a.micro_batch_size * a.num_microbatches), "--train-iters", "1000", "--lr", "1e-4",
            "--min-lr", "1e-5", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--data-path", "unused", "--attention-backend", a.attention_backend]
    if a.bf16:
        argv.append("--bf16")
    cfg, trainer = megatron_setup(argv)
    chunks = trainer.model_chunks
    n_params = sum(p.numel() for c in chunks for p in c.module.parameters())
    log(f"throughput model: {n_params / 1e9:.3f}B parameters, {a.layers} layers, hidden {a.hidden}, "
        f"FFN {a.ffn}, heads {a.heads}/{a.groups}, seq {a.seq_length}, micro-batch {a.micro_batch_size} x "
        f"{a.num_microbatches}, {'bf16' if a.bf16 else 'fp32'}, attention {a.attention_backend}")
    step = megatron_step_fn(trainer)
    n_batches = a.warmup + a.steps
    data = [multimodal_batches(a.num_microbatches, a.micro_batch_size, a.seq_length, seed=i, device=device)
            for i in range(min(n_batches, 4))]
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for k in range(n_batches):
        sync(device)
        t = time.perf_counter()
        losses.append(step(data[k % len(data)]))
        sync(device)
        dt = time.perf_counter() - t
        log(f"  step {k + 1}/{n_batches}: {dt:.3f} s, lm loss {losses[-1]:.4f}{'  (warm-up)' if k < a.warmup else ''}")
        if k >= a.warmup:
            times.append(dt)
    dt = statistics.median(times)
    tokens = cfg.schedule.global_batch_size * cfg.schedule.seq_length
    flops = flops_per_step(cfg)
    res = {"params_B": n_params / 1e9, "step_s_median": dt, "tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12,
           "losses": losses}
    if str(device).startswith("cuda"):
        res["peak_mem_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_mem_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    from megatron_solo import parallel

    parallel.destroy()
    return res


def main(argv=None):
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench_out", "gpu_check"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU at toy sizes")
    ap.add_argument("--cpu-reference", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--num-microbatches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--attention-backend", default="sdpa_flex", choices=["dot_product", "sdpa_flex"])
    ap.add_argument("--peak-n", type=int, default=8192)
    a = ap.parse_args(argv)
    from megatron_solo import cpu_backend

    cpu_backend.ensure()  # a no-op where CUDA is present; the CPU backend for the reference and the dry run
    if a.cpu_reference:
        cpu_reference(a.cpu_reference)
        return 0
    a.bf16 = True
    if a.cpu_dry_run:  # the same code at toy sizes; bf16 kept so that its code path runs too
        a.layers, a.hidden, a.ffn, a.heads, a.groups = 2, 128, 352, 4, 2
        a.window, a.seq_length, a.num_microbatches, a.warmup, a.steps, a.peak_n = 256, 512, 2, 1, 2, 256
    os.makedirs(a.out, exist_ok=True)

    from megatron_solo import cpu_backend, parallel

    parallel.init_process_group()
    on_gpu = torch.cuda.is_available() and not cpu_backend.is_active()
    if not on_gpu and not a.cpu_dry_run:
        raise SystemExit("error: no CUDA device; use --cpu-dry-run to exercise the script on the CPU")
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    card = torch.cuda.get_device_name() if on_gpu else "CPU (dry run)"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 logits compare at fp32 precision
    import megatron.core

    log(f"gpu_check: {card}; torch {torch.__version__}, megatron-core {megatron.core.__version__}; out {a.out}")
    result = {"device": card, "torch": torch.__version__, "megatron_core": megatron.core.__version__,
              "dry_run": a.cpu_dry_run}
    t_all = time.perf_counter()

    t = time.perf_counter()
    result["peak_tflops_bf16"] = matmul_peak(a.peak_n, torch.bfloat16, device) / 1e12
    log(f"[1/3] bf16 matmul peak ({a.peak_n}^3): {result['peak_tflops_bf16']:.1f} TFLOP/s "
        f"({time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    result["logits"] = logits_check(a.out, device)
    log(f"[2/3] logits check done ({time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    try:
        result["train"] = throughput(a, device)
    except torch.OutOfMemoryError as e:  # report it in the table rather than losing the other rows
        result["train"] = {"error": f"OOM: {e}"[:300]}
    log(f"[3/3] throughput done ({time.perf_counter() - t:.1f} s)")
    tr = result["train"]
    if "tflops" in tr:
        tr["mfu"] = tr["tflops"] / result["peak_tflops_bf16"]
    result["total_s"] = time.perf_counter() - t_all
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)

    lg = result["logits"]
    rows = [
        ("device", card),
        ("bf16 matmul peak (measured)", f"{result['peak_tflops_bf16']:.1f} TFLOP/s"),
        ("tiny logits fp32 GPU vs CPU", f"max rel {lg['fp32']['max_rel_to_max_logit']:.2e} "
                                        f"{'OK' if lg['fp32']['ok'] else 'FAIL'}"),
        ("tiny logits bf16 GPU vs CPU", f"max rel {lg['bf16']['max_rel_to_max_logit']:.2e}, argmax "
                                        f"{lg['bf16']['argmax_agreement']:.3f} {'OK' if lg['bf16']['ok'] else 'FAIL'}"),
    ]
    if "tflops" in tr:
        rows += [
            ("model", f"{tr['params_B']:.3f}B params, seq {a.seq_length}, gbs {a.micro_batch_size * a.num_microbatches}, "
                      f"{a.attention_backend}"),
            ("step time (median)", f"{tr['step_s_median']:.3f} s over {a.steps} steps"),
            ("tokens/s", f"{tr['tokens_per_s']:.0f}"),
            ("model TFLOP/s", f"{tr['tflops']:.1f}"),
            ("MFU vs measured peak", f"{100 * tr['mfu']:.1f}% (goal >= 45%)"),
            ("peak memory allocated / reserved", f"{tr.get('peak_mem_allocated_GiB', float('nan')):.1f} / "
                                                  f"{tr.get('peak_mem_reserved_GiB', float('nan')):.1f} GiB"),
        ]
    else:
        rows.append(("training", tr["error"]))
    rows.append(("total time", f"{result['total_s']:.0f} s"))
    w = max(len(r[0]) for r in rows)
    log("\n| " + "check".ljust(w) + " | result |\n|" + "-" * (w + 2) + "|--------|")
    for k, v in rows:
        log(f"| {k.ljust(w)} | {v} |")
    parallel.destroy()
    ok = lg["fp32"]["ok"] and lg["bf16"]["ok"] and "tflops" in tr
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
