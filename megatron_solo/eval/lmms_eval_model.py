"""lmms-eval's model ``megatron_solo``: a SOLO export (of any base family) evaluated by lmms-eval's own tasks,
answering through the runner tools/evaluate.py uses (runner.HFExport: the export's remote code and
processor, greedy batched ``generate`` with the KV cache, the option log-likelihood of options.py).

It is registered through lmms-eval's plugin entry point (setup.py: group ``lmms_eval.models``, name
``megatron_solo`` -> :func:`manifest`); lmms-eval itself is not modified::

    lmms-eval --model megatron_solo --model_args pretrained=EXPORT_DIR --tasks TASK --output_path OUT

Only lmms-eval loads this module (it imports lmms-eval, which is not a dependency of this package).

How lmms-eval's requests are answered:
- the prompt is one chat user turn: the request's images first, then its text, as tools/evaluate.py and
  the training data lay it out (SOLO has no image placeholder token: a ``<image>`` in the text is dropped);
- ``generate_until``: greedy, at most ``max_new_tokens`` (the task's, else the model argument), cut at the
  task's ``until`` strings. A prompt too long for the export's positions answers "" and is counted in
  one warning;
- ``loglikelihood``: the continuation as the assistant's answer (lmms-eval's ``target_delimiter``, a
  leading space, is not part of it: the answer opens its own turn), scored over the tokens training
  counts (the answer and its end of turn). It returns the summed NEGATIVE log-likelihood and whether
  greedy decoding gives the answer: lmms-eval 0.7.3's ``multiple_choice`` picks the argmin of what a
  model returns (its own models return their loss), so the option picked is the one tools/evaluate.py's
  ``mc_loglikelihood`` picks.
"""

from __future__ import annotations

import base64
import io

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger  # lmms-eval's logger: our lines appear among its own

from megatron_solo import quiet

MODEL_ID = "megatron_solo"
IMAGE_PLACEHOLDER = "<image>"
GREEDY = {"do_sample": (None, False), "temperature": (None, 0, 0.0), "num_beams": (None, 1)}


def manifest():
    """The entry point's payload: lmms-eval's model manifest (read when lmms-eval builds its registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # the registry module, loaded by then

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SoloExportModel")


def _data_url(image) -> str:
    """A PIL image as a lossless PNG ``data:`` URL: how preprocessing's encoder takes an image in memory."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cut(text: str, until) -> str:
    for stop in until or ():
        if stop:
            text = text.split(stop, 1)[0]
    return text


class SoloExportModel(lmms):
    """``--model megatron_solo --model_args pretrained=DIR[,dtype=bfloat16][,max_new_tokens=N]``."""

    is_simple = True

    def __init__(self, pretrained: str, dtype: str = "float32", device: str | None = None,
                 batch_size: int | str = 16, max_new_tokens: int | str = 128, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_ID}: unknown model argument(s) {sorted(unknown)}; it takes pretrained, "
                             f"dtype, device, batch_size, max_new_tokens")
        if int(torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1) > 1:
            raise ValueError(f"{MODEL_ID}: run lmms-eval in one process (no data-parallel launch)")
        quiet.filter_known_warnings()  # megatron-core's import notes (TE/apex absent) ask nothing of the user
        # Imported after the filter: the runner loads megatron-core (preprocessing's sample builder).
        from megatron_solo.eval.runner import HFExport

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = HFExport(pretrained, dtype, device)
        self.batch_size = 16 if str(batch_size) == "auto" else int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._warned = set()

    def _warn_once(self, key, line: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            eval_logger.warning(f"{MODEL_ID}: {line}")

    def _request(self, args):
        """(context, second argument, images, task name) of a request's arguments."""
        context, second, doc_to_visual, doc_id, task, split = args[:6]
        doc = self.task_dict[task][split][doc_id]
        images = [im for im in (doc_to_visual(doc) or []) if im is not None]
        if not all(hasattr(im, "save") for im in images):
            raise ValueError(f"{MODEL_ID}: task {task} gives visuals that are not images (video, audio?): "
                             f"this model reads images")
        if IMAGE_PLACEHOLDER in context:  # the image block is the image: its placeholder and its line go
            context = context.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
        return context, (second(doc) if callable(second) else second), images, task

    def generate_until(self, requests) -> list[str]:
        groups, prompts = {}, {}  # (task, max_new_tokens, until) -> request indices; index -> prompt inputs
        for i, r in enumerate(requests):
            context, gen, images, task = self._request(r.args)
            gen = dict(gen or {})
            for key, allowed in GREEDY.items():
                if gen.get(key) not in allowed:
                    self._warn_once((task, key), f"task {task} asks {key}={gen[key]!r}; this model decodes greedily")
            until = gen.get("until")
            until = tuple([until] if isinstance(until, str) else until or ())
            groups.setdefault((task, int(gen.get("max_new_tokens", self.max_new_tokens)), until), []).append(i)
            prompts[i] = self.backend.encode_user_turn([*images, context])
        answers, too_long = [""] * len(requests), 0
        for (task, max_new, until), idx in groups.items():
            fit = {i: prompts[i] for i in idx if self.backend.fits(prompts[i], max_new)}
            too_long += len(idx) - len(fit)
            for i, text in self.backend.generate_grouped(fit, max_new, self.batch_size).items():
                answers[i] = _cut(text, until)
        if too_long:
            eval_logger.warning(f"{MODEL_ID}: {too_long} prompt(s) too long for the export's "
                                f"{self.backend.max_positions} positions answered ''")
        return answers

    def loglikelihood(self, requests) -> list:
        out = []
        for r in requests:
            context, continuation, images, _ = self._request(r.args)
            ll, greedy = self.backend.answer_loglikelihood([_data_url(im) for im in images], context,
                                                           continuation.lstrip())
            # lmms-eval 0.7.3's evaluator turns every output into text (unwrap_generation_output: str() of a
            # (float, bool) tuple, which its multiple_choice scoring then cannot unpack) except a
            # GenerationResult's .text, which it passes through as is: the pair travels in it.
            out.append(GenerationResult(text=(-ll, greedy)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} answers single-turn tasks (generate_until, loglikelihood)")
