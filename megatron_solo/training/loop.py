"""The training loop of every phase (stage 1, 2, 3, SFT), read top to bottom.

:func:`pretrain` is a short sequence of named steps: set up the parallel world, build the model and
optimizer, load the start state, build the data, train. One iteration is one megatron-core
forward-backward schedule (skipped on NaN/inf), then log, evaluate, save, exit on signal/time. The run's
settings are a frozen :class:`~megatron_solo.training.config.TrainConfig` derived once from the flags.
Data order is a pure function of (seed, consumed samples), so a resumed run sees exactly the samples
an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_solo import checkpoint, cpu_backend, mcore_fixes, parallel, quiet
from megatron_solo.data import build_train_valid_test_datasets, parse_data_path
from megatron_solo.data.dataset import DataSplitError
from megatron_solo.data.tokenizer import SOLO_IDS
from megatron_solo.model import (
    build_solo_model,
    build_transformer_config,
    model_forward_kwargs,
    prepare_batch,
    solo_loss_func,
)
from megatron_solo.training import faults
from megatron_solo.training import param_groups
from megatron_solo.training.config import TrainConfig
from megatron_solo.training.flops import num_floating_point_operations
from megatron_solo.training.logger import TrainingLogger, memory_report
from megatron_solo.training.sampler import MicroBatchStream

REPORT_KEYS = ("lm loss", "image-doc loss", "text-doc loss")


# ------------------------------------------------------------------------------------------- the run
def pretrain(cfg: TrainConfig) -> dict:
    """Run one phase; returns a summary (for tests and launchers)."""
    t_start = time.time()
    log = setup_parallel(cfg)
    config = build_model_config(cfg)
    model_chunks = build_model_chunks(cfg, config)
    log.info(f"model {cfg.model}: {count_parameters(model_chunks) / 1e6:.2f}M parameters on this rank "
             f"({count_parameters(model_chunks, trainable_only=True) / 1e6:.2f}M trainable); "
             f"{memory_report()}", all_ranks_first=True)
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model_chunks)
    wire_schedule(cfg, config, model_chunks, optimizer)
    iteration, consumed = load_start_state(cfg, model_chunks, optimizer, scheduler, log)
    train_ds, valid_sets = faults.watch_data_files(*build_datasets(cfg))
    stream = MicroBatchStream(train_ds, cfg, consumed, num_workers=cfg.num_workers)
    summary = train(cfg, config, model_chunks, optimizer, scheduler, stream, valid_sets, iteration, log, t_start)
    log.close()
    torch.distributed.barrier()
    return summary


# ------------------------------------------------------------------------------------------- setup
def setup_parallel(cfg: TrainConfig) -> TrainingLogger:
    """Process group, megatron-core's parallel groups and seeds; the logger (on the last rank)."""
    parallel.init_process_group(timeout_s=cfg.distributed_timeout_minutes * 60)
    parallel.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        seed=cfg.seed,
    )
    log = TrainingLogger(cfg, is_logging_rank=torch.distributed.get_rank() == torch.distributed.get_world_size() - 1)
    log.info(f"megatron_solo: world {cfg.world_size} = TP {cfg.tensor_model_parallel_size} x PP "
             f"{cfg.pipeline_model_parallel_size} x DP {cfg.data_parallel_size}; backend "
             f"{'CPU/gloo' if cpu_backend.is_active() else 'CUDA/nccl'}; {memory_report()}", all_ranks_first=True)
    log.info(quiet.local_layers_note(cfg.use_te))
    return log


def build_model_config(cfg: TrainConfig):
    """megatron-core's TransformerConfig of this run."""
    return build_transformer_config(
        cfg.model_args,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        context_parallel_size=cfg.context_parallel_size,
        bf16=cfg.bf16, fp16=cfg.fp16,
        fp8=cfg.fp8_format, fp8_recipe=cfg.fp8_recipe, fp8_margin=cfg.fp8_margin,
        fp8_interval=cfg.fp8_interval, fp8_amax_history_len=cfg.fp8_amax_history_len,
        fp8_amax_compute_algo=cfg.fp8_amax_compute_algo, fp8_wgrad=not cfg.no_fp8_wgrad,
        fp8_param=cfg.fp8_param_gather,
        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        use_te=cfg.use_te,
    )


def build_model_chunks(cfg: TrainConfig, config):
    """One chunk per virtual pipeline stage, each wrapped in megatron-core DDP."""
    vpp = cfg.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        chunks.append(build_solo_model(
            cfg.model_args, config, vp_stage=vp_stage if vpp else None,
            padded_vocab_size=cfg.padded_vocab_size, use_te=cfg.use_te, core_attention=cfg.attention_backend,
        ))
    # Before the DDP wrap: frozen parameters get no gradient buffer, main copy or optimizer state.
    param_groups.apply_freezing(chunks, cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/inf steps are skipped and counted, not fatal
        average_in_collective=False,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))  # Megatron-LM: only chunk 0 overlaps
        for i, chunk in enumerate(chunks)
    ]


def count_parameters(model_chunks, trainable_only: bool = False) -> int:
    return sum(p.numel() for c in model_chunks for p in c.module.parameters() if p.requires_grad or not trainable_only)


def build_optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    """The one place the optimizer's settings are made (its parameter groups: :func:`build_optimizer_and_scheduler`
    with :func:`param_groups.config_overrides`)."""
    return OptimizerConfig(
        optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        decoupled_lr=cfg.decoupled_lr, decoupled_min_lr=cfg.decoupled_min_lr,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16, fp16=cfg.fp16, params_dtype=cfg.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        overlap_param_gather=cfg.overlap_param_gather,
    )


def build_optimizer_and_scheduler(cfg: TrainConfig, model_chunks):
    optim_config = build_optimizer_config(cfg)
    optimizer = get_megatron_optimizer(optim_config, model_chunks,
                                       config_overrides=param_groups.config_overrides(cfg, optim_config))
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=max(decay_iters, cfg.lr_warmup_iters + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(decay_iters // 10, 1) if cfg.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if cfg.lr_decay_style == "WSD" else None,
    )
    return optimizer, scheduler


def wire_schedule(cfg: TrainConfig, config, model_chunks, optimizer):
    """What megatron-core's schedules call back into, as Megatron-LM wires it."""
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in model_chunks]
    if len(model_chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    if cfg.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in model_chunks]
        if len(model_chunks) == 1:
            config.param_sync_func = config.param_sync_func[0]


def load_start_state(cfg: TrainConfig, model_chunks, optimizer, scheduler, log) -> tuple[int, int]:
    """Carry out the resume plan made with the config; returns (iteration, consumed samples)."""
    plan = cfg.resume
    if plan.note:
        log.info(plan.note)
    if plan.load_dir is None:
        return 0, 0
    info = checkpoint.load_checkpoint(
        plan.load_dir, model_chunks, optimizer, scheduler, info=plan.info, finetune=plan.finetune,
        load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng)
    iteration, consumed = info["iteration"], info["consumed_train_samples"]
    log.info(f"loaded {info['path']} ({'weights only, --finetune' if plan.finetune else 'resuming'}) "
             f"at iteration {iteration}, consumed samples {consumed}")
    if cfg.no_load_optim or plan.finetune:
        # The loaded weights are the new starting point of the optimizer's fp32 main copy.
        optimizer.reload_model_params()
    return iteration, consumed


# ---------------------------------------------------------------------------------- one iteration
def make_forward_step(config, stats, document_ids_mask=False):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        stats["images"] += int((batch["tokens"] == SOLO_IDS.vision_start).sum())
        prepared = prepare_batch(batch, config)
        # FlexAttention builds its block mask from [b, s] document ids, never an [s, s] tensor.
        output = model(**model_forward_kwargs(prepared, config, document_ids_mask=document_ids_mask))
        return output, partial(solo_loss_func, prepared)

    return forward_step


def _run_schedule(cfg, config, model_chunks, micro_batches, stats, forward_only):
    """One megatron-core forward(-backward) schedule over a global batch; returns the loss reports."""
    n = len(model_chunks)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(config, stats, cfg.attention_backend == "sdpa_flex"),
        data_iterator=[iter(micro_batches) for _ in range(n)] if n > 1 else [iter(micro_batches)],
        model=model_chunks if n > 1 else model_chunks[0],
        num_microbatches=cfg.num_microbatches,
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only,
    )


def _reduce_reports(reports: list[dict]) -> dict:
    """Sum [sum, count] over micro-batches and data-parallel ranks; return means (last stage only)."""
    out = {}
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return out
    for key in REPORT_KEYS:
        vals = [r[key] for r in reports if key in r]
        if not vals:
            continue
        total = torch.stack(vals).sum(0).float()
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        out[key] = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        out[key + " tokens"] = int(total[1].item())
    return out


def _grads_finite(model_chunks) -> bool:
    for chunk in model_chunks:
        for p in chunk.module.parameters():
            g = getattr(p, "main_grad", None)
            if g is not None and not torch.isfinite(g).all():
                return False
    return True


def _all_ranks_true(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if not cpu_backend.is_active():
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def train_step(cfg, config, model_chunks, optimizer, scheduler, micro_batches, stats):
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(cfg, config, model_chunks, micro_batches, stats, forward_only=False)
    losses = _reduce_reports(reports)
    loss_ok = all(v == v and abs(v) != float("inf") for k, v in losses.items() if k == "lm loss")
    if not _all_ranks_true(loss_ok and _grads_finite(model_chunks)):
        return losses, None, True  # skipped: weights, optimizer state and scheduler untouched
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:  # fp16 loss-scale overflow
        return losses, grad_norm, True
    scheduler.step(increment=1)
    return losses, grad_norm, False


def evaluate(cfg, config, model_chunks, dataset, stats):
    """Mean losses over ``--eval-iters`` global batches from the start of ``dataset`` (same every time)."""
    for chunk in model_chunks:
        chunk.eval()
    stream = MicroBatchStream(dataset, cfg, consumed=0)
    reports = []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            reports += _run_schedule(cfg, config, model_chunks, stream.global_step(), stats, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    means = _reduce_reports(reports)
    return {k: v for k, v in means.items() if k in REPORT_KEYS and means[k + " tokens"] > 0}


# --------------------------------------------------------------------------------------- training
def save(cfg: TrainConfig, iteration, model_chunks, optimizer, scheduler, consumed, log, reason) -> None:
    if not cfg.save:
        return
    with faults.saving(cfg.save, iteration):  # disk full / I/O error: one line, the tracker untouched
        checkpoint.save_checkpoint(
            cfg.save, iteration, model_chunks, None if cfg.no_save_optim else optimizer, scheduler,
            model_args=cfg.model_args, padded_vocab_size=cfg.padded_vocab_size,
            consumed_train_samples=consumed, args=cfg.checkpoint_args(),
            tokenizer_model=os.path.abspath(cfg.tokenizer_model) if cfg.tokenizer_model else None,
            keep_last=cfg.keep_last_checkpoints)
    log.info(f"saved checkpoint at iteration {iteration} to {cfg.save} ({reason})")


def stop_reason(cfg: TrainConfig, iteration, exit_signal, t_start) -> str | None:
    """Why the run stops after this iteration (agreed by every rank), or None."""
    if cfg.exit_signal_handler and not _all_ranks_true(exit_signal.received is None):
        return "signal"
    if cfg.exit_interval and iteration % cfg.exit_interval == 0:
        return "exit-interval"
    if cfg.exit_duration_in_mins and not _all_ranks_true((time.time() - t_start) / 60 < cfg.exit_duration_in_mins):
        return "exit-duration-in-mins"
    return None


def train(cfg: TrainConfig, config, model_chunks, optimizer, scheduler, stream, valid_sets, iteration, log,
          t_start) -> dict:
    """Iterate to --train-iters (or a stop); returns the run's summary."""
    exit_signal = faults.ExitSignal(cfg.exit_signal_handler)
    log.start_throughput(flops_per_iter=num_floating_point_operations(cfg))
    skipped_total, skipped_in_row = 0, 0
    stats = {"images": 0}
    history = []
    exit_reason = "finished"
    log.info(f"training from iteration {iteration} to {cfg.train_iters} "
             f"(global batch {cfg.global_batch_size} = micro {cfg.micro_batch_size} x "
             f"{cfg.num_microbatches} micro-batches x DP {cfg.data_parallel_size})")
    while iteration < cfg.train_iters:
        t0 = time.time()
        micro_batches = stream.global_step()
        stats["images"] = 0
        losses, grad_norm, skipped = train_step(cfg, config, model_chunks, optimizer, scheduler, micro_batches, stats)
        iteration += 1
        skipped_total += int(skipped)
        skipped_in_row = skipped_in_row + 1 if skipped else 0
        log.step_done(time.time() - t0, images=stats["images"], skipped=skipped)
        history.append({"iteration": iteration, "skipped": skipped, **losses})

        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            log.iteration_line(
                iteration=iteration, consumed=stream.consumed, lr=param_groups.group_learning_rates(optimizer),
                losses=losses, grad_norm=grad_norm, skipped_total=skipped_total)
        if skipped_in_row >= cfg.max_skipped_iters:
            log.info(f"error: {skipped_in_row} consecutive iterations had a NaN/inf loss or gradient; stopping "
                     f"(raise --max-skipped-iters, lower --lr, or check the data)")
            exit_reason = "nan"
            break
        if valid_sets and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters):
            for name, ds in valid_sets:
                log.validation(iteration, name, evaluate(cfg, config, model_chunks, ds, stats))
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
            save(cfg, iteration, model_chunks, optimizer, scheduler, stream.consumed, log, "save-interval")
        stop = stop_reason(cfg, iteration, exit_signal, t_start)
        if stop:
            save(cfg, iteration, model_chunks, optimizer, scheduler, stream.consumed, log, stop)
            exit_reason = stop
            log.info(f"exiting at iteration {iteration} ({stop})")
            break
    else:
        if cfg.save and (not cfg.save_interval or iteration % cfg.save_interval):
            save(cfg, iteration, model_chunks, optimizer, scheduler, stream.consumed, log, "end of training")
    return {"iteration": iteration, "consumed_train_samples": stream.consumed, "skipped": skipped_total,
            "exit_reason": exit_reason, "history": history}


# ------------------------------------------------------------------------------------------- data
def build_datasets(cfg: TrainConfig):
    """Train blend (+ validation sets, one per --valid-data-path prefix), built on every rank
    (the sample order is a pure function of the seed and the split)."""
    common = dict(seq_length=cfg.seq_length, seed=cfg.seed, loss_role=cfg.loss_role,
                  path_to_cache=cfg.data_cache_path)

    def on_rank():
        return True

    train_samples = cfg.train_iters * cfg.global_batch_size
    eval_samples = cfg.eval_iters * cfg.global_batch_size
    if cfg.valid_data_path:
        # Unused splits get 0 samples, not None: megatron-core refuses None sizes for weighted blends.
        train, _, _ = build_train_valid_test_datasets(" ".join(cfg.data_path), split="1,0,0",
                                                      train_samples=train_samples, valid_samples=0, test_samples=0,
                                                      is_built_on_rank=on_rank, **common)
        valid_sets = []
        prefixes, _ = parse_data_path(cfg.valid_data_path)  # Megatron's syntax, parsed in one place
        for prefix in prefixes:
            ds, _, _ = build_train_valid_test_datasets(prefix, split="1,0,0", train_samples=eval_samples,
                                                       valid_samples=0, test_samples=0,
                                                       is_built_on_rank=on_rank, **common)
            valid_sets.append((os.path.basename(prefix), ds))
        return train, valid_sets
    try:
        train, valid, _ = build_train_valid_test_datasets(
            " ".join(cfg.data_path), split=cfg.split, train_samples=train_samples,
            valid_samples=eval_samples if cfg.eval_iters else 0, test_samples=0, is_built_on_rank=on_rank, **common)
    except DataSplitError as e:  # too little data for --split: one line by rank 0, not a traceback per rank
        raise faults.InputError(str(e)) from None
    return train, ([("valid", valid)] if valid is not None and cfg.eval_iters else [])


def main(argv=None) -> int:
    from megatron_solo.training.arguments import parse_args

    faults.watch_parent()  # a torchrun worker exits (no save) when its agent dies
    cfg = parse_args(argv)  # a bad flag combination exits here with one error line
    if cfg.dry_run:  # plan only: no data, no GPU, no process group (megatron_solo/training/dry_run.py)
        from megatron_solo.training.dry_run import run_dry_run

        return run_dry_run(cfg)
    with faults.guarded_run(cfg):  # inputs checked, --save locked by rank 0; faults -> one error line
        cpu_backend.ensure()  # megatron-core on CPU/gloo when CUDA is absent (a no-op otherwise)
        mcore_fixes.apply()
        summary = pretrain(cfg)
        parallel.destroy()
    return 2 if summary["exit_reason"] == "nan" else 0
