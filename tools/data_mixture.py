#!/usr/bin/env python
"""Turn target token proportions into Megatron blend weights and per-epoch sample/iteration counts.

The arithmetic is :mod:`megatron_solo.data.mixture`; from the prefixes' own indices:

    .venv/bin/python tools/data_mixture.py --seq-length 32768 --global-batch-size 128 \
        --mix 0.7 out/imagenet21k 0.3 out/slimpajama

prints the `--data-path` string (weights = target share of *samples*, derived from the target
token share and each prefix's tokens per pack), and for one pass over the largest-needed source:
samples per source, total samples and iterations per epoch.
"""

import argparse
import json
import sys

from megatron_solo.data.mixture import mixture_plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", nargs="+", required=True, help="share1 prefix1 share2 prefix2 ... (token shares)")
    ap.add_argument("--seq-length", type=int, required=True)
    ap.add_argument("--global-batch-size", type=int, required=True)
    a = ap.parse_args(argv)
    if len(a.mix) % 2:
        ap.error("--mix takes pairs: share prefix")
    try:
        shares = [float(x) for x in a.mix[0::2]]
    except ValueError as e:
        ap.error(f"--mix takes pairs: share prefix ({e})")
    print(json.dumps(mixture_plan(shares, a.mix[1::2], a.seq_length, a.global_batch_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
