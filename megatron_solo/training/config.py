"""The run's configuration, derived once from the command line: a frozen, sectioned :class:`TrainConfig`.

:func:`build_train_config` checks the flags (:func:`~megatron_solo.training.arguments.validate_args`), then
makes every derived decision exactly once and stores it as a typed field of one section: the world and
data-parallel sizes, the number of micro-batches, the virtual pipeline size, the model's shape, the layer
spec (``use_te``) and with it the batch layout (THD batches), the dtypes, the padded vocabulary, and where
the run starts from (:class:`ResumePlan`). Consumers read the typed fields (``cfg.parallel.tensor``); the
parsed flags are kept only as the record a checkpoint stores. megatron-core's own config objects are built
here and only here: :meth:`TrainConfig.transformer_config`, :meth:`TrainConfig.optimizer_config`,
:meth:`TrainConfig.ddp_config`.
"""

from __future__ import annotations

import dataclasses
import os
import types

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from megatron_solo import checkpoint
from megatron_solo.data.dataset import data_chat_template, data_row_separator
from megatron_solo.data.stats import layout_name
from megatron_solo.model.config import SoloModelArgs, build_transformer_config, check_fp8, use_te_default
from megatron_solo.model.lora import LoraConfig
from megatron_solo.training import param_groups
from megatron_solo.training.arguments import ArgumentError, fail, validate_args
from megatron_solo.training.run_plan import architecture_flags, run_sizes, start_checkpoint

# The architecture flags that override a preset's field of the same name.


# The learning-rate schedule's flags: what the scheduler's state holds and Megatron-LM's
# --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler decide between on a resume.
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_init", "lr_decay_iters",
                  "weight_decay")


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Where the run starts from, decided once (:func:`decide_resume`)."""

    load_dir: str | None       # None: from scratch
    finetune: bool             # weights only; iteration, optimizer and scheduler start fresh
    info: dict | None          # the checkpoint's solo_checkpoint.json, read once
    note: str | None = None    # said out loud at start-up (a changed decision is never silent)
    # The learning-rate schedule's source on a resume (:func:`decide_schedule`): "flags", or "checkpoint"
    # with the checkpoint's recorded values (SCHEDULE_FLAGS) in ``schedule``.
    schedule_from: str = "flags"
    schedule: dict | None = None
    nothing_to_do: str | None = None  # the checkpoint already reached --train-iters: said, nothing built or saved


@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str | None              # --model's preset; None: the architecture is the checkpoint's
    args: SoloModelArgs             # the preset or the checkpoint's, with the architecture flags applied
    padded_vocab_size: int
    use_te: bool                    # the one layer-spec decision: Transformer Engine's, else the local spec
    thd_batches: bool               # batches re-laid out as THD (the TE spec's packed form); follows use_te
    attention_backend: str          # core attention of the local spec
    source_note: str | None = None  # said at start-up: the checkpoint the architecture came from
    lora: LoraConfig | None = None  # --lora-*: the adapters (model/lora.py); None: none
    lora_base: dict | None = None   # the checkpoint they adapt: {"path", "fingerprint"} (decide_lora)


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    world_size: int
    tensor: int
    pipeline: int
    virtual_pipeline: int | None    # model chunks per pipeline rank (interleaved 1F1B), None: one chunk
    context: int
    data: int                       # world / (TP x PP x CP)
    sequence_parallel: bool
    timeout_minutes: int


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    """The batch arithmetic (what :class:`~megatron_solo.training.sampler.MicroBatchStream` reads)."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int           # per data-parallel rank and step
    train_iters: int


@dataclasses.dataclass(frozen=True)
class PrecisionSection:
    bf16: bool
    fp16: bool
    params_dtype: torch.dtype
    fp8_format: str | None
    fp8_recipe: str
    fp8_margin: int
    fp8_interval: int
    fp8_amax_history_len: int
    fp8_amax_compute_algo: str
    fp8_wgrad: bool
    fp8_param_gather: bool
    recompute_granularity: str | None
    recompute_method: str | None
    recompute_num_layers: int | None


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """The optimizer, the learning-rate schedule and the parameter groups (param_groups.py reads the
    ``vision_*``, ``decoupled_*`` and ``freeze_*`` fields under their flag names)."""

    optimizer: str
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_iters: int
    lr_warmup_init: float
    lr_decay_iters: int             # --lr-decay-iters, else --train-iters
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    max_skipped_iters: int
    vision_lr: float | None
    vision_min_lr: float | None
    vision_weight_decay: float | None
    decoupled_lr: float | None
    decoupled_min_lr: float | None
    freeze_lm: bool
    freeze_vision: bool
    lora_rank: int = 0              # > 0: only the LoRA adapters train (param_groups.trainable_parameter_filter)


@dataclasses.dataclass(frozen=True)
class DDPSection:
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool


@dataclasses.dataclass(frozen=True)
class DataSection:
    data_path: tuple[str, ...]
    valid_data_path: tuple[str, ...] | None
    split: str
    data_cache_path: str | None
    num_workers: int
    tokenizer_model: str | None
    loss_role: str
    seed: int
    # the image layout of every prefix the run reads (--row-separator at preprocessing; one per run):
    # recorded in each checkpoint, so that its export lays images out the same way
    row_separator: bool = True
    # the chat template the model is tuned with (its chat data's, else the loaded checkpoint's): recorded in
    # each checkpoint, the export's default template
    chat_template: str | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    save: str | None
    load: str | None
    save_interval: int | None
    finetune: bool
    no_load_optim: bool
    no_load_rng: bool
    ckpt_step: int | None
    keep_last_checkpoints: int | None
    no_save_optim: bool


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """Logging, evaluation and when the run exits."""

    log_interval: int
    eval_interval: int
    eval_iters: int
    tensorboard_dir: str | None
    log_file: str | None
    exit_signal_handler: bool
    exit_interval: int | None
    exit_duration_in_mins: float | None
    eval_tasks: str | None = None  # --eval-tasks FILE[,FILE] (megatron_solo/eval/in_loop.py)
    eval_tasks_interval: int = 1000


@dataclasses.dataclass(frozen=True)
class DryRunSection:
    enabled: bool                   # --dry-run
    gpu: str
    mfu: float
    transformer_impl: str | None    # as given: the plan assumes fused attention unless "local" is asked for


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    parallel: ParallelSection
    schedule: ScheduleSection
    precision: PrecisionSection
    optimizer: OptimizerSection
    ddp: DDPSection
    data: DataSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    dry_run: DryRunSection
    resume: ResumePlan
    flags: types.MappingProxyType   # the parsed flags as given (Megatron-LM names): what a checkpoint records

    def transformer_config(self, *, meta_plan: bool = False):
        """megatron-core's ``TransformerConfig`` of this run: the one call of ``build_transformer_config``.

        ``meta_plan``: the dry run's config, built on a machine without Transformer Engine; FP8 only changes
        the kernels, not the layout, so the plan uses the local spec without FP8."""
        p, par = self.precision, self.parallel
        fp8 = None if meta_plan else p.fp8_format
        return build_transformer_config(
            self.model.args,
            tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline, sequence_parallel=par.sequence_parallel,
            context_parallel_size=par.context,
            params_dtype=p.params_dtype, bf16=p.bf16, fp16=p.fp16,
            fp8=fp8, fp8_recipe=p.fp8_recipe, fp8_margin=p.fp8_margin, fp8_interval=p.fp8_interval,
            fp8_amax_history_len=p.fp8_amax_history_len, fp8_amax_compute_algo=p.fp8_amax_compute_algo,
            fp8_wgrad=p.fp8_wgrad, fp8_param=p.fp8_param_gather,
            recompute_granularity=p.recompute_granularity, recompute_method=p.recompute_method,
            recompute_num_layers=p.recompute_num_layers,
            use_te=False if meta_plan else self.model.use_te,
            **interleaved_p2p(par.virtual_pipeline),
        )

    def optimizer_config(self) -> OptimizerConfig:
        """megatron-core's ``OptimizerConfig`` (its parameter groups: :func:`param_groups.config_overrides`)."""
        o, p = self.optimizer, self.precision
        return OptimizerConfig(
            optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            decoupled_lr=o.decoupled_lr, decoupled_min_lr=o.decoupled_min_lr,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=p.bf16, fp16=p.fp16, params_dtype=p.params_dtype,
            use_distributed_optimizer=self.ddp.use_distributed_optimizer,
            overlap_param_gather=self.ddp.overlap_param_gather,
        )

    def ddp_config(self) -> DistributedDataParallelConfig:
        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=self.ddp.overlap_grad_reduce,
            overlap_param_gather=self.ddp.overlap_param_gather,
            use_distributed_optimizer=self.ddp.use_distributed_optimizer,
            check_for_nan_in_grad=False,  # NaN/inf steps are skipped and counted, not fatal
            average_in_collective=False,
        )

    def checkpoint_args(self) -> dict:
        """The run's flags and derived sizes as stored in a checkpoint's info file (the keys
        :func:`param_groups.check_resume` and a resumed run's global-batch note read)."""
        par, s, p = self.parallel, self.schedule, self.precision
        derived = dict(
            world_size=par.world_size, data_parallel_size=par.data, global_batch_size=s.global_batch_size,
            num_microbatches=s.num_microbatches, train_iters=s.train_iters,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline, recompute_method=p.recompute_method,
            recompute_num_layers=p.recompute_num_layers, use_te=self.model.use_te, params_dtype=p.params_dtype,
            padded_vocab_size=self.model.padded_vocab_size, row_separator=self.data.row_separator,
            chat_template=self.data.chat_template)
        # The schedule the run follows (the checkpoint's, unless --override-opt_param-scheduler), not the flags.
        schedule = {f: getattr(self.optimizer, f) for f in SCHEDULE_FLAGS}
        lora = {"lora": {**self.model.lora.record(), "base": self.model.lora_base}} if self.model.lora else {}
        return {**self.flags, **derived, **schedule, **lora}

    @property
    def tokenizer_model_path(self) -> str | None:
        """``--tokenizer-model`` as an absolute path (what a checkpoint records)."""
        t = self.data.tokenizer_model
        return os.path.abspath(t) if t else None


# The recorded arguments a resumed run is compared with (the schedule's: decide_schedule; the global batch
# size: its own note): what the run trains on and what it trains.
RECORDED_FLAGS = ("data_path", "model", "seq_length", "micro_batch_size", "loss_role")


def _recorded_differences(flags, saved: dict) -> str | None:
    def shown(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    changed = [f"--{f.replace('_', '-')} {shown(getattr(flags, f))} (checkpoint: {shown(saved[f])})"
               for f in RECORDED_FLAGS  # a flag not given (None: --model) keeps the checkpoint's
               if f in saved and getattr(flags, f) is not None and shown(saved[f]) != shown(getattr(flags, f))]
    return "; ".join(changed) if changed else None


def decide_resume(flags) -> ResumePlan:
    """The one resume decision: a restarted stage resumes its own --save; else --load (weights only under
    --finetune); a --load without a checkpoint starts from scratch, said out loud. A resume says which
    recorded arguments the flags change, and a run already at --train-iters has nothing to do."""
    load_dir, finetune, note = start_checkpoint(flags)  # a --finetune without a checkpoint: ArgumentError
    if not load_dir:
        return ResumePlan(None, False, None)
    step = flags.ckpt_step if load_dir == flags.load else None
    if checkpoint.latest_iteration(load_dir) is None and step is None:
        return ResumePlan(None, False, None, f"no checkpoint under {load_dir}: starting from scratch")
    try:
        info = checkpoint.read_checkpoint_info(load_dir, step)
    except (checkpoint.CheckpointError, OSError, ValueError) as e:
        raise ArgumentError(f"cannot load {load_dir}: {e}") from None
    saved_args = info.get("args") or {}
    if not finetune and info["iteration"] >= flags.train_iters:
        return ResumePlan(load_dir, finetune, info, note, nothing_to_do=(
            f"nothing to do: {load_dir} already holds iteration {info['iteration']} and --train-iters is "
            f"{flags.train_iters}; raise --train-iters to train on (nothing was saved)"))
    differences = None if finetune else _recorded_differences(flags, saved_args)
    if differences:
        said = (f"resuming the run in {load_dir} at iteration {info['iteration']} with arguments other than it "
                f"recorded: {differences}")
        note = f"{note}; {said}" if note else said
    saved_gbs = saved_args.get("global_batch_size")
    if not finetune and saved_gbs and saved_gbs != flags.global_batch_size:  # said, never silent
        change = (f"the global batch size changes from {saved_gbs} (checkpoint) to {flags.global_batch_size}: "
                  f"the iteration count and consumed samples carry over, the learning-rate schedule continues "
                  f"by iteration, and each step from here takes {flags.global_batch_size} samples")
        note = f"{note}; {change}" if note else change
    return ResumePlan(load_dir, finetune, info, note)


def _schedule_values(flags: dict, train_iters) -> dict:
    """The SCHEDULE_FLAGS values of a run; ``lr_decay_iters`` as the scheduler uses it (else --train-iters)."""
    return {f: (flags.get(f) or train_iters) if f == "lr_decay_iters" else flags.get(f) for f in SCHEDULE_FLAGS}


def _schedule_text(values: dict, keys) -> str:
    return " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in keys)


def decide_schedule(flags, plan: ResumePlan, train_iters: int) -> ResumePlan:
    """Megatron-LM's rule for the learning-rate schedule of a resumed run: the checkpoint's, unless
    --override-opt_param-scheduler says the flags'. A difference is said once, with the way to the other."""
    override, keep = flags.override_opt_param_scheduler, flags.use_checkpoint_opt_param_scheduler
    if plan.load_dir is None or plan.finetune:
        if keep:
            why = "--finetune starts a new one" if plan.finetune else "there is no checkpoint to take it from"
            raise ArgumentError(f"--use-checkpoint-opt_param-scheduler keeps a checkpoint's learning-rate schedule, "
                                f"but {why}: drop --use-checkpoint-opt_param-scheduler (the flags' schedule)"
                                + (" or drop --finetune (resume the checkpoint's run)" if plan.finetune else ""))
        return plan
    saved_args = (plan.info or {}).get("args") or {}
    if "lr" not in saved_args:  # a converted checkpoint: weights without a training run's schedule
        if keep:
            raise ArgumentError(f"--use-checkpoint-opt_param-scheduler: {plan.load_dir} records no learning-rate "
                                f"schedule (a converted checkpoint); drop the flag to use the flags' schedule")
        return plan
    current = _schedule_values(vars(flags), train_iters)
    saved = _schedule_values(saved_args, saved_args.get("train_iters"))
    changed = [f for f in SCHEDULE_FLAGS if current[f] != saved[f]]
    if override:
        new = dataclasses.replace(plan, schedule_from="flags")
        said = (f"learning-rate schedule: the flags' ({_schedule_text(current, changed)}) replaces the checkpoint's "
                f"({_schedule_text(saved, changed)}) (--override-opt_param-scheduler); the iteration count "
                f"carries over" if changed else None)
    else:
        new = dataclasses.replace(plan, schedule_from="checkpoint", schedule=saved)
        said = (f"learning-rate schedule: the checkpoint's ({_schedule_text(saved, changed)}), not the flags' "
                f"({_schedule_text(current, changed)})"
                + ("" if keep else ": add --override-opt_param-scheduler to use the flags'") if changed else None)
    if said:
        new = dataclasses.replace(new, note=f"{plan.note}; {said}" if plan.note else said)
    return new


def decide_row_separator(a, plan: ResumePlan) -> tuple[bool, ResumePlan]:
    """The data's image layout (one for all of the run's prefixes: a mixed blend is one error line) against
    the checkpoint's: a resume onto data of the other layout is refused (the run would change what its model
    reads halfway without saying so); ``--finetune`` from it says so."""
    try:
        row_separator = data_row_separator(a.data_path, a.valid_data_path)
    except FileNotFoundError:  # a shard set that is not there: the input check says so in its one line
        return True, plan
    saved = checkpoint.checkpoint_row_separator(plan.info) if plan.info is not None else None
    if saved is None or saved == row_separator:
        return row_separator, plan
    data, ck = layout_name(row_separator), layout_name(saved)
    if not plan.finetune:
        raise ArgumentError(f"the data is laid out with --row-separator {data}, the run in {plan.load_dir} trained "
                            f"on --row-separator {ck}: resume it on data preprocessed with --row-separator {ck}, "
                            f"or start a new phase from it with --finetune")
    said = (f"the data is laid out with --row-separator {data}; the checkpoint {plan.load_dir} was trained on "
            f"--row-separator {ck}")
    return row_separator, dataclasses.replace(plan, note=f"{plan.note}; {said}" if plan.note else said)


def decide_chat_template(a, plan: ResumePlan) -> str | None:
    """The chat template the model is tuned with: its chat data's (one shared by the run's chat prefixes),
    else the one the loaded checkpoint recorded (pre-training data after a chat phase keeps it)."""
    try:
        data = data_chat_template(a.data_path, a.valid_data_path)
    except FileNotFoundError:  # a shard set that is not there: the input check says so in its one line
        data = None
    return data or (checkpoint.checkpoint_chat_template(plan.info) if plan.info is not None else None)


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


def _flag(field: str, value) -> str:
    """The flag that set ``field`` to ``value``, as typed."""
    return "--no-sliding-window" if value is None else f"--{field.replace('_', '-')} {value}"


def decide_architecture(a, resume: ResumePlan) -> tuple[SoloModelArgs, str | None]:
    """The run's architecture, decided once. A run that starts from a checkpoint (a converted base, a
    resumed or fine-tuned run) takes the checkpoint's, unless --model names a preset (then the preset must
    build the checkpoint's tensors); the architecture flags apply on top of either and must too. Without a
    checkpoint: --model's preset (default tiny). --use-checkpoint-args (Megatron-LM's explicit form) takes
    the checkpoint's even when --model is given. Returns the model args and, when they are the
    checkpoint's, the start-up line that says so."""
    flags = architecture_flags(a)
    saved = (resume.info or {}).get("model_args")
    if a.use_checkpoint_args and not saved:
        raise ArgumentError("--use-checkpoint-args takes the architecture of the --load checkpoint, but "
                            + ("no --load is given" if not a.load else f"{a.load} holds no complete checkpoint"
                               if resume.info is None else f"{resume.load_dir} records no architecture")
                            + ": drop --use-checkpoint-args (--model's preset) or pass --load")
    from_checkpoint = bool(saved) and (a.use_checkpoint_args or a.model is None)
    try:
        if from_checkpoint:
            m = SoloModelArgs(**{**saved, **flags})
        else:
            m = SoloModelArgs.from_preset(a.model or "tiny", **flags)
    except (ValueError, TypeError) as e:
        raise ArgumentError(str(e)) from None
    if not saved:
        return m, None
    which = "--save" if resume.load_dir == a.save and a.load != a.save else "--load"
    diff = checkpoint.shape_differences(saved, m)
    if diff:
        given = ([] if from_checkpoint else [f"--model {a.model}"]) + [_flag(f, flags[f]) for f in flags if f in diff]
        raise ArgumentError(
            f"{' and '.join(given)} build{'s' if len(given) == 1 else ''} a model with "
            f"{', '.join(f'{k} {getattr(m, k)}' for k in diff)}, but {which} {resume.load_dir} holds "
            f"{', '.join(f'{k} {saved[k]}' for k in diff)}: drop {' and '.join(given)} to train the "
            f"checkpoint's architecture, or start from a checkpoint of that shape (another {which})")
    saved_experts = saved.get("vision_experts", "none")
    if m.vision_experts != saved_experts and not (saved_experts == "none" and resume.finetune):
        raise ArgumentError(
            f"--vision-experts {m.vision_experts}: {which} {resume.load_dir} holds vision_experts {saved_experts}: "
            + ("add --finetune to start a stage with experts from it (each starts as a copy of its text twin)"
               if saved_experts == "none" else "drop --vision-experts (a model keeps the experts it was trained with)"))
    if not from_checkpoint:
        return m, None
    changed = [_flag(f, flags[f]) for f in flags if saved.get(f) != flags[f]]
    note = (f"architecture: the checkpoint's in {resume.load_dir} ({m.family}, {m.num_layers} layers, hidden "
            f"{m.hidden_size}, vocabulary {m.vocab_size})" + (f" with {' '.join(changed)}" if changed else "")
            + (" (--use-checkpoint-args)" if a.use_checkpoint_args else ""))
    return m, note


def _check_layout(a, m: SoloModelArgs) -> None:
    """The architecture against the parallel layout and the sequence length."""
    tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    if m.num_attention_heads % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the {m.num_attention_heads} "
                            f"attention heads")
    if m.num_query_groups % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the {m.num_query_groups} query groups")
    if m.ffn_hidden_size % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide ffn-hidden-size {m.ffn_hidden_size}")
    if m.num_layers % pp:
        raise ArgumentError(f"--pipeline-model-parallel-size {pp} does not divide the {m.num_layers} layers")
    if a.seq_length > m.max_position_embeddings:
        raise ArgumentError(f"--seq-length {a.seq_length} exceeds max-position-embeddings {m.max_position_embeddings}")


def _virtual_pipeline(a, m: SoloModelArgs, num_microbatches: int) -> int | None:
    """Model chunks per pipeline rank from --num-layers-per-virtual-pipeline-stage (None: not interleaved)."""
    per_virtual = a.num_layers_per_virtual_pipeline_stage
    if per_virtual is None:
        return None
    pp = a.pipeline_model_parallel_size
    per_stage = m.num_layers // pp
    if per_stage % per_virtual:
        raise ArgumentError(f"{per_stage} layers per pipeline stage are not divisible by "
                            f"--num-layers-per-virtual-pipeline-stage {per_virtual}")
    if num_microbatches % pp:
        raise ArgumentError(f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) "
                            f"to be a multiple of --pipeline-model-parallel-size {pp}")
    return per_stage // per_virtual


def interleaved_p2p(virtual_pipeline: int | None) -> dict:
    """megatron-core's pipeline send/receive settings for this run, as Megatron-LM sets them.

    With interleaved stages, megatron-core's default ``batch_p2p_comm=True`` posts each step's sends and
    receives as one batch in the order send-prev, recv-prev, send-next, recv-next on every rank. At PP=2 the
    previous and the next stage are the same rank, so a rank's first send to its peer (a gradient) meets the
    peer's first receive from it (an activation of the same shape): the two are swapped, silently, whenever
    a step sends both ways (more micro-batches than stages). Megatron-LM never runs it so: an interleaved run
    gets ``overlap_p2p_comm=True`` and ``batch_p2p_comm=False`` (its ``--overlap-p2p-communication``
    default), whose individual sends and receives keep the two directions apart (one of them on the world
    group at PP=2). Without interleaving, megatron-core's defaults stay."""
    if virtual_pipeline is None:
        return {}
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


# The image choices (flag, SoloModelArgs field, SOLO's value): model/image_blocks.py, docs/MODEL.md.
IMAGE_CHOICE_FLAGS = (("image_attention", "causal"), ("image_positions", "1d"))


def decide_image_choices(a, model_args: SoloModelArgs, resume: ResumePlan, use_te: bool):
    """The run's image choices, once: the flag when given, else the loaded checkpoint's record, else SOLO's.

    A resume keeps what its checkpoint trained with (a flag that differs is refused: the change would be
    silent in the curves); ``--finetune`` may change it, said in the returned note. Transformer Engine's
    fused attention on packed THD batches expresses neither choice: refused, naming the flag that works.
    Returns (model args with the choices, note or None)."""
    saved = ((resume.info or {}).get("model_args") or {}) if resume.load_dir else {}
    chosen, changes = {}, []
    for field, solo in IMAGE_CHOICE_FLAGS:
        given, flag = getattr(a, field, None), "--" + field.replace("_", "-")
        recorded = saved.get(field, solo) if resume.info is not None else None
        chosen[field] = given if given is not None else recorded if recorded is not None else solo
        if given is not None and recorded is not None and given != recorded:
            if not resume.finetune:
                raise ArgumentError(f"{flag} {given}: the run in {resume.load_dir} trained with {recorded} (its "
                                    f"checkpoint records it) and a resume keeps it; drop {flag}, or start a new "
                                    f"stage from it with --finetune")
            changes.append(f"{field.replace('_', ' ')} {recorded} -> {given}")
    if chosen["image_positions"] == "mrope" and model_args.rope_scaling is not None:
        raise ArgumentError(f"--image-positions mrope: megatron-core's multimodal RoPE has no {model_args.rope_scaling} "
                            f"RoPE scaling (this base's); use --image-positions 1d")
    off_solo = [f"--{f.replace('_', '-')} {chosen[f]}" for f, solo in IMAGE_CHOICE_FLAGS if chosen[f] != solo]
    if use_te and off_solo:
        raise ArgumentError(f"{' and '.join(off_solo)}: Transformer Engine's fused attention on packed (THD) batches "
                            f"cannot express it; add --transformer-impl local (and --attention-backend sdpa_flex "
                            f"for FlexAttention on a GPU)")
    note = (f"--finetune from {resume.load_dir} changes the checkpoint's {', '.join(changes)}" if changes else None)
    return dataclasses.replace(model_args, **chosen), note


def decide_lora(a, resume: ResumePlan) -> tuple[LoraConfig | None, dict | None]:
    """The run's LoRA adapters and the base they adapt, once (docs/TRAINING.md "LoRA").

    New adapters start on the checkpoint a ``--finetune`` loads: it is their base, named by its path and
    :func:`~megatron_solo.checkpoint.checkpoint_fingerprint`. A checkpoint that holds adapters (its ``lora``
    record) carries them and their base on: the flags must give the same rank, alpha and targets, and a
    ``--load`` beside the resumed ``--save`` must name the same base (else one line says which is which).
    Returns (adapters or None, base record or None)."""
    saved = checkpoint.checkpoint_lora(resume.info) if resume.info is not None else None
    where = resume.load_dir
    if not a.lora_rank:
        if saved:
            raise ArgumentError(
                f"{where} holds LoRA adapters (rank {saved['rank']}, alpha {saved['alpha']:g}, targets "
                f"{' '.join(saved['targets'])}): resume it with --lora-rank {saved['rank']} --lora-alpha "
                f"{saved['alpha']:g} --lora-targets {' '.join(saved['targets'])}, or export it merged "
                f"(tools/convert_checkpoint.py megatron-to-hf --merge-lora) to go on without adapters")
        return None, None
    try:
        lora = LoraConfig(rank=a.lora_rank, alpha=float(a.lora_alpha or a.lora_rank), dropout=a.lora_dropout,
                          targets=tuple(dict.fromkeys(a.lora_targets)), seed=a.seed)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if resume.info is None:
        raise ArgumentError("--lora-rank adapts a base: pass --load BASE --finetune (a converted base or a "
                            "trained checkpoint; it stays as loaded)")
    if saved is None:
        if not resume.finetune:
            raise ArgumentError(f"--lora-rank: {where} holds no adapters; add --finetune to start adapters on it "
                                f"(it is then their base)")
        try:
            base = {"path": os.path.abspath(resume.info["path"]),
                    "fingerprint": checkpoint.checkpoint_fingerprint(resume.info["path"])}
        except (checkpoint.CheckpointError, OSError) as e:
            raise ArgumentError(f"cannot fingerprint the base {resume.info['path']}: {e}") from None
        return lora, base
    rec = lora.record()
    differ = [k for k in ("rank", "alpha", "targets") if saved.get(k) != rec[k]]
    if differ:
        raise ArgumentError(
            f"--lora-{' --lora-'.join(differ)}: {where} holds adapters with "
            f"{', '.join(f'{k} {saved[k]}' for k in differ)} and a run keeps them; give those values, or export "
            f"it merged (megatron-to-hf --merge-lora) and start new adapters on the conversion of that export")
    base = saved.get("base") or {}
    if a.load and os.path.abspath(a.load) != os.path.abspath(where):
        try:
            named = checkpoint.read_checkpoint_info(a.load, a.ckpt_step)["path"]
            fingerprint = checkpoint.checkpoint_fingerprint(named)
        except (checkpoint.CheckpointError, OSError, ValueError) as e:
            raise ArgumentError(f"--load {a.load}: cannot read the base it names: {e}") from None
        if fingerprint != base.get("fingerprint"):
            raise ArgumentError(
                f"--load {a.load} is not the base of the adapters in {where}: they adapt {base.get('path')} "
                f"(fingerprint {base.get('fingerprint')}), --load holds {named} (fingerprint {fingerprint}); "
                f"pass --load {os.path.dirname(base.get('path') or '') or base.get('path')}, or a new --save "
                f"to start adapters on {a.load}")
    return lora, base


def decide_use_te(transformer_impl: str | None) -> bool:
    """The run's one layer-spec decision: --transformer-impl when given, else TE when it imports on a GPU."""
    return use_te_default() if transformer_impl is None else transformer_impl == "transformer_engine"


def build_train_config(args) -> TrainConfig:
    """Check the flags (one-line :class:`ArgumentError`) and derive every decision, once. ``args`` (the
    parsed flags) is not changed."""
    a = args
    validate_args(a)
    sizes = run_sizes(a)
    resume_flags = types.SimpleNamespace(**{**vars(a), "global_batch_size": sizes["global_batch_size"],
                                            "train_iters": sizes["train_iters"]})
    resume = decide_schedule(a, decide_resume(resume_flags), sizes["train_iters"])
    row_separator, resume = decide_row_separator(a, resume)
    model_args, source_note = decide_architecture(a, resume)
    _check_layout(a, model_args)
    vpp = _virtual_pipeline(a, model_args, sizes["num_microbatches"])
    use_te = decide_use_te(a.transformer_impl)
    if use_te and model_args.vision_experts != "none":
        raise ArgumentError(f"--vision-experts {model_args.vision_experts} runs on the local layer spec: "
                            "add --transformer-impl local")
    lora, lora_base = decide_lora(a, resume)
    if use_te and lora is not None:
        raise ArgumentError("--lora-rank adapts megatron-core's local linear layers (Transformer Engine's fused "
                            "norm+linear hands an adapter no normalised input): add --transformer-impl local")
    if a.fp8_format and not a.dry_run:  # a dry run plans FP8 without TE
        try:
            check_fp8(a.fp8_format, a.fp8_recipe, use_te)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    # Megatron-LM's defaults of full recompute.
    recompute_method, recompute_num_layers = a.recompute_method, a.recompute_num_layers
    if a.recompute_granularity == "full" and not recompute_method:
        recompute_method = "uniform"
        recompute_num_layers = 1 if recompute_num_layers is None else recompute_num_layers
    sched = resume.schedule or _schedule_values(vars(a), sizes["train_iters"])  # the one the run follows
    param_groups.check_resume(a, resume, fail)  # the optimizer state fits only its own trainable set and groups
    model_args, image_note = decide_image_choices(a, model_args, resume, use_te)
    if image_note:
        resume = dataclasses.replace(resume, note=f"{resume.note}; {image_note}" if resume.note else image_note)
    tp = a.tensor_model_parallel_size
    return TrainConfig(
        model=ModelSection(preset=None if source_note else a.model or "tiny", args=model_args,
                           padded_vocab_size=padded_vocab_size(model_args, tp, resume),
                           use_te=use_te, thd_batches=use_te, attention_backend=a.attention_backend,
                           source_note=source_note, lora=lora, lora_base=lora_base),
        parallel=ParallelSection(world_size=sizes["world_size"], tensor=tp, pipeline=a.pipeline_model_parallel_size,
                                 virtual_pipeline=vpp, context=a.context_parallel_size, data=sizes["data"],
                                 sequence_parallel=a.sequence_parallel,
                                 timeout_minutes=a.distributed_timeout_minutes),
        schedule=ScheduleSection(seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
                                 global_batch_size=sizes["global_batch_size"],
                                 num_microbatches=sizes["num_microbatches"], train_iters=sizes["train_iters"]),
        precision=PrecisionSection(
            bf16=a.bf16, fp16=a.fp16,
            params_dtype=torch.bfloat16 if a.bf16 else torch.float16 if a.fp16 else torch.float32,
            fp8_format=a.fp8_format, fp8_recipe=a.fp8_recipe, fp8_margin=a.fp8_margin, fp8_interval=a.fp8_interval,
            fp8_amax_history_len=a.fp8_amax_history_len, fp8_amax_compute_algo=a.fp8_amax_compute_algo,
            fp8_wgrad=not a.no_fp8_wgrad, fp8_param_gather=a.fp8_param_gather,
            recompute_granularity=a.recompute_granularity, recompute_method=recompute_method,
            recompute_num_layers=recompute_num_layers),
        optimizer=OptimizerSection(
            optimizer=a.optimizer, lr=sched["lr"], min_lr=sched["min_lr"], lr_decay_style=sched["lr_decay_style"],
            lr_warmup_iters=sched["lr_warmup_iters"], lr_warmup_init=sched["lr_warmup_init"],
            lr_decay_iters=sched["lr_decay_iters"], weight_decay=sched["weight_decay"],
            clip_grad=a.clip_grad, adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            max_skipped_iters=a.max_skipped_iters, vision_lr=a.vision_lr, vision_min_lr=a.vision_min_lr,
            vision_weight_decay=a.vision_weight_decay, decoupled_lr=a.decoupled_lr,
            decoupled_min_lr=a.decoupled_min_lr, freeze_lm=a.freeze_lm, freeze_vision=a.freeze_vision,
            lora_rank=a.lora_rank),
        ddp=DDPSection(use_distributed_optimizer=a.use_distributed_optimizer,
                       overlap_grad_reduce=a.overlap_grad_reduce, overlap_param_gather=a.overlap_param_gather),
        data=DataSection(data_path=tuple(a.data_path or ()),
                         valid_data_path=tuple(a.valid_data_path) if a.valid_data_path else None,
                         split=a.split, data_cache_path=a.data_cache_path, num_workers=a.num_workers,
                         tokenizer_model=a.tokenizer_model, loss_role=a.loss_role, seed=a.seed,
                         row_separator=row_separator, chat_template=decide_chat_template(a, resume)),
        checkpoint=CheckpointSection(save=a.save, load=a.load, save_interval=a.save_interval, finetune=a.finetune,
                                     no_load_optim=a.no_load_optim, no_load_rng=a.no_load_rng, ckpt_step=a.ckpt_step,
                                     keep_last_checkpoints=a.keep_last_checkpoints, no_save_optim=a.no_save_optim),
        logging=LoggingSection(log_interval=a.log_interval, eval_interval=a.eval_interval, eval_iters=a.eval_iters,
                               tensorboard_dir=a.tensorboard_dir, log_file=a.log_file,
                               exit_signal_handler=a.exit_signal_handler, exit_interval=a.exit_interval,
                               exit_duration_in_mins=a.exit_duration_in_mins, eval_tasks=a.eval_tasks,
                               eval_tasks_interval=a.eval_tasks_interval or a.eval_interval),
        dry_run=DryRunSection(enabled=a.dry_run, gpu=a.dry_run_gpu, mfu=a.dry_run_mfu,
                              transformer_impl=a.transformer_impl),
        resume=resume,
        flags=types.MappingProxyType(dict(vars(a))),
    )
