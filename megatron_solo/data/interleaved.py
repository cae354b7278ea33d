"""Interleaved web documents as they are published: OBELICS-style rows and MMC4-style JSON documents.

    OBELICS   a Parquet row with two aligned lists, ``texts`` and ``images``: at each position exactly
              one is set (OmniCorpus has the same shape). The document is its positions in order;
              consecutive texts are joined with a blank line (:data:`TEXT_SEP`).
    MMC4      a JSON document with ``text_list`` (sentences) and ``image_info`` (objects with
              ``image_name`` or ``raw_url``, ``matched_text_index``, ``matched_sim``). Each image goes
              before the sentence it is matched to (OpenFlamingo's MMC4 reader), images matched to one
              sentence in list order; sentences with no image between them are joined with a space.

A document is one assistant message (as the caption layout's), so ``--format pretrain`` reads it as BOS
+ its parts. Its images are *optional* parts (``("image?", src)``): an image that cannot be read is
dropped from the document and counted by reason (``images_dropped`` in ``P.stats.json``), the document
keeps the rest; ``("dropped", reason)`` records one dropped before encoding (a URL without a local copy,
``matched_sim`` below ``--min-image-similarity``). A row that breaks its layout (both or neither at a
position, an MMC4 index out of range) is skipped as a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_solo.data.encode import Message
from megatron_solo.data.errors import SkipRecord
from megatron_solo.data.image_sources import resolve_image

TEXT_SEP = "\n\n"  # between consecutive texts of an OBELICS document (paragraphs)
SENTENCE_SEP = " "  # between consecutive sentences of an MMC4 document (OpenFlamingo's " ".join)
BELOW_MIN_SIMILARITY = "below_min_similarity"  # a drop reason that is a filter, not an error


@dataclass(frozen=True)
class InterleavedOptions:
    """``--min-image-similarity`` (MMC4) and ``--image-url-map`` (loaded: URL -> local file)."""

    min_image_similarity: Optional[float] = None
    url_map: Optional[Mapping[str, str]] = None


def _image_part(cell, opts: InterleavedOptions, where: str) -> tuple:
    try:
        return "image?", resolve_image(cell, opts.url_map, where)
    except SkipRecord as e:
        if e.reason != "image_not_local":
            raise
        return "dropped", e.reason


def _add_text(parts: list, text: str, sep: str) -> None:
    parts.append(("text", sep + text if parts and parts[-1][0] == "text" else text))


def _empty_image(cell) -> bool:
    return cell is None or (isinstance(cell, dict) and not cell.get("bytes") and not cell.get("path"))


def obelics_messages(row: dict, where: str, opts: InterleavedOptions = InterleavedOptions()) -> list[Message]:
    """An OBELICS row ``{"texts": [...], "images": [...]}`` -> one assistant message of its positions."""
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SkipRecord("bad_row", f"{where}: texts and images must be lists of one length")
    parts: list = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == _empty_image(image):
            which = "both a text and" if text is not None else "neither a text nor"
            raise SkipRecord("bad_row", f"{where}: position {i} has {which} an image")
        if text is not None:
            if not isinstance(text, str):
                raise SkipRecord("bad_row", f"{where}: position {i}: text of type {type(text).__name__}")
            _add_text(parts, text, TEXT_SEP)
        else:
            parts.append(_image_part(image, opts, f"{where}: position {i}"))
    return [Message("assistant", parts)]


def _mmc4_source(info: dict, opts: InterleavedOptions):
    """An MMC4 image's cell: its URL when the map has it, else its ``image_name`` (a path), else its URL."""
    url, name = info.get("raw_url"), info.get("image_name")
    if opts.url_map and url in opts.url_map:
        return url
    return name or url


def mmc4_messages(doc: dict, where: str, opts: InterleavedOptions = InterleavedOptions()) -> list[Message]:
    """An MMC4 document ``{"text_list": [...], "image_info": [...]}`` -> one assistant message."""
    sentences, infos = doc.get("text_list"), doc.get("image_info") or []
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences) or not isinstance(infos, list):
        raise SkipRecord("missing_field", f"{where}: MMC4 text_list must be a list of strings, image_info a list")
    before: list[list] = [[] for _ in sentences]
    for k, info in enumerate(infos):
        j = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < len(sentences):
            raise SkipRecord("image_index_out_of_range",
                             f"{where}: image_info[{k}] matched_text_index {j!r} for {len(sentences)} sentences")
        sim = info.get("matched_sim")
        if opts.min_image_similarity is not None and not (isinstance(sim, (int, float)) and
                                                          sim >= opts.min_image_similarity):
            before[j].append(("dropped", BELOW_MIN_SIMILARITY))
            continue
        source = _mmc4_source(info, opts)
        if not source:
            raise SkipRecord("missing_field", f"{where}: image_info[{k}] has neither image_name nor raw_url")
        before[j].append(_image_part(source, opts, f"{where}: image_info[{k}]"))
    parts: list = []
    for sentence, images in zip(sentences, before):
        parts.extend(images)
        _add_text(parts, sentence, SENTENCE_SEP)
    return [Message("assistant", parts)]


def is_mmc4(obj) -> bool:
    """A parsed JSON document in MMC4's layout."""
    return isinstance(obj, dict) and "text_list" in obj and "image_info" in obj
