"""A prefix's statistics (the counts of ``P.stats.json``) and their sum over several prefixes.

One rule for a sum, used by a sharded run's totals and by a merge: the counts add up, the skip
counts add up by reason, the ratios (``bytes_per_image``, ``bytes_per_token``) are derived again from
the sums, and the run's settings (format, ``--seq-length``, ``--workers``, ...) are not summed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional

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
        storages, vocabs = set(), []
        for p in parts:
            for f in fields(cls):
                if f.name in ("skipped", "images_dropped", "image_storage", "vocab"):
                    continue
                setattr(out, f.name, getattr(out, f.name) + getattr(p, f.name))
            for by_reason, part in ((out.skipped, p.skipped), (out.images_dropped, p.images_dropped)):
                for reason, n in part.items():
                    by_reason[reason] = by_reason.get(reason, 0) + n
            storages.add(p.image_storage)
            vocabs.append(p.vocab)
        out.time_s = round(out.time_s, 3)
        out.vocab = vocabs[0] if vocabs and all(v == vocabs[0] for v in vocabs) else None
        storages.discard(None)
        out.image_storage = storages.pop() if len(storages) == 1 else None
        return out


def prefix_vocab(prefix: str) -> SoloVocab:
    """SOLO's vocabulary a prefix's ids were made with (``P.stats.json``'s ``vocab``). A prefix made before
    vocabularies were stored, or without stats, was made with Mistral's, the only one there was."""
    path = prefix + ".stats.json"
    stored = None
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f).get("vocab")
    return SoloVocab.from_dict(stored) if stored else MISTRAL_VOCAB
