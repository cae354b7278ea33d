"""Why a record is skipped. Every skip is counted by its reason in ``P.stats.json``."""

from __future__ import annotations

# reason code -> one-line meaning (docs/DATA_FORMAT.md lists the same table)
SKIP_REASONS = {
    "invalid_json": "the line/file is not valid JSON",
    "missing_field": "a required field (messages, role, content, url, ...) is missing or has the wrong type",
    "unknown_part_type": "a content part has a type other than text / image_url / video / loc",
    "unknown_role": "a message role other than system / user / assistant (human / gpt / system for LLaVA)",
    "bad_base64": "a data URL whose base64 payload does not decode",
    "unsupported_url": "an image URL that is neither a data URL nor a local path (nothing is downloaded)",
    "missing_image_file": "an image path that does not exist under --image-root",
    "empty_image": "zero bytes of image data, or an image with a zero-size side",
    "corrupt_image": "bytes PIL cannot identify or decode (truncated, not an image)",
    "decompression_bomb": "more pixels than --max-image-pixels (PIL's decompression-bomb limit)",
    "empty_document": "a document with no text and no image",
    "bad_sample": "a tar sample without an image or without text",
    "image_placeholder_mismatch": "a LLaVA record whose '<image>' placeholders do not match its images",
    "image_in_assistant_turn": "an image in an assistant (gpt) turn (LLaVA placeholder, or any image with solo-inst)",
    "bad_row": "a Parquet row that does not fit its layout's columns, or in a row group pyarrow cannot read",
    "image_index_out_of_range": "an MMC4 image whose matched_text_index is not the index of one of its sentences",
    "image_not_local": "an image given only as a URL that --image-url-map does not map to a local file",
}


class SkipRecord(Exception):
    """Raised while encoding one record; the record is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = "", images_dropped: tuple = ()):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.images_dropped = tuple(images_dropped)  # an interleaved document's images dropped before the skip


def picklable(exc: BaseException) -> BaseException:
    """``exc`` itself if it can cross a process boundary (pickle), else a RuntimeError that keeps its type
    name and message: used where a worker process hands an exception back to its parent."""
    import pickle

    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
