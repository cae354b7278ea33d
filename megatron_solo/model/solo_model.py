"""``SoloModel``: megatron-core's ``GPTModel`` with SOLO's vision-patch embedding in its input path.

What differs from ``GPTModel`` is only the input side:

* ``forward`` takes ``vision_patches`` and builds the decoder input itself on the first pipeline
  stage: word embedding (vocab-parallel, all-reduced, *not yet* scattered) -> add the projected
  patches at ``<vpatch>`` positions -> scatter to sequence-parallel regions when SP is on. The result
  goes to ``GPTModel.forward`` as ``decoder_input``; everything after it (decoder, final norm,
  untied output layer, vocab-parallel cross-entropy) is megatron-core's.
* RoPE follows ``position_ids`` (restarting at 0 for each packed document, as SOLO and Hugging Face
  Mistral do) when there is no ``PackedSeqParams``; with THD ``PackedSeqParams`` (TE path) megatron-core
  already restarts the rotation at each ``cu_seqlens`` boundary. Under ``image_positions='mrope'`` the
  model is built with megatron-core's ``position_embedding_type="mrope"`` (``MultimodalRotaryEmbedding``)
  and ``position_ids`` are the [3, b, s] positions of ``model/image_blocks.py``.
* The logits of the padded vocabulary rows (ids >= the tokenizer's vocabulary) are masked out
  (``_scale_logits``), so padding changes neither the loss nor generation.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_solo.model.config import SoloModelArgs
from megatron_solo.model.lora import LoraConfig, init_adapters, patch_embedding_class
from megatron_solo.model.loss import mask_padded_vocab
from megatron_solo.model.specs import get_block_spec, get_layer_spec
from megatron_solo.model.vision import VisionPatchEmbedding
from megatron_solo.spec import SOLO_IDS


class SoloModel(GPTModel):
    """A SOLO model: ``GPTModel`` (RoPE) + ``vision_patch_embed`` on the first stage."""

    def __init__(self, config, transformer_layer_spec, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, rotary_base: int = 10000,
                 vp_stage: Optional[int] = None, real_vocab_size: Optional[int] = None,
                 share_embeddings_and_output_weights: bool = False, vision_patch_id: int = SOLO_IDS.vision_patch,
                 vision_experts: str = "none", position_embedding_type: str = "rope",
                 patch_embedding=VisionPatchEmbedding, **kwargs):
        self.real_vocab_size = real_vocab_size  # the tokenizer's vocabulary; rows beyond it are padding
        self.vision_patch_id = vision_patch_id
        # The layers route by modality (model/vision_experts.py): they need the image-token mask.
        self.routes_by_modality = vision_experts != "none"
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,  # "mrope": image positions 'mrope'
            rotary_base=rotary_base,
            # The patches must be added to the *full* sequence; SoloModel scatters afterwards.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
            **kwargs,
        )
        # ``patch_embedding``: the module class of the spec (``lora.patch_embedding_class``: with an adapter)
        self.vision_patch_embed = patch_embedding(config, vision_patch_id=vision_patch_id) if pre_process else None

    def embed_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     vision_patches: Optional[torch.Tensor]) -> torch.Tensor:
        """The decoder input [s(/TP under SP), b, h]: word embedding + patch embedding, then SP scatter."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        embeddings = self.vision_patch_embed(embeddings, input_ids, vision_patches)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings, group=self.tp_group)
        return embeddings

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, packed_seq_params: Optional[PackedSeqParams] = None,
                extra_block_kwargs=None, runtime_gather_output=None, *, vision_patches=None,
                loss_mask=None, **kwargs):
        """Per-token losses [b, s] when ``labels`` are given, else logits [b, s, V/TP]; hidden states on
        stages before the last. ``vision_patches``: the micro-batch's patches (uint8 or normalised float,
        [n, 3072]), needed on the first stage only."""
        if decoder_input is None and self.pre_process:
            decoder_input = self.embed_inputs(input_ids, position_ids, vision_patches)
        if self.routes_by_modality:
            # megatron-core's per-call [b, s] channel to every layer (vision_experts.py says why this one).
            kwargs["padding_mask"] = self.image_token_mask(input_ids)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            inference_context=inference_context, packed_seq_params=packed_seq_params,
            extra_block_kwargs=extra_block_kwargs, runtime_gather_output=runtime_gather_output,
            loss_mask=loss_mask, **kwargs,
        )

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] True at the image tokens: the ``<vpatch>`` positions (docs/MODEL.md, vision experts)."""
        if input_ids is None:
            raise ValueError("a model with vision experts needs input_ids on every pipeline stage (the image-token mask)")
        return input_ids == self.vision_patch_id

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params,
                                  padding_mask=padding_mask)
        if (
            out[1] is not None
            and self.position_embedding_type == "rope"  # mrope: megatron-core's own, from [3, b, s] positions
            and position_ids is not None
            and packed_seq_params is None
            and inference_context is None
            and not self.config.apply_rope_fusion  # fused RoPE kernels take one [s, 1, 1, d] table
            and self.config.context_parallel_size == 1
        ):
            out = (out[0], self.rotary_for_positions(position_ids), *out[2:])
        return out

    def _scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """megatron-core calls this on every logits tensor right after the output layer (training loss,
        MTP, inference): the place to mask the padded vocabulary rows (``model.loss.mask_padded_vocab``)."""
        logits = super()._scale_logits(logits)
        tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        return mask_padded_vocab(logits, self.real_vocab_size, self.vocab_size, tp_rank)

    def rotary_for_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """RoPE angles [s, b, 1, d] for per-token ``position_ids`` [b, s]."""
        table = self.rotary_pos_emb.get_emb(position_ids.size(1))  # [s, 1, 1, d]; positions < s
        return table[:, 0, 0, :][position_ids.t().to(table.device)].unsqueeze(2)


def build_solo_model(
    model_args: SoloModelArgs,
    config,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    padded_vocab_size: Optional[int] = None,
    *,
    use_te: bool = False,
    core_attention: str = "dot_product",
    lora: Optional[LoraConfig] = None,
) -> SoloModel:
    """Build this rank's part of a SOLO model (megatron-core's groups must be initialised).

    ``pre_process`` / ``post_process`` default to "this is the first / last pipeline stage" (for
    ``vp_stage`` under virtual pipelining). ``padded_vocab_size`` defaults to Megatron's rule,
    ``model_args.padded_vocab_size(TP)``. ``lora``: LoRA adapters on its targets (``model/lora.py``),
    started as PEFT starts them when the config initialises parameters.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    tp = config.tensor_model_parallel_size
    if padded_vocab_size is None:
        padded_vocab_size = model_args.padded_vocab_size(tp)
    if padded_vocab_size < model_args.vocab_size or padded_vocab_size % tp:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} must be >= {model_args.vocab_size} "
                         f"and divisible by TP={tp}")
    layer_spec = get_layer_spec(config, use_te=use_te, core_attention=core_attention,
                                vision_experts=model_args.vision_experts, lora=lora)
    model = SoloModel(
        config=config,
        transformer_layer_spec=get_block_spec(config, layer_spec, vp_stage=vp_stage),
        vocab_size=padded_vocab_size,
        max_sequence_length=model_args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        rotary_base=model_args.rotary_base,
        vp_stage=vp_stage,
        real_vocab_size=model_args.vocab_size,
        share_embeddings_and_output_weights=model_args.tie_word_embeddings,
        rope_scaling=model_args.rope_scaling == "llama3",
        rope_scaling_factor=model_args.rope_scaling_factor,
        vision_patch_id=model_args.vision_patch_id,
        vision_experts=model_args.vision_experts,
        position_embedding_type="mrope" if model_args.image_positions == "mrope" else "rope",
        patch_embedding=patch_embedding_class(lora),
    )
    if lora is not None and config.perform_initialization:
        init_adapters(model, lora.seed)
    return model
