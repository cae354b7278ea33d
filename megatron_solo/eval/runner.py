"""Running tasks on a Hugging Face export: greedy, batched generation with the KV cache, option
log-likelihoods by forward passes, per-sample records, a summary and a printed table.

Batches hold prompts of one length (samples are grouped by their tokenized length), so no padding enters
a batch and a batched answer is the answer the sample gets alone. Samples that cannot run are skipped and
counted by reason: ``image_missing`` (tasks.py), ``image_unreadable`` (the file is not an image PIL
reads), ``too_long`` (prompt + ``max_new_tokens`` beyond the model's positions).
"""

from __future__ import annotations

import collections
import json
import os
import time

import torch

from megatron_solo.convert.hf_export_files import load_export_processor
from megatron_solo.errors import UserError
from megatron_solo.eval import tasks as T
from megatron_solo.eval.options import OptionEncoder


class Backend:
    """What :func:`run_task` asks of a model: SOLO's processor (``P``: the ``processing_solo`` module,
    ``processor``), the option encoder (``options``), the model's positions (``max_positions``), and the
    two computations a subclass provides, :meth:`generate` and :meth:`answer_loglikelihood`. Two
    subclasses: :class:`HFExport` (an exported directory) and
    :class:`~megatron_solo.eval.megatron_backend.MegatronCheckpoint` (a checkpoint on megatron-core)."""

    P = processor = options = None
    max_positions: int = 1 << 30

    def encode(self, task: T.Task, sample: T.Sample) -> dict:
        image = self.P.load_image(sample.image)
        if task.prompt_format == "pretrain":
            return self.processor([image])
        return self.encode_user_turn([image, sample.prompt])

    def encode_user_turn(self, parts: list) -> dict:
        """A chat prompt: one user turn of ``parts`` (PIL images and text, in order), the answer's turn opened."""
        return self.processor.chat([{"role": "user", "content": list(parts)}])

    def fits(self, encoded: dict, new_tokens: int) -> bool:
        return encoded["input_ids"].shape[1] + new_tokens <= self.max_positions

    def generate(self, encoded: list[dict], max_new_tokens: int) -> list[str]:
        """Greedy answers of equal-length prompts, generated together with a KV cache."""
        raise NotImplementedError

    def answer_loglikelihood(self, images: list[str], prompt: str, text: str) -> tuple[float, bool]:
        """``text``'s log-likelihood as the assistant's answer to ``images`` (paths or ``data:`` URLs) and
        ``prompt``: the summed log-probabilities of the tokens training counts (options.py, the definition
        the training loop uses too); and whether greedy decoding would give those tokens."""
        raise NotImplementedError

    def generate_grouped(self, encoded: dict, max_new_tokens: int, batch_size: int, progress=None) -> dict:
        """Greedy answers of ``encoded`` (key -> prompt inputs): prompts of one length go together, at most
        ``batch_size`` per :meth:`generate` call. ``progress(done, total)`` after each call."""
        by_length = collections.defaultdict(list)
        for key, e in encoded.items():
            by_length[e["input_ids"].shape[1]].append(key)
        outputs = {}
        for keys in by_length.values():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start:start + batch_size]
                outputs.update(zip(chunk, self.generate([encoded[k] for k in chunk], max_new_tokens)))
                if progress:
                    progress(len(outputs), len(encoded))
        return outputs

    def option_loglikelihoods(self, sample: T.Sample) -> dict[str, float]:
        """Each option's log-likelihood as the assistant's answer (:meth:`answer_loglikelihood`)."""
        return {letter: self.answer_loglikelihood([sample.image], sample.prompt, text)[0]
                for letter, text in sample.options.items()}


class HFExport(Backend):
    """An exported SOLO directory used as a user of the export would: its remote code and processor.
    tools/evaluate.py and lmms-eval's ``megatron_solo`` model (lmms_eval_model.py) both answer through it."""

    def __init__(self, hf_dir: str, dtype: str = "float32", device: str = "cpu"):
        from transformers import AutoModelForCausalLM  # transformers loads only when an export is evaluated

        try:
            self.P = load_export_processor(hf_dir)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        self.processor = self.P.SoloProcessor.from_pretrained(hf_dir)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                          dtype=getattr(torch, dtype)).eval().to(self.device)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        # the export's own tokenizer file, images laid out as its processor does (the model's data; an export
        # made before layouts were recorded has SOLO's, and a processor without the attribute)
        self.options = OptionEncoder(hf_dir, getattr(self.processor, "row_separator", True))

    def _batch(self, encoded: list[dict]) -> dict:
        ids = torch.cat([e["input_ids"] for e in encoded]).to(self.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        patches = [e["vision_patches"] for e in encoded if "vision_patches" in e]  # none in a text-only prompt
        if patches:  # the k-th <vpatch> of the batch takes the k-th patch, across its rows
            batch["vision_patches"] = torch.cat(patches).to(self.device, self.model.dtype)
        coords = [e["vision_patch_coords"] for e in encoded if "vision_patch_coords" in e]  # 2D positions' models
        if coords:
            batch["vision_patch_coords"] = torch.cat(coords).to(self.device)
        return batch

    @torch.no_grad()
    def generate(self, encoded: list[dict], max_new_tokens: int) -> list[str]:
        """Greedy answers of equal-length prompts in one ``generate`` call (its KV cache on)."""
        inputs = self._batch(encoded)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                  pad_token_id=0)  # no padding is used; silences the "no pad token" note
        n = inputs["input_ids"].shape[1]
        return [self.processor.decode(seq) for seq in out[:, n:].tolist()]

    @torch.no_grad()
    def answer_loglikelihood(self, images: list[str], prompt: str, text: str) -> tuple[float, bool]:
        doc = self.options.encode_answer(images, prompt, text)
        s = self.options.sample(doc, len(doc.tokens) - 1)  # inputs and their next-token labels
        ids = s["tokens"][None].to(self.device)
        patches = self.P.normalize_patches(s["patches"].numpy()).to(self.device, self.model.dtype)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), vision_patches=patches).logits
        return answer_loglikelihood_from_logits(logits[0], s)


def answer_loglikelihood_from_logits(logits: torch.Tensor, sample: dict) -> tuple[float, bool]:
    """(summed log-probability of ``sample``'s counted labels, whether each is the argmax) from the
    logits [s, V] of its tokens (padding rows beyond the vocabulary, if any, never the argmax)."""
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    greedy = bool((logp.argmax(-1) == sample["labels"])[sample["loss_mask"].bool()].all())
    return float((logp.gather(-1, sample["labels"][:, None])[:, 0] * sample["loss_mask"]).sum()), greedy


def run_task(backend: Backend, task: T.Task, batch_size: int = 16, progress=None) -> tuple[list[dict], dict]:
    """Per-sample records (in the task's order) and the summary of one task."""
    skipped = {reason: list(ids) for reason, ids in task.skipped.items()}
    encoded = {}
    for i, s in enumerate(task.samples):
        try:
            e = backend.encode(task, s)
        except (OSError, ValueError):  # PIL's UnidentifiedImageError is an OSError; a truncated file too
            skipped.setdefault("image_unreadable", []).append(s.id)
            continue
        extra = max((len(backend.processor.encode_text(o, after_control=True)) for o in s.options.values()),
                    default=0) if task.scored_by_loglikelihood else task.max_new_tokens
        if not backend.fits(e, extra):
            skipped.setdefault("too_long", []).append(s.id)
            continue
        encoded[i] = e
    t0 = time.time()
    if task.scored_by_loglikelihood:
        outputs = {i: backend.option_loglikelihoods(task.samples[i]) for i in encoded}
    else:
        report = (lambda done, total: progress(f"{task.name}: {done}/{total}")) if progress else None
        outputs = backend.generate_grouped(encoded, task.max_new_tokens, batch_size, report)
    records = [{"task": task.name, **T.record(task, task.samples[i], outputs[i])} for i in sorted(outputs)]
    summary = {"metrics": T.summarize(task, records), "scored": len(records),
               "skipped": {reason: len(ids) for reason, ids in sorted(skipped.items())},
               "seconds": round(time.time() - t0, 3)}
    return records, summary


def write_results(output_dir: str, records: list[dict], summaries: dict[str, dict]) -> tuple[str, str]:
    os.makedirs(output_dir, exist_ok=True)
    samples, summary = os.path.join(output_dir, "samples.jsonl"), os.path.join(output_dir, "summary.json")
    with open(samples, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(summary, "w") as f:
        json.dump(summaries, f, indent=1)
    return samples, summary


def table(summaries: dict[str, dict]) -> str:
    """One line per task and metric: task, metric, value, scored, skipped (by reason)."""
    lines = [f"{'task':<16} {'metric':<14} {'value':>8} {'scored':>7}  skipped"]
    for name, s in summaries.items():
        skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "0"
        for metric, value in s["metrics"].items():
            lines.append(f"{name:<16} {metric:<14} {value:>8.4f} {s['scored']:>7}  {skipped}")
    return "\n".join(lines)
