#!/usr/bin/env python3
"""Write the demo's corpora from scikit-learn's handwritten digits (see megatron_solo/demo/digits.py)."""

import argparse
import json

from megatron_solo.demo.digits import write_corpora

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", required=True)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(write_corpora(a.output, a.test_fraction, a.seed), indent=1))
