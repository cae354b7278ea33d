#!/usr/bin/env python
"""How long a command takes to answer, each figure a median over alternating fresh processes, with its
baseline measured in the same run.

    .venv/bin/python benchmarks/startup.py --repeats 5 [--tiny-run]
    .venv/bin/python benchmarks/startup.py --repeats 3 --launch BASELINE_TREE     # (e) only
    .venv/bin/python benchmarks/startup.py --repeats 1 --mistakes BASELINE_TREE   # (f) only

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
    megatron-core imported before its entry point runs (the former start-up);
(e) with --launch BASELINE_TREE: the whole start-up as a user sees it, the launcher's tiny command
    (``PRESET=tiny ... bash examples/stage1_pretrain.sh``: pre-flight, torchrun, 2 workers) from the command to
    its first iteration line, against the same command in BASELINE_TREE (a git worktree of an older commit with
    its own venv), alternating; with each process's timeline (benchmarks/startup_timeline: start, imports,
    each start-up step), medians over the repeats. CPU: all processes of the launch, to its exit;
(f) with --mistakes BASELINE_TREE: each mistake the launchers' pre-flight catches (MISTAKES), the launcher's
    whole command to its one error line, now and in BASELINE_TREE, alternating.
Each figure in wall seconds and in CPU seconds of the process (user + system): on a shared machine the CPU
seconds are the steadier measure of the work a start-up does.
Data: the demo's digits (40 records), SOLO's tokenizer over mistral-common, built into a temporary directory.
"""

import argparse
import collections
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from megatron_solo.netutil import free_port

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


def make_data(root: str, tree: str = ROOT) -> dict:
    """The data in ``tree``'s own formats (an older tree may not read a newer tree's records)."""
    py = os.path.join(tree, ".venv/bin/python") if tree != ROOT else PY
    subprocess.run([py, "tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", f"{root}/tok"],
                   cwd=tree, check=True, capture_output=True)
    subprocess.run([py, "tools/make_digits_corpus.py", "--output", f"{root}/corpus"], cwd=tree, check=True,
                   capture_output=True)
    with open(f"{root}/corpus/pretrain.jsonl") as f, open(f"{root}/small.jsonl", "w") as g:
        g.writelines(f.readlines()[:40])
    with open(f"{root}/corpus/pretrain.jsonl") as f, open(f"{root}/three.jsonl", "w") as g:
        g.writelines(f.readlines()[:3])
    for name, records in (("pretrain", "small.jsonl"), ("three", "three.jsonl")):
        subprocess.run([py, "tools/preprocess_data.py", "--input", f"{root}/{records}", "--output-prefix",
                        f"{root}/data/{name}", "--tokenizer-model", f"{root}/tok/tokenizer.model", "--seq-length",
                        "128", "--image-root", f"{root}/corpus", "--no-progress"], cwd=tree, check=True,
                       capture_output=True)
    return {"prefix": f"{root}/data/pretrain", "tokenizer": f"{root}/tok/tokenizer.model", "root": root,
            "one_pack": f"{root}/data/three"}


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
    ap.add_argument("--launch", metavar="BASELINE_TREE",
                    help="only (e): the launcher's tiny command to its first iteration line, vs this older tree")
    ap.add_argument("--mistakes", metavar="BASELINE_TREE",
                    help="only (f): each mistake the launchers' pre-flight catches, vs this older tree")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        if a.launch:
            return launch_comparison(root, os.path.abspath(a.launch), a.repeats)
        if a.mistakes:
            return mistakes_comparison(root, os.path.abspath(a.mistakes), a.repeats)
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


FIRST_ITERATION = re.compile(r"iteration +1/")
TIMELINE_SITE = os.path.join(ROOT, "benchmarks", "startup_timeline")


def launch(tree: str, d: dict, root: str, n: int) -> dict:
    """One launch of the tiny stage-1 command in ``tree``: wall seconds to its first iteration line and to
    its exit, CPU seconds of all its processes, and its timeline (benchmarks/startup_timeline)."""
    timeline = os.path.join(root, f"timeline.{n}")
    env = dict(os.environ, PRESET="tiny", DATA_PATH=d["prefix"], TOKENIZER_MODEL=d["tokenizer"], TRAIN_ITERS="1",
               SPLIT="100,0,0", STAGE1_CKPT=os.path.join(root, f"ck.{n}"), PYTHON=os.path.join(tree, ".venv/bin/python"),
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=TIMELINE_SITE, SOLO_TIMELINE=timeline)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.Popen(["bash", "examples/stage1_pretrain.sh"], cwd=tree, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in p.stdout:
        lines.append(line)
        if first is None and FIRST_ITERATION.search(line):
            first = time.time() - t0
    rc = p.wait()
    took = time.time() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert rc == 0 and first is not None, "".join(lines[-60:])
    events = collections.OrderedDict()
    with open(timeline) as f:
        for row in f:
            t, cpu, _pid, role, event = row.rstrip("\n").split(" ", 4)
            events.setdefault((role, event), (float(t) - t0, float(cpu)))
    return {"first": first, "exit": took, "cpu": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
            "events": events}


def launch_comparison(root: str, baseline: str, repeats: int) -> None:
    trees = {"now": ROOT, "baseline": baseline}
    data = {k: make_data(os.path.join(root, k), tree) for k, tree in trees.items()}
    runs = {k: [] for k in trees}
    for i in range(repeats):  # alternating: the machine's load drifts over a run
        for k, tree in trees.items():
            runs[k].append(launch(tree, data[k], root, len(runs["now"]) + len(runs["baseline"])))
    head = subprocess.run(["git", "-C", baseline, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    print(f"baseline tree: {baseline} ({head.stdout.strip()[:100]})")
    print(f"load average now: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); median (range) of {repeats} launches")
    med = {}
    for k, rs in runs.items():
        for key in ("first", "exit", "cpu"):
            x = [r[key] for r in rs]
            med[k, key] = statistics.median(x)
            print(f"  {k:8s} {key:5s} {statistics.median(x):7.2f} s ({min(x):.2f}-{max(x):.2f})")
    print(f"launcher command to its first iteration line: {med['baseline', 'first']:.2f} s -> {med['now', 'first']:.2f} s"
          f" = {med['baseline', 'first'] / med['now', 'first']:.2f}x; to its exit {med['baseline', 'exit']:.2f} s -> "
          f"{med['now', 'exit']:.2f} s; CPU of all its processes {med['baseline', 'cpu']:.2f} s -> {med['now', 'cpu']:.2f} s"
          f" = {med['baseline', 'cpu'] / med['now', 'cpu']:.2f}x")
    for k, rs in runs.items():
        print(f"timeline ({k}): seconds since the command (median), the process's CPU seconds then, role, event")
        keys = [key for key in rs[0]["events"] if all(key in r["events"] for r in rs)]
        rows = [(statistics.median(r["events"][key][0] for r in rs), statistics.median(r["events"][key][1] for r in rs),
                 *key) for key in keys]
        for t, cpu, role, event in sorted(rows, key=lambda row: row[0]):
            print(f"  {t:7.2f} {cpu:6.2f}  {role:9s} {event}")


# The mistakes of tests/test_first_hour*.py and tests/test_startup.py, each as the launcher's user makes it:
# (name, launcher, environment over the base one; {one_pack}/{root}: the tree's data).
MISTAKES = [
    ("no GPU, the 7B recipe (no PRESET=tiny)", "stage1_pretrain.sh", {}),
    ("unknown preset (PRESET=small)", "stage1_pretrain.sh", {"PRESET": "small"}),
    ("world size (TP=4 on 2 processes)", "stage1_pretrain.sh", {"PRESET": "tiny", "TP": "4"}),
    ("global batch (GLOBAL_BATCH_SIZE=7)", "stage1_pretrain.sh", {"PRESET": "tiny", "GLOBAL_BATCH_SIZE": "7"}),
    ("empty valid split (1-pack prefix, SPLIT 99,1,0)", "stage1_pretrain.sh", {"PRESET": "tiny", "DATA_PATH": "{one_pack}"}),
    ("SFT without a checkpoint to start from", "sft.sh", {"PRESET": "tiny"}),
    ("mistyped prefix", "stage1_pretrain.sh", {"PRESET": "tiny", "DATA_PATH": "{root}/data/pretrian"}),
    ("a prefix's file (-tokens.bin)", "stage1_pretrain.sh", {"PRESET": "tiny", "DATA_PATH": "{root}/data/pretrain-tokens.bin"}),
    ("tokenizer directory", "stage1_pretrain.sh", {"PRESET": "tiny", "TOKENIZER_MODEL": "{root}/tok"}),
    ("DATA_PATH not set", "stage2_pretrain.sh", {"PRESET": "tiny", "DATA_PATH": ""}),
]


def mistakes_comparison(root: str, baseline: str, repeats: int) -> None:
    """(f): each mistake through the launcher, now and in ``baseline``, alternating: wall and CPU seconds of the
    whole command (bash and every process it starts) to its one error line."""
    trees = {"now": ROOT, "baseline": baseline}
    data = {k: make_data(os.path.join(root, k), tree) for k, tree in trees.items()}

    def one(k, script, extra):
        d = data[k]
        env = {key: v for key, v in os.environ.items() if key not in ("PRESET", "PYTHONPATH")}
        env.update(DATA_PATH=d["prefix"], TOKENIZER_MODEL=d["tokenizer"], TRAIN_ITERS="2", OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore", PYTHON=os.path.join(trees[k], ".venv/bin/python"),
                   STAGE1_CKPT=os.path.join(root, "m_s1"), STAGE3_CKPT=os.path.join(root, "no_stage3"),
                   SFT_CKPT=os.path.join(root, "m_sft"), MASTER_PORT=str(free_port()))
        env.update({key: v.format(**d) for key, v in extra.items()})
        if "DATA_PATH" in extra and not extra["DATA_PATH"]:
            del env["DATA_PATH"]
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        r = subprocess.run(["bash", f"examples/{script}"], cwd=trees[k], env=env, capture_output=True, text=True)
        took = time.perf_counter() - t
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 2 and lines and lines[0].startswith("error: "), (k, script, extra, lines[-20:])
        return took, c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, lines[0]

    head = subprocess.run(["git", "-C", baseline, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    print(f"baseline tree: {baseline} ({head.stdout.strip()[:100]}); median of {repeats} alternating runs")
    print("| mistake | now: wall / CPU | baseline: wall / CPU | line now |")
    print("|---|---|---|---|")
    for name, script, extra in MISTAKES:
        runs = {"now": [], "baseline": []}
        for _ in range(repeats):
            for k in runs:
                runs[k].append(one(k, script, extra))
        cell = {k: f"{statistics.median(r[0] for r in rs):.2f} s / {statistics.median(r[1] for r in rs):.2f} s"
                for k, rs in runs.items()}
        print(f"| {name} | {cell['now']} | {cell['baseline']} | `{runs['now'][-1][2][:90]}` |")
    print(f"load average now: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")


def report(m: dict, repeats: int) -> None:
    print(f"load average now: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); median (range) of {repeats}")
    for k, ((w, wlo, whi), (c, clo, chi)) in m.items():
        print(f"  {k:34s} wall {w:7.2f} s ({wlo:.2f}-{whi:.2f})   CPU {c:7.2f} s ({clo:.2f}-{chi:.2f})")


def ratio(what: str, baseline, now) -> None:
    print(f"{what}: {baseline[0][0] / now[0][0]:.2f}x faster in wall time ({baseline[0][0]:.2f} s -> {now[0][0]:.2f} s), "
          f"{baseline[1][0] / now[1][0]:.2f}x in CPU time ({baseline[1][0]:.2f} s -> {now[1][0]:.2f} s)")


if __name__ == "__main__":
    main()
