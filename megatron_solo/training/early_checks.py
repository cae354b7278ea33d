"""The start-up checks that need neither torch nor megatron-core, made before either is imported.

Importing them costs ~5 s of a quiet 2-core machine (more under load: docs/BENCHMARKS.md "Start-up"), and
most first-hour mistakes need neither: a bad flag, a tokenizer path that is not there, a data prefix
mistyped or given as one of its files. The launchers' pre-flight and the trainer make these first, so such
a mistake is one ``error:`` line about a second after the command; the full checks follow once the
imports are done (:func:`megatron_solo.training.config.build_train_config`,
:func:`megatron_solo.training.faults.check_inputs`). These are the first parts of those checks, not copies:
:func:`~megatron_solo.training.arguments.validate_args` and
:func:`~megatron_solo.data.indexed.check_prefix_files`, which the full checks call too.
"""

from __future__ import annotations

import shlex

from megatron_solo.data.indexed import check_prefix_files
from megatron_solo.data.shards import expand_source
from megatron_solo.errors import InputError
from megatron_solo.training.arguments import validate_args


def blend_prefixes(data_path) -> list[str]:
    """The prefixes a ``--data-path`` value names, by megatron-core's blend rule (``get_blend_from_list``,
    whose module imports megatron-core: an even number of words whose even-numbered words are all
    numbers is "weight prefix" pairs, anything else is prefixes), each shard set replaced by its shards.
    The same list as :func:`megatron_solo.data.dataset.parse_data_path` (tested)."""
    words = [w for x in data_path or [] for w in shlex.split(str(x))]

    def number(w: str) -> bool:
        try:
            float(w)
            return True
        except ValueError:
            return False

    if words and len(words) % 2 == 0 and all(number(w) for w in words[::2]):
        words = words[1::2]
    prefixes = []
    for w in words:
        prefixes += expand_source(w) or [w]
    return prefixes


def check_before_imports(args) -> None:
    """The checks of parsed trainer flags that need no torch (see the module's docstring); raises
    :class:`~megatron_solo.training.arguments.ArgumentError` or :class:`~megatron_solo.errors.InputError`
    (one line) for the first problem."""
    validate_args(args)
    if args.dry_run:  # a plan reads no data (nor do the full checks of a dry run)
        return
    for flag, data_path in (("--data-path", args.data_path), ("--valid-data-path", args.valid_data_path)):
        try:
            prefixes = blend_prefixes(data_path)
        except FileNotFoundError as e:  # an unfinished shard list, a glob matching no complete prefix
            raise InputError(f"{flag}: {e}") from None
        for prefix in prefixes:
            check_prefix_files(prefix, flag)
