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

Each token is computed once, in modality order (:class:`Routing`): a layer gathers its input's rows
text-first-then-image once (``split``), and each group goes through its own norms, linears and residual
adds (per-token work, to which row order does not matter) as a slice of that one tensor; only Q/K/V are
scattered back to sequence order (RoPE positions, the joint core attention) and the attention context
gathered again, and the layer's output is scattered back once (``merge``): two gathers and two scatters
per ``full`` layer, one each per ``ffn`` layer. Under sequence parallelism a TP rank holds a slice of the
sequence, and the two groups of a slice differ in size from rank to rank, which megatron-core's SP
linears (an all-gather of equal slices) cannot take. So (:class:`SequenceParallelSlices`) the residual
stream and the norms stay on the rank's slice (per token, weights marked ``sequence_parallel`` as in the
dense layer), the slice is all-gathered, the routed linears run on the whole sequence as plain
tensor-parallel linears (built with ``sequence_parallel=False``: input copied, output all-reduced), and
the result is split back to the slice. The expert weights are split over TP exactly as their text twins
(same classes, same shapes).
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
from megatron.core.utils import deprecate_inference_params, make_viewless_tensor


# ------------------------------------------------------------------------------------------ routing
class _Split(torch.autograd.Function):
    """Rows [n, ...] -> (text rows, image rows) in modality order: one gather (``index_select``) by
    ``order``; the two groups are slices of it. Backward: the two gradients scattered back into one
    tensor (``index_copy_``; ``index_select``'s own backward scatter-adds into zeros, and two slices'
    backwards would each fill a zero tensor of all rows)."""

    @staticmethod
    def forward(ctx, x, order, n_text):
        ctx.save_for_backward(order)
        ctx.n_text = n_text
        rows = x.index_select(0, order)
        return rows[:n_text], rows[n_text:]

    @staticmethod
    def backward(ctx, grad_text, grad_image):
        (order,) = ctx.saved_tensors
        return _scatter(grad_text, grad_image, order, ctx.n_text), None, None


class _Merge(torch.autograd.Function):
    """(text rows, image rows) -> rows in the original order: one scatter (``index_copy_``) by ``order``.
    Backward: one gather, split into the two groups' gradients."""

    @staticmethod
    def forward(ctx, text, image, order):
        ctx.save_for_backward(order)
        ctx.n_text = text.size(0)
        return _scatter(text, image, order, text.size(0))

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        rows = grad.index_select(0, order)
        return rows[: ctx.n_text], rows[ctx.n_text:], None


def _scatter(text, image, order, n_text):
    out = text.new_empty((order.numel(), *text.shape[1:]))
    out.index_copy_(0, order[:n_text], text)
    out.index_copy_(0, order[n_text:], image)
    return out


class Routing:
    """How the tokens of one [s, b] image mask split: the row order that puts the text rows first and
    the image rows after them (each group in sequence order), and the number of text rows. Made once
    per layer call and used by every split and merge of the call."""

    def __init__(self, is_image: torch.Tensor):
        image = is_image.reshape(-1)
        self.shape = tuple(is_image.shape)
        self.order = torch.argsort(image.to(torch.uint8), stable=True)
        self.n_text = int(self.order.numel() - image.sum())

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[s, b, h] -> (text rows [n_text, 1, h], image rows [n_image, 1, h]) (megatron-core's [s, b, h]
        layout with the rows of a group as its sequence)."""
        if tuple(x.shape[:2]) != self.shape:
            raise ValueError(f"hidden states {tuple(x.shape)} do not match the image mask {self.shape}")
        return _Split.apply(x.reshape(-1, 1, x.size(-1)), self.order, self.n_text)

    def merge(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`split`: the two groups' rows back in sequence order, [s, b, h'] (not a view:
        megatron-core's activation checkpointing refuses to save views)."""
        out = _Merge.apply(text, image, self.order)
        return make_viewless_tensor(out.view(*self.shape, -1), requires_grad=out.requires_grad, keep_graph=True)


def each(modules, groups):
    """(text module, image module) applied to (text rows, image rows); a linear's ``(output, bias)`` is
    reduced to its output (the routed linears have no separate bias)."""
    outs = []
    for module, rows in zip(modules, groups):
        y = apply_module(module)(rows)
        if isinstance(y, tuple):
            y, bias = y
            assert bias is None, "routed linears must not return a separate bias"
        outs.append(y)
    return tuple(outs)


def without_sequence_parallel(config):
    """A copy of ``config`` for the routed linears: plain TP (they run on the whole sequence)."""
    if not config.sequence_parallel:
        return config
    config = copy.copy(config)
    config.sequence_parallel = False
    return config


class WholeSequence:
    """The layer holds the whole sequence (no SP): its residual stream, norms and routed linears all see
    the same two groups, so a layer splits its input once and merges its output once."""

    def __init__(self, config, tp_group):
        pass

    def routings(self, image_mask_bs: torch.Tensor) -> tuple[Routing, Routing]:
        """The [b, s] mask's :class:`Routing` of the layer's own rows and of the whole sequence (one)."""
        whole = Routing(image_mask_bs.t())
        return whole, whole

    def to_whole(self, groups, local: Routing, whole: Routing):
        """The groups of the layer's rows -> the groups of the whole sequence (the routed linears' input)."""
        return groups

    def to_local(self, groups, whole: Routing, local: Routing):
        """The routed linears' output groups -> the groups of the layer's rows."""
        return groups


class SequenceParallelSlices:
    """Under SP a TP rank holds a slice of the sequence, whose two groups differ in size from rank to rank
    (megatron-core's SP linears, an all-gather of equal slices, cannot take them): the residual stream and
    the norms stay on the slice, the routed linears run on the whole sequence as plain TP linears."""

    def __init__(self, config, tp_group):
        self.tp_group = tp_group

    def routings(self, image_mask_bs: torch.Tensor) -> tuple[Routing, Routing]:
        rows = image_mask_bs.t()
        n = rows.size(0) // self.tp_group.size()
        r = self.tp_group.rank()
        return Routing(rows[r * n:(r + 1) * n]), Routing(rows)

    def to_whole(self, groups, local: Routing, whole: Routing):
        """Merge the slice's groups, all-gather the sequence, split it. The all-gather's backward splits
        (the routed linears' input grads are already reduced over TP: a reduce-scatter would count them TP
        times)."""
        x = tensor_parallel.gather_from_sequence_parallel_region(
            local.merge(*groups), tensor_parallel_output_grad=False, group=self.tp_group)
        return whole.split(x)

    def to_local(self, groups, whole: Routing, local: Routing):
        """Merge the whole sequence's groups (identical on every TP rank), keep this rank's slice (backward:
        all-gather), split it."""
        return local.split(tensor_parallel.scatter_to_sequence_parallel_region(whole.merge(*groups), group=self.tp_group))


def sequence_layout(config, tp_group):
    """Where a layer's tokens are, decided once when the layer is built."""
    return (SequenceParallelSlices if config.sequence_parallel else WholeSequence)(config, tp_group)


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

    def forward(self, groups, attention_mask, *, routing: Routing, rotary_pos_emb=None,
                attention_bias=None, packed_seq_params=None, inference_context=None):
        """``groups`` (text rows, image rows) of the whole sequence's normed hidden states, as ``routing``
        splits it -> the output projection's (text rows, image rows) (summed over TP). Only Q/K/V go back to
        sequence order (RoPE positions, the joint core attention); the context is split again.

        With megatron-core's static ``inference_context`` (its generation: prefill, then one token per
        step) the window's keys and values go into the layer's KV cache and the attention reads all of the
        cache so far, as ``Attention.forward`` does (its ``_adjust_key_value_for_inference``: the cache
        holds keys before RoPE; the query's angles are the window's rows, the keys' all rows so far; after
        the prefill no mask). The cache holds K/V in sequence order, so each token's routed projection is
        made once, in the step that brings it."""
        if inference_context is not None and not inference_context.is_static_batching():
            raise ValueError("vision-expert attention supports megatron-core's static inference context only")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        mixed_qkv = routing.merge(*each((self.linear_qkv, self.vision_linear_qkv), groups))
        query, key, value = self.split_mixed_qkv(mixed_qkv)
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        query, key, value, rotary_pos_emb, attn_mask_type, _ = self._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb)
        if thd:
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if rotary_pos_emb is not None:
            q_pos_emb, k_pos_emb = rotary_pos_emb
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
                                                        attn_mask_type=attn_mask_type,
                                                        attention_bias=attention_bias,
                                                        packed_seq_params=packed_seq_params)
        else:
            core = apply_module(self.core_attention)(query, key, value, attention_mask,
                                                     attn_mask_type=attn_mask_type,
                                                     attention_bias=attention_bias,
                                                     packed_seq_params=packed_seq_params)
        if thd:
            core = core.reshape(core.size(0), 1, -1)
        return each((self.linear_proj, self.vision_linear_proj), routing.split(core))


@dataclass
class VisionExpertLayerSubmodules(TransformerLayerSubmodules):
    vision_input_layernorm: Union[ModuleSpec, type, None] = None
    vision_pre_mlp_layernorm: Union[ModuleSpec, type, None] = None
    vision_mlp: Union[ModuleSpec, type, functools.partial, None] = None


class VisionExpertFFNLayer(TransformerLayer):
    """``--vision-experts ffn``: the dense attention, then the MLP block routed by modality: the block's
    input is split once, each group goes through its norm, MLP and residual add, the groups are merged
    once (the norms and residual adds are per token, so row order does not matter to them)."""

    def __init__(self, config, submodules: VisionExpertLayerSubmodules, *args, **kwargs):
        _refuse_unsupported(config)
        super().__init__(config, submodules, *args, **kwargs)
        self.layout = sequence_layout(self.config, self.pg_collection.tp)
        self.vision_pre_mlp_layernorm = submodules.vision_pre_mlp_layernorm(
            config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.vision_mlp = submodules.vision_mlp(config=self.config, pg_collection=self.pg_collection,
                                                is_mtp_layer=False)

    def _mlp_pair(self, text, image):
        return each((self.mlp, self.vision_mlp), (text, image))

    def _routed_mlp_block(self, residual, local: Routing, whole: Routing):
        """The (text, image) residual rows of the layer -> the same after the MLP block."""
        normed = each((self.pre_mlp_layernorm, self.vision_pre_mlp_layernorm), residual)
        normed = self.layout.to_whole(normed, local, whole)
        if self.recompute_mlp:
            out = tensor_parallel.checkpoint(self._mlp_pair, False, *normed)
        else:
            out = self._mlp_pair(*normed)
        return self._add_each(self.mlp_bda, self.layout.to_local(out, whole, local), residual)

    def _add_each(self, bda, outputs, residual):
        with self.bias_dropout_add_exec_handler():
            return tuple(bda(self.training, self.config.bias_dropout_fusion)((y, None), x, self.hidden_dropout)
                         for y, x in zip(outputs, residual))

    def _image_routings(self, padding_mask):
        if padding_mask is None:
            raise ValueError("a vision-expert layer needs the image-token mask (SoloModel passes it as padding_mask)")
        return self.layout.routings(padding_mask.bool())

    def _forward_mlp(self, hidden_states, inference_context=None, padding_mask=None, packed_seq_params=None):
        local, whole = self._image_routings(padding_mask)
        residual = self._routed_mlp_block(local.split(hidden_states), local, whole)
        return local.merge(*residual)


class VisionExpertFullLayer(VisionExpertFFNLayer):
    """``--vision-experts full``: also the input norm, QKV and output projection routed by modality. The
    layer runs in modality order from its input to its output (one split, one merge); only Q/K/V go back
    to sequence order for the joint attention, and its context is split again."""

    def __init__(self, config, submodules: VisionExpertLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.vision_input_layernorm = submodules.vision_input_layernorm(
            config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, *,
                inference_params=None):
        inference_context = deprecate_inference_params(inference_context, inference_params)
        local, whole = self._image_routings(padding_mask)
        residual = local.split(hidden_states)
        normed = each((self.input_layernorm, self.vision_input_layernorm), residual)
        out = self.self_attention(self.layout.to_whole(normed, local, whole), attention_mask, routing=whole,
                                  rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                                  packed_seq_params=packed_seq_params, inference_context=inference_context)
        residual = self._add_each(self.self_attn_bda, self.layout.to_local(out, whole, local), residual)
        residual = self._routed_mlp_block(residual, local, whole)
        return local.merge(*residual), context


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
