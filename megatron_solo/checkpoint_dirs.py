"""Where a checkpoint directory's iterations are and which are complete: Megatron-LM's layout
(``latest_checkpointed_iteration.txt``, ``iter_0000123/``) plus SOLO's ``solo_checkpoint.json``. Plain file
reads in a module that imports neither torch nor megatron-core, so the launchers' pre-flight finds the
checkpoint a run starts from before they load; megatron_solo/checkpoint.py writes and reads the checkpoints.
"""

from __future__ import annotations

import os
import re

TRACKER = "latest_checkpointed_iteration.txt"
INFO = "solo_checkpoint.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INFO)) and os.path.isfile(os.path.join(path, "metadata.json"))


def complete_iterations(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    its = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and is_complete(os.path.join(root, name)):
            its.append(int(m.group(1)))
    return sorted(its)


def latest_iteration(root: str) -> int | None:
    """The tracker's iteration if that checkpoint is complete, else the newest complete one."""
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if text.isdigit() and is_complete(iteration_dir(root, int(text))):
            return int(text)
    its = complete_iterations(root)
    return its[-1] if its else None
