"""Input readers of preprocessing: files -> records, and (in the worker that encodes it) a record -> messages.

A record is ``(where, kind, payload)``; ``where`` names it in skip messages. Two small tables:
:data:`READERS` (an input's extension -> the reader that yields its records; anything else is JSON
lines) and :data:`RECORD_MESSAGES` (a record's kind -> how it becomes :class:`Message` lists).

    kind      payload                                          from
    line      one JSON text (str or bytes)                     .jsonl (compressed), or uncompressed in-process
    lineref   (path, offset, length) of a line; the worker     .jsonl, uncompressed, with worker processes:
              reads it                                         the parent never copies a line of base64 images
    obj       one parsed JSON item                             .json (a list or one object)
    tar       {ext: bytes} of one WebDataset sample            .tar (plain, .gz, .lz4, .zst)
    parquet   (layout, row)                                    .parquet (megatron_solo.data.parquet_input)
    interleaved  {"texts", "images"} of an OBELICS-style row   .parquet, layout interleaved
                 (megatron_solo.data.interleaved)
    bad       (reason, detail): a record that could not be     .parquet (a row group pyarrow cannot read)
              read, skipped and counted
"""

from __future__ import annotations

import gzip
import io
import json
import mmap
import os
import re
import tarfile
from typing import Callable, Iterator

from megatron_solo.data.encode import Message, normalize_messages
from megatron_solo.data.errors import SkipRecord
from megatron_solo.data.interleaved import InterleavedOptions, is_mmc4, mmc4_messages, obelics_messages
from megatron_solo.data.parquet_input import ParquetColumns, iter_parquet, row_to_record

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
COMPRESSIONS = (".gz", ".lz4", ".zst")


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
    for c in COMPRESSIONS:
        if p.endswith(c):
            p = p[: -len(c)]
    return p.rsplit(".", 1)[-1].lower() if "." in os.path.basename(p) else ""


# ------------------------------------------------------------------------------------- files -> records
def _read_json(path, parquet, by_reference):
    with open_binary(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # maybe JSON lines after all
        yield from _read_lines(path)
        return
    items = data if isinstance(data, list) else [data]
    for i, obj in enumerate(items):
        yield f"{path}:[{i}]", "obj", obj


def _read_parquet(path, parquet, by_reference):
    yield from iter_parquet(path, parquet or ParquetColumns())


def _read_tar(path, parquet=None, by_reference=False):
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


def _read_lines(path, parquet=None, by_reference=False):
    if not path.endswith(COMPRESSIONS):
        yield from _read_lines_mapped(path, by_reference)
        return
    with open_binary(path) as f:
        for lineno, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
            if raw.strip():
                yield f"{path}:{lineno}", "line", raw


_NON_SPACE = re.compile(rb"\S")
_RELEASE_SCANNED_BYTES = 64 << 20


def _read_lines_mapped(path, by_reference):
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


# an input's extension (compression suffix removed) -> its reader(path, parquet columns, by_reference)
READERS: dict[str, Callable[..., Iterator[tuple]]] = {
    "parquet": _read_parquet,
    "tar": _read_tar,
    "json": _read_json,
    "jsonl": _read_lines,
}


def iter_records(paths, parquet=None, by_reference=False) -> Iterator[tuple]:
    """Yield the ``(where, kind, payload)`` records of ``paths`` in order (kinds: the module's table).
    ``by_reference``: uncompressed JSON lines as "lineref" (for worker processes), not "line"."""
    for path in paths:
        yield from READERS.get(_base_ext(path), _read_lines)(path, parquet, by_reference)


# ------------------------------------------------------------------------------------- records -> messages
_INPUT_FD: list = [None, -1]  # [path, fd]: a worker's open input file (records come file after file)


def _read_at(path: str, offset: int, n: int) -> bytes:
    if _INPUT_FD[0] != path:
        if _INPUT_FD[1] >= 0:
            os.close(_INPUT_FD[1])
        _INPUT_FD[:] = [path, os.open(path, os.O_RDONLY)]
    return os.pread(_INPUT_FD[1], n, offset)


def _json_messages(obj, where, allow_image_mismatch, interleaved):
    """A parsed JSON document: MMC4's layout (told by its keys), else the chat/LLaVA shapes."""
    if is_mmc4(obj):
        return mmc4_messages(obj, where, interleaved)
    return normalize_messages(obj, where, allow_image_mismatch)


def _line_messages(payload, where, allow_image_mismatch, interleaved):
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8", errors="replace")
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as e:
        raise SkipRecord("invalid_json", str(e)) from None
    return _json_messages(obj, where, allow_image_mismatch, interleaved)


def _tar_messages(sample: dict, where: str, allow_image_mismatch=False, interleaved=None) -> list:
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


def _bad_record(payload, where, allow_image_mismatch, interleaved):
    raise SkipRecord(*payload)


# a record's kind -> messages(payload, where, allow_image_mismatch, interleaved options); raises SkipRecord
RECORD_MESSAGES: dict[str, Callable[..., list]] = {
    "line": _line_messages,
    "lineref": lambda ref, where, allow, il: _line_messages(_read_at(*ref), where, allow, il),
    "obj": _json_messages,
    "parquet": lambda row, where, allow, il: normalize_messages(row_to_record(row, where), where, allow),
    "interleaved": lambda row, where, allow, il: obelics_messages(row, where, il),
    "tar": _tar_messages,
    "bad": _bad_record,
}


def record_messages(record: tuple, allow_image_mismatch: bool = False,
                    interleaved: InterleavedOptions = InterleavedOptions()) -> list[Message]:
    """The messages of one record (raises :class:`SkipRecord`)."""
    where, kind, payload = record
    return RECORD_MESSAGES[kind](payload, where, allow_image_mismatch, interleaved)
