"""The two image choices of the SOLO line, as pure torch functions of a batch's tokens.

``image_attention`` (SoloModelArgs):

* ``causal`` (SOLO): every token sees the tokens before it in its own document.
* ``bidirectional`` (SAIL, NEO's block-causal): in addition, every token of one *image block* sees every
  token of the same block. A block runs from ``<vision>`` to ``</vision>``, markers included, inside
  one document segment; a video clip (frames separated by ``<vframe_sep>``) is one block. When a pack
  cuts an image, the block is the part present in the segment. All other attention stays causal and
  packed documents still never see each other.

``image_positions``:

* ``1d`` (SOLO): one RoPE position per token, restarting at 0 for each packed document.
* ``mrope``: megatron-core's multimodal RoPE (three components: temporal, row, column; Qwen2-VL's
  scheme, ``mrope_section`` channels each). Text tokens, ``<vision>`` and ``</vision>`` included,
  advance all three together. The tokens inside a block (``<vpatch>``, ``<vrow_sep>``,
  ``<vframe_sep>``) all start from the same position ``st`` (one past ``<vision>``'s): a patch at
  (row r, column c) of frame f (0 for an image) is ``(st + f, st + r, st + c)``; a separator takes the
  frame and row of the patch before it and the column after it (a ``<vrow_sep>`` sits one column
  right of its row's last patch; a separator with no patch before it in its segment takes (0, 0, 0)).
  The token after the block continues at ``st + max(f, r, c) + 1`` over the block. Positions restart
  per packed document; a document without images gets exactly its 1d positions on all three.

The (row, col) of every patch come with the batch (``patch_coords``, int64 [n, 2], in ``<vpatch>``
order): without row separators the grid cannot be recovered from the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_solo.spec import (  # noqa: F401 (the choices are re-exported: the model's names for them)
    IMAGE_ATTENTION_CHOICES,
    IMAGE_POSITIONS_CHOICES,
    SOLO_SPECIAL_PIECES,
    VISION_END,
    VISION_FRAME_SEP,
    VISION_PATCH,
    VISION_ROW_SEP,
    VISION_START,
    mrope_section,
)


@dataclass(frozen=True)
class ImageTokens:
    """The ids of the image layout's pieces in one SOLO vocabulary."""

    start: int
    patch: int
    row_sep: int
    frame_sep: int
    end: int

    @classmethod
    def from_patch_id(cls, vision_patch_id: int) -> "ImageTokens":
        """SOLO's vision pieces are consecutive in SOLO's order over every base (none is reused from a
        base: ``SoloVocab.over_base``), so ``<vpatch>``'s id gives the others."""
        at = SOLO_SPECIAL_PIECES.index
        base = vision_patch_id - at(VISION_PATCH)
        return cls(start=base + at(VISION_START), patch=vision_patch_id, row_sep=base + at(VISION_ROW_SEP),
                   frame_sep=base + at(VISION_FRAME_SEP), end=base + at(VISION_END))

    def layout_ids(self) -> torch.Tensor:
        return torch.tensor([self.start, self.patch, self.row_sep, self.frame_sep, self.end])


def _shift_right(x: torch.Tensor, fill) -> torch.Tensor:
    """x[:, i - 1] at i, ``fill`` at 0."""
    return torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], dim=1)


def _segment_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> the index of the first token of each token's segment (run of equal ``doc_ids``)."""
    i = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(doc_ids)
    first = doc_ids != _shift_right(doc_ids, -1)
    return torch.cummax(torch.where(first, i, torch.zeros_like(i)), dim=1).values


def image_block_ids(tokens: torch.Tensor, doc_ids: torch.Tensor, ids: ImageTokens) -> torch.Tensor:
    """[b, s] int64: 0 for a token outside images, else a number >= 1 shared by the tokens of one image
    block (from ``<vision>`` to ``</vision>``, within one segment of ``doc_ids``) and by no other block of
    its row."""
    is_img = torch.isin(tokens, ids.layout_ids().to(tokens.device))
    prev_tok = _shift_right(tokens, -1)
    first = is_img & (~_shift_right(is_img, False) | (doc_ids != _shift_right(doc_ids, -1))
                      | (tokens == ids.start) | (prev_tok == ids.end))
    return torch.cumsum(first.long(), dim=1) * is_img.long()


def attention_allowed(doc_ids: torch.Tensor, block_ids: torch.Tensor | None = None,
                      window_left: int | None = None, q_offset: int = 0) -> torch.Tensor:
    """The rule as a dense bool [b, sq, sk] (True = may attend): same document and causal (within the
    sliding window: ``q - k <= window_left``), or the same image block (``block_ids``, bidirectional).
    Queries are the last ``sq = sk - q_offset`` positions."""
    sk = doc_ids.size(1)
    q = torch.arange(q_offset, sk, device=doc_ids.device)[:, None]
    k = torch.arange(sk, device=doc_ids.device)[None, :]
    causal = k <= q
    if window_left is not None:  # (k >= q - w: bool [sq, sk] only, no int64 difference of that size)
        causal = causal & (k >= q - window_left)
    allowed = causal[None] & (doc_ids[:, q_offset:, None] == doc_ids[:, None, :])
    if block_ids is not None:
        bq = block_ids[:, q_offset:, None]
        allowed = allowed | ((bq == block_ids[:, None, :]) & (bq > 0))
    return allowed


def mrope_position_ids(tokens: torch.Tensor, patch_coords: torch.Tensor | None, doc_ids: torch.Tensor,
                       ids: ImageTokens) -> torch.Tensor:
    """[3, b, s] int64 (temporal, row, column) positions of the module docstring's rule.

    ``patch_coords``: int64 [n, 2], (row, col) of each ``<vpatch>`` in row-major [b, s] order (None when
    the batch has no patch); ``doc_ids`` [b, s]: positions restart where it changes."""
    b, s = tokens.shape
    dev = tokens.device
    is_patch = tokens == ids.patch
    is_frame_sep = tokens == ids.frame_sep
    inner = is_patch | (tokens == ids.row_sep) | is_frame_sep
    n = int(is_patch.sum())
    coords = torch.zeros(b, s, 2, dtype=torch.long, device=dev)
    if n:
        if patch_coords is None or tuple(patch_coords.shape) != (n, 2):
            got = None if patch_coords is None else tuple(patch_coords.shape)
            raise ValueError(f"image positions 'mrope' need patch_coords [{n}, 2] (the (row, col) of each of the "
                             f"batch's {n} <vpatch> tokens), got {got}")
        coords[is_patch] = patch_coords.to(dev).long()
    i = torch.arange(s, device=dev).expand(b, s)
    new_doc = doc_ids != _shift_right(doc_ids, -1)
    # Runs of inner tokens within one segment: the blocks (their interior).
    run_first = inner & (~_shift_right(inner, False) | new_doc)
    run_start = torch.cummax(torch.where(run_first, i, torch.zeros_like(i)), dim=1).values
    next_inner = torch.cat([inner[:, 1:] & ~new_doc[:, 1:], torch.zeros_like(inner[:, :1])], dim=1)
    run_last = inner & ~next_inner
    # Frame index: <vframe_sep> tokens before this one in its run.
    frames_before = torch.cumsum(is_frame_sep.long(), dim=1) - is_frame_sep.long()
    frame = frames_before - torch.gather(frames_before, 1, run_start)
    # A separator: the row of the last patch before it in its run, the column after it.
    last_patch = torch.cummax(torch.where(is_patch, i, torch.full_like(i, -1)), dim=1).values
    has_patch = (last_patch >= run_start) & inner & ~is_patch
    lp = last_patch.clamp(min=0)
    sep_row = torch.where(has_patch, torch.gather(coords[..., 0], 1, lp), 0)
    sep_col = torch.where(has_patch, torch.gather(coords[..., 1], 1, lp) + 1, 0)
    row = torch.where(is_patch, coords[..., 0], sep_row) * inner
    col = torch.where(is_patch, coords[..., 1], sep_col) * inner
    frame = frame * inner
    # Each block advances the text count by its extent, at its last token; a text token by 1.
    extent = torch.zeros(b * s, dtype=torch.long, device=dev)
    key = (torch.arange(b, device=dev)[:, None] * s + run_start).reshape(-1)
    top = torch.maximum(torch.maximum(frame, row), col).reshape(-1)
    extent = extent.scatter_reduce(0, key[inner.reshape(-1)], top[inner.reshape(-1)], reduce="amax")
    run_extent = extent[key].reshape(b, s) + 1
    advance = torch.where(inner, torch.where(run_last, run_extent, 0), 1)
    before = torch.cumsum(advance, dim=1) - advance
    seg_start = torch.cummax(torch.where(new_doc, i, torch.zeros_like(i)), dim=1).values
    base = before - torch.gather(before, 1, seg_start)
    return torch.stack([base + frame, base + row, base + col])


def patch_coords_from_row_separators(tokens: torch.Tensor, ids: ImageTokens) -> torch.Tensor:
    """(row, col) of each ``<vpatch>`` in row-major [b, s] order, read from SOLO's row-separator layout
    (a row ends at ``<vrow_sep>``, an image or frame at ``</vision>`` / ``<vframe_sep>``). Only for data laid
    out with row separators (the verification batch of a conversion); without them the grid is not in
    the tokens."""
    coords, row, col = [], 0, 0
    for t in tokens.reshape(-1).tolist():
        if t == ids.patch:
            coords.append((row, col))
            col += 1
        elif t == ids.row_sep:
            row, col = row + 1, 0
        elif t in (ids.start, ids.end, ids.frame_sep):
            row, col = 0, 0
    return torch.tensor(coords, dtype=torch.long).reshape(-1, 2)
