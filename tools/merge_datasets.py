#!/usr/bin/env python
"""Merge complete SOLO prefixes (e.g. shards written in parallel) into one prefix, atomically.

    .venv/bin/python tools/merge_datasets.py --input out/shard0 out/shard1 --output-prefix out/all
"""

import argparse
import json
import sys

from megatron_solo import quiet
from megatron_solo.data.merge import merge_prefixes
from megatron_solo.data.shards import expand_source
from megatron_solo.errors import InputError, entry_point


@entry_point  # an input that is not a complete prefix, or prefixes of two image storages: one error: line, exit 2
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="prefixes to concatenate, in order")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's import-time notes that ask nothing of the user
    try:
        inputs = [q for p in a.input for q in (expand_source(p) or [p])]  # X.shards or a glob: its shards
    except FileNotFoundError as e:  # an unfinished shard list, a glob that matches no complete prefix
        raise InputError(str(e)) from None
    stats = merge_prefixes(inputs, a.output_prefix, overwrite=a.overwrite)
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
