"""The parts of a run's plan that follow from its flags alone, in a module that imports neither torch nor
megatron-core: the world-size arithmetic and the checkpoint the run starts from. The run's config
(:func:`megatron_solo.training.config.build_train_config`) derives them here, and so does the launchers'
pre-flight (:mod:`megatron_solo.training.preflight`), before torch loads, so that a mistake in them is one
line at once.
"""

from __future__ import annotations

import os

from megatron_solo import checkpoint_dirs
from megatron_solo.training.arguments import ArgumentError

MODEL_OVERRIDE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                        "kv_channels", "max_position_embeddings", "rotary_base", "norm_epsilon", "sliding_window",
                        "init_method_std", "make_vocab_size_divisible_by", "vision_experts")


def run_sizes(a, world: int | None = None) -> dict:
    """Megatron's world-size arithmetic: DP size, global batch, micro-batches, iterations. ``world``: the
    process count (default: torchrun's ``WORLD_SIZE``)."""
    tp, pp, cp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if world % (tp * pp * cp):
        raise ArgumentError(f"world size {world} is not divisible by TP({tp}) x PP({pp}) x CP({cp})")
    dp = world // (tp * pp * cp)
    gbs = a.micro_batch_size * dp if a.global_batch_size is None else a.global_batch_size
    if gbs % (a.micro_batch_size * dp):
        raise ArgumentError(f"--global-batch-size {gbs} is not divisible by micro-batch-size "
                            f"({a.micro_batch_size}) x data-parallel size ({dp})")
    train_iters = a.train_iters if a.train_samples is None else a.train_samples // gbs
    if train_iters is None:  # --dry-run without either (validate_args): the plan is of one step
        train_iters = 1
    if train_iters < 1:
        raise ArgumentError("the run has no iterations (--train-iters / --train-samples too small)")
    return dict(world_size=world, data=dp, global_batch_size=gbs, num_microbatches=gbs // (a.micro_batch_size * dp),
                train_iters=train_iters)


def start_checkpoint(flags) -> tuple[str | None, bool, str | None]:
    """Where the run starts: (the checkpoint directory to load or None, weights only, the note that says a
    choice made). A restarted stage resumes its own --save; else --load (weights only under --finetune); a
    --finetune without a complete checkpoint there is an ArgumentError. The first part of
    :func:`megatron_solo.training.config.decide_resume`."""
    load_dir, finetune, note = flags.load, flags.finetune, None
    if flags.save and flags.finetune and checkpoint_dirs.latest_iteration(flags.save) is not None:
        # A restarted stage resumes its own checkpoint instead of re-initialising from the previous stage.
        load_dir, finetune = flags.save, False
        note = f"resuming this stage from {flags.save} (it already holds a checkpoint); --finetune ignored"
    step = flags.ckpt_step if load_dir and load_dir == flags.load else None
    if load_dir and finetune and step is None and checkpoint_dirs.latest_iteration(load_dir) is None:
        raise ArgumentError(f"--finetune: no complete checkpoint under {load_dir}")
    return load_dir, finetune, note


def architecture_flags(a) -> dict:
    """The architecture flags given on the command line, as SoloModelArgs fields."""
    overrides = {f: getattr(a, f) for f in MODEL_OVERRIDE_FLAGS if getattr(a, f) is not None}
    if a.no_sliding_window:
        overrides["sliding_window"] = None
    if a.num_attention_heads is not None and a.kv_channels is None and a.hidden_size is not None:
        overrides["kv_channels"] = a.hidden_size // a.num_attention_heads
    return overrides
