"""The run's configuration, derived once from the command line: a frozen :class:`TrainConfig`.

The flags keep Megatron-LM's names and are read as attributes (``cfg.lr``, ``cfg.seq_length``); every
decision derived from them is a typed field computed here, in :func:`build_train_config`, and nowhere
else: the world and data-parallel sizes, the number of micro-batches, the virtual pipeline size, the
model's shape, the layer spec (``use_te``), the parameter dtype, the padded vocabulary, and where the run
starts from (:class:`ResumePlan`). Nothing mutates the config after that.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from megatron_solo import checkpoint
from megatron_solo.model.config import SoloModelArgs, use_te_default
from megatron_solo.training.arguments import ArgumentError, validate_args
from megatron_solo.training import param_groups


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Where the run starts from, decided once (:func:`decide_resume`)."""

    load_dir: str | None       # None: from scratch
    finetune: bool             # weights only; iteration, optimizer and scheduler start fresh
    info: dict | None          # the checkpoint's solo_checkpoint.json, read once
    note: str | None = None    # said out loud at start-up (a changed decision is never silent)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    flags: types.MappingProxyType           # the parsed flags, read-only (Megatron-LM names)
    world_size: int
    data_parallel_size: int
    global_batch_size: int
    num_microbatches: int
    train_iters: int
    virtual_pipeline_model_parallel_size: int | None
    recompute_method: str | None
    recompute_num_layers: int | None
    model_args: SoloModelArgs
    use_te: bool                            # TE layer spec (else the local spec)
    params_dtype: torch.dtype
    padded_vocab_size: int
    resume: ResumePlan

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields: the flags
        try:
            return self.__dict__["flags"][name]
        except KeyError:
            raise AttributeError(f"TrainConfig has no field or flag {name!r}") from None

    def checkpoint_args(self) -> dict:
        """The run's flags and derived sizes as stored in a checkpoint's info file."""
        derived = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("flags", "model_args", "resume")}
        return {**self.flags, **derived}


def decide_resume(flags) -> ResumePlan:
    """The one resume decision: a restarted stage resumes its own --save; else --load (weights only under
    --finetune); a --load without a checkpoint starts from scratch, said out loud."""
    load_dir, finetune, note = flags.load, flags.finetune, None
    if flags.save and flags.finetune and checkpoint.latest_iteration(flags.save) is not None:
        # A restarted stage resumes its own checkpoint instead of re-initialising from the previous stage.
        load_dir, finetune = flags.save, False
        note = f"resuming this stage from {flags.save} (it already holds a checkpoint); --finetune ignored"
    if not load_dir:
        return ResumePlan(None, False, None)
    step = flags.ckpt_step if load_dir == flags.load else None
    if checkpoint.latest_iteration(load_dir) is None and step is None:
        if finetune:
            raise ArgumentError(f"--finetune: no complete checkpoint under {load_dir}")
        return ResumePlan(None, False, None, f"no checkpoint under {load_dir}: starting from scratch")
    try:
        info = checkpoint.read_checkpoint_info(load_dir, step)
    except (checkpoint.CheckpointError, OSError, ValueError) as e:
        raise ArgumentError(f"cannot load {load_dir}: {e}") from None
    saved_gbs = (info.get("args") or {}).get("global_batch_size")
    if not finetune and saved_gbs and saved_gbs != flags.global_batch_size:  # said, never silent
        change = (f"the global batch size changes from {saved_gbs} (checkpoint) to {flags.global_batch_size}: "
                  f"the iteration count and consumed samples carry over, the learning-rate schedule continues "
                  f"by iteration, and each step from here takes {flags.global_batch_size} samples")
        note = f"{note}; {change}" if note else change
    return ResumePlan(load_dir, finetune, info, note)


def padded_vocab_size(model_args: SoloModelArgs, tp: int, resume: ResumePlan) -> int:
    """Megatron's rule (a multiple of 128 x TP) for a new model; the checkpoint's own padding when one is
    loaded, so that a run can change TP (33280 rows saved at TP=2 load at TP=1; 33152 would not)."""
    if resume.info is None:
        return model_args.padded_vocab_size(tp)
    padded = int(resume.info["padded_vocab_size"])
    if padded % tp:
        raise ArgumentError(f"the checkpoint in {resume.load_dir} has a vocabulary padded to {padded} rows, "
                            f"which TP={tp} does not divide; convert it with tools/convert_checkpoint.py")
    return padded


def build_train_config(args) -> TrainConfig:
    """Check the flags (one-line :class:`ArgumentError`) and derive every decision, once."""
    v = validate_args(args)  # a checked copy with Megatron's derived sizes; ``args`` is left as given
    resume = decide_resume(v)
    param_groups.check_resume(v, resume)  # the optimizer state fits only its own trainable set and groups
    use_te = use_te_default() if v.transformer_impl is None else v.transformer_impl == "transformer_engine"
    flags = {k: val for k, val in vars(args).items()}
    return TrainConfig(
        flags=types.MappingProxyType(flags),
        world_size=v.world_size, data_parallel_size=v.data_parallel_size,
        global_batch_size=v.global_batch_size, num_microbatches=v.num_microbatches, train_iters=v.train_iters,
        virtual_pipeline_model_parallel_size=v.virtual_pipeline_model_parallel_size,
        recompute_method=v.recompute_method, recompute_num_layers=v.recompute_num_layers,
        model_args=v.model_args, use_te=use_te,
        params_dtype=torch.bfloat16 if v.bf16 else torch.float16 if v.fp16 else torch.float32,
        padded_vocab_size=padded_vocab_size(v.model_args, v.tensor_model_parallel_size, resume),
        resume=resume,
    )
