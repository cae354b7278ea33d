"""The preprocessing pipeline behind ``tools/preprocess_data.py``: the worker driver.

Records come from the input readers (:mod:`megatron_solo.data.readers`: chat JSONL, LLaVA JSON/JSONL,
WebDataset tar shards, plain or .gz/.lz4/.zst, and Parquet); each is encoded
(:mod:`megatron_solo.data.encode`) in K worker processes, packed (:class:`Packer`) and written to one
prefix atomically (:class:`SoloPrefixWriter`); with ``--shard-size``, to resumable shards
(:func:`preprocess_sharded`). Output order does not depend on K: records are encoded in
order-preserving chunks, so the same input gives byte-identical ``.bin``/``.idx`` files. Memory is
bounded: at most ``4 * K`` chunks are in flight. Merging prefixes: :mod:`megatron_solo.data.merge`.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

from megatron_solo.data.allocator import keep_freed_memory
from megatron_solo.data.chat_templates import TEMPLATES, missing_controls
from megatron_solo.data.encode import DocumentEncoder, EncodedDocument
from megatron_solo.data.errors import SKIP_REASONS, SkipRecord
from megatron_solo.data.image import DEFAULT_MAX_IMAGE_PIXELS
from megatron_solo.data.interleaved import BELOW_MIN_SIMILARITY, InterleavedOptions
from megatron_solo.data.indexed import Packer, SoloPrefixWriter, prefix_complete, remove_prefix
from megatron_solo.data.readers import iter_records, record_messages
from megatron_solo.data.shards import shard_list_path, shard_prefix
from megatron_solo.data.stats import PrefixStats
from megatron_solo.data import tokenizer as solo_tokenizer
from megatron_solo.data.worker_pool import OrderedWorkerPool
from megatron_solo.errors import InputError, UserError
from megatron_solo.spec import BASE_CHAT_PIECES, SoloVocab

logger = logging.getLogger("megatron_solo.preprocess")

CHUNK = 16
# An encoder worker is single-threaded (decoders, element-wise numpy): a BLAS thread pool started at
# numpy's import would only cost each worker ~0.07 s of CPU at start (measured, 2-core machine).
SINGLE_THREADED_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class PreprocessConfig:
    inputs: list
    output_prefix: str
    tokenizer_model: str
    fmt: str = "pretrain"
    seq_length: Optional[int] = None
    workers: int = 1
    image_root: Optional[str] = None
    exif_transpose: bool = True
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
    max_error_rate: float = 0.01
    overwrite: bool = False
    progress: bool = True
    use_cpp: bool = True
    chat_template: str = "chatml"
    allow_image_mismatch: bool = False
    image_storage: str = "encoded"  # or "patches" (megatron_solo.data.image_storage; docs/DATA_FORMAT.md: why)
    parquet: Optional[object] = None  # ParquetColumns: layout and column names for .parquet inputs
    interleaved: Optional[InterleavedOptions] = None  # --min-image-similarity, --image-url-map (web documents)
    shard_size: Optional[int] = None  # input records per shard PREFIX_00000, ... (megatron_solo.data.shards)
    vocab: Optional[SoloVocab] = None  # the tokenizer's, set by preprocess(); every prefix's stats keep it
    row_separator: bool = True  # --row-separator on (SOLO) | off (SAIL); every prefix's stats keep it


class TooManyErrors(UserError):
    """More records skipped than ``--max-error-rate`` allows (exit 1; no prefix is left)."""


class BadTokenizer(InputError, ValueError):
    """``--tokenizer-model`` is missing, not a tokenizer, or not SOLO's (checked before any work)."""


def check_tokenizer(path: str):
    """The one tokenizer check (:func:`megatron_solo.data.tokenizer.check_tokenizer`); returns the tokenizer."""
    try:
        return solo_tokenizer.check_tokenizer(path)
    except solo_tokenizer.TokenizerError as e:
        raise BadTokenizer(f"--tokenizer-model: {e}") from None


class InputNotFound(InputError):
    """An ``--input`` file that does not exist (checked before anything is started or written)."""


def check_layout(cfg: PreprocessConfig) -> None:
    """``--row-separator off`` needs ``--image-storage encoded``: without separators a patch's (row, col)
    comes from its image's grid, which only the encoded storage keeps (``P-patches`` holds pixels only)."""
    if not cfg.row_separator and cfg.image_storage != "encoded":
        raise InputError("--row-separator off needs --image-storage encoded (patches storage keeps no image "
                         "grids, and without row separators the tokens do not hold them either)")


# ------------------------------------------------------------------------------------- workers
_ENCODER: Optional[DocumentEncoder] = None
_INTERLEAVED = InterleavedOptions()


@dataclass
class EncodedRecord:
    """A worker's answer for one record: its encoded document, or why it was skipped."""

    document: Optional[EncodedDocument] = None
    skip_reason: Optional[str] = None
    skip_detail: str = ""
    images_dropped: tuple = ()  # reasons of an interleaved document's images left out (kept or skipped)


def _init_worker(tokenizer_model, fmt, image_root, exif_transpose, max_image_pixels, chat_template="chatml",
                 allow_image_mismatch=False, image_storage="patches", interleaved=None, row_separator=True):
    global _ENCODER, _INTERLEAVED
    _INTERLEAVED = interleaved or InterleavedOptions()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tok = solo_tokenizer.load_tokenizer(tokenizer_model)
    tok.check_solo_ids()
    _ENCODER = DocumentEncoder(tok, fmt, image_root=image_root, exif_transpose=exif_transpose,
                               max_image_pixels=max_image_pixels, chat_template=chat_template,
                               allow_image_mismatch=allow_image_mismatch, image_storage=image_storage,
                               row_separator=row_separator)


def _init_worker_process(*init_args):
    """A pool worker's start: its own process, so it may set process-wide malloc thresholds."""
    keep_freed_memory()
    _init_worker(*init_args)


def encode_record(record) -> EncodedRecord:
    """One ``(where, kind, payload)`` record (:mod:`megatron_solo.data.readers`) -> its document, or its skip."""
    try:
        msgs = record_messages(record, _ENCODER.allow_image_mismatch, _INTERLEAVED)
        doc = _ENCODER.encode(msgs, record[0])
        return EncodedRecord(document=doc, images_dropped=doc.images_dropped)
    except SkipRecord as e:
        return EncodedRecord(skip_reason=e.reason, skip_detail=e.detail, images_dropped=e.images_dropped)


def _encode_chunk(chunk):
    return [encode_record(item) for item in chunk]


def _chunks(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _init_args(cfg: PreprocessConfig) -> tuple:
    return (cfg.tokenizer_model, cfg.fmt, cfg.image_root, cfg.exif_transpose, cfg.max_image_pixels,
            cfg.chat_template, cfg.allow_image_mismatch, cfg.image_storage, cfg.interleaved, cfg.row_separator)


def encoder_pool(cfg: PreprocessConfig):
    """The worker processes for ``cfg.workers`` > 1 (a context manager), else a null context: one
    pool serves every shard of a sharded run."""
    if cfg.workers <= 1:
        return contextlib.nullcontext()
    return OrderedWorkerPool(cfg.workers, _encode_chunk, _init_worker_process, _init_args(cfg), name="preprocess-worker",
                             env_defaults=SINGLE_THREADED_ENV)


def _ordered_results(records, cfg: PreprocessConfig, pool=None):
    """Yield (record, :class:`EncodedRecord`) in input order: in ``pool``'s workers, in chunks of CHUNK
    records (at most ``4 * workers`` chunks in flight), or in this process without a pool."""
    if pool is None:
        old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        _init_worker(*_init_args(cfg))
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
        for item in records:
            yield item, encode_record(item)
        return
    chunks = collections.deque()

    def tasks():
        for chunk in _chunks(records, CHUNK):
            chunks.append(chunk)
            yield chunk

    for results in pool.imap(tasks()):
        yield from zip(chunks.popleft(), results)


# ------------------------------------------------------------------------------------- driver
SHOWN_SKIPS_PER_REASON = 3  # a skipped record is logged up to this many times per reason, then only counted


def first_skip_hint(cfg: PreprocessConfig, where: str, res: EncodedRecord) -> str:
    """The part of the too-many-skips line that names the first skipped record and, for a missing image,
    the flag to change (forgetting ``--image-root`` skips every record with an image)."""
    said = f"; the first: {where}: {res.skip_reason}" + (f" ({res.skip_detail})" if res.skip_detail else "")
    if res.skip_reason != "missing_image_file":
        return said
    if cfg.image_root is None:
        return (f"{said}: relative image paths are read from the current directory; pass --image-root, the "
                f"directory they start from")
    return f"{said}: check --image-root {cfg.image_root}"


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def preprocess(cfg: PreprocessConfig, records=None) -> dict:
    """Run the pipeline; return the stats dict (also written to ``P.stats.json``).

    Returns ``{"skipped_existing": True}`` when the prefix is complete and ``overwrite`` is off.
    Raises :class:`TooManyErrors` (no prefix is left) when the skip rate exceeds ``max_error_rate``.
    With ``cfg.shard_size``, writes resumable shards (:func:`preprocess_sharded`).
    ``records``: the input records to encode (default: all of ``cfg.inputs``).
    """
    for p in cfg.inputs:
        if not os.path.isfile(p):
            raise InputNotFound(f"--input {p} does not exist")
    check_layout(cfg)
    # here, once: not as a traceback from every worker
    cfg = replace(cfg, vocab=check_tokenizer(cfg.tokenizer_model).vocab)
    missing = missing_controls(TEMPLATES[cfg.chat_template], cfg.vocab) if cfg.fmt == "chat" else []
    if missing:
        pieces = ", ".join(BASE_CHAT_PIECES.get(n, n) for n in missing)
        raise BadTokenizer(f"--chat-template {cfg.chat_template} places the base's own {pieces}, which the base of "
                           f"--tokenizer-model {cfg.tokenizer_model} does not have: choose another --chat-template "
                           f"(chatml) or a tokenizer of that base")
    if cfg.shard_size:
        with encoder_pool(cfg) as pool:
            return preprocess_sharded(cfg, pool)
    if prefix_complete(cfg.output_prefix) and not cfg.overwrite:
        logger.info("%s is complete; skipping (use --overwrite to rebuild)", cfg.output_prefix)
        return {"skipped_existing": True}
    with encoder_pool(cfg) as pool:
        return _preprocess_prefix(cfg, records, pool)


def _preprocess_prefix(cfg: PreprocessConfig, records=None, pool=None) -> dict:
    """Encode ``records`` (default: all of ``cfg.inputs``) into the prefix ``cfg.output_prefix``."""
    prefix = cfg.output_prefix
    remove_prefix(prefix)  # a stale incomplete prefix, or the old one with --overwrite
    t0 = time.time()
    stats = PrefixStats(vocab=cfg.vocab.to_dict(), row_separator=cfg.row_separator)
    writer = SoloPrefixWriter(prefix, use_cpp=cfg.use_cpp, image_storage=cfg.image_storage, vocab=cfg.vocab)
    packer = Packer(writer, cfg.seq_length)
    old_term = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _is_main_thread() else None
    bar = None
    first_skip = None  # (where, EncodedRecord) of the first record skipped: the error line names it
    try:
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(unit="doc", desc=os.path.basename(prefix), mininterval=1.0, file=sys.stderr)
        if records is None:
            records = iter_records(cfg.inputs, cfg.parquet, by_reference=pool is not None)
        for (where, _, _), res in _ordered_results(records, cfg, pool):
            stats.records += 1
            stats.drop_images(res.images_dropped)
            if res.document is None:
                stats.skip(res.skip_reason)
                first_skip = first_skip or (where, res)
                if stats.skipped[res.skip_reason] <= SHOWN_SKIPS_PER_REASON:
                    logger.warning("skip %s: %s%s%s", where, res.skip_reason,
                                   f" ({res.skip_detail})" if res.skip_detail else "",
                                   " (further skips for this reason are counted, not shown)"
                                   if stats.skipped[res.skip_reason] == SHOWN_SKIPS_PER_REASON else "")
                continue
            doc = res.document
            packer.add(doc.tokens, doc.roles, doc.patches)
            stats.documents += 1
            stats.images += doc.n_images
            stats.image_tokens += doc.n_image_tokens
            stats.documents_all_images_dropped += bool(doc.images_dropped) and not doc.n_images
            if bar is not None:
                bar.update(1)  # tqdm shows documents/s; images/s beside it
                if stats.documents % 32 == 0:
                    bar.set_postfix_str(f"{stats.images / max(time.time() - t0, 1e-9):.1f} images/s", refresh=False)
        packer.close()
        rate = stats.skipped_total / max(stats.records, 1)
        if stats.records == 0 or stats.documents == 0 or rate > cfg.max_error_rate:
            raise TooManyErrors(
                f"{stats.skipped_total} of {stats.records} records skipped ({rate:.2%} > --max-error-rate "
                f"{cfg.max_error_rate:.2%}); by reason: {json.dumps(stats.skipped, sort_keys=True)}"
                f"{first_skip_hint(cfg, *first_skip) if first_skip else ''}; no prefix written")
        # an interleaved document's unreadable images are left out, not the document: they have their own rate
        image_errors = {r: n for r, n in stats.images_dropped.items() if r != BELOW_MIN_SIMILARITY}
        image_rate = sum(image_errors.values()) / max(stats.images + sum(image_errors.values()), 1)
        if image_rate > cfg.max_error_rate:
            raise TooManyErrors(
                f"{sum(image_errors.values())} images of interleaved documents left out ({image_rate:.2%} > "
                f"--max-error-rate {cfg.max_error_rate:.2%}); by reason: {json.dumps(image_errors, sort_keys=True)}; "
                f"no prefix written")
        stats.count_written(writer)
        stats.time_s = round(time.time() - t0, 3)
        out = stats.as_dict()
        out.update(format=cfg.fmt, chat_template=cfg.chat_template if cfg.fmt == "chat" else None,
                   allow_image_placeholder_mismatch=cfg.allow_image_mismatch, seq_length=cfg.seq_length,
                   inputs=list(cfg.inputs), workers=cfg.workers,
                   exif_transpose=cfg.exif_transpose, skip_reasons=SKIP_REASONS)
        writer.finalize(out)
        return out
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _is_main_thread():
    return threading.current_thread() is threading.main_thread()


def preprocess_sharded(cfg: PreprocessConfig, pool=None) -> dict:
    """Write ``cfg.inputs`` as shards of ``cfg.shard_size`` input records (:mod:`megatron_solo.data.shards`),
    each an unsharded prefix; complete shards are read past, not encoded. Returns the summed stats
    (:meth:`PrefixStats.total`), with ``shards`` (the prefixes) and ``shards_skipped`` (complete ones)."""
    n = int(cfg.shard_size)
    listing = shard_list_path(cfg.output_prefix)
    if os.path.isfile(listing) and not cfg.overwrite:
        return {"skipped_existing": True}
    records = iter_records(cfg.inputs, cfg.parquet, cfg.workers > 1)
    shards, skipped, parts = [], 0, []
    for k in itertools.count():
        first = next(records, None)
        if first is None:
            break
        chunk = itertools.chain([first], itertools.islice(records, n - 1))
        prefix = shard_prefix(cfg.output_prefix, k)
        shards.append(prefix)
        if prefix_complete(prefix) and not cfg.overwrite:
            for _ in chunk:  # read past: already written by an earlier run
                pass
            skipped += 1
            with open(prefix + ".stats.json") as f:
                s = json.load(f)
        else:
            s = _preprocess_prefix(replace(cfg, output_prefix=prefix, shard_size=None), chunk, pool)
        parts.append(PrefixStats.from_dict(s))
    if not shards:
        raise ValueError("no input records")
    tmp = listing + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(os.path.basename(p) + "\n" for p in shards)
    os.replace(tmp, listing)
    return {**PrefixStats.total(parts).as_dict(), "shards": shards, "shards_skipped": skipped, "shard_size": n}
