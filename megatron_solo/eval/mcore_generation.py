"""Greedy generation with a KV cache on megatron-core's inference machinery, for SOLO's model at any TP/PP:
what tools/evaluate.py --load (``megatron_backend.py``) and the training loop's generation tasks
(``in_loop.py``) decode with.

What megatron-core 0.19 offers and what serves here:

* its ``TextGenerationController`` and static-batch step (``generate_all_output_tokens_static_batch``,
  what ``StaticInferenceEngine(legacy=True)`` runs for each batch it schedules), with a
  ``StaticInferenceContext`` holding each layer's KV cache (megatron-core's ``Attention`` writes and
  reads it): prefill of the prompts in one forward pass, then one token per step; logits gathered over
  TP, broadcast from the last pipeline stage (the wrapper's p2p sends between stages); greedy picks by
  its sampler (``top_k=1``: the argmax). Used as is.
* Not used: the dynamic engine (``DynamicInferenceEngine``, which the non-legacy
  ``StaticInferenceEngine`` builds too). Its context is a paged KV cache of CUDA memory with triton/
  flash kernels and CUDA graphs, and its requests are token lists: it runs on no CPU, and it has no place
  for an image's patches. The engine's scheduler is not used either: it batches requests in arrival
  order; here a batch holds prompts of one length (no padding ever enters a batch, so a batched answer is
  the answer the sample gets alone) and :func:`greedy_generate` calls the controller's batch step for it.
* The adapter (the smallest that SOLO's inputs need): :class:`SoloInferenceWrapper`, megatron-core's
  ``GPTInferenceWrapper`` whose forward hands the model the prompt's patches in the prefill window (the
  k-th ``<vpatch>`` takes the k-th patch, as in training) and SOLO's own attention rule for that window
  (``model_forward_kwargs``: bidirectional image blocks when the model has them; none otherwise, the layers'
  causal mask and sliding window), and under 'mrope' image positions each step's positions from the
  sequence so far; :class:`SoloTextGenerationController`, whose only change is stopping at any of the
  export's stop ids (``<|im_end|>``, ``</s>``; megatron-core's stops at one, ``eod``); and
  :class:`SoloInferenceRequest`, a request that carries its patches.

megatron-core's wrapper takes one model chunk (no virtual pipeline) and its static batch refuses sequence
and context parallelism: :func:`unsupported` says so, and the training loop then decodes without a cache. Every rank gets every answer (the logits reach
every stage). Importing this module loads megatron-core and changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.inference.utils import InferenceMode

from megatron_solo.model import SoloModelArgs, model_forward_kwargs
from megatron_solo.spec import PATCH_DIM


def unsupported(config) -> str | None:
    """Why megatron-core's static inference cannot run a model of this ``TransformerConfig``, or None."""
    if config.virtual_pipeline_model_parallel_size is not None:
        return "its inference wrapper takes one model chunk per stage (no virtual pipeline)"
    if config.sequence_parallel:
        return "its static batches refuse sequence parallelism"
    if config.context_parallel_size > 1:
        return "its static batches have no context parallelism"
    if config.fp8 is not None:
        return "its inference wrapper converts an FP8 model for inference"
    return None


@dataclasses.dataclass(kw_only=True)
class SoloInferenceRequest(InferenceRequest):
    """A request with its prompt's image patches (normalised, [n, 3072]) and, for 2D positions, their
    (row, col)."""

    vision_patches: Optional[torch.Tensor] = None
    patch_coords: Optional[torch.Tensor] = None


class SoloInferenceWrapper(GPTInferenceWrapper):
    """megatron-core's GPT wrapper with SOLO's inputs (module docstring)."""

    def __init__(self, model, inference_context, model_args: SoloModelArgs):
        super().__init__(model, inference_context)
        self.model_args = model_args

    def prep_inference_input(self, prompts_tokens, requests=()) -> dict:
        """The batch's inputs; ``prompts_tokens`` [b, prompt + new tokens] is the controller's buffer, where
        it writes each step's tokens (so later windows see them)."""
        patches = [r.vision_patches for r in requests if r.vision_patches is not None]
        coords = [r.patch_coords for r in requests if r.patch_coords is not None]
        prompt_length = min(len(r.prompt_tokens) for r in requests)
        batch = {"tokens": prompts_tokens[:, :prompt_length],
                 "patches": torch.cat(patches) if patches else None,
                 "patch_coords": torch.cat(coords) if coords else None}
        kwargs = model_forward_kwargs(batch, self.config, model_args=self.model_args)
        s = prompts_tokens.size(1)
        return {"tokens": prompts_tokens, "prompt_length": prompt_length, "batch": batch,
                "position_ids": torch.arange(s, device=prompts_tokens.device).expand_as(prompts_tokens),
                "prefill_mask": kwargs["attention_mask"], "vision_patches": kwargs["vision_patches"]}

    def get_batch_for_context_window(self, inference_input: dict, start: int, end: int) -> dict:
        tokens = inference_input["tokens"][:, start:end]
        out = {"tokens": tokens, "position_ids": inference_input["position_ids"][:, start:end],
               "attention_mask": None, "vision_patches": None}
        if start == 0:  # the prefill: every prompt whole (one length per batch), with its patches
            assert end == inference_input["prompt_length"], "a batch's prompts have one length"
            out["attention_mask"] = inference_input["prefill_mask"]
            out["vision_patches"] = inference_input["vision_patches"]
        elif (n := int((tokens == self.model_args.vision_patch_id).sum())) > 0:
            # A generated <vpatch> is a token without an image: its embedding alone, as the export's cached
            # decoding has it (a zero normalised patch adds exactly nothing).
            out["vision_patches"] = tokens.new_zeros((n, PATCH_DIM), dtype=torch.float32)
        if self.model_args.image_positions == "mrope":
            # Each step's positions from the whole sequence so far (decoding continues after the prompt's
            # largest position), given for [0, end): megatron-core's attention takes the window's rows.
            seq = dict(inference_input["batch"], tokens=inference_input["tokens"][:, :end])
            out["position_ids"] = model_forward_kwargs(seq, self.config, model_args=self.model_args)["position_ids"]
        return out

    def _forward(self, inference_input: dict):
        return self.model(inference_input["tokens"], inference_input["position_ids"],
                          inference_input["attention_mask"], inference_context=self.inference_context,
                          runtime_gather_output=True, vision_patches=inference_input["vision_patches"])


class SoloTextGenerationController(TextGenerationController):
    """megatron-core's controller, stopping at any of ``stop_ids`` (its own stops at ``tokenizer.eod``)."""

    def __init__(self, wrapper: SoloInferenceWrapper, tokenizer, stop_ids: list[int]):
        super().__init__(wrapper, tokenizer)
        self.stop_ids = torch.tensor(stop_ids)

    def prep_inference_input(self, prompts_tokens, active_requests, use_attention_mask: bool = False) -> dict:
        return self.inference_wrapped_model.prep_inference_input(prompts_tokens, list(active_requests.values()))

    def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                 is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
        latest = updated_prompts_tokens[:, current_context_end_position]
        stopped = torch.isin(latest, self.stop_ids.to(latest.device)) & generation_started
        is_generation_done_tensor = is_generation_done_tensor | stopped
        generated_sequence_lengths += ~is_generation_done_tensor & generation_started
        return is_generation_done_tensor, generated_sequence_lengths.int()


class _Tokenizer:
    """What the controller asks of a tokenizer: ``eod`` (its padding id; the stops are the controller's) and
    ``detokenize`` (its text of each answer: none here, the callers decode the generated ids themselves)."""

    bos = None

    def __init__(self, eod: int):
        self.eod = eod

    def detokenize(self, ids, **_):
        return ""


class SoloGenerator:
    """Greedy answers of SOLO's model (one chunk, any TP/PP) through the wrapper and controller above; the
    KV cache is made for each batch (sized to it) and dropped after it."""

    def __init__(self, model, model_args: SoloModelArgs, stop_ids: list[int]):
        self.wrapper = SoloInferenceWrapper(model, StaticInferenceContext(1, 1), model_args)
        self.controller = SoloTextGenerationController(self.wrapper, _Tokenizer(stop_ids[0]), stop_ids)
        self._next_id = 0

    def request(self, tokens: list[int], patches, coords=None, max_new_tokens: int = 0) -> SoloInferenceRequest:
        self._next_id += 1
        return SoloInferenceRequest(
            request_id=self._next_id, prompt="", prompt_tokens=list(tokens),
            sampling_params=SamplingParams(top_k=1, num_tokens_to_generate=max_new_tokens),
            vision_patches=patches, patch_coords=coords)

    def generate(self, requests: list[SoloInferenceRequest]) -> list[list[int]]:
        """The generated ids (the stop id excluded) of requests whose prompts have one length."""
        n = len(requests[0].prompt_tokens)
        assert all(len(r.prompt_tokens) == n for r in requests), "a batch's prompts have one length"
        new = requests[0].sampling_params.num_tokens_to_generate
        self.wrapper.inference_context = StaticInferenceContext(len(requests), n + new)
        try:
            with InferenceMode.active():  # megatron-core's inference paths (the last position's logits only)
                done = self.controller.generate_all_output_tokens_static_batch(
                    OrderedDict((r.request_id, r) for r in requests))
        finally:
            self.wrapper.inference_context = StaticInferenceContext(1, 1)  # the cache's memory goes
        return [r.generated_tokens.tolist() for r in done.values()]

    @torch.inference_mode()
    def forward_logits(self, request: SoloInferenceRequest):
        """Every position's logits [1, s, V] of the request's prompt (last pipeline stage; None elsewhere)."""
        tokens = torch.tensor([request.prompt_tokens], device=torch.cuda.current_device())
        n = tokens.size(1)
        self.wrapper.inference_context = ctx = StaticInferenceContext(1, n)
        try:
            self.wrapper.prep_model_for_inference()
            ctx.config.materialize_only_last_token_logits = False
            inputs = self.wrapper.prep_inference_input(tokens, [request])
            with InferenceMode.active():
                return self.wrapper.run_one_forward_step(self.wrapper.get_batch_for_context_window(inputs, 0, n))
        finally:
            self.wrapper.inference_context = StaticInferenceContext(1, 1)
