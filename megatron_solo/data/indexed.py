"""Writing and reading one SOLO dataset prefix: ``P-tokens`` (int32), ``P-roles`` (uint8),
``P-patches`` (uint8, 3072 bytes per patch), three megatron-core indexed datasets.

One IndexedDataset *sequence* is one document segment (a whole document, or the part of a split
document that fell into one pack); the three files hold the same number of sequences in the same
order. megatron's ``document_indices`` group the sequences into *packs* (training samples). The
patches sequence of a segment holds that segment's patches in ``<vpatch>`` order.

Writes are atomic: data go to ``*.tmp`` names and are renamed by :func:`publish_prefix` (at
:meth:`SoloPrefixWriter.finalize`, and by merges), ``.bin`` files first, then ``P.stats.json``, then the ``.idx`` files. A prefix is complete when
all three ``.idx`` files exist (:func:`prefix_complete`).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from megatron_solo.data.image_storage import decode_segment
from megatron_solo.data.index_file import IndexFile
from megatron_solo.data.patch_coords import coords_from_tokens, end_state, starts_inside_image
from megatron_solo.data.stats import prefix_row_separator, prefix_vocab
from megatron_solo.errors import InputError
from megatron_solo.spec import MISTRAL_VOCAB, PATCH_DIM, SoloVocab, vocab_mismatch

SUFFIXES = ("tokens", "roles", "patches")
DTYPES = {"tokens": np.int32, "roles": np.uint8, "patches": np.uint8, "images": np.uint8, "imageidx": np.int64}
# --image-storage encoded keeps encoded images instead of patches (megatron_solo.data.image_storage)
STORAGE_SUFFIXES = {"patches": SUFFIXES, "encoded": ("tokens", "roles", "images", "imageidx")}

try:
    from megatron_solo._C import IndexWriter as _CppIndexWriter
except ImportError:  # pragma: no cover
    _CppIndexWriter = None


def component_prefix(prefix: str, name: str) -> str:
    return f"{prefix}-{name}"


def prefix_storage(prefix: str) -> str:
    """"encoded" when the prefix has ``P-images.idx``, else "patches"."""
    return "encoded" if os.path.isfile(component_prefix(prefix, "images") + ".idx") else "patches"


def prefix_complete(prefix: str) -> bool:
    """A prefix is complete when the ``.idx`` and ``.bin`` of all its datasets exist."""
    return all(
        os.path.isfile(component_prefix(prefix, n) + ".idx") and os.path.isfile(component_prefix(prefix, n) + ".bin")
        for n in STORAGE_SUFFIXES[prefix_storage(prefix)]
    )


def remove_prefix(prefix: str) -> None:
    """Delete a prefix's files (``.idx`` first, so it stops looking complete before anything else)."""
    for ext in (".idx", ".bin"):
        for n in DTYPES:
            for p in (component_prefix(prefix, n) + ext, component_prefix(prefix, n) + ext + ".tmp"):
                if os.path.exists(p):
                    os.remove(p)
    for p in (prefix + ".stats.json", prefix + ".stats.json.tmp"):
        if os.path.exists(p):
            os.remove(p)


def publish_prefix(prefix: str, stats: dict | None = None, suffixes: tuple = SUFFIXES) -> None:
    """Move a prefix written under ``*.tmp`` names into place, in the one order that keeps it atomic:
    the ``.bin`` files, then ``P.stats.json`` (written here), then the ``.idx`` files, ``tokens`` last,
    so that a reader never sees an ``.idx`` (a complete-looking prefix) before its data and stats."""
    for n in suffixes:
        base = component_prefix(prefix, n)
        os.replace(base + ".bin.tmp", base + ".bin")
    if stats is not None:
        tmp = prefix + ".stats.json.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, prefix + ".stats.json")
    for n in reversed(suffixes):
        base = component_prefix(prefix, n)
        os.replace(base + ".idx.tmp", base + ".idx")


class PythonIndexWriter:
    """megatron-core's ``IndexedDatasetBuilder`` behind the C++ writer's interface."""

    def __init__(self, bin_path: str, dtype):
        import torch  # noqa: F401  (the builder takes tensors)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self._b = IndexedDatasetBuilder(bin_path, dtype=dtype)

    def add_item(self, array: np.ndarray) -> None:
        import torch

        self._b.add_item(torch.from_numpy(np.ascontiguousarray(array)))

    def end_document(self) -> None:
        self._b.end_document()

    def finalize(self, idx_path: str) -> None:
        self._b.finalize(idx_path)


def make_index_writer(bin_path: str, dtype, use_cpp: bool = True):
    """The C++ buffered writer (byte-identical to megatron's builder) or megatron's builder itself."""
    if use_cpp and _CppIndexWriter is not None:
        return _CppIndexWriter(bin_path, np.dtype(dtype).str)
    return PythonIndexWriter(bin_path, dtype)


class SoloPrefixWriter:
    """Writes segments and pack boundaries to the three datasets of a prefix, atomically."""

    def __init__(self, prefix: str, use_cpp: bool = True, image_storage: str = "patches",
                 vocab: SoloVocab = MISTRAL_VOCAB):
        self.vision_patch = vocab.vision_patch  # the <vpatch> id that counts a segment's patches
        self.prefix = prefix
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        self.suffixes = STORAGE_SUFFIXES[image_storage]
        self._writers = {
            n: make_index_writer(component_prefix(prefix, n) + ".bin.tmp", DTYPES[n], use_cpp) for n in self.suffixes
        }
        self.n_segments = 0
        self.n_packs = 0
        self.n_tokens = 0
        self.n_patches = 0
        self.image_bytes = 0  # bytes written to P-patches or P-images + P-imageidx
        self._open_pack = False
        self._done = False

    def add_segment(self, tokens: np.ndarray, roles: np.ndarray, patches: np.ndarray) -> None:
        assert len(tokens) == len(roles) and len(tokens) > 0
        assert patches.shape[1] == PATCH_DIM
        n_vpatch = int(np.count_nonzero(tokens == self.vision_patch))
        assert n_vpatch == patches.shape[0], (n_vpatch, patches.shape)
        self._writers["tokens"].add_item(np.ascontiguousarray(tokens, dtype=np.int32))
        self._writers["roles"].add_item(np.ascontiguousarray(roles, dtype=np.uint8))
        if "images" in self._writers:  # encoded storage: patches is an ImageRefs
            data, idx = patches.to_arrays()
            self._writers["images"].add_item(data)
            self._writers["imageidx"].add_item(idx)
            self.image_bytes += data.nbytes + idx.nbytes
        else:
            self._writers["patches"].add_item(np.ascontiguousarray(patches, dtype=np.uint8).reshape(-1))
            self.image_bytes += patches.shape[0] * PATCH_DIM
        self.n_segments += 1
        self.n_tokens += len(tokens)
        self.n_patches += patches.shape[0]
        self._open_pack = True

    def end_pack(self) -> None:
        if not self._open_pack:
            return
        for w in self._writers.values():
            w.end_document()
        self.n_packs += 1
        self._open_pack = False

    def finalize(self, stats: dict | None = None) -> None:
        """Close the pack, write the indices and rename everything into place (bins, stats, idx)."""
        self.end_pack()
        for n, w in self._writers.items():
            w.finalize(component_prefix(self.prefix, n) + ".idx.tmp")
        publish_prefix(self.prefix, stats, self.suffixes)
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far (temp files only: nothing was renamed yet)."""
        for n, w in self._writers.items():
            try:
                w.finalize(component_prefix(self.prefix, n) + ".idx.tmp")
            except Exception:
                pass
        for n in self.suffixes:
            for ext in (".bin.tmp", ".idx.tmp"):
                p = component_prefix(self.prefix, n) + ext
                if os.path.exists(p):
                    os.remove(p)


def pack_segments(doc_length: int, used: int, seq_length: int | None):
    """Greedy packing (SOLO's packing rule, docs/DATA_FORMAT.md) of one document into the open pack.

    ``used`` tokens are already in the open pack. Yields ``(start, end, close_pack_after)`` slices of
    the document; a document that does not fit in what is left of the open pack starts a new pack
    (the open one is closed first: a ``(0, 0, True)`` item), a document longer than ``seq_length``
    is split into ``seq_length`` pieces and its remainder starts the next pack, which later
    documents join. Without ``seq_length`` every document is its own pack.
    """
    if seq_length is None:
        yield 0, doc_length, True
        return
    if used and used + doc_length > seq_length:
        yield 0, 0, True
        used = 0
    pos = 0
    while doc_length - pos > seq_length - used:
        take = seq_length - used
        yield pos, pos + take, True
        pos += take
        used = 0
    end_used = used + doc_length - pos
    yield pos, doc_length, end_used == seq_length


class Packer:
    """Feeds encoded documents to a :class:`SoloPrefixWriter`, packing them greedily."""

    def __init__(self, writer: SoloPrefixWriter, seq_length: int | None):
        self.writer = writer
        self.seq_length = seq_length
        self.used = 0

    def add(self, tokens: np.ndarray, roles: np.ndarray, patches: np.ndarray) -> None:
        is_patch = tokens == self.writer.vision_patch
        patch_before = np.concatenate(([0], np.cumsum(is_patch))) if len(patches) else None
        for start, end, close in pack_segments(len(tokens), self.used, self.seq_length):
            if end > start:
                if patch_before is not None:
                    p = patches[patch_before[start]:patch_before[end]]
                else:
                    p = patches
                self.writer.add_segment(tokens[start:end], roles[start:end], p)
                self.used += end - start
            if close:
                self.writer.end_pack()
                self.used = 0

    def close(self) -> None:
        self.writer.end_pack()
        self.used = 0


@dataclass
class SoloIndexedDataset:
    """The three IndexedDatasets of a prefix, read with megatron-core's reader.

    ``len()`` is the number of packs; :meth:`pack` returns one pack's segments. ``reader="numpy"`` reads the
    same files with :class:`~megatron_solo.data.index_file.IndexFile` instead (no torch, no megatron-core:
    the inspection tools answer in about a second); training keeps megatron-core's reader.
    """

    prefix: str
    mmap: bool = True
    reader: str = "megatron-core"

    def __post_init__(self):
        if self.reader == "numpy":
            IndexedDataset = IndexFile
        elif self.reader == "megatron-core":
            # imported here: writing a prefix (preprocessing, its workers) never loads megatron-core and torch
            from megatron.core.datasets.indexed_dataset import IndexedDataset
        else:
            raise ValueError(f"reader must be 'megatron-core' or 'numpy', not {self.reader!r}")

        self.tokens = IndexedDataset(component_prefix(self.prefix, "tokens"), mmap=self.mmap)
        self.roles = IndexedDataset(component_prefix(self.prefix, "roles"), mmap=self.mmap)
        self.storage = prefix_storage(self.prefix)
        self.vocab = prefix_vocab(self.prefix)  # the ids its tokenizer gave (Mistral's for older prefixes)
        self.row_separator = prefix_row_separator(self.prefix)  # its image layout (SOLO's for older prefixes)
        others = []
        for name in STORAGE_SUFFIXES[self.storage][2:]:
            pp = component_prefix(self.prefix, name)
            # numpy cannot mmap an empty file: a text-only prefix has an empty P-patches.bin
            empty = os.path.getsize(pp + ".bin") == 0
            others.append(IndexedDataset(pp, mmap=self.mmap and not empty))
        if self.storage == "encoded":
            self.images, self.imageidx = others
        else:
            (self.patches,) = others
        n = len(self.tokens)
        if not all(len(d) == n for d in [self.roles, *others]):
            raise ValueError(f"{self.prefix}: the datasets disagree on the number of segments")
        if not all(np.array_equal(self.tokens.document_indices, d.document_indices) for d in [self.roles, *others]):
            raise ValueError(f"{self.prefix}: the datasets disagree on pack boundaries")
        self.pack_bounds = np.asarray(self.tokens.document_indices, dtype=np.int64)
        self.segment_lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pack_bounds) - 1

    def pack_length(self, i: int) -> int:
        a, b = self.pack_bounds[i], self.pack_bounds[i + 1]
        return int(self.segment_lengths[a:b].sum())

    def pack(self, i: int, max_tokens: int | None = None, with_coords: bool = False):
        """Segments of pack ``i``: list of (tokens int32, roles uint8, patches uint8 [n, 3072]).

        With ``max_tokens``, reading stops after that many tokens, and only the patches of the
        ``<vpatch>`` tokens that were read are returned. ``with_coords``: each segment also has its
        patches' (row, col) in their images, int64 [n, 2] (:mod:`megatron_solo.data.patch_coords`).
        """
        a, b = int(self.pack_bounds[i]), int(self.pack_bounds[i + 1])
        out = []
        left = max_tokens
        for s in range(a, b):
            length = int(self.segment_lengths[s])
            if left is not None:
                if left <= 0:
                    break
                length = min(length, left)
                left -= length
            # copies: megatron's reader returns views into an mmap that closes with the dataset
            t = np.array(self.tokens.get(s, 0, length))
            r = np.array(self.roles.get(s, 0, length))
            n_p = int(np.count_nonzero(t == self.vocab.vision_patch))
            c = np.zeros((0, 2), np.int64)
            if n_p and self.storage == "encoded":  # decoded here: in the DataLoader's worker processes
                p, c = decode_segment(self.images[s], self.imageidx[s], n_p)
            elif n_p:
                p = np.array(self.patches.get(s, 0, n_p * PATCH_DIM)).reshape(n_p, PATCH_DIM)
                if with_coords:
                    c = self._coords_from_tokens(s, t)
            else:
                p = np.zeros((0, PATCH_DIM), np.uint8)
            out.append((t, r, p, c) if with_coords else (t, r, p))
        return out

    def _coords_from_tokens(self, s: int, tokens: np.ndarray) -> np.ndarray:
        """Patch coordinates of segment ``s`` (``patches`` storage) from its tokens; a segment that starts
        inside an image continues the count of the document's segments before it, back to the image's
        ``<vision>``."""
        if not self.row_separator:
            raise ValueError(f"{self.prefix}: images without row separators in patches storage: their grids are "
                             "not stored; preprocess with --image-storage encoded")
        start = (0, 0)
        if starts_inside_image(tokens, self.vocab):
            chain, j = [], s - 1
            while j >= 0:
                prev = np.array(self.tokens[j])
                chain.append(prev)
                if np.isin(prev, (self.vocab.vision_start, self.vocab.vision_frame_sep)).any():
                    break
                j -= 1
            for prev in reversed(chain):
                start = end_state(prev, self.vocab, start) or (0, 0)
        return coords_from_tokens(tokens, self.vocab, start)


# ------------------------------------------------------------------------------ checking a prefix
TOKEN_SAMPLE_BYTES = 1 << 20  # per window; three windows (start, middle, end) of each P-tokens.bin, read by
                              # every rank (one read per node from the page cache)


def _index_end(ds, itemsize: int) -> int:
    """The .bin length an index describes: its last sequence's pointer plus its length."""
    if len(ds.sequence_lengths) == 0:
        return 0
    return int(ds.sequence_pointers[-1]) + int(ds.sequence_lengths[-1]) * itemsize


def sampled_token_id_range(bin_path: str, window_bytes: int = TOKEN_SAMPLE_BYTES) -> tuple[int, int]:
    """(smallest, largest) int32 id in three windows (start, middle, end) of a tokens ``.bin``; all of
    it when it is smaller than the three windows.

    A full scan costs one pass over the data (hours at pre-training scale); ids of a foreign tokenizer
    (the usual mistake) are spread over the whole range, so three windows catch them. An id beyond the
    vocabulary in an unsampled place is still refused when read (by the model's embedding).
    """
    n = os.path.getsize(bin_path) // 4
    w = max(window_bytes // 4, 1)
    windows = [(0, n)] if n <= 3 * w else [(0, w), ((n - w) // 2, w), (n - w, w)]
    lo, hi = 0, -1
    with open(bin_path, "rb") as f:
        for start, count in windows:
            f.seek(4 * start)
            a = np.fromfile(f, dtype=np.int32, count=count)
            if a.size:
                lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    return lo, hi


_FILE_OF_PREFIX = re.compile(r"(-(%s)(\.(bin|idx))?|\.stats\.json)$" % "|".join(DTYPES))


def complete_prefixes_in(directory: str) -> list[str]:
    """The complete prefixes of ``directory`` (each has its ``P-tokens.idx``), sorted."""
    found = (p[: -len("-tokens.idx")] for p in glob.glob(os.path.join(glob.escape(directory), "*-tokens.idx")))
    return sorted(p for p in found if prefix_complete(p))


def no_such_prefix_message(prefix: str, flag: str = "--data-path") -> str:
    """One line for a prefix of which no file exists, naming the change: a file of a dataset given for its
    prefix (drop the suffix), a near miss among the prefixes in its directory (did you mean), else how one
    is written."""
    stem = _FILE_OF_PREFIX.sub("", prefix)
    if stem != prefix and prefix_complete(stem):
        return (f"{flag} {prefix} is one file of the dataset {stem}; give the prefix: drop "
                f"'{prefix[len(stem):]}' ({flag} {stem})")
    if os.path.isdir(prefix):
        present = complete_prefixes_in(prefix)
        return (f"{flag} {prefix} is a directory; give a dataset prefix in it ("
                + (f"{', '.join(present[:3])}{', ...' if len(present) > 3 else ''})" if present
                   else "none is there: tools/preprocess_data.py --output-prefix DIR/NAME writes one)"))
    directory = os.path.dirname(prefix) or "."
    write = f"write it with tools/preprocess_data.py --output-prefix {prefix}"
    if not os.path.isdir(directory):
        return f"{flag} {prefix}: the directory {directory} does not exist; {write}"
    present = complete_prefixes_in(directory)
    said = f"{flag} {prefix}: no dataset has this prefix (no {os.path.basename(prefix)}-tokens.idx in {directory})"
    if not present:
        return f"{said}, and none is there; {write}"
    close = difflib.get_close_matches(os.path.basename(prefix), [os.path.basename(p) for p in present], n=1)
    if close:
        return f"{said}; did you mean {os.path.join(directory, close[0])}?"
    shown = ", ".join(os.path.basename(p) for p in present[:5]) + (f", ... ({len(present)} in all)"
                                                                 if len(present) > 5 else "")
    return f"{said}; the prefixes there are {shown}; or {write}"


def check_prefix_files(prefix: str, flag: str = "--data-path") -> None:
    """The first of :func:`check_prefix`'s checks, which needs nothing but the file system (the start-up's
    quick checks make it before torch loads): every file of the prefix is there; else one line saying what
    to give instead (:func:`no_such_prefix_message`) or which files are missing."""
    if not any(os.path.exists(component_prefix(prefix, n) + ext) for n in DTYPES for ext in (".idx", ".bin")):
        raise InputError(no_such_prefix_message(prefix, flag))
    names = STORAGE_SUFFIXES[prefix_storage(prefix)]  # tokens, roles + patches or images, imageidx
    missing = [component_prefix(prefix, n) + ext for n in names for ext in (".idx", ".bin")
               if not os.path.isfile(component_prefix(prefix, n) + ext)]
    if missing:  # some files of it are there: an interrupted or partly deleted prefix
        raise InputError(f"{flag} {prefix}: missing {', '.join(os.path.basename(m) for m in missing)} "
                         f"(write it again with tools/preprocess_data.py --output-prefix {prefix})")


def check_prefix(prefix: str, vocab_size: int, vocab: SoloVocab | None = None, flag: str = "--data-path") -> None:
    """The datasets of a prefix exist, their indices read with megatron-core's reader and agree with
    each other and with their ``.bin`` lengths, its ids were made with SOLO's vocabulary ``vocab`` (the
    model's, when known; :func:`~megatron_solo.data.stats.prefix_vocab`), and a sample of token ids lies
    in the vocabulary; raises
    :class:`~megatron_solo.errors.InputError` (one line) for the first problem. ``flag``: the flag that gave
    the prefix, named by the line (a launcher's pre-flight adds its variable). Training's start-up checks
    and the launchers' pre-flight call it before anything is built."""
    check_prefix_files(prefix, flag)
    names = STORAGE_SUFFIXES[prefix_storage(prefix)]  # tokens, roles + patches or images, imageidx
    from megatron.core.datasets.indexed_dataset import _IndexReader  # megatron-core loads only when read

    counts = {}
    for n in names:
        base = component_prefix(prefix, n)
        try:
            index = _IndexReader(base + ".idx", multimodal=False)
        except Exception as e:  # megatron-core asserts on a bad header: say which file
            raise InputError(f"{base}.idx is not a readable megatron-core index ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'bad header'}); re-run tools/preprocess_data.py") from None
        if index.dtype != DTYPES[n]:
            raise InputError(f"{base}.idx holds {np.dtype(index.dtype).name}, SOLO's {n} are "
                             f"{np.dtype(DTYPES[n]).name}; re-run tools/preprocess_data.py")
        want = _index_end(index, np.dtype(index.dtype).itemsize)
        have = os.path.getsize(base + ".bin")
        if have != want:
            raise InputError(f"{base}.bin has {have} bytes, its index describes {want} (truncated or from "
                             f"another run); re-run tools/preprocess_data.py for {prefix}")
        # Views into the memory-mapped index: the reader stays referenced here (its __del__ unmaps them).
        counts[n] = (len(index.sequence_lengths), index.document_indices, index)
    (n_tok, docs, _), others = counts["tokens"], [counts[n] for n in names if n != "tokens"]
    if any(n_o != n_tok or not np.array_equal(d, docs) for n_o, d, _ in others):
        raise InputError(f"data prefix {prefix}: its {', '.join(names)} datasets disagree on segments "
                         f"or packs (written by different runs); re-run tools/preprocess_data.py")
    problem = vocab and vocab_mismatch(prefix_vocab(prefix), vocab, f"data prefix {prefix}", "the model")
    if problem:
        raise InputError(f"{problem}; preprocess it with the model's tokenizer (tools/preprocess_data.py "
                         "--tokenizer-model)")
    lo, hi = sampled_token_id_range(component_prefix(prefix, "tokens") + ".bin")
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"{component_prefix(prefix, 'tokens')}.bin holds token id {hi if hi >= vocab_size else lo}, "
                         f"outside the {vocab_size}-piece SOLO vocabulary: it was preprocessed with another "
                         f"tokenizer; re-run tools/preprocess_data.py with SOLO's tokenizer.model")
