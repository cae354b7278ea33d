"""One training sample from a pack's segments, in numpy: the rule the training datasets apply
(:func:`megatron_solo.data.dataset.build_sample` turns it into tensors) and the inspection tools show
(``tools/inspect_data.py``), kept free of torch so those tools answer without importing it.
Fields and dtypes: :mod:`megatron_solo.data.dataset`."""

from __future__ import annotations

import numpy as np

from megatron_solo.data.patch_coords import coords_from_tokens
from megatron_solo.data.roles import label_loss_mask
from megatron_solo.spec import IMAGE, MISTRAL_VOCAB, PATCH_DIM, SoloVocab


def sample_arrays(segments, seq_length: int, loss_role: str = "assistant", vocab: SoloVocab = MISTRAL_VOCAB) -> dict:
    """One training sample, as numpy arrays, from a pack's segments (as :meth:`SoloIndexedDataset.pack` returns them,
    read up to ``seq_length + 1`` tokens so the last input has its label). ``vocab``: the ids the
    prefix was made with (:attr:`SoloIndexedDataset.vocab`): its padding, ``<vpatch>`` and control ids.
    A segment is (tokens, roles, patches, patch coordinates) (``pack(..., with_coords=True)``), or without
    the coordinates: then it is a whole document laid out with row separators and they are counted from
    its tokens (:func:`~megatron_solo.data.patch_coords.coords_from_tokens`)."""
    s = seq_length
    toks = [seg[0] for seg in segments]
    m = sum(len(t) for t in toks)
    tokens_all = np.concatenate(toks).astype(np.int64) if toks else np.zeros(0, np.int64)
    roles_all = np.concatenate([seg[1] for seg in segments]) if toks else np.zeros(0, np.uint8)
    lens_all = np.array([len(t) for t in toks], dtype=np.int64)
    seg_all = np.repeat(np.arange(len(toks)), lens_all)
    n = min(m, s)

    tokens = np.full(s, vocab.pad, np.int64)
    tokens[:n] = tokens_all[:n]
    labels = np.zeros(s, np.int64)
    label_roles = np.zeros(s, np.uint8)
    valid = np.zeros(s, bool)
    k = min(m - 1, s)  # positions with a following token read
    if k > 0:
        same = seg_all[1:k + 1] == seg_all[:k]
        valid[:k] = same
        labels[:k] = np.where(same, tokens_all[1:k + 1], 0)
        label_roles[:k] = roles_all[1:k + 1]
    loss_mask = label_loss_mask(labels, label_roles, valid, loss_role, vocab)

    # documents as they appear in the first s tokens
    doc_lengths = []
    used = 0
    for length in lens_all:
        if used >= n:
            break
        take = int(min(length, n - used))
        doc_lengths.append(take)
        used += take
    if n < s:
        doc_lengths.append(s - n)
    doc_lengths = np.array(doc_lengths, dtype=np.int32)
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    position_ids = np.arange(s, dtype=np.int64) - starts

    is_image = np.zeros(s, bool)
    is_image[:n] = roles_all[:n] == IMAGE
    seg_of = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
    seg_has_image = np.bincount(seg_of, weights=is_image, minlength=len(doc_lengths)) > 0
    image_doc_mask = seg_has_image[seg_of]
    if n < s:
        image_doc_mask[n:] = False

    n_patches = int(np.count_nonzero(tokens[:n] == vocab.vision_patch))
    patch_list = [seg[2] for seg in segments if len(seg[2])]
    patches = np.concatenate(patch_list)[:n_patches] if patch_list else np.zeros((0, PATCH_DIM), np.uint8)
    if patches.shape[0] != n_patches:
        raise ValueError(f"pack holds {patches.shape[0]} patches for {n_patches} <vpatch> tokens")
    coord_list = [seg[3] if len(seg) > 3 else coords_from_tokens(seg[0], vocab) for seg in segments]
    coords = np.concatenate(coord_list)[:n_patches] if coord_list else np.zeros((0, 2), np.int64)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "doc_lengths": doc_lengths, "image_doc_mask": image_doc_mask,
            "patches": np.ascontiguousarray(patches), "patch_coords": np.ascontiguousarray(coords, dtype=np.int64)}
