"""``--eval-tasks FILE[,FILE]`` in the training loop: the tasks scored on the model being trained, every
``--eval-tasks-interval`` iterations, by forward passes only (megatron-core's forward-only schedule, so
any TP/PP/DP layout the run has).

Log-likelihood tasks (``mc_loglikelihood``) run here: each option becomes one sample in the training
format (:class:`~megatron_solo.eval.options.OptionEncoder`, the same as tools/evaluate.py's), whose
summed loss over the tokens training counts is the option's negative log-likelihood. Tasks that need generation are said once at start-up and left to
tools/evaluate.py. Every data-parallel rank scores the same samples (the figures need no reduction);
the last pipeline stage holds them, where the logger is.

Training is unchanged by it: the chunks run in eval mode without gradients, the schedule is the
forward-only one, and neither the data stream, the optimizer nor any random state is touched.
"""

from __future__ import annotations

import math

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_solo.data.dataset import collate
from megatron_solo.eval import tasks as T
from megatron_solo.eval.options import OptionEncoder


class TaskEvaluator:
    """The run's evaluation tasks, encoded once; :meth:`run` scores them on the model chunks."""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        encoder = OptionEncoder(cfg.tokenizer_model_path)
        seq = cfg.schedule.seq_length
        self.tasks = []  # (task, rows: [(sample index, letter, training sample)], skipped: reason -> n)
        for task in T.load_tasks(cfg.logging.eval_tasks):
            if not task.scored_by_loglikelihood:
                log.info(f"eval task {task.name}: metric {task.metric} needs generation; not run in the training "
                         f"loop (tools/evaluate.py runs it)")
                continue
            rows, skipped = [], {r: len(ids) for r, ids in task.skipped.items()}
            for i, s in enumerate(task.samples):
                docs = {letter: encoder.encode(s, text) for letter, text in s.options.items()}
                if max(len(d.tokens) for d in docs.values()) > seq + 1:
                    skipped["too_long"] = skipped.get("too_long", 0) + 1
                    continue
                rows += [(i, letter, encoder.sample(d, seq)) for letter, d in docs.items()]
            self.tasks.append((task, rows, skipped))

    def run(self, iteration: int, model_chunks, forward_step) -> dict[str, dict]:
        """Score every task; log ``eval/<task>/<metric>`` (logging rank). Returns the figures (last stage)."""
        for chunk in model_chunks:
            chunk.eval()
        results = {}
        try:
            with torch.no_grad():
                for task, rows, skipped in self.tasks:
                    nll = self._option_nll(model_chunks, forward_step, [r[2] for r in rows])
                    if nll is None:  # not the last pipeline stage: the losses live there
                        continue
                    lls = {}
                    for (i, letter, _), v in zip(rows, nll):
                        lls.setdefault(i, {})[letter] = -v
                    records = [T.record(task, task.samples[i], ll) for i, ll in lls.items()]
                    results[task.name] = {**T.summarize(task, records),
                                          **{f"skipped {r}": float(n) for r, n in skipped.items()}}
                    self.log.eval_task(iteration, task.name, results[task.name])
        finally:
            for chunk in model_chunks:
                chunk.train()
        return results

    def _option_nll(self, model_chunks, forward_step, samples: list[dict]) -> list[float] | None:
        s = self.cfg.schedule
        mbs, n_chunks = s.micro_batch_size, len(model_chunks)
        n_micro = math.ceil(len(samples) / mbs)
        if n_chunks > 1:  # the interleaved schedule takes micro-batches in groups of the pipeline size
            pp = self.cfg.parallel.pipeline
            n_micro = math.ceil(n_micro / pp) * pp
        padded = samples + [samples[-1]] * (n_micro * mbs - len(samples))  # the extra rows are dropped below
        micro = [collate(padded[k * mbs:(k + 1) * mbs]) for k in range(n_micro)]

        def per_row_forward(data_iterator, model):
            output, loss_fn = forward_step(data_iterator, model)
            prepared = loss_fn.args[0]  # the prepared batch the run's loss function was bound to

            def per_row_loss(output_tensor):
                loss_sum, num_tokens, report = loss_fn(output_tensor)
                losses = output_tensor.float().view(mbs, -1)
                mask = prepared["loss_mask"].to(losses.device, torch.float32).view_as(losses)
                report["option nll"] = (losses * mask).sum(-1).detach()
                return loss_sum, num_tokens, report

            return output, per_row_loss

        reports = get_forward_backward_func()(
            forward_step_func=per_row_forward, data_iterator=[iter(micro) for _ in range(n_chunks)],
            model=model_chunks if n_chunks > 1 else model_chunks[0], num_microbatches=n_micro,
            seq_length=s.seq_length, micro_batch_size=mbs, forward_only=True)
        if not reports:
            return None
        return torch.cat([r["option nll"] for r in reports]).tolist()[:len(samples)]
