"""The preprocessing pipeline behind ``tools/preprocess_data.py``.

Reads chat JSONL, LLaVA JSON/JSONL and WebDataset tar shards (plain, .gz, .lz4, .zst), encodes every
record (:mod:`megatron_solo.data.encode`) in K worker processes, packs (:class:`Packer`) and writes one
prefix atomically (:class:`SoloPrefixWriter`). Output order does not depend on K: records are
encoded in order-preserving chunks, so the same input gives byte-identical ``.bin``/``.idx`` files.
Memory is bounded: at most ``4 * K`` chunks are in flight.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import io
import json
import logging
import mmap
import os
import re
import signal
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from megatron_solo.data.encode import DocumentEncoder, Message, normalize_messages
from megatron_solo.data.errors import SKIP_REASONS, SkipRecord
from megatron_solo.data.image import DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger("megatron_solo.preprocess")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
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
    shard_size: Optional[int] = None  # input records per shard PREFIX_00000, ... (megatron_solo.data.shards)


class TooManyErrors(RuntimeError):
    pass


class BadTokenizer(ValueError):
    """``--tokenizer-model`` is missing, not a SentencePiece model, or not SOLO's (checked before any work)."""


def check_tokenizer(path: str) -> None:
    from megatron_solo.data.tokenizer import SoloTokenizer

    try:
        SoloTokenizer(path).check_solo_ids()
    except (OSError, RuntimeError, ValueError) as e:  # SentencePiece says RuntimeError/OSError on a bad file
        raise BadTokenizer(str(e).strip().splitlines()[-1]) from None


class InputNotFound(FileNotFoundError):
    """An ``--input`` file that does not exist (checked before anything is started or written)."""


# ------------------------------------------------------------------------------------- reading
def open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".lz4"):
        import lz4.frame

        return lz4.frame.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _base_ext(path: str) -> str:
    p = path
    for c in (".gz", ".lz4", ".zst"):
        if p.endswith(c):
            p = p[: -len(c)]
    return p.rsplit(".", 1)[-1].lower() if "." in os.path.basename(p) else ""


def iter_records(paths, parquet=None, by_reference=False) -> Iterator[tuple]:
    """Yield ``(where, kind, payload)``: kind "line" (a JSON text), "obj" (parsed JSON), "tar"
    (a dict ext -> bytes of one WebDataset sample), "parquet" (a row), "bad" (reason, detail) or,
    with ``by_reference``, "lineref" ((path, offset, length) of a line of an uncompressed file: the
    worker reads it, so the parent never copies a line with base64 images through a pipe)."""
    for path in paths:
        ext = _base_ext(path)
        if ext == "parquet":
            from megatron_solo.data.parquet_input import ParquetColumns, iter_parquet

            yield from iter_parquet(path, parquet or ParquetColumns())
        elif ext == "tar":
            yield from _iter_tar(path)
        elif ext == "json":
            with open_binary(path) as f:
                text = f.read().decode("utf-8", errors="replace")
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # maybe JSON lines after all
                yield from _iter_lines(path)
                continue
            items = data if isinstance(data, list) else [data]
            for i, obj in enumerate(items):
                yield f"{path}:[{i}]", "obj", obj
        else:  # jsonl and anything else: one JSON document per line
            yield from _iter_lines(path, by_reference)


_NON_SPACE = re.compile(rb"\S")
_RELEASE_SCANNED_BYTES = 64 << 20


def _iter_lines(path, by_reference=False):
    if not path.endswith((".gz", ".lz4", ".zst")):
        yield from _iter_lines_mapped(path, by_reference)
        return
    with open_binary(path) as f:
        for lineno, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
            if raw.strip():
                yield f"{path}:{lineno}", "line", raw


def _iter_lines_mapped(path, by_reference):
    """Lines of an uncompressed file, split on b"\\n", found with ``mmap.find``: by reference the
    parent never copies a line (lines carry base64 images: this scan was a tenth of its CPU). The
    pages already scanned are dropped from the mapping every 64 MiB, so the process's RSS does not
    grow with the file (RSS-based job limits would count a mapped 100 GB corpus)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos, lineno, released = 0, 0, 0
            while pos < size:
                if pos - released >= _RELEASE_SCANNED_BYTES:
                    upto = pos - pos % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_DONTNEED, released, upto - released)  # clean file pages: refetchable
                    released = upto
                end = mm.find(b"\n", pos)
                end = size if end < 0 else end + 1
                lineno += 1
                if _NON_SPACE.search(mm, pos, end):  # blank lines are not records
                    if by_reference:
                        yield f"{path}:{lineno}", "lineref", (path, pos, end - pos)
                    else:
                        yield f"{path}:{lineno}", "line", mm[pos:end]
                pos = end


def _iter_tar(path):
    with open_binary(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, sample, first = None, {}, None
        for member in tar:
            if not member.isfile():
                continue
            d, base = os.path.split(member.name)
            k, _, ext = base.partition(".")
            k = os.path.join(d, k)
            if k != key and sample:
                yield f"{path}:{first}", "tar", sample
                sample = {}
            if not sample:
                first = member.name
            key = k
            data = tar.extractfile(member).read()
            sample[ext.lower()] = data
        if sample:
            yield f"{path}:{first}", "tar", sample


def _tar_messages(sample: dict, where: str) -> list:
    img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    text = None
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace").strip()
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipRecord("invalid_json", f"{where}: {e}") from None
        if isinstance(meta, dict):
            for k in ("caption", "text", "txt", "class_name", "label"):
                if isinstance(meta.get(k), str):
                    text = meta[k].strip()
                    break
    if img_ext is None or not text:
        raise SkipRecord("bad_sample", f"{where}: needs an image and a caption (.txt or .json), has {sorted(sample)}")
    return [Message("assistant", [("image", sample[img_ext]), ("text", text)])]


# ------------------------------------------------------------------------------------- workers
_ENCODER: Optional[DocumentEncoder] = None
_INPUT_FD: list = [None, -1]  # [path, fd]: a worker's open input file (records come file after file)


def _read_at(path: str, offset: int, n: int) -> bytes:
    if _INPUT_FD[0] != path:
        if _INPUT_FD[1] >= 0:
            os.close(_INPUT_FD[1])
        _INPUT_FD[:] = [path, os.open(path, os.O_RDONLY)]
    return os.pread(_INPUT_FD[1], n, offset)


def _init_worker(tokenizer_model, fmt, image_root, exif_transpose, max_image_pixels, chat_template="chatml",
                 allow_image_mismatch=False, image_storage="patches"):
    global _ENCODER
    from megatron_solo.data.tokenizer import SoloTokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tok = SoloTokenizer(tokenizer_model)
    tok.check_solo_ids()
    _ENCODER = DocumentEncoder(tok, fmt, image_root=image_root, exif_transpose=exif_transpose,
                               max_image_pixels=max_image_pixels, chat_template=chat_template,
                               allow_image_mismatch=allow_image_mismatch, image_storage=image_storage)


def _init_worker_process(*init_args):
    """A pool worker's start: its own process, so it may set process-wide malloc thresholds."""
    from megatron_solo.data.allocator import keep_freed_memory

    keep_freed_memory()
    _init_worker(*init_args)


def encode_record(item):
    """One record -> ("ok", tokens, roles, patches, n_images, n_image_tokens) or ("skip", reason, detail)."""
    where, kind, payload = item
    try:
        if kind == "lineref":
            kind, payload = "line", _read_at(*payload)
        if kind == "line":
            if isinstance(payload, bytes):
                payload = payload.decode("utf-8", errors="replace")
            try:
                obj = json.loads(payload)
            except json.JSONDecodeError as e:
                raise SkipRecord("invalid_json", str(e)) from None
            msgs = normalize_messages(obj, where, _ENCODER.allow_image_mismatch)
        elif kind == "obj":
            msgs = normalize_messages(payload, where, _ENCODER.allow_image_mismatch)
        elif kind == "parquet":
            from megatron_solo.data.parquet_input import row_to_record

            msgs = normalize_messages(row_to_record(payload, where), where, _ENCODER.allow_image_mismatch)
        elif kind == "bad":
            raise SkipRecord(*payload)
        else:
            msgs = _tar_messages(payload, where)
        doc = _ENCODER.encode(msgs, where)
        return ("ok", doc.tokens, doc.roles, doc.patches, doc.n_images, doc.n_image_tokens)
    except SkipRecord as e:
        return ("skip", e.reason, e.detail)


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
            cfg.chat_template, cfg.allow_image_mismatch, cfg.image_storage)


def encoder_pool(cfg: PreprocessConfig):
    """The worker processes for ``cfg.workers`` > 1 (a context manager), else a null context: one
    pool serves every shard of a sharded run."""
    if cfg.workers <= 1:
        return contextlib.nullcontext()
    from megatron_solo.data.worker_pool import OrderedWorkerPool

    return OrderedWorkerPool(cfg.workers, _encode_chunk, _init_worker_process, _init_args(cfg), name="preprocess-worker",
                             env_defaults=SINGLE_THREADED_ENV)


def _ordered_results(records, cfg: PreprocessConfig, pool=None):
    """Yield (item, result) in input order: in ``pool``'s workers, in chunks of CHUNK records (at most
    ``4 * workers`` chunks in flight), or in this process without a pool."""
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
@dataclass
class Stats:
    records: int = 0
    documents: int = 0
    packs: int = 0
    segments: int = 0
    tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    patches: int = 0
    skipped: dict = field(default_factory=dict)
    skipped_total: int = 0
    time_s: float = 0.0


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def preprocess(cfg: PreprocessConfig, records=None) -> dict:
    """Run the pipeline; return the stats dict (also written to ``P.stats.json``).

    Returns ``{"skipped_existing": True}`` when the prefix is complete and ``overwrite`` is off.
    Raises :class:`TooManyErrors` (no prefix is left) when the skip rate exceeds ``max_error_rate``.
    With ``cfg.shard_size``, writes resumable shards (:mod:`megatron_solo.data.shards`).
    ``records``: the input records to encode (default: all of ``cfg.inputs``).
    """
    from megatron_solo.data.indexed import prefix_complete

    for p in cfg.inputs:
        if not os.path.isfile(p):
            raise InputNotFound(p)
    check_tokenizer(cfg.tokenizer_model)  # here, once: not as a traceback from every worker
    if cfg.shard_size:
        from megatron_solo.data.shards import preprocess_sharded

        with encoder_pool(cfg) as pool:
            return preprocess_sharded(cfg, functools.partial(_preprocess_prefix, pool=pool))
    if prefix_complete(cfg.output_prefix) and not cfg.overwrite:
        logger.info("%s is complete; skipping (use --overwrite to rebuild)", cfg.output_prefix)
        return {"skipped_existing": True}
    with encoder_pool(cfg) as pool:
        return _preprocess_prefix(cfg, records, pool)


def _preprocess_prefix(cfg: PreprocessConfig, records=None, pool=None) -> dict:
    """Encode ``records`` (default: all of ``cfg.inputs``) into the prefix ``cfg.output_prefix``."""
    from megatron_solo.data.indexed import Packer, SoloPrefixWriter, remove_prefix

    prefix = cfg.output_prefix
    remove_prefix(prefix)  # a stale incomplete prefix, or the old one with --overwrite
    t0 = time.time()
    stats = Stats()
    writer = SoloPrefixWriter(prefix, use_cpp=cfg.use_cpp, image_storage=cfg.image_storage)
    packer = Packer(writer, cfg.seq_length)
    old_term = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _is_main_thread() else None
    bar = None
    try:
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(unit="doc", desc=os.path.basename(prefix), mininterval=1.0, file=sys.stderr)
        if records is None:
            records = iter_records(cfg.inputs, cfg.parquet, by_reference=pool is not None)
        for (where, _, _), res in _ordered_results(records, cfg, pool):
            stats.records += 1
            if res[0] == "skip":
                _, reason, detail = res
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
                stats.skipped_total += 1
                logger.warning("skip %s: %s%s", where, reason, f" ({detail})" if detail else "")
                continue
            _, tokens, roles, patches, n_images, n_image_tokens = res
            packer.add(tokens, roles, patches)
            stats.documents += 1
            stats.images += n_images
            stats.image_tokens += n_image_tokens
            if bar is not None:
                bar.update(1)  # tqdm shows documents/s; images/s beside it
                if stats.documents % 32 == 0:
                    bar.set_postfix_str(f"{stats.images / max(time.time() - t0, 1e-9):.1f} images/s", refresh=False)
        packer.close()
        rate = stats.skipped_total / max(stats.records, 1)
        if stats.records == 0 or stats.documents == 0 or rate > cfg.max_error_rate:
            raise TooManyErrors(
                f"{stats.skipped_total} of {stats.records} records skipped ({rate:.2%} > --max-error-rate "
                f"{cfg.max_error_rate:.2%}); by reason: {json.dumps(stats.skipped, sort_keys=True)}; "
                f"no prefix written")
        stats.packs, stats.segments = writer.n_packs, writer.n_segments
        stats.tokens, stats.patches = writer.n_tokens, writer.n_patches
        stats.time_s = round(time.time() - t0, 3)
        out = asdict(stats)
        out.update(format=cfg.fmt, chat_template=cfg.chat_template if cfg.fmt == "chat" else None,
                   allow_image_placeholder_mismatch=cfg.allow_image_mismatch, seq_length=cfg.seq_length,
                   inputs=list(cfg.inputs), workers=cfg.workers,
                   exif_transpose=cfg.exif_transpose, skip_reasons=SKIP_REASONS,
                   **storage_stats(writer, stats))
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


def storage_stats(writer, stats: Stats) -> dict:
    """Bytes on disk (.bin data) per image and per token for the prefix's image storage."""
    data_bytes = writer.n_tokens * 5 + writer.image_bytes  # int32 tokens + uint8 roles + images
    return {"image_storage": "encoded" if "images" in writer.suffixes else "patches",
            "image_bytes": writer.image_bytes, "data_bytes": data_bytes,
            **bytes_per(writer.image_bytes, data_bytes, stats.images, writer.n_tokens)}


def bytes_per(image_bytes: int, data_bytes: int, images: int, tokens: int) -> dict:
    """``bytes_per_image`` and ``bytes_per_token`` of ``P.stats.json`` (a prefix's, or a shard set's sums)."""
    return {"bytes_per_image": round(image_bytes / images, 1) if images else 0.0,
            "bytes_per_token": round(data_bytes / tokens, 3) if tokens else 0.0}


def _is_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def merge_prefixes(inputs: list, output_prefix: str, overwrite: bool = False) -> dict:
    """Concatenate complete prefixes (packs in order) into one, atomically; stats are summed."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_solo.data.indexed import (
        DTYPES,
        STORAGE_SUFFIXES,
        component_prefix,
        prefix_complete,
        prefix_storage,
        publish_prefix,
        remove_prefix,
    )

    if prefix_complete(output_prefix) and not overwrite:
        return {"skipped_existing": True}
    for p in inputs:
        if not prefix_complete(p):
            raise FileNotFoundError(f"{p} is not a complete prefix")
    storages = sorted({prefix_storage(p) for p in inputs})
    if len(storages) > 1:
        raise ValueError(f"cannot merge prefixes of different image storages {storages}; preprocess them alike")
    SUFFIXES = STORAGE_SUFFIXES[storages[0]]
    remove_prefix(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        for n in SUFFIXES:
            base = component_prefix(output_prefix, n)
            b = IndexedDatasetBuilder(base + ".bin.tmp", dtype=DTYPES[n])
            for p in inputs:
                b.add_index(component_prefix(p, n))
            b.finalize(base + ".idx.tmp")
        totals: dict = {"skipped": {}, "merged_from": list(inputs)}
        for p in inputs:
            try:
                with open(p + ".stats.json") as f:
                    s = json.load(f)
            except FileNotFoundError:
                continue
            for k in ("records", "documents", "packs", "segments", "tokens", "image_tokens", "images", "patches",
                      "skipped_total", "time_s"):
                totals[k] = totals.get(k, 0) + s.get(k, 0)
            for k, v in s.get("skipped", {}).items():
                totals["skipped"][k] = totals["skipped"].get(k, 0) + v
        publish_prefix(output_prefix, totals, SUFFIXES)
        return totals
    except BaseException:
        remove_prefix(output_prefix)
        raise
