"""What a training run does when something goes wrong (docs/TRAINING.md, "What happens when ..."), one
module per fault:

- :mod:`.inputs`: every input checked before anything is built (no megatron-core initialisation, one
  process; launchers' pre-flight calls it too), through the owners of each format. Each failure is one
  :class:`~megatron_solo.errors.InputError` line.
- :mod:`.lock`: one writer per ``--save`` directory (:class:`SaveDirLock`, a heartbeat lock file).
- :mod:`.parent`: a worker started by torchrun exits (without saving) within a second of its agent dying.
- :mod:`.data_watch`: a dataset file changed after start-up stops the run with its name.
- :mod:`.save_failure`: a save that fails midway is one line; the tracker still names the last complete
  checkpoint.
- :mod:`.exit_signal`: SIGTERM/SIGINT under ``--exit-signal-handler``: save at the end of the iteration, exit.
- :mod:`.guard`: the entry point's frame (inputs, the lock, a user error said once as one line).

The user-error type and its one line are :mod:`megatron_solo.errors`. Importing this package changes
nothing; every effect starts with an explicit call of an entry point.
"""

from megatron_solo.errors import InputError, UserError
from megatron_solo.training.faults.data_watch import DataFileError, watch_data_files
from megatron_solo.training.faults.exit_signal import ExitSignal
from megatron_solo.training.faults.guard import guarded_run
from megatron_solo.training.faults.inputs import check_inputs
from megatron_solo.training.faults.lock import LOCK_NAME, SaveDirLock
from megatron_solo.training.faults.parent import watch_parent
from megatron_solo.training.faults.save_failure import SaveError, saving

__all__ = ["DataFileError", "ExitSignal", "InputError", "LOCK_NAME", "SaveDirLock", "SaveError", "UserError",
           "check_inputs", "guarded_run", "saving", "watch_data_files", "watch_parent"]
