"""SOLO's loss in megatron-core's per-token form (``TransformerConfig.calculate_per_token_loss``)."""

from __future__ import annotations

import torch


def solo_loss_func(batch: dict, output_tensor: torch.Tensor):
    """``output_tensor``: per-token losses [b, s] from ``SoloModel.forward(..., labels=...)``.

    Returns ``(loss_sum, num_tokens, report)``: the masked sum and the number of loss tokens, so that
    the mean is exact over micro-batches, pipeline stages and data-parallel ranks (megatron-core's
    schedule and ``finalize_model_grads`` divide by the global token count). ``report`` holds
    ``[sum, count]`` float tensors, to be summed over micro-batches and ranks before dividing:
    ``'lm loss'``, ``'image-doc loss'`` (tokens of documents that hold an image) and
    ``'text-doc loss'`` (the others), as SOLO reported.

    The loss mask is the batch's (``megatron_solo.data.roles.label_loss_mask``: trained role only,
    never image patches, never ids >= 32000, never padding); this function never widens it.
    """
    losses = output_tensor.float()
    mask = batch["loss_mask"].to(losses.device, torch.float32).view_as(losses)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}
    image_doc = batch.get("image_doc_mask")
    if image_doc is not None:
        image_doc = image_doc.to(losses.device).view_as(losses).bool()
        for name, sel in (("image-doc loss", image_doc), ("text-doc loss", ~image_doc)):
            m = mask * sel
            report[name] = torch.stack([(losses * m).sum().detach(), m.sum()])
    return loss_sum, num_tokens, report


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None, padded_vocab_size: int,
                      tp_rank: int = 0) -> torch.Tensor:
    """Logits of the padded vocabulary rows (ids >= ``vocab_size``, the tokenizer's 33031) set to the
    dtype's lowest value, so they never take part in the softmax nor win a greedy pick.

    Megatron pads the output layer to a multiple of 128 x TP and the export drops those rows: masked,
    the trained function is the exported one whatever the padding. ``logits`` [..., width] are this
    TP rank's vocab-parallel shard (``width = padded / TP``, global ids from ``tp_rank * width``) or
    the gathered full vocabulary (``width == padded_vocab_size``). The lowest finite value rather than
    -inf keeps every arithmetic on the logits finite.
    """
    if vocab_size is None or vocab_size >= padded_vocab_size:
        return logits
    width = logits.size(-1)
    start = 0 if width == padded_vocab_size else tp_rank * width
    first_padded = max(vocab_size - start, 0)  # local column of the first padded id
    if first_padded >= width:
        return logits
    padded = torch.zeros(width, dtype=torch.bool, device=logits.device)
    padded[first_padded:] = True
    return logits.masked_fill(padded, torch.finfo(logits.dtype).min)
