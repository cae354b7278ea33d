#!/usr/bin/env python3
"""Evaluate an exported SOLO model on task files (docs/EVALUATION.md): greedy, batched generation with the
KV cache (or option log-likelihoods), per-sample answers in OUTPUT/samples.jsonl, the figures in
OUTPUT/summary.json, a table on stdout, and the skipped samples counted by reason.

    .venv/bin/python tools/evaluate.py --hf-dir demo_out/hf --tasks tasks/vqa.yaml,tasks/pope.json --output-dir eval_out
"""

import argparse
import sys

from megatron_solo import quiet
from megatron_solo.errors import entry_point
from megatron_solo.eval.tasks import load_tasks


@entry_point  # a bad task file or a missing export file is one error: line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="exported SOLO directory (tools/convert_checkpoint.py megatron-to-hf)")
    ap.add_argument("--tasks", required=True, help="task files, comma-separated (FILE[,FILE])")
    ap.add_argument("--output-dir", required=True, help="where samples.jsonl and summary.json are written")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts of one length generated together")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user
    tasks = load_tasks(a.tasks)  # the task files are checked before the model loads

    # Imported once the flags and tasks are checked: --help and a bad task answer before torch loads.
    from megatron_solo.eval.runner import HFExport, run_task, table, write_results

    backend = HFExport(a.hf_dir, a.dtype)
    records, summaries = [], {}
    for task in tasks:
        recs, summaries[task.name] = run_task(backend, task, a.batch_size,
                                              progress=lambda s: print(f"   {s}", file=sys.stderr, flush=True))
        records.extend(recs)
    samples, summary = write_results(a.output_dir, records, summaries)
    print(table(summaries))
    print(f"wrote {samples} and {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
