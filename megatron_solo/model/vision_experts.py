"""Vision experts: image tokens through their own weights inside the one transformer (EVEv2, Mono-InternVL).

``--vision-experts`` (``SoloModelArgs.vision_experts``) chooses the layer spec:

* ``none``: SOLO's dense layer (``specs.get_layer_spec``'s local spec, unchanged);
* ``ffn``: :class:`VisionExpertFFNLayer`: image tokens go through ``vision_pre_mlp_layernorm`` and
  ``vision_mlp``, text tokens through ``pre_mlp_layernorm`` and ``mlp``; attention is the dense one;
* ``full``: :class:`VisionExpertFullLayer`: also ``vision_input_layernorm`` and, inside
  :class:`VisionExpertSelfAttention`, ``vision_linear_qkv`` and ``vision_linear_proj``; the softmax over
  keys stays joint over all tokens (megatron-core's core attention, unchanged).

Routing is static, by token type. The image tokens are the ``<vpatch>`` positions (``input_ids ==
vision_patch_id``: the tokens that carry a projected patch); the markers ``<vision>``, ``<vrow_sep>``,
``<vision_end>`` are vocabulary tokens and go the text way. ``SoloModel`` derives that mask from the
input ids on every pipeline stage and hands it to megatron-core's ``GPTModel.forward`` as
``padding_mask``: the one per-call [b, s] tensor that megatron-core's ``TransformerBlock`` passes to
every layer, also through full activation recompute (``recompute.checkpointed_forward``) and the
MLP's recompute; these layers read it as "is an image token" (no MoE layer, its other reader, is in
these specs). Nothing per micro-batch is kept on a module.

Each token is computed once (:func:`route`): the rows of each modality are gathered, go through their
group's module, and are scattered back. Under sequence parallelism a TP rank holds a slice of the
sequence, and the two groups of a slice differ in size from rank to rank, which megatron-core's SP
linears (an all-gather of equal slices) cannot take. So the norms run on the rank's slice (per token,
weights marked ``sequence_parallel`` as in the dense layer), the slice is all-gathered, the routed
linears run on the whole sequence as plain tensor-parallel linears (built with
``sequence_parallel=False``: input copied, output all-reduced), and the result is split back to the
slice. The expert weights are split over TP exactly as their text twins (same classes, same shapes).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.typed_torch import apply_module


# ------------------------------------------------------------------------------------------ routing
class Routing:
    """How the tokens of one [s, b] image mask split: rows in text-then-image order (``order``), the
    inverse permutation that puts them back (``back``), and the number of text rows. Made once per layer
    call and used by every routed module of the call."""

    def __init__(self, is_image: torch.Tensor):
        image = is_image.reshape(-1)
        self.shape = tuple(is_image.shape)
        self.order = torch.argsort(image.to(torch.uint8), stable=True)  # text rows first, each group in order
        self.back = torch.empty_like(self.order)
        self.back[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        self.n_text = int(self.order.numel() - image.sum())


class _Permute(torch.autograd.Function):
    """Rows reordered by a permutation; the gradient goes back by its inverse. (``index_select``'s own
    backward scatter-adds into zeros, which on a CPU took longer than the layer's matmuls.)"""

    @staticmethod
    def forward(ctx, x, order, back):
        ctx.save_for_backward(back)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return grad.index_select(0, back), None, None


def route(x: torch.Tensor, routing: Routing, text_module, vision_module) -> torch.Tensor:
    """``x`` [s, b, h] -> [s, b, h']: the text rows through ``text_module``, the image rows through
    ``vision_module``, each row once (one permutation in, one concatenation and permutation out).

    The modules see their rows as [n, 1, h] (megatron-core's [s, b, h] layout); a linear's
    ``(output, bias)`` is reduced to its output (the routed layers have no separate bias).
    """
    if tuple(x.shape[:2]) != routing.shape:
        raise ValueError(f"hidden states {tuple(x.shape)} do not match the image mask {routing.shape}")
    rows = _Permute.apply(x.reshape(-1, 1, x.size(-1)), routing.order, routing.back)
    outs = []
    for part, module in zip((rows[: routing.n_text], rows[routing.n_text:]), (text_module, vision_module)):
        y = apply_module(module)(part)
        if isinstance(y, tuple):
            y, bias = y
            assert bias is None, "routed linears must not return a separate bias"
        outs.append(y)
    return _Permute.apply(torch.cat(outs), routing.back, routing.order).view(*routing.shape, -1)


def without_sequence_parallel(config):
    """A copy of ``config`` for the routed linears: plain TP (they run on the whole sequence)."""
    if not config.sequence_parallel:
        return config
    config = copy.copy(config)
    config.sequence_parallel = False
    return config


class SequenceLayout:
    """Where a layer's tokens are: the whole sequence, or (SP) this TP rank's slice of it."""

    def __init__(self, config, tp_group):
        self.sequence_parallel = bool(config.sequence_parallel)
        self.tp_group = tp_group

    def routings(self, image_mask_bs: torch.Tensor) -> tuple[Routing, Routing]:
        """The [b, s] image mask's :class:`Routing` of this rank's slice and of the whole sequence (one and
        the same without SP)."""
        rows = image_mask_bs.t()
        whole = Routing(rows)
        if not self.sequence_parallel:
            return whole, whole
        n = rows.size(0) // self.tp_group.size()
        r = self.tp_group.rank()
        return Routing(rows[r * n:(r + 1) * n]), whole

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Slice -> whole sequence. Backward: split (the routed linears' input grads are already
        reduced over TP, so a reduce-scatter would count them TP times)."""
        if not self.sequence_parallel:
            return x
        return tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=False, group=self.tp_group)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequence (identical on every TP rank) -> this rank's slice. Backward: all-gather."""
        if not self.sequence_parallel:
            return x
        return tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.tp_group)


def _refuse_unsupported(config) -> None:
    if config.context_parallel_size > 1:
        raise ValueError("vision experts do not support context parallelism (the image mask is not split over CP)")
    modules = set(config.recompute_modules or []) if config.recompute_granularity == "selective" else set()
    if modules - {"core_attn", "mlp"}:
        raise ValueError(f"vision experts support selective recompute of core_attn and mlp only, got {sorted(modules)}")
    if getattr(config, "fine_grained_activation_offloading", False):
        raise ValueError("vision experts do not support fine-grained activation offloading")


# ------------------------------------------------------------------------------------------ modules
class TokenGroupMLP(MLP):
    """megatron-core's ``MLP`` run on a group of tokens of the whole sequence: plain TP, no SP."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(without_sequence_parallel(config), *args, **kwargs)


class VisionExpertSelfAttention(SelfAttention):
    """``SelfAttention`` with a second QKV and output projection for image tokens; the core attention
    (softmax over all keys) is joint. Runs on the whole sequence (see the module docstring)."""

    def __init__(self, config, submodules, layer_number: int, **kwargs):
        super().__init__(without_sequence_parallel(config), submodules, layer_number, **kwargs)
        if self.config.num_query_groups < self.world_size:
            raise ValueError("vision experts need num_query_groups >= tensor parallel size")
        if self.config.attention_output_gate:
            raise ValueError("vision experts do not support attention_output_gate")
        # The image twins: same classes, shapes and TP split as linear_qkv / linear_proj.
        self.vision_linear_qkv = submodules.linear_qkv(
            self.config.hidden_size, self.linear_qkv_out_dim, config=self.config,
            init_method=self.config.init_method, gather_output=False,
            bias=self.config.add_bias_linear or self.config.add_qkv_bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp,
        )
        self.vision_linear_proj = submodules.linear_proj(
            self.query_projection_size, self.config.hidden_size, config=self.config,
            init_method=self.config.output_layer_init_method, bias=self.config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
            tp_group=self.pg_collection.tp,
        )

    def split_mixed_qkv(self, mixed_qkv: torch.Tensor):
        """[s, b, ng * (np/ng + 2) * hn] -> query [s, b, np, hn], key, value [s, b, ng, hn] (megatron's
        interleaved GQA layout, as ``get_query_key_value_tensors`` splits it), then the q/k norms."""
        heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        hn = self.hidden_size_per_attention_head
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], self.num_query_groups_per_partition, (heads_per_group + 2) * hn)
        query, key, value = torch.split(mixed_qkv, [heads_per_group * hn, hn, hn], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, hn)
        if self.q_layernorm is not None:
            query = apply_module(self.q_layernorm)(query)
        if self.k_layernorm is not None:
            key = apply_module(self.k_layernorm)(key)
        return query, key, value

    def forward(self, hidden_states, attention_mask, *, routing: Routing, rotary_pos_emb=None,
                attention_bias=None, packed_seq_params=None):
        """``hidden_states`` [s, b, h] of the whole sequence, split by ``routing`` -> output [s, b, h]
        (summed over TP)."""
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        mixed_qkv = route(hidden_states, routing, self.linear_qkv, self.vision_linear_qkv)
        query, key, value = self.split_mixed_qkv(mixed_qkv)
        if thd:
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if rotary_pos_emb is not None:
            q_pos_emb, k_pos_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            cu_q = cu_kv = None
            if thd:
                cu_q = packed_seq_params.cu_seqlens_q_padded if packed_seq_params.cu_seqlens_q_padded is not None \
                    else packed_seq_params.cu_seqlens_q
                cu_kv = packed_seq_params.cu_seqlens_kv_padded if packed_seq_params.cu_seqlens_kv_padded is not None \
                    else packed_seq_params.cu_seqlens_kv
            query = apply_rotary_pos_emb(query, q_pos_emb, config=self.config, cu_seqlens=cu_q,
                                         mscale=self._yarn_concentration_factor, cp_group=self.pg_collection.cp)
            key = apply_rotary_pos_emb(key, k_pos_emb, config=self.config, cu_seqlens=cu_kv,
                                       mscale=self._yarn_concentration_factor, cp_group=self.pg_collection.cp)
        if self.checkpoint_core_attention and self.training:
            core = self._checkpointed_attention_forward(query, key, value, attention_mask,
                                                        attn_mask_type=self.attn_mask_type,
                                                        attention_bias=attention_bias,
                                                        packed_seq_params=packed_seq_params)
        else:
            core = apply_module(self.core_attention)(query, key, value, attention_mask,
                                                     attn_mask_type=self.attn_mask_type,
                                                     attention_bias=attention_bias,
                                                     packed_seq_params=packed_seq_params)
        if thd:
            core = core.reshape(core.size(0), 1, -1)
        return route(core, routing, self.linear_proj, self.vision_linear_proj)


@dataclass
class VisionExpertLayerSubmodules(TransformerLayerSubmodules):
    vision_input_layernorm: Union[ModuleSpec, type, None] = None
    vision_pre_mlp_layernorm: Union[ModuleSpec, type, None] = None
    vision_mlp: Union[ModuleSpec, type, functools.partial, None] = None


class VisionExpertFFNLayer(TransformerLayer):
    """``--vision-experts ffn``: the dense attention, then the MLP block routed by modality."""

    def __init__(self, config, submodules: VisionExpertLayerSubmodules, *args, **kwargs):
        _refuse_unsupported(config)
        super().__init__(config, submodules, *args, **kwargs)
        self.layout = SequenceLayout(self.config, self.pg_collection.tp)
        self.vision_pre_mlp_layernorm = submodules.vision_pre_mlp_layernorm(
            config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.vision_mlp = submodules.vision_mlp(config=self.config, pg_collection=self.pg_collection,
                                                is_mtp_layer=False)

    def _routed_mlp(self, normed_full: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        # (the [s, b] mask, not its Routing, crosses the recompute checkpoint: tensors are what it saves)
        return route(normed_full, Routing(image_rows), self.mlp, self.vision_mlp)

    def _forward_mlp(self, hidden_states, inference_context=None, padding_mask=None, packed_seq_params=None):
        if padding_mask is None:
            raise ValueError("a vision-expert layer needs the image-token mask (SoloModel passes it as padding_mask)")
        image_mask = padding_mask.bool()
        local, whole = self.layout.routings(image_mask)
        normed = route(hidden_states, local, self.pre_mlp_layernorm, self.vision_pre_mlp_layernorm)
        normed_full = self.layout.gather(normed)
        if self.recompute_mlp:
            out = tensor_parallel.checkpoint(self._routed_mlp, False, normed_full, image_mask.t())
        else:
            out = route(normed_full, whole, self.mlp, self.vision_mlp)
        return self._forward_post_mlp((self.layout.scatter(out), None), hidden_states)


class VisionExpertFullLayer(VisionExpertFFNLayer):
    """``--vision-experts full``: also the input norm, QKV and output projection routed by modality."""

    def __init__(self, config, submodules: VisionExpertLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.vision_input_layernorm = submodules.vision_input_layernorm(
            config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)

    def _forward_attention(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                           rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                           rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                           packed_seq_params=None, sequence_len_offset=None, padding_mask=None, *,
                           inference_params=None):
        if inference_context is not None or inference_params is not None:
            raise ValueError("vision-expert layers do not support megatron-core's inference contexts")
        if padding_mask is None:
            raise ValueError("a vision-expert layer needs the image-token mask (SoloModel passes it as padding_mask)")
        local, whole = self.layout.routings(padding_mask.bool())
        normed = route(hidden_states, local, self.input_layernorm, self.vision_input_layernorm)
        out = self.self_attention(self.layout.gather(normed), attention_mask, routing=whole,
                                  rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                                  packed_seq_params=packed_seq_params)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                (self.layout.scatter(out), None), hidden_states, self.hidden_dropout)
        return hidden_states, context


def vision_expert_layer_spec(dense: TransformerLayerSubmodules, vision_experts: str) -> ModuleSpec:
    """The layer spec of ``vision_experts`` ('ffn' or 'full') built from the dense local submodules
    (``specs.get_layer_spec``): the same norm, linear and core-attention classes, twice."""
    if vision_experts not in ("ffn", "full"):
        raise ValueError(f"vision_expert_layer_spec builds 'ffn' or 'full', got {vision_experts!r}")
    mlp_submodules = dense.mlp.keywords["submodules"]
    group_mlp = functools.partial(TokenGroupMLP.as_mlp_submodule, submodules=mlp_submodules)
    sub = VisionExpertLayerSubmodules(**{f: getattr(dense, f) for f in TransformerLayerSubmodules.__dataclass_fields__})
    sub.mlp = group_mlp
    sub.vision_mlp = group_mlp
    sub.vision_pre_mlp_layernorm = dense.pre_mlp_layernorm
    if vision_experts == "ffn":
        return ModuleSpec(module=VisionExpertFFNLayer, submodules=sub)
    sub.vision_input_layernorm = dense.input_layernorm
    attn = dense.self_attention
    sub.self_attention = ModuleSpec(module=VisionExpertSelfAttention, params=dict(attn.params),
                                    submodules=attn.submodules)
    return ModuleSpec(module=VisionExpertFullLayer, submodules=sub)
