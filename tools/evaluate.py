#!/usr/bin/env python3
"""Evaluate an exported SOLO model, or a megatron_solo checkpoint, on task files (docs/EVALUATION.md):
greedy, batched generation with the KV cache (or option log-likelihoods), per-sample answers in
OUTPUT/samples.jsonl, the figures in OUTPUT/summary.json, a table on stdout, and the skipped samples
counted by reason.

    .venv/bin/python tools/evaluate.py --hf-dir demo_out/hf --tasks tasks/vqa.yaml,tasks/pope.json --output-dir eval_out
    .venv/bin/python tools/evaluate.py --load demo_out/checkpoints/sft --tasks tasks/vqa.yaml --output-dir eval_out
    torchrun --nproc-per-node 4 tools/evaluate.py --load CKPT --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --tasks tasks/vqa.yaml --output-dir eval_out

A checkpoint (--load, saved at any TP/PP) is loaded at --tensor-model-parallel-size x
--pipeline-model-parallel-size over the processes torchrun starts (exactly that many; one process by
default) and evaluated on megatron-core's inference machinery: its text generation controller and
static KV cache, with SOLO's image inputs (megatron_solo/eval/megatron_backend.py, docs/EVALUATION.md).
Rank 0 writes the results.
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
    src.add_argument("--load", help="megatron_solo checkpoint directory (latest iteration), evaluated on megatron-core")
    ap.add_argument("--tokenizer-model", default=None,
                    help="with --load: the tokenizer, when the checkpoint does not name one that exists")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1, help="with --load: TP of the evaluation")
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="with --load: PP of the evaluation")
    ap.add_argument("--tasks", required=True, help="task files, comma-separated (FILE[,FILE])")
    ap.add_argument("--output-dir", required=True, help="where samples.jsonl and summary.json are written")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts of one length generated together")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user
    tasks = load_tasks(a.tasks)  # the task files are checked before the model loads

    # Imported once the flags and tasks are checked: --help and a bad task answer before torch loads.
    from megatron_solo import mcore_fixes

    mcore_fixes.apply()  # megatron-core's workarounds, before it is imported (the runner's data code imports it)
    from megatron_solo.eval.runner import HFExport, run_task, table, write_results

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if a.load:
        from megatron_solo import cpu_backend

        cpu_backend.ensure()  # megatron-core on this machine's CPU when CUDA is absent
        from megatron_solo.eval.megatron_backend import MegatronCheckpoint  # megatron-core loads here

        backend = MegatronCheckpoint(a.load, a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.dtype,
                                     a.tokenizer_model)
    else:
        backend = HFExport(a.hf_dir, a.dtype)
    records, summaries = [], {}
    try:
        for task in tasks:
            recs, summaries[task.name] = run_task(
                backend, task, a.batch_size,
                progress=(lambda s: print(f"   {s}", file=sys.stderr, flush=True)) if rank0 else None)
            records.extend(recs)
    finally:
        if a.load:
            backend.close()
    if not rank0:  # every rank has the answers; one writes them
        return 0
    samples, summary = write_results(a.output_dir, records, summaries)
    print(table(summaries))
    print(f"wrote {samples} and {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
