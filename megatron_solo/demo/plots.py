"""The demo's pictures: loss curves from training's JSON-lines logs (``--log-file``), and test digits
drawn as the patch grids the model reads, titled with the model's answers.

    .venv/bin/python -m megatron_solo.demo.plots losses --log "stage 1=run/stage1.jsonl" --log "SFT=run/sft.jsonl" \
        --output run/loss_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os

from megatron_solo.spec import PATCH_SIZE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_losses(log_file: str, kind: str = "train") -> tuple[list[int], list[float]]:
    """(iterations, lm losses) of one training log."""
    its, losses = [], []
    with open(log_file) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("kind") != kind:
                continue
            # train records: "lm loss"; validation records: "valid/<dataset>/lm loss"
            key = next((k for k in rec if k == "lm loss" or k.endswith("/lm loss")), None)
            if key is not None:
                its.append(int(rec["iteration"]))
                losses.append(float(rec[key]))
    return its, losses


def plot_losses(logs: list[tuple[str, str]], output: str) -> str:
    """One panel per phase: training loss per iteration, validation loss as points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.6), squeeze=False)
    for ax, (name, path) in zip(axes[0], logs):
        its, losses = read_losses(path)
        ax.plot(its, losses, lw=1.5, label="train")
        v_its, v_losses = read_losses(path, "valid")
        if v_its:
            ax.plot(v_its, v_losses, "o", color="tab:red", label="validation")
        if losses:
            ax.set_title(f"{name}: loss {losses[0]:.2f} -> {losses[-1]:.2f}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("lm loss (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def representative_sample(predictions: list[dict], n: int) -> list[dict]:
    """``n`` predictions whose share of right answers is the whole set's: the first right ones and the
    first wrong ones in that proportion, kept in test order (the first ``n`` alone can mislead: 4 of 16
    wrong from a 93% model)."""
    right = [p for p in predictions if p["predicted"] == p["answer"]]
    wrong = [p for p in predictions if p["predicted"] != p["answer"]]
    n = min(n, len(predictions))
    n_wrong = min(len(wrong), round(n * len(wrong) / max(len(predictions), 1)))
    chosen = {id(p) for p in right[:n - n_wrong] + wrong[:n_wrong]}
    return [p for p in predictions if id(p) in chosen]


def plot_answers(predictions: list[dict], image_root: str, image_to_patches, load_image, output: str,
                 n: int = 32, ncols: int = 8) -> str:
    """``n`` test digits (:func:`representative_sample`) as the model reads them; title: the model's
    answer (green right, red wrong) and, when wrong, the label; the figure's title gives the accuracy.
    Patch borders are ticks on the frame, so no line crosses a digit's ink. ``image_to_patches`` and
    ``load_image`` come from the export's processor."""
    from megatron_solo.data.image import patch_grid  # PIL and numpy load here: `plots losses` needs neither

    plt = _pyplot()
    shown = representative_sample(predictions, n)
    total, correct = len(predictions), sum(p["predicted"] == p["answer"] for p in predictions)
    shown_right = sum(p["predicted"] == p["answer"] for p in shown)
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.9 * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    rows = cols = 0
    for ax, p in zip(axes.flat, shown):
        patches, rows, cols = image_to_patches(load_image(os.path.join(image_root, p["image"])))
        ax.axis("on")
        ax.imshow(patch_grid(patches, rows, cols), interpolation="nearest")
        edges_x = [c * PATCH_SIZE - 0.5 for c in range(cols + 1)]
        edges_y = [r * PATCH_SIZE - 0.5 for r in range(rows + 1)]
        ax.set_xticks(edges_x, labels=[])
        ax.set_yticks(edges_y, labels=[])
        ax.tick_params(direction="out", length=5, width=1, colors="0.45")
        for spine in ax.spines.values():
            spine.set_color("0.7")
        ok = p["predicted"] == p["answer"]
        title = f"\"{p['predicted'] or p['output']!s}\"" + ("" if ok else f" (is {p['answer']})")
        ax.set_title(title, fontsize=9, color="tab:green" if ok else "tab:red")
    fig.suptitle(f"held-out accuracy {correct / max(total, 1):.1%} ({correct}/{total} digits, exported model); "
                 f"shown: {len(shown)} digits, {shown_right} right, in that proportion\n"
                 f"each digit is {rows}x{cols} patches of {PATCH_SIZE}x{PATCH_SIZE} px (ticks: patch borders); "
                 f"title: the model's answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("losses", help="loss curves of one or more training logs")
    lp.add_argument("--log", action="append", required=True, metavar="NAME=PATH")
    lp.add_argument("--output", required=True)
    a = ap.parse_args(argv)
    logs = [tuple(s.split("=", 1)) for s in a.log]
    print(plot_losses(logs, a.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
