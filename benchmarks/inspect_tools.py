#!/usr/bin/env python
"""How soon the inspection tools show one pack (issue 26.6: under 3 s), medians over alternating fresh processes.

    .venv/bin/python benchmarks/inspect_tools.py --repeats 5

Each tool (``tools/inspect_data.py`` text view, ``tools/visualize_patches.py`` to a PNG) on pack 1 of the demo's
SFT digits prefix, run two ways in alternation: as it is (numpy's reader of the prefix, data/index_file.py), and
with the reader the tools used before, megatron-core's ``IndexedDataset``, imported first in the same interpreter
(the baseline: what the tools paid for it). Prints the medians and their ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def timed(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([PY, "-c", code], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for cmd in (["tools/create_solo_tokenizer.py", "--base", "mistral-common", "--output", f"{root}/tok"],
                    ["tools/make_digits_corpus.py", "--output", f"{root}/corpus"],
                    ["tools/preprocess_data.py", "--input", f"{root}/corpus/sft.jsonl", "--output-prefix",
                     f"{root}/sft", "--tokenizer-model", f"{root}/tok/tokenizer.model", "--format", "chat",
                     "--seq-length", "128", "--image-root", f"{root}/corpus", "--no-progress"]):
            subprocess.run([PY, *cmd], cwd=ROOT, check=True, capture_output=True)
        tools = {
            "inspect_data.py (text view)": ["tools/inspect_data.py", "--prefix", f"{root}/sft", "--pack", "1",
                                            "--tokenizer-model", f"{root}/tok/tokenizer.model"],
            "visualize_patches.py (PNG)": ["tools/visualize_patches.py", "--prefix", f"{root}/sft", "--pack", "1",
                                           "--tokenizer-model", f"{root}/tok/tokenizer.model", "--out",
                                           f"{root}/p.png"]}
        print(f"{'tool':30s} {'now (s)':>9s} {'with megatron-core reader (s)':>30s} {'ratio':>7s}")
        for name, argv in tools.items():
            run = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({argv[0]!r}, run_name='__main__')"
            now, before = [], []
            for _ in range(a.repeats):
                now.append(timed(run))
                before.append(timed("import megatron.core.datasets.indexed_dataset\n" + run))
            m_now, m_before = statistics.median(now), statistics.median(before)
            print(f"{name:30s} {m_now:9.2f} {m_before:30.2f} {m_before / m_now:6.1f}x")
        print(f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
