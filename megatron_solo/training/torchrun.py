"""torchrun (``torch.distributed.run``), whose agent ends an interrupted run with one line instead of a traceback.

Ctrl-C (SIGINT to the agent: torchrun starts its workers in sessions of their own, so the terminal's
signal reaches only the agent) and a scheduler's SIGTERM make torchrun's agent raise ``SignalException``:
it passes the signal on to the workers, waits for them (with ``--exit-signal-handler`` each finishes its
iteration, saves and exits 0; the last rank's log says ``exiting at iteration N (signal)``), then lets the
exception out of its ``main``, and Python prints its traceback. Here that exception is the run's end:
one line saying how to resume, exit ``128 + signal`` as a shell reports a process a signal ended. The
launchers run this module in place of ``python -m torch.distributed.run``; its arguments are torchrun's.
"""

from __future__ import annotations

import signal
import sys

from megatron_solo import quiet


def resume_hint(trainer_argv: list[str]) -> str:
    """Where the run saved (its ``--save``), and that the same command resumes from there."""
    save = next((trainer_argv[i + 1] for i, a in enumerate(trainer_argv[:-1]) if a == "--save"), None)
    if save is None:
        return "nothing was saved (no --save)"
    return f"run the same command again to resume from the last checkpoint in {save}"


def main(argv: list[str] | None = None) -> int:
    quiet.filter_known_warnings()  # the agent's own lines about the signal: the line below says it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    argv = sys.argv[1:] if argv is None else argv
    try:
        torchrun_main(argv)
    except SignalException as e:  # the agent has stopped its workers (they saved, with --exit-signal-handler)
        name = signal.Signals(e.sigval).name
        print(f"stopped by {name}: {resume_hint(argv)}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
