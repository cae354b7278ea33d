#!/usr/bin/env python
"""Does an alignment stage, or a higher learning rate for the patch embedding, help stage 1? A small,
rerunnable experiment on the digits corpus (docs/TRAINING.md, "Alignment stage and parameter groups").

    .venv/bin/python benchmarks/recipe_controls.py [--work bench_out/recipe_controls] [--png docs/img/recipe_controls.png]

The situation of a real run, in miniature: a *pretrained LM* with a *fresh patch embedding*. The base is
the tiny preset trained ``--base-iters`` on the digits stage-1 corpus with ``--freeze-vision`` (it learns
the text side, the label words and the format, while the patch embedding keeps its random init). From
that base, four stage-1 arms with the same number of training iterations (``--iters``):

    plain        stage 1 for --iters at --lr
    vision-lr    stage 1 for --iters, --vision-lr = --vision-lr-mult x --lr
    align        stage 0 (--freeze-lm, --align-iters at --lr) then stage 1 for --iters - --align-iters
    align+vlr    the same stage 0, then stage 1 with the higher vision learning rate

Each stage starts from the previous checkpoint with ``--finetune`` (weights only, its own warm-up and
cosine), exactly as the launchers chain stages. Validation: the ``lm loss`` on the held-out 15% of the
packs every ``--eval-interval`` iterations. One seed; all runs sequential, one process each (one core of
this machine), a few minutes in all. Prints the table and writes the plot and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def sh(cmd, log):
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed (exit {r.returncode}); log: {log}")
    return time.time() - t0


def prepare_data(work):
    tok = os.path.join(work, "tokenizer", "tokenizer.model")
    prefix = os.path.join(work, "data", "pretrain")
    if not os.path.exists(prefix + "-tokens.idx"):
        sh([PY, "tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", os.path.dirname(tok)],
           os.path.join(work, "logs", "tokenizer.log"))
        sh([PY, "tools/make_digits_corpus.py", "--output", os.path.join(work, "corpus")],
           os.path.join(work, "logs", "corpus.log"))
        sh([PY, "tools/preprocess_data.py", "--input", os.path.join(work, "corpus", "pretrain.jsonl"),
            "--output-prefix", prefix, "--tokenizer-model", tok, "--format", "pretrain", "--seq-length", "128",
            "--image-root", os.path.join(work, "corpus"), "--no-progress"], os.path.join(work, "logs", "preprocess.log"))
    return tok, prefix


def train(a, work, name, tok, prefix, iters, *extra):
    """One phase through the real entry point (torchrun, one process); returns its validation curve."""
    log_file = os.path.join(work, "logs", f"{name}.jsonl")
    if os.path.exists(log_file):
        os.remove(log_file)
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(a.port), "-m", "megatron_solo.train",
           "--model", "tiny", "--seq-length", "128", "--micro-batch-size", str(a.gbs), "--global-batch-size", str(a.gbs),
           "--train-iters", str(iters), "--lr", str(a.lr), "--min-lr", str(a.lr / 10), "--lr-warmup-iters", "3",
           "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
           "--data-path", prefix, "--split", "85,15,0", "--tokenizer-model", tok, "--seed", "1234",
           "--eval-interval", str(a.eval_interval), "--eval-iters", "2", "--log-interval", "1",
           "--save", os.path.join(work, "ckpt", name), "--no-save-optim", "--log-file", log_file, *extra]
    seconds = sh(cmd, os.path.join(work, "logs", f"{name}.log"))
    valid = {}
    with open(log_file) as f:
        for rec in map(json.loads, f):
            if rec["kind"] == "valid":
                valid[rec["iteration"]] = rec["valid/valid/lm loss"]
    print(f"  {name:12s} {iters:3d} it  {seconds:5.0f} s  final valid lm loss {valid[iters]:.4f}", flush=True)
    return valid, seconds


def main():
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_out/recipe_controls", help="data, checkpoints and logs (default: %(default)s)")
    ap.add_argument("--png", default="docs/img/recipe_controls.png", help="the plot (default: %(default)s)")
    ap.add_argument("--base-iters", type=int, default=20, help="text-side pre-training of the base (default: 20)")
    ap.add_argument("--iters", type=int, default=40, help="stage-1 budget of every arm (default: 40)")
    ap.add_argument("--align-iters", type=int, default=10, help="stage 0 inside that budget (default: 10)")
    ap.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (default: 4e-3)")
    ap.add_argument("--vision-lr-mult", type=float, default=5.0, help="--vision-lr / --lr (default: 5)")
    ap.add_argument("--gbs", type=int, default=16, help="packs of 128 tokens per iteration (default: 16)")
    ap.add_argument("--eval-interval", type=int, default=5, help="(default: 5)")
    ap.add_argument("--port", type=int, default=29731)
    a = ap.parse_args()
    if a.iters % a.eval_interval or a.align_iters % a.eval_interval or a.align_iters >= a.iters:
        sys.exit("error: --iters and --align-iters must be multiples of --eval-interval, --align-iters < --iters")
    work = os.path.abspath(a.work)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    tok, prefix = prepare_data(work)
    ck = lambda n: os.path.join(work, "ckpt", n)  # noqa: E731
    print(f"== base (--freeze-vision, {a.base_iters} it), stage 0 and four stage-1 arms; one process each, "
          f"sequential; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.time()
    import shutil

    shutil.rmtree(os.path.join(work, "ckpt"), ignore_errors=True)
    base, _ = train(a, work, "base", tok, prefix, a.base_iters, "--freeze-vision")
    vlr = ["--vision-lr", str(a.lr * a.vision_lr_mult), "--vision-min-lr", str(a.lr * a.vision_lr_mult / 10)]
    stage0, _ = train(a, work, "stage0", tok, prefix, a.align_iters, "--freeze-lm", "--load", ck("base"), "--finetune")
    curves = {}
    for arm, align, extra in (("plain", False, []), ("vision-lr", False, vlr), ("align", True, []),
                              ("align+vlr", True, vlr)):
        start, offset = (ck("stage0"), a.align_iters) if align else (ck("base"), 0)
        valid, _ = train(a, work, arm, tok, prefix, a.iters - offset, "--load", start, "--finetune", *extra)
        curve = {0: base[a.base_iters], **(stage0 if align else {})}  # every arm starts from the base
        curve.update({i + offset: v for i, v in valid.items()})
        curves[arm] = dict(sorted(curve.items()))
    total = time.time() - t0
    print(f"== {total:.0f} s in all; load average after: {os.getloadavg()[0]:.1f}")
    steps = sorted(curves["plain"])
    print("validation lm loss by iteration (stage 0 counted in the budget):")
    print("  arm         " + " ".join(f"{i:>7d}" for i in steps))
    for arm, c in curves.items():
        print(f"  {arm:11s} " + " ".join(f"{c.get(i, float('nan')):7.4f}" for i in steps))
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"args": vars(a), "curves": curves, "seconds": total}, f, indent=1)
    plot(curves, a, a.png)


def plot(curves, a, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for (arm, c), color in zip(curves.items(), ("C0", "C1", "C2", "C3")):
        xs = sorted(c)
        ax.plot(xs, [c[i] for i in xs], marker="o", ms=3, color=color, label=arm)
    ax.axvline(a.align_iters, color="gray", lw=0.8, ls=":")
    ax.text(a.align_iters, ax.get_ylim()[1], " end of stage 0", va="top", fontsize=7, color="gray")
    ax.set_xlabel("iteration (stage 0 + stage 1, same budget)")
    ax.set_ylabel("validation lm loss")
    ax.set_yscale("log")
    ax.set_title(f"digits, tiny preset, base = text side only; vision lr x{a.vision_lr_mult:g}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    print(f"plot: {png} ({os.path.getsize(png) // 1024} KiB)")


if __name__ == "__main__":
    main()
