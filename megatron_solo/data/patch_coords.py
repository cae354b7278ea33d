"""Each patch's (row, col) inside its image: the micro-batch's ``patch_coords`` (int64 [n, 2]).

Aligned with ``patches`` (same order, same n); what 2D positions (``--image-positions mrope``) are made
from. Two sources, one per image storage, equal wherever both apply:

* ``--image-storage encoded``: the image's grid. ``P-imageidx`` gives the slice ``patch_start:patch_end``
  of the row-major grid held by a segment and decoding gives ``n_cols``: patch ``k`` of the slice is
  ``divmod(patch_start + k, n_cols)`` (:func:`grid_coords`). Either layout.
* ``--image-storage patches``: the tokens, laid out with row separators (docs/DATA_FORMAT.md "Token layout"): from the
  image's ``<vision>`` (or a video frame's ``<vframe_sep>``), the row is the number of ``<vrow_sep>`` seen and
  the column the number of ``<vpatch>`` since the last ``<vrow_sep>`` (:func:`coords_from_tokens`). A
  segment that starts inside an image (packing cut the image) continues the count where the document's
  previous segment ended (:func:`end_state`). Without separators the tokens do not hold the grid:
  preprocessing refuses ``--row-separator off`` with ``--image-storage patches``.
"""

from __future__ import annotations

import numpy as np

COORD_DTYPE = np.int64


def grid_coords(start: int, end: int, n_cols: int) -> np.ndarray:
    """(row, col) of patches ``start:end`` of a row-major grid ``n_cols`` wide (int64 [end - start, 2])."""
    k = np.arange(start, end, dtype=COORD_DTYPE)
    return np.stack((k // n_cols, k % n_cols), axis=1)


def _counts(tokens: np.ndarray, ids):
    idx = np.arange(len(tokens))
    reset = (tokens == ids.vision_start) | (tokens == ids.vision_frame_sep)  # an image (frame) starts
    sep = tokens == ids.vision_row_sep
    last_reset = np.maximum.accumulate(np.where(reset, idx, -1)) if len(tokens) else idx
    last_bound = np.maximum.accumulate(np.where(reset | sep, idx, -1)) if len(tokens) else idx
    return idx, reset, sep, last_reset, last_bound


def coords_from_tokens(tokens: np.ndarray, ids, start: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(row, col) of every ``<vpatch>`` of ``tokens`` laid out with row separators (int64 [n, 2]).

    ``start``: the (row, col) the first ``<vpatch>`` would take when ``tokens`` begin inside an image
    (:func:`end_state` of the segment before); unused when they do not."""
    tokens = np.asarray(tokens)
    is_patch = tokens == ids.vision_patch
    if not is_patch.any():
        return np.zeros((0, 2), COORD_DTYPE)
    _, _, sep, last_reset, last_bound = _counts(tokens, ids)
    n_sep = np.cumsum(sep)  # inclusive counts
    n_patch = np.cumsum(is_patch)
    safe_reset, safe_bound = np.maximum(last_reset, 0), np.maximum(last_bound, 0)
    row = np.where(last_reset >= 0, n_sep - n_sep[safe_reset], start[0] + n_sep)
    col = np.where(last_bound >= 0, n_patch - 1 - n_patch[safe_bound],
                   start[1] + n_patch - 1)
    # past a row separator of a continued image (no <vision> yet): the column restarts, the row went on
    return np.stack((row[is_patch], col[is_patch]), axis=1).astype(COORD_DTYPE)


def starts_inside_image(tokens: np.ndarray, ids) -> bool:
    """Whether a segment's first image tokens continue an image of the segment before (a ``<vpatch>``,
    ``<vrow_sep>`` or ``</vision>`` before any ``<vision>``)."""
    tokens = np.asarray(tokens)
    vision = np.flatnonzero((tokens == ids.vision_start) | (tokens == ids.vision_patch)
                            | (tokens == ids.vision_row_sep) | (tokens == ids.vision_end)
                            | (tokens == ids.vision_frame_sep))
    return bool(len(vision)) and int(tokens[vision[0]]) != ids.vision_start


def end_state(tokens: np.ndarray, ids, start: tuple[int, int] = (0, 0)) -> tuple[int, int] | None:
    """The (row, col) the next ``<vpatch>`` takes after ``tokens`` when they end inside an image, else None.
    ``start``: as for :func:`coords_from_tokens`."""
    tokens = np.asarray(tokens)
    markers = np.flatnonzero((tokens == ids.vision_start) | (tokens == ids.vision_end))
    if len(markers) and int(tokens[markers[-1]]) == ids.vision_end:
        return None
    if not len(tokens):
        return start
    _, _, sep, last_reset, last_bound = _counts(tokens, ids)
    is_patch = tokens == ids.vision_patch
    r, b = int(last_reset[-1]), int(last_bound[-1])
    row = int(sep[r + 1:].sum()) if r >= 0 else start[0] + int(sep.sum())
    col = int(is_patch[b + 1:].sum()) if b >= 0 else start[1] + int(is_patch.sum())
    return row, col
