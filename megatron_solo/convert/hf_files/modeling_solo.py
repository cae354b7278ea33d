"""SOLO: one decoder-only transformer over raw 32x32 image patches and text (arXiv 2407.06438).

The backbone is exactly Mistral's (``transformers``' ``MistralModel``); SOLO adds one linear map from a
flattened, normalised RGB patch (3072 values) to the hidden size. Its output is *added* to the token
embedding at each ``<vpatch>`` position: the k-th ``<vpatch>`` of the batch (row-major over
``input_ids``) takes the k-th row of ``vision_patches``. Tensor names match the public SOLO-7B
release (``model.embed_vision_patch.weight`` on top of Mistral's names).

Inputs (besides Mistral's):
    vision_patches (`torch.FloatTensor` of shape `(n_patches, 3 * patch**2)`): normalised patches
        (ImageNet mean/std), as ``processing_solo.SoloProcessor`` makes them.
    vision_patch_indices (`torch.LongTensor`, same shape as `input_ids`, optional): row of
        ``vision_patches`` for each position, -1 for text. When omitted it is derived from the
        ``<vpatch>`` tokens in `input_ids`.

Generation uses the key-value cache; image inputs are consumed by the prefill step only.
Written for transformers 5.x (the ``cache`` keyword; ``past_key_values`` is accepted as its alias).
"""

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mistral.modeling_mistral import MistralModel, MistralPreTrainedModel

from .configuration_solo import SoloConfig


class SoloPreTrainedModel(MistralPreTrainedModel):
    config_class = SoloConfig
    config: SoloConfig


def vision_patch_indices_from_ids(input_ids: torch.LongTensor, vision_patch_token_id: int) -> torch.LongTensor:
    """-1 for text, k for the k-th ``<vpatch>`` of the batch in row-major order."""
    is_patch = input_ids == vision_patch_token_id
    order = torch.cumsum(is_patch.reshape(-1).long(), 0).reshape(input_ids.shape) - 1
    return torch.where(is_patch, order, torch.full_like(order, -1))


class SoloMistralModel(SoloPreTrainedModel, MistralModel):
    """Mistral's decoder plus ``embed_vision_patch`` (3072 -> hidden, no bias)."""

    def __init__(self, config: SoloConfig):
        super().__init__(config)
        self.embed_vision_patch = nn.Linear(config.vision_patch_dim, config.hidden_size, bias=False)
        self.post_init()

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        vision_patches: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)
        if vision_patches is None:
            return inputs_embeds
        if vision_patch_indices is None:
            vision_patch_indices = vision_patch_indices_from_ids(input_ids, self.config.vision_patch_token_id)
        if vision_patch_indices.shape != input_ids.shape:
            raise ValueError(f"vision_patch_indices {tuple(vision_patch_indices.shape)} must have the shape of "
                             f"input_ids {tuple(input_ids.shape)}")
        if vision_patches.ndim != 2 or vision_patches.shape[-1] != self.config.vision_patch_dim:
            raise ValueError(f"vision_patches must be (n_patches, {self.config.vision_patch_dim}), "
                             f"got {tuple(vision_patches.shape)}")
        at = vision_patch_indices >= 0
        idx = vision_patch_indices[at]
        if idx.numel() and int(idx.max()) >= vision_patches.shape[0]:
            raise ValueError(f"vision_patch_indices refer to patch {int(idx.max())} but only "
                             f"{vision_patches.shape[0]} patches were given")
        patch_embeds = self.embed_vision_patch(vision_patches.to(self.embed_vision_patch.weight.dtype))
        added = torch.zeros_like(inputs_embeds)
        added[at] = patch_embeds[idx].to(inputs_embeds.dtype)
        return inputs_embeds + added

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        vision_patches: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if vision_patches is not None:
            if inputs_embeds is not None:
                raise ValueError("pass vision_patches with input_ids, not with inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, vision_patches, vision_patch_indices)
            input_ids = None
        return MistralModel.forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class SoloForCausalLM(SoloPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SoloConfig):
        super().__init__(config)
        self.model = SoloMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        vision_patches: torch.Tensor | None = None,
        vision_patch_indices: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        outputs = self.model(
            input_ids=input_ids,
            vision_patches=vision_patches,
            vision_patch_indices=vision_patch_indices,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, input_ids, *args, vision_patches=None, vision_patch_indices=None,
                                      is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # Patches enter through the prompt's embeddings: the prefill step (or every step when no cache
        # is kept and the whole sequence is recomputed) takes them; cached decode steps do not.
        recompute_all = not kwargs.get("use_cache", True)
        if vision_patches is not None and (is_first_iteration or recompute_all):
            ids = model_inputs["input_ids"]
            if vision_patch_indices is not None and vision_patch_indices.shape != ids.shape:
                vision_patch_indices = None  # derived again from the <vpatch> tokens of `ids`
            model_inputs["vision_patches"] = vision_patches
            model_inputs["vision_patch_indices"] = vision_patch_indices
        return model_inputs


__all__ = ["SoloForCausalLM", "SoloMistralModel", "SoloPreTrainedModel"]
