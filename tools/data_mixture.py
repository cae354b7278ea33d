#!/usr/bin/env python
"""Turn target token proportions into Megatron blend weights and per-epoch sample/iteration counts.

SOLO chose its stage mixtures (e.g. ImageNet-21k + ~30% SlimPajama) by hand in a notebook; this does
the arithmetic from the prefixes' own P.stats.json / indices:

    python tools/data_mixture.py --seq-length 32768 --global-batch-size 128 \
        --mix 0.7 out/imagenet21k 0.3 out/slimpajama

prints the `--data-path` string (weights = target share of *samples*, derived from the target
token share and each prefix's tokens per pack), and for one pass over the largest-needed source:
samples per source, total samples and iterations per epoch.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prefix_summary(prefix: str, seq_length: int) -> dict:
    """packs and tokens of a prefix (as training sees them: each pack cut to seq_length)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix + "-tokens")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", nargs="+", required=True, help="share1 prefix1 share2 prefix2 ... (token shares)")
    ap.add_argument("--seq-length", type=int, required=True)
    ap.add_argument("--global-batch-size", type=int, required=True)
    a = ap.parse_args(argv)
    if len(a.mix) % 2:
        ap.error("--mix takes pairs: share prefix")
    shares = [float(x) for x in a.mix[0::2]]
    prefixes = a.mix[1::2]
    summaries = [prefix_summary(p, a.seq_length) for p in prefixes]
    plan = compute_mixture(shares, summaries, a.global_batch_size)
    plan["data_path"] = " ".join(f"{w:.6f} {p}" for w, p in zip(plan["weights"], prefixes))
    plan["prefixes"] = prefixes
    print(json.dumps(plan, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
