"""A read-only view of one megatron-core indexed dataset (``.idx`` + ``.bin``) with numpy alone.

Training reads prefixes with megatron-core's ``IndexedDataset``. Its module imports torch and, through the
``megatron.core`` package, tensor parallelism, Transformer Engine probes and torch's compiler: 5-8 s before
the first byte is read. The tools that only *look* at a prefix (``tools/inspect_data.py``,
``tools/visualize_patches.py``) should answer in about a second, so they read the same files with this
class: the same header checks, the same arrays, the same ``get``. ``tests/test_data_indexed.py`` reads every
sequence of real prefixes with both readers and asserts they are equal.

The format (megatron-core's ``_IndexReader``, version 1): the 9-byte header ``MMIDIDX\\0\\0``, the version
(uint64, 1), the dtype code (uint8), the sequence and document counts (uint64 each), then the sequence
lengths (int32), the sequence byte offsets into ``.bin`` (int64) and the document indices (int64).
"""

from __future__ import annotations

import os
import struct

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}


class IndexFile:
    """``IndexFile(path_prefix, mmap=True)``: the sequences of ``path_prefix.bin`` as its ``.idx`` lists
    them. Has the parts of megatron-core's ``IndexedDataset`` a reader uses: ``len``, ``[i]``,
    ``get(i, offset, length)``, ``sequence_lengths``, ``document_indices``."""

    def __init__(self, path_prefix: str, mmap: bool = True):
        idx = path_prefix + ".idx"
        with open(idx, "rb") as f:
            if f.read(9) != HEADER:
                raise ValueError(f"bad header, cannot read: {idx}")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise ValueError(f"bad version {version}, cannot read: {idx}")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in DTYPES:
                raise ValueError(f"unknown dtype code {code}: {idx}")
            self.dtype = np.dtype(DTYPES[code])
            n_seq, n_doc = struct.unpack("<QQ", f.read(16))
            offset = f.tell()
        raw = np.memmap(idx, mode="r") if mmap else np.fromfile(idx, np.uint8)
        self.sequence_lengths = np.frombuffer(raw, np.int32, n_seq, offset)
        self.sequence_pointers = np.frombuffer(raw, np.int64, n_seq, offset + 4 * n_seq)
        self.document_indices = np.frombuffer(raw, np.int64, n_doc, offset + 12 * n_seq)
        bin_path = path_prefix + ".bin"
        # numpy cannot mmap an empty file (a text-only prefix's images)
        if mmap and os.path.getsize(bin_path) > 0:
            self._bin = np.memmap(bin_path, mode="r")
        else:
            self._bin = np.fromfile(bin_path, np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements ``offset .. offset + length`` of sequence ``i`` (to its end without ``length``)."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)
