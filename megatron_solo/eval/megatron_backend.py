"""A megatron_solo checkpoint evaluated where it loads (any TP/PP of the torchrun world), on megatron-core's
inference machinery (:mod:`megatron_solo.eval.mcore_generation`: its text generation controller and
static KV cache, with SOLO's image inputs): ``tools/evaluate.py --load``.

Prompts are SOLO's processor's (``convert/hf_files/processing_solo.py``, the file every export ships):
the checkpoint's answers and its export's are made from the same ids and patches. Option
log-likelihoods are one forward pass each through the same wrapper (every position's logits), broadcast
from the last pipeline stage. Every rank computes every answer; rank 0 writes them. Importing this
module loads megatron-core.
"""

from __future__ import annotations

import os

import torch
from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage, is_pipeline_last_stage

from megatron_solo import cpu_backend, parallel
from megatron_solo.checkpoint import CheckpointError, checkpoint_row_separator, load_model_weights
from megatron_solo.convert.hf_export_files import generation_stop_ids
from megatron_solo.convert.hf_files import processing_solo
from megatron_solo.convert.megatron_io import checkpoint_lora_config, read_checkpoint, resolve_export_tokenizer
from megatron_solo.errors import UserError
from megatron_solo.eval.options import OptionEncoder
from megatron_solo.eval.mcore_generation import SoloGenerator
from megatron_solo.eval.runner import Backend, answer_loglikelihood_from_logits
from megatron_solo.model import SoloModelArgs, build_solo_model, build_transformer_config
from megatron_solo.spec import MISTRAL_VOCAB


class MegatronCheckpoint(Backend):
    """A megatron_solo checkpoint loaded at ``tensor_parallel`` x ``pipeline_parallel`` over the current
    (torchrun) world, which must be exactly that many processes: one model replica."""

    def __init__(self, load_dir: str, tensor_parallel: int = 1, pipeline_parallel: int = 1, dtype: str = "float32",
                 tokenizer_model: str | None = None):
        info = read_checkpoint(load_dir)
        self.model_args = model_args = SoloModelArgs(**info["model_args"])
        tok_path, vocab = resolve_export_tokenizer(tokenizer_model or info.get("tokenizer_model"), model_args, info)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != tensor_parallel * pipeline_parallel:
            raise UserError(f"--load evaluates one model replica: start TP x PP = {tensor_parallel * pipeline_parallel}"
                            f" processes (torchrun --nproc-per-node), not {world}")
        padded = int(info["padded_vocab_size"])
        if padded % tensor_parallel:
            raise UserError(f"{load_dir}: its padded vocabulary ({padded}) does not split over "
                            f"--tensor-model-parallel-size {tensor_parallel}")
        if model_args.num_layers % pipeline_parallel:
            raise UserError(f"{load_dir}: its {model_args.num_layers} layers do not split over "
                            f"--pipeline-model-parallel-size {pipeline_parallel}")
        parallel.initialize_model_parallel(tensor_parallel, pipeline_parallel)
        config = build_transformer_config(model_args, tensor_model_parallel_size=tensor_parallel,
                                          pipeline_model_parallel_size=pipeline_parallel,
                                          params_dtype=getattr(torch, dtype), perform_initialization=False)
        # with the LoRA adapters the checkpoint holds (model/lora.py), as training built it
        self.model = build_solo_model(model_args, config, padded_vocab_size=padded, lora=checkpoint_lora_config(info))
        try:
            load_model_weights([self.model], info)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        self.dtype = getattr(torch, dtype)

        row_separator = checkpoint_row_separator(info) is not False  # as megatron_to_hf writes the export
        self.P = processing_solo
        self.processor = processing_solo.SoloProcessor(tok_path, None if vocab == MISTRAL_VOCAB else vocab.to_dict(),
                                                       row_separator, model_args.image_positions != "1d")
        self.options = OptionEncoder(tok_path, row_separator)
        self.max_positions = model_args.max_position_embeddings
        self.generator = SoloGenerator(self.model, model_args, generation_stop_ids(vocab))

    def _request(self, e: dict, max_new_tokens: int = 0):
        patches = e.get("vision_patches")
        return self.generator.request(
            e["input_ids"][0].tolist(), None if patches is None else patches.to(cpu_backend.device(), self.dtype),
            e.get("vision_patch_coords"), max_new_tokens)

    def generate(self, encoded: list[dict], max_new_tokens: int) -> list[str]:
        answers = self.generator.generate([self._request(e, max_new_tokens) for e in encoded])
        return [self.processor.decode(ids) for ids in answers]

    def answer_loglikelihood(self, images: list[str], prompt: str, text: str) -> tuple[float, bool]:
        doc = self.options.encode_answer(images, prompt, text)
        s = self.options.sample(doc, len(doc.tokens) - 1)  # inputs and their next-token labels
        e = {"input_ids": s["tokens"][None], "vision_patches": self.P.normalize_patches(s["patches"].numpy())}
        if self.processor.return_patch_coords:
            e["vision_patch_coords"] = s["patch_coords"]
        logits = self.generator.forward_logits(self._request(e))
        wrapper = self.generator.wrapper
        result = None
        if is_pipeline_last_stage(wrapper.pp_group):
            ll, greedy = answer_loglikelihood_from_logits(logits[0], s)
            result = torch.tensor([ll, float(greedy)], dtype=torch.float64, device=cpu_backend.device())
        if wrapper.model_is_pipeline_parallel:  # the figures reach every stage, as the answers do
            result = broadcast_from_last_pipeline_stage([2], torch.float64, result, wrapper.pp_group)
        return float(result[0]), bool(result[1])

    def close(self) -> None:
        parallel.destroy()
