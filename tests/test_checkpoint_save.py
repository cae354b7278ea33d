"""A synchronous checkpoint save starts no process (mcore_fixes.fix_sync_save_spawns_a_manager) and what it
writes loads bit-identically.

One gloo process group of world 1 in this process (a FileStore under tmp_path, destroyed at the end): the
bug is per rank, and a spawned world would cost more than the save it checks.
"""

import multiprocessing

import psutil
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async


def _state(tensors):
    return {
        name: ShardedTensor.from_rank_offsets(name, t, replica_id=0) for name, t in tensors.items()
    } | {"iteration": 7}


def test_a_sync_save_starts_no_process_and_loads_bit_identically(tmp_path):
    g = torch.Generator().manual_seed(0)
    saved = {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g).to(torch.bfloat16),
             "idx": torch.randint(0, 1000, (33,), generator=g)}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    held_queue = filesystem_async._results_queue
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        dist_checkpointing.save(_state(saved), str(ckpt))
        started = [p for p in me.children(recursive=True) if p.pid not in before]
        assert started == [], f"the save started processes: {[p.cmdline() for p in started]}"
        assert multiprocessing.active_children() == []
        assert filesystem_async._results_queue is held_queue  # the Manager's slot is left as it was

        empty = {name: torch.zeros_like(t) for name, t in saved.items()}
        loaded = dist_checkpointing.load(_state(empty), str(ckpt))
        assert loaded["iteration"] == 7
        for name, t in saved.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    finally:
        torch.distributed.destroy_process_group()
        if filesystem_async._results_queue is not held_queue:  # without the fix: stop the Manager it started
            filesystem_async._results_queue._manager.shutdown()
            filesystem_async._results_queue = held_queue
