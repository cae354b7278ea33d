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

The launchers also hand it their pre-flight (:mod:`megatron_solo.training.preflight`), so that a launch
imports torch once before its workers start instead of twice (the pre-flight's process, then torchrun's)::

    python -m megatron_solo.training.torchrun --preflight PREFLIGHT-ARGS [--banner LINE] --torchrun TORCHRUN-ARGS

The pre-flight's quick checks run first, before torch loads; then torch is imported (torchrun's agent needs
it) and the full checks run in a forked child, which has torch already and keeps megatron-core and the
checks' state out of the agent. A mistake is the pre-flight's one ``error:`` line and its exit code, and
torchrun never starts; otherwise ``--banner`` is printed and torchrun runs with TORCHRUN-ARGS. The trainer's
flags are read from TORCHRUN-ARGS (after ``-m megatron_solo.train``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

from megatron_solo import quiet
from megatron_solo.netutil import free_port
from megatron_solo.training import preflight  # torch-free at import (its quick stage runs before torch loads)


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


def trainer_argv(torchrun_argv: list[str]) -> list[str]:
    """The trainer's flags in torchrun's arguments: those after ``-m megatron_solo.train``."""
    for i in range(len(torchrun_argv) - 1):
        if torchrun_argv[i:i + 2] == ["-m", "megatron_solo.train"]:
            return torchrun_argv[i + 2:]
    raise SystemExit("error: --preflight needs torchrun's arguments to run -m megatron_solo.train")


def preflight_then_torchrun_args(argv: list[str]) -> tuple[int, list[str]]:
    """``--preflight ... --torchrun ...``: run the pre-flight (module docstring); (its exit code, torchrun's
    arguments). Without ``--preflight``: (0, argv)."""
    if argv[:1] != ["--preflight"]:
        return 0, argv
    if "--torchrun" not in argv:
        raise SystemExit("error: --preflight ARGS must be followed by --torchrun TORCHRUN-ARGS")
    cut = argv.index("--torchrun")
    preflight_argv, torchrun_argv = argv[1:cut], argv[cut + 1:]
    banner = None
    if "--banner" in preflight_argv:
        i = preflight_argv.index("--banner")
        banner = preflight_argv[i + 1]
        del preflight_argv[i:i + 2]
    preflight_argv = [*preflight_argv, "--", *trainer_argv(torchrun_argv)]
    code = preflight.main(preflight_argv, stages=("quick",))  # before torch: a mistake here answers at once
    if code:
        return code, []
    import torch  # noqa: F401  torchrun's agent imports it anyway: here it is imported once, before the fork

    pid = os.fork()
    if pid == 0:  # the child: the full checks (megatron-core, the run's config), then gone
        try:
            code = preflight.main(preflight_argv, stages=("full",))
        except BaseException:  # not a user's mistake (those are lines and codes): the traceback helps
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        return (code if code > 0 else 128 - code), []  # a signal ended the check: as a shell reports it
    if banner:
        print(banner, file=sys.stderr, flush=True)
    return 0, torchrun_argv


def main(argv: list[str] | None = None) -> int:
    quiet.filter_known_warnings()  # the agent's own lines about the signal: the line below says it
    code, argv = preflight_then_torchrun_args(sys.argv[1:] if argv is None else argv)
    if code:
        return code
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

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
