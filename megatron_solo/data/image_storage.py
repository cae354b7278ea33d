"""Encoded image storage: images kept as encoded bytes, patches made when a sample is read.

``--image-storage patches`` writes ``P-patches`` (uint8, 3072 bytes per patch). ``--image-storage
encoded`` writes instead, with one IndexedDataset sequence per segment as for the other files:

    P-images    uint8   the encoded images of the segment, concatenated in ``<vpatch>`` order
    P-imageidx  int64   4 values per image of the segment: [n_bytes, flags, patch_start, patch_end]

``n_bytes`` is the length of the image's bytes in ``P-images`` (images follow each other, no
padding); ``flags`` bit 0 (:data:`FLAG_EXIF`) says to apply the EXIF orientation when decoding;
``patch_start:patch_end`` is the slice of the image's row-major patch grid that falls in this
segment (the whole grid unless packing split the document inside this image: then the image's
bytes are stored in both segments). A reader decodes each image with :func:`load_image` (EXIF per the
flag, RGB rules), resizes and patchifies it (:func:`image_to_patches`) and takes the slice: the
result is byte-identical to what ``patches`` storage holds for the same input.

What is stored: the original file's bytes for single-frame JPEG, PNG and WebP (their decoders are
deterministic, so decoding them again gives the same pixels); anything else (GIF, TIFF, BMP,
multi-frame files, ...) is stored as a lossless PNG of the RGB image after EXIF and mode rules
(flags 0).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np

from megatron_solo.data.image import PATCH_DIM, PATCH_SIZE, decode_image, image_to_patches, load_image, target_size
from megatron_solo.data.patch_coords import grid_coords

IMAGE_STORAGES = ("patches", "encoded")
FLAG_EXIF = 1
KEPT_FORMATS = ("JPEG", "PNG", "WEBP")  # single frame: stored as the original bytes
IDX_FIELDS = 4


@dataclass(frozen=True)
class ImageRef:
    """Patches ``start:end`` of one stored image (``data`` is what goes to ``P-images``)."""

    data: bytes
    flags: int
    start: int
    end: int

    def __reduce_ex__(self, protocol):
        # protocol 5: the bytes may travel out of band (preprocessing workers -> writer, no copy)
        data = pickle.PickleBuffer(self.data) if protocol >= 5 else self.data
        return ImageRef, (data, self.flags, self.start, self.end)


class ImageRefs:
    """A document's (or segment's) patches by reference: behaves like the ``[n, 3072]`` patch
    array where :class:`~megatron_solo.data.indexed.Packer` slices it (``len``, ``[a:b]``)."""

    def __init__(self, refs=()):
        self.refs = [r for r in refs if r.end > r.start]

    def __len__(self) -> int:
        return sum(r.end - r.start for r in self.refs)

    @property
    def shape(self):
        return (len(self), PATCH_DIM)

    def __getitem__(self, s: slice) -> "ImageRefs":
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("ImageRefs supports [a:b] slices only")
        a, b, _ = s.indices(len(self))
        out, pos = [], 0
        for r in self.refs:
            n = r.end - r.start
            lo, hi = max(a - pos, 0), min(b - pos, n)
            if hi > lo:
                out.append(ImageRef(r.data, r.flags, r.start + lo, r.start + hi))
            pos += n
        return ImageRefs(out)

    @staticmethod
    def concat(parts) -> "ImageRefs":
        return ImageRefs([r for p in parts for r in p.refs])

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(``P-images`` item uint8, ``P-imageidx`` item int64 [4 * n_images])."""
        data = np.frombuffer(b"".join(r.data for r in self.refs), dtype=np.uint8)
        idx = np.array([(len(r.data), r.flags, r.start, r.end) for r in self.refs], dtype=np.int64).reshape(-1)
        return data, idx


def store_image(data: bytes, *, exif_transpose: bool, max_image_pixels) -> tuple[ImageRefs, int, int]:
    """Validate (full decode) one image; return its whole-grid reference and (n_rows, n_cols)."""
    img, fmt, frames = decode_image(data, exif_transpose=exif_transpose, max_image_pixels=max_image_pixels)
    w, h = target_size(*img.size)
    n_rows, n_cols = h // PATCH_SIZE, w // PATCH_SIZE
    if fmt in KEPT_FORMATS and frames == 1:
        stored, flags = bytes(data), (FLAG_EXIF if exif_transpose else 0)
    else:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        stored, flags = buf.getvalue(), 0
    return ImageRefs([ImageRef(stored, flags, 0, n_rows * n_cols)]), n_rows, n_cols


def decode_patches(data, flags: int, start: int, end: int) -> tuple[np.ndarray, int]:
    """One stored image -> its patches ``start:end`` (uint8 [end - start, 3072]) and its grid's width."""
    img = load_image(bytes(data), exif_transpose=bool(flags & FLAG_EXIF), max_image_pixels=None)
    patches, _, n_cols = image_to_patches(img)
    if end > patches.shape[0]:
        raise ValueError(f"stored image has {patches.shape[0]} patches, the index asks for {start}:{end}")
    return patches[start:end], n_cols


def decode_segment(images: np.ndarray, idx: np.ndarray, n_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_patches`` patches of one segment from its ``P-images`` and ``P-imageidx`` items
    (images past those patches are not decoded), and their (row, col) in their images (int64 [n, 2],
    :func:`~megatron_solo.data.patch_coords.grid_coords`)."""
    rows = np.asarray(idx, dtype=np.int64).reshape(-1, IDX_FIELDS)
    out, coords, have, offset = [], [], 0, 0
    for n_bytes, flags, start, end in rows.tolist():
        if have >= n_patches:
            break
        take = min(end - start, n_patches - have)
        p, n_cols = decode_patches(images[offset:offset + n_bytes], flags, start, start + take)
        out.append(p)
        coords.append(grid_coords(start, start + take, n_cols))
        have += take
        offset += n_bytes
    if have < n_patches:
        raise ValueError(f"segment stores {have} patches, {n_patches} were asked for")
    if not out:
        return np.zeros((0, PATCH_DIM), np.uint8), np.zeros((0, 2), np.int64)
    return np.concatenate(out), np.concatenate(coords)
