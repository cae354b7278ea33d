"""glibc ``malloc`` settings for processes that decode images in a loop.

Each document allocates and frees a few megabytes (the decoded image, its resize, its patches). With
glibc's defaults those blocks are handed back to the kernel when freed (``mmap``/``munmap``, or heap
trimming once the dynamic mmap threshold has grown) and the next document faults the same amount in
again: 624,000 page faults for 1,000 photos with ``--image-storage patches``, 1.6 s of 4.9 s of CPU
on this project's 2-core VM (docs/BENCHMARKS.md 3b). Keeping freed memory for reuse removes them.

The settings are process-wide, so only the processes that do this work call :func:`keep_freed_memory`
(the preprocessing tool and its workers, training's DataLoader workers, the benchmarks that measure
them); importing this module changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit hosts
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap; RSS still follows the peak in use


def keep_freed_memory() -> bool:
    """Serve blocks under 32 MiB from the heap and keep up to 256 MiB of freed heap for reuse.

    Returns False, changing nothing, where the C library is not glibc (musl, macOS): a speed-up only.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("not glibc: malloc thresholds left as they are")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        logger.info("mallopt refused the thresholds: malloc left as it is")
    return ok
