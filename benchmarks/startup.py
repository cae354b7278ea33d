#!/usr/bin/env python
"""How long a command takes to answer, each figure a median over alternating fresh processes, with its
baseline measured in the same run.

    .venv/bin/python benchmarks/startup.py --repeats 5 [--tiny-run]

(a) a launch mistake (a mistyped --data-path prefix) through the launchers' pre-flight
    (``python -m megatron_solo.training.preflight``), which now makes the checks that need no torch first
    (megatron_solo/training/early_checks.py); baseline: the same checks in the pre-flight's former order
    (torch, megatron-core and the run's config first, then the input checks), run in the same process kind;
(b) the floor both pay: a bare interpreter, and ``import torch, megatron.core`` (what the early checks avoid);
(c) importing megatron-core as the entry points do now (``mcore_fixes.apply()`` first: its fused kernels compile
    on first call, so torch's compiler is not imported); baseline: ``import torch, megatron.core`` (what every
    process paid before: megatron-core's ``jit_fuser`` = ``torch.compile`` imports dynamo and inductor);
(d) with --tiny-run: the fixed start-up of a tiny training run (one process, CPU): the time of a 1-iteration
    run minus one step (a 2-iteration run's extra time); baseline in the same run: the same trainer with
    megatron-core imported before its entry point runs (the former start-up).
Each figure in wall seconds and in CPU seconds of the process (user + system): on a shared machine the CPU
seconds are the steadier measure of the work a start-up does.
Data: the demo's digits (40 records), SOLO's tokenizer over mistral-common, built into a temporary directory.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(args, **kw) -> tuple:
    """((wall seconds, CPU seconds), the completed process) of one fresh process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", WORLD_SIZE="1", **kw.pop("env", {}))
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, **kw)
    took = time.perf_counter() - t
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (took, c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime), r


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
    """name -> ((wall median, min, max), (CPU median, min, max)); each fn returns (wall, CPU) of one process."""
    times = {k: [] for k in fns}
    for _ in range(repeats):  # alternating: the machine's load drifts over a run
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: tuple((statistics.median(x), min(x), max(x)) for x in zip(*v)) for k, v in times.items()}


DEFERRED_IMPORT = "from megatron_solo import mcore_fixes\nmcore_fixes.apply()\nimport megatron.core"
# The trainer's entry point as the launchers run it (python -m megatron_solo.train), with megatron-core imported
# first for the baseline: its apply() then finds it imported, as every process did before the deferral.
TRAIN = "import sys, runpy\n{pre}\nsys.argv[0] = 'train'\nrunpy.run_module('megatron_solo.train', run_name='__main__')"


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

        def deferred():
            took, r = run([PY, "-c", DEFERRED_IMPORT + "\nimport sys\nassert 'torch._inductor.compile_fx' not in sys.modules"])
            assert r.returncode == 0, r.stderr[-2000:]
            return took

        m = medians({"early checks (now)": new, "former order (baseline)": old, "bare python": bare,
                     "import torch, megatron.core": imports, "megatron-core, compile deferred": deferred}, a.repeats)
        report(m, a.repeats)
        ratio("a mistyped prefix through the pre-flight", m["former order (baseline)"], m["early checks (now)"])
        ratio("importing megatron-core", m["import torch, megatron.core"], m["megatron-core, compile deferred"])

        if a.tiny_run:
            base = ["--model", "tiny", "--seq-length", "128", "--global-batch-size", "2", "--micro-batch-size", "1",
                    "--split", "100,0,0", "--tokenizer-model", d["tokenizer"], "--data-path", d["prefix"],
                    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0"]

            def iters(n, pre=""):
                def go():
                    took, r = run([PY, "-c", TRAIN.format(pre=pre), *base, "--train-iters", str(n)])
                    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
                    return took
                return go

            t = medians({"tiny run, 1 iteration (now)": iters(1), "tiny run, 2 iterations (now)": iters(2),
                         "tiny run, 1 iteration (baseline)": iters(1, "import torch, megatron.core")}, a.repeats)
            report(t, a.repeats)
            for i, what in enumerate(("wall", "CPU")):
                one, two = t["tiny run, 1 iteration (now)"][i][0], t["tiny run, 2 iterations (now)"][i][0]
                step = two - one
                now, before = one - step, t["tiny run, 1 iteration (baseline)"][i][0] - step
                print(f"tiny run's fixed start-up ({what}): {before:.2f} s -> {now:.2f} s = {before / now:.2f}x "
                      f"(one step {step:.2f} s)")


def report(m: dict, repeats: int) -> None:
    print(f"load average now: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); median (range) of {repeats}")
    for k, ((w, wlo, whi), (c, clo, chi)) in m.items():
        print(f"  {k:34s} wall {w:7.2f} s ({wlo:.2f}-{whi:.2f})   CPU {c:7.2f} s ({clo:.2f}-{chi:.2f})")


def ratio(what: str, baseline, now) -> None:
    print(f"{what}: {baseline[0][0] / now[0][0]:.2f}x faster in wall time ({baseline[0][0]:.2f} s -> {now[0][0]:.2f} s), "
          f"{baseline[1][0] / now[1][0]:.2f}x in CPU time ({baseline[1][0]:.2f} s -> {now[1][0]:.2f} s)")


if __name__ == "__main__":
    main()
