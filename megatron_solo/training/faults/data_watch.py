"""A data file changed under a running job is named, not a SIGBUS or garbage ids.

The datasets are memory-mapped: a ``.bin`` truncated under the map (a preprocessing rerun, a full disk, a
careless ``cp``) ends the process with SIGBUS, a rewritten one feeds other data without a word. Each
sample read first checks (``stat``: size and mtime) the files of the one prefix it comes from.
"""

from __future__ import annotations

import copy
import os

from megatron.core.datasets.blended_dataset import BlendedDataset

from megatron_solo.data.indexed import STORAGE_SUFFIXES, component_prefix, prefix_storage
from megatron_solo.errors import UserError


class DataFileError(UserError):
    """A data file changed after start-up (exit 1)."""


class _WatchedDataset:
    """One prefix's dataset whose files are checked (size, mtime) before each of its samples is read: a file
    truncated under an open memory map would otherwise end the process with SIGBUS, a rewritten one with
    wrong data. ``files``: the prefix's ``.idx``/``.bin`` paths -> their (size, mtime) at start-up."""

    def __init__(self, dataset, files: dict):
        self.dataset, self.files = dataset, files

    def check(self) -> None:
        for path, (size, mtime) in self.files.items():
            try:
                st = os.stat(path)
            except OSError as e:
                raise DataFileError(f"data file {path} disappeared during the run ({e.strerror})") from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                what = "truncated" if st.st_size < size else "rewritten"
                raise DataFileError(f"data file {path} was {what} during the run ({size} -> {st.st_size} "
                                    f"bytes); restore it (or re-run tools/preprocess_data.py) and resume")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.check()
        try:
            return self.dataset[i]
        except Exception:
            self.check()  # a changed file explains the failure: name it
            raise


def _prefix_files(prefix: str) -> dict:
    """The ``.idx``/``.bin`` files of ``prefix`` -> (size, mtime) now."""
    files = {}
    for n in STORAGE_SUFFIXES[prefix_storage(prefix)]:
        for ext in (".idx", ".bin"):
            path = component_prefix(prefix, n) + ext
            st = os.stat(path)
            files[path] = (st.st_size, st.st_mtime_ns)
    return files


def _watch(ds, baselines: dict):
    """``ds`` with each per-prefix dataset in it watched over that prefix's files only. A blend
    (megatron-core's BlendedDataset) is copied with its ``datasets`` replaced by watched ones: its own
    ``__getitem__`` picks the one dataset a sample comes from, so a read checks that prefix alone.
    ``baselines``: prefix -> its files' start-up values, shared by the train and validation sets."""
    if isinstance(ds, BlendedDataset):
        blend = copy.copy(ds)  # the caller's object is left as it was
        blend.datasets = [_watch(d, baselines) for d in ds.datasets]
        return blend
    prefix = ds.dataset_path  # a MegatronDataset (SoloDataset) reads the one prefix it was built from
    if prefix not in baselines:
        baselines[prefix] = _prefix_files(prefix)
    return _WatchedDataset(ds, baselines[prefix])


def watch_data_files(train_ds, valid_sets):
    """Wrap the train dataset and validation sets so that a data file changed after start-up stops the run
    with its name. Cost: before each sample is read, one ``stat`` per ``.idx``/``.bin`` of the one prefix
    that sample comes from (8 for an encoded prefix, 6 for a patches one), whatever the number of prefixes
    in the blend; a read that raises re-checks them. The wrappers pickle with the datasets (DataLoader
    workers check in the worker that reads)."""
    baselines = {}
    return _watch(train_ds, baselines), [(name, _watch(ds, baselines)) for name, ds in valid_sets]
