#!/usr/bin/env python3
"""Batched evaluation (tools/evaluate.py's runner: equal-length prompts in one ``generate``, KV cache) vs
one sample at a time (``--batch-size 1``: one ``generate`` call per sample, KV cache too), on the same
export and the same task, with equal answers.

Goal (issue 25): batched >= 3x faster. The task is the digits demo's held-out set (exact_match,
``megatron_solo/demo/evaluate.py``'s ``digits_task``) on a random SOLO export of the tests' tiny shape
(tests/helpers_convert.py), or on ``--hf-dir`` (e.g. demo_out/hf after ``make demo``).

    .venv/bin/python benchmarks/evaluate.py --samples 64 --repeats 3
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", default=None, help="an export (default: a random one of the tests' tiny shape)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    import torch

    from megatron_solo import quiet
    from megatron_solo.demo.digits import write_corpora
    from megatron_solo.demo.evaluate import digits_task
    from megatron_solo.eval.runner import HFExport, run_task

    quiet.filter_known_warnings()
    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="eval_bench_")
    hf_dir = a.hf_dir
    if hf_dir is None:
        from tests.helpers_convert import make_random_solo

        hf_dir = make_random_solo(os.path.join(work, "hf"), dtype=torch.float32)
    write_corpora(os.path.join(work, "corpus"))
    task = digits_task(os.path.join(work, "corpus", "test.jsonl"), limit=a.samples, max_new_tokens=a.max_new_tokens)
    backend = HFExport(hf_dir)
    times, answers = {"one_at_a_time": [], "batched": []}, {}
    for _ in range(a.repeats):
        for name, bs in (("one_at_a_time", 1), ("batched", a.batch_size)):
            t0 = time.perf_counter()
            records, _ = run_task(backend, task, batch_size=bs)
            times[name].append(time.perf_counter() - t0)
            answers[name] = [r["output"] for r in records]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"samples": len(task.samples), "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
              "threads": torch.get_num_threads(), "median_s": {k: round(v, 3) for k, v in med.items()},
              "speedup": round(med["one_at_a_time"] / med["batched"], 2),
              "equal_answers": answers["one_at_a_time"] == answers["batched"]}
    print(json.dumps(result, indent=1))
    ok = result["equal_answers"] and result["speedup"] >= 3
    print(f"{'PASS' if ok else 'FAIL'}: batched {result['speedup']}x one-at-a-time (goal >= 3x), "
          f"answers {'equal' if result['equal_answers'] else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
