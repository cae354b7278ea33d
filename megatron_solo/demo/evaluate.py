"""Held-out digits accuracy of an exported Hugging Face SOLO model, through ``generate``.

Only the exported directory is used: its modeling code (``trust_remote_code``) and its
``processing_solo.py`` (``SoloProcessor``), exactly as a user of the export would. Each test digit is
asked the SFT question in a chat turn; greedy decoding runs until the model stops by itself at
``<|im_end|>`` (the stop token is trained in chat data; the export's ``generation_config`` stops there)
and the answer is the whole generated text (:func:`parse_answer`). An answer that did not stop
within ``max_new_tokens`` is counted, and is wrong unless its text is exactly the label.

With ``prompt_format="pretrain"`` (a stage-1 model: image, then the label as free text, no stop token)
the answer is the word the text starts with.

The held-out digits are an ``exact_match`` evaluation task (:func:`digits_task`, docs/EVALUATION.md):
the samples and their scoring come from megatron_solo/eval/tasks.py.
"""

from __future__ import annotations

import os
import re
import time

from megatron_solo.convert.hf_export_files import load_export_processor
from megatron_solo.demo.digits import QUESTION, WORDS
from megatron_solo.eval.tasks import Task, score_sample, task_from_description

CHANCE = 1.0 / len(WORDS)


def digits_task(test_jsonl: str, image_root: str | None = None, limit: int | None = None,
                prompt_format: str = "chat", max_new_tokens: int = 8) -> Task:
    """The held-out digits as an exact-match task: test.jsonl's rows (image, label, answer), the SFT
    question as the prompt (the same description as docs/EVALUATION.md's digits example)."""
    desc = {"name": "digits", "kind": "exact_match", "data": os.path.basename(test_jsonl), "prompt": QUESTION,
            "max_new_tokens": max_new_tokens, "limit": limit, "prompt_format": prompt_format}
    if image_root:
        desc["image_root"] = os.path.abspath(image_root)
    return task_from_description(desc, test_jsonl)


def first_word(text: str) -> str:
    m = re.search(r"[A-Za-z]+", text)
    return m.group(0).lower() if m else ""


def parse_answer(text: str, prompt_format: str = "chat") -> str:
    """Chat: the whole answer (the model stopped by itself), stripped and lower-cased.
    Pretrain: a stage-1 model never learned to stop, so the next word may run on without a space
    ("one" + "ass" -> "oneass"): a digit word that starts the text, else its first run of letters."""
    t = text.strip().lower()
    if prompt_format == "chat":
        return t
    for w in WORDS:
        if t.startswith(w):
            return w
    return first_word(t)


def _batch_inputs(encoded: list[dict]):
    """Stack single-example processor outputs of equal length into one batch. Patches are concatenated
    in row-major order of their ``<vpatch>`` tokens, which is how the model assigns them."""
    import torch

    lengths = {e["input_ids"].shape[1] for e in encoded}
    if len(lengths) != 1:  # every digit has the same size, hence the same prompt length
        raise ValueError(f"prompts of different lengths {sorted(lengths)}; batch them by length")
    input_ids = torch.cat([e["input_ids"] for e in encoded])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "vision_patches": torch.cat([e["vision_patches"] for e in encoded])}


def evaluate(hf_dir: str, test_jsonl: str, image_root: str | None = None, *, batch_size: int = 64,
             max_new_tokens: int = 8, limit: int | None = None, prompt_format: str = "chat",
             progress=None) -> dict:
    """Accuracy of the exported model on the held-out digits. Returns a dict with ``accuracy``,
    ``correct``, ``total``, ``chance`` and per-example ``predictions`` (image, label, answer, output).

    ``stopped`` counts the answers that ended with a stop token before ``max_new_tokens``.
    ``prompt_format``: ``"chat"`` asks the SFT question in a user turn (an instruction-tuned model);
    ``"pretrain"`` is BOS + image, the stage-1 format, whose next word is the label (a stage-1 model)."""
    import torch
    from transformers import AutoModelForCausalLM

    image_root = image_root or os.path.dirname(os.path.abspath(test_jsonl))
    task = digits_task(test_jsonl, image_root, limit, prompt_format, max_new_tokens)
    P = load_export_processor(hf_dir)
    processor = P.SoloProcessor.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    # the export's own stop ids (its base's: </s> and <|im_end|> 33030 over Mistral, <|endoftext|> and <|im_end|> over Qwen)
    stops = model.generation_config.eos_token_id
    stop_ids = set(stops if isinstance(stops, list) else [stops])
    rows = task.samples
    t0 = time.time()
    predictions = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = [P.load_image(r.image) for r in chunk]
        if prompt_format == "chat":
            encoded = [processor.chat([{"role": "user", "content": [im, r.prompt]}]) for im, r in zip(images, chunk)]
        else:
            encoded = [processor([im]) for im in images]
        inputs = _batch_inputs(encoded)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=0)  # no padding is used; silences the "no pad token" note
        prompt_len = inputs["input_ids"].shape[1]
        for r, seq in zip(chunk, out[:, prompt_len:].tolist()):
            text = processor.decode(seq)
            predicted = parse_answer(text, prompt_format)
            predictions.append({"image": os.path.relpath(r.image, image_root), "label": WORDS.index(r.references[0]),
                                "answer": r.references[0], "output": text, "predicted": predicted,
                                "correct": bool(score_sample(task, r, predicted)),
                                "stopped": bool(stop_ids.intersection(seq))})
        if progress:
            done = start + len(chunk)
            acc = sum(p["correct"] for p in predictions) / len(predictions)
            progress(f"{done}/{len(rows)} digits, running accuracy {acc:.1%}")
    correct = sum(p["correct"] for p in predictions)
    return {"task": task.name, "hf_dir": hf_dir, "test": test_jsonl, "total": len(predictions), "correct": correct,
            "skipped": {reason: len(ids) for reason, ids in task.skipped.items()},
            "accuracy": correct / max(len(predictions), 1), "chance": CHANCE,
            "stopped": sum(p["stopped"] for p in predictions),
            "max_new_tokens": max_new_tokens, "seconds": round(time.time() - t0, 2), "predictions": predictions}
