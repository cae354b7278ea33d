"""``--eval-tasks FILE[,FILE]`` in the training loop: the tasks scored on the model being trained, every
``--eval-tasks-interval`` iterations, by forward passes only (megatron-core's forward-only schedule, so
any TP/PP/DP layout the run has).

Log-likelihood tasks (``mc_loglikelihood``) run here: each option becomes one sample in the training
format (:class:`~megatron_solo.eval.options.OptionEncoder`, the same as tools/evaluate.py's), whose
summed loss over the tokens training counts is the option's negative log-likelihood. Generation tasks
run here too, by greedy decoding of the chat prompt the export's processor makes (the assistant's turn
opened); a sample stops at EOS or the template's turn end, or after ``max_new_tokens``. They decode as
tools/evaluate.py --load does, on megatron-core's inference machinery with a KV cache
(:mod:`~megatron_solo.eval.mcore_generation`: prompts of one length batched, at most a micro-batch a
batch, prefilled once, then one token per step). Where that machinery does not serve (a virtual
pipeline, sequence parallelism, FP8: said once at start-up), each step is one forward-only pass over the
prompts so far on megatron-core's schedule instead (no cache): the model called without labels gives its
vocabulary-parallel logits, the argmax is taken across the tensor-parallel ranks (padding rows beyond
the tokenizer never win) and sent to every pipeline stage. Not run here, said once at start-up:
``prompt_format: pretrain`` tasks and runs with context parallelism.

Every data-parallel rank scores the same samples (the figures need no reduction); the last pipeline
stage holds them, where the logger is, which also writes each sample's record (``eval_samples`` in the
``--log-file``, as tools/evaluate.py's samples.jsonl).

Training is unchanged by it: the chunks run in eval mode without gradients, the schedule is the
forward-only one, and neither the data stream, the optimizer nor any random state is touched.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_solo import cpu_backend
from megatron_solo.convert.hf_export_files import generation_stop_ids
from megatron_solo.data.dataset import collate
from megatron_solo.eval import mcore_generation
from megatron_solo.eval import tasks as T
from megatron_solo.eval.options import OptionEncoder, patch_coords


class TaskEvaluator:
    """The run's evaluation tasks, encoded once; :meth:`run` scores them on the model chunks."""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        encoder = OptionEncoder(cfg.tokenizer_model_path, cfg.data.row_separator)  # images as the run's data
        seq = cfg.schedule.seq_length
        self.encoder = encoder
        # Generation with megatron-core's KV cache where it serves (decided once; the reason said once).
        self.no_cache = mcore_generation.unsupported(cfg.transformer_config())
        self.tasks = []  # (task, rows, skipped: reason -> n); rows: [(sample index, letter, training sample)]
        # for a log-likelihood task, [(sample index, generation prompt)] for a generation task
        for task in T.load_tasks(cfg.logging.eval_tasks):
            skipped = {r: len(ids) for r, ids in task.skipped.items()}
            if not task.scored_by_loglikelihood:
                why = ("its prompt_format is pretrain" if task.prompt_format == "pretrain" else
                       "generation needs --context-parallel-size 1" if cfg.parallel.context > 1 else None)
                if why:
                    log.info(f"eval task {task.name}: {why}; not run in the training loop (tools/evaluate.py "
                             f"runs it)")
                    continue
                rows = []
                for i, s in enumerate(task.samples):
                    prompt = encoder.generation_prompt(s)
                    if len(prompt.tokens) + task.max_new_tokens > seq:  # tools/evaluate.py's rule, in --seq-length
                        skipped["too_long"] = skipped.get("too_long", 0) + 1
                        continue
                    rows.append((i, prompt))
                self.tasks.append((task, rows, skipped))
                continue
            rows = []
            for i, s in enumerate(task.samples):
                docs = {letter: encoder.encode(s, text) for letter, text in s.options.items()}
                if max(len(d.tokens) for d in docs.values()) > seq + 1:
                    skipped["too_long"] = skipped.get("too_long", 0) + 1
                    continue
                rows += [(i, letter, encoder.sample(d, seq)) for letter, d in docs.items()]
            self.tasks.append((task, rows, skipped))

        if any(not t.scored_by_loglikelihood for t, _, _ in self.tasks):
            log.info(f"eval generation tasks decode without a KV cache (megatron-core's inference: {self.no_cache})"
                     if self.no_cache else "eval generation tasks decode on megatron-core's text generation "
                     "controller with its KV cache")

    def run(self, iteration: int, model_chunks, forward_step) -> dict[str, dict]:
        """Score every task; log ``eval/<task>/<metric>`` (logging rank). Returns the figures (last stage)."""
        for chunk in model_chunks:
            chunk.eval()
        results = {}
        try:
            with torch.no_grad():
                for task, rows, skipped in self.tasks:
                    if not rows:  # every sample skipped: the figures of no sample, and the skips
                        records = []
                    elif task.scored_by_loglikelihood:
                        nll = self._option_nll(model_chunks, forward_step, [r[2] for r in rows])
                        if nll is None:  # not the last pipeline stage: the losses live there
                            continue
                        lls = {}
                        for (i, letter, _), v in zip(rows, nll):
                            lls.setdefault(i, {})[letter] = -v
                        records = [T.record(task, task.samples[i], ll) for i, ll in lls.items()]
                    else:  # every rank has the answers (each step's tokens reach every stage)
                        generate = self._generate if self.no_cache else self._generate_cached
                        answers = generate(model_chunks, forward_step, [p for _, p in rows], task.max_new_tokens)
                        records = [T.record(task, task.samples[i], self.encoder.decode_answer(a))
                                   for (i, _), a in zip(rows, answers)]
                    results[task.name] = {**T.summarize(task, records),
                                          **{f"skipped {r}": float(n) for r, n in skipped.items()}}
                    self.log.eval_task(iteration, task.name, results[task.name])
                    self.log.eval_samples(iteration, task.name, records)
        finally:
            for chunk in model_chunks:
                chunk.train()
        return results

    def _micro_batches(self, samples: list[dict], n_chunks: int) -> tuple[int, list[dict]]:
        """The schedule's micro-batches of ``samples`` (the last one's rows repeated to fill them)."""
        mbs = self.cfg.schedule.micro_batch_size
        n_micro = math.ceil(len(samples) / mbs)
        if n_chunks > 1:  # the interleaved schedule takes micro-batches in groups of the pipeline size
            pp = self.cfg.parallel.pipeline
            n_micro = math.ceil(n_micro / pp) * pp
        padded = samples + [samples[-1]] * (n_micro * mbs - len(samples))  # the extra rows are dropped later
        return n_micro, [collate(padded[k * mbs:(k + 1) * mbs]) for k in range(n_micro)]

    def _schedule(self, model_chunks, forward_step_func, micro: list[dict]) -> list[dict]:
        """megatron-core's forward-only schedule over ``micro``: the loss functions' reports (last stage)."""
        n_chunks = len(model_chunks)
        return get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=[iter(micro) for _ in range(n_chunks)],
            model=model_chunks if n_chunks > 1 else model_chunks[0], num_microbatches=len(micro),
            seq_length=self.cfg.schedule.seq_length, micro_batch_size=self.cfg.schedule.micro_batch_size,
            forward_only=True)

    def _generate_cached(self, model_chunks, forward_step, prompts: list, max_new_tokens: int) -> list[list[int]]:
        """Greedy answers (token ids, the stop id excluded) of the generation prompts, on megatron-core's
        controller and KV cache: prompts of one length together, at most a micro-batch at a time."""
        (model,) = model_chunks
        generator = mcore_generation.SoloGenerator(model, self.cfg.model.args,
                                                   generation_stop_ids(self.encoder.tokenizer.vocab))
        device = cpu_backend.device()
        by_length = {}
        for k, p in enumerate(prompts):
            by_length.setdefault(len(p.tokens), []).append(k)
        answers = [None] * len(prompts)
        mbs = self.cfg.schedule.micro_batch_size
        for keys in by_length.values():
            for start in range(0, len(keys), mbs):
                chunk = keys[start:start + mbs]
                requests = [generator.request(
                    prompts[k].tokens.tolist(), torch.from_numpy(prompts[k].patches).to(device),
                    torch.from_numpy(patch_coords(prompts[k])).to(device), max_new_tokens) for k in chunk]
                for k, ids in zip(chunk, generator.generate(requests)):
                    answers[k] = ids
        return answers

    def _generate(self, model_chunks, forward_step, prompts: list, max_new_tokens: int) -> list[list[int]]:
        """Greedy answers (token ids, the stop token excluded) of the generation prompts, without a cache."""
        vocab = self.encoder.tokenizer.vocab
        stop = {vocab.eos, vocab.im_end}  # the export's generation_config stops at the same two
        seq = self.cfg.schedule.seq_length
        answers = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            if not active:
                break
            samples = [self.encoder.continued(prompts[k], answers[k], seq) for k in active]
            last = [len(prompts[k].tokens) + len(answers[k]) - 1 for k in active]
            still = []
            for k, token in zip(active, self._next_tokens(model_chunks, forward_step, samples, last, vocab.size)):
                if token not in stop:
                    answers[k].append(token)
                    still.append(k)
            active = still
        return answers

    def _next_tokens(self, model_chunks, forward_step, samples, last: list[int], vocab_size: int) -> list[int]:
        """The argmax next token at position ``last[k]`` of each sample, on every rank."""
        mbs = self.cfg.schedule.micro_batch_size
        n_micro, micro = self._micro_batches(samples, len(model_chunks))
        positions = iter(torch.tensor(last + [last[-1]] * (n_micro * mbs - len(last))).view(n_micro, mbs))

        def logits_forward(data_iterator, model):
            output, _ = forward_step(data_iterator, _WithoutLabels(model))

            def greedy(logits):  # the last stage: [b, s, V/TP] (or the micro-batch as one packed row)
                ids = _argmax_across_tp(logits.reshape(mbs, -1, logits.shape[-1]), next(positions), vocab_size)
                zero = logits.new_zeros(())
                return zero, torch.ones((), dtype=torch.int, device=zero.device), {"next token": ids}

            return output, greedy

        reports = self._schedule(model_chunks, logits_forward, micro)
        tokens = torch.zeros(n_micro * mbs, dtype=torch.long, device=cpu_backend.device())
        if reports:
            tokens.copy_(torch.cat([r["next token"] for r in reports]))
        torch.distributed.broadcast(tokens, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
        return tokens.tolist()[:len(samples)]

    def _option_nll(self, model_chunks, forward_step, samples: list[dict]) -> list[float] | None:
        mbs = self.cfg.schedule.micro_batch_size
        _, micro = self._micro_batches(samples, len(model_chunks))

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

        reports = self._schedule(model_chunks, per_row_forward, micro)
        if not reports:
            return None
        return torch.cat([r["option nll"] for r in reports]).tolist()[:len(samples)]


class _WithoutLabels:
    """The model called without labels: megatron-core's GPTModel then returns its (vocabulary-parallel)
    logits instead of the per-token losses; the batch is otherwise the run's own (trainer.forward_step)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kwargs):
        kwargs.pop("labels", None)
        kwargs.pop("loss_mask", None)
        return self.model(**kwargs)


def _argmax_across_tp(logits: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b] the vocabulary's argmax at ``positions`` of ``logits`` [b, s, V/TP] (this rank's vocabulary
    shard): the first of equal maxima, as ``torch.argmax`` over the whole row; rows >= ``vocab_size``
    (padding) excluded."""
    rows = logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)].float()
    shard = rows.shape[-1]
    offset = parallel_state.get_tensor_model_parallel_rank() * shard
    ids = offset + torch.arange(shard, device=rows.device)
    rows = rows.masked_fill(ids >= vocab_size, float("-inf"))
    idx = rows.argmax(-1)
    best, idx = rows.gather(-1, idx[:, None])[:, 0], idx + offset
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return idx
    group = parallel_state.get_tensor_model_parallel_group()
    bests, idxs = [torch.empty_like(best) for _ in range(tp)], [torch.empty_like(idx) for _ in range(tp)]
    torch.distributed.all_gather(bests, best, group=group)
    torch.distributed.all_gather(idxs, idx, group=group)
    winner = torch.stack(bests).argmax(0)  # the first maximum: the lowest shard, so the lowest id
    return torch.stack(idxs).gather(0, winner[None])[0]
