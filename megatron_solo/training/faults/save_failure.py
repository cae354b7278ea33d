"""A checkpoint save that fails midway (disk full, I/O error, a write refused) is one line.

megatron-core's failure arrives as a per-rank exception tree, on every rank; the user needs to know what
failed and that ``latest_checkpointed_iteration.txt`` still names the last complete checkpoint (it is
replaced last), so that resuming is safe once the disk is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import shutil

from megatron_solo import checkpoint
from megatron_solo.errors import UserError


class SaveError(UserError):
    """A save failed (exit 1); the last complete checkpoint is intact."""


@contextlib.contextmanager
def saving(save_dir: str, iteration: int):
    """A failed save (disk full, I/O error, a write refused) becomes one :class:`SaveError` line that says
    which checkpoint is still the last complete one."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        last = checkpoint.latest_iteration(save_dir)
        detail = _save_failure_detail(e, save_dir)
        raise SaveError(f"saving iteration {iteration} to {save_dir} failed ({detail}); "
                        f"{'the last complete checkpoint is iteration ' + str(last) if last is not None else 'no complete checkpoint was written'}"
                        f" ({checkpoint.TRACKER} is unchanged): free space or fix the directory, then resume "
                        f"with --load {save_dir}") from e


def _causes(e: BaseException):
    """``e`` and every exception it wraps (causes, contexts, torch checkpoint's per-rank failures)."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, *x.args]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]


def _save_failure_detail(e: BaseException, save_dir: str) -> str:
    """The OS error behind a failed save when one is known; megatron-core's writer processes report theirs
    only as text, so a nearly full filesystem is said from its free space."""
    os_error = next((x for x in _causes(e) if isinstance(x, OSError)), None)
    if os_error is not None:
        return str(os_error).splitlines()[0]
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(save_dir).free
        if free < 64 << 20:
            return f"[Errno {errno.ENOSPC}] No space left on device: {free >> 20} MiB free on the filesystem of {save_dir}"
    lines = [l for l in str(e).splitlines() if l.strip()]
    return lines[-1].strip() if lines else type(e).__name__
