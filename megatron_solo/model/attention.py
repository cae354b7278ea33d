"""Core attention for the no-TE GPU path: torch SDPA (unpacked causal) and FlexAttention (packed + window).

:class:`SDPAFlexAttention` is a drop-in for megatron-core's ``DotProductAttention`` in the local layer
spec (``get_layer_spec(config, use_te=False, core_attention="sdpa_flex")``): same constructor, same
``[s, b, heads, head_dim]`` inputs, same ``[s, b, heads * head_dim]`` output, same (1/sqrt(d)) scale.

* No mask and no sliding window: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``,
  which picks flash / memory-efficient kernels on GPU and never materialises [s, s].
* Otherwise (packed documents and/or the sliding window): ``flex_attention`` with a ``BlockMask`` whose
  ``mask_mod`` is "same document, causal, within the window". Blocks that are entirely masked are
  skipped, so a packed 32k sequence of short documents costs what its documents cost.

The mask may be given as megatron-core's dense boolean mask [b, 1, s, s] (True = masked; what
``model_forward_kwargs`` builds), or, cheaper, as integer document ids [b, s]
(``model_forward_kwargs(..., document_ids_mask=True)``), from which the block mask is built without any
[s, s] tensor; under bidirectional image attention the integer form is [2, b, s] (document ids, image
block ids: ``model/image_blocks.py``) and the ``mask_mod`` also admits "same image block". Attention dropout is not supported by FlexAttention; SOLO trains without it.

The block mask is built by :func:`block_mask_in_slabs`, not by torch's eager ``create_block_mask``: that
one evaluates the ``mask_mod`` on the whole dense [b, h, sq, sk] grid first (1 GiB per micro-batch at
32k tokens), while the slabs hold at most ``SLAB_ELEMENTS`` entries of the rule at a time. The same code
builds it on the GPU and on the CPU (where the tests check that no [s, s] tensor appears). The layers of
one model share a :class:`MaskCache`: a step builds its mask once, not once per layer.

FlexAttention has no CPU backward (torch 2.14). On the CPU, when gradients are needed, the same mask is
materialised densely and given to SDPA instead, so the module still trains there (slowly); forward-only
CPU calls and all GPU calls use FlexAttention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron_solo.model.image_blocks import attention_allowed

_COMPILED_FLEX = None


def _flex(q, k, v, block_mask, scale):
    """FlexAttention: compiled on GPU (its fast path), eager elsewhere (CPU tests)."""
    global _COMPILED_FLEX
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def document_block_mask(doc_ids: Optional[torch.Tensor], batch: int, sq: int, sk: int,
                        window_left: Optional[int], device, dense_mask: Optional[torch.Tensor] = None,
                        block_ids: Optional[torch.Tensor] = None):
    """``BlockMask`` for: same document (if ``doc_ids`` [b, s]), causal, ``q - kv <= window_left``; or,
    with ``block_ids`` [b, s] (0: no image), the same image block.

    ``dense_mask`` (bool [b, 1, sq, sk], True = masked) may be given instead of ``doc_ids``: it is then the
    whole rule (``model_forward_kwargs`` folds causality and the window into it).
    """
    offset = sk - sq  # queries are the last sq positions (sq == sk in training)

    def mask_mod(b, h, q_idx, kv_idx):
        if dense_mask is not None:  # the caller's complete rule (it may admit later keys: image blocks)
            return ~dense_mask[b, 0, q_idx, kv_idx]
        q_pos = q_idx + offset
        ok = kv_idx <= q_pos
        if window_left is not None:  # (kv >= q - w: no int64 [q, kv] difference)
            ok = ok & (kv_idx >= q_pos - window_left)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q_pos] == doc_ids[b, kv_idx])
        if block_ids is not None:
            bq = block_ids[b, q_pos]
            ok = ok | ((bq == block_ids[b, kv_idx]) & (bq > 0))
        return ok

    return block_mask_in_slabs(mask_mod, batch, sq, sk, device)


# Entries of the rule evaluated at once (bool, plus a few temporaries of that size): 4 MiB, whatever s is.
SLAB_ELEMENTS = 1 << 22


def block_mask_in_slabs(mask_mod, batch: int, sq: int, sk: int, device, block: int = 128,
                        slab_elements: int = SLAB_ELEMENTS) -> BlockMask:
    """``create_block_mask(mask_mod, batch, None, sq, sk)`` (same blocks, same ``BlockMask``) without its
    dense [b, 1, sq, sk] mask: the rule is evaluated on slabs of whole query blocks (at most
    ``slab_elements`` entries, at least one block row), each reduced at once to its tiles' counts.

    ``mask_mod(b, h, q_idx, kv_idx)`` must broadcast (index tensors [b, 1, 1], [1, r, 1], [1, 1, sk]);
    the rules of this module do.
    """
    rows = max(block, slab_elements // (batch * sk) // block * block)
    n_kv = -(-sk // block)
    b_idx = torch.arange(batch, device=device)[:, None, None]
    h_idx = torch.zeros((), dtype=torch.long, device=device)
    kv_idx = torch.arange(sk, device=device)[None, None, :]
    partial, full = [], []
    for q0 in range(0, sq, rows):
        q_idx = torch.arange(q0, min(q0 + rows, sq), device=device)[None, :, None]
        allowed = mask_mod(b_idx, h_idx, q_idx, kv_idx).expand(batch, q_idx.size(1), sk)
        pad_q, pad_kv = -q_idx.size(1) % block, -sk % block
        if pad_q or pad_kv:  # to whole tiles, with False, as create_block_mask pads (an edge tile is never full)
            allowed = torch.nn.functional.pad(allowed, (0, pad_kv, 0, pad_q))
        counts = allowed.view(batch, -1, block, n_kv, block).sum(dim=(2, 4), dtype=torch.int32)
        partial.append((counts > 0) & (counts < block * block))
        full.append(counts == block * block)

    def ordered(tiles):  # torch's own layout: per query block, the count and the kv block indices first
        tiles = torch.cat(tiles, dim=1)[:, None].to(torch.int32)
        return (tiles.sum(dim=-1, dtype=torch.int32),
                torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32))

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(sq, sk))


class MaskCache:
    """What the layers of one model make from one step's mask (the block mask, or the dense fallback's
    form): built by the first layer that needs it, found by the others, dropped when the next mask comes.
    The key is the caller's mask tensor itself (held, so its id cannot be reused) plus what the layer adds
    (the form, its window, the shape)."""

    def __init__(self):
        self._mask, self._made = None, {}

    def get(self, attention_mask, key: tuple, make):
        if attention_mask is None:
            return make()
        if attention_mask is not self._mask:
            self._mask, self._made = attention_mask, {}
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


class SDPAFlexAttention(MegatronModule):
    """Core attention on torch SDPA / FlexAttention (see the module docstring).

    ``mask_cache``: shared by the layers of one model (``specs.get_layer_spec`` gives them one), so that a
    step builds its block mask (or, on the CPU with gradients, its dense mask) once, not once per layer;
    by default the module's own."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, mask_cache: Optional[MaskCache] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAFlexAttention does not implement context parallelism; use the TE spec")
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        head_dim = divide(projection_size, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by SDPAFlexAttention")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        window = config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None
        if window is not None and window[1] not in (0, -1):
            raise ValueError(f"only causal sliding windows (right = 0) are supported, got {window}")
        self.window_left = None if window is None or window[0] < 0 else int(window[0])
        self._masks = mask_cache if mask_cache is not None else MaskCache()

    def _dense_allowed(self, attention_mask, b, sq, sk, device):
        """The same rule as the block mask, as a dense bool [b, 1, sq, sk] (True = may attend)."""
        return self._masks.get(attention_mask, ("dense", b, sq, sk, self.window_left, device),
                               lambda: self._make_dense_allowed(attention_mask, b, sq, sk, device))

    def _make_dense_allowed(self, attention_mask, b, sq, sk, device):
        q_pos = torch.arange(sq, device=device)[:, None] + (sk - sq)
        kv = torch.arange(sk, device=device)[None, :]
        ok = kv <= q_pos
        if self.window_left is not None:
            ok = ok & (kv >= q_pos - self.window_left)
        ok = ok[None, None].expand(b, 1, sq, sk)
        if attention_mask is None:
            return ok
        if attention_mask.dtype == torch.bool:  # the caller's complete rule (see document_block_mask)
            return ~attention_mask.expand(b, 1, sq, sk)
        ids = attention_mask.to(device)
        if ids.dim() == 3:  # [2, b, s]: document ids, image block ids
            return attention_allowed(ids[0], ids[1], self.window_left, q_offset=sk - sq).unsqueeze(1)
        same = ids[:, sk - sq:, None] == ids[:, None, :]
        return ok & same[:, None]

    def _block_mask(self, attention_mask, b, sq, sk, device):
        return self._masks.get(attention_mask, ("block", b, sq, sk, self.window_left, device),
                               lambda: self._make_block_mask(attention_mask, b, sq, sk, device))

    def _make_block_mask(self, attention_mask, b, sq, sk, device):
        if attention_mask is None:
            bm = document_block_mask(None, b, sq, sk, self.window_left, device)
        elif attention_mask.dtype == torch.bool:
            bm = document_block_mask(None, b, sq, sk, self.window_left, device, dense_mask=attention_mask)
        elif attention_mask.dim() == 3:  # [2, b, s]: document ids, image block ids
            bm = document_block_mask(attention_mask[0], b, sq, sk, self.window_left, device,
                                     block_ids=attention_mask[1])
        else:
            bm = document_block_mask(attention_mask, b, sq, sk, self.window_left, device)
        return bm

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("THD PackedSeqParams need the TE spec; the local path takes a mask from doc_lengths")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAFlexAttention")
        sq, b, np_, hn = query.shape
        sk = key.size(0)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is None and self.window_left is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=sq > 1, scale=self.softmax_scale, enable_gqa=True)
        else:
            if dropout > 0:
                raise ValueError("FlexAttention has no attention dropout; set attention_dropout=0")
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            if not q.is_cuda and needs_grad:  # no FlexAttention backward on CPU: dense SDPA fallback
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=self._dense_allowed(attention_mask, b, sq, sk, query.device),
                    scale=self.softmax_scale, enable_gqa=True)
            else:
                out = _flex(q, k, v, self._block_mask(attention_mask, b, sq, sk, query.device), self.softmax_scale)
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
