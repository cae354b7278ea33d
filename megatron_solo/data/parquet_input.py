"""Parquet input (Hugging Face datasets' shards), read one row group at a time with pyarrow.

Layouts, detected from the column names (or named with ``--parquet-layout`` and the column flags):

    llava    ``conversations`` (LLaVA ``from``/``value`` turns, ``<image>`` placeholders) + ``image``
             or ``images`` (an image struct ``{bytes, path}``, raw bytes, a path, or a list of them)
    chat     ``messages`` (``role`` + ``content``: a string with ``<image>`` placeholders or a list of
             parts where ``{"type": "image"}`` takes the next entry of ``images``) + optional ``images``
    caption  ``image`` + ``text`` / ``caption`` / ``txt``: one assistant turn, the image then the text
    interleaved  ``texts`` + ``images``, two aligned lists (OBELICS, OmniCorpus): a web document, read by
             :mod:`megatron_solo.data.interleaved` (records of kind ``interleaved``)

A row becomes a record of the JSON shapes (:func:`megatron_solo.data.encode.normalize_messages`) in
the worker that encodes it; a row that does not fit its layout is skipped as ``bad_row`` and
counted, and so is every row of a row group pyarrow cannot read. Only the needed columns are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_solo.data.errors import SkipRecord
from megatron_solo.errors import InputError

LAYOUTS = ("auto", "llava", "chat", "caption", "interleaved")
INTERLEAVED_COLUMNS = ("texts", "images")  # the columns (and the row keys) of the interleaved layout
# a layout -> the kind of its records (megatron_solo.data.readers.RECORD_MESSAGES); the others: "parquet"
LAYOUT_KINDS = {"interleaved": "interleaved"}
TEXT_COLUMNS = ("text", "caption", "txt")
BATCH_ROWS = 64


class ParquetInputError(InputError, ValueError):
    """A .parquet input the flags do not describe (a user mistake: one ``error:`` line, exit 2)."""


@dataclass(frozen=True)
class ParquetColumns:
    """``--parquet-layout`` and the column-name flags (None: detected)."""

    layout: str = "auto"
    image: Optional[str] = None
    text: Optional[str] = None
    messages: Optional[str] = None


def resolve_layout(schema, cols: ParquetColumns, path: str) -> tuple[str, dict]:
    """(layout, {"image": col, "text": col, "messages": col}) for a file's Arrow schema."""
    names = list(schema.names)

    def pick(given, candidates):
        if given is not None:
            if given not in names:
                raise ParquetInputError(f"{path}: no column {given!r} (columns: {names})")
            return given
        return next((c for c in candidates if c in names), None)

    image = pick(cols.image, ("image", "images"))
    messages = pick(cols.messages, ("conversations", "messages"))
    text = pick(cols.text, TEXT_COLUMNS)
    layout = cols.layout
    auto_interleaved = layout == "auto" and messages is None and all(c in names for c in INTERLEAVED_COLUMNS)
    if layout == "interleaved" or auto_interleaved:
        texts, images = pick(cols.text, ("texts",)), pick(cols.image, ("images",))
        if texts is None or images is None:
            raise ParquetInputError(f"{path}: layout interleaved needs a texts and an images column "
                                    f"(--text-column/--image-column); columns: {names}")
        return "interleaved", dict(zip(INTERLEAVED_COLUMNS, (texts, images)))
    if layout == "auto":
        if messages is not None:  # LLaVA turns are structs with "from"/"value", chat ones "role"/"content"
            t = schema.field(messages).type
            fields = [f.name for f in t.value_type] if hasattr(t, "value_type") and hasattr(t.value_type, "__iter__") \
                else []
            layout = "llava" if "from" in fields else "chat"
        elif image is not None and text is not None:
            layout = "caption"
        else:
            raise ParquetInputError(f"{path}: cannot tell the layout from columns {names}; pass --parquet-layout "
                             f"and --image-column/--text-column/--messages-column")
    if layout in ("llava", "chat") and messages is None:
        raise ParquetInputError(f"{path}: layout {layout} needs a messages column (--messages-column); columns: {names}")
    if layout == "caption" and (image is None or text is None):
        raise ParquetInputError(f"{path}: layout caption needs an image and a text column; columns: {names}")
    return layout, {"image": image, "text": text if layout == "caption" else None,
                    "messages": messages if layout != "caption" else None}


def iter_parquet(path: str, cols: ParquetColumns = ParquetColumns()) -> Iterator[tuple]:
    """Yield ``(where, "parquet", (layout, row))`` per row (``(where, "interleaved", row)`` for that
    layout), or ``(where, "bad", (reason, detail))``."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not a Parquet file at all: a user mistake, said once
        raise ParquetInputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    layout, columns = resolve_layout(pf.schema_arrow, cols, path)
    wanted = [c for c in dict.fromkeys(columns.values()) if c is not None]
    kind = LAYOUT_KINDS.get(layout, "parquet")
    row = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=wanted):
                for r in batch.to_pylist():
                    cells = {k: r.get(c) for k, c in columns.items() if c is not None}
                    yield f"{path}:row{row + done}", kind, cells if kind != "parquet" else (layout, cells)
                    done += 1
        except Exception as e:  # a corrupt row group: its unread rows are counted, the file goes on
            for i in range(done, n):
                yield f"{path}:row{row + i}", "bad", ("bad_row", f"row group {g}: {type(e).__name__}: {e}")
        row += n


def _image(v, where):
    """An HF image cell -> bytes or a path (what read_image_source takes)."""
    if isinstance(v, dict):
        if v.get("bytes"):
            return v["bytes"]
        if v.get("path"):
            return v["path"]
        raise SkipRecord("bad_row", f"{where}: an image struct without bytes or path")
    if isinstance(v, (bytes, str)) and v:
        return v
    raise SkipRecord("bad_row", f"{where}: image cell of type {type(v).__name__}")


def _images(v, where) -> list:
    if v is None:
        return []
    return [_image(x, where) for x in v] if isinstance(v, list) else [_image(v, where)]


def row_to_record(payload, where: str):
    """One row of a layout -> a record for :func:`normalize_messages` (raises :class:`SkipRecord`)."""
    layout, row = payload
    if layout == "caption":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SkipRecord("bad_row", f"{where}: caption row without text")
        img = _image(row.get("image"), where)
        return [{"role": "assistant", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise SkipRecord("bad_row", f"{where}: {layout} row without a list of messages")
    images = _images(row.get("image"), where)
    if layout == "llava":
        return {"conversations": msgs, "image": images if len(images) != 1 else images[0]} if images else \
            {"conversations": msgs}
    pending = list(images)
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise SkipRecord("bad_row", f"{where}: a message is not a struct")
        content = m.get("content")
        parts = []
        if isinstance(content, str):
            for i, piece in enumerate(content.split("<image>")):
                if i:
                    parts.append({"type": "image", "image": _take(pending, where)})
                if piece:
                    parts.append({"type": "text", "text": piece})
        elif isinstance(content, list):
            for p in content:
                if isinstance(p, dict) and p.get("type") == "image" and not p.get("image"):
                    parts.append({"type": "image", "image": _take(pending, where)})
                elif isinstance(p, dict) and p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text")})
                else:
                    parts.append({k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p)
        else:
            raise SkipRecord("bad_row", f"{where}: message content of type {type(content).__name__}")
        out.append({"role": m.get("role"), "content": parts})
    if pending:  # images without a placeholder open the first user turn (the LLaVA convention)
        first = next((m for m in out if m["role"] == "user"), out[0])
        first["content"] = [{"type": "image", "image": x} for x in pending] + first["content"]
    return out


def _take(pending: list, where: str):
    if not pending:
        raise SkipRecord("bad_row", f"{where}: more image placeholders than images")
    return pending.pop(0)
