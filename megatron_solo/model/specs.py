"""Layer specs: Transformer Engine's when it can run, megatron-core's local modules otherwise.

As in megatron-core's ``models/gpt``, choosing TE or local layers is a different *spec*, never an
``if`` in ``forward()``. The local spec is megatron-core's ``get_gpt_layer_local_submodules`` with two
substitutions:

* the norms (and Qwen3's per-head q/k norms when ``config.qk_layernorm``) are :class:`SoloRMSNorm` (``torch.nn.RMSNorm`` that supports sequence parallelism by
  marking its weight ``sequence_parallel``, so ``finalize_model_grads`` all-reduces its gradient over
  TP, as it does for TE's and Apex's norms; megatron-core's ``WrappedTorchNorm`` refuses SP);
* the core attention is :class:`SoloDotProductAttention` (megatron-core's ``DotProductAttention``
  that takes an explicit attention mask as the whole rule, the window folded in by
  ``model_forward_kwargs``, and builds the window mask only when none is given; the parent class
  replaces a given mask by the window mask, which would let packed documents see each other), or, on request,
  :class:`megatron_solo.model.attention.SDPAFlexAttention`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_solo.model.attention import MaskCache, SDPAFlexAttention
from megatron_solo.model.config import check_fp8, te_available
from megatron_solo.model.lora import LoraConfig, lora_layer_submodules
from megatron_solo.model.vision_experts import vision_expert_layer_spec


class SoloRMSNorm(torch.nn.RMSNorm):
    """RMSNorm for the local spec; sequence-parallel aware (see module docstring)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        # Under SP each TP rank normalises a different slice of the sequence: its weight gradient is
        # partial and must be summed over TP (megatron-core does that for params marked like this).
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def sliding_window_causal_mask(sq: int, sk: int, window_size: tuple[int, int], device) -> torch.Tensor:
    """megatron-core's ``get_sliding_window_causal_mask`` (True = masked), made on ``device``.

    (megatron's own hard-codes ``device="cuda"``, which breaks on CPU when activation recompute
    re-runs the attention inside the backward pass.)
    """
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    return ~((j >= i - window_size[0]) & (j <= i + window_size[1]))


class SoloDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that keeps a given mask (True = masked) as the whole rule; the sliding window
    mask only when no mask is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Take the window out of the softmax (which would *replace* the mask) and apply it here.
        self.sliding_window_size = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # A given mask is the whole rule (``model_forward_kwargs`` folds the window into it; under
        # bidirectional image attention it admits later keys, which the causal window would take away).
        if self.sliding_window_size is not None and attention_mask is None:
            attention_mask = sliding_window_causal_mask(query.size(0), key.size(0), self.sliding_window_size,
                                                        query.device)
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params)


def resolve_use_te(config, use_te: bool) -> bool:
    """Check the caller's ``use_te`` decision (TE importable; FP8 only with TE) and return it."""
    if use_te and not te_available():
        raise ValueError("use_te=True, but Transformer Engine is not importable")
    check_fp8(getattr(config, "fp8", None), getattr(config, "fp8_recipe", None), use_te)
    return use_te


CORE_ATTENTION_CHOICES = ("dot_product", "sdpa_flex")


def get_layer_spec(config, use_te: bool = False, core_attention: str = "dot_product", vision_experts: str = "none",
                   lora: Optional[LoraConfig] = None):
    """The ``ModuleSpec`` of one SOLO transformer layer.

    ``vision_experts`` ('none', 'ffn', 'full'): the dense layer, or ``vision_experts.py``'s layers routed
    by modality, built from the same local submodules (they need the local spec).

    ``use_te``: the caller's decision (a run's, made once from ``--transformer-impl``); default local. ``core_attention`` selects
    the local path's attention ('dot_product': megatron's math, explicit masks; 'sdpa_flex': torch SDPA
    and FlexAttention, see ``attention.py``); the TE spec always uses ``TEDotProductAttention``.
    ``lora``: the local linears it targets become their LoRA classes (``lora.py``; the vision experts'
    twins are built from the same submodules and get adapters too).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_submodules,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    if resolve_use_te(config, use_te):
        if vision_experts != "none":
            raise ValueError(f"vision_experts={vision_experts!r} is built on the local layer spec; "
                             "Transformer Engine's fused norm+linear cannot route tokens by modality")
        if lora is not None:
            raise ValueError("LoRA adapters are built on the local layer spec; Transformer Engine's fused "
                             "norm+linear hands the adapter no normalised input")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if core_attention not in CORE_ATTENTION_CHOICES:
        raise ValueError(f"core_attention must be one of {CORE_ATTENTION_CHOICES}, got {core_attention!r}")
    sub = get_gpt_layer_local_submodules(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    sub.input_layernorm = SoloRMSNorm
    sub.pre_mlp_layernorm = SoloRMSNorm
    if qk_layernorm:
        # Over head_dim, per head (megatron-core builds it with hidden_size=head_dim); its gradient is
        # summed over TP by finalize_model_grads (it matches "q_layernorm"/"k_layernorm" by name).
        sub.self_attention.submodules.q_layernorm = SoloRMSNorm
        sub.self_attention.submodules.k_layernorm = SoloRMSNorm
    if core_attention == "dot_product":
        sub.self_attention.submodules.core_attention = SoloDotProductAttention
    else:  # one mask cache for the layers built from this spec: a step builds its mask once
        sub.self_attention.submodules.core_attention = functools.partial(SDPAFlexAttention, mask_cache=MaskCache())
    if lora is not None:
        lora_layer_submodules(sub, lora)
    if vision_experts != "none":
        return vision_expert_layer_spec(sub, vision_experts)
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def get_block_spec(config, layer_spec, vp_stage: Optional[int] = None):
    """Transformer-block submodules for this pipeline stage: ``layer_spec`` per layer + final norm.

    TE layer specs are returned unchanged (megatron-core adds ``TENorm``); local ones get
    :class:`SoloRMSNorm` as the final norm, so that SP works there too.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    sub = layer_spec.submodules
    if getattr(sub, "input_layernorm", None) is not SoloRMSNorm:
        return layer_spec
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=SoloRMSNorm)
