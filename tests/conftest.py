"""Every test goes through the CPU backend (a no-op on a GPU machine)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tools/ and examples/ are addressed relative to the repository root
os.environ.setdefault("OMP_NUM_THREADS", "2")

from megatron_solo import cpu_backend  # noqa: E402

cpu_backend.ensure()
