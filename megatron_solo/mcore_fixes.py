"""Workarounds for megatron-core bugs, applied by an explicit call (:func:`apply`) from the entry points.

Importing this module changes nothing. Each fix is idempotent and a no-op where the bug cannot occur.
"""

from __future__ import annotations

import functools
import queue
import sys
import types


def fix_torch_adam_reshardable_load() -> None:
    """megatron-core 0.19.2 bug, without TE/apex only: loading the distributed optimizer's
    ``fully_reshardable`` state copies every tensor of torch Adam's per-parameter state, including
    ``step``, from a source dict that (by design) has no ``step`` (it is restored from param_groups),
    and fails with ``KeyError: 'step'``. Skip keys the source does not carry."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True) or getattr(dopt.DistributedOptimizer, "_solo_patched", False):
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    dopt.DistributedOptimizer._solo_patched = True


def fix_torch_adam_step_on_empty_rank() -> None:
    """megatron-core 0.19.2 bug, without TE/apex only: ``DistributedOptimizer.state_dict`` takes torch Adam's
    ``step`` from the per-parameter state and asserts there is exactly one value; a rank whose optimizer
    holds no parameter (a pipeline stage with every parameter frozen: ``--freeze-lm`` at PP > 1) has none,
    and save and load fail there. Such a rank has no state the step could apply to: report 0. (The saved
    step comes from global rank 0, which holds the first stage's trainable parameters.)"""
    import torch
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True) or getattr(dopt.DistributedOptimizer, "_solo_empty_rank_patched", False):
        return
    original = dopt.DistributedOptimizer.state_dict

    def state_dict(self):
        inner = self.optimizer
        if inner.state:
            return original(self)
        plain = inner.state_dict

        def with_placeholder_step():
            sd = plain()
            sd["state"] = {0: {"step": torch.tensor(0.0)}}  # read for its step only; "state" is dropped
            return sd

        inner.state_dict = with_placeholder_step
        try:
            return original(self)
        finally:
            del inner.state_dict

    dopt.DistributedOptimizer.state_dict = state_dict
    dopt.DistributedOptimizer._solo_empty_rank_patched = True


def fix_sync_save_spawns_a_manager() -> None:
    """megatron-core 0.19.2: the synchronous torch_dist save (``TorchDistSaveShardedStrategy.save``, what
    ``dist_checkpointing.save`` runs) goes through the async writer, whose ``prepare_write_data`` takes its
    results queue from ``filesystem_async.get_write_results_queue()``: on a process's first save that starts
    a ``spawn`` multiprocessing Manager, one more Python process per rank living until the rank exits, which
    imports torch to unpickle the write results put in it (~1.7 s of CPU, 2-3 s of the save's wall time on
    2 cores: benchmarks/checkpoint_save.py), for results that the sync path writes and reads in this very
    process (``AsyncRequest.execute_sync``). Give the sync save an in-process queue for its duration;
    async saves, whose writer runs in another process, still get the Manager's queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if not hasattr(filesystem_async, "_results_queue") or getattr(
            TorchDistSaveShardedStrategy, "_solo_sync_queue_patched", False):
        return
    original = TorchDistSaveShardedStrategy.save

    @functools.wraps(original)
    def save(self, sharded_state_dict, checkpoint_dir):
        held = filesystem_async._results_queue
        filesystem_async._results_queue = queue.Queue()
        try:
            return original(self, sharded_state_dict, checkpoint_dir)
        finally:
            filesystem_async._results_queue = held

    TorchDistSaveShardedStrategy.save = save
    TorchDistSaveShardedStrategy._solo_sync_queue_patched = True


def fix_clip_scales_through_a_copy() -> None:
    """megatron-core 0.19.2, without TE/apex only (the CPU backend): gradient clipping scales every gradient
    with ``local_multi_tensor_scale``, ``dst.copy_(src * scale)``: a temporary and a second pass over all
    gradients (12% of a tiny Qwen3 CPU step, docs/BENCHMARKS.md 1b). Clipping passes the same list as source
    and destination; scale those in place (the same multiply, bit-identical), anything else as before."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    original = utils.local_multi_tensor_scale
    if getattr(clip_grads, "multi_tensor_scale_impl", None) is not original:
        return  # TE's or apex's kernel (or already replaced)

    def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
        src, dst = tensor_lists
        if len(src) == len(dst) and all(s is d for s, d in zip(src, dst)):
            for t in dst:
                t.mul_(scale)
            return None
        return original(chunk_size, noop_flag, tensor_lists, scale)

    clip_grads.multi_tensor_scale_impl = multi_tensor_scale


def defer_fused_kernel_compile() -> None:
    """megatron-core 0.19.2 decorates its fused kernels (bias-GeLU/SwiGLU/GeGLU, cross-entropy, norms, ...)
    with ``torch.compile`` while it is imported (``megatron/core/jit.py``: ``jit_fuser = torch.compile``),
    and that call imports torch's compiler (dynamo, inductor, sympy: ~2.5 s of CPU of the ~5 s that
    ``import megatron.core`` takes here) in every process, also where no fused kernel ever runs (the CPU
    backend turns the fusions off; the tools). Give megatron-core a ``jit_fuser`` that calls ``torch.compile``
    with the same options on the kernel's first call: torch compiles on the first call anyway, so the kernel
    and the moment it is compiled are unchanged; only the compiler's import waits until a kernel runs.

    It must run before ``megatron.core`` is first imported (it imports it, with the deferral): the entry
    points call :func:`apply` before anything that imports megatron-core. Later it is a no-op, and
    ``torch.compile`` itself is restored before this returns."""
    if "megatron.core.jit" in sys.modules:
        return  # imported already: its kernels were compiled-wrapped at import, the compiler with them
    import torch

    compile_now = torch.compile

    def jit_fuser(fn=None, **options):
        if fn is None:  # used as @jit_fuser(...)
            return functools.partial(jit_fuser, **options)
        if not isinstance(fn, types.FunctionType):  # a module or other callable: torch.compile's own wrapper
            return compile_now(fn, **options)
        compiled = None

        @functools.wraps(fn)
        def compile_on_first_call(*args, **kwargs):
            nonlocal compiled
            if torch.compiler.is_compiling():  # traced inside an enclosing compile: inlined, as before
                return fn(*args, **kwargs)
            if compiled is None:
                compiled = torch.compile(fn, **options)  # torch's own, restored below
            return compiled(*args, **kwargs)

        return compile_on_first_call

    torch.compile = jit_fuser  # read by megatron/core/jit.py once, when it is imported below
    try:
        import megatron.core.jit  # noqa: F401 - imports megatron.core, whose modules decorate their kernels now
    finally:
        torch.compile = compile_now


def apply() -> None:
    """Every workaround this package needs from megatron-core 0.19.2 (the first one before megatron-core
    is imported: call this before anything that imports it)."""
    defer_fused_kernel_compile()
    fix_torch_adam_reshardable_load()
    fix_torch_adam_step_on_empty_rank()
    fix_sync_save_spawns_a_manager()
    fix_clip_scales_through_a_copy()
