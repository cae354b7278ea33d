"""torchrun (``torch.distributed.run``), whose agent ends an interrupted run with one line instead of a traceback.

Ctrl-C (SIGINT to the agent: torchrun starts its workers in sessions of their own, so the terminal's
signal reaches only the agent) and a scheduler's SIGTERM make torchrun's agent raise ``SignalException``:
it passes the signal on to the workers, waits for them (with ``--exit-signal-handler`` each finishes its
iteration, saves and exits 0; the last rank's log says ``exiting at iteration N (signal)``), then lets the
exception out of its ``main``, and Python prints its traceback. Here that exception is the run's end:
one line saying how to resume, exit ``128 + signal`` as a shell reports a process a signal ended.

A worker that stops on a user mistake (``megatron_solo.errors``: a held ``--save``, a missing prefix) prints
its one ``error:`` line and records it in torchrun's error file; torchrun's agent then raises
``ChildFailedError`` for the non-zero exit and Python prints a traceback and a table after that line
(torch/distributed/launcher/api.py does so for any failed worker; nothing a worker does can change it).
Here, when the first failure's record is such a line, the line already printed is the run's end: exit
with the worker's code, nothing after it. Any other failure (a crash, a killed worker) keeps torchrun's
whole report. An agent that cannot open its rendezvous port (another run on this machine holds
``--master-port``) ends with one line naming the port and ``MASTER_PORT``, exit 2. The launchers run this module in place of ``python -m torch.distributed.run``; its
arguments are torchrun's, so a run started by hand gets the same by writing
``python -m megatron_solo.training.torchrun`` where it wrote ``torchrun``.
"""

from __future__ import annotations

import logging
import re
import signal
import sys

from megatron_solo import quiet
from megatron_solo.netutil import free_port


def resume_hint(trainer_argv: list[str]) -> str:
    """Where the run saved (its ``--save``), and that the same command resumes from there."""
    save = next((trainer_argv[i + 1] for i, a in enumerate(trainer_argv[:-1]) if a == "--save"), None)
    if save is None:
        return "nothing was saved (no --save)"
    return f"run the same command again to resume from the last checkpoint in {save}"


def port_in_use_line(exc: BaseException) -> str | None:
    """The ``error:`` line for an agent that cannot open its rendezvous port (torch's ``DistNetworkError``
    with ``EADDRINUSE``: another job on this machine holds ``--master-port``, e.g. the launchers' default 29500
    when two runs share a node), else None."""
    text = str(exc)
    if "EADDRINUSE" not in text:
        return None
    port = re.search(r"port: (\d+)", text)
    port = port.group(1) if port else "--master-port"
    return (f"error: port {port} (torchrun's --master-port; MASTER_PORT in the launchers) is in use on this "
            f"machine, by another run perhaps; choose a free port (e.g. MASTER_PORT={free_port()})")


def user_error_line(failure) -> str | None:
    """The ``error:`` line a worker recorded for torchrun (``errors.print_error``), else None."""
    message = getattr(failure, "message", None)
    if isinstance(message, dict):
        message = message.get("message")
    if isinstance(message, str) and message.startswith("error: ") and "\n" not in message:
        return message
    return None


# The agent's own log lines about a failed worker, logged before it raises: held back until the failure is
# known, then dropped after a user's error: line (the line says it all) or logged as usual.
_FAILURE_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                    "torch.distributed.elastic.multiprocessing.errors.error_handler")


class _HeldFailureLogs(logging.Filter):
    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.held.append(record)
            return False
        return True

    def release(self, emit: bool) -> None:
        for name in _FAILURE_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if emit:
            for record in self.held:
                logging.getLogger(record.name).handle(record)
        self.held.clear()


def main(argv: list[str] | None = None) -> int:
    quiet.filter_known_warnings()  # the agent's own lines about the signal: the line below says it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    argv = sys.argv[1:] if argv is None else argv
    held = _HeldFailureLogs()
    for name in _FAILURE_LOGGERS:
        logging.getLogger(name).addFilter(held)
    try:
        torchrun_main(argv)
    except SignalException as e:  # the agent has stopped its workers (they saved, with --exit-signal-handler)
        held.release(emit=False)  # the workers' ends after the signal: the line below says what happened
        name = signal.Signals(e.sigval).name
        print(f"stopped by {name}: {resume_hint(argv)}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if user_error_line(failure) is None:
            held.release(emit=True)
            raise  # not a user mistake: torchrun's report, with the worker's traceback, is what helps
        held.release(emit=False)
        return failure.exitcode if failure.exitcode > 0 else 1  # the line is already on the terminal
    except BaseException as e:
        held.release(emit=True)
        line = port_in_use_line(e)  # before any worker started: nothing ran, nothing was saved
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 2
    held.release(emit=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
