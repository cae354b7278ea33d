#!/usr/bin/env python
"""How long a command takes to answer, each figure a median over alternating fresh processes, with its
baseline measured in the same run.

    .venv/bin/python benchmarks/startup.py --repeats 5 [--tiny-run]

(a) a launch mistake (a mistyped --data-path prefix) through the launchers' pre-flight
    (``python -m megatron_solo.training.preflight``), which now makes the checks that need no torch first
    (megatron_solo/training/early_checks.py); baseline: the same checks in the pre-flight's former order
    (torch, megatron-core and the run's config first, then the input checks), run in the same process kind;
(b) the floor both pay: a bare interpreter, and ``import torch, megatron.core`` (what the early checks avoid);
(c) with --tiny-run: the fixed start-up of a tiny training run (one process, CPU): the wall time of a
    1-iteration run minus one step (a 2-iteration run's extra time), the part imports take, and the rest.
Data: the demo's digits (40 records), SOLO's tokenizer over mistral-common, built into a temporary directory.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(args, **kw) -> float:
    """(wall seconds, the completed process) of one fresh process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", WORLD_SIZE="1", **kw.pop("env", {}))
    t = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, **kw)
    took = time.perf_counter() - t
    return took, r


def make_data(root: str) -> dict:
    subprocess.run([PY, "tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", f"{root}/tok"],
                   cwd=ROOT, check=True, capture_output=True)
    subprocess.run([PY, "tools/make_digits_corpus.py", "--output", f"{root}/corpus"], cwd=ROOT, check=True,
                   capture_output=True)
    with open(f"{root}/corpus/pretrain.jsonl") as f, open(f"{root}/small.jsonl", "w") as g:
        g.writelines(f.readlines()[:40])
    subprocess.run([PY, "tools/preprocess_data.py", "--input", f"{root}/small.jsonl", "--output-prefix",
                    f"{root}/data/pretrain", "--tokenizer-model", f"{root}/tok/tokenizer.model", "--seq-length", "128",
                    "--image-root", f"{root}/corpus", "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    return {"prefix": f"{root}/data/pretrain", "tokenizer": f"{root}/tok/tokenizer.model"}


OLD_ORDER = """import os, sys
from megatron_solo import errors, quiet
quiet.filter_known_warnings()
from megatron_solo.data.dataset import DataSplitError, check_split_sizes
from megatron_solo.training import config, faults
from megatron_solo.training.arguments import build_parser
try:
    faults.check_inputs(config.build_train_config(build_parser().parse_args(sys.argv[1:])))
except errors.UserError as e:
    errors.print_error(str(e))
    sys.exit(e.exit_code)
"""


def medians(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):  # alternating: the machine's load drifts over a run
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny-run", action="store_true", help="also measure a tiny training run's fixed start-up")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        d = make_data(root)
        flags = ["--model", "tiny", "--seq-length", "128", "--train-iters", "2", "--global-batch-size", "2",
                 "--split", "100,0,0", "--tokenizer-model", d["tokenizer"], "--data-path", d["prefix"][:-3] + "ian"]

        def new():
            took, r = run([PY, "-m", "megatron_solo.training.preflight", "--launcher-vars", "data-path=DATA_PATH",
                           "--", *flags])
            assert r.returncode == 2 and "did you mean" in r.stderr, r.stderr[-2000:]
            return took

        def old():
            took, r = run([PY, "-c", OLD_ORDER, *flags])
            assert r.returncode == 2 and "did you mean" in r.stderr, r.stderr[-2000:]
            return took

        def bare():
            return run([PY, "-c", "pass"])[0]

        def imports():
            return run([PY, "-c", "import torch, megatron.core"])[0]

        m = medians({"early checks (now)": new, "former order (baseline)": old, "bare python": bare,
                     "import torch, megatron.core": imports}, a.repeats)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); median of {a.repeats}")
        for k, (med, lo, hi) in m.items():
            print(f"  {k:30s} {med:7.2f} s  ({lo:.2f}-{hi:.2f})")
        print(f"a mistyped prefix through the pre-flight: {m['former order (baseline)'][0] / m['early checks (now)'][0]:.1f}x "
              f"faster ({m['former order (baseline)'][0]:.2f} s -> {m['early checks (now)'][0]:.2f} s)")

        if a.tiny_run:
            base = ["--model", "tiny", "--seq-length", "128", "--global-batch-size", "2", "--micro-batch-size", "1",
                    "--split", "100,0,0", "--tokenizer-model", d["tokenizer"], "--data-path", d["prefix"],
                    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0"]

            def iters(n):
                def go():
                    took, r = run([PY, "-m", "megatron_solo.train", *base, "--train-iters", str(n)])
                    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
                    return took
                return go

            t = medians({"1 iteration": iters(1), "2 iterations": iters(2)}, a.repeats)
            one, two = t["1 iteration"][0], t["2 iterations"][0]
            fixed = one - (two - one)
            print(f"tiny run, one process: 1 iteration {one:.2f} s, 2 iterations {two:.2f} s; fixed start-up "
                  f"{fixed:.2f} s, of which importing torch + megatron-core {m['import torch, megatron.core'][0]:.2f} s")


if __name__ == "__main__":
    main()
