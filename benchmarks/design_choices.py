#!/usr/bin/env python
"""Native-VLM design choices on the digits corpus: small, rerunnable experiments through the real trainer
(docs/TRAINING.md, "Design choices on the digits corpus").

    .venv/bin/python benchmarks/design_choices.py --experiment image-choices [--seeds 1 2] [--jobs 2]
    .venv/bin/python benchmarks/design_choices.py --experiment vision-experts [--seeds 1 2] [--jobs 2]

``image-choices`` (SOLO vs its successors' choices): the tiny preset trained from scratch on the digits
stage-1 corpus (image, then its label word) with SOLO's choices (causal, 1d, row separators on), with each
switch alone (``--image-attention bidirectional``, ``--image-positions mrope``, data preprocessed with
``--row-separator off``) and with all three. Same budget for every arm: iterations, packs of --seq-length
tokens per iteration, learning-rate schedule, seed.

``vision-experts`` (do modality-specific weights keep the LM's language?): a small LM is trained first on a
text-only corpus (sentences about numbers from a fixed grammar, :func:`number_sentences`), then four
vision runs start from it with ``--finetune`` on the digits corpus: dense (``--vision-experts none``),
``ffn``, ``full`` and ``full --freeze-lm`` (the experts copied from their text twins at the start, as the
recipe does). Held-out text loss before (the base) and after the vision training, and digit accuracy.

Every arm: validation ``lm loss`` on the held-out digits (and on held-out text) every --eval-interval
iterations, and at the end the held-out digit accuracy by tools/evaluate.py (stage-1 prompt: BOS + image,
the answer the first word generated) with --load (megatron-core's generation with a KV cache) for
image-choices, on the Hugging Face export for vision-experts (how its published results were made:
--load did not serve `full` layers then; it does now, with the export's greedy tokens). Runs are one
process each (``nice``), --jobs at a time; --reuse keeps the runs an earlier invocation completed. Prints the table, writes one plot per experiment and
``results.json`` in --work.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
EXPERIMENTS = ("image-choices", "vision-experts")

# arm -> (trainer flags, image layout of its data: row separators on/off)
IMAGE_ARMS = {
    "SOLO (causal, 1d, sep)": ([], "on"),
    "bidirectional": (["--image-attention", "bidirectional"], "on"),
    "mrope": (["--image-positions", "mrope"], "on"),
    "no row sep": ([], "off"),
    "all three": (["--image-attention", "bidirectional", "--image-positions", "mrope"], "off"),
}
EXPERT_ARMS = {
    "dense": ["--vision-experts", "none"],
    "ffn": ["--vision-experts", "ffn"],
    "full": ["--vision-experts", "full"],
    "full + freeze-lm": ["--vision-experts", "full", "--freeze-lm"],
}

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()


def number_sentences(rng: random.Random) -> str:
    """One sentence of a fixed grammar about the numbers 0-20 (facts that hold: sums, differences, products,
    neighbours, parity, order). The digits' label words are among its words."""
    n = NUMBERS
    kind = rng.randrange(7)
    if kind == 0:
        a = rng.randrange(21)
        b = rng.randrange(21 - a)
        return f"{n[a]} plus {n[b]} is {n[a + b]}."
    if kind == 1:
        a = rng.randrange(21)
        b = rng.randrange(a + 1)
        return f"{n[a]} minus {n[b]} is {n[a - b]}."
    if kind == 2:
        a, b = rng.randrange(1, 6), rng.randrange(5)
        return f"{n[a]} times {n[b]} is {n[a * b]}."
    if kind == 3:
        a = rng.randrange(20)
        return f"the number after {n[a]} is {n[a + 1]}."
    if kind == 4:
        a = rng.randrange(1, 21)
        return f"the number before {n[a]} is {n[a - 1]}."
    if kind == 5:
        a = rng.randrange(21)
        return f"{n[a]} is an {'even' if a % 2 == 0 else 'odd'} number."
    a, b = rng.sample(range(21), 2)
    return f"{n[a]} is {'more' if a > b else 'less'} than {n[b]}."


def number_document(rng: random.Random, sentences: int) -> str:
    return " ".join(s[0].upper() + s[1:] for s in (number_sentences(rng) for _ in range(sentences)))


def write_text_corpus(path: str, docs: int, seed: int, chars: tuple[int, int] | None = None) -> None:
    """``docs`` documents as pretrain-format JSON lines (one assistant message): 4-9 sentences each, or,
    with ``chars``, as many as keep the document's length inside that range of characters."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            text = number_document(rng, rng.randint(4, 9))
            while chars and not chars[0] <= len(text) <= chars[1]:
                text = number_document(rng, rng.randint(8, 16))
            f.write(json.dumps({"messages": [{"role": "assistant", "content": text}]}) + "\n")


def sh(cmd, log, env=None):
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(["nice", "-n", "10", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {})))
    if r.returncode:  # said at once: a run in a --jobs thread would otherwise report only at the end
        print(f"error: {' '.join(cmd[:4])} ... failed (exit {r.returncode}); log: {log}", file=sys.stderr, flush=True)
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed (exit {r.returncode}); log: {log}")
    return time.time() - t0


class Work:
    """The experiment's directory: data, checkpoints, logs."""

    def __init__(self, a):
        self.a = a
        self.dir = os.path.abspath(a.work)
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.tok = os.path.join(self.dir, "tokenizer", "tokenizer.model")
        self.corpus = os.path.join(self.dir, "corpus")

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def preprocess(self, jsonl, prefix, *extra):
        if not os.path.exists(prefix + "-tokens.idx"):
            sh([PY, "tools/preprocess_data.py", "--input", jsonl, "--output-prefix", prefix, "--tokenizer-model",
                self.tok, "--format", "pretrain", "--seq-length", str(self.a.seq_length), "--image-root", self.corpus,
                "--no-progress", *extra], os.path.join(self.logs, f"preprocess-{os.path.basename(prefix)}.log"))
        return prefix

    def prepare_digits(self):
        """Tokenizer, the digits corpus, its training prefix and the held-out digits as a validation prefix
        (pretrain format), in both image layouts; the accuracy task file."""
        if not os.path.exists(self.tok):
            sh([PY, "tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", os.path.dirname(self.tok)],
               os.path.join(self.logs, "tokenizer.log"))
        if not os.path.exists(os.path.join(self.corpus, "test.jsonl")):
            sh([PY, "tools/make_digits_corpus.py", "--output", self.corpus], os.path.join(self.logs, "corpus.log"))
        heldout = os.path.join(self.corpus, "heldout_pretrain.jsonl")
        with open(os.path.join(self.corpus, "test.jsonl")) as f, open(f"{heldout}.{os.getpid()}.tmp", "w") as g:
            for row in map(json.loads, f):  # the held-out digits in the stage-1 format: image, then its word
                g.write(json.dumps({"messages": [{"role": "assistant", "content": [
                    {"type": "image_url", "image_url": {"url": row["image"]}}, {"type": "text", "text": row["answer"]}]}]})
                        + "\n")
        os.replace(f"{heldout}.{os.getpid()}.tmp", heldout)
        data = {}
        for layout in ("on", "off"):
            data[layout] = (
                self.preprocess(os.path.join(self.corpus, "pretrain.jsonl"), self.path("data", f"digits-sep{layout}"),
                                "--row-separator", layout),
                self.preprocess(heldout, self.path("data", f"heldout_digits-sep{layout}"), "--row-separator", layout))
        task = os.path.join(self.corpus, "digits_stage1.json")
        with open(f"{task}.{os.getpid()}.tmp", "w") as f:  # the demo's held-out digits, asked as stage 1 reads: BOS + image
            json.dump({"name": "digits", "kind": "exact_match", "data": "test.jsonl", "prompt": "Which digit is this?",
                       "max_new_tokens": 4,
                       "prompt_format": "pretrain"}, f)
        os.replace(f"{task}.{os.getpid()}.tmp", task)
        return data, task

    def prepare_text(self):
        """The number-sentence corpus: --text-docs training documents, and held-out documents of 75-115
        tokens (~5 characters a token), each alone in its pack, exactly --eval-iters x --gbs of them: every
        validation reads each held-out pack once, whatever the run's --seed (the validation order is
        seeded), so the base's text loss and the vision runs' are over the same tokens."""
        n_valid = self.a.eval_iters * self.a.gbs
        for name, docs, seed, chars in (("text_train", self.a.text_docs, 1, None),
                                        (f"heldout_text{n_valid}", n_valid, 2, (375, 575))):
            jsonl = os.path.join(self.corpus, f"{name}.jsonl")
            if not os.path.exists(jsonl):
                write_text_corpus(jsonl, docs, seed, chars)
        heldout = self.preprocess(os.path.join(self.corpus, f"heldout_text{n_valid}.jsonl"),
                                  self.path("data", f"heldout_text-{n_valid}"))
        with open(heldout + ".stats.json") as f:
            packs = json.load(f)["packs"]
        if packs != n_valid:
            sys.exit(f"error: the held-out text has {packs} packs, not {n_valid}; choose another --seq-length")
        return self.preprocess(os.path.join(self.corpus, "text_train.jsonl"), self.path("data", "text_train")), heldout


def train(w: Work, name, port, data, valid, iters, lr, seed, *extra):
    """One run through the real entry point (torchrun, one process); returns the validation curves per
    validation prefix, the training loss per iteration and the seconds."""
    a = w.a
    log_file = os.path.join(w.logs, f"{name}.jsonl")
    done = os.path.join(w.path("ckpt", name), "latest_checkpointed_iteration.txt")
    if a.reuse and os.path.exists(done) and open(done).read().strip() == str(iters) and os.path.exists(log_file):
        return (*read_log(log_file), 0.0)  # a run an earlier invocation completed (--reuse)
    if os.path.exists(log_file):
        os.remove(log_file)
    shutil.rmtree(w.path("ckpt", name), ignore_errors=True)  # a --save holding a checkpoint would be resumed
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "megatron_solo.train",
           "--model", "tiny", "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.gbs),
           "--global-batch-size", str(a.gbs), "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
           "--lr-warmup-iters", str(max(1, iters // 10)), "--weight-decay", "0.1", "--clip-grad", "1.0",
           "--adam-beta2", "0.95", "--data-path", data, "--valid-data-path", *valid, "--tokenizer-model", w.tok,
           "--seed", str(seed), "--num-workers", "0", "--eval-interval", str(a.eval_interval),
           "--eval-iters", str(a.eval_iters), "--log-interval", "1", "--save", w.path("ckpt", name),
           "--no-save-optim", "--log-file", log_file, *extra]
    seconds = sh(cmd, os.path.join(w.logs, f"{name}.log"))
    return (*read_log(log_file), seconds)


def read_log(log_file):
    """A run's --log-file: validation lm loss per iteration of each validation prefix, training lm loss."""
    valid_curves, train_loss = {}, {}
    with open(log_file) as f:
        for rec in map(json.loads, f):
            if rec["kind"] == "valid":
                for k, v in rec.items():
                    if k.startswith("valid/") and k.endswith("/lm loss"):
                        valid_curves.setdefault(k.split("/")[1].split("-")[0], {})[rec["iteration"]] = v
            elif rec["kind"] == "train":
                train_loss[rec["iteration"]] = rec["lm loss"]
    return valid_curves, train_loss


def accuracy(w: Work, name, task, export=False):
    """Held-out digit accuracy of the run's checkpoint: tools/evaluate.py --load (one process), or with
    ``export`` on its Hugging Face export (megatron-to-hf, then tools/evaluate.py --hf-dir): the
    vision-expert arms as their published results were made (before --load served `full` layers)."""
    out = w.path("eval", name)
    if export:
        hf = w.path("hf", name)
        sh([PY, "tools/convert_checkpoint.py", "megatron-to-hf", "--load", w.path("ckpt", name), "--save", hf,
            "--tokenizer-model", w.tok, "--overwrite"], os.path.join(w.logs, f"export-{name}.log"))
        source = ["--hf-dir", hf]
    else:
        source = ["--load", w.path("ckpt", name), "--tokenizer-model", w.tok]
    sh([PY, "tools/evaluate.py", *source, "--tasks", task, "--output-dir", out, "--batch-size", "64"],
       os.path.join(w.logs, f"eval-{name}.log"))
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["digits"]["metrics"]["accuracy"]


def run_arms(w: Work, jobs, specs):
    """specs: [(key, callable)] run --jobs at a time; returns {key: result}."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        futures = {key: ex.submit(fn) for key, fn in specs}
        return {key: f.result() for key, f in futures.items()}


def image_choices(w: Work):
    a = w.a
    data, task = w.prepare_digits()
    specs = []
    for i, (arm, (flags, layout)) in enumerate(IMAGE_ARMS.items()):
        for j, seed in enumerate(a.seeds):
            name = f"ic-{i}-s{seed}"
            train_data, heldout = data[layout]

            def one(name=name, flags=flags, train_data=train_data, heldout=heldout, seed=seed, port=a.port + 10 * i + j):
                curves, train_loss, seconds = train(w, name, port, train_data, [heldout], a.iters, a.lr, seed, *flags)
                acc = accuracy(w, name, task)
                print(f"  {name} done: {seconds:.0f} s, valid {curves['heldout_digits'][a.iters]:.4f}, "
                      f"accuracy {acc:.1%}", flush=True)
                return {"valid": curves["heldout_digits"], "train": train_loss, "accuracy": acc, "seconds": seconds}

            specs.append(((arm, seed), one))
    res = run_arms(w, a.jobs, specs)
    results = {arm: {str(seed): res[(arm, seed)] for seed in a.seeds} for arm in IMAGE_ARMS}
    print(f"\nheld-out digits after {a.iters} iterations of {a.gbs} x {a.seq_length} tokens, lr {a.lr:g}; "
          f"seeds {' '.join(map(str, a.seeds))} (mean [each seed])")
    print(f"  {'arm':24s} {'valid lm loss':>32s} {'accuracy':>30s}")
    for arm, by_seed in results.items():
        losses = [r["valid"][a.iters] for r in by_seed.values()]
        accs = [r["accuracy"] for r in by_seed.values()]
        print(f"  {arm:24s} {fmt(losses, '{:.4f}'):>32s} {fmt(accs, '{:.1%}'):>30s}")
    return results


def vision_experts(w: Work):
    a = w.a
    data, task = w.prepare_digits()
    text_train, heldout_text = w.prepare_text()
    digits_train, heldout_digits = data["on"]
    valid = [heldout_text, heldout_digits]
    base_curves, base_train, base_s = train(w, "ve-base", a.port, text_train, valid, a.base_iters, a.base_lr,
                                            1234, "--freeze-vision")
    print(f"  base LM: {a.base_iters} it on text, {base_s:.0f} s; held-out text loss "
          f"{base_curves['heldout_text'][a.base_iters]:.4f}", flush=True)
    specs = []
    for i, (arm, flags) in enumerate(EXPERT_ARMS.items()):
        for j, seed in enumerate(a.seeds):
            name = f"ve-{i}-s{seed}"

            def one(name=name, flags=flags, seed=seed, port=a.port + 10 * (i + 1) + j):
                curves, train_loss, seconds = train(w, name, port, digits_train, valid, a.iters, a.lr, seed,
                                                    "--load", w.path("ckpt", "ve-base"), "--finetune", *flags)
                acc = accuracy(w, name, task, export=True)  # one evaluation path for the four arms
                print(f"  {name} done: {seconds:.0f} s, text {curves['heldout_text'][a.iters]:.4f}, digits "
                      f"{curves['heldout_digits'][a.iters]:.4f}, accuracy {acc:.1%}", flush=True)
                return {"valid_text": curves["heldout_text"], "valid_digits": curves["heldout_digits"],
                        "train": train_loss, "accuracy": acc, "seconds": seconds}

            specs.append(((arm, seed), one))
    res = run_arms(w, a.jobs, specs)
    results = {arm: {str(seed): res[(arm, seed)] for seed in a.seeds} for arm in EXPERT_ARMS}
    before = base_curves["heldout_text"][a.base_iters]
    print(f"\nbase LM: {a.base_iters} iterations on the number-sentence corpus; held-out text lm loss {before:.4f}, "
          f"held-out digits lm loss {base_curves['heldout_digits'][a.base_iters]:.4f} (no image seen)")
    print(f"vision runs: {a.iters} iterations of {a.gbs} x {a.seq_length} tokens of digits, lr {a.lr:g}; "
          f"seeds {' '.join(map(str, a.seeds))} (mean [each seed])")
    print(f"  {'arm':18s} {'held-out text loss after':>30s} {'held-out digits loss':>30s} {'accuracy':>26s}")
    for arm, by_seed in results.items():
        text = [r["valid_text"][a.iters] for r in by_seed.values()]
        dig = [r["valid_digits"][a.iters] for r in by_seed.values()]
        accs = [r["accuracy"] for r in by_seed.values()]
        print(f"  {arm:18s} {fmt(text, '{:.4f}'):>30s} {fmt(dig, '{:.4f}'):>30s} {fmt(accs, '{:.1%}'):>26s}")
    return {"base": {"valid": base_curves, "train": base_train, "seconds": base_s}, "arms": results}


def fmt(values, f):
    return f"{f.format(statistics.mean(values))} [{' '.join(f.format(v) for v in values)}]"


def plot(a, results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if a.experiment == "image-choices":
        panels = [("held-out digits: lm loss", {arm: {s: r["valid"] for s, r in by.items()}
                                                 for arm, by in results.items()})]
        title = f"digits, tiny preset from scratch, {a.iters} it x {a.gbs} packs of {a.seq_length}, lr {a.lr:g}"
        accs = {arm: [r["accuracy"] for r in by.values()] for arm, by in results.items()}
    else:
        arms, base = results["arms"], results["base"]["valid"]
        start = {k: base[k][a.base_iters] for k in ("heldout_digits", "heldout_text")}  # every arm starts there
        panels = [("held-out digits: lm loss", {arm: {s: {0: start["heldout_digits"], **r["valid_digits"]}
                                                      for s, r in by.items()} for arm, by in arms.items()}),
                  ("held-out TEXT: lm loss", {arm: {s: {0: start["heldout_text"], **r["valid_text"]}
                                                    for s, r in by.items()} for arm, by in arms.items()})]
        title = (f"from a text-trained tiny LM: {a.iters} it of digits x {a.gbs} packs of {a.seq_length}, "
                 f"lr {a.lr:g}")
        accs = {arm: [r["accuracy"] for r in by.values()] for arm, by in arms.items()}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.8), dpi=90, squeeze=False)
    for ax, (label, curves) in zip(axes[0], panels):
        for k, (arm, by_seed) in enumerate(curves.items()):
            for n, c in enumerate(by_seed.values()):
                xs = sorted(c)
                ax.plot(xs, [c[i] for i in xs], color=f"C{k}", lw=1.2, ls=("-", "--", ":", "-.")[n % 4],
                        marker="o", ms=2.5,
                        label=f"{arm}: acc {statistics.mean(accs[arm]):.1%}" if n == 0 else None)
        if a.experiment == "vision-experts" and "TEXT" in label:
            before = results["base"]["valid"]["heldout_text"][a.base_iters]
            ax.axhline(before, color="gray", lw=0.8, ls=":")
            ax.text(a.eval_interval, before, " the base LM before vision training", va="bottom", fontsize=7,
                    color="gray")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}; one line style per seed ({len(a.seeds)})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    print(f"plot: {png} ({os.path.getsize(png) // 1024} KiB)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", choices=EXPERIMENTS, required=True,
                    help="image-choices: attention, positions, row separators (issue 23); vision-experts: "
                         "dense vs ffn vs full vs full --freeze-lm from a text-trained LM (issue 24)")
    ap.add_argument("--work", default=None, help="data, checkpoints and logs (default: bench_out/design_choices)")
    ap.add_argument("--png", default=None, help="the plot (default: docs/img/design_choices_<experiment>.png)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="--seed of each run (default: 1 2)")
    ap.add_argument("--iters", type=int, default=None,
                    help="iterations of every arm (default: 40 image-choices, 60 vision-experts)")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate, cosine to a tenth (default: 4e-3 image-choices, 2e-3 vision-experts)")
    ap.add_argument("--base-iters", type=int, default=200, help="vision-experts: text training of the base LM")
    ap.add_argument("--base-lr", type=float, default=4e-3, help="vision-experts: the base LM's peak learning rate")
    ap.add_argument("--text-docs", type=int, default=3000, help="vision-experts: documents of the text corpus "
                    "(a tenth as many more are held out)")
    ap.add_argument("--gbs", type=int, default=16, help="packs per iteration (default: 16)")
    ap.add_argument("--seq-length", type=int, default=128, help="tokens per pack (default: 128)")
    ap.add_argument("--eval-interval", type=int, default=5, help="(default: 5)")
    ap.add_argument("--eval-iters", type=int, default=2, help="validation batches per evaluation (default: 2)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each; default: 1)")
    ap.add_argument("--port", type=int, default=29741)
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs an earlier invocation completed in --work (same name and iterations: "
                         "their checkpoint and log) instead of training them again; evaluations are redone")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plot from --work's results-<experiment>.json (no training)")
    a = ap.parse_args(argv)
    if a.iters is None:
        a.iters = 40 if a.experiment == "image-choices" else 60
    if a.lr is None:
        a.lr = 4e-3 if a.experiment == "image-choices" else 2e-3
    a.work = a.work or "bench_out/design_choices"
    a.png = a.png or f"docs/img/design_choices_{a.experiment.replace('-', '_')}.png"
    if a.iters % a.eval_interval or (a.experiment == "vision-experts" and a.base_iters % a.eval_interval):
        ap.error("--iters and --base-iters must be multiples of --eval-interval")
    return a


def main():
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    a = parse_args()
    w = Work(a)
    if a.replot:
        with open(w.path(f"results-{a.experiment}.json")) as f:
            saved = json.load(f)
        for k in ("iters", "base_iters", "lr", "gbs", "seq_length", "seeds", "eval_interval"):
            setattr(a, k, saved["args"][k])  # the plot describes the runs that made the results
        results = saved["results"]
        if a.experiment == "vision-experts":  # JSON keys are strings; the curves' iterations are numbers
            results["base"]["valid"] = {k: {int(i): v for i, v in c.items()} for k, c in results["base"]["valid"].items()}
            for by in results["arms"].values():
                for r in by.values():
                    for k in ("valid_text", "valid_digits"):
                        r[k] = {int(i): v for i, v in r[k].items()}
        else:
            for by in results.values():
                for r in by.values():
                    r["valid"] = {int(i): v for i, v in r["valid"].items()}
        plot(a, results, a.png)
        return
    print(f"== {a.experiment}: seeds {a.seeds}, {a.jobs} run(s) at a time; load average before: "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.time()
    results = image_choices(w) if a.experiment == "image-choices" else vision_experts(w)
    total = time.time() - t0
    print(f"== {total:.0f} s in all; load average after: {os.getloadavg()[0]:.1f}")
    with open(w.path(f"results-{a.experiment}.json"), "w") as f:
        json.dump({"args": vars(a), "results": results, "seconds": total}, f, indent=1)
    plot(a, results, a.png)


if __name__ == "__main__":
    main()
