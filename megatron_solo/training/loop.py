"""The training loop of every phase (stage 1, 2, 3, SFT), read top to bottom.

setup (groups, model chunks, DDP, optimizer, scheduler, checkpoint, data) -> train (one megatron-core
forward-backward schedule per iteration, skip on NaN/inf, log, evaluate, save, exit on signal/time).
Data order is a pure function of (seed, consumed samples), so a resumed run sees exactly the
samples an uninterrupted one would.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial

import torch

from megatron_solo import cpu_backend

cpu_backend.ensure()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_solo import parallel  # noqa: E402
from megatron_solo.data import build_train_valid_test_datasets, collate  # noqa: E402
from megatron_solo.data.tokenizer import SOLO_IDS  # noqa: E402
from megatron_solo.model import (  # noqa: E402
    build_solo_model,
    build_transformer_config,
    model_forward_kwargs,
    prepare_batch,
    solo_loss_func,
)
from megatron_solo.training import checkpointing  # noqa: E402
from megatron_solo.training.flops import num_floating_point_operations  # noqa: E402
from megatron_solo.training.logger import TrainingLogger, memory_report  # noqa: E402

REPORT_KEYS = ("lm loss", "image-doc loss", "text-doc loss")


# ----------------------------------------------------------------------------------------- setup
def build_model_chunks(args, config):
    """One chunk per virtual pipeline stage, each wrapped in megatron-core DDP."""
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        chunks.append(build_solo_model(
            args.model_args, config, vp_stage=vp_stage if vpp else None,
            padded_vocab_size=args.padded_vocab_size,
            use_te=None if args.transformer_impl is None else args.transformer_impl == "transformer_engine",
            core_attention=args.attention_backend,
        ))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/inf steps are skipped and counted, not fatal
        average_in_collective=False,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))  # Megatron-LM: only chunk 0 overlaps
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer_and_scheduler(args, model_chunks):
    opt_config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=max(decay_iters, args.lr_warmup_iters + 1),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(decay_iters // 10, 1) if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )
    return optimizer, scheduler


def wire_schedule(args, config, model_chunks, optimizer):
    """What megatron-core's schedules call back into, as Megatron-LM wires it."""
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in model_chunks]
    if len(model_chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    if args.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in model_chunks]
        if len(model_chunks) == 1:
            config.param_sync_func = config.param_sync_func[0]


class MicroBatchStream:
    """Micro-batches of one DP rank for global steps starting at ``consumed`` samples.

    Global step k covers samples [consumed + k*gbs, consumed + (k+1)*gbs); micro-batch m of DP rank r
    holds samples start + m*mbs*dp + r*mbs + [0, mbs), Megatron's pretraining-sampler order.
    """

    def __init__(self, dataset, args, consumed: int):
        self.dataset, self.args, self.consumed = dataset, args, consumed
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()

    def global_step(self):
        a = self.args
        start = self.consumed
        self.consumed += a.global_batch_size
        batches = []
        for m in range(a.num_microbatches):
            base = start + m * a.micro_batch_size * self.dp + self.dp_rank * a.micro_batch_size
            batches.append(collate([self.dataset[(base + j) % len(self.dataset)] for j in range(a.micro_batch_size)]))
        return batches


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


def _run_schedule(args, config, model_chunks, micro_batches, stats, forward_only):
    """One megatron-core forward(-backward) schedule over a global batch; returns the loss reports."""
    n = len(model_chunks)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(config, stats, args.attention_backend == "sdpa_flex"),
        data_iterator=[iter(micro_batches) for _ in range(n)] if n > 1 else [iter(micro_batches)],
        model=model_chunks if n > 1 else model_chunks[0],
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
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


def train_step(args, config, model_chunks, optimizer, scheduler, micro_batches, stats):
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(args, config, model_chunks, micro_batches, stats, forward_only=False)
    losses = _reduce_reports(reports)
    loss_ok = all(v == v and abs(v) != float("inf") for k, v in losses.items() if k == "lm loss")
    if not _all_ranks_true(loss_ok and _grads_finite(model_chunks)):
        return losses, None, True  # skipped: weights, optimizer state and scheduler untouched
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:  # fp16 loss-scale overflow
        return losses, grad_norm, True
    scheduler.step(increment=1)
    return losses, grad_norm, False


def evaluate(args, config, model_chunks, dataset, stats):
    """Mean losses over ``--eval-iters`` global batches from the start of ``dataset`` (same every time)."""
    for chunk in model_chunks:
        chunk.eval()
    stream = MicroBatchStream(dataset, args, consumed=0)
    reports = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            reports += _run_schedule(args, config, model_chunks, stream.global_step(), stats, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    means = _reduce_reports(reports)
    return {k: v for k, v in means.items() if k in REPORT_KEYS and means[k + " tokens"] > 0}


# ---------------------------------------------------------------------------------------- driver
class _ExitSignal:
    def __init__(self, enabled: bool):
        self.received = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum


def _checkpoint_args(args) -> dict:
    skip = {"model_args"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def pretrain(args) -> dict:
    """Run one phase; returns a summary (for tests and launchers)."""
    t_start = time.time()
    parallel.init_process_group(timeout_s=args.distributed_timeout_minutes * 60)
    parallel.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        seed=args.seed,
    )
    rank = torch.distributed.get_rank()
    log = TrainingLogger(args, is_logging_rank=rank == torch.distributed.get_world_size() - 1)
    log.info(f"megatron_solo: world {args.world_size} = TP {args.tensor_model_parallel_size} x PP "
             f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size}; backend "
             f"{'CPU/gloo' if cpu_backend.is_active() else 'CUDA/nccl'}; {memory_report()}", all_ranks_first=True)

    if args.tokenizer_model:
        from megatron_solo.data.tokenizer import SoloTokenizer

        SoloTokenizer(args.tokenizer_model).check_solo_ids()
    args.padded_vocab_size = resolve_padded_vocab_size(args)

    config = build_transformer_config(
        args.model_args,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        bf16=args.bf16, fp16=args.fp16,
        fp8=args.fp8_format, fp8_recipe=args.fp8_recipe, fp8_margin=args.fp8_margin,
        fp8_interval=args.fp8_interval, fp8_amax_history_len=args.fp8_amax_history_len,
        fp8_amax_compute_algo=args.fp8_amax_compute_algo, fp8_wgrad=not args.no_fp8_wgrad,
        fp8_param=args.fp8_param_gather,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        use_te=None if args.transformer_impl is None else args.transformer_impl == "transformer_engine",
    )
    model_chunks = build_model_chunks(args, config)
    n_params = sum(p.numel() for c in model_chunks for p in c.module.parameters())
    log.info(f"model {args.model}: {n_params / 1e6:.2f}M parameters on this rank; {memory_report()}",
             all_ranks_first=True)
    optimizer, scheduler = build_optimizer_and_scheduler(args, model_chunks)
    wire_schedule(args, config, model_chunks, optimizer)

    iteration, consumed = 0, 0
    load_dir, finetune = args.load, args.finetune
    if args.save and args.finetune and checkpointing.latest_iteration(args.save) is not None:
        # A restarted stage resumes its own checkpoint instead of re-initialising from the previous stage.
        load_dir, finetune = args.save, False
        log.info(f"resuming this stage from {args.save} (it already holds a checkpoint); --finetune ignored")
    if load_dir:
        if checkpointing.latest_iteration(load_dir) is None and args.ckpt_step is None:
            if finetune:
                raise SystemExit(f"error: --finetune: no complete checkpoint under {load_dir}")
            log.info(f"no checkpoint under {load_dir}: starting from scratch")
        else:
            info = checkpointing.load_checkpoint(
                load_dir, model_chunks, optimizer, scheduler, iteration=args.ckpt_step, finetune=finetune,
                load_optim=not args.no_load_optim, load_rng=not args.no_load_rng)
            iteration, consumed = info["iteration"], info["consumed_train_samples"]
            log.info(f"loaded {info['path']} ({'weights only, --finetune' if finetune else 'resuming'}) "
                     f"at iteration {iteration}, consumed samples {consumed}")
            if args.no_load_optim or finetune:
                # The loaded weights are the new starting point of the optimizer's fp32 main copy.
                optimizer.reload_model_params()

    train_ds, valid_sets = build_datasets(args)
    stream = MicroBatchStream(train_ds, args, consumed)
    exit_signal = _ExitSignal(args.exit_signal_handler)

    def save(reason):
        if not args.save:
            return
        checkpointing.save_checkpoint(
            args.save, iteration, model_chunks, None if args.no_save_optim else optimizer, scheduler,
            model_args=args.model_args, padded_vocab_size=args.padded_vocab_size,
            consumed_train_samples=stream.consumed, args=_checkpoint_args(args),
            tokenizer_model=os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None,
            keep_last=args.keep_last_checkpoints)
        log.info(f"saved checkpoint at iteration {iteration} to {args.save} ({reason})")

    flops_per_iter = num_floating_point_operations(args)
    skipped_total, skipped_in_row = 0, 0
    window = {"time": 0.0, "iters": 0, "images": 0, "skipped": 0}
    stats = {"images": 0}
    history = []
    exit_reason = "finished"
    log.info(f"training from iteration {iteration} to {args.train_iters} "
             f"(global batch {args.global_batch_size} = micro {args.micro_batch_size} x "
             f"{args.num_microbatches} micro-batches x DP {args.data_parallel_size})")
    while iteration < args.train_iters:
        t0 = time.time()
        micro_batches = stream.global_step()
        stats["images"] = 0
        losses, grad_norm, skipped = train_step(args, config, model_chunks, optimizer, scheduler,
                                                micro_batches, stats)
        iteration += 1
        dt = time.time() - t0
        skipped_total += int(skipped)
        skipped_in_row = skipped_in_row + 1 if skipped else 0
        window["time"] += dt
        window["iters"] += 1
        window["images"] += stats["images"]
        window["skipped"] += int(skipped)
        history.append({"iteration": iteration, "skipped": skipped, **losses})

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            images = torch.tensor([float(window["images"])])
            torch.distributed.all_reduce(images, group=parallel_state.get_data_parallel_group())
            log.iteration_line(
                iteration=iteration, consumed=stream.consumed, lr=scheduler.get_lr(optimizer.param_groups[0])
                if hasattr(scheduler, "get_lr") else optimizer.param_groups[0]["lr"],
                losses=losses, grad_norm=grad_norm, skipped_window=window["skipped"], skipped_total=skipped_total,
                step_time=window["time"] / window["iters"],
                tokens_per_s=args.global_batch_size * args.seq_length * window["iters"] / window["time"],
                images_per_s=images.item() / window["time"],
                flops_per_iter=flops_per_iter,
            )
            window = {"time": 0.0, "iters": 0, "images": 0, "skipped": 0}
        if skipped_in_row >= args.max_skipped_iters:
            log.info(f"error: {skipped_in_row} consecutive iterations had a NaN/inf loss or gradient; stopping "
                     f"(raise --max-skipped-iters, lower --lr, or check the data)")
            exit_reason = "nan"
            break
        if valid_sets and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            for name, ds in valid_sets:
                log.validation(iteration, name, evaluate(args, config, model_chunks, ds, stats))
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save("save-interval")
        stop = None
        if args.exit_signal_handler and not _all_ranks_true(exit_signal.received is None):
            stop = "signal"
        elif args.exit_interval and iteration % args.exit_interval == 0:
            stop = "exit-interval"
        elif args.exit_duration_in_mins and not _all_ranks_true(
                (time.time() - t_start) / 60 < args.exit_duration_in_mins):
            stop = "exit-duration-in-mins"
        if stop:
            save(stop)
            exit_reason = stop
            log.info(f"exiting at iteration {iteration} ({stop})")
            break
    else:
        if args.save and (not args.save_interval or iteration % args.save_interval):
            save("end of training")
    log.close()
    summary = {"iteration": iteration, "consumed_train_samples": stream.consumed, "skipped": skipped_total,
               "exit_reason": exit_reason, "history": history}
    torch.distributed.barrier()
    return summary


def resolve_padded_vocab_size(args) -> int:
    """Megatron's rule (a multiple of 128 x TP) for a new model; the checkpoint's own padding when one is
    loaded, so that a run can change TP (33280 rows saved at TP=2 load at TP=1; 33152 would not)."""
    tp = args.tensor_model_parallel_size
    for root in (args.save if args.finetune else None, args.load):
        if root and checkpointing.latest_iteration(root) is not None:
            padded = int(checkpointing.read_checkpoint_info(root, args.ckpt_step if root == args.load else None)
                         ["padded_vocab_size"])
            if padded % tp:
                raise SystemExit(f"error: the checkpoint in {root} has a vocabulary padded to {padded} rows, "
                                 f"which TP={tp} does not divide; convert it with tools/convert_checkpoint.py")
            return padded
    return args.model_args.padded_vocab_size(tp)


def build_datasets(args):
    """Train blend (+ validation sets, one per --valid-data-path prefix), built on every rank
    (the sample order is a pure function of the seed and the split)."""
    common = dict(seq_length=args.seq_length, seed=args.seed, loss_role=args.loss_role,
                  path_to_cache=args.data_cache_path)

    def on_rank():
        return True

    train_samples = args.train_iters * args.global_batch_size
    eval_samples = args.eval_iters * args.global_batch_size
    if args.valid_data_path:
        # Unused splits get 0 samples, not None: megatron-core refuses None sizes for weighted blends.
        train, _, _ = build_train_valid_test_datasets(" ".join(args.data_path), split="1,0,0",
                                                      train_samples=train_samples, valid_samples=0, test_samples=0,
                                                      is_built_on_rank=on_rank, **common)
        valid_sets = []
        prefixes = _blend_prefixes(args.valid_data_path)
        for prefix in prefixes:
            ds, _, _ = build_train_valid_test_datasets(prefix, split="1,0,0", train_samples=eval_samples,
                                                       valid_samples=0, test_samples=0,
                                                       is_built_on_rank=on_rank, **common)
            valid_sets.append((os.path.basename(prefix), ds))
        return train, valid_sets
    train, valid, _ = build_train_valid_test_datasets(
        " ".join(args.data_path), split=args.split, train_samples=train_samples,
        valid_samples=eval_samples if args.eval_iters else 0, test_samples=0, is_built_on_rank=on_rank, **common)
    return train, ([("valid", valid)] if valid is not None and args.eval_iters else [])


def _blend_prefixes(words):
    words = " ".join(words).split()
    try:
        float(words[0])
        return words[1::2]
    except ValueError:
        return words


def main(argv=None) -> int:
    from megatron_solo.training.arguments import parse_args

    args = parse_args(argv)
    summary = pretrain(args)
    parallel.destroy()
    return 2 if summary["exit_reason"] == "nan" else 0
