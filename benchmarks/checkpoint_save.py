#!/usr/bin/env python3
"""A rank's first checkpoint save with and without ``mcore_fixes.fix_sync_save_spawns_a_manager``.

megatron-core 0.19.2's synchronous torch_dist save starts a ``spawn`` multiprocessing Manager on a
process's first save (filesystem_async.get_write_results_queue), a Python process that imports torch to
unpickle the write results put in it; the fix gives the sync save an in-process queue. Every process that saves (each rank of each training run, of each test that saves)
pays the old cost once.

    .venv/bin/python benchmarks/checkpoint_save.py [--repeats 5] [--mb 40]

One gloo process group of world 1 in this process; windows alternate: "old" = megatron-core's own
``save`` as a fresh process's first save (no Manager yet; the Manager it starts is shut down after the
window), "new" = the same save with the fix. Each window saves the same tensors (``--mb`` MiB of fp32,
the tiny preset's weights are ~37 MiB) to a fresh directory; both checkpoints are loaded back and
compared bit for bit. Printed last: medians and the ratio old/new, the processes each save started and
their CPU seconds.

This file imports nothing heavy at the top on purpose: the Manager's spawned process re-imports the
main module, as it re-imports ``megatron_solo.train`` (which loads no torch at import) under torchrun.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="windows of each kind (alternating)")
    ap.add_argument("--mb", type=float, default=40.0, help="MiB of fp32 tensors saved per checkpoint")
    args = ap.parse_args()

    sys.path.insert(0, ROOT)
    # Imported here, not at the top: the Manager's process re-imports this file (see the docstring).
    import psutil
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_solo import cpu_backend, mcore_fixes, quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    cpu_backend.ensure()
    mcore_fixes.apply()
    fixed = TorchDistSaveShardedStrategy.save
    original = fixed.__wrapped__

    g = torch.Generator().manual_seed(0)
    n = int(args.mb * 2**20 / 4)
    tensors = {f"layer{i}": torch.randn(n // 8, generator=g) for i in range(8)}

    def state(ts):
        return {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in ts.items()}

    work = tempfile.mkdtemp(prefix="ckpt_save_bench_")
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(os.path.join(work, "store"), 1),
                                         rank=0, world_size=1)
    me = psutil.Process()
    times = {"old": [], "new": []}
    started = {"old": [], "new": []}
    child_cpu = {"old": [], "new": []}
    dirs = {}
    try:
        for w in range(args.repeats):
            for kind in ("old", "new"):
                d = os.path.join(work, f"{kind}{w}")
                os.makedirs(d)
                assert filesystem_async._results_queue is None  # a fresh process's first save
                TorchDistSaveShardedStrategy.save = original if kind == "old" else fixed
                before = {p.pid for p in me.children(recursive=True)}
                t0 = time.perf_counter()
                dist_checkpointing.save(state(tensors), d)
                times[kind].append(time.perf_counter() - t0)
                kids = [p for p in me.children(recursive=True) if p.pid not in before]
                started[kind].append(len(kids))
                child_cpu[kind].append(sum(sum(p.cpu_times()[:2]) for p in kids))
                TorchDistSaveShardedStrategy.save = fixed
                if filesystem_async._results_queue is not None:
                    filesystem_async._results_queue._manager.shutdown()
                    filesystem_async._results_queue = None
                dirs[kind] = d
                print(f"window {w} {kind}: {times[kind][-1]:.3f} s, {len(kids)} process(es) started", flush=True)
        for kind, d in dirs.items():
            loaded = dist_checkpointing.load(state({k: torch.zeros_like(t) for k, t in tensors.items()}), d)
            assert all(torch.equal(loaded[k], t) for k, t in tensors.items()), f"{kind}: not bit-identical"
        print("both checkpoints load bit-identically")
    finally:
        torch.distributed.destroy_process_group()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"save of {args.mb:g} MiB, {args.repeats} windows each, medians:")
    for kind in ("old", "new"):
        print(f"  {kind}: {med[kind]:.3f} s (range {min(times[kind]):.3f}-{max(times[kind]):.3f}), processes started "
              f"{sorted(set(started[kind]))}, their CPU {statistics.median(child_cpu[kind]):.2f} s")
    print(f"ratio old/new: {med['old'] / med['new']:.2f}x, saved per first save: {med['old'] - med['new']:.3f} s")


if __name__ == "__main__":
    main()
