"""A prefix's statistics (the counts of ``P.stats.json``) and their sum over several prefixes.

One rule for a sum, used by a sharded run's totals and by a merge: the counts add up, the skip
counts add up by reason, the ratios (``bytes_per_image``, ``bytes_per_token``) are derived again from
the sums, and the run's settings (format, ``--seq-length``, ``--workers``, ...) are not summed.

The image layout (``row_separator``: ``--row-separator on|off``) is the one setting every reader must
agree on: :func:`prefix_row_separator` reads it (a prefix written before it was recorded has separators,
SOLO's layout), :func:`blend_row_separator` refuses prefixes of both layouts in one blend or merge.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional

from megatron_solo.errors import InputError
from megatron_solo.spec import MISTRAL_VOCAB, SoloVocab


@dataclass
class PrefixStats:
    records: int = 0  # input records read (skipped ones included)
    documents: int = 0
    packs: int = 0
    segments: int = 0
    tokens: int = 0
    image_tokens: int = 0  # tokens of vision blocks (markers included)
    images: int = 0  # images + video frames
    patches: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> records skipped for it
    skipped_total: int = 0
    # interleaved documents (megatron_solo.data.interleaved): images left out of their document, by reason,
    # and the documents kept as text because every image they had was left out
    images_dropped: dict = field(default_factory=dict)
    images_dropped_total: int = 0
    documents_all_images_dropped: int = 0
    time_s: float = 0.0
    image_storage: Optional[str] = None  # "encoded" or "patches" (megatron_solo.data.image_storage)
    image_bytes: int = 0  # bytes written to P-patches or P-images + P-imageidx
    data_bytes: int = 0  # bytes of all .bin data: int32 tokens + uint8 roles + images
    vocab: Optional[dict] = None  # SoloVocab.to_dict() of the tokenizer that made the ids (prefix_vocab)
    # --row-separator: images laid out with <vrow_sep> between rows (SOLO) or without (SAIL); a stats file
    # written before the layout was recorded lacks it: those prefixes have separators
    row_separator: Optional[bool] = True

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_total += 1

    def drop_images(self, reasons) -> None:
        for reason in reasons:
            self.images_dropped[reason] = self.images_dropped.get(reason, 0) + 1
        self.images_dropped_total += len(reasons)

    def count_written(self, writer) -> None:
        """The counts a :class:`~megatron_solo.data.indexed.SoloPrefixWriter` kept while writing."""
        self.packs, self.segments = writer.n_packs, writer.n_segments
        self.tokens, self.patches = writer.n_tokens, writer.n_patches
        self.image_storage = "encoded" if "images" in writer.suffixes else "patches"
        self.image_bytes = writer.image_bytes
        self.data_bytes = writer.n_tokens * 5 + writer.image_bytes  # int32 tokens + uint8 roles + images

    @property
    def bytes_per_image(self) -> float:
        return round(self.image_bytes / self.images, 1) if self.images else 0.0

    @property
    def bytes_per_token(self) -> float:
        return round(self.data_bytes / self.tokens, 3) if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes_per_image": self.bytes_per_image, "bytes_per_token": self.bytes_per_token}

    @classmethod
    def from_dict(cls, d: dict) -> "PrefixStats":
        """The counts of a ``P.stats.json`` (a key it lacks, as in older files, counts 0)."""
        names = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in d.items() if k in names})
        s.skipped, s.images_dropped = dict(s.skipped), dict(s.images_dropped)
        return s

    @classmethod
    def total(cls, parts: Iterable["PrefixStats"]) -> "PrefixStats":
        """The sum of several prefixes' stats (the image storage: theirs, when they all share one)."""
        out = cls()
        storages, vocabs, layouts = set(), [], set()
        for p in parts:
            for f in fields(cls):
                if f.name in ("skipped", "images_dropped", "image_storage", "vocab", "row_separator"):
                    continue
                setattr(out, f.name, getattr(out, f.name) + getattr(p, f.name))
            for by_reason, part in ((out.skipped, p.skipped), (out.images_dropped, p.images_dropped)):
                for reason, n in part.items():
                    by_reason[reason] = by_reason.get(reason, 0) + n
            storages.add(p.image_storage)
            vocabs.append(p.vocab)
            if p.images:  # a text-only part has no layout to disagree with
                layouts.add(p.row_separator)
        out.time_s = round(out.time_s, 3)
        out.vocab = vocabs[0] if vocabs and all(v == vocabs[0] for v in vocabs) else None
        storages.discard(None)
        out.image_storage = storages.pop() if len(storages) == 1 else None
        out.row_separator = layouts.pop() if len(layouts) == 1 else (True if not layouts else None)
        return out


def read_stats(prefix: str) -> dict:
    """``P.stats.json`` as written (empty for a prefix without one: written by other tools)."""
    path = prefix + ".stats.json"
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def prefix_vocab(prefix: str) -> SoloVocab:
    """SOLO's vocabulary a prefix's ids were made with (``P.stats.json``'s ``vocab``). A prefix made before
    vocabularies were stored, or without stats, was made with Mistral's, the only one there was."""
    stored = read_stats(prefix).get("vocab")
    return SoloVocab.from_dict(stored) if stored else MISTRAL_VOCAB


def prefix_row_separator(prefix: str) -> bool:
    """Whether a prefix's images are laid out with ``<vrow_sep>`` (``P.stats.json``'s ``row_separator``;
    a prefix written before the layout was recorded, or without stats, has them: SOLO's layout)."""
    return read_stats(prefix).get("row_separator", True) is not False


def blend_chat_template(prefixes: Iterable[str]) -> str | None:
    """The chat template (``--chat-template``) of the chat prefixes among ``prefixes`` (``P.stats.json``'s
    ``chat_template``), when they share one: what the model reading them is tuned to answer in (its export's
    default template). None when no prefix is chat data or they mix templates."""
    names = {read_stats(p).get("chat_template") for p in prefixes} - {None}
    return names.pop() if len(names) == 1 else None


def layout_name(row_separator: bool) -> str:
    """The layout as ``--row-separator`` spells it."""
    return "on" if row_separator else "off"


class LayoutMismatch(InputError, ValueError):
    """Prefixes of both image layouts (``--row-separator on`` and ``off``) where one model reads them (exit 2)."""


def blend_row_separator(prefixes: Iterable[str], what: str = "a blend") -> bool:
    """The one image layout of ``prefixes`` (read together: a blend, a merge). Prefixes without images
    take any layout; two image-bearing prefixes of different layouts raise :class:`LayoutMismatch`."""
    seen: dict[bool, str] = {}
    for p in prefixes:
        stats = read_stats(p)
        if stats and not stats.get("images", 1):
            continue
        seen.setdefault(prefix_row_separator(p), p)
    if len(seen) > 1:
        raise LayoutMismatch(f"{what} mixes image layouts: {seen[True]} has row separators (--row-separator on), "
                             f"{seen[False]} has none (--row-separator off); preprocess them with one "
                             "--row-separator")
    return next(iter(seen), True)
