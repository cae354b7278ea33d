"""From the micro-batch contract (docs/ARCHITECTURE.md) to the model's forward arguments.

Packed documents attend only within themselves, causally. Both forms of that rule are built from the
batch's ``doc_lengths`` ([b, d], zero-padded, each row summing to s):

* local / CPU path: an explicit boolean mask [b, 1, s, s] (True = masked, megatron-core's convention),
  block-diagonal causal, with the sliding window folded in;
* TE path: the batch is re-laid out as one THD sequence [1, T] of the documents of all rows, each
  padded to the FP8/CP multiple (:func:`fp8_thd_pad_multiple`), described by ``PackedSeqParams``
  (``cu_seqlens`` of the real lengths, ``cu_seqlens_padded`` of the padded ones).

The ``<vpatch>`` order is row-major in both layouts (rows and documents keep their order, padding is
never a ``<vpatch>``), so ``patches[k]`` stays with the k-th ``<vpatch>``: one ``<vpatch>`` token is one
patch, which is why the cu_seqlens remapping bug of Megatron-LM's image-token expansion cannot occur.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_solo.model.config import fp8_thd_pad_multiple
from megatron_solo.model.image_blocks import attention_allowed, image_block_ids, mrope_position_ids


def document_ids(doc_lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, d] lengths -> [b, s] index of the document each token belongs to."""
    doc_lengths = torch.as_tensor(doc_lengths).long()
    sums = doc_lengths.sum(dim=1)
    if not bool((sums == seq_length).all()):
        raise ValueError(f"every row of doc_lengths must sum to the sequence length {seq_length}, got {sums.tolist()}")
    if bool((doc_lengths < 0).any()):
        raise ValueError("doc_lengths must be non-negative")
    d = doc_lengths.size(1)
    ids = torch.arange(d, device=doc_lengths.device)
    return torch.stack([torch.repeat_interleave(ids, row) for row in doc_lengths])


def packed_causal_mask(doc_lengths: torch.Tensor, seq_length: int,
                       window_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Block-diagonal causal mask [b, 1, s, s], True where attention is *not* allowed.

    ``window_size`` is megatron-core's ``(left, right)``: query i may see keys j with
    ``i - left <= j <= i + right`` (right is 0 here: causal).
    """
    doc = document_ids(doc_lengths, seq_length)
    i = torch.arange(seq_length, device=doc.device)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    if window_size is not None and window_size[0] >= 0:
        # key >= query - left: a bool [s, s] comparison, not an int64 [s, s] difference (32 MiB at 2048)
        allowed = allowed & (i[None, :] >= i[:, None] - window_size[0])[None]
    return (~allowed).unsqueeze(1)


def position_ids_from_doc_lengths(doc_lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, s] positions restarting at 0 for each document (the contract's ``position_ids``)."""
    doc = document_ids(doc_lengths, seq_length)
    starts = torch.cumsum(torch.as_tensor(doc_lengths).long(), dim=1) - torch.as_tensor(doc_lengths).long()
    return torch.arange(seq_length, device=doc.device)[None] - torch.gather(starts, 1, doc)


def pad_lengths(lengths: torch.Tensor, multiple: int) -> torch.Tensor:
    """Round every length up to a multiple of ``multiple`` (the FP8/CP THD padding rule)."""
    lengths = torch.as_tensor(lengths).long()
    return (lengths + multiple - 1) // multiple * multiple


THD_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "image_doc_mask")


def to_thd_batch(batch: dict, pad_multiple: int = 1, total_multiple: int = 1) -> dict:
    """Re-lay a [b, s] batch as one THD sequence [1, T] with each document padded to ``pad_multiple``.

    Padding tokens are id 0 with label 0 and loss mask 0; ``patches`` are unchanged. Adds
    ``cu_seqlens`` (real lengths), ``cu_seqlens_padded``, ``max_seqlen`` and ``thd_index`` (for each
    original token in row-major [b, s] order, its position in the THD sequence). When
    ``total_multiple`` > 1 (sequence parallelism: T must split evenly over TP), a final padding
    document makes T a multiple of it.
    """
    tokens = batch["tokens"]
    b, s = tokens.shape
    lengths = torch.as_tensor(batch["doc_lengths"]).long().cpu()
    document_ids(lengths, s)  # validates
    real = lengths[lengths > 0]  # row-major: row 0's documents, then row 1's, ...
    padded = pad_lengths(real, pad_multiple)
    total = int(padded.sum())
    extra = (-total) % total_multiple
    if extra:
        real = torch.cat([real, torch.zeros(1, dtype=torch.long)])
        padded = torch.cat([padded, torch.tensor([extra])])
        total += extra
    starts = torch.cumsum(padded, 0) - padded
    index = torch.cat([torch.arange(int(st), int(st) + int(n)) for st, n in zip(starts, real)])
    device = tokens.device
    index = index.to(device)
    out = {k: v for k, v in batch.items() if k not in THD_KEYS and k != "doc_lengths"}
    for key in THD_KEYS:
        if key not in batch:
            continue
        src = batch[key].reshape(b * s)
        dst = torch.zeros(total, dtype=src.dtype, device=device)
        if key == "position_ids":  # pads continue their document's count (never attended to)
            dst = torch.cat([torch.arange(int(n), device=device) for n in padded]).to(src.dtype)
        dst[index] = src
        out[key] = dst.unsqueeze(0)
    zero = torch.zeros(1, dtype=torch.int32)
    out["cu_seqlens"] = torch.cat([zero, torch.cumsum(real, 0).int()]).to(device)
    out["cu_seqlens_padded"] = torch.cat([zero, torch.cumsum(padded, 0).int()]).to(device)
    out["max_seqlen"] = int(padded.max())
    out["thd_index"] = index
    return out


def prepare_batch(batch: dict, config, *, thd: bool) -> dict:
    """The batch in the layout the model runs on: unchanged for the local spec, THD for TE.

    ``thd`` is the caller's decision, the one the model's layer spec was built with (the trainer's
    ``cfg.model.thd_batches``): derived here, it could disagree with the spec (a [b, s] model given THD
    batches). Use the returned batch for both :func:`model_forward_kwargs` and :func:`solo_loss_func`.
    """
    if not thd:
        return batch
    tp = config.tensor_model_parallel_size
    return to_thd_batch(batch, fp8_thd_pad_multiple(config),
                        total_multiple=math.lcm(tp if config.sequence_parallel else 1,
                                                fp8_thd_pad_multiple(config)))


def packed_seq_params_from_batch(batch: dict):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=batch["cu_seqlens"],
        cu_seqlens_kv=batch["cu_seqlens"],
        cu_seqlens_q_padded=batch["cu_seqlens_padded"],
        cu_seqlens_kv_padded=batch["cu_seqlens_padded"],
        max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"],
    )


def model_forward_kwargs(batch: dict, config, *, document_ids_mask: bool = False, model_args=None) -> dict:
    """Keyword arguments of ``SoloModel.forward`` for a (prepared) micro-batch.

    A THD batch (from :func:`prepare_batch` on the TE path) gives ``packed_seq_params``; a [b, s]
    batch gives the explicit block-diagonal causal mask with the sliding window, or, with
    ``document_ids_mask=True`` (only for the ``core_attention="sdpa_flex"`` spec), the [b, s] document
    ids from which FlexAttention builds its block mask without an [s, s] tensor. Keys missing from the
    batch (e.g. tokens on a middle pipeline stage) are passed as None.

    ``model_args`` (:class:`SoloModelArgs`; None: SOLO's choices) carries the image choices
    (``model/image_blocks.py``): under ``image_attention='bidirectional'`` the mask also lets the tokens
    of each image block see each other (the integer form is then [2, b, s]: document ids, block ids);
    under ``image_positions='mrope'`` ``position_ids`` are the [3, b, s] multimodal positions, made from
    the tokens and the batch's ``patch_coords``.
    """
    bidirectional = model_args is not None and model_args.image_attention == "bidirectional"
    mrope = model_args is not None and model_args.image_positions == "mrope"
    kwargs = dict(
        input_ids=batch.get("tokens"),
        position_ids=batch.get("position_ids"),
        labels=batch.get("labels"),
        vision_patches=batch.get("patches"),
        attention_mask=None,
        packed_seq_params=None,
    )
    if "cu_seqlens" in batch:
        if bidirectional or mrope:  # refused at start-up (training/config.py); a direct caller learns it here
            raise ValueError("THD batches (the TE spec) take neither bidirectional image attention nor mrope "
                             "positions; use the local spec")
        kwargs["packed_seq_params"] = packed_seq_params_from_batch(batch)
        return kwargs
    tokens = batch.get("tokens")
    if (bidirectional or mrope) and tokens is None:
        raise ValueError("the image choices need the batch's tokens on every pipeline stage")
    seq_length = None
    if batch.get("doc_lengths") is not None:
        seq_length = int(batch["doc_lengths"].sum(dim=1)[0].item()) if tokens is None else tokens.size(1)
        doc = document_ids(batch["doc_lengths"], seq_length)
    elif tokens is not None:
        doc = torch.zeros_like(tokens)
    if tokens is not None:
        doc = doc.to(tokens.device)
    blocks = image_block_ids(tokens, doc, model_args.image_tokens) if bidirectional else None
    if mrope:
        kwargs["position_ids"] = mrope_position_ids(tokens, batch.get("patch_coords"), doc, model_args.image_tokens)
    if seq_length is None and blocks is None:
        return kwargs  # one document per row, causal: the layers' own causal mask
    if document_ids_mask:
        kwargs["attention_mask"] = doc if blocks is None else torch.stack([doc, blocks])
        return kwargs
    window = getattr(config, "window_size", None)
    if blocks is None:
        kwargs["attention_mask"] = packed_causal_mask(batch["doc_lengths"], seq_length, window).to(doc.device)
    else:
        window_left = window[0] if window is not None and window[0] >= 0 else None
        kwargs["attention_mask"] = ~attention_allowed(doc, blocks, window_left).unsqueeze(1)
    return kwargs
