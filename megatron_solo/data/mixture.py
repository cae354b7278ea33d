"""Data mixtures: target token proportions -> Megatron blend weights and per-epoch sample/iteration counts.

SOLO chose its stage mixtures (e.g. ImageNet-21k + ~30% SlimPajama) by hand in a notebook; this does the
arithmetic from the prefixes' own indices. The weights are target shares of *samples* (what Megatron's
blend weighs), derived from the target token share and each prefix's tokens per pack. The command line
is ``tools/data_mixture.py``.
"""

from __future__ import annotations

import math

import numpy as np

from megatron_solo.data.indexed import component_prefix
from megatron_solo.data.shards import expand_source


def prefix_summary(prefix: str, seq_length: int) -> dict:
    """packs and tokens of a prefix (as training sees them: each pack cut to seq_length)."""
    # megatron-core imports torch: the tool installs its warning filter before this is called
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards = expand_source(prefix)  # a shard set (X.shards or a glob) counts as one source
    if shards is not None:
        parts = [prefix_summary(s, seq_length) for s in shards]
        return {k: sum(p[k] for p in parts) for k in ("packs", "tokens")}
    ds = IndexedDataset(component_prefix(prefix, "tokens"))
    bounds = np.asarray(ds.document_indices)
    pack_tokens = np.add.reduceat(np.asarray(ds.sequence_lengths, np.int64), bounds[:-1]) if len(bounds) > 1 else np.zeros(0)
    pack_tokens = np.minimum(pack_tokens, seq_length)
    return {"packs": int(len(pack_tokens)), "tokens": int(pack_tokens.sum())}


def compute_mixture(shares, summaries, global_batch_size):
    """shares: target token fractions; summaries: [{"packs", "tokens"}]. Returns the plan."""
    total_share = sum(shares)
    shares = [s / total_share for s in shares]
    tpp = [s["tokens"] / max(s["packs"], 1) for s in summaries]  # tokens per sample
    raw = [sh / t for sh, t in zip(shares, tpp)]  # samples per token of the mixture
    weights = [r / sum(raw) for r in raw]
    # an epoch = enough samples that the source exhausted first is seen once
    total = max(s["packs"] / w for s, w in zip(summaries, weights) if w > 0)
    total = int(math.ceil(total))
    per_source = [int(round(total * w)) for w in weights]
    return {"weights": weights, "tokens_per_sample": tpp, "samples_per_epoch": total, "samples_per_source": per_source,
            "epochs_per_source": [ps / max(s["packs"], 1) for ps, s in zip(per_source, summaries)],
            "iterations_per_epoch": int(math.ceil(total / global_batch_size))}


def mixture_plan(shares, prefixes, seq_length: int, global_batch_size: int) -> dict:
    """:func:`compute_mixture` for prefixes on disk, plus the ``--data-path`` string that realises it."""
    plan = compute_mixture(shares, [prefix_summary(p, seq_length) for p in prefixes], global_batch_size)
    plan["data_path"] = " ".join(f"{w:.6f} {p}" for w, p in zip(plan["weights"], prefixes))
    plan["prefixes"] = list(prefixes)
    return plan
