"""How many packs of a prefix each split (train, valid, test) gets, and the check that a split the run reads
is not empty, with neither torch nor megatron-core (the launchers' pre-flight answers such a mistake before
they load). The rule is megatron-core's (``BlendedMegatronDatasetBuilder``, with
``parse_and_normalize_split`` and ``convert_split_vector_to_split_matrix`` of
``megatron/core/datasets/blended_megatron_dataset_config.py``), written out here in plain Python because
importing that module imports megatron-core; tests/test_startup.py compares the two on many splits.
"""

from __future__ import annotations

import re
from typing import Optional

SPLIT_NAMES = ("train", "valid", "test")


class DataSplitError(ValueError):
    """A split the run reads holds no packs of a prefix (too little data for --split)."""


def split_bounds(split: str) -> list[Optional[tuple[float, float]]]:
    """megatron-core's split matrix of ``split`` ("99,1,0"): each split's (start, end) fraction, None when it
    has weight 0."""
    weights = [float(x) for x in re.findall(r"[.0-9]+", split)]
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    assert len(weights) == len(SPLIT_NAMES) and all(w >= 0.0 for w in weights), split
    total = 0.0
    for w in weights:  # left to right, as numpy sums three float64 values
        total += w
    ends = [0.0]
    for w in weights:
        ends.append(ends[-1] + w / total)
    return [None if b <= a else (a, b) for a, b in zip(ends[:-1], ends[1:])]


def split_pack_counts(num_packs: int, split: str) -> list[Optional[int]]:
    """Packs of a prefix in each of (train, valid, test): megatron-core's rule (split bounds
    ``round(bound * num_packs)``), applied per prefix; None for a split of weight 0 (megatron-core builds no
    dataset for it: nothing is read)."""
    return [None if m is None else int(round(m[1] * num_packs)) - int(round(m[0] * num_packs))
            for m in split_bounds(split)]


def empty_split_message(prefix, split_name: str, split: Optional[str], num_packs: int, requested: int) -> str:
    """One line: which split is empty, how many packs the prefix has, and the two fixes."""
    of_split = f" of --split {split}" if split else ""
    return (f"{prefix}: the {split_name} split{of_split} holds no packs (the prefix has {num_packs} packs; "
            f"{requested} {split_name} samples are needed); use --split 100,0,0 to train on every pack "
            f"without validation, or --valid-data-path PREFIX to validate on a separate prefix")


def check_split_packs(prefixes, split: str, train_samples: int = 1, valid_samples: int = 0) -> None:
    """Raise :class:`DataSplitError` when a split the run reads holds no packs of one of ``prefixes`` (each
    prefix's packs counted from its index with numpy)."""
    from megatron_solo.data.indexed import SoloIndexedDataset  # numpy; here: importing this module reads nothing

    for prefix in prefixes:
        num_packs = len(SoloIndexedDataset(prefix, reader="numpy"))
        counts = split_pack_counts(num_packs, split)
        for name, want, have in (("train", train_samples, counts[0]), ("valid", valid_samples, counts[1])):
            if want and have == 0:
                raise DataSplitError(empty_split_message(prefix, name, split, num_packs, want))
