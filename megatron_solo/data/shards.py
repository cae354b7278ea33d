"""Sharded, resumable preprocessing output and shard sets as one ``--data-path`` source.

``--shard-size N`` cuts the *input records* (lines, JSON items, tar samples, Parquet rows; skipped
ones included) into consecutive runs of N; run k becomes the complete prefix ``PREFIX_0000k`` (same
files and atomic finalize as an unsharded prefix; packing restarts in every shard). A rerun of the
same command skips every complete shard (its records are read past, not encoded) and redoes an
incomplete one from its start, so a killed run resumes with the same bytes as an uninterrupted one.
When every shard is done, the list file ``PREFIX.shards`` (one shard prefix a line, written
atomically) marks the set complete. The run itself: :func:`megatron_solo.data.preprocess.preprocess_sharded`.

A shard set is one source wherever prefixes are given (``--data-path``, ``tools/data_mixture.py``,
``tools/merge_datasets.py``): ``PREFIX.shards`` or a glob such as ``'out/cc3m_*'``. A weight given
to a set is shared among its shards in proportion to their packs, so the set is sampled as the one
prefix its concatenation would be.
"""

from __future__ import annotations

import glob
import json
import os

from megatron_solo.data.indexed import prefix_complete

SHARD_LIST_SUFFIX = ".shards"


def shard_prefix(prefix: str, k: int) -> str:
    return f"{prefix}_{k:05d}"


def shard_list_path(prefix: str) -> str:
    return prefix + SHARD_LIST_SUFFIX


def expand_source(word: str) -> list[str] | None:
    """The shard prefixes of a shard-set source (``X.shards`` list file or a glob), else None."""
    if word.endswith(SHARD_LIST_SUFFIX):
        if not os.path.isfile(word):
            raise FileNotFoundError(f"shard list {word} does not exist (is the sharded preprocessing finished?)")
        base = os.path.dirname(os.path.abspath(word))
        with open(word) as f:
            names = [ln.strip() for ln in f if ln.strip()]
        return [n if os.path.isabs(n) else os.path.join(base, n) for n in names]
    if glob.has_magic(word):
        found = sorted(p[: -len("-tokens.idx")] for p in glob.glob(word + "-tokens.idx"))
        found = [p for p in found if prefix_complete(p)]
        if not found:
            raise FileNotFoundError(f"no complete prefix matches {word!r}")
        return found
    return None


def prefix_packs(prefix: str) -> int:
    """Number of packs of a prefix: from ``P.stats.json``, else from ``P-tokens.idx``."""
    try:
        with open(prefix + ".stats.json") as f:
            return int(json.load(f)["packs"])
    except (FileNotFoundError, KeyError, ValueError):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return len(IndexedDataset(prefix + "-tokens").document_indices) - 1


def expand_blend(blend):
    """megatron's blend ``(prefixes, weights or None)`` with every shard-set source replaced by its
    shards (weights shared in proportion to packs)."""
    if blend is None:
        return None
    prefixes, weights = blend
    out_p, out_w = [], []
    for i, p in enumerate(prefixes):
        shards = expand_source(p)
        if shards is None:
            out_p.append(p)
            out_w.append(None if weights is None else weights[i])
            continue
        out_p.extend(shards)
        if weights is not None:
            packs = [prefix_packs(s) for s in shards]
            total = sum(packs) or 1
            out_w.extend(weights[i] * n / total for n in packs)
    return out_p, (None if weights is None else out_w)
