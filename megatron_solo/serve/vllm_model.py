"""vLLM models for SOLO exports: vLLM's own decoder of the export's base family plus SOLO's patch embedding, and
a multimodal processor with SOLO's image layout. Registered by :mod:`megatron_solo.serve.vllm_plugin`.

The model (one class per family: ``Solo<Family>ForCausalLM`` over vLLM's ``<Family>ForCausalLM``) keeps the
export's tensor names: ``model.embed_vision_patch`` (3072 -> hidden, no bias) sits beside the decoder's
``model.embed_tokens``, so the family's own weight loader reads the whole export and a PEFT adapter's names
need no mapping. SOLO *adds* the patch embedding to the ``<vpatch>`` token's embedding: an image's
embeddings are ``embed_tokens(<vpatch>) + embed_vision_patch(patches)``, which vLLM places at the
``<vpatch>`` positions of the prompt (the other image tokens, ``<vision>``, ``<vrow_sep>``, ``</vision>``,
are plain tokens).

The processor (convert/hf_files/processing_solo.py's rules, the same functions): an image is resized by
SOLO's rule (long side up to 1024, both sides multiples of 32), cut into 32x32 patches row-major and
normalised with ImageNet's statistics; the prompt's ``<vision>`` token that marks the image becomes
``<vision>``, the rows of ``<vpatch>`` (a ``<vrow_sep>`` between rows unless the export's config.json says
``vision_row_separator: false``) and ``</vision>``. A prompt marks each image with one ``<vision>``: the
text ``<vision>`` through vLLM's tokenizer, or :func:`megatron_solo.serve.prompts.vllm_prompt`'s ids.

The image choices an export's config.json records (docs/MODEL.md) are checked at load by
:func:`refused_choice`: the row-separator layout is served; vision experts, bidirectional image attention
and multimodal RoPE are refused with one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import _merge_multimodal_embeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from megatron_solo.convert.hf_files import processing_solo as solo

# The largest image SOLO's resize rule makes: MAX_LONG_SIDE square (vLLM sizes its buffers with it).
MAX_SIDE = solo.MAX_LONG_SIDE


def refused_choice(config) -> str | None:
    """None when this package serves the export's recorded choices, else the one line saying why not.

    ``vision_row_separator`` (SOLO's or SAIL's layout) is only the processor's layout: served. The three
    below change the decoder itself, which here is vLLM's own unmodified one."""
    experts = getattr(config, "vision_experts", "none")
    if experts != "none":
        return (f"vision_experts={experts!r}: vLLM's decoder has one set of weights per layer, not image tokens' own "
                "modules; serve this export with transformers (its modeling_solo.py)")
    attention = getattr(config, "image_attention", "causal")
    if attention != "causal":
        return (f"image_attention={attention!r}: vLLM's attention here is causal over the whole sequence; serve "
                "this export with transformers (its modeling_solo.py)")
    positions = getattr(config, "image_positions", "1d")
    if positions != "1d":
        return (f"image_positions={positions!r}: this vLLM model gives every token one 1D RoPE position; serve this "
                "export with transformers (its modeling_solo.py)")
    return None


def image_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, columns) of 32x32 patches of an image after SOLO's resize rule."""
    new_w, new_h = solo.target_size(width, height)
    return new_h // solo.PATCH_SIZE, new_w // solo.PATCH_SIZE


def image_token_ids(config, rows: int, cols: int) -> list[int]:
    """An image's block of tokens, as SoloProcessor.image_token_ids lays it out for this export."""
    ids = [config.vision_start_token_id]
    for r in range(rows):
        if r and getattr(config, "vision_row_separator", True):
            ids.append(config.vision_row_sep_token_id)
        ids.extend([config.vision_patch_token_id] * cols)
    ids.append(config.vision_end_token_id)
    return ids


class SoloProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set()}  # SOLO's image rule has no options

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        rows, cols = image_grid(MAX_SIDE, MAX_SIDE)
        return {"image": len(image_token_ids(self.get_hf_config(), rows, cols))}


class SoloDummyInputsBuilder(BaseDummyInputsBuilder[SoloProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return solo.VISION_START * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        return {"image": self._get_dummy_images(width=MAX_SIDE, height=MAX_SIDE, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class SoloMultiModalProcessor(BaseMultiModalProcessor[SoloProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """SOLO's image rule (processing_solo.py's functions): normalised patches of every image, in order."""
        images = hf_data.get("images") or []
        patches, grids = [], []
        for image in images:
            p, rows, cols = solo.image_to_patches(image)
            patches.append(solo.normalize_patches(p))
            grids.append((rows, cols))
        return BatchFeature({"vision_patches": torch.cat(patches) if patches else torch.zeros(0, 3 * 32 * 32),
                             "image_grid": torch.tensor(grids, dtype=torch.long).reshape(-1, 2)})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        sizes = hf_inputs.get("image_grid", torch.zeros(0, 2, dtype=torch.long)).prod(-1)
        return dict(vision_patches=MultiModalFieldConfig.flat_from_sizes("image", sizes),
                    image_grid=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()

        def block(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            rows, cols = image_grid(size.width, size.height)
            return PromptUpdateDetails.select_token_id(image_token_ids(config, rows, cols),
                                                       embed_token_id=config.vision_patch_token_id)

        return [PromptReplacement(modality="image", target=[config.vision_start_token_id], replacement=block)]


class _SoloMixin(SupportsMultiModal):
    """SOLO's additions to a family's vLLM causal LM (the decoder, its weights and LoRA stay the family's)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return solo.VISION_START
        raise ValueError("a SOLO model takes images only")

    def _add_patch_embedding(self, vllm_config: VllmConfig) -> None:
        config = vllm_config.model_config.hf_config
        refused = refused_choice(config)
        if refused is not None:
            raise ValueError(f"this SOLO export cannot be served by vLLM: {refused}")
        self.model.embed_vision_patch = nn.Linear(config.vision_patch_dim, config.hidden_size, bias=False)

    def get_language_model(self):
        return self  # one decoder over text and image tokens

    def embed_multimodal(self, **kwargs: object):
        patches, grid = kwargs.get("vision_patches"), kwargs.get("image_grid")
        if patches is None:
            return []
        if isinstance(patches, (list, tuple)):
            per_image = list(patches)
        else:
            per_image = list(torch.split(patches, [int(r * c) for r, c in torch.as_tensor(grid).reshape(-1, 2)]))
        weight = self.model.embed_vision_patch.weight
        vpatch = self.model.embed_input_ids(
            torch.tensor([self.config.vision_patch_token_id], device=weight.device))  # [1, hidden]
        return [vpatch + self.model.embed_vision_patch(p.reshape(-1, weight.shape[1]).to(weight.dtype))
                for p in per_image]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None):
        embeds = self.model.embed_input_ids(input_ids)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return embeds
        return _merge_multimodal_embeddings(inputs_embeds=embeds, multimodal_embeddings=multimodal_embeddings,
                                            is_multimodal=is_multimodal)


def _solo_class(name: str, family_cls):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kw):
        family_cls.__init__(self, vllm_config=vllm_config, prefix=prefix, **kw)
        self._add_patch_embedding(vllm_config)

    cls = type(name, (_SoloMixin, family_cls), {"__init__": __init__, "__module__": __name__,
                                                "__doc__": f"A SOLO export over vLLM's {family_cls.__name__}."})
    return MULTIMODAL_REGISTRY.register_processor(SoloMultiModalProcessor, info=SoloProcessingInfo,
                                                  dummy_inputs=SoloDummyInputsBuilder)(cls)


SoloMistralForCausalLM = _solo_class("SoloMistralForCausalLM", MistralForCausalLM)
SoloLlamaForCausalLM = _solo_class("SoloLlamaForCausalLM", LlamaForCausalLM)
SoloQwen2ForCausalLM = _solo_class("SoloQwen2ForCausalLM", Qwen2ForCausalLM)
SoloQwen3ForCausalLM = _solo_class("SoloQwen3ForCausalLM", Qwen3ForCausalLM)
