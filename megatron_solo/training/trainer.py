"""The trainer of every phase (stage 1, 2, 3, SFT): a :class:`Trainer` that owns its state, read top to bottom.

``Trainer(cfg)`` sets up, as named steps, what it then owns: the parallel world, the logger, the model
chunks (:mod:`megatron_solo.training.model_setup`), the optimizer and its scheduler, the
:class:`Checkpointer`. :meth:`Trainer.train` loads the start state, builds the data streams, and runs
iterations to ``--train-iters`` or a stop: take the next global batch from the stream, one megatron-core
forward-backward schedule (:meth:`Trainer.train_step`, skipped on NaN/inf), record and log, evaluate,
save, stop on a signal, an interval or time. The settings are the frozen, sectioned
:class:`~megatron_solo.training.config.TrainConfig`. Data order is a pure function of (seed, consumed
samples), so a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_solo import checkpoint, cpu_backend, parallel, quiet
from megatron_solo.data import build_train_valid_test_datasets, parse_data_path
from megatron_solo.data.dataset import DataSplitError
from megatron_solo.eval.in_loop import TaskEvaluator
from megatron_solo.model import model_forward_kwargs, prepare_batch, solo_loss_func
from megatron_solo.spec import SoloVocab
from megatron_solo.training import faults, param_groups
from megatron_solo.training.config import TrainConfig
from megatron_solo.training.flops import flops_per_step
from megatron_solo.training.logger import TrainingLogger, over_ranks
from megatron_solo.training.model_setup import build_trained_chunks, count_parameters
from megatron_solo.training.sampler import MicroBatchStream

REPORT_KEYS = ("lm loss", "image-doc loss", "text-doc loss")


@dataclasses.dataclass
class StepResult:
    losses: dict                    # REPORT_KEYS means and token counts (last pipeline stage)
    grad_norm: float | None
    skipped: bool                   # NaN/inf loss or gradient, or an fp16 overflow: nothing was updated


# ------------------------------------------------------------------------------------------- the run
class Trainer:
    """One phase's training state and its loop. ``Trainer(cfg, vocab).train()`` returns the run's summary.

    ``vocab``: the run's SOLO vocabulary as the start-up input check decided it (``faults.check_inputs``):
    images are counted by its ``<vision>`` id and every checkpoint records it. ``None`` (nothing said which
    base the ids are of) falls back to the checkpoint's or Mistral's (``faults.inputs.run_vocab``)."""

    def __init__(self, cfg: TrainConfig, vocab: SoloVocab | None = None):
        self.cfg = cfg
        self.vocab = vocab if vocab is not None else faults.inputs.run_vocab(cfg)
        self.t_start = time.time()
        self.log = start_parallel_world(cfg)
        self.model_config = cfg.transformer_config()
        self.model_chunks = build_trained_chunks(cfg, self.model_config)
        counts = over_ranks({"all": count_parameters(self.model_chunks) / 1e6,
                             "trainable": count_parameters(self.model_chunks, trainable_only=True) / 1e6}, ".2f")
        if cfg.model.source_note:
            self.log.info(cfg.model.source_note)
        self.log.memory_line(f"model {cfg.model.preset or cfg.model.args.family}: {counts['all']}M parameters per rank "
                             f"({counts['trainable']}M trainable)")
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(cfg, self.model_chunks)
        wire_schedule(cfg, self.model_config, self.model_chunks, self.optimizer)
        self.checkpointer = Checkpointer(cfg, self.model_chunks, self.optimizer, self.scheduler, self.log, self.vocab)
        self.forward_step = make_forward_step(cfg, self.model_config)
        self.task_evaluator = TaskEvaluator(cfg, self.log) if cfg.logging.eval_tasks else None
        self.iteration = 0
        self.stream: MicroBatchStream | None = None  # the data streams: built by train(), after the start state
        self.valid_sets: list = []
        self.skipped_total = self.skipped_in_row = 0
        self.history: list[dict] = []

    def train(self) -> dict:
        """Load the start state, build the data, iterate to --train-iters (or a stop); returns the summary."""
        cfg, log = self.cfg, self.log
        self.iteration, consumed = self.checkpointer.load_start_state()
        self.build_data(consumed)
        exit_signal = faults.ExitSignal(cfg.logging.exit_signal_handler)
        log.start_throughput(flops_per_iter=flops_per_step(cfg))
        s = cfg.schedule
        log.info(f"training from iteration {self.iteration} to {s.train_iters} (global batch {s.global_batch_size} "
                 f"= micro {s.micro_batch_size} x {s.num_microbatches} micro-batches x DP {cfg.parallel.data})")
        exit_reason = "finished"
        while self.iteration < s.train_iters:
            t0 = time.time()
            batch = self.stream.next_batch()
            result = self.train_step(batch.micro_batches)
            self.iteration += 1
            self.record(result, seconds=time.time() - t0, images=batch.images)
            if self.skipped_in_row >= cfg.optimizer.max_skipped_iters:
                log.info(f"error: {self.skipped_in_row} consecutive iterations had a NaN/inf loss or gradient; "
                         f"stopping (raise --max-skipped-iters, lower --lr, or check the data)")
                exit_reason = "nan"
                break
            self.evaluate_if_due()
            self.evaluate_tasks_if_due()
            if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0:
                self.checkpointer.save(self.iteration, self.stream.consumed, "save-interval")
            stop = self.stop_reason(exit_signal)
            if stop:
                self.checkpointer.save(self.iteration, self.stream.consumed, stop)
                exit_reason = stop
                log.info(f"exiting at iteration {self.iteration} ({stop})")
                break
        else:
            interval = cfg.checkpoint.save_interval
            if not interval or self.iteration % interval:
                self.checkpointer.save(self.iteration, self.stream.consumed, "end of training")
        return {"iteration": self.iteration, "consumed_train_samples": self.stream.consumed,
                "skipped": self.skipped_total, "exit_reason": exit_reason, "history": self.history}

    def build_data(self, consumed: int) -> None:
        """The train stream from ``consumed`` samples on, and the validation sets; data files watched."""
        train_ds, self.valid_sets = faults.watch_data_files(*build_datasets(self.cfg))
        self.stream = MicroBatchStream(train_ds, self.cfg.schedule, consumed, num_workers=self.cfg.data.num_workers,
                                       vision_start=self.vocab.vision_start if self.vocab is not None else None)
        if self.vocab is None:
            self.log.info("images/s is not counted: nothing says which base's ids the data has "
                          "(pass --tokenizer-model)")

    def close(self) -> None:
        self.log.close()
        torch.distributed.barrier()

    # ------------------------------------------------------------------------------ one iteration
    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One forward-backward schedule over a global batch, then the optimizer step unless skipped."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = reduce_reports(self.run_schedule(micro_batches, forward_only=False))
        loss_ok = all(v == v and abs(v) != float("inf") for k, v in losses.items() if k == "lm loss")
        if not all_ranks_true(loss_ok and grads_finite(self.model_chunks)):
            return StepResult(losses, None, True)  # skipped: weights, optimizer state and scheduler untouched
        update_successful, grad_norm, _ = self.optimizer.step()
        if not update_successful:  # fp16 loss-scale overflow
            return StepResult(losses, grad_norm, True)
        self.scheduler.step(increment=1)
        return StepResult(losses, grad_norm, False)

    def run_schedule(self, micro_batches: list[dict], *, forward_only: bool) -> list[dict]:
        """One megatron-core forward(-backward) schedule over a global batch; returns the loss reports."""
        chunks = self.model_chunks
        n = len(chunks)
        return get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=[iter(micro_batches) for _ in range(n)],
            model=chunks if n > 1 else chunks[0],
            num_microbatches=self.cfg.schedule.num_microbatches,
            seq_length=self.cfg.schedule.seq_length,
            micro_batch_size=self.cfg.schedule.micro_batch_size,
            forward_only=forward_only,
        )

    def record(self, result: StepResult, *, seconds: float, images: int) -> None:
        """Count skipped steps, keep the history, and print the log line when it is due."""
        self.skipped_total += int(result.skipped)
        self.skipped_in_row = self.skipped_in_row + 1 if result.skipped else 0
        self.log.step_done(seconds, images=images, skipped=result.skipped)
        self.history.append({"iteration": self.iteration, "skipped": result.skipped, **result.losses})
        if self.iteration % self.cfg.logging.log_interval == 0 or self.iteration == self.cfg.schedule.train_iters:
            self.log.iteration_line(
                iteration=self.iteration, consumed=self.stream.consumed,
                lr=param_groups.group_learning_rates(self.optimizer), losses=result.losses,
                grad_norm=result.grad_norm, skipped_total=self.skipped_total)

    def evaluate_if_due(self) -> None:
        if self.valid_sets and (self.iteration % self.cfg.logging.eval_interval == 0
                                or self.iteration == self.cfg.schedule.train_iters):
            for name, ds in self.valid_sets:
                self.log.validation(self.iteration, name, self.evaluate(ds))

    def evaluate_tasks_if_due(self) -> None:
        """--eval-tasks, by forward passes only (megatron_solo/eval/in_loop.py: training is unchanged)."""
        interval = self.cfg.logging.eval_tasks_interval
        if self.task_evaluator and (self.iteration % interval == 0 or self.iteration == self.cfg.schedule.train_iters):
            self.task_evaluator.run(self.iteration, self.model_chunks, self.forward_step)

    def evaluate(self, dataset) -> dict:
        """Mean losses over ``--eval-iters`` global batches from the start of ``dataset`` (same every time)."""
        for chunk in self.model_chunks:
            chunk.eval()
        stream = MicroBatchStream(dataset, self.cfg.schedule, consumed=0)
        reports = []
        with torch.no_grad():
            for _ in range(self.cfg.logging.eval_iters):
                reports += self.run_schedule(stream.global_step(), forward_only=True)
        for chunk in self.model_chunks:
            chunk.train()
        means = reduce_reports(reports)
        return {k: v for k, v in means.items() if k in REPORT_KEYS and means[k + " tokens"] > 0}

    def stop_reason(self, exit_signal) -> str | None:
        """Why the run stops after this iteration (agreed by every rank), or None."""
        lg = self.cfg.logging
        if lg.exit_signal_handler and not all_ranks_true(exit_signal.received is None):
            return "signal"
        if lg.exit_interval and self.iteration % lg.exit_interval == 0:
            return "exit-interval"
        if lg.exit_duration_in_mins and not all_ranks_true(
                (time.time() - self.t_start) / 60 < lg.exit_duration_in_mins):
            return "exit-duration-in-mins"
        return None


def make_forward_step(cfg: TrainConfig, model_config):
    """megatron-core's ``forward_step_func`` of this run: the batch in the layout the model's layer spec
    was built for (``cfg.model.thd_batches``, the one decision), then the model and the loss."""
    thd = cfg.model.thd_batches
    # FlexAttention builds its block mask from [b, s] document ids, never an [s, s] tensor.
    document_ids_mask = cfg.model.attention_backend == "sdpa_flex"

    def forward_step(data_iterator, model):
        prepared = prepare_batch(next(data_iterator), model_config, thd=thd)
        output = model(**model_forward_kwargs(prepared, model_config, document_ids_mask=document_ids_mask,
                                              model_args=cfg.model.args))
        return output, partial(solo_loss_func, prepared)

    return forward_step


# ------------------------------------------------------------------------------------------- setup
def start_parallel_world(cfg: TrainConfig) -> TrainingLogger:
    """Process group, megatron-core's parallel groups and seeds; the logger (on the last rank)."""
    par = cfg.parallel
    parallel.init_process_group(timeout_s=par.timeout_minutes * 60)
    parallel.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline, context_parallel_size=par.context,
        seed=cfg.data.seed,
    )
    log = TrainingLogger(cfg, is_logging_rank=torch.distributed.get_rank() == torch.distributed.get_world_size() - 1)
    log.memory_line(f"megatron_solo: world {par.world_size} = TP {par.tensor} x PP {par.pipeline} x DP {par.data}; "
                    f"backend {'CPU/gloo' if cpu_backend.is_active() else 'CUDA/nccl'}")
    log.info(quiet.local_layers_note(cfg.model.use_te))
    return log


def build_optimizer_and_scheduler(cfg: TrainConfig, model_chunks):
    optim_config = cfg.optimizer_config()
    optimizer = get_megatron_optimizer(optim_config, model_chunks,
                                       config_overrides=param_groups.config_overrides(cfg.optimizer, optim_config))
    o = cfg.optimizer
    decay_iters = o.lr_decay_iters
    wsd = o.lr_decay_style == "WSD"
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters, lr_decay_steps=max(decay_iters, o.lr_warmup_iters + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(decay_iters // 10, 1) if wsd else None,
        lr_wsd_decay_style="linear" if wsd else None,
        # The decision is the config's (decide_schedule): from the checkpoint, cfg holds its values already.
        override_opt_param_scheduler=cfg.resume.schedule_from == "flags",
        use_checkpoint_opt_param_scheduler=cfg.resume.schedule_from == "checkpoint",
    )
    return optimizer, scheduler


def wire_schedule(cfg: TrainConfig, model_config, model_chunks, optimizer) -> None:
    """What megatron-core's schedules call back into, as Megatron-LM wires it."""
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    single = len(model_chunks) == 1
    no_sync = [c.no_sync for c in model_chunks]
    model_config.no_sync_func = no_sync[0] if single else no_sync
    if cfg.ddp.overlap_param_gather:
        param_sync = [c.start_param_sync for c in model_chunks]
        model_config.param_sync_func = param_sync[0] if single else param_sync


class Checkpointer:
    """The run's checkpoints: carries out the resume plan made with the config, and saves to ``--save``."""

    def __init__(self, cfg: TrainConfig, model_chunks, optimizer, scheduler, log: TrainingLogger,
                 vocab: SoloVocab | None = None):
        self.cfg, self.model_chunks, self.optimizer, self.scheduler, self.log = cfg, model_chunks, optimizer, scheduler, log
        self.vocab = vocab  # recorded in every checkpoint: the ids its model was trained with

    def load_start_state(self) -> tuple[int, int]:
        """Returns (iteration, consumed samples) to start from."""
        cfg, plan, log = self.cfg, self.cfg.resume, self.log
        if plan.note:
            log.info(plan.note)
        if plan.load_dir is None:
            return 0, 0
        ck = cfg.checkpoint
        info = checkpoint.load_checkpoint(
            plan.load_dir, self.model_chunks, self.optimizer, self.scheduler, info=plan.info, finetune=plan.finetune,
            load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
            schedule_from_flags=plan.schedule_from == "flags")
        iteration, consumed = info["iteration"], info["consumed_train_samples"]
        log.info(f"loaded {info['path']} ({'weights only, --finetune' if plan.finetune else 'resuming'}) "
                 f"at iteration {iteration}, consumed samples {consumed}")
        if ck.no_load_optim or plan.finetune:
            # The loaded weights are the new starting point of the optimizer's fp32 main copy.
            self.optimizer.reload_model_params()
        return iteration, consumed

    def save(self, iteration: int, consumed: int, reason: str) -> None:
        ck, cfg = self.cfg.checkpoint, self.cfg
        if not ck.save:
            return
        with faults.saving(ck.save, iteration):  # disk full / I/O error: one line, the tracker untouched
            checkpoint.save_checkpoint(
                ck.save, iteration, self.model_chunks, None if ck.no_save_optim else self.optimizer, self.scheduler,
                model_args=cfg.model.args, padded_vocab_size=cfg.model.padded_vocab_size,
                consumed_train_samples=consumed, args=cfg.checkpoint_args(),
                tokenizer_model=cfg.tokenizer_model_path, vocab=self.vocab, keep_last=ck.keep_last_checkpoints)
        self.log.info(f"saved checkpoint at iteration {iteration} to {ck.save} ({reason})")


# ---------------------------------------------------------------------------------- collectives
def reduce_reports(reports: list[dict]) -> dict:
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


def grads_finite(model_chunks) -> bool:
    """Whether every gradient is finite, by one sum over each DDP gradient buffer (every ``main_grad`` is a
    view into one): a NaN or inf makes the sum NaN or inf. One read of the gradients, where ``isfinite``
    per parameter makes four passes and two temporaries (11% of a tiny Qwen3 step, docs/BENCHMARKS.md).
    Finite gradients whose sum overflows would overflow the clipping's norm too: skipped either way."""
    sums = [b.grad_data.sum() for c in model_chunks for b in (*c.buffers, *c.expert_parallel_buffers)]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def all_ranks_true(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if not cpu_backend.is_active():
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


# ------------------------------------------------------------------------------------------- data
def build_datasets(cfg: TrainConfig):
    """Train blend (+ validation sets, one per --valid-data-path prefix), built on every rank
    (the sample order is a pure function of the seed and the split)."""
    d, s = cfg.data, cfg.schedule
    common = dict(seq_length=s.seq_length, seed=d.seed, loss_role=d.loss_role, path_to_cache=d.data_cache_path)

    def on_rank():
        return True

    train_samples = s.train_iters * s.global_batch_size
    eval_samples = cfg.logging.eval_iters * s.global_batch_size
    if d.valid_data_path:
        # Unused splits get 0 samples, not None: megatron-core refuses None sizes for weighted blends.
        train, _, _ = build_train_valid_test_datasets(" ".join(d.data_path), split="1,0,0",
                                                      train_samples=train_samples, valid_samples=0, test_samples=0,
                                                      is_built_on_rank=on_rank, **common)
        valid_sets = []
        prefixes, _ = parse_data_path(list(d.valid_data_path))  # Megatron's syntax, parsed in one place
        for prefix in prefixes:
            ds, _, _ = build_train_valid_test_datasets(prefix, split="1,0,0", train_samples=eval_samples,
                                                       valid_samples=0, test_samples=0,
                                                       is_built_on_rank=on_rank, **common)
            valid_sets.append((os.path.basename(prefix), ds))
        return train, valid_sets
    try:
        train, valid, _ = build_train_valid_test_datasets(
            " ".join(d.data_path), split=d.split, train_samples=train_samples,
            valid_samples=eval_samples if cfg.logging.eval_iters else 0, test_samples=0, is_built_on_rank=on_rank,
            **common)
    except DataSplitError as e:  # too little data for --split: one line by rank 0, not a traceback per rank
        raise faults.InputError(str(e)) from None
    return train, ([("valid", valid)] if valid is not None and cfg.logging.eval_iters else [])
