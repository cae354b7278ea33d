"""Merging complete prefixes into one (``tools/merge_datasets.py``): packs concatenated in order,
published atomically, stats summed (:meth:`PrefixStats.total`). Inputs must share the image storage, the
tokenizer and the image layout (``--row-separator``; text-only inputs take any)."""

from __future__ import annotations

import json
import os

from megatron_solo.data.indexed import (
    DTYPES,
    STORAGE_SUFFIXES,
    component_prefix,
    prefix_complete,
    prefix_storage,
    publish_prefix,
    remove_prefix,
)
from megatron_solo.data.stats import PrefixStats, blend_row_separator, prefix_vocab
from megatron_solo.errors import InputError
from megatron_solo.spec import vocab_mismatch


class MergeInputError(InputError, ValueError):
    """An input the merge cannot take: not a complete prefix, or another image storage (exit 2)."""


def merge_prefixes(inputs: list, output_prefix: str, overwrite: bool = False) -> dict:
    """Concatenate complete prefixes (packs in order) into one, atomically; stats are summed."""
    # megatron-core imports torch: only a merge needs its builder, not the rest of the data package
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if prefix_complete(output_prefix) and not overwrite:
        return {"skipped_existing": True}
    for p in inputs:
        if not prefix_complete(p):
            raise MergeInputError(f"{p} is not a complete prefix")
    storages = sorted({prefix_storage(p) for p in inputs})
    if len(storages) > 1:
        raise MergeInputError(f"cannot merge prefixes of different image storages {storages}; preprocess them alike")
    vocabs = [prefix_vocab(p) for p in inputs]
    # a prefix recorded before the base's chat tokens were derived merges with one that has them
    # (spec.vocab_mismatch); the merge records the fuller vocabulary
    fullest = max(range(len(inputs)), key=lambda i: vocabs[i].eot is not None)
    for ref in dict.fromkeys((0, fullest)):
        problem = next(filter(None, (vocab_mismatch(v, vocabs[ref], p, inputs[ref]) for p, v in zip(inputs, vocabs))),
                       None)
        if problem:
            raise MergeInputError(f"cannot merge prefixes made with different tokenizers: {problem}; preprocess them "
                                  "with one")
    row_separator = blend_row_separator(inputs, "the merge")  # one image layout (a text-only input takes any)
    suffixes = STORAGE_SUFFIXES[storages[0]]
    remove_prefix(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        for n in suffixes:
            base = component_prefix(output_prefix, n)
            b = IndexedDatasetBuilder(base + ".bin.tmp", dtype=DTYPES[n])
            for p in inputs:
                b.add_index(component_prefix(p, n))
            b.finalize(base + ".idx.tmp")
        parts = []
        for p in inputs:
            try:
                with open(p + ".stats.json") as f:
                    parts.append(PrefixStats.from_dict(json.load(f)))
            except FileNotFoundError:  # a prefix written by other tools: its data merge, its counts are unknown
                continue
        totals = PrefixStats.total(parts)
        totals.image_storage = storages[0]
        totals.row_separator = row_separator
        if any(part.vocab for part in parts):
            totals.vocab = vocabs[fullest].to_dict()
        out = {**totals.as_dict(), "merged_from": list(inputs)}
        publish_prefix(output_prefix, out, suffixes)
        return out
    except BaseException:
        remove_prefix(output_prefix)
        raise
