#!/usr/bin/env python3
"""Evaluate an exported SOLO model, or a megatron_solo checkpoint, on task files (docs/EVALUATION.md):
greedy, batched generation with the KV cache (or option log-likelihoods), per-sample answers in
OUTPUT/samples.jsonl, the figures in OUTPUT/summary.json, a table on stdout, and the skipped samples
counted by reason.

    .venv/bin/python tools/evaluate.py --hf-dir demo_out/hf --tasks tasks/vqa.yaml,tasks/pope.json --output-dir eval_out
    .venv/bin/python tools/evaluate.py --load demo_out/checkpoints/sft --tasks tasks/vqa.yaml --output-dir eval_out

A checkpoint (--load, saved at any TP/PP) is first exported to OUTPUT/export (the streaming conversion of
tools/convert_checkpoint.py megatron-to-hf, with its vocabulary check) and evaluated there: the answers
are the export's by construction. Evaluation inside megatron-core at TP/PP is not done by this tool.
"""

import argparse
import os
import sys

from megatron_solo import quiet
from megatron_solo.errors import entry_point
from megatron_solo.eval.tasks import load_tasks


@entry_point  # a bad task file or a missing export file is one error: line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="exported SOLO directory (tools/convert_checkpoint.py megatron-to-hf)")
    src.add_argument("--load", help="megatron_solo checkpoint directory (latest iteration); exported to OUTPUT/export")
    ap.add_argument("--tokenizer-model", default=None,
                    help="with --load: the tokenizer, when the checkpoint does not name one that exists")
    ap.add_argument("--tasks", required=True, help="task files, comma-separated (FILE[,FILE])")
    ap.add_argument("--output-dir", required=True, help="where samples.jsonl and summary.json are written")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts of one length generated together")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user
    tasks = load_tasks(a.tasks)  # the task files are checked before the model loads

    # Imported once the flags and tasks are checked: --help and a bad task answer before torch loads.
    from megatron_solo.eval.runner import HFExport, run_task, table, write_results

    hf_dir = a.hf_dir
    if a.load:  # as tools/convert_checkpoint.py megatron-to-hf does it
        from megatron_solo import cpu_backend, mcore_fixes, parallel

        mcore_fixes.apply()  # megatron-core's workarounds, before it is imported (one must precede that)
        cpu_backend.ensure()  # megatron-core on this machine's CPU when CUDA is absent
        from megatron_solo.convert.megatron_io import megatron_to_hf  # megatron-core loads here

        hf_dir = os.path.join(a.output_dir, "export")
        try:
            megatron_to_hf(a.load, hf_dir, tokenizer_model=a.tokenizer_model, overwrite=True)
        finally:
            parallel.destroy()
        print(f"exported {a.load} to {hf_dir}", file=sys.stderr)
    backend = HFExport(hf_dir, a.dtype)
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
